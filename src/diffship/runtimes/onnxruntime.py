"""ONNX Runtime sessions. Providers are selectable; the CPU provider is the default.

`provider="cuda"` or `"tensorrt"` runs the graph on an NVIDIA GPU with onnxruntime-gpu's CUDA or TensorRT execution
provider (`pip install 'diffship[gpu]'`, which replaces the CPU package: the two cannot be installed together).
A GPU provider that this onnxruntime lacks is refused before the graph is read, naming the pip command; one that
onnxruntime lists but cannot start (no GPU, no CUDA libraries: onnxruntime then falls back to the CPU quietly) is
refused once the session is made. `cuda_graph=True` (CUDA provider) replays the graph as a CUDA graph: the inputs
and outputs then live in device buffers bound once (IO binding) and updated in place, as CUDA graphs need fixed
addresses; onnxruntime captures at the second run, and needs every node on the CUDA provider (a static export:
a dynamic graph's shape arithmetic runs on the CPU). A plain GPU run copies the numpy inputs in and the outputs out,
which is what IO binding would do too for inputs that come from numpy each call.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffship.errors import BackendError, GPUUnavailableError
from diffship.layout import ONNX_DATA, ONNX_MODEL, ORT_CPU_MODEL
from diffship.runtimes.cache import cache_root, graph_key, remove_entry
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


# provider= names -> the execution providers, in onnxruntime's order of preference (the CPU last, for the few
# ops a GPU provider leaves to it).
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
INSTALL_GPU = "pip uninstall -y onnxruntime && pip install 'diffship[gpu]'"


def providers_for(provider: str | None, providers: list | None) -> list:
    """The execution providers from `provider` ("cpu", "cuda", "tensorrt") or an explicit `providers` list."""
    if provider is not None and providers is not None:
        raise BackendError("give provider= (cpu, cuda, tensorrt) or providers=[...], not both")
    if provider is not None:
        if not isinstance(provider, str) or provider.lower() not in PROVIDERS:
            raise BackendError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
        return list(PROVIDERS[provider.lower()])
    return list(providers or PROVIDERS["cpu"])


def _name(provider) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def check_providers(providers: list, available: list[str] | None = None) -> None:
    """Refuse providers this onnxruntime does not have, before any graph is read: a GPU one with the pip command
    that installs onnxruntime-gpu."""
    if available is None:
        available = _ort().get_available_providers()
    missing = [_name(p) for p in providers if _name(p) not in available]
    if not missing:
        return
    gpu = [p for p in missing if p in GPU_PROVIDERS]
    if gpu:
        raise GPUUnavailableError(
            f"onnxruntime's {' and '.join(gpu)} {'is' if len(gpu) == 1 else 'are'} not available here (this "
            f"onnxruntime has {', '.join(available)}): the GPU providers come with onnxruntime-gpu, which replaces "
            f"the CPU package: {INSTALL_GPU}")
    raise BackendError(f"onnxruntime providers {missing} are not available here; available: {available}")


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
    can_swap_weights = True

    def __init__(
        self,
        path: str | os.PathLike,
        providers: list | None = None,
        provider_options: list[dict] | None = None,
        session_options=None,
        intra_op_num_threads: int | None = None,
        cache_dir=None,
        provider: str | None = None,
        cuda_graph: bool = False,
    ):
        ort = _ort()
        providers = providers_for(provider, providers)
        check_providers(providers, ort.get_available_providers())
        if cuda_graph and _name(providers[0]) != "CUDAExecutionProvider":
            raise BackendError("cuda_graph=True is a CUDA provider setting: give provider='cuda'")
        path = Path(path)
        if path.is_dir():
            path = graph_in(path, providers)
        if not path.is_file():
            raise BackendError(f"no ONNX model at {path}: export the component first (diffship export)")
        self.path = str(path)
        self.config: dict = {}  # the component's config.json, set by the pipeline that loads it
        self._load_arguments = {"providers": providers, "provider_options": provider_options,
                                "session_options": session_options, "intra_op_num_threads": intra_op_num_threads,
                                "cache_dir": cache_dir}
        self._swapped = None  # (names, OrtValues) of the weights swap_weights replaced; None: the file's
        options = session_options or ort.SessionOptions()
        # ONNX Runtime's optimized graph is cached for CPU sessions with diffship's own options (a user's
        # session_options may ask for anything; the cached graph would not honour it).
        cached = None
        if session_options is None and providers == ["CPUExecutionProvider"]:
            cached = _optimized_graph(ort, path, cache_dir, options)
        if intra_op_num_threads:
            options.intra_op_num_threads = intra_op_num_threads
        # Warnings about unused initializers and the like are noise for users; errors surface as exceptions, which
        # diffship reports naming the component (ORT's own error log would say it twice, over several lines).
        options.log_severity_level = 4
        if provider_options is None:
            provider_options = _gpu_provider_options(providers, cache_dir, cuda_graph)
        self._session = None
        if cached is not None and cached.is_file():
            self._session = _load_cached(ort, cached, options, providers, provider_options)
            if self._session is None:  # the damaged entry is gone: this load writes it again
                cached = _optimized_graph(ort, path, cache_dir, options)
        if self._session is None:
            try:
                self._session = ort.InferenceSession(
                    self.path, sess_options=options, providers=providers, provider_options=provider_options
                )
            except Exception as e:  # onnxruntime raises its own exception types for corrupt or unsupported graphs
                if cached is None:
                    raise BackendError(f"onnxruntime could not load {self.path}: {e}") from e
                # Writing the optimized graph may be what failed (a full disk): the cache is an optimization,
                # so the session loads without it, and only a graph that cannot load at all is an error.
                remove_entry(_staging(cached))
                cached, options.optimized_model_filepath = None, ""
                try:
                    self._session = ort.InferenceSession(
                        self.path, sess_options=options, providers=providers, provider_options=provider_options
                    )
                except Exception as e:  # noqa: BLE001 - as above
                    raise BackendError(f"onnxruntime could not load {self.path}: {e}") from e
            if cached is not None:
                _publish(cached, path)
        self.inputs = [_info(i) for i in self._session.get_inputs()]
        self.outputs = [_info(o) for o in self._session.get_outputs()]
        self.providers = self._session.get_providers()
        if _name(providers[0]) in GPU_PROVIDERS and not set(self.providers) & set(GPU_PROVIDERS):
            # onnxruntime-gpu falls back to the CPU, with a log line only, when CUDA cannot start.
            raise GPUUnavailableError(
                f"onnxruntime could not start {_name(providers[0])} for {self.path} (it ran on {self.providers}): "
                "a CUDA GPU, its driver and the CUDA 12 / cuDNN 9 libraries onnxruntime-gpu needs must be present "
                "(pip install 'onnxruntime-gpu[cuda,cudnn]' brings the libraries)")
        self.cuda_graph = bool(cuda_graph)
        self._binding = None  # the CUDA graph's IO binding: (input shapes, binding, device inputs)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self, feeds)
        names = [o.name for o in self.outputs]
        try:
            if self.cuda_graph:
                return self._run_bound(feeds)
            return dict(zip(names, self._session.run(names, feeds)))
        except BackendError:
            raise
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidArgument, ...)
            raise run_error(self, feeds, e) from e

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A run through IO binding with the device buffers fixed, as CUDA graphs replay them: the inputs are
        copied into device buffers allocated at the first call, the outputs land in the buffers onnxruntime
        allocated at the first call (bound again by value, so that every later run writes there)."""
        ort = _ort()
        dtypes = {i.name: i.dtype for i in self.inputs}
        arrays = {name: np.ascontiguousarray(np.asarray(value, dtype=dtypes[name])) if np.ndim(value)
                  else np.asarray(value, dtype=dtypes[name]) for name, value in feeds.items()}
        shapes = {name: a.shape for name, a in arrays.items()}
        if self._binding is None:
            binding = self._session.io_binding()
            values = {name: ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for name, a in arrays.items()}
            for name, value in values.items():
                binding.bind_ortvalue_input(name, value)
            for output in self.outputs:
                binding.bind_output(output.name, "cuda")
            self._session.run_with_iobinding(binding)
            for output, value in zip(self.outputs, binding.get_outputs()):
                binding.bind_ortvalue_output(output.name, value)
            self._binding = (shapes, binding, values)
        else:
            bound_shapes, binding, values = self._binding
            if shapes != bound_shapes:
                raise BackendError(f"{self.path}: a CUDA graph replays the shapes it was captured at "
                                   f"({bound_shapes}); this call gives {shapes}: load another session for them, or "
                                   "load without cuda_graph")
            for name, a in arrays.items():
                values[name].update_inplace(a)
            self._session.run_with_iobinding(binding)
        return {o.name: v.numpy() for o, v in zip(self.outputs, binding.get_outputs())}

    def reshape(self, shapes: dict[str, tuple[int, ...]]) -> None:
        raise BackendError(f"{self.path}: onnxruntime sessions take any input shape the graph allows; reshape is "
                           "for the openvino backend")

    def compile(self) -> None:
        """Nothing to do: the session was compiled when it was created."""

    def swap_weights(self, values: dict[str, np.ndarray]) -> None:
        """A new session on the same graph with these initializers (by name) in place of the file's, given to ONNX
        Runtime as external initializers before it optimizes the graph; `{}`: the file's own weights again, as
        loaded first (the optimized-graph cache is for the file's weights only)."""
        if not values:
            if self._swapped is not None:
                self._session = OnnxRuntimeSession(self.path, **self._load_arguments)._session
                self._swapped = None
            return
        ort = _ort()
        current = self._session.get_session_options()
        options = ort.SessionOptions()
        options.log_severity_level = 4
        options.intra_op_num_threads = current.intra_op_num_threads
        options.graph_optimization_level = current.graph_optimization_level
        names = list(values)
        # ONNX Runtime reads these buffers for the session's life without copying them: kept with it.
        arrays = [np.ascontiguousarray(values[name]) for name in names]
        ort_values = [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays]
        options.add_external_initializers(names, ort_values)
        providers = self._session.get_providers()
        # The old session goes first: a full-size UNet's weights are not held twice while the new one builds.
        self._session = None
        try:
            session = ort.InferenceSession(self.path, sess_options=options, providers=providers)
        except Exception as e:  # onnxruntime's own exception types: an unknown name, a wrong shape or dtype
            self._session, self._swapped = OnnxRuntimeSession(self.path, **self._load_arguments)._session, None
            raise BackendError(f"onnxruntime could not load {self.path} with replaced weights (it runs the file's "
                               f"own weights again): {' '.join(str(e).split())}") from e
        self._session, self._swapped = session, (names, arrays, ort_values)

    def settings(self) -> dict:
        options = self._session.get_session_options()
        return {"providers": self._session.get_providers(), "intra_op_num_threads": options.intra_op_num_threads,
                "graph_optimization_level": str(options.graph_optimization_level), "graph": Path(self.path).name}

    def __repr__(self) -> str:
        return f"OnnxRuntimeSession({self.path!r}, providers={self.providers})"


