"""Backends behind one Session protocol, chosen by name. Adding a backend touches no pipeline."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from diffship.errors import BackendError
from diffship.layout import ONNX_MODEL, OPENVINO_MODEL
from diffship.runtimes.base import Session, TensorInfo, input_info


@dataclass(frozen=True)
class Backend:
    """A runtime: where its Session class lives (imported on first use) and the graph file it reads."""

    module: str
    session_class: str
    model_file: str


# The backend registry: adding a backend is a module in runtimes/ and a line here.
BACKENDS = {
    "onnxruntime": Backend("diffship.runtimes.onnxruntime", "OnnxRuntimeSession", ONNX_MODEL),
    "openvino": Backend("diffship.runtimes.openvino", "OpenVINOSession", OPENVINO_MODEL),
}
ALIASES = {"ort": "onnxruntime", "onnx": "onnxruntime", "ov": "openvino"}


def backend_name(name: str) -> str:
    canonical = ALIASES.get(name.lower(), name.lower())
    if canonical not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return canonical


def session_class(backend: str):
    entry = BACKENDS[backend_name(backend)]
    return getattr(importlib.import_module(entry.module), entry.session_class)


def load_session(path, backend: str = "onnxruntime", **options) -> Session:
    """Open the graph in a component folder (or a model file) with `backend` and its options."""
    return session_class(backend)(path, **options)


__all__ = ["BACKENDS", "Backend", "Session", "TensorInfo", "backend_name", "input_info", "load_session", "session_class"]
