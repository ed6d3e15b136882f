"""ONNX Runtime's GPU providers: `provider="cuda" | "tensorrt"`, the errors where onnxruntime-gpu is missing or
cannot start CUDA, and (marked `gpu`) the TensorRT execution provider against diffusers.

Absence is simulated by replacing `onnxruntime.get_available_providers` (what onnxruntime-gpu lists that the CPU
package does not); onnxruntime-gpu's quiet fall back to the CPU when CUDA cannot start is what the CPU package
does with a provider it lists but cannot create: it warns and runs on the CPU.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime
import pytest

from diffship.errors import BackendError, GPUUnavailableError
from diffship.runtimes.onnxruntime import (
    INSTALL_GPU,
    PROVIDERS,
    OnnxRuntimeSession,
    _gpu_provider_options,
    check_providers,
    providers_for,
)
from test_tensorrt import NO_CUDA, _diffusers_and_diffship


@pytest.fixture
def relu_graph(tmp_path):
    """A one-node graph: enough for a session."""
    import onnx
    import onnx.helper as h

    graph = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "relu",
                         [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "model.onnx")
    return tmp_path / "model.onnx"


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])


def test_provider_names():
    assert providers_for("cuda", None) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers_for("TensorRT", None) == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                               "CPUExecutionProvider"]
    assert providers_for(None, None) == ["CPUExecutionProvider"]
    assert providers_for(None, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(BackendError, match="provider must be one of cpu, cuda, tensorrt"):
        providers_for("rocm", None)
    with pytest.raises(BackendError, match="not both"):
        providers_for("cuda", ["CPUExecutionProvider"])


def test_missing_gpu_providers_are_named_with_the_pip_command():
    with pytest.raises(GPUUnavailableError) as raised:
        check_providers(PROVIDERS["cuda"], ["CPUExecutionProvider"])
    message = str(raised.value)
    assert "onnxruntime's CUDAExecutionProvider is not available here (this onnxruntime has CPUExecutionProvider)" in message
    assert "onnxruntime-gpu, which replaces the CPU package" in message and INSTALL_GPU in message
    with pytest.raises(BackendError, match=r"providers \['ROCMExecutionProvider'\] are not available"):
        check_providers(["ROCMExecutionProvider"], ["CPUExecutionProvider"])


def test_session_refuses_a_missing_provider_before_reading_the_graph(cpu_only, tmp_path):
    # No graph at that path: the provider is what is refused, first.
    with pytest.raises(GPUUnavailableError, match="CUDAExecutionProvider is not available"):
        OnnxRuntimeSession(tmp_path / "nothing-here", provider="cuda")


def test_a_gpu_provider_that_falls_back_to_the_cpu_is_refused(monkeypatch, relu_graph):
    listed = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: listed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnxruntime's own warning about the provider
        with pytest.raises(GPUUnavailableError, match="onnxruntime could not start CUDAExecutionProvider"):
            OnnxRuntimeSession(relu_graph, provider="cuda", cache_dir=False)


def test_cpu_provider_and_options(relu_graph, tmp_path):
    session = OnnxRuntimeSession(relu_graph, provider="cpu", cache_dir=False)
    out = session.run({"x": np.array([[-1.0, 0.5, 2.0]], dtype=np.float32)})["y"]
    assert out.tolist() == [[0.0, 0.5, 2.0]]
    with pytest.raises(BackendError, match="cuda_graph=True is a CUDA provider setting"):
        OnnxRuntimeSession(relu_graph, cuda_graph=True, cache_dir=False)
    trt = _gpu_provider_options(PROVIDERS["tensorrt"], tmp_path, cuda_graph=False)
    assert trt[0]["trt_engine_cache_path"] == str(tmp_path / "onnxruntime-tensorrt")
    assert trt[0]["trt_engine_cache_enable"] == "True" and trt[1:] == [{}, {}]
    assert _gpu_provider_options(PROVIDERS["cuda"], tmp_path, cuda_graph=True)[0] == {"enable_cuda_graph": "1"}
    assert _gpu_provider_options(PROVIDERS["cpu"], tmp_path, cuda_graph=False) is None


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA is not None, reason=NO_CUDA or "")
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_gpu_onnxruntime_tensorrt_provider_matches_diffusers(kind, tiny_model_dirs, tmp_path_factory):
    # fp32 graph on TensorRT's execution provider (its default keeps fp32: TF32 aside, which it enables on Ampere and
    # later; hence the fp16-level bound of test_tensorrt for this path).
    from test_tensorrt import FP16_ATOL

    expected, got, _ = _diffusers_and_diffship(kind, tiny_model_dirs, tmp_path_factory, "fp32", "onnxruntime",
                                               provider="tensorrt")
    assert np.abs(expected - got).max() < FP16_ATOL