def graph_in(folder: Path, providers: list) -> Path:
    """The graph a session on a component folder loads: on the CPU alone, the export's CPU graph where it wrote
    one (ORT_CPU_MODEL: attention on onnxruntime's tiled CPU kernel, validated against PyTorch like model.onnx),
    else model.onnx. A session given a file loads that file."""
    cpu = folder / ORT_CPU_MODEL
    if [_name(p) for p in providers] == ["CPUExecutionProvider"] and cpu.is_file():
        return cpu
    return folder / ONNX_MODEL


def _gpu_provider_options(providers: list, cache_dir, cuda_graph: bool) -> list[dict] | None:
    """Options for the GPU providers: the CUDA graph for the CUDA provider; for TensorRT's, its engine and timing
    caches in diffship's cache (a second load builds nothing). None for the CPU alone (onnxruntime's defaults)."""
    names = [_name(p) for p in providers]
    if not set(names) & set(GPU_PROVIDERS) or any(isinstance(p, tuple) for p in providers):
        return None
    root = cache_root(cache_dir)
    options = []
    for name in names:
        if name == "CUDAExecutionProvider":
            options.append({"enable_cuda_graph": "1"} if cuda_graph else {})
        elif name == "TensorrtExecutionProvider" and root is not None:
            folder = root / "onnxruntime-tensorrt"
            options.append({"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(folder),
                            "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(folder)})
        else:
            options.append({})
    return options


# In each cache entry: the path of the graph it was optimized from.
SOURCE_NOTE = "source.txt"


def _optimized_graph(ort, path: Path, cache_dir, options) -> Path | None:
    """Where the optimized graph of `path` is cached (None: caching off). When it is not there yet, `options` are
    set to write it into a staging folder beside it, which _publish renames once the session loaded, so that an
    interrupted load leaves no half-written graph to be read next time."""
    root = cache_root(cache_dir)
    if root is None:
        return None
    entry = root / "onnxruntime" / graph_key(path, ort.__version__, str(options.graph_optimization_level))
    cached = entry / ONNX_MODEL
    if not cached.is_file():
        staging = _staging(cached)
        try:
            staging.mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only cache location: load without caching
            return None
        options.optimized_model_filepath = str(staging / ONNX_MODEL)
        # Weights go to one external file: a full-size UNet's 3.4 GB do not fit a 2 GB protobuf.
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", ONNX_DATA)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return cached


def _load_cached(ort, cached: Path, options, providers, provider_options):
    """A session on the cached optimized graph, its optimizations already applied; None (and the entry removed)
    if the runtime cannot load it, so that the caller loads the export's graph instead."""
    cached_options = ort.SessionOptions()
    cached_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    cached_options.log_severity_level = options.log_severity_level
    cached_options.intra_op_num_threads = options.intra_op_num_threads
    try:
        return ort.InferenceSession(str(cached), sess_options=cached_options, providers=providers,
                                    provider_options=provider_options)
    except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt, whatever the runtime says about it
        remove_entry(cached.parent)
        return None


def _staging(cached: Path) -> Path:
    return cached.parent.with_name(f"{cached.parent.name}.tmp-{os.getpid()}")


def _publish(cached: Path, source: Path) -> None:
    """Rename the staging folder into place, with a note of the graph it was made from; entries made from an
    earlier version of that graph (re-exported since) are removed, so the cache does not grow by a model's weights
    at each re-export."""
    staging = _staging(cached)
    if not (staging / ONNX_MODEL).is_file():
        return
    (staging / SOURCE_NOTE).write_text(str(Path(source).resolve()))
    try:
        staging.rename(cached.parent)
    except OSError:  # another process published it first
        remove_entry(staging)
        return
    for entry in cached.parent.parent.iterdir():
        note = entry / SOURCE_NOTE
        if entry != cached.parent and note.is_file() and note.read_text() == str(Path(source).resolve()):
            remove_entry(entry)
