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

    converted = convert_float_to_float16(
        model,
        keep_io_types=keep_io_types,
        op_block_list=OP_BLOCK_LIST if op_block_list is None else op_block_list,
        node_block_list=node_block_list or [],
        disable_shape_infer=is_large(model),
    )
    return _unique_node_names(_bypass_round_trips(_drop_duplicate_casts(converted)))


def _bypass_round_trips(model: onnx.ModelProto) -> onnx.ModelProto:
    """The converter stores every tensor in fp16 and casts around each fp32 (blocked) node, so a tensor passing
    between two blocked nodes still goes fp32 -> fp16 -> fp32, and overflows on the way. Feed such consumers
    the fp32 tensor itself, and drop the casts nothing reads any more."""
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producer = {o: n for n in model.graph.node for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}
    elem_type = {v.name: v.type.tensor_type.elem_type
                 for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    elem_type.update({t.name: t.data_type for t in model.graph.initializer})
    elem_type.update({n.output[0]: cast_to(n) for n in model.graph.node if n.op_type == "Cast"})
    rename = {}
    for node in model.graph.node:
        source = producer.get(node.input[0]) if node.input else None
        if cast_to(node) == fp32 and source is not None and cast_to(source) == fp16 \
                and elem_type.get(source.input[0]) == fp32 and node.output[0] not in graph_outputs:
            rename[node.output[0]] = source.input[0]
    if not rename:
        return model
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {i for n in model.graph.node for i in n.input} | graph_outputs
    keep = [n for n in model.graph.node if n.op_type != "Cast" or any(o in used for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def _drop_duplicate_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """The converter inserts one Cast per (tensor, blocked consumer), all named after the tensor: a tensor that
    feeds several blocked nodes gets identical Casts defining the same output twice, which onnxruntime rejects.
    They compute the same value, so the first one stays."""
    defined: dict[str, onnx.NodeProto] = {}
    keep = []
    for node in model.graph.node:
        first = next((defined[o] for o in node.output if o in defined), None)
        if first is not None and node.op_type == first.op_type == "Cast" and node.input == first.input \
                and node.attribute == first.attribute:
            continue
        defined.update({o: node for o in node.output})
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def _unique_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Several Casts can also share a node name; nothing refers to node names, so renaming is safe."""
    seen: dict[str, int] = {}
    for node in model.graph.node:
        if node.name in seen:
            seen[node.name] += 1
            node.name = f"{node.name}_{seen[node.name]}"
        else:
            seen[node.name] = 0
    return model


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
