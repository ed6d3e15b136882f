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

    def trace_then_corrupt(spec, opset, *args):
        model = real_trace(spec, opset, *args)
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


def test_external_data_to_both_formats_and_static_shapes(tiny_model_dirs, tmp_path):
    """A lowered threshold puts weights in model.onnx_data, as for a full-size UNet (3.4 GB); one export to both
    formats then converts the very graph whose weights the ONNX writer moved out (it once left OpenVINO pointing at
    data that was no longer there). Both validate and run. Static shapes fix batch (x2 for guidance in the UNet),
    height and width: 48x40 is a 6x5 latent, which sd1's up factor of 4 does not divide."""
    out = tmp_path / "out"
    out.mkdir()
    export(tiny_model_dirs("sd1"), out, ["onnx", "openvino"], static=True, batch_size=1, height=48, width=40,
           external_data_threshold=1024, progress=False)
    report = json.loads((out / "export_report.json").read_text())
    for name in COMPONENTS:
        assert (out / name / "model.onnx_data").is_file() and (out / name / "openvino_model.bin").is_file()
        model = onnx.load(str(out / name / "model.onnx"), load_external_data=False)
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        assert set(report["components"][name]["validation"]) == {"onnxruntime", "openvino"}
    unet = onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False)
    sample = unet.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in sample] == [2, 4, 6, 5]

    from diffship.pipelines import StableDiffusionPipeline

    for backend in ("onnxruntime", "openvino"):
        pipe = StableDiffusionPipeline.from_pretrained(out, backend=backend, inference_precision="f32")
        assert (pipe.default_height, pipe.default_width) == (48, 40)
        image = pipe("a square", num_inference_steps=2, generator=0, output_type="np").images
        assert image.shape == (1, 48, 40, 3) and np.isfinite(image).all()


def test_dynamic_graphs_are_validated_at_other_shapes(exported_dirs):
    """Dynamic graphs are checked at the traced shapes and at others: another batch, and for the UNet a latent its
    up factor does not divide (9x9: sd1's factor is 4) beside the requested one (8x8)."""
    report = json.loads((exported_dirs("sd1") / "export_report.json").read_text())
    for name in COMPONENTS:
        for backend in ("onnxruntime", "openvino"):
            cases = report["components"][name]["validation"][backend]["cases"]
            assert len(cases) >= 2 and all(c["max_abs"] <= 1e-3 for c in cases)
            batches = {c["inputs"][next(iter(c["inputs"]))][0] for c in cases}
            assert len(batches) == 2, f"{name}: one batch size only"
    unet = report["components"]["unet"]["validation"]["onnxruntime"]["cases"]
    assert [c["inputs"]["sample"] for c in unet] == [[2, 4, 9, 9], [1, 4, 8, 8], [1, 4, 9, 9]]


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
    with pytest.raises(NotAPipelineError, match="no such directory, and not a hub repo id"):
        export(str(tmp_path / "missing" / "deeper"), tmp_path / "o", progress=False)


def test_save_model_leaves_the_graph_in_memory_as_it_was(tmp_path):
    """Writing a graph with external data must not move its weights out of the in-memory graph: the next user of
    the same graph (another format, another pass) would find them gone."""
    from onnx import helper

    from diffship.graphs.external_data import save_model

    weight = onnx.numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "weight")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "weight"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [weight])
    model = helper.make_model(graph)
    files = save_model(model, tmp_path / "a" / "model.onnx", external_data_threshold=0)
    assert [f.name for f in files] == ["model.onnx", "model.onnx_data"]
    kept = model.graph.initializer[0]
    assert kept.data_location == onnx.TensorProto.DEFAULT and not kept.external_data
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(kept), onnx.numpy_helper.to_array(weight))
    save_model(model, tmp_path / "b" / "model.onnx", external_data_threshold=0)  # again, elsewhere
    written = onnx.load(str(tmp_path / "b" / "model.onnx"))
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(written.graph.initializer[0]),
                                  onnx.numpy_helper.to_array(weight))


