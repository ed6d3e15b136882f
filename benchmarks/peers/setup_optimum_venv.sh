#!/usr/bin/env bash
# Creates a separate venv with Hugging Face Optimum's ONNX Runtime and OpenVINO integrations, the peers that
# diffship is compared with and must interoperate with (their exports load in diffship and ours in theirs).
#
#   bash benchmarks/peers/setup_optimum_venv.sh [VENV_DIR]     # default: <repo>/.venv-optimum
#
# Idempotent: a second run with the same pins checks the imports and returns in a few seconds.
#
# Why these versions (one venv for both stacks):
#   optimum-onnx 0.1.0 (the ORT integration, optimum.onnxruntime) needs optimum~=2.1.0 and transformers<4.58;
#   optimum-intel 2.x needs optimum~=2.2/2.3, so it cannot share a venv with optimum-onnx 0.1.0;
#   optimum-intel 1.27.0 is the newest release that depends on optimum-onnx~=0.1.0 -> one venv works.
#   transformers 4.57.x needs huggingface-hub<1.0, and diffusers >=0.40 needs huggingface-hub>=1.23,
#   so diffusers 0.39.0 is the newest one that fits.
# torch goes in first, pinned to the CPU wheel that lies on this machine's disk: a bare torch requirement
# would pull a multi-GB CUDA build from PyPI. Needs Python 3.11 (numpy 2.4 / scipy 1.17 and the torch wheel).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$REPO_ROOT/.venv-optimum}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

TORCH_PIN="torch==2.13.0"
TOP_PINS=(
    "optimum==2.1.0"
    "optimum-onnx[onnxruntime]==0.1.0"
    "optimum-intel[openvino]==1.27.0"
    "transformers==4.57.6"
    "diffusers==0.39.0"
)
# The whole resolved set, so that a later run installs exactly what was probed (pip freeze, less torch).
LOCK="anyio==4.16.0
certifi==2026.10.18
charset-normalizer==3.5.2
cloudpickle==3.1.2
filelock==4.2.11
flatbuffers==25.12.19
fsspec==2026.9.0
h11==0.16.0
hf-xet==1.8.0
httpcore==1.0.9
httpx==0.28.1
huggingface_hub==0.36.2
idna==3.20
importlib_metadata==10.2.0
Jinja2==3.1.6
joblib==1.6.0
lazy-importer==0.1.0
markdown-it-py==4.3.0
MarkupSafe==3.0.4
mdurl==0.1.2
ml_dtypes==0.6.0
mpmath==1.3.0
narwhals==2.29.0
networkx==3.6.1
ninja==1.13.2
nncf==3.4.0
numpy==2.4.6
onnx==1.23.2
onnxruntime==1.31.1
openvino==2026.4.1
openvino-telemetry==2025.2.0
openvino-tokenizers==2026.4.1.0
packaging==26.3
pillow==13.0.0
protobuf==7.36.2
psutil==7.2.2
pydot==4.0.1
Pygments==2.21.0
pyparsing==3.3.3
PyYAML==6.0.3
regex==2026.11.15
requests==2.34.2
rich==15.0.0
safetensors==0.8.0
scikit-learn==1.9.1
scipy==1.17.1
sympy==1.14.0
tabulate==0.10.0
threadpoolctl==3.8.0
tokenizers==0.22.2
tqdm==4.70.1
typing_extensions==4.16.0
urllib3==2.8.0
zipp==4.1.2"

STAMP_TEXT="$(printf '%s\n' "$TORCH_PIN" "${TOP_PINS[@]}" "$LOCK" | sha256sum | cut -d' ' -f1)"
STAMP="$VENV/.diffship-optimum-stamp"
CHECK='from optimum.onnxruntime import ORTStableDiffusionPipeline
from optimum.intel import OVStableDiffusionPipeline
from importlib.metadata import version
names = ["optimum", "optimum-onnx", "optimum-intel", "onnxruntime", "openvino", "diffusers", "transformers", "torch"]
print(" | ".join(f"{n} {version(n)}" for n in names))'

# pip warns once per package about the missing folders of this machine's local mirrors; keep the rest.
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2>&1 | grep -v -e "is ignored: it is neither a file nor a directory" || true; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]] && "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
    echo "optimum venv up to date: $VENV"
    exit 0
fi

start=$SECONDS
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf '%s\n' "$TORCH_PIN" "$LOCK" >"$CONSTRAINTS"

echo "installing $TORCH_PIN (CPU)"
quiet_pip install -q --disable-pip-version-check "$TORCH_PIN"
echo "installing ${TOP_PINS[*]}"
quiet_pip install -q --disable-pip-version-check -c "$CONSTRAINTS" "$TORCH_PIN" "${TOP_PINS[@]}"

# pip's exit code is hidden by the filter above: the import check is the real test.
if ! "$VENV/bin/python" -c "$CHECK"; then
    echo "error: the optimum venv at $VENV does not import ORTStableDiffusionPipeline / OVStableDiffusionPipeline" >&2
    exit 1
fi
if "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 1)"; then :; else
    echo "warning: a CUDA build of torch was installed in $VENV (expected the CPU wheel)" >&2
fi
echo "$STAMP_TEXT" >"$STAMP"
echo "optimum venv ready in $((SECONDS - start)) s: $VENV ($(du -sh "$VENV" | cut -f1))"
