"""The ONNX export's CPU graph (layout.ORT_CPU_MODEL): each UNet attention on onnxruntime's MultiHeadAttention,
written beside model.onnx, validated against PyTorch, sharing model.onnx's weights, and what an onnxruntime CPU
session on a component folder loads (runtimes/onnxruntime.graph_in)."""

from __future__ import annotations

import json

import numpy as np
import onnx

from diffship.layout import ONNX_MODEL, ORT_CPU_MODEL, REPORT_FILE


def _graph(path):
    return onnx.load(str(path), load_external_data=False)


def _ops(model):
    return [n.op_type for n in model.graph.node]


def test_export_writes_a_validated_cpu_graph_for_the_unet(exported_dirs):
    """Every attention of the tiny UNet (one Softmax each in model.onnx) is one MultiHeadAttention in the CPU
    graph, none left as Softmax; the weights are model.onnx's, by name, type and shape; the inputs and outputs
    are model.onnx's, in order; the export validated it against PyTorch at every shape set model.onnx was
    validated at, within the same bound; components without UNet attention get none."""
    out = exported_dirs("sd1")
    report = json.loads((out / REPORT_FILE).read_text())
    portable, cpu = _graph(out / "unet" / ONNX_MODEL), _graph(out / "unet" / ORT_CPU_MODEL)
    assert _ops(cpu).count("MultiHeadAttention") == _ops(portable).count("Softmax") > 0
    assert "Softmax" not in _ops(cpu)
    assert all(n.domain == "com.microsoft" for n in cpu.graph.node if n.op_type == "MultiHeadAttention")

    def weights(model):
        return {t.name: (t.data_type, list(t.dims)) for t in model.graph.initializer if len(t.dims) >= 1
                and np.prod(t.dims) > 8}

    assert weights(cpu).items() <= weights(portable).items() and len(weights(cpu)) >= 0.95 * len(weights(portable))
    for kind in ("input", "output"):
        assert ([(v.name, v.type) for v in getattr(cpu.graph, kind)]
                == [(v.name, v.type) for v in getattr(portable.graph, kind)])

    entry = report["components"]["unet"]
    cpu_entry = entry["onnxruntime_cpu"]
    assert cpu_entry["file"] == ORT_CPU_MODEL and cpu_entry["multihead_attention"] == _ops(cpu).count(
        "MultiHeadAttention")
    validation = cpu_entry["validation"]
    assert validation["passed"] and validation["max_abs"] <= validation["atol"] == entry["validation"][
        "onnxruntime"]["atol"]
    assert len(validation["cases"]) == len(entry["validation"]["onnxruntime"]["cases"]) >= 2
    assert ORT_CPU_MODEL in entry["files"] and f"unet/{ORT_CPU_MODEL}" in report["files"]
    for name in ("text_encoder", "vae_decoder", "vae_encoder"):
        assert not (out / name / ORT_CPU_MODEL).exists() and "onnxruntime_cpu" not in report["components"][name]


def test_cpu_sessions_on_a_folder_load_the_cpu_graph(exported_dirs):
    """A CPU session on the unet folder loads the CPU graph, one given model.onnx loads that; the two agree to
    fp32 rounding at a shape other than the traced one (1e-4 on the tiny UNet's O(1) outputs: the tiled kernel
    sums in another order). LoRA weight swaps on it: test_runtime_adapters."""
    from diffship.runtimes.onnxruntime import OnnxRuntimeSession

    folder = exported_dirs("sd1") / "unet"
    cpu, portable = OnnxRuntimeSession(folder, cache_dir=False), OnnxRuntimeSession(folder / ONNX_MODEL,
                                                                                   cache_dir=False)
    assert cpu.path.endswith(ORT_CPU_MODEL) and portable.path.endswith(ONNX_MODEL)
    rng = np.random.default_rng(0)
    hidden = next(i for i in portable.inputs if i.name == "encoder_hidden_states").shape[-1]
    feeds = {"sample": rng.standard_normal((2, 4, 8, 12), dtype=np.float32),
             "timestep": np.array(321.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 7, hidden), dtype=np.float32)}
    want, got = portable.run(feeds)["out_sample"], cpu.run(feeds)["out_sample"]
    assert np.abs(want).max() > 0.1 and np.abs(got - want).max() < 1e-4



def test_only_the_default_scale_is_rewritten(exported_dirs):
    """The rewrite relies on onnxruntime's matcher checking the scale: an attention whose query is scaled by
    anything but the default 1/sqrt(head size) chain keeps its nodes (MultiHeadAttention would scale it by
    the default), the others are rewritten."""
    from diffship.graphs.fusion import attention_as_multihead

    model = _graph(exported_dirs("sd1") / "unet" / ONNX_MODEL)
    softmaxes = _ops(model).count("Softmax")
    producer = {o: n for n in model.graph.node for o in n.output}
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    scores = producer[softmax.input[0]]  # MatMul(Q * s, K^T * s)
    scaled_query = producer[scores.input[0]]
    assert scaled_query.op_type == "Mul"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), "custom_scale"))
    scaled_query.input[1] = "custom_scale"
    assert attention_as_multihead(model) == softmaxes - 1
    assert _ops(model).count("Softmax") == 1



def test_inspect_shows_the_cpu_graph_and_its_validation(exported_dirs, capsys):
    from diffship.cli import main

    assert main(["inspect", str(exported_dirs("sd1"))]) == 0
    text = capsys.readouterr().out
    unet = text[text.index("unet [onnx]"):]
    assert f"cpu graph {ORT_CPU_MODEL} beside it" in unet.split("\n\n")[0] and "validation (fp32): max abs" in unet
    assert text.count("cpu graph ") == 1  # the unet's alone
