"""Backends behind one Session protocol, chosen by name. Adding a backend touches no pipeline."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from diffship.errors import BackendError
from diffship.layout import GRAPH_FILES, ONNX_MODEL, OPENVINO_MODEL
from diffship.runtimes.base import Session, TensorInfo, input_info


@dataclass(frozen=True)
class Backend:
    """A runtime: where its Session class lives (imported on first use) and the graph file it reads."""

    module: str
    session_class: str
    model_file: str
    also_reads: tuple[str, ...] = ()  # other graph files its sessions run, where its own is absent

    @property
    def reads(self) -> tuple[str, ...]:
        return (self.model_file, *self.also_reads)


# The backend registry, in the order a directory that holds several formats picks from: adding a backend is a
# module in runtimes/ and a line here.
BACKENDS = {
    "onnxruntime": Backend("diffship.runtimes.onnxruntime", "OnnxRuntimeSession", ONNX_MODEL),
    "openvino": Backend("diffship.runtimes.openvino", "OpenVINOSession", OPENVINO_MODEL, also_reads=(ONNX_MODEL,)),
    # TensorRT runs engines built from model.onnx (runtimes/engines.py): the ONNX graph is what it reads, an engine
    # an export wrote beside it is used when it was built for this GPU and TensorRT.
    "tensorrt": Backend("diffship.runtimes.tensorrt", "TensorRTSession", ONNX_MODEL),
}
ALIASES = {"ort": "onnxruntime", "onnx": "onnxruntime", "ov": "openvino", "trt": "tensorrt"}


def backend_name(name: str) -> str:
    canonical = ALIASES.get(name.lower(), name.lower())
    if canonical not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return canonical


def holds_graph(folder) -> bool:
    """Whether a component folder holds a graph some backend runs."""
    return any((Path(folder) / g).is_file() for g in GRAPH_FILES)


def graph_folders(model_dir) -> list[Path]:
    """The component folders of an exported directory that hold a graph."""
    model_dir = Path(model_dir)
    return sorted(f for f in model_dir.iterdir() if f.is_dir() and holds_graph(f)) if model_dir.is_dir() else []


def graphs_held(folder) -> set[str]:
    """The graph files a component folder holds."""
    return {g for g in GRAPH_FILES if (Path(folder) / g).is_file()}


def backends_for(folders) -> list[str]:
    """The backends that can run the graph in every one of `folders`, in registry order."""
    return _backends_for({str(f): graphs_held(f) for f in folders})


def _backends_for(held: dict[str, set[str]]) -> list[str]:
    return [name for name, b in BACKENDS.items() if all(set(b.reads) & graphs for graphs in held.values())]


def choose_backend(folders, backend: str | None = None) -> str:
    """The backend to run the graphs in `folders` (component folders) with: `backend` when given and it can run
    them all; when None, the first in registry order whose own graph file every folder holds (what the export
    was made for), else the first that can run them all. Otherwise a BackendError naming the component, the graph
    files it holds and the backends that would run the directory."""
    return choose_backend_from({str(f): graphs_held(f) for f in folders}, backend)


def choose_backend_from(held: dict[str, set[str]], backend: str | None = None) -> str:
    """choose_backend on a listing: {component folder (as named in errors): the graph files it holds}. A hub repo's
    file listing chooses this way before anything is downloaded."""
    can = _backends_for(held)
    if backend is None:
        native = [n for n in can if all(BACKENDS[n].model_file in graphs for graphs in held.values())]
        if native or can:
            return (native or can)[0]
        reads = {g for b in BACKENDS.values() for g in b.reads}
    else:
        backend = backend_name(backend)
        if backend in can:
            return backend
        reads = set(BACKENDS[backend].reads)
    lacking = next(f for f, graphs in held.items() if not graphs & reads)
    held_there = [g for g in GRAPH_FILES if g in held[lacking]]
    what = f"holds {' and '.join(held_there)} only" if held_there else "holds no graph"
    advice = (f"load it with backend={' or '.join(repr(b) for b in can)}" if can
              else "re-export it with `diffship export`")
    needs = f"the {backend} backend runs {' or '.join(BACKENDS[backend].reads)}" if backend else "no backend runs it"
    raise BackendError(f"{lacking}: {needs}, and this component {what}; {advice}")


def session_class(backend: str):
    entry = BACKENDS[backend_name(backend)]
    return getattr(importlib.import_module(entry.module), entry.session_class)


def load_session(path, backend: str = "onnxruntime", **options) -> Session:
    """Open the graph in a component folder (or a model file) with `backend` and its options."""
    return session_class(backend)(path, **options)


__all__ = ["BACKENDS", "Backend", "Session", "TensorInfo", "backend_name", "backends_for", "choose_backend",
           "choose_backend_from", "graph_folders", "graphs_held", "holds_graph", "input_info", "load_session",
           "session_class"]
