"""ONNX Runtime sessions. Providers are selectable; the CPU provider is the default."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffship.errors import BackendError
from diffship.layout import ONNX_MODEL
from diffship.runtimes.base import TensorInfo, check_feeds, run_error

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError("the onnxruntime backend needs `pip install diffship[onnxruntime]`") from e
    return onnxruntime


def _info(arg) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) else (d or None) for d in arg.shape)
    return TensorInfo(arg.name, np.dtype(_ORT_TYPES.get(arg.type, np.float32)), shape)


class OnnxRuntimeSession:
    """An onnxruntime.InferenceSession behind the Session protocol."""

    backend = "onnxruntime"
    can_reshape = False  # every dynamic dimension is taken as it comes

    def __init__(
        self,
        path: str | os.PathLike,
        providers: list | None = None,
        provider_options: list[dict] | None = None,
        session_options=None,
        intra_op_num_threads: int | None = None,
    ):
        ort = _ort()
        path = Path(path)
        if path.is_dir():
            path = path / ONNX_MODEL
        if not path.is_file():
            raise BackendError(f"no ONNX model at {path}: export the component first (diffship export)")
        self.path = str(path)
        options = session_options or ort.SessionOptions()
        if intra_op_num_threads:
            options.intra_op_num_threads = intra_op_num_threads
        # Warnings about unused initializers and the like are noise for users; errors surface as exceptions, which
        # diffship reports naming the component (ORT's own error log would say it twice, over several lines).
        options.log_severity_level = 4
        providers = providers or ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        unknown = [p for p in providers if (p[0] if isinstance(p, tuple) else p) not in available]
        if unknown:
            raise BackendError(f"onnxruntime providers {unknown} are not available here; available: {available}")
        try:
            self._session = ort.InferenceSession(
                self.path, sess_options=options, providers=providers, provider_options=provider_options
            )
        except Exception as e:  # onnxruntime raises its own exception types for corrupt or unsupported graphs
            raise BackendError(f"onnxruntime could not load {self.path}: {e}") from e
        self.inputs = [_info(i) for i in self._session.get_inputs()]
        self.outputs = [_info(o) for o in self._session.get_outputs()]
        self.providers = self._session.get_providers()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self, feeds)
        names = [o.name for o in self.outputs]
        try:
            return dict(zip(names, self._session.run(names, feeds)))
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidArgument, ...)
            raise run_error(self, feeds, e) from e

    def reshape(self, shapes: dict[str, tuple[int, ...]]) -> None:
        raise BackendError(f"{self.path}: onnxruntime sessions take any input shape the graph allows; reshape is "
                           "for the openvino backend")

    def compile(self) -> None:
        """Nothing to do: the session was compiled when it was created."""

    def settings(self) -> dict:
        options = self._session.get_session_options()
        return {"providers": self._session.get_providers(), "intra_op_num_threads": options.intra_op_num_threads,
                "graph_optimization_level": str(options.graph_optimization_level)}

    def __repr__(self) -> str:
        return f"OnnxRuntimeSession({self.path!r}, providers={self.providers})"
