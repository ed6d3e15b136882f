"""PyTorch -> ONNX for one component."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from diffship.exporters.components import ComponentSpec
from diffship.exporters.memory import release
from diffship.layout import ONNX_MODEL

DEFAULT_OPSET = 17
# The opsets these graphs export at: scaled_dot_product_attention needs 14; torch.onnx's TorchScript exporter
# (dynamo=False, which traces diffusers' models to plain ONNX ops) stops at 20.
MIN_OPSET, MAX_OPSET = 14, 20


def trace_onnx(spec: ComponentSpec, opset: int = DEFAULT_OPSET, scratch: str | Path | None = None) -> onnx.ModelProto:
    """Trace `spec.module` with its example inputs; the fp32 graph.

    With `scratch` (a folder that outlives the graph), a graph past 2 GB keeps its weights where the tracer wrote
    them, one file per tensor in `scratch`, as external data: the ONNX writer copies them from there
    (graphs.external_data.save_model(base_dir=scratch)), and they are loaded only for a pass that needs them in
    memory. Without it, every weight is loaded into the returned graph."""
    with tempfile.TemporaryDirectory() as temporary, torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings about Python control flow on shapes are expected for these models.
        warnings.simplefilter("ignore")
        traced = Path(scratch if scratch is not None else temporary) / ONNX_MODEL
        torch.onnx.export(
            spec.module.eval(),
            tuple(spec.example_inputs.values()),
            str(traced),
            input_names=list(spec.example_inputs),
            output_names=spec.output_names,
            dynamic_axes={k: v for k, v in spec.dynamic_axes.items() if v},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
        if spec.release_after_trace:
            # The traced graph holds its own copy of the weights now: PyTorch's goes before it is loaded, so that
            # the two copies of a full-size UNet are not in memory together.
            spec.module = None
            release()
        # The tracer's own external-data layout (one file per tensor) is not the one we write: without a scratch
        # folder to keep them in, the weights are loaded whole.
        model = onnx.load(str(traced), load_external_data=scratch is None)
        return declare_unused_inputs(model, spec)


def declare_unused_inputs(model: onnx.ModelProto, spec: ComponentSpec) -> onnx.ModelProto:
    """Declare again, in the spec's order, the inputs the tracer dropped because the traced path does not read
    them (DeepCache's shallow UNet of a model whose outer blocks have no cross-attention never reads
    encoder_hidden_states): every graph takes the inputs its spec names, so one set of feeds runs a UNet and its
    shallow graph alike. ONNX Runtime and OpenVINO accept inputs that nothing consumes."""
    declared = {value.name for value in model.graph.input}
    for position, (name, example) in enumerate(spec.example_inputs.items()):
        if name not in declared:
            axes = spec.dynamic_axes.get(name, {})
            shape = [axes.get(axis, size) for axis, size in enumerate(example.shape)]
            dtype = onnx.helper.np_dtype_to_tensor_dtype(example.numpy().dtype)
            model.graph.input.insert(position, onnx.helper.make_tensor_value_info(name, dtype, shape))
    return model
