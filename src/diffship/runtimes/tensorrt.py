"""TensorRT sessions: a component's engine (found or built from its model.onnx, runtimes/engines.py) run with
`execute_async_v3` on a CUDA stream, device memory managed with cuda-python (runtimes/cuda.py says why that
binding), no torch.

Per call: each input's shape is set on the execution context (set_input_shape) and checked against the engine's
profile first, so that a shape the engine was not built for is named before anything runs; the numpy inputs are
copied to device buffers that are kept between calls (grown when a larger shape comes), the engine runs, the
outputs are copied back into numpy arrays, and the stream is synchronized once. Those copies are the only
host<->device traffic: the numpy scheduler needs the UNet's output on the host at every step anyway. With
`cuda_graph=True` and an engine built for one shape (a static profile), the engine's launch is captured once into
a CUDA graph and replayed, one launch per call instead of one per kernel.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from diffship.errors import BackendError
from diffship.layout import ONNX_MODEL, TENSORRT_ENGINE
from diffship.runtimes.base import TensorInfo, check_feeds, run_error
from diffship.runtimes.engines import (
    BuildOptions,
    ComponentContext,
    ShapeRange,
    check_tensorrt,
    default_precision,
    engine_for,
    exported_engine,
    tensorrt,
)

logger = logging.getLogger(__name__)


class TensorRTSession:
    """A TensorRT engine behind the Session protocol.

    `path`: a component folder (or its model.onnx). `shapes`: the ShapeRange the engine must serve (or a dict of
    its fields); default: what the export built its engine for (model.plan.json), else a dynamic range around
    the model's native size. `precision`: BuildOptions' precision; default: the export's, else strongly typed
    for an fp16 graph and fp32 (TF32 off) otherwise. `optimization_level`: TensorRT's builder level (default: the
    export's, else 3). `cuda_graph`: replay static-shape runs as a CUDA graph.
    `cache_dir`: the engine cache (runtimes/cache.py; False: none). `device`: the CUDA device index."""

    backend = "tensorrt"
    can_reshape = False  # an engine runs what its profile covers; another range is another engine (shapes=)
    can_swap_weights = False  # refitting an engine's weights (run-time LoRA) is not built

    def __init__(self, path: str | os.PathLike, shapes: ShapeRange | dict | None = None,
                 precision: str | None = None, optimization_level: int | None = None, cuda_graph: bool = False,
                 cache_dir=None, device: int = 0, engine: str | os.PathLike | None = None):
        from diffship.runtimes import cuda

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        onnx_path = folder / ONNX_MODEL
        if engine is None and not onnx_path.is_file():
            raise BackendError(f"no ONNX model at {onnx_path}: the tensorrt backend builds its engines from the "
                               "exported model.onnx (diffship export --backend tensorrt)")
        self.device_info = check_tensorrt(device)  # TensorRT, CUDA's binding and a GPU: before any work
        trt = tensorrt()
        self.path = str(onnx_path)
        self.config: dict = {}  # the component's config.json, set by the pipeline that loads it
        self.context_info = ComponentContext.of_folder(folder)
        if engine is not None:  # an engine file given as it is: no key, no rebuild
            engine_path, self.source, self.build_options, self.shape_range = Path(engine), "given", None, None
        else:
            self.shape_range, self.build_options = self._request(folder, shapes, precision, optimization_level)
            found = engine_for(folder, onnx_path, self.device_info, self.context_info, self.shape_range,
                               self.build_options, cache_dir)
            engine_path, self.source = found.path, found.source
        self.engine_path = str(engine_path)
        # What the pipelines report (pipe.inference_precisions), in their words.
        precision = self.build_options.precision if self.build_options else "given engine"
        self.inference_precision = {"fp32": "f32", "fp16": "f16"}.get(precision, precision)
        check = cuda.check
        check(cuda.cudart().cudaSetDevice(device), "cudaSetDevice")
        self._log = trt.Logger(trt.Logger.ERROR)
        self._runtime = trt.Runtime(self._log)
        self._engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self._engine is None:
            raise BackendError(f"TensorRT could not load the engine {engine_path} (built for another TensorRT or GPU?"
                               "); delete it to rebuild")
        self._context = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self.inputs = [self._info(n) for n in names if is_input[n]]
        self.outputs = [self._info(n) for n in names if not is_input[n]]
        self.profile = {i.name: tuple(tuple(s) for s in self._engine.get_tensor_profile_shape(i.name, 0))
                        for i in self.inputs if i.rank}
        self.cuda_graph = bool(cuda_graph)
        self._static = all(low == high for low, _, high in self.profile.values())
        self._buffers: dict = {}
        self._shapes: dict | None = None  # the input shapes the context is set to
        self._graph = None

    @staticmethod
    def _request(folder: Path, shapes, precision, optimization_level) -> tuple[ShapeRange, BuildOptions]:
        """The ShapeRange and BuildOptions asked for, the export's where not given, else the defaults."""
        exported = exported_engine(folder)
        key = exported[1]["key"] if exported is not None else {}
        if isinstance(shapes, dict):
            shapes = ShapeRange.from_dict(shapes)
        if shapes is None and key.get("shapes"):
            shapes = ShapeRange.from_dict(key["shapes"])
        if shapes is None:
            config = ComponentContext.of_folder(folder)
            side = 64 * config.vae_scale_factor
            unet = folder.parent / "unet" / "config.json"
            if unet.is_file():
                import json

                side = int(json.loads(unet.read_text()).get("sample_size", 64)) * config.vae_scale_factor
            shapes = ShapeRange.dynamic(1, side, side)
        built = key.get("options") or {}
        if precision is None:
            precision = built.get("precision") or default_precision(_onnx_dtypes(folder))
        if optimization_level is None:
            optimization_level = built.get("optimization_level", 3)
        return shapes, BuildOptions(precision, optimization_level)

    def _info(self, name: str) -> TensorInfo:
        shape = tuple(None if d < 0 else int(d) for d in self._engine.get_tensor_shape(name))
        return TensorInfo(name, self._dtypes[name], shape)

    def covers(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Whether the engine's profile runs these input shapes."""
        return not self._outside(shapes)

    def _outside(self, shapes: dict) -> list[str]:
        bad = []
        for name, (low, _, high) in self.profile.items():
            shape = tuple(shapes.get(name, ()))
            if len(shape) != len(low) or any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
                bad.append(f"{name} {list(shape)} (engine: {list(low)} to {list(high)})")
        return bad

    def _fit(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Set the context to these input shapes and give every tensor a device buffer large enough."""
        from diffship.runtimes.cuda import DeviceBuffer

        if shapes == self._shapes:
            return
        bad = self._outside(shapes)
        if bad:
            raise BackendError(f"the {Path(self.path).parent.name} TensorRT engine ({self.engine_path}) was not built "
                               f"for {', '.join(bad)}: load with shapes=ShapeRange.dynamic(...) covering the request "
                               "(or export with the sizes you run), and a matching engine is built")
        for info in self.inputs:
            self._context.set_input_shape(info.name, tuple(shapes[info.name]))
        self._graph = None  # captured for other shapes or addresses
        for name in [i.name for i in self.inputs] + [o.name for o in self.outputs]:
            shape = tuple(self._context.get_tensor_shape(name))
            nbytes = int(np.prod(shape, dtype=np.int64)) * self._dtypes[name].itemsize
            buffer = self._buffers.get(name)
            if buffer is None or buffer.nbytes < nbytes:
                if buffer is not None:
                    buffer.free()
                buffer = self._buffers[name] = DeviceBuffer(nbytes)
            self._context.set_tensor_address(name, buffer.ptr)
        self._shapes = dict(shapes)

    def _launch(self) -> None:
        if not self._context.execute_async_v3(self._stream.ptr):
            raise RuntimeError("execute_async_v3 returned False (see the TensorRT log)")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from diffship.runtimes.cuda import CudaGraph

        check_feeds(self, feeds)
        arrays = {}
        for info in self.inputs:
            array = np.asarray(feeds[info.name], dtype=self._dtypes[info.name])
            arrays[info.name] = array if array.flags.c_contiguous else array.copy()
        self._fit({name: array.shape for name, array in arrays.items()})
        try:
            for name, array in arrays.items():
                self._stream.upload(self._buffers[name], array)
            if self.cuda_graph and self._static:
                if self._graph is None:
                    self._launch()  # TensorRT's first run does its lazy setup, which a capture must not hold
                    self._graph = CudaGraph(self._stream, self._launch)
                self._graph.launch(self._stream)
            else:
                self._launch()
            outputs = {o.name: np.empty(tuple(self._context.get_tensor_shape(o.name)), self._dtypes[o.name])
                       for o in self.outputs}
            for name, array in outputs.items():
                self._stream.download(array, self._buffers[name])
            self._stream.synchronize()
        except Exception as e:  # CUDA and TensorRT errors, named with the component and shapes
            raise run_error(self, feeds, e) from e
        return outputs

    def reshape(self, shapes: dict[str, tuple[int, ...]]) -> None:
        raise BackendError(f"{self.path}: a TensorRT engine runs the shapes its profile covers; load with "
                           "shapes=ShapeRange.static(...) for fixed shapes")

    def compile(self) -> None:
        """Nothing to do: the engine was built or loaded when the session was created."""

    def swap_weights(self, values: dict[str, np.ndarray]) -> None:
        if values:
            raise BackendError(f"{self.path}: TensorRT engines cannot swap weights here (refit is not built); run "
                               "run-time LoRA on the onnxruntime or openvino backend")

    def settings(self) -> dict:
        return {"engine": self.engine_path, "source": self.source, "device": self.device_info.describe(),
                "precision": self.build_options.precision if self.build_options else None,
                "shapes": self.shape_range.to_dict() if self.shape_range else None, "cuda_graph": self.cuda_graph,
                "profile": {n: [list(s) for s in v] for n, v in self.profile.items()}}

    def __repr__(self) -> str:
        return f"TensorRTSession({self.path!r}, engine={self.engine_path!r})"


def _onnx_dtypes(folder: Path) -> set[str]:
    """The float types the component's graph computes in, as its export recorded them (export_report.json: the
    ONNX graph's precision), read without loading the graph; empty where the report does not say (Optimum's
    exports), and the engine is then built fp32."""
    import json

    from diffship.layout import REPORT_FILE

    try:
        report = json.loads((folder.parent / REPORT_FILE).read_text())
        precision = report["components"][folder.name]["precision"]["onnxruntime"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {"float16"} if precision == "fp16" else {"float32"}


__all__ = ["TENSORRT_ENGINE", "TensorRTSession"]
