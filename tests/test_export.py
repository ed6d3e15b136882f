"""The exporter: layout, export_report.json, validation failures, atomic output, external data, static shapes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from diffship.errors import DiffshipError, ValidationError
from diffship.exporters import export

COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


def test_layout_and_report(exported_dirs):
    out = exported_dirs("sd1")
    for name in COMPONENTS:
        assert (out / name / "model.onnx").is_file()
        assert (out / name / "openvino_model.xml").is_file() and (out / name / "openvino_model.bin").is_file()
        assert json.loads((out / name / "config.json").read_text())
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "scheduler" / "scheduler_config.json").is_file()
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and "safety_checker" not in index

    report = json.loads((out / "export_report.json").read_text())
    assert report["formats"] == ["onnx", "openvino"]
    for name in COMPONENTS:
        for backend in ("onnxruntime", "openvino"):
            v = report["components"][name]["validation"][backend]
            assert v["passed"] and v["max_abs"] <= v["atol"]
            assert set(v["outputs"]) == set(report["components"][name]["outputs"])


def test_tensor_contract(exported_dirs):
    """Names, dtypes and the timestep form of DESIGN.md's table (Optimum's ONNX layout)."""
    out = exported_dirs("sd2")

    def io(name):
        model = onnx.load(str(out / name / "model.onnx"))
        return {i.name: i for i in model.graph.input}, [o.name for o in model.graph.output]

    inputs, outputs = io("text_encoder")
    assert list(inputs) == ["input_ids"] and inputs["input_ids"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert outputs[:2] == ["last_hidden_state", "pooler_output"] and outputs[2] == "hidden_states.0"
    inputs, outputs = io("unet")
    assert list(inputs) == ["sample", "timestep", "encoder_hidden_states"] and outputs == ["out_sample"]
    timestep = inputs["timestep"].type.tensor_type
    assert timestep.elem_type == onnx.TensorProto.FLOAT and len(timestep.shape.dim) == 0
    assert io("vae_encoder")[1] == ["latent_parameters"]
    inputs, outputs = io("vae_decoder")
    assert list(inputs) == ["latent_sample"] and outputs == ["sample"]


def test_tiny_atol_fails_naming_component_and_leaves_nothing(tiny_model_dirs, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValidationError, match=r"vae_decoder on onnxruntime \(fp32\) differs from PyTorch"):
        export(tiny_model_dirs("sd1"), out, "onnx", atol={"vae_decoder": 1e-12}, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory left either


def test_corrupted_weights_fail_validation(tiny_model_dirs, tmp_path, monkeypatch):
    """Perturb one UNet weight in the written graph, as a broken exporter would: validation must catch it."""
    import diffship.exporters.component_export as component_export

    real_trace = component_export.trace_onnx

    def trace_then_corrupt(spec, opset):
        model = real_trace(spec, opset)
        if spec.name == "unet":
            weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
            array = onnx.numpy_helper.to_array(weight).copy()
            array += 0.5
            weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
        return model

    monkeypatch.setattr(component_export, "trace_onnx", trace_then_corrupt)
    out = tmp_path / "out"
    with pytest.raises(ValidationError, match=r"^unet on onnxruntime \(fp32\) differs"):
        export(tiny_model_dirs("sd1"), out, "onnx", progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_refused_unless_overwrite(tiny_model_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DiffshipError, match="exists; pass overwrite=True"):
        export(tiny_model_dirs("sd1"), out, "onnx", progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_external_data_static_shapes_and_overwrite(tiny_model_dirs, tmp_path):
    """A lowered threshold puts weights in model.onnx_data; the graphs still load and validate. Static
    shapes fix batch (x2 for guidance in the UNet), height and width."""
    out = tmp_path / "out"
    out.mkdir()
    export(tiny_model_dirs("sd1"), out, "onnx", overwrite=True, static=True, batch_size=1, height=48, width=40,
           external_data_threshold=1024, progress=False)
    for name in COMPONENTS:
        assert (out / name / "model.onnx_data").is_file()
        model = onnx.load(str(out / name / "model.onnx"), load_external_data=False)
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    unet = onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False)
    sample = unet.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in sample] == [2, 4, 24, 20]

    from diffship.pipelines import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert (pipe.default_height, pipe.default_width) == (48, 40)
    image = pipe("a square", num_inference_steps=2, generator=0, output_type="np").images
    assert image.shape == (1, 48, 40, 3) and np.isfinite(image).all()


def test_unknown_backend_and_bad_sizes(tiny_model_dirs, tmp_path):
    with pytest.raises(DiffshipError, match="unknown export backend"):
        export(tiny_model_dirs("sd1"), tmp_path / "o", "tensorflow", progress=False)
    with pytest.raises(ValueError, match="height must be a multiple of 8"):
        export(tiny_model_dirs("sd1"), tmp_path / "o", "onnx", height=60, progress=False)
    assert not (tmp_path / "o").exists()


def test_not_a_pipeline(tmp_path):
    from diffship.errors import NotAPipelineError

    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAPipelineError, match="no model_index.json"):
        export(tmp_path / "empty", tmp_path / "o", progress=False)
    with pytest.raises(NotAPipelineError, match="neither an existing directory nor a hub id"):
        export(str(tmp_path / "missing" / "deeper"), tmp_path / "o", progress=False)
