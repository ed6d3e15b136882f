"""PyTorch -> ONNX for one component."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from diffship.exporters.components import ComponentSpec
from diffship.layout import ONNX_MODEL

DEFAULT_OPSET = 17
# The opsets these graphs export at: scaled_dot_product_attention needs 14; torch.onnx's TorchScript exporter
# (dynamo=False, which traces diffusers' models to plain ONNX ops) stops at 20.
MIN_OPSET, MAX_OPSET = 14, 20


def trace_onnx(spec: ComponentSpec, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Trace `spec.module` with its example inputs; the fp32 graph, in memory."""
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings about Python control flow on shapes are expected for these models.
        warnings.simplefilter("ignore")
        traced = Path(scratch) / ONNX_MODEL
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
        # Loaded whole: the tracer's own external-data layout (one file per tensor) is not the one we write.
        return onnx.load(str(traced), load_external_data=True)
