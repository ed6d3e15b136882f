"""How far a UNet call is from what the CPU can do: its FLOPs, counted from the ONNX graph, against the machine's
measured fp32 matrix-multiply peak.

FLOPs are the multiply-adds (2 FLOPs each) of Conv, ConvTranspose, MatMul and Gemm nodes, from the shapes that ONNX
shape inference gives for the concrete input sizes; normalisations, softmax and elementwise ops are left out (a few
percent). Needs the `onnx` package (diffship's export extra); the peak needs numpy, and onnxruntime if installed.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from diffship.layout import ONNX_MODEL, UNET

COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _dims(value_info) -> list[int] | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return None if any(d is None or d <= 0 for d in dims) else dims


def count_flops(onnx_path: str | os.PathLike, input_shapes: dict[str, list[int]]) -> dict:
    """{"flops": total, "by_op": {...}, "uncounted_nodes": n, "shape_inference": how} for one call of the graph with
    `input_shapes` (its dynamic dims fixed to these values). Only the graph, its shapes and its small constants are
    read, not the weights."""
    import onnx

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    _load_small_external_constants(model, onnx_path.parent)
    for graph_input in model.graph.input:
        if graph_input.name in input_shapes:
            dims = graph_input.type.tensor_type.shape.dim
            for dim, value in zip(dims, input_shapes[graph_input.name]):
                dim.Clear()
                dim.dim_value = int(value)
    model, how = _infer_shapes(model)
    shapes = {vi.name: _dims(vi) for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    shapes.update({init.name: list(init.dims) for init in model.graph.initializer})
    shapes.update({i.name: _dims(i) for i in model.graph.input})

    by_op = {op: 0 for op in COUNTED_OPS}
    uncounted = 0
    for node in model.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        inputs = [shapes.get(name) for name in node.input[:2]]
        output = shapes.get(node.output[0])
        if output is None or any(s is None for s in inputs):
            uncounted += 1
            continue
        a, b = inputs
        if node.op_type == "Conv":
            # each output element: Cin/groups * kh * kw multiply-adds; the weight is [Cout, Cin/groups, kh, kw]
            macs = math.prod(output) * math.prod(b[1:])
        elif node.op_type == "ConvTranspose":
            # each input element is scattered through Cout/groups * kh * kw taps; the weight is [Cin, Cout/g, kh, kw]
            macs = math.prod(a) * math.prod(b[1:])
        elif node.op_type == "MatMul":
            macs = math.prod(output) * a[-1]
        else:  # Gemm: [M, K] x [K, N] (either may be transposed)
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            macs = math.prod(output) * (a[0] if trans_a else a[-1])
        by_op[node.op_type] += 2 * macs
    return {"flops": sum(by_op.values()), "by_op": by_op, "uncounted_nodes": uncounted, "shape_inference": how}


def _load_small_external_constants(model, folder: Path, max_elements: int = 1024) -> None:
    """Shape constants (Reshape targets and the like) in the external data file are read into the graph: shape
    inference needs their values. The weights become graph inputs of their shape: it needs only that."""
    from onnx import helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    weights = []
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        if math.prod(tensor.dims) <= max_elements:
            load_external_data_for_tensor(tensor, str(folder))
            tensor.data_location = 0  # DEFAULT: the data is in the proto now
            del tensor.external_data[:]
        else:
            weights.append(tensor)
    for tensor in weights:
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        model.graph.initializer.remove(tensor)


def _infer_shapes(model):
    """ONNX Runtime's symbolic shape inference (follows the Shape -> Reshape chains of attention heads), else
    onnx's own with data propagation (which leaves the attention MatMuls of exported UNets unresolved)."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(model, auto_merge=True), "onnxruntime symbolic"
    except Exception:  # sympy missing, or an op it does not know
        from onnx import shape_inference

        return shape_inference.infer_shapes(model, data_prop=True), "onnx data_prop"


def unet_input_shapes(batch: int, height: int, width: int, in_channels: int = 4, sequence: int = 77,
                      cross_attention_dim: int = 768, vae_scale_factor: int = 8) -> dict[str, list[int]]:
    """The UNet's inputs for `batch` latents (twice the images with classifier-free guidance)."""
    return {"sample": [batch, in_channels, height // vae_scale_factor, width // vae_scale_factor],
            "encoder_hidden_states": [batch, sequence, cross_attention_dim], "timestep": []}


def unet_flops(model_dir: str | os.PathLike, batch: int, height: int, width: int) -> dict | None:
    """FLOPs of one call of an exported directory's unet/model.onnx; None if it has no ONNX graph."""
    from diffship.benchmarking import _config, vae_scale_factor

    graph = Path(model_dir) / UNET / ONNX_MODEL
    if not graph.is_file():
        return None
    config = _config(model_dir, UNET)
    shapes = unet_input_shapes(batch, height, width, config.get("in_channels", 4), 77,
                               config.get("cross_attention_dim", 768), vae_scale_factor(model_dir))
    counted = count_flops(graph, shapes)
    counted["input_shapes"] = shapes
    return counted


def _best_rate(fn, flops: float, seconds: float) -> float:
    """The best GFLOP/s of repeated calls of `fn` within about `seconds`."""
    fn()  # warm-up: thread pools, packing
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        best = max(best, flops / (time.perf_counter() - start) / 1e9)
    return best


def matmul_peak(n: int = 2048, seconds: float = 3.0, threads: int | None = None) -> dict:
    """The machine's fp32 peak as the best of numpy's BLAS and ONNX Runtime's MatMul on an n x n x n product."""
    import numpy as np

    threads = threads or os.cpu_count() or 1
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n**3
    out = {"n": n, "threads": threads, "numpy_gflops": _best_rate(lambda: a @ b, flops, seconds)}
    try:
        import onnxruntime as ort

        out["onnxruntime_gflops"] = _best_rate(_ort_matmul(ort, a, b, threads), flops, seconds)
    except ImportError:
        out["onnxruntime_gflops"] = None
    out["peak_gflops"] = max(v for k, v in out.items() if k.endswith("_gflops") and v)
    return out


def _ort_matmul(ort, a, b, threads: int):
    """A one-node MatMul graph run by ONNX Runtime's CPU provider (MLAS, the kernels its Conv and MatMul use)."""
    graph = _matmul_model_bytes(a.shape[0], a.shape[1], b.shape[1])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"A": a, "B": b})


def _matmul_model_bytes(m: int, k: int, n: int) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, [k, n])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [m, n])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
