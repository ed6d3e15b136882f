"""fp16 conversion with an op block list and overflow protection.

Weights and most activations go to fp16; the ops that lose too much in fp16 stay fp32 (casts are inserted at
the borders). Inputs and outputs keep their fp32 types unless asked, so pipelines feed the same arrays.

Overflow: fp16 tops out at 65504. The SD2 and SDXL VAE decoders carry activations past that in their
residual stream (GroupNorm brings them back before the output, so fp32 never notices), and an fp16 graph
turns them into inf and then NaN: a black image. Two protections, chosen per component:

- "fp32": the component is not converted at all (what diffusers' `force_upcast` does for the VAE);
- "mixed": run the fp32 graph on sample inputs, find every node whose output comes within a safety margin of
  the fp16 range, and keep those nodes fp32; the rest converts.
"""

from __future__ import annotations

import numpy as np
import onnx

# Reductions and normalisations accumulate in fp32 for accuracy; Resize and the range/shape helpers have no
# gain in fp16 and sometimes no fp16 kernel.
OP_BLOCK_LIST = [
    "InstanceNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "ReduceMean",
    "Pow",
    "Sqrt",
    "Range",
    "CumSum",
    "Resize",
    "Upsample",
    "RandomNormalLike",
    "Softmax",
]

# Activations above this magnitude (a quarter of fp16's max) are treated as overflow risks.
OVERFLOW_MARGIN = 65504.0 / 4


def to_float16(model: onnx.ModelProto, keep_io_types: bool = True, node_block_list: list[str] | None = None,
               op_block_list: list[str] | None = None) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from diffship.graphs.model_io import is_large

    return convert_float_to_float16(
        model,
        keep_io_types=keep_io_types,
        op_block_list=OP_BLOCK_LIST if op_block_list is None else op_block_list,
        node_block_list=node_block_list or [],
        disable_shape_infer=is_large(model),
    )


def overflowing_nodes(model: onnx.ModelProto, feeds: dict[str, np.ndarray], margin: float = OVERFLOW_MARGIN) -> list[str]:
    """Names of the nodes whose fp32 outputs exceed `margin` on `feeds` (every intermediate tensor is probed)."""
    import onnxruntime as ort

    from diffship.graphs.model_io import on_disk

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    produced_by = {}
    existing = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for out in node.output:
            if out and out not in existing:
                produced_by[out] = node.name
                probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(out))
    with on_disk(probe) as path:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, feeds)
    risky = []
    for name, value in zip(names, values):
        value = np.asarray(value)
        if name in produced_by and value.dtype.kind == "f" and value.size and np.nanmax(np.abs(value)) > margin:
            risky.append(produced_by[name])
    return sorted(set(risky))