def _two_weight_model():
    from onnx import helper

    weights = [onnx.numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64) * (i + 1), f"w{i}")
               for i in range(2)]
    small = onnx.numpy_helper.from_array(np.ones(4, dtype=np.float32), "small")  # under the size threshold
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("MatMul", ["h", "w1"], ["y0"]),
             helper.make_node("Add", ["y0", "small"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
                              [*weights, small])
    return helper.make_model(graph)


def test_save_model_writes_weights_as_onnx_does_one_tensor_at_a_time(tmp_path):
    """The streaming writer lays the external file out as onnx's writer does (byte for byte), from a graph in
    memory (kept as it was, or given up tensor by tensor with keep=False) and from a graph whose weights are still in
    a tracer's files, one per tensor without a length (torch.onnx's layout past 2 GB: copied, never loaded)."""
    from diffship.graphs.external_data import save_model

    (tmp_path / "onnx").mkdir()
    onnx.save_model(_two_weight_model(), str(tmp_path / "onnx" / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx_data",
                    size_threshold=1024)
    expected = (tmp_path / "onnx" / "model.onnx_data").read_bytes()
    values = {t.name: onnx.numpy_helper.to_array(t) for t in _two_weight_model().graph.initializer}

    model = _two_weight_model()
    save_model(model, tmp_path / "kept" / "model.onnx", external_data_threshold=0, keep=True)
    assert (tmp_path / "kept" / "model.onnx_data").read_bytes() == expected
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)

    model = _two_weight_model()
    save_model(model, tmp_path / "dropped" / "model.onnx", external_data_threshold=0, keep=False)
    assert (tmp_path / "dropped" / "model.onnx_data").read_bytes() == expected
    assert [t.name for t in model.graph.initializer if not t.HasField("raw_data")] == ["w0", "w1"]

    # The tracer's layout: each large tensor in a file named after it, no offset or length recorded.
    tracer = tmp_path / "tracer"
    tracer.mkdir()
    model = _two_weight_model()
    for tensor in list(model.graph.initializer)[:2]:
        (tracer / tensor.name).write_bytes(tensor.raw_data)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        entry = tensor.external_data.add()  # the location only
        entry.key, entry.value = "location", tensor.name
    # ... and a Constant node's value, which the tracer writes out too and the graph file holds again.
    value = onnx.numpy_helper.from_array(np.full((32, 32), 0.5, dtype=np.float32), "value")
    (tracer / "const_value").write_bytes(value.raw_data)
    value.ClearField("raw_data")
    value.data_location = onnx.TensorProto.EXTERNAL
    entry = value.external_data.add()
    entry.key, entry.value = "location", "const_value"
    model.graph.node.append(onnx.helper.make_node("Constant", [], ["unused"], value=value))
    with pytest.raises(ValueError, match="give base_dir"):
        save_model(model, tmp_path / "nowhere" / "model.onnx", external_data_threshold=0)
    save_model(model, tmp_path / "copied" / "model.onnx", external_data_threshold=0, base_dir=tracer)
    assert (tmp_path / "copied" / "model.onnx_data").read_bytes() == expected
    assert [e.value for e in model.graph.initializer[0].external_data] == ["w0"]  # kept: the tracer's files again
    written = onnx.load(str(tmp_path / "copied" / "model.onnx"))
    for tensor in written.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), values[tensor.name])
    constant = written.graph.node[-1].attribute[0].t
    assert constant.data_location == onnx.TensorProto.DEFAULT
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(constant), np.full((32, 32), 0.5, dtype=np.float32))
    # Under the threshold, the tracer's weights go back into the graph file.
    save_model(model, tmp_path / "inline" / "model.onnx", base_dir=tracer)
    assert not (tmp_path / "inline" / "model.onnx_data").exists()
    written = onnx.load(str(tmp_path / "inline" / "model.onnx"))
    for tensor in written.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), values[tensor.name])


def test_an_export_sets_aside_older_objects_only_while_it_runs(tiny_model_dirs, tmp_path, monkeypatch):
    """Exports collect garbage after each dropped weights copy, over the objects made during the export only
    (gc.freeze: a full collection costs 0.2 s with torch and diffusers imported); the caller's objects are given
    back to the collector when the export ends, here by failing at its first component."""
    import gc

    from diffship.exporters import memory

    seen = []
    monkeypatch.setattr(memory.gc, "collect", lambda *a: seen.append(gc.get_freeze_count()) or 0)
    with pytest.raises(ValidationError):
        export(tiny_model_dirs("sd1"), tmp_path / "out", "onnx", atol={"text_encoder": 1e-12}, progress=False)
    assert seen and min(seen) > 0  # every collection ran with the older objects set aside
    assert gc.get_freeze_count() == 0


def test_pages_of_a_mapped_weight_file_are_handed_back_and_read_again_unchanged(tmp_path):
    """What OpenVINO maps read-only (openvino_model.bin) leaves this process's resident memory while the export
    validates, and reads back the same bytes (exporters/memory.py); writable mappings are never touched."""
    import mmap

    from diffship.exporters.memory import hand_back_pages, mapped_weights_handed_back, read_only_mappings

    data = np.random.default_rng(0).integers(0, 255, 8 * 2**20, dtype=np.uint8)
    path = tmp_path / "openvino_model.bin"
    data.tofile(path)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        view = np.frombuffer(mapped, dtype=np.uint8)
        if not read_only_mappings(path):
            pytest.skip("no /proc/self/maps here")

        def resident() -> int:  # pages of the mapping in memory (mincore would say it too; smaps is simpler)
            with open("/proc/self/smaps") as f:
                lines, rss, inside = f.read().splitlines(), 0, False
            for line in lines:
                if line.split()[-1:] == [str(path.resolve())]:
                    inside = True
                elif inside and line.startswith("Rss:"):
                    rss, inside = rss + int(line.split()[1]), False
            return rss

        assert int(view.sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # every page read
        assert resident() > 4096
        if not hand_back_pages(path):
            pytest.skip("this kernel refuses madvise(MADV_PAGEOUT) (Linux 5.4+): exports hand no pages back here")
        assert resident() == 0
        with mapped_weights_handed_back(path, interval=0.01):
            np.testing.assert_array_equal(view, data)  # read again, the same bytes
        assert resident() == 0
        del view
    finally:
        mapped.close()
    with open(path, "r+b") as f:  # a writable mapping keeps its pages
        writable = mmap.mmap(f.fileno(), 0)
        try:
            writable[:1] = b"\0"
            assert read_only_mappings(path) == []
        finally:
            writable.close()
