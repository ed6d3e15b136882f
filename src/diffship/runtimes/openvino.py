"""OpenVINO sessions: read IR (or ONNX), optionally reshape to static shapes, compile once."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffship.errors import BackendError
from diffship.layout import ONNX_MODEL, OPENVINO_MODEL
from diffship.runtimes.base import TensorInfo, check_feeds, run_error


def _ov():
    try:
        import openvino
    except ImportError as e:
        raise BackendError("the openvino backend needs `pip install diffship[openvino]`") from e
    return openvino


def read_model(core, path: Path):
    """core.read_model(path), failing with a BackendError that names the file. A file that is not XML is refused
    before OpenVINO sees it: OpenVINO would offer it to each of its frontends in turn, and TensorFlow's prints
    its parse errors to stderr."""
    if path.suffix == ".xml":
        with open(path, "rb") as f:
            head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
        if not head.startswith(b"<"):
            raise BackendError(f"OpenVINO could not read {path}: it is not XML, as an OpenVINO IR is; export it again")
    try:
        return core.read_model(str(path))
    except Exception as e:  # OpenVINO raises RuntimeError with its own (multi-line) message for corrupt files
        raise BackendError(f"OpenVINO could not read {path}: {' '.join(str(e).split())}") from e


def _info(port, name: str) -> TensorInfo:
    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    return TensorInfo(name, np.dtype(port.get_element_type().to_dtype()), shape)


def _port_name(port, index: int) -> str:
    names = port.get_names()
    # A port can carry several names; the graph's original name is the one the pipelines use.
    return port.get_any_name() if names else f"output_{index}"


class OpenVINOSession:
    """An OpenVINO model behind the Session protocol. Compiled on first run, after any `reshape`."""

    backend = "openvino"
    can_reshape = True

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "CPU",
        cache_dir: str | os.PathLike | None = None,
        config: dict | None = None,
        inference_precision: str | None = "f32",
        core=None,
    ):
        ov = _ov()
        path = Path(path)
        if path.is_dir():
            candidates = [path / OPENVINO_MODEL, path / ONNX_MODEL]
            path = next((c for c in candidates if c.is_file()), candidates[0])
        if not path.is_file():
            raise BackendError(f"no OpenVINO model at {path}: export with --backend openvino (or give model.onnx)")
        if path.suffix == ".xml" and not path.with_suffix(".bin").is_file():
            raise BackendError(f"{path} has no weights file {path.with_suffix('.bin').name} beside it")
        self.path = str(path)
        self.device = device
        self._core = core or ov.Core()
        self._config = dict(config or {})
        # OpenVINO's CPU plugin runs fp32 graphs in bf16 on CPUs that have it; images then drift from PyTorch.
        # fp32 is the default for parity; pass inference_precision="bf16" (or None: the plugin's choice) for speed.
        if inference_precision is not None:
            self._config.setdefault("INFERENCE_PRECISION_HINT", inference_precision)
        if cache_dir is not None:
            self._config["CACHE_DIR"] = str(cache_dir)
        self._model = read_model(self._core, path)
        self._compiled = None
        self._describe()

    def _describe(self) -> None:
        self.inputs = [_info(p, p.get_any_name()) for p in self._model.inputs]
        self.outputs = [_info(p, _port_name(p, i)) for i, p in enumerate(self._model.outputs)]

    def reshape(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Fix input shapes (static shapes compile to faster code on CPU). Triggers a recompile."""
        known = {i.name for i in self.inputs}
        unknown = set(shapes) - known
        if unknown:
            raise BackendError(f"{self.path}: cannot reshape unknown inputs {sorted(unknown)}; inputs are {sorted(known)}")
        self._model.reshape({name: list(shape) for name, shape in shapes.items()})
        self._compiled = None
        self._describe()

    def compile(self) -> None:
        if self._compiled is None:
            try:
                self._compiled = self._core.compile_model(self._model, self.device, self._config)
            except Exception as e:
                raise BackendError(f"OpenVINO could not compile {self.path} for {self.device}: {e}") from e
            self._request = self._compiled.create_infer_request()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self, feeds)
        self.compile()
        try:
            results = self._request.infer(feeds, share_inputs=False, share_outputs=False)
        except Exception as e:  # OpenVINO raises RuntimeError (or its own types) with the plugin's message
            raise run_error(self, feeds, e) from e
        return {info.name: np.asarray(results[port]) for info, port in zip(self.outputs, self._compiled.outputs)}

    def settings(self) -> dict:
        """The compiled model's precision, performance hint, streams and threads (compiles it if need be)."""
        self.compile()
        out = {}
        for key in ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS"):
            try:
                out[key] = str(self._compiled.get_property(key))
            except Exception:  # a property this device does not report
                pass
        return out

    def __repr__(self) -> str:
        return f"OpenVINOSession({self.path!r}, device={self.device!r})"
