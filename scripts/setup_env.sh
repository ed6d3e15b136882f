#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install diffship with every extra.
# torch 2.13.0 (CPU) is installed first: a bare torch requirement on a machine without torch pulls a
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DIFFSHIP_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[all]"
echo "$VENV"
