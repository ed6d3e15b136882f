#!/usr/bin/env bash
# The main job on the built-in tiny model: export to ONNX and OpenVINO (validated against PyTorch),
# generate an image with each backend's numpy pipeline, print the per-stage timing table.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(bash scripts/setup_env.sh | tail -n 1)"
DIFFSHIP="$VENV/bin/diffship"
WORK="${DIFFSHIP_DEMO_DIR:-out/demo}"
mkdir -p "$WORK"

"$DIFFSHIP" tiny-model "$WORK/tiny-sd" --kind sd1
"$DIFFSHIP" export "$WORK/tiny-sd" "$WORK/exported" --backend onnx,openvino --overwrite
for backend in onnxruntime openvino; do
    echo
    "$DIFFSHIP" generate "$WORK/exported" --backend "$backend" --prompt "a red circle on the left" \
        --steps 25 --seed 0 --scheduler euler --out "$WORK/image-$backend.png" --no-progress
done
