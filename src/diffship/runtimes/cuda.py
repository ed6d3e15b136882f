"""CUDA device memory, streams and graphs for the TensorRT backend, without torch.

**Why cuda-python (`cuda-bindings`)**, not polygraphy's CUDA wrapper or cupy: it is NVIDIA's own binding of the
CUDA runtime API, the one TensorRT's Python samples use, a small wheel with no dependency beyond the driver, and it
has everything this backend needs in one place: device properties (the engine cache keys on the GPU's name and
compute capability), device buffers, streams, async copies and CUDA graph capture. Polygraphy's wrapper (ctypes
over libcudart) has buffers and streams but no graph capture, and would make a debugging tool a runtime
dependency; cupy is a large array library (one wheel per CUDA version) of which this needs only raw allocations.

Everything here imports the binding lazily: `import diffship.runtimes.cuda` works without CUDA, and the first
use raises GPUUnavailableError naming what is missing (the binding, a driver, a GPU) and how to install it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffship.errors import GPUUnavailableError

INSTALL_TENSORRT = "pip install 'diffship[tensorrt]'"


def cudart():
    """The CUDA runtime binding: `cuda.bindings.runtime` (cuda-bindings 12.6 and later), or `cuda.cudart` (the
    cuda-python releases before the split)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as e:
            raise GPUUnavailableError("the tensorrt backend needs CUDA's Python binding (cuda-bindings), which is "
                                      f"not installed: {INSTALL_TENSORRT}") from e
    return runtime


def check(result, what: str = "CUDA call"):
    """A cuda-bindings call's result (error, *values) -> the values, or GPUUnavailableError naming the error."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        rt = cudart()
        name = getattr(error, "name", str(error))
        try:
            text = rt.cudaGetErrorString(error)[1].decode()
        except Exception:  # noqa: BLE001 - the description is a courtesy
            text = ""
        raise GPUUnavailableError(f"{what} failed: {name}" + (f" ({text})" if text else ""))
    return values[0] if len(values) == 1 else tuple(values) if values else None


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU an engine is built for: what the engine cache keys on, with the TensorRT version."""

    name: str
    compute_capability: tuple[int, int]
    tensorrt_version: str

    def describe(self) -> str:
        major, minor = self.compute_capability
        return f"{self.name} (compute capability {major}.{minor}), TensorRT {self.tensorrt_version}"


def has_driver() -> bool:
    """Whether the NVIDIA driver's CUDA library can be loaded."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def device_count() -> int:
    """How many CUDA GPUs this process sees; GPUUnavailableError when there is no driver or no GPU."""
    rt = cudart()
    error, count = rt.cudaGetDeviceCount()
    if int(error) != 0 and getattr(error, "name", "") == "cudaErrorInsufficientDriver":
        # CUDA says this both where the driver is too old and where there is none at all.
        if not has_driver():
            raise GPUUnavailableError("no NVIDIA driver here (libcuda.so.1 is not found): the tensorrt backend and "
                                      "onnxruntime's CUDA providers need a CUDA GPU and its driver")
        raise GPUUnavailableError("the NVIDIA driver is older than the CUDA that cuda-bindings was built for: update "
                                  "the driver, or install the binding of its CUDA, e.g. pip install 'cuda-bindings==12.*'")
    if int(error) != 0 or count == 0:
        reason = getattr(error, "name", str(error)) if int(error) != 0 else "no device"
        raise GPUUnavailableError(f"no NVIDIA GPU is usable here ({reason}): the tensorrt backend and onnxruntime's "
                                  "CUDA providers need a CUDA GPU and its driver (nvidia-smi should list it)")
    return count


def device_properties(device: int = 0) -> tuple[str, tuple[int, int]]:
    """(name, (major, minor)) of CUDA device `device`."""
    rt = cudart()
    device_count()
    props = check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\0").strip(), (int(props.major), int(props.minor))


class DeviceBuffer:
    """`nbytes` of device memory, freed with the object (or `free()`)."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes), f"cudaMalloc of {self.nbytes} bytes"))

    def free(self) -> None:
        if getattr(self, "ptr", 0):
            cudart().cudaFree(self.ptr)
            self.ptr = 0

    def __del__(self):
        try:
            self.free()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the driver frees it with the context
            pass


class Stream:
    """A CUDA stream, with the copies a Session makes on it: numpy in, numpy out."""

    def __init__(self):
        rt = cudart()
        # Non-blocking: no implicit synchronization with the legacy default stream, which CUDA graph capture needs.
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate")

    @property
    def ptr(self) -> int:
        """The stream's handle as an integer, as TensorRT's execute_async_v3 takes it."""
        return int(self.handle)

    def upload(self, buffer: DeviceBuffer, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if array.nbytes > buffer.nbytes:
            raise ValueError(f"{array.nbytes} bytes do not fit a device buffer of {buffer.nbytes}")
        rt = cudart()
        check(rt.cudaMemcpyAsync(buffer.ptr, array.ctypes.data, array.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.handle), "host to device copy")

    def download(self, array: np.ndarray, buffer: DeviceBuffer) -> None:
        rt = cudart()
        check(rt.cudaMemcpyAsync(array.ctypes.data, buffer.ptr, array.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.handle), "device to host copy")

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def __del__(self):
        try:
            if getattr(self, "handle", None) is not None:
                cudart().cudaStreamDestroy(self.handle)
                self.handle = None
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class CudaGraph:
    """The work `launch` enqueues on a stream captured once and replayed: for a static-shape engine, one launch
    instead of a kernel launch per layer (ONNX Runtime's CUDA-graph figure for SD 1.5 comes from the same idea).
    Valid while the buffers it was captured on stay where they are."""

    def __init__(self, stream: Stream, launch):
        rt = cudart()
        check(rt.cudaStreamBeginCapture(stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
              "cudaStreamBeginCapture")
        try:
            launch()
        finally:
            graph = check(rt.cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")
        self._graph = graph
        self._exec = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")

    def launch(self, stream: Stream) -> None:
        check(cudart().cudaGraphLaunch(self._exec, stream.handle), "cudaGraphLaunch")

    def __del__(self):
        try:
            rt = cudart()
            rt.cudaGraphExecDestroy(self._exec)
            rt.cudaGraphDestroy(self._graph)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
