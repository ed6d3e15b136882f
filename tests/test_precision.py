"""Precision and optimisation passes: each keeps validation within its stated bound on the tiny models, is named
in export_report.json with its error, and gives images without NaN close to the fp32 ones.

Bounds (see DEFAULT_RTOL in exporters/validate.py for the derivation): fp32 passes 1e-4 max abs here; fp16
max_rel <= 2e-2; int8 <= 1e-1; int4 and hybrid <= 3e-1. End to end, images are compared with the fp32 export's
by PSNR: fp16 >= 40 dB (fp16 rounding of [0, 1] pixels alone gives ~66 dB), int8 >= 25 dB, int4/hybrid >= 18 dB
on the tiny random-weight models (their images are low-contrast, so these are loose floors that still fail
on a broken graph: a NaN or a wrong op gives < 10 dB).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from diffship.errors import ValidationError
from diffship.exporters import export
from diffship.pipelines import AutoPipelineForText2Image, StableDiffusionPipeline

PROMPTS = ["a red circle on the left", "a photo of a cat"]

SETTINGS = {
    # name: (export kwargs, backends, PSNR floor)
    # OpenVINO's side of optimize (cleanup before conversion) is fp16-mixed-vae's too: checked there.
    "optimize-fp32": (dict(optimize=True), ["onnx"], 60.0),
    "fp16-mixed-vae": (dict(dtype="fp16", optimize=True, vae_fp16="mixed"), ["onnx", "openvino"], 40.0),
    "int8": (dict(weight_format="int8"), ["onnx", "openvino"], 25.0),
    "int4": (dict(weight_format="int4"), ["onnx", "openvino"], 18.0),
    "hybrid": (dict(quantize="hybrid", calibration_prompts=PROMPTS), ["openvino"], 18.0),
}
PASSES = {
    "optimize-fp32": {"onnx": ["cleanup", "ort_fusions_cpu"]},
    "fp16-mixed-vae": {"onnx": ["cleanup", "fp16", "ort_fusions_cpu"], "openvino": ["cleanup", "fp16_ir"]},
    "int8": {"onnx": ["int8_dynamic"], "openvino": ["nncf_int8_weights"]},
    "int4": {"onnx": ["int4_matmul"], "openvino": ["nncf_int4_weights"]},
    "hybrid": {"openvino": ["nncf_hybrid_int8"]},
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def images(model_dir, backend):
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, backend=backend, inference_precision="f32")
    pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    return pipe(PROMPTS, num_inference_steps=4, latents=latents, output_type="np").images


@pytest.fixture(scope="module")
def fp32_images(exported_dirs):
    """backend -> the fp32 export's images (drawn once for every setting)."""
    cache = {}

    def get(backend):
        if backend not in cache:
            cache[backend] = images(exported_dirs("sd1"), backend)
        return cache[backend]

    return get


@pytest.fixture(scope="module")
def precision_exports(tiny_model_dirs, tmp_path_factory):
    """setting -> the tiny sd1 model exported with that setting (built on first use, shared by the tests)."""
    root, cache = tmp_path_factory.mktemp("precision"), {}

    def get(setting):
        if setting not in cache:
            kwargs, formats, _ = SETTINGS[setting]
            cache[setting] = export(tiny_model_dirs("sd1"), root / setting, formats, progress=False, **kwargs)
        return cache[setting]

    return get


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_pass_bounds_report_and_images(setting, precision_exports, fp32_images):
    kwargs, formats, floor = SETTINGS[setting]
    out = precision_exports(setting)
    report = json.loads((out / "export_report.json").read_text())

    for name, entry in report["components"].items():
        for fmt in formats:
            applied = [p["pass"] for p in entry["passes"] if p["format"] == fmt]
            if name == "unet":  # every setting changes the UNet
                assert set(PASSES[setting][fmt]) <= set(applied), (fmt, applied)
            onnx_passes = [p for p in entry["passes"] if p["format"] == "onnx"]
            lossy = any(p["pass"].startswith(("fp16", "int")) for p in onnx_passes)
            for record in onnx_passes:
                if not lossy:
                    assert record["max_abs"] < 1e-4, record  # fp32 passes are (nearly) exact
                assert record.get("nan", 0) == 0
        for backend, v in entry["validation"].items():
            assert v["passed"] and v["nan"] == 0
            assert (v["max_abs"] <= v["atol"]) if "atol" in v else (v["max_rel"] <= v["rtol"])
    assert set(report["passes"]) >= {p for fmt in formats for p in PASSES[setting][fmt]}

    for fmt in formats:
        backend = "onnxruntime" if fmt == "onnx" else "openvino"
        got, ref = images(out, backend), fp32_images(backend)
        assert np.isfinite(got).all()
        assert psnr(got, ref) >= floor, (setting, backend, psnr(got, ref))


