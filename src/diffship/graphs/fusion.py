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
    from onnxruntime.transformers.optimizer import optimize_model

    from diffship.graphs.model_io import is_large, load, on_disk

    if target not in TARGETS:
        raise ValueError(f"fusion target must be one of {TARGETS}, got {target!r}")
    model_type = MODEL_TYPES.get(component)
    if model_type is None:
        return model
    options = fusion_options(model_type, target)
    with _tolerant_fusion_scripts():
        return _optimize(model, model_type, options, target)


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
