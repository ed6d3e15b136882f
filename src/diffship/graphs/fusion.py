"""ONNX Runtime fusions for Stable Diffusion graphs (attention, LayerNorm, Gelu, GroupNorm, BiasSplitGelu ...).

onnxruntime's transformer optimizer knows the unet / vae / clip graph patterns. Several fused ops (GroupNorm,
BiasSplitGelu, NhwcConv, packed QKV) exist only as CUDA kernels, so the CPU target turns those off; graphs
fused for one target are not portable to the other.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx

from diffship.layout import TEXT_ENCODER, TEXT_ENCODER_2, UNET, UNET_SHALLOW, VAE_DECODER, VAE_ENCODER

# onnxruntime's transformer optimizer model type of each component.
MODEL_TYPES = {TEXT_ENCODER: "clip", TEXT_ENCODER_2: "clip", UNET: "unet", UNET_SHALLOW: "unet", VAE_ENCODER: "vae",
               VAE_DECODER: "vae"}
TARGETS = ("cpu", "cuda")


def fusion_options(model_type: str, target: str):
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    if target == "cpu":
        for cuda_only in ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                          "enable_packed_qkv", "enable_packed_kv", "enable_bias_add"):
            setattr(options, cuda_only, False)
    return options


class _OneElementArray(np.ndarray):
    """An array that still converts to int/float when it holds one element, as NumPy < 2.3 allowed."""

    def __int__(self):
        return int(self.reshape(-1)[0])

    def __float__(self):
        return float(self.reshape(-1)[0])


@contextlib.contextmanager
def _tolerant_fusion_scripts():
    """onnxruntime 1.31's fusion scripts call int() on 1-element arrays (an error in NumPy >= 2.3) and .item() on
    constants before checking their size. For the duration of one optimisation, constants behave as before,
    and a fusion that still fails on a node skips that node (the graph stays correct, just less fused)."""
    import sys

    import onnxruntime.transformers.optimizer  # noqa: F401  (puts the fusion modules on sys.path)

    # onnxruntime imports these modules by their top-level names; patch the instances it uses.
    onnx_model = sys.modules.get("onnx_model") or sys.modules["onnxruntime.transformers.onnx_model"]
    fusion_quickgelu = sys.modules.get("fusion_quickgelu")
    if fusion_quickgelu is None:
        import onnxruntime.transformers.fusion_quickgelu as fusion_quickgelu

    original_get = onnx_model.OnnxModel.get_constant_value
    original_fuse = fusion_quickgelu.FusionQuickGelu.fuse

    def get_constant_value(self, name):
        value = original_get(self, name)
        return value.view(_OneElementArray) if isinstance(value, np.ndarray) else value

    def fuse(self, *args, **kwargs):
        try:
            return original_fuse(self, *args, **kwargs)
        except (ValueError, TypeError):
            return None

    onnx_model.OnnxModel.get_constant_value = get_constant_value
    fusion_quickgelu.FusionQuickGelu.fuse = fuse
    try:
        yield
    finally:
        onnx_model.OnnxModel.get_constant_value = original_get
        fusion_quickgelu.FusionQuickGelu.fuse = original_fuse


def fuse_for_onnxruntime(model: onnx.ModelProto, component: str, target: str = "cpu") -> onnx.ModelProto:
    """Fuse `model` (a component graph) for ONNX Runtime on `target` ("cpu" or "cuda")."""
    if target not in TARGETS:
        raise ValueError(f"fusion target must be one of {TARGETS}, got {target!r}")
    model_type = MODEL_TYPES.get(component)
    if model_type is None:
        return model
    options = fusion_options(model_type, target)
    with _tolerant_fusion_scripts():
        fused = _optimize(model, model_type, options, target)
    if target == "cpu" and model_type == "unet":
        self_attention_as_multihead(fused)
    return fused


def self_attention_as_multihead(model: onnx.ModelProto) -> int:
    """Rewrite, in place, the UNet's fused self-attention for ONNX Runtime's CPU kernels: onnxruntime's fusion
    gives each one an `Attention` node (the Q, K and V weights packed into one), whose CPU kernel materialises the
    full score matrix; `MultiHeadAttention` on separate Q, K and V tiles it (flash attention on CPU). Over SD 1.5's
    self-attentions that is 0.78x the time per UNet step at 256x256 and 0.92x at 512x512, though not at every
    level (0.46x to 1.23x; benchmarks/results/attention_kernels.md). The packed projection stays one MatMul, split
    into Q, K and V.
    Only the plain form the fusion writes is rewritten (input, weights, optional bias; `num_heads` alone): any
    mask, past state or other attribute keeps its node. Returns how many nodes were rewritten."""
    from onnx import helper, numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:  # Split's sizes as an input
        return 0
    initializers = {t.name: t for t in model.graph.initializer}
    nodes, rewritten, unused = [], 0, set()
    for node in model.graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = initializers.get(node.input[1]) if node.op_type == "Attention" and len(node.input) > 1 else None
        plain = (node.domain == "com.microsoft" and weight is not None and len(weight.dims) == 2
                 and weight.dims[1] % 3 == 0 and len(node.input) <= 3 and len(node.output) == 1
                 and set(attributes) == {"num_heads"})
        if not plain:
            nodes.append(node)
            continue
        width = weight.dims[1] // 3
        name = node.name or f"self_attention_{rewritten}"
        packed = f"{name}/qkv"
        nodes.append(helper.make_node("MatMul", [node.input[0], node.input[1]], [packed], name=f"{name}/MatMul_QKV"))
        bias = initializers.get(node.input[2]) if len(node.input) == 3 and node.input[2] else None
        if bias is not None and np.any(numpy_helper.to_array(bias)):  # the fusion writes zeros for SD's bias-free Q/K/V
            nodes.append(helper.make_node("Add", [packed, node.input[2]], [f"{packed}_biased"], name=f"{name}/Add_QKV"))
            packed = f"{packed}_biased"
        elif bias is not None:
            unused.add(bias.name)
        split = f"{name}/qkv_split"
        model.graph.initializer.append(numpy_helper.from_array(np.array([width] * 3, np.int64), split))
        q, k, v = (f"{name}/{part}" for part in "qkv")
        nodes.append(helper.make_node("Split", [packed, split], [q, k, v], name=f"{name}/Split_QKV", axis=-1))
        nodes.append(helper.make_node("MultiHeadAttention", [q, k, v], list(node.output), name=name,
                                      domain="com.microsoft", num_heads=attributes["num_heads"]))
        rewritten += 1
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        unused -= {name for node in nodes for name in node.input}
        kept = [t for t in model.graph.initializer if t.name not in unused]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return rewritten


def _optimize(model, model_type, options, target):
    from onnxruntime.transformers.optimizer import optimize_model

    from diffship.graphs.model_io import is_large, load, on_disk

    if is_large(model):
        with on_disk(model) as path:
            optimized = optimize_model(str(path), model_type=model_type, opt_level=0, optimization_options=options,
                                       use_gpu=target == "cuda")
            optimized.save_model_to_file(str(path), use_external_data_format=True)
            return load(path)
    optimized = optimize_model(model, model_type=model_type, opt_level=0, optimization_options=options,
                               use_gpu=target == "cuda")
    return optimized.model