@pytest.fixture(scope="module")
def overflow_model(tiny_model_dirs, tmp_path_factory):
    from diffship.testing.fp16_overflow import make_vae_overflow_fp16

    # SDXL's VAE is the one that overflows fp16 in practice (SD 2's too): the tiny SDXL pipeline, made to overflow.
    model = shutil.copytree(tiny_model_dirs("sdxl"), tmp_path_factory.mktemp("overflow") / "sdxl-overflow")
    return make_vae_overflow_fp16(model)


def test_vae_fp16_without_protection_overflows(overflow_model, tmp_path):
    """The check that fails if the protection is removed: an fp16 VAE decoder of this model gives NaN."""
    with pytest.raises(ValidationError, match=r"vae_decoder on onnxruntime \(fp16\).*NaN"):
        export(overflow_model, tmp_path / "none", "onnx", dtype="fp16", vae_fp16="none", progress=False)
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("protection", ["fp32", "mixed"])
def test_vae_fp16_protection(protection, overflow_model, tmp_path):
    out = export(overflow_model, tmp_path / protection, "onnx", dtype="fp16", vae_fp16=protection, progress=False)
    report = json.loads((out / "export_report.json").read_text())
    decoder = report["components"]["vae_decoder"]
    assert decoder["validation"]["onnxruntime"]["nan"] == 0
    if protection == "mixed":
        assert decoder["precision"]["onnxruntime"] == "fp16"
        assert any(p["pass"] == "fp16_mixed" for p in decoder["passes"])
    else:
        assert decoder["precision"]["onnxruntime"] == "fp32"
    pipe = AutoPipelineForText2Image.from_pretrained(out)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, generator=0, output_type="np").images
    assert np.isfinite(image).all() and image.std() > 1e-3  # not NaN, not a flat (black) image


def test_bad_precision_options(tiny_model_dirs, tmp_path):
    from diffship.errors import DiffshipError

    with pytest.raises(DiffshipError, match="hybrid is an OpenVINO"):
        export(tiny_model_dirs("sd1"), tmp_path / "o", "onnx", quantize="hybrid", progress=False)
    with pytest.raises(DiffshipError, match="takes fp32 graphs"):
        export(tiny_model_dirs("sd1"), tmp_path / "o", "onnx", dtype="fp16", weight_format="int8", progress=False)
    with pytest.raises(DiffshipError, match="dtype must be one of"):
        export(tiny_model_dirs("sd1"), tmp_path / "o", "onnx", dtype="bf8", progress=False)
    assert not (tmp_path / "o").exists()


