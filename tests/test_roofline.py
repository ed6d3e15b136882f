"""The roofline's peaks per precision (fp32, bf16, int8) with the instruction sets behind them, and the choice of the
peak a UNet is held against (the precision it ran in). Tiny matmuls, a fraction of a second each: these check what
is reported and how it is labelled, never how fast anything is."""

from __future__ import annotations

import importlib.util

import pytest

from diffship.benchmarking.roofline import (
    isa_support,
    precision_peaks,
    unet_precision,
    unet_quantizes_activations,
)
from diffship.benchmarking.summary import attach_roofline

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None


def test_isa_support_labels_native_and_fallback():
    sapphire_rapids = isa_support(["avx512f", "avx2", "fma", "amx_bf16", "avx512_bf16", "amx_int8", "avx512_vnni"])
    assert sapphire_rapids["bf16"] == {"features": ["amx_bf16", "avx512_bf16"], "native": True,
                                       "label": "AMX-BF16 + AVX512-BF16"}
    assert sapphire_rapids["int8"]["features"] == ["amx_int8", "avx512_vnni"]
    older = isa_support(["avx2", "fma"])
    assert older["f32"]["native"] and not older["bf16"]["native"] and not older["int8"]["native"]
    assert "falls back" in older["bf16"]["label"] and "AVX512-BF16" in older["bf16"]["label"]
    assert isa_support()["f32"]["label"]  # this machine's own flags


@pytest.mark.skipif(not (HAS_OPENVINO or HAS_ORT), reason="needs onnxruntime or openvino")
def test_precision_peaks_are_positive_and_labelled():
    peaks = precision_peaks(n=128, seconds=0.05, threads=1)
    assert peaks["f32"]["gflops"] == peaks["f32"]["peak_gflops"] > 0 and peaks["f32"]["numpy_gflops"] > 0
    # bf16 is measured by OpenVINO only: reported where it is installed, absent where not
    assert ("bf16" in peaks) == HAS_OPENVINO
    assert "int8" in peaks
    for precision, peak in peaks.items():
        assert peak["gflops"] > 0, precision
        assert isinstance(peak["native"], bool) and peak["label"] and isinstance(peak["features"], list)
        assert peak["native"] == bool(peak["features"])
    if HAS_OPENVINO:
        assert peaks["bf16"]["openvino_kernel"] and peaks["bf16"]["compiled_precision"] in ("bf16", "f32")
        assert peaks["int8"]["openvino_gflops"] > 0 and peaks["int8"]["openvino_kernel"]
        if peaks["bf16"]["compiled_precision"] != "bf16":
            assert "compiled the bf16 hint as" in peaks["bf16"]["label"]
    if HAS_ORT:
        assert peaks["int8"]["onnxruntime_gflops"] > 0


@pytest.mark.parametrize("info, declared, expected", [
    ({"unet_session": {"INFERENCE_PRECISION_HINT": "<Type: 'bfloat16'>"}}, "defaults", "bf16"),  # diffship on OV
    ({"unet_session": {"INFERENCE_PRECISION_HINT": "f32"}}, "defaults", "f32"),
    ({"unet_inference_precision": "<Type: 'bfloat16'>"}, "defaults", "bf16"),  # Optimum Intel's worker
    ({"inference_precisions": {"unet": "bf16"}}, None, "bf16"),
    ({"unet_session": {"providers": ["CPUExecutionProvider"]}}, "f32", "f32"),  # ONNX Runtime
    ({}, "bf16", "bf16"),  # nothing reported: as declared
    ({}, None, "f32"),
])
def test_unet_precision_from_what_the_worker_reported(info, declared, expected):
    assert unet_precision({"info": info, "precision": declared, "backend": "openvino"}) == expected


def test_int8_activations_are_found_in_the_graph_files(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "openvino_model.xml").write_text('<net><layers><layer id="1" type="MatMul"/></layers></net>')
    assert not unet_quantizes_activations(tmp_path, "openvino")
    (unet / "openvino_model.xml").write_text('<net><layers><layer id="1" type="FakeQuantize"/></layers></net>')
    assert unet_quantizes_activations(tmp_path, "openvino")

    def save(op, inputs):
        graph = helper.make_graph([helper.make_node(op, inputs, ["y"])], "g",
                                  [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in inputs],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        onnx.save(helper.make_model(graph), unet / "model.onnx")

    save("MatMul", ["a", "b"])
    assert not unet_quantizes_activations(tmp_path, "onnxruntime")
    save("DequantizeLinear", ["a", "s"])  # weight-only: computes in f32
    assert not unet_quantizes_activations(tmp_path, "onnxruntime")
    save("DynamicQuantizeLinear", ["a"])
    assert unet_quantizes_activations(tmp_path, "onnxruntime")
    result = {"info": {"unet_session": {}}, "backend": "onnxruntime", "precision": "f32"}
    assert unet_precision(result, tmp_path) == "int8"
    assert not unet_quantizes_activations(tmp_path / "missing", "onnxruntime")


def test_percent_of_peak_uses_the_peak_of_the_precision_run():
    peaks = {"f32": {"gflops": 100.0}, "bf16": {"gflops": 400.0}, "int8": {"gflops": 800.0}}
    stages = {"unet_per_step": {"median": 0.01}}

    def attached(info):
        result = {"info": info, "precision": "defaults", "backend": "openvino", "stages": stages}
        attach_roofline(result, 2e9, 100.0, peaks)
        return result

    bf16 = attached({"unet_session": {"INFERENCE_PRECISION_HINT": "bf16"}})
    assert bf16["unet_gflops"] == pytest.approx(200.0)
    assert (bf16["unet_precision"], bf16["unet_peak_gflops"]) == ("bf16", 400.0)
    assert bf16["unet_percent_of_peak"] == pytest.approx(50.0)
    f32 = attached({"unet_session": {"INFERENCE_PRECISION_HINT": "f32"}})
    assert f32["unet_percent_of_peak"] == pytest.approx(200.0)
    # without per-precision peaks (older callers), the fp32 peak and no new fields
    old = {"info": {}, "stages": stages}
    attach_roofline(old, 2e9, 100.0)
    assert old["unet_percent_of_peak"] == pytest.approx(200.0) and "unet_precision" not in old
