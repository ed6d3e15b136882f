#!/usr/bin/env bash
# Refresh constraints.txt, the lock of the versions CI tests: build a throwaway venv from pyproject's extras with
# nothing pinned but torch (its CPU build, installed first as scripts/setup_env.sh does), and record every package
# it ends up with. Then run `bash scripts/test.sh` and commit constraints.txt with the README's "Tested versions".
#   bash scripts/lock.sh                      # keep torch at the version locked now
#   DIFFSHIP_TORCH=2.14.0 bash scripts/lock.sh  # move torch too
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH="${DIFFSHIP_TORCH:-$(sed -n -E 's/^torch==([^ ;]+).*/\1/p' constraints.txt)}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python3 -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q "torch==$TORCH"
"${PIP[@]}" install -q -e ".[all]"
PY="$("$WORK/venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
{
    echo "# The versions CI tests: scripts/setup_env.sh (and so scripts/test.sh, scripts/demo.sh, .ci/run) installs"
    echo "# with -c constraints.txt. Refresh: bash scripts/lock.sh. Locked on CPython $PY (other Pythons resolve"
    echo "# freely, but for torch). torch is the CPU build (==$TORCH matches $TORCH+cpu); pip and setuptools are locked too."
    "${PIP[@]}" freeze --all --exclude-editable \
        | grep -v -E '^(#|-e )' \
        | grep -v -i -E '^diffship==' \
        | sed -E 's/^(torch==[^+]+)\+.*$/\1/' \
        | LC_ALL=C sort -f \
        | sed -E "s/\$/ ; python_version == \"$PY\"/"
} > "$WORK/constraints.txt"
mv "$WORK/constraints.txt" constraints.txt
echo "wrote constraints.txt ($(grep -c "^[^#]" constraints.txt) packages)"