def test_inspect_reports_passes_and_figures(precision_exports, capsys):
    from diffship.cli import main

    out = precision_exports("int8")
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "passes: int8_dynamic, nncf_int8_weights" in text
    assert "unet [onnx]" in text and "unet [openvino]" in text and "validation (int8)" in text
    assert "MatMulInteger" in text or "DynamicQuantizeLinear" in text
    assert main(["inspect", str(out / "unet" / "model.onnx"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["graphs"][0]["inputs"][1]["name"] == "timestep" and data["graphs"][0]["parameters"] > 0


def test_cleanup_takes_the_large_graph_route(exported_dirs, monkeypatch):
    """Graphs past 2 GB go through file-based shape inference; the tiny UNet, treated as large, must clean up to
    the same graph and the same outputs."""
    import onnx

    import diffship.graphs.cleanup as cleanup_module

    model = onnx.load(str(exported_dirs("sd1") / "unet" / "model.onnx"))
    small = cleanup_module.cleanup(onnx.ModelProto.FromString(model.SerializeToString()))
    monkeypatch.setattr(cleanup_module, "is_large", lambda m: True)
    large = cleanup_module.cleanup(model)
    original = len(onnx.load(str(exported_dirs("sd1") / "unet" / "model.onnx")).graph.node)
    # The file route folds a few shape subgraphs less (849 against 842 nodes), both far below the traced graph.
    assert len(small.graph.node) <= len(large.graph.node) <= 1.02 * len(small.graph.node) < 0.6 * original


def test_cpu_fusion_runs_every_attention_on_the_multihead_kernel(precision_exports, exported_dirs):
    """--optimize --target cpu: each of the UNet's attentions (one Softmax each in the plain export) is a
    MultiHeadAttention node, none onnxruntime's Attention (whose CPU kernel materialises the score matrix);
    test_pass_bounds_report_and_images checks the same export's validation and images. Its model.onnx is the
    CPU graph already: no second one (layout.ORT_CPU_MODEL) beside it."""
    import onnx

    from diffship.layout import ORT_CPU_MODEL

    def ops(path):
        return [n.op_type for n in onnx.load(str(path / "unet" / "model.onnx"), load_external_data=False).graph.node]

    fused, plain = ops(precision_exports("optimize-fp32")), ops(exported_dirs("sd1"))
    assert "Attention" not in fused and "Softmax" not in fused
    assert fused.count("MultiHeadAttention") == plain.count("Softmax") > 0
    assert not (precision_exports("optimize-fp32") / "unet" / ORT_CPU_MODEL).exists()


def _attention_graph(channels: int, bias, extra_input: bool = False):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((channels, 3 * channels)) / np.sqrt(channels)).astype(np.float32)
    inputs = ["x", "w", "b"] + (["mask"] if extra_input else [])
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, channels])]
    if extra_input:
        graph_inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, [2, 16]))
    node = helper.make_node("Attention", inputs, ["out"], name="attention", domain="com.microsoft", num_heads=2)
    graph = helper.make_graph([node], "g", graph_inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 16, channels])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize("biased", [False, True])
def test_self_attention_rewrite_computes_what_the_attention_node_did(biased):
    """The rewrite (graphs.fusion.self_attention_as_multihead) against onnxruntime's own Attention kernel on the
    same input: equal to fp32 rounding (1e-5 on O(1) outputs; the two kernels sum in different orders). A zero
    bias (what the fusion writes for SD's bias-free projections) is dropped with its initializer, a real one
    added; a node with a mask input is left as it is."""
    import onnxruntime as ort

    from diffship.graphs.fusion import self_attention_as_multihead

    bias = np.linspace(-1, 1, 24).astype(np.float32) if biased else np.zeros(24, np.float32)
    original, rewritten = _attention_graph(8, bias), _attention_graph(8, bias)
    assert self_attention_as_multihead(rewritten) == 1
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops == ["MatMul"] + (["Add"] if biased else []) + ["Split", "MultiHeadAttention"]
    assert ("b" in {t.name for t in rewritten.graph.initializer}) == biased
    x = {"x": np.random.default_rng(1).standard_normal((2, 16, 8)).astype(np.float32)}
    want, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
                 for m in (original, rewritten))
    assert np.abs(want).max() > 0.1 and np.abs(got - want).max() < 1e-5

    masked = _attention_graph(8, bias, extra_input=True)
    assert self_attention_as_multihead(masked) == 0 and masked.graph.node[0].op_type == "Attention"
