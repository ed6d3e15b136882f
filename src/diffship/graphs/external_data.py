"""Saving ONNX models, with weights in one `model.onnx_data` file once a graph passes the protobuf limit."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx.external_data_helper import load_external_data_for_model

# Protobuf cannot serialise a message over 2 GiB; graphs past it keep their weights beside them.
TWO_GB = 2**31 - 1
EXTERNAL_DATA_FILE = "model.onnx_data"


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by initializers, counting those already stored as external data."""
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in tensor.external_data if e.key == "length"), 0))
        else:
            total += len(tensor.raw_data) or tensor.ByteSize()
    return total


def save_model(model: onnx.ModelProto, path: str | Path, external_data_threshold: int = TWO_GB,
               size_threshold: int = 1024) -> list[Path]:
    """Write `model` to `path`; weights go to one external file when the graph exceeds the threshold.

    `model` is left as it was: onnx's writer moves each weight out of the proto into the external file, so the
    weights are read back from that file afterwards (the page cache still holds them). Without that, the next
    user of the same in-memory graph (the OpenVINO conversion of an export to both formats) would find weights
    pointing at a file of another directory. Tensors under `size_threshold` bytes stay in the graph (0: every
    tensor goes to the file, as swappable LoRA weights must). Returns the files written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tensor_bytes(model) > external_data_threshold:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_FILE,
            size_threshold=size_threshold,
        )
        load_external_data_for_model(model, str(path.parent))
        return [path, path.parent / EXTERNAL_DATA_FILE]
    onnx.save_model(model, str(path))
    return [path]
