#!/usr/bin/env bash
# The main job on the built-in trained shapes model: export it to ONNX and OpenVINO (validated against PyTorch),
# generate "a red circle on the left" with each backend's numpy pipeline, show the image, print the timing table.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(bash scripts/setup_env.sh | tail -n 1)"
DIFFSHIP="$VENV/bin/diffship"
WORK="${DIFFSHIP_DEMO_DIR:-out/demo}"
PROMPT="${DIFFSHIP_DEMO_PROMPT:-a red circle on the left}"
mkdir -p "$WORK"

rm -rf "$WORK/shapes-sd"
"$DIFFSHIP" tiny-model --trained "$WORK/shapes-sd"
"$DIFFSHIP" export "$WORK/shapes-sd" "$WORK/exported" --backend onnx,openvino --overwrite
for backend in onnxruntime openvino; do
    echo
    "$DIFFSHIP" generate "$WORK/exported" --backend "$backend" --prompt "$PROMPT" \
        --steps 25 --guidance 6 --seed 0 --out "$WORK/image-$backend.png" --overwrite --no-progress --show
done
