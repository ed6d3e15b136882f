#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(bash scripts/setup_env.sh | tail -n 1)"
exec "$VENV/bin/python" -m pytest -q "$@"
