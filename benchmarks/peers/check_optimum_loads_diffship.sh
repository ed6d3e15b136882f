#!/usr/bin/env bash
# The reverse interop check: diffship's exports load in Optimum's ORT and OpenVINO pipelines and give diffusers'
# images. Writes benchmarks/results/optimum_loads_diffship.{md,json}.
#
#   bash benchmarks/peers/check_optimum_loads_diffship.sh [WORK_DIR]      # default WORK_DIR: <repo>/out/optimum_reverse
#
# 1. main venv (.venv, or $MAIN_VENV): `diffship tiny-model WORK/tiny-sd1 --kind sd1`, its text encoder weights
#    renamed to the Hub layout (benchmarks/peers/optimum_fixtures.py hub-layout: transformers 4.x, the oracle's
#    in the Optimum venv, cannot read transformers 5's layout), then
#    `diffship export WORK/tiny-sd1 WORK/diffship-export --backend onnx,openvino` (one directory holding both
#    model.onnx and openvino_model.xml in each component folder, as diffship writes it).
# 2. Optimum venv (.venv-optimum, or $OPTIMUM_VENV; made by setup_optimum_venv.sh):
#    benchmarks/peers/check_optimum_loads_diffship.py, which loads that directory with ORTStableDiffusionPipeline and
#    OVStableDiffusionPipeline (INFERENCE_PRECISION_HINT f32) and compares their images with diffusers' (torch) on
#    WORK/tiny-sd1. See its docstring for what is compared.
# Takes about 3 minutes on 2 cores. Rerunning remakes WORK from scratch.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MAIN_VENV="${MAIN_VENV:-$REPO_ROOT/.venv}"
OPTIMUM_VENV="${OPTIMUM_VENV:-$REPO_ROOT/.venv-optimum}"
WORK="$(mkdir -p "${1:-$REPO_ROOT/out/optimum_reverse}" && cd "${1:-$REPO_ROOT/out/optimum_reverse}" && pwd)"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ ! -x "$MAIN_VENV/bin/diffship" ]]; then
    echo "error: no diffship in $MAIN_VENV: run scripts/setup_env.sh (or set MAIN_VENV)" >&2
    exit 1
fi
bash "$REPO_ROOT/benchmarks/peers/setup_optimum_venv.sh" "$OPTIMUM_VENV"

rm -rf "${WORK:?}/tiny-sd1" "$WORK/diffship-export"
echo "diffship tiny-model + export (main venv) into $WORK"
"$MAIN_VENV/bin/diffship" tiny-model "$WORK/tiny-sd1" --kind sd1 >"$WORK/tiny-model.log" 2>&1 \
    || { tail -n 30 "$WORK/tiny-model.log" >&2; exit 1; }
"$MAIN_VENV/bin/python" "$REPO_ROOT/benchmarks/peers/optimum_fixtures.py" hub-layout "$WORK/tiny-sd1"
"$MAIN_VENV/bin/diffship" export "$WORK/tiny-sd1" "$WORK/diffship-export" --backend onnx,openvino \
    >"$WORK/export.log" 2>&1 || { tail -n 30 "$WORK/export.log" >&2; exit 1; }

echo "Optimum's pipelines on the diffship export (Optimum venv)"
"$OPTIMUM_VENV/bin/python" "$REPO_ROOT/benchmarks/peers/check_optimum_loads_diffship.py" \
    --export "$WORK/diffship-export" --source "$WORK/tiny-sd1" --work "$WORK" \
    --diffship-version "$("$MAIN_VENV/bin/python" -c 'from importlib.metadata import version; print(version("diffship"))')" \
    --out "$REPO_ROOT/benchmarks/results/optimum_loads_diffship"
