"""Moving ONNX models between memory and disk. Graphs past 2 GB cannot be serialised in one protobuf, so tools
that take a path get a temporary copy with external data."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import onnx

from diffship.graphs.external_data import TWO_GB, save_model, tensor_bytes
from diffship.layout import ONNX_MODEL


def is_large(model: onnx.ModelProto) -> bool:
    return tensor_bytes(model) > TWO_GB // 2  # headroom: graph structure and metadata count too


@contextlib.contextmanager
def on_disk(model: onnx.ModelProto):
    """Yield a path holding `model` (with external data when large), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="diffship-graph-") as scratch:
        path = Path(scratch) / ONNX_MODEL
        save_model(model, path, external_data_threshold=TWO_GB // 2)
        yield path


def load(path: str | Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)
