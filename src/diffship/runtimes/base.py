"""The Session protocol: the only thing a pipeline knows of a backend."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from diffship.errors import BackendError


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output. Dynamic dimensions are strings (their symbolic name) or None."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)


@runtime_checkable
class Session(Protocol):
    """A compiled component graph. `run` takes and returns numpy arrays keyed by tensor name.

    Capabilities a backend may lack are part of the interface, so that no caller probes with hasattr or compares
    backend names: `can_reshape` says whether `reshape` fixes input shapes (OpenVINO compiles faster code for
    static shapes; ONNX Runtime takes any shape as it comes), `compile` does what a first run would do ahead of
    time (a no-op where loading compiled already), and `settings` reports what the runtime chose (precision,
    threads, providers), for benchmarks and the timing table. `swap_weights` runs the graph with some of its
    weights (by the graph's own names) replaced, `{}` with the file's own again: run-time LoRA
    (pipelines/lora.py); `can_swap_weights` says whether the backend can."""

    backend: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    path: str
    can_reshape: bool
    can_swap_weights: bool
    # The component's config.json (diffusers' `pipe.unet.config`), set by the pipeline that loads the session
    # from an export folder; {} for a session made alone.
    config: dict

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def reshape(self, shapes: dict[str, tuple[int, ...]]) -> None: ...

    def compile(self) -> None: ...

    def swap_weights(self, values: dict[str, np.ndarray]) -> None: ...

    def settings(self) -> dict: ...


def input_info(session: Session, name: str) -> TensorInfo | None:
    return next((i for i in session.inputs if i.name == name), None)


def check_feeds(session: Session, feeds: dict[str, np.ndarray]) -> None:
    """Fail with the graph's own input list when a feed is missing or unexpected: a clearer error than the
    backends' own."""
    expected = {i.name for i in session.inputs}
    missing, extra = expected - set(feeds), set(feeds) - expected
    if missing or extra:
        raise BackendError(
            f"{session.path}: the graph takes inputs {sorted(expected)}; "
            f"missing {sorted(missing)}, unexpected {sorted(extra)}"
        )


def run_error(session: Session, feeds: dict[str, np.ndarray], error: Exception) -> BackendError:
    """A backend's failure inside a run, as a BackendError naming the component and the shapes it was given (what
    a user can change), with the backend's own message."""
    component = Path(session.path).parent.name
    shapes = ", ".join(f"{name} {list(np.shape(value))} {np.asarray(value).dtype}" for name, value in feeds.items())
    message = " ".join(str(error).split())  # backends' messages span lines
    return BackendError(f"{session.backend} could not run the {component} graph ({session.path}) on {shapes}: "
                        f"{message}")
