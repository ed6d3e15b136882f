"""ONNX Runtime fusions for Stable Diffusion graphs (attention, LayerNorm, Gelu, GroupNorm, BiasSplitGelu ...).

onnxruntime's transformer optimizer knows the unet / vae / clip graph patterns. Several fused ops (GroupNorm,
BiasSplitGelu, NhwcConv, packed QKV) exist only as CUDA kernels, so the CPU target turns those off; graphs
fused for one target are not portable to the other.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx

from diffship.graphs.external_data import weights_as_inputs
from diffship.layout import (
    CONTROLNET,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    UNET_SHALLOW,
    VAE_DECODER,
    VAE_ENCODER,
)

# onnxruntime's transformer optimizer model type of each component.
MODEL_TYPES = {TEXT_ENCODER: "clip", TEXT_ENCODER_2: "clip", UNET: "unet", UNET_SHALLOW: "unet", VAE_ENCODER: "vae",
               VAE_DECODER: "vae"}
TARGETS = ("cpu", "cuda")
# The components whose traced graphs hold UNet transformer blocks' attention (attention_as_multihead).
MULTIHEAD_COMPONENTS = (UNET, UNET_SHALLOW, CONTROLNET)


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


def attention_as_multihead(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each attention of a UNet graph as traced (unfused, PyTorch 2's scaled-dot-product form
    with its default scale) into one `MultiHeadAttention` node on the Q, K and V projections' outputs: ONNX
    Runtime's CPU kernel tiles it (flash attention on CPU) where the traced form materialises every score matrix,
    about 0.8x the self-attention time per SD 1.5 UNet step at 512x512 and 0.75x at 256x256
    (benchmarks/results/attention_kernels.md, "unfused" against "MultiHeadAttention").

    onnxruntime's UNet attention fusion finds the subgraphs; where it would pack the Q, K and V weights into a new
    tensor (its `Attention` node), this writes MultiHeadAttention on the projections as they are, so no weight is
    read, copied or renamed: the graph may be loaded without its external data, the rewritten graph points at the
    same weight file, and LoRA weight swaps find the same initializers. Only the forms whose scale the matcher
    checks are rewritten (no mask, the default 1/sqrt(head size)); anything else keeps its nodes. The graph's
    inputs are kept as declared, used or not. Returns how many attentions were rewritten."""
    import sys

    from onnx import helper

    with _tolerant_fusion_scripts():
        attention_unet = sys.modules.get("fusion_attention_unet")
        if attention_unet is None:
            import onnxruntime.transformers.fusion_attention_unet as attention_unet

        class SeparateProjections(attention_unet.FusionAttentionUnet):
            def get_hidden_size(self, layernorm_node):
                return 0  # it would read the LayerNorm's bias, and MultiHeadAttention needs no hidden size

            def match_qkv_torch1(self, root_input, skip_add):
                return None  # PyTorch 1's form: the matcher does not check the scale it multiplies by

            def fuse_a1111_fp16(self, normalize_node, input_name_to_nodes, output_name_to_node):
                return False  # another exporter's fp16 form, not checked either

            def create_attention_node_lora(self, *args, **kwargs):
                return None  # LoRA branches traced beside the projections: left unfused

            def create_attention_node(self, q_matmul, k_matmul, v_matmul, num_heads, hidden_size, input, output):
                sources = [q_matmul.input[0], k_matmul.input[0], v_matmul.input[0]]
                if self.is_cross_attention:
                    matched = sources[0] == input and sources[1] == sources[2] != input
                else:
                    matched = sources == [input] * 3
                if not matched or num_heads <= 0:
                    return None
                self.increase_counter("MultiHeadAttention")
                return helper.make_node(
                    "MultiHeadAttention", [q_matmul.output[0], k_matmul.output[0], v_matmul.output[0]], [output],
                    name=self.model.create_node_name("MultiHeadAttention"), domain="com.microsoft",
                    num_heads=num_heads)

        inputs = [onnx.ValueInfoProto.FromString(i.SerializeToString()) for i in model.graph.input]
        value_info = list(model.graph.value_info)
        # Element types from ONNX's type inference, which reads no weight (onnxruntime's symbolic shape inference
        # would check the weights are there), for the Cast removal below.
        model.graph.value_info.extend(onnx.shape_inference.infer_shapes(weights_as_inputs(model)).graph.value_info)
        wrapped = sys.modules["onnx_model_unet"].UnetOnnxModel(model)
        wrapped.disable_shape_inference()
        # What onnxruntime's UNet optimizer does before its attention fusion, so that its matcher sees the form
        # it knows: the exporter's Identity and same-type Cast nodes out, Div by 1 out, constant Reshape shapes.
        wrapped.utils.remove_identity_nodes()
        wrapped.utils.remove_useless_cast_nodes()
        wrapped.preprocess()
        wrapped.fuse_reshape()
        rewritten = 0
        for cross in (False, True):
            fusion = SeparateProjections(wrapped, 0, 0, is_cross_attention=cross, enable_packed_qkv=False,
                                         enable_packed_kv=False)
            fusion.apply()
            rewritten += fusion.fused_count.get("MultiHeadAttention", 0)
    del model.graph.value_info[:]
    model.graph.value_info.extend(value_info)
    if rewritten:
        del model.graph.input[:]
        model.graph.input.extend(inputs)  # pruning drops the inputs nothing reads; the graph declares them all
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
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
