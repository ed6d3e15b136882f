"""ONNX Runtime's CPU kernels for the UNet's self-attention, at SD 1.5's shapes: which form `--optimize` should write.

Three graphs of one self-attention (x -> Q, K, V projections -> softmax(QK^T / sqrt(d)) V), random weights, batch 2
(classifier-free guidance), 8 heads, at each of SD 1.5's UNet levels for the image size:

- unfused:  what `diffship export` writes (three MatMuls, Reshape/Transpose, MatMul, Softmax, MatMul)
- Attention: what onnxruntime's fusion script writes for the CPU (`com.microsoft.Attention`, Q/K/V weights packed)
- MultiHeadAttention: what `--optimize --target cpu` writes since (graphs.fusion.self_attention_as_multihead: the
  packed projection as one MatMul, split, into `com.microsoft.MultiHeadAttention`)

Each graph in its own session (2 intra-op threads, or --threads), the three called in turn, round by round; medians
after a warm-up. The per-step estimate multiplies each level by its self-attentions in SD 1.5's UNet (5 at each of
the three outer levels: 2 down + 3 up; 1 in the middle block), the cross-attentions (77 text tokens) aside.

    .venv/bin/python benchmarks/attention_kernels.py        # writes benchmarks/results/attention_kernels.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from diffship.benchmarking.machine import load_average, machine_info, now, versions
from diffship.benchmarking.report import write_report
from diffship.graphs.fusion import self_attention_as_multihead

HEADS, BATCH = 8, 2
# (tokens per side of the latent divided by, channels, self-attentions per UNet step) of SD 1.5's levels
LEVELS = [(1, 320, 5), (2, 640, 5), (4, 1280, 5), (8, 1280, 1)]
FORMS = ("unfused", "Attention", "MultiHeadAttention")
OPSET = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


def _model(nodes, initializers, tokens, channels):
    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH, tokens, channels]) for name in ("x", "out")]
    return helper.make_model(helper.make_graph(nodes, "self_attention", io[:1], io[1:], initializers),
                             opset_imports=OPSET)


def graphs(tokens: int, channels: int, rng) -> dict[str, onnx.ModelProto]:
    q, k, v = ((rng.standard_normal((channels, channels)) / np.sqrt(channels)).astype(np.float32) for _ in range(3))
    head = channels // HEADS
    constants = [numpy_helper.from_array(w, n) for w, n in ((q, "wq"), (k, "wk"), (v, "wv"))] + [
        numpy_helper.from_array(np.array([BATCH, tokens, HEADS, head], np.int64), "heads"),
        numpy_helper.from_array(np.array([BATCH, tokens, channels], np.int64), "merged"),
        numpy_helper.from_array(np.array(1 / np.sqrt(head), np.float32), "scale")]
    nodes = [helper.make_node("MatMul", ["x", f"w{n}"], [n]) for n in "qkv"]
    nodes += [helper.make_node("Reshape", [n, "heads"], [f"{n}4"]) for n in "qkv"]
    nodes += [helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
              helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
              helper.make_node("MatMul", ["qt", "kt"], ["scores"]),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
              helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "vt"], ["o4"]),
              helper.make_node("Transpose", ["o4"], ["ot"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ot", "merged"], ["out"])]
    packed = [numpy_helper.from_array(np.concatenate([q, k, v], axis=1), "wqkv"),
              numpy_helper.from_array(np.zeros(3 * channels, np.float32), "bqkv")]
    attention = helper.make_node("Attention", ["x", "wqkv", "bqkv"], ["out"], name="attention",
                                 domain="com.microsoft", num_heads=HEADS)
    fused = _model([attention], packed, tokens, channels)
    multihead = _model([attention], packed, tokens, channels)
    assert self_attention_as_multihead(multihead) == 1
    return {"unfused": _model(nodes, constants, tokens, channels), "Attention": fused,
            "MultiHeadAttention": multihead}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,512", help="image sizes (SD 1.5: latent = size / 8)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "attention_kernels")
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    rng = np.random.default_rng(0)
    report = {"date": now(), "machine": machine_info(), "versions": versions(), "load_average_start": load_average(),
              "threads": args.threads, "runs": args.runs, "warmup": args.warmup, "heads": HEADS, "batch": BATCH,
              "cases": []}
    for size in (int(s) for s in args.sizes.split(",")):
        for divisor, channels, per_step in LEVELS:
            side = size // 8 // divisor
            tokens = side * side
            sessions = {form: ort.InferenceSession(model.SerializeToString(), options,
                                                   providers=["CPUExecutionProvider"])
                        for form, model in graphs(tokens, channels, rng).items()}
            feed = {"x": rng.standard_normal((BATCH, tokens, channels)).astype(np.float32)}
            outputs = {form: s.run(None, feed)[0] for form, s in sessions.items()}
            times = {form: [] for form in FORMS}
            for run in range(args.warmup + args.runs):
                for form in FORMS:
                    start = time.perf_counter()
                    sessions[form].run(None, feed)
                    if run >= args.warmup:
                        times[form].append(time.perf_counter() - start)
            case = {"size": size, "tokens": tokens, "channels": channels, "per_step": per_step,
                    "median_ms": {form: 1e3 * statistics.median(t) for form, t in times.items()},
                    "max_abs_vs_unfused": {form: float(np.abs(outputs[form] - outputs["unfused"]).max())
                                           for form in FORMS[1:]}}
            report["cases"].append(case)
            print(json.dumps(case), file=sys.stderr, flush=True)
    report["load_average_end"] = load_average()
    print(write_report(args.out, report, markdown(report)))
    return 0


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = ["# ONNX Runtime's CPU kernels for SD 1.5's self-attention", "",
             f"{report['date']} · {machine['cpu']}, {machine['cores']} cores · onnxruntime "
             f"{report['versions'].get('onnxruntime')} · {report['threads']} threads · load average "
             f"{report['load_average_start']} at start, {report['load_average_end']} at end · medians of "
             f"{report['runs']} runs after {report['warmup']} warm-up, the three forms in turn. Made by "
             "`benchmarks/attention_kernels.py`.", "",
             "One self-attention (Q/K/V projections included), batch 2, 8 heads, random weights; per step: times "
             "the level's self-attentions in SD 1.5's UNet.", "",
             "| image | tokens x channels | unfused | Attention (onnxruntime's CPU fusion) | MultiHeadAttention "
             "(diffship's) | MHA / Attention | per step: Attention -> MHA | max abs vs unfused (Attention / MHA) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for size in sorted({c["size"] for c in report["cases"]}):
        total = {form: 0.0 for form in FORMS}
        for case in (c for c in report["cases"] if c["size"] == size):
            ms = case["median_ms"]
            for form in FORMS:
                total[form] += ms[form] * case["per_step"]
            errors = case["max_abs_vs_unfused"]
            lines.append(f"| {size}x{size} | {case['tokens']} x {case['channels']} | {ms['unfused']:.1f} ms | "
                         f"{ms['Attention']:.1f} ms | {ms['MultiHeadAttention']:.1f} ms | "
                         f"{ms['MultiHeadAttention'] / ms['Attention']:.2f}x | "
                         f"{case['per_step']} x: {ms['Attention'] * case['per_step']:.0f} -> "
                         f"{ms['MultiHeadAttention'] * case['per_step']:.0f} ms | "
                         f"{errors['Attention']:.1e} / {errors['MultiHeadAttention']:.1e} |")
        lines.append(f"| {size}x{size} | **per UNet step** | {total['unfused']:.0f} ms | {total['Attention']:.0f} ms | "
                     f"{total['MultiHeadAttention']:.0f} ms | "
                     f"**{total['MultiHeadAttention'] / total['Attention']:.2f}x** | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
