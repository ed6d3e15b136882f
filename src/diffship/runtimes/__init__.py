"""Backends behind one Session protocol, chosen by name. Adding a backend touches no pipeline."""

from __future__ import annotations

import importlib

from diffship.errors import BackendError
from diffship.runtimes.base import Session, TensorInfo, input_info

# name -> (module, class, the file a component folder holds for it)
BACKENDS = {
    "onnxruntime": ("diffship.runtimes.onnxruntime", "OnnxRuntimeSession", "model.onnx"),
    "openvino": ("diffship.runtimes.openvino", "OpenVINOSession", "openvino_model.xml"),
}
ALIASES = {"ort": "onnxruntime", "onnx": "onnxruntime", "ov": "openvino"}


def backend_name(name: str) -> str:
    canonical = ALIASES.get(name.lower(), name.lower())
    if canonical not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return canonical


def session_class(backend: str):
    module, cls, _ = BACKENDS[backend_name(backend)]
    return getattr(importlib.import_module(module), cls)


def load_session(path, backend: str = "onnxruntime", **options) -> Session:
    """Open the graph in a component folder (or a model file) with `backend` and its options."""
    return session_class(backend)(path, **options)


__all__ = ["BACKENDS", "Session", "TensorInfo", "backend_name", "input_info", "load_session", "session_class"]
