#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install diffship with every extra, at the versions CI tests
# (constraints.txt; refresh it with scripts/lock.sh). torch (CPU) is installed first: a bare torch requirement on a
# machine without torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DIFFSHIP_VENV:-.venv}"
TORCH="$(sed -n -E 's/^torch==([^ ;]+).*/\1/p' constraints.txt)"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "torch==$TORCH"
"${PIP[@]}" -e ".[all]"
echo "$VENV"
