"""ONNX Runtime dynamic int8 quantization: MatMul / Gemm weights stored int8, activations quantized per call.

Convolutions stay fp32: dynamic quantization of Conv is slow on CPU and hurts UNet quality most.
"""

from __future__ import annotations

import onnx


def quantize_int8_dynamic(model: onnx.ModelProto, per_channel: bool = True) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from diffship.graphs.model_io import is_large, load, on_disk

    with on_disk(model) as source:
        target = source.with_name("quantized.onnx")
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=["MatMul", "Gemm"],
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            use_external_data_format=is_large(model),
        )
        return load(target)


def quantize_int4_matmul(model: onnx.ModelProto, block_size: int = 32) -> onnx.ModelProto:
    """4-bit blockwise weights for MatMul (onnxruntime's MatMulNBits, which has CPU and CUDA kernels)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True)
    quantizer.process()
    return quantizer.model.model
