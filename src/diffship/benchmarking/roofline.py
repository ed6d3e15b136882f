"""How far a UNet call is from what the CPU can do: its FLOPs, counted from the ONNX graph, against the machine's
measured matrix-multiply peak in the precision the UNet ran in (fp32, bf16 or int8; `precision_peaks`), each peak
with the instruction sets that give it (AMX, AVX512-BF16, VNNI: `isa_support`).

FLOPs are the multiply-adds (2 FLOPs each) of Conv, ConvTranspose, MatMul and Gemm nodes, from the shapes that ONNX
shape inference gives for the concrete input sizes; normalisations, softmax and elementwise ops are left out (a few
percent). Needs the `onnx` package (diffship's export extra); the peaks need numpy, and use onnxruntime and openvino
where installed (the bf16 peak is OpenVINO's: without it there is none).
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path

from diffship.layout import ONNX_MODEL, OPENVINO_MODEL, UNET

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

    from diffship.graphs.external_data import weights_as_inputs

    onnx_path = Path(onnx_path)
    model = weights_as_inputs(onnx.load(str(onnx_path), load_external_data=False), onnx_path.parent)
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
    """The machine's fp32 peak as the best of numpy's BLAS, ONNX Runtime's MatMul and OpenVINO's (f32 inference
    precision), those installed, on an n x n x n product."""
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
    try:
        run, out["openvino_kernel"], _ = _ov_matmul(a, b, threads, "f32")
        out["openvino_gflops"] = _best_rate(run, flops, seconds)
    except ImportError:
        out["openvino_gflops"] = None
    out["peak_gflops"] = max(v for k, v in out.items() if k.endswith("_gflops") and v)
    return out


def _ort_matmul(ort, a, b, threads: int):
    """A one-node graph run by ONNX Runtime's CPU provider (MLAS, the kernels its Conv and MatMul use): MatMul for
    float inputs, MatMulInteger (u8 x i8, int32 out) for integer ones."""
    graph = _matmul_model_bytes(a.shape[0], a.shape[1], b.shape[1], integer=a.dtype.kind in "iu")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"A": a, "B": b})


def _matmul_model_bytes(m: int, k: int, n: int, integer: bool = False) -> bytes:
    from onnx import TensorProto, helper

    op, a_type, b_type, c_type = (("MatMulInteger", TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32)
                                  if integer else ("MatMul", TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT))
    graph = helper.make_graph(
        [helper.make_node(op, ["A", "B"], ["C"])], "matmul",
        [helper.make_tensor_value_info("A", a_type, [m, k]), helper.make_tensor_value_info("B", b_type, [k, n])],
        [helper.make_tensor_value_info("C", c_type, [m, n])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


# ---- the peaks of each precision ----------------------------------------------------------------------------------

# The instructions that make each precision fast, as /proc/cpuinfo names them, best first. Where none is present the
# runtimes still run that precision (converting to f32, or with plain AVX-512 / AVX2 arithmetic): the peak measured
# then is what the fallback gives, and is labelled so.
PRECISION_ISA = {
    "f32": ("avx512f", "avx2", "fma"),
    "bf16": ("amx_bf16", "avx512_bf16"),
    "int8": ("amx_int8", "avx512_vnni", "avx_vnni"),
}
ISA_NAMES = {"avx512f": "AVX-512", "avx2": "AVX2", "fma": "FMA", "amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16",
             "amx_int8": "AMX-INT8", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI"}
# OpenVINO's INFERENCE_PRECISION_HINT and the other ways a worker names a precision -> the peak it is held against.
_PRECISION_NAMES = {"bf16": "bf16", "bfloat16": "bf16", "f16": "f16", "fp16": "f16", "float16": "f16",
                    "f32": "f32", "fp32": "f32", "float32": "f32", "int8": "int8", "i8": "int8", "u8": "int8"}
# ONNX ops that compute on int8 activations (weight-only formats, DequantizeLinear and MatMulNBits, compute in f32).
_ONNX_INT8_OPS = ("DynamicQuantizeLinear", "QuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul",
                  "QLinearConv")


def isa_support(flags=None) -> dict:
    """{precision: {"features": present ISA flags, best first, "native": any present, "label": what computes it}}.
    `flags`: the CPU's flags (default: /proc/cpuinfo's, as diffship.benchmarking.machine reads them)."""
    from diffship.benchmarking.machine import cpu_flags

    flags = set(cpu_flags() if flags is None else flags)
    out = {}
    for precision, wanted in PRECISION_ISA.items():
        present = [f for f in wanted if f in flags]
        label = (" + ".join(ISA_NAMES[f] for f in present) if present else
                 f"no {precision} instructions ({', '.join(ISA_NAMES[f] for f in wanted)} absent): the runtime falls "
                 "back, and this peak is the fallback's")
        out[precision] = {"features": present, "native": bool(present), "label": label}
    return out


def precision_peaks(n: int = 2048, seconds: float = 3.0, threads: int | None = None, flags=None) -> dict:
    """The machine's matmul peak per precision, measured on an n x n x n product, each with the ISA features that
    give it: {"f32": matmul_peak(...) + features, "bf16": {...} (OpenVINO only, absent without it), "int8": {...}}.

    bf16: an OpenVINO MatMul compiled with INFERENCE_PRECISION_HINT bf16 (AMX or AVX512-BF16 where present).
    int8: the best of an OpenVINO MatMul with FakeQuantize on both inputs (the CPU plugin's low-precision
    transformations run it as a u8 x i8 GEMM: AMX-INT8 or VNNI) and ONNX Runtime's MatMulInteger (MLAS's u8 x i8
    GEMM). Each entry names the kernel OpenVINO picked ("brgemm_avx512_amx_bf16": what really ran)."""
    import numpy as np

    threads = threads or os.cpu_count() or 1
    support = isa_support(flags)
    f32 = matmul_peak(n, seconds, threads)
    peaks = {"f32": {**f32, **support["f32"], "gflops": f32["peak_gflops"]}}
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n**3
    int8 = {"n": n, "threads": threads, **support["int8"], "openvino_gflops": None}
    if importlib.util.find_spec("openvino") is not None:
        run, kernel, compiled = _ov_matmul(a, b, threads, "bf16")
        rate = _best_rate(run, flops, seconds)
        bf16 = {"n": n, "threads": threads, **support["bf16"], "gflops": rate, "openvino_gflops": rate,
                "openvino_kernel": kernel, "compiled_precision": compiled}
        if compiled != "bf16":  # the plugin has no bf16 here: it compiled the hint as f32
            bf16["label"] += f"; OpenVINO compiled the bf16 hint as {compiled}"
        peaks["bf16"] = bf16
        run, kernel, _ = _ov_matmul(np.abs(a), b, threads, None, quantized=True)
        int8["openvino_gflops"], int8["openvino_kernel"] = _best_rate(run, flops, seconds), kernel
    try:
        import onnxruntime as ort
    except ImportError:
        int8["onnxruntime_gflops"] = None
    else:
        a8 = rng.integers(0, 256, (n, n), dtype=np.uint8)
        b8 = rng.integers(-128, 128, (n, n), dtype=np.int8)
        int8["onnxruntime_gflops"] = _best_rate(_ort_matmul(ort, a8, b8, threads), flops, seconds)
    rates = [v for k, v in int8.items() if k.endswith("_gflops") and v]
    if rates:
        int8["gflops"] = max(rates)
        peaks["int8"] = int8
    return peaks


def _ov_matmul(a, b, threads: int, hint: str | None, quantized: bool = False):
    """(run, kernel, compiled precision) of a one-MatMul OpenVINO model built in memory: A a parameter, B a constant
    (as a layer's weight is); with `quantized`, FakeQuantize (256 levels) on both, u8 for A (given >= 0), i8 for B,
    which the CPU plugin's low-precision transformations turn into an int8 GEMM. `kernel`: the primitive the plugin
    picked for the MatMul (e.g. "brgemm_avx512_amx_bf16")."""
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops

    param = ops.parameter(list(a.shape), ov.Type.f32, name="A")
    x, w = param, ops.constant(b)
    if quantized:
        def fake_quantize(node, low, high):
            low, high = (ops.constant(np.array(v, np.float32)) for v in (low, high))
            return ops.fake_quantize(node, low, high, low, high, 256)

        scale = float(np.abs(b).max()) / 127
        x, w = fake_quantize(x, 0.0, float(a.max())), fake_quantize(w, -128 * scale, 127 * scale)
    model = ov.Model([ops.matmul(x, w, False, False)], [param], "matmul")
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    compiled = ov.Core().compile_model(model, "CPU", config)
    kernel = None
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) in ("MatMul", "FullyConnected"):
            kernel = info["primitiveType"].astype(str) if "primitiveType" in info else None
    request = compiled.create_infer_request()
    return (lambda: request.infer({0: a})), kernel, _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))


def _precision_name(value) -> str | None:
    """"bf16", "f32", ... from what a runtime or a worker says ("<Type: 'bfloat16'>", "bf16", "f32")."""
    text = str(value).lower()
    for token in text.replace("'", " ").replace("<", " ").replace(">", " ").replace(":", " ").split():
        if token in _PRECISION_NAMES:
            return _PRECISION_NAMES[token]
    return None


def unet_precision(result: dict, model_dir: str | os.PathLike | None = None) -> str:
    """The precision a benchmark result's UNet ran in: "int8" where its graph quantizes activations (the UNet file
    of `model_dir` on the result's backend), else the inference precision the worker reported (OpenVINO's
    INFERENCE_PRECISION_HINT, from diffship's session settings or Optimum Intel's compiled model), else the
    precision the contestant was declared with, else f32 (ONNX Runtime and PyTorch compute fp32 graphs in f32)."""
    if model_dir is not None and unet_quantizes_activations(model_dir, result.get("backend")):
        return "int8"
    info = result.get("info") or {}
    reported = ((info.get("unet_session") or {}).get("INFERENCE_PRECISION_HINT")
                or info.get("unet_inference_precision") or (info.get("inference_precisions") or {}).get(UNET))
    return _precision_name(reported) or _precision_name(result.get("precision")) or "f32"


def unet_quantizes_activations(model_dir: str | os.PathLike, backend: str | None) -> bool:
    """Whether the UNet graph that `backend` runs from `model_dir` computes on int8 activations: FakeQuantize in
    OpenVINO's IR (NNCF's hybrid/full quantization; weight-only compression has none), or an int8-activation op in
    the ONNX graph. Read as bytes (op names are length-prefixed strings in the ONNX protobuf), without loading."""
    folder = Path(model_dir) / UNET
    if backend == "openvino":
        return _file_contains(folder / OPENVINO_MODEL, [b'type="FakeQuantize"'])
    if backend == "onnxruntime":
        return _file_contains(folder / ONNX_MODEL, [b'"' + bytes([len(op)]) + op.encode() for op in _ONNX_INT8_OPS])
    return False


def _file_contains(path: Path, needles: list[bytes], chunk: int = 1 << 24) -> bool:
    if not path.is_file():
        return False
    overlap = max(len(n) for n in needles) - 1
    tail = b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            window = tail + block
            if any(n in window for n in needles):
                return True
            tail = window[-overlap:]
    return False
