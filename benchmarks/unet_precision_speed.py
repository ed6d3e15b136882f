"""UNet step latency and size per precision / optimisation configuration, full-size SD1.5 architecture, CPU.

The SD1.5 UNet (random weights: latency does not depend on weight values) at 256x256 (latents 32x32), batch 2 as
with classifier-free guidance, against torch eager (diffusers' UNet2DConditionModel, same threads) in the same run.

Two phases, so that only the timing holds the machine's benchmark lock:

    python benchmarks/unet_precision_speed.py build                               # variants -> out/precision-bench/
    flock /tmp/diffship-bench.lock python benchmarks/unet_precision_speed.py time  # -> results/precision_speed.*

`build` starts from the fp32 export (out/full-size-export/unet: model.onnx and openvino_model.xml, dynamic shapes;
`diffship tiny-model out/full-size --kind full-size` then `diffship export out/full-size out/full-size-export
--backend onnx,openvino --height 256 --width 256`) and applies diffship's own pass functions, one variant per
folder, in the order `diffship export` chains them: cleanup, graphs.fusion (cpu), graphs.float16.to_float16,
graphs.quantize (ORT dynamic int8, int4 MatMulNBits), exporters.openvino (fp16 IR, NNCF int8 / int4 weights,
hybrid int8 calibrated on UNet inputs captured from the PyTorch pipeline). Two of them run through this script's
past-2-GB variants: `cleanup_large` (graphs.cleanup.cleanup fails on the 3.4 GB UNet, see its docstring) and
`fuse_from_file` (the same fusion, from the file, to stay within the machine's memory). Variants already built are
kept.

`time` loads one configuration at a time (a full-size fp32 session holds ~3.5 GB), checks its output against torch
on one fixed input (max abs, max rel = max abs / max |torch output|), then alternates torch and the configuration
call by call after warm-up; the figure is the median, and the ratio compares it with torch's median over the
same window. OpenVINO static-shape variants (reshape to the benchmark's shapes) are timed for the best two
dynamic OpenVINO configurations.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "out" / "full-size"
SOURCE = ROOT / "out" / "full-size-export" / "unet"
WORK = ROOT / "out" / "precision-bench"
THREADS = 2
# Pause before each timed call: onnxruntime's intra-op threads spin-wait after a run (and OpenMP's / TBB's
# briefly too), which on 2 cores slows whichever runtime is called next; the pause keeps the alternation fair.
PAUSE_S = 0.5
SHAPES = {"sample": (2, 4, 32, 32), "timestep": (), "encoder_hidden_states": (2, 77, 768)}
CALIBRATION_PROMPTS = ("a photo of an astronaut riding a horse on the moon", "a red circle on the left")
CALIBRATION_STEPS = 3

# name: (backend, label, how it is made, session options)
CONFIGS = {
    "ort-fp32": ("onnxruntime", "fp32", "the fp32 export as it is", {}),
    "ort-fp32-optimized": ("onnxruntime", "fp32 optimized (cleanup + CPU fusions)", "cleanup -> ort_fusions_cpu", {}),
    "ort-fp16": ("onnxruntime", "fp16", "cleanup -> fp16", {}),
    "ort-int8": ("onnxruntime", "int8 dynamic (MatMul)", "int8_dynamic", {}),
    "ort-int8-optimized": ("onnxruntime", "int8 dynamic, optimized", "cleanup -> ort_fusions_cpu -> int8_dynamic", {}),
    "ort-int4": ("onnxruntime", "int4 MatMulNBits (others fp32)", "int4_matmul", {}),
    "ort-int4-acc4": ("onnxruntime", "int4 MatMulNBits, accuracy_level=4", "int4_matmul, then accuracy_level=4 "
                      "(int8 compute) set on every MatMulNBits", {}),
    "ov-fp32": ("openvino", "fp32 IR, f32 inference", "the fp32 export as it is", {"inference_precision": "f32"}),
    "ov-fp32-bf16": ("openvino", "fp32 IR, bf16 inference", "the fp32 export as it is",
                     {"inference_precision": "bf16"}),
    "ov-fp16": ("openvino", "fp16 IR, f32 inference", "fp16_ir", {"inference_precision": "f32"}),
    "ov-fp16-bf16": ("openvino", "fp16 IR, bf16 inference", "fp16_ir", {"inference_precision": "bf16"}),
    "ov-int8": ("openvino", "int8 weights, f32 inference", "nncf_int8_weights", {"inference_precision": "f32"}),
    "ov-int8-bf16": ("openvino", "int8 weights, bf16 inference", "nncf_int8_weights", {"inference_precision": "bf16"}),
    "ov-int4": ("openvino", "int4 weights, f32 inference", "nncf_int4_weights", {"inference_precision": "f32"}),
    "ov-int4-bf16": ("openvino", "int4 weights, bf16 inference", "nncf_int4_weights", {"inference_precision": "bf16"}),
    "ov-hybrid": ("openvino", "hybrid int8, f32 inference", "nncf_hybrid_int8", {"inference_precision": "f32"}),
    "ov-hybrid-bf16": ("openvino", "hybrid int8, bf16 inference", "nncf_hybrid_int8", {"inference_precision": "bf16"}),
}
# where each configuration's graph lives (several configurations share one graph)
GRAPHS = {
    "ort-fp32": SOURCE / "model.onnx",
    "ort-fp32-optimized": WORK / "ort-fp32-optimized" / "model.onnx",
    "ort-fp16": WORK / "ort-fp16" / "model.onnx",
    "ort-int8": WORK / "ort-int8" / "model.onnx",
    "ort-int8-optimized": WORK / "ort-int8-optimized" / "model.onnx",
    "ort-int4": WORK / "ort-int4" / "model.onnx",
    "ort-int4-acc4": WORK / "ort-int4-acc4" / "model.onnx",
    "ov-fp32": SOURCE / "openvino_model.xml",
    "ov-fp32-bf16": SOURCE / "openvino_model.xml",
    "ov-fp16": WORK / "ov-fp16" / "openvino_model.xml",
    "ov-fp16-bf16": WORK / "ov-fp16" / "openvino_model.xml",
    "ov-int8": WORK / "ov-int8" / "openvino_model.xml",
    "ov-int8-bf16": WORK / "ov-int8" / "openvino_model.xml",
    "ov-int4": WORK / "ov-int4" / "openvino_model.xml",
    "ov-int4-bf16": WORK / "ov-int4" / "openvino_model.xml",
    "ov-hybrid": WORK / "ov-hybrid" / "openvino_model.xml",
    "ov-hybrid-bf16": WORK / "ov-hybrid" / "openvino_model.xml",
}


def rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def size_on_disk(graph: Path) -> int:
    files = [graph]
    if graph.suffix == ".onnx":  # diffship writes model.onnx_data; onnxruntime's optimizer model.onnx.data
        files += [graph.with_name("model.onnx_data"), graph.with_name("model.onnx.data")]
    else:
        files += [graph.with_suffix(".bin")]
    return sum(f.stat().st_size for f in files if f.is_file())


# ---------------------------------------------------------------------------------------------------- build


def _onnx_step(name: str, source: Path, transform) -> None:
    import onnx

    from diffship.graphs.external_data import save_model

    target = WORK / name / "model.onnx"
    model = onnx.load(str(source), load_external_data=True)
    model = transform(model)
    scratch = WORK / f".{name}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    save_model(model, scratch / "model.onnx")
    del model
    gc.collect()
    shutil.rmtree(target.parent, ignore_errors=True)
    scratch.rename(target.parent)


def _ov_step(name: str, transform, compress_to_fp16: bool = False) -> None:
    import openvino as ov

    from diffship.exporters import openvino as ov_export

    model = ov.Core().read_model(str(SOURCE / "openvino_model.xml"))
    model = transform(model)
    scratch = WORK / f".{name}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    ov_export.save(model, scratch, compress_to_fp16=compress_to_fp16)
    del model
    gc.collect()
    shutil.rmtree(WORK / name, ignore_errors=True)
    scratch.rename(WORK / name)


def cleanup_large(model):
    """diffship.graphs.cleanup.cleanup, as it would work past 2 GB. diffship's own fails on the full-size UNet
    (onnxslim 0.1.98's symbolic shape inference raises UnboundLocalError on LayerNormalization, and its fallback
    calls ModelProto.ByteSize(), which protobuf refuses past 2 GB): shape inference runs through a file and
    onnxslim only folds and prunes. Reported as a diffship bug with this as the fix."""
    import onnxslim

    from diffship.graphs.cleanup import infer_shapes

    return infer_shapes(onnxslim.slim(infer_shapes(model), no_shape_infer=True))


def fuse_from_file(name: str, source: Path) -> None:
    """graphs.fusion.fuse_for_onnxruntime(model, "unet", "cpu"), run on the file: the same optimizer, options and
    NumPy-compatibility patches as its past-2-GB branch, without an extra in-memory copy of the 3.4 GB graph
    (the in-memory route peaked above 18 GB here)."""
    from onnxruntime.transformers.optimizer import optimize_model

    from diffship.graphs.fusion import _tolerant_fusion_scripts, fusion_options

    scratch = WORK / f".{name}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    with _tolerant_fusion_scripts():
        optimized = optimize_model(str(source), model_type="unet", opt_level=0,
                                   optimization_options=fusion_options("unet", "cpu"), use_gpu=False)
        optimized.save_model_to_file(str(scratch / "model.onnx"), use_external_data_format=True)
    del optimized
    gc.collect()
    shutil.rmtree(WORK / name, ignore_errors=True)
    scratch.rename(WORK / name)


def _set_accuracy_level(model, level: int = 4):
    import onnx

    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in list(node.attribute):
                if attribute.name == "accuracy_level":
                    node.attribute.remove(attribute)
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    return model


def calibration_feeds() -> list[dict]:
    from diffship.exporters.calibration import unet_calibration_feeds
    from diffship.exporters.loading import load_reference_pipeline

    pipe = load_reference_pipeline(MODEL)
    feeds = unet_calibration_feeds(pipe, 256, 256, prompts=CALIBRATION_PROMPTS, num_inference_steps=CALIBRATION_STEPS)
    del pipe
    gc.collect()
    return feeds


def build(only: list[str] | None) -> None:
    from diffship.exporters import openvino as ov_export
    from diffship.graphs.float16 import to_float16
    from diffship.graphs.quantize import quantize_int4_matmul, quantize_int8_dynamic

    if not (SOURCE / "model.onnx").is_file() or not (SOURCE / "openvino_model.xml").is_file():
        raise SystemExit(f"{SOURCE} needs model.onnx and openvino_model.xml (see this script's docstring)")
    WORK.mkdir(parents=True, exist_ok=True)
    log_path = WORK / "build.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    cleaned = WORK / "_cleaned" / "model.onnx"
    steps = [
        ("_cleaned", lambda: _onnx_step("_cleaned", SOURCE / "model.onnx", cleanup_large)),
        ("ort-fp32-optimized", lambda: fuse_from_file("ort-fp32-optimized", cleaned)),
        ("ort-fp16", lambda: _onnx_step("ort-fp16", cleaned, to_float16)),
        ("ort-int8", lambda: _onnx_step("ort-int8", SOURCE / "model.onnx", quantize_int8_dynamic)),
        ("ort-int8-optimized", lambda: _onnx_step("ort-int8-optimized", WORK / "ort-fp32-optimized" / "model.onnx",
                                                  quantize_int8_dynamic)),
        ("ort-int4", lambda: _onnx_step("ort-int4", SOURCE / "model.onnx", quantize_int4_matmul)),
        ("ort-int4-acc4", lambda: _onnx_step("ort-int4-acc4", WORK / "ort-int4" / "model.onnx", _set_accuracy_level)),
        ("ov-fp16", lambda: _ov_step("ov-fp16", lambda m: m, compress_to_fp16=True)),
        ("ov-int8", lambda: _ov_step("ov-int8", lambda m: ov_export.compress_weights(m, "int8"))),
        ("ov-int4", lambda: _ov_step("ov-int4", lambda m: ov_export.compress_weights(m, "int4"))),
        ("ov-hybrid", lambda: _ov_step("ov-hybrid", lambda m: ov_export.hybrid_quantize(m, calibration_feeds()))),
    ]
    for name, make in steps:
        done = (WORK / name).is_dir()
        if (only and name not in only) or (done and not only):
            continue
        start = time.perf_counter()
        print(f"build {name} ...", flush=True)
        make()
        log[name] = {"build_s": round(time.perf_counter() - start, 1), "rss_gb_after": round(rss_gb(), 2)}
        print(f"build {name}: {log[name]['build_s']} s", flush=True)
        log_path.write_text(json.dumps(log, indent=2) + "\n")
    # the cleaned fp32 graph is only an intermediate
    if all((WORK / n).is_dir() for n in ("ort-fp32-optimized", "ort-fp16")) and not only:
        shutil.rmtree(WORK / "_cleaned", ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- time


def fixed_feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "sample": rng.standard_normal(SHAPES["sample"]).astype(np.float32),
        "timestep": np.asarray(500.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal(SHAPES["encoder_hidden_states"]).astype(np.float32),
    }


class TorchUNet:
    def __init__(self):
        import torch
        from diffusers import UNet2DConditionModel

        torch.set_num_threads(THREADS)
        self.torch = torch
        self.model = UNet2DConditionModel.from_pretrained(MODEL / "unet", torch_dtype=torch.float32).eval()

    def run(self, feeds):
        torch = self.torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"]),
                             encoder_hidden_states=torch.from_numpy(feeds["encoder_hidden_states"])).sample
        return {"out_sample": out.numpy()}


def open_session(name: str, static: bool = False):
    backend, _, _, options = CONFIGS[name]
    graph = GRAPHS[name]
    if backend == "onnxruntime":
        from diffship.runtimes.onnxruntime import OnnxRuntimeSession

        return OnnxRuntimeSession(graph, intra_op_num_threads=THREADS)
    from diffship.runtimes.openvino import OpenVINOSession

    session = OpenVINOSession(graph, config={"INFERENCE_NUM_THREADS": THREADS}, **options)
    if static:
        session.reshape(SHAPES)
    return session


def timed(fn, feeds) -> tuple[float, dict]:
    start = time.perf_counter()
    out = fn(feeds)
    return time.perf_counter() - start, out


def measure(name: str, torch_unet, feeds, reference, budget_s: float, torch_s: float, static: bool = False) -> dict:
    backend, label, how, options = CONFIGS[name]
    row = {"config": name + ("-static" if static else ""), "backend": backend,
           "label": label + (", static shapes" if static else ""), "made_by": how, "graph": str(GRAPHS[name].relative_to(ROOT)),
           "size_bytes": size_on_disk(GRAPHS[name]), "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    start = time.perf_counter()
    session = open_session(name, static)
    row["load_s"] = round(time.perf_counter() - start, 2)
    first, out = timed(session.run, feeds)  # OpenVINO compiles here
    row["first_call_s"] = round(first, 2)
    got = out["out_sample"].astype(np.float32)
    err = np.abs(got - reference)
    row["max_abs"] = float(np.nanmax(err))
    row["max_rel"] = row["max_abs"] / float(np.max(np.abs(reference)))
    row["nan"] = int(np.isnan(got).sum())
    warm, _ = timed(session.run, feeds)
    runs = 7 if warm < 3 else (5 if warm < 8 else 3)
    runs = max(3, min(runs, int(budget_s / (warm + torch_s))))
    ours, theirs = [], []
    for i in range(runs):
        pair = [("torch", torch_unet.run), ("ours", session.run)]
        if i % 2:
            pair.reverse()
        for who, fn in pair:
            time.sleep(PAUSE_S)  # let the other runtime's worker threads stop spinning before this call
            seconds, _ = timed(fn, feeds)
            (theirs if who == "torch" else ours).append(seconds)
    row["rss_gb"] = round(rss_gb(), 2)
    del session
    gc.collect()
    row.update(
        runs=runs,
        median_ms=round(statistics.median(ours) * 1e3, 1),
        min_ms=round(min(ours) * 1e3, 1),
        torch_median_ms_same_window=round(statistics.median(theirs) * 1e3, 1),
        samples_ms=[round(s * 1e3, 1) for s in ours],
        torch_samples_ms=[round(s * 1e3, 1) for s in theirs],
    )
    row["speedup_vs_torch"] = round(row["torch_median_ms_same_window"] / row["median_ms"], 2)
    row["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"{row['config']:<24} {row['median_ms']:>9.1f} ms  torch {row['torch_median_ms_same_window']:>8.1f} ms  "
          f"x{row['speedup_vs_torch']:.2f}  max_rel {row['max_rel']:.1e}  {row['size_bytes'] / 2**20:,.0f} MB  "
          f"rss {row['rss_gb']} GB  load {row['load_average_after'][0]}", flush=True)
    return row


def machine() -> dict:
    import importlib.metadata as md

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    versions = {}
    for name in ("diffship", "torch", "diffusers", "onnx", "onnxruntime", "openvino", "nncf", "onnxslim", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads_used": THREADS, "platform": platform.platform(),
            "python": platform.python_version(),
            "isa": [f for f in flags if f.startswith(("avx512_bf16", "avx512_vnni", "avx_vnni", "amx", "avx512_fp16",
                                                      "avx512f", "avx2"))],
            "versions": versions, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def time_all(only: list[str] | None, budget_s: float, out_dir: Path) -> None:
    start = time.perf_counter()
    missing = [n for n in CONFIGS if not GRAPHS[n].is_file()]
    if missing:
        raise SystemExit(f"not built: {missing}; run `python {sys.argv[0]} build` first")
    result = {"benchmark": "unet_precision_speed", "model": "SD1.5 UNet architecture, random weights",
              "shapes": {k: list(v) for k, v in SHAPES.items()}, "pause_s": PAUSE_S, "machine": machine()}
    feeds = fixed_feeds()
    t0 = time.perf_counter()
    torch_unet = TorchUNet()
    torch_load = time.perf_counter() - t0
    reference = torch_unet.run(feeds)["out_sample"]
    warm = [timed(torch_unet.run, feeds)[0] for _ in range(2)]
    torch_s = min(warm)
    result["reference_max_abs"] = round(float(np.max(np.abs(reference))), 4)
    print(f"torch eager: load {torch_load:.1f} s, warm-up {[round(w, 2) for w in warm]} s", flush=True)
    torch_row = {"config": "torch-eager", "backend": "torch", "label": "torch eager (diffusers, inference_mode)",
                 "size_bytes": (MODEL / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size,
                 "load_s": round(torch_load, 2), "max_abs": 0.0, "max_rel": 0.0, "nan": 0}
    rows = []
    names = [n for n in CONFIGS if not only or n in only]
    for name in names:
        try:
            rows.append(measure(name, torch_unet, feeds, reference, budget_s, torch_s))
        except Exception as e:  # a configuration that fails is reported, not fatal
            rows.append({"config": name, "backend": CONFIGS[name][0], "label": CONFIGS[name][1],
                         "error": " ".join(str(e).split())[:500]})
            print(f"{name}: FAILED {rows[-1]['error']}", flush=True)
    ov_rows = sorted((r for r in rows if r["backend"] == "openvino" and "median_ms" in r),
                     key=lambda r: r["median_ms"])
    for best in ov_rows[:2]:
        rows.append(measure(best["config"], torch_unet, feeds, reference, budget_s, torch_s, static=True))
    all_torch = [s for r in rows for s in r.get("torch_samples_ms", [])]
    torch_row.update(median_ms=round(statistics.median(all_torch), 1), min_ms=round(min(all_torch), 1),
                     runs=len(all_torch), torch_median_ms_same_window=round(statistics.median(all_torch), 1),
                     speedup_vs_torch=1.0)
    result["torch"] = torch_row
    result["rows"] = rows
    timed_rows = [r for r in rows if "median_ms" in r]
    best = max(timed_rows, key=lambda r: r["speedup_vs_torch"])
    result["best"] = {"config": best["config"], "label": best["label"], "backend": best["backend"],
                      "speedup_vs_torch": best["speedup_vs_torch"], "target": 2.0,
                      "target_met": best["speedup_vs_torch"] >= 2.0}
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["run_time_s"] = round(time.perf_counter() - start, 1)
    build_log = WORK / "build.json"
    result["build"] = json.loads(build_log.read_text()) if build_log.is_file() else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "precision_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "precision_speed.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    m = result["machine"]
    t = result["torch"]
    best = result["best"]
    build = result.get("build") or {}
    build_s = sum(v["build_s"] for v in build.values())
    lines = [
        "# UNet step latency and size per precision (full-size SD1.5 architecture, CPU)",
        "",
        "SD1.5 UNet architecture with random weights, 256x256 images (latents 32x32), batch 2 (classifier-free "
        f"guidance), {m['threads_used']} threads everywhere (torch.set_num_threads, ORT intra_op_num_threads, OpenVINO "
        "INFERENCE_NUM_THREADS). One configuration is loaded at a time; after a warm-up call, it and torch eager "
        "alternate call by call, and the speed-up is torch's median over the same window divided by the "
        "configuration's median. Size = graph + weights on disk. Error = against torch on one fixed input "
        f"(max abs; max rel = max abs / max |torch output|, which is {result.get('reference_max_abs', '?')}). "
        "Built from the fp32 export with diffship's pass functions (`python benchmarks/unet_precision_speed.py "
        "build`; cleanup through the script's past-2-GB workaround, as `graphs.cleanup.cleanup` fails on this "
        f"3.4 GB graph), timed under `flock /tmp/diffship-bench.lock` (`... time`), {result.get('pause_s', 0)} s "
        "idle before each timed call so that one runtime's spinning worker threads do not slow the next.",
        "",
        f"Machine: {m['cpu']} ({', '.join(m['isa'])}), {m['cores']} cores, {m['platform']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f". {m['date']}. Load average (1/5/15 min) {m['load_average_at_start']} at start, "
        f"{m['load_average_at_end']} at end (the machine is shared; the interleaving keeps the ratios fair). "
        f"Timing run {result['run_time_s'] / 60:.1f} min; building the variants {build_s / 60:.1f} min.",
        "",
        f"**Best: {best['label']} ({best['backend']}), {best['speedup_vs_torch']:.2f}x torch eager: the 2x target is "
        f"{'met' if best['target_met'] else 'not met'}.**",
        "",
    ]
    previous = result.get("previous_run")
    if previous:
        lines += [f"Earlier run: {previous['note']}", ""]
    extra_head, extra_sep = (" earlier run |", " ---: |") if previous else ("", "")
    lines += [
        "| backend | configuration | ms / step | speed-up vs torch |" + extra_head + " torch ms (same window) | size MB | "
        "max abs | max rel | load + first call s |",
        "| --- | --- | ---: | ---: |" + extra_sep + " ---: | ---: | ---: | ---: | ---: |",
        f"| torch | {t['label']} | {t['median_ms']:.0f} | 1.00 |" + (" 1.00 |" if previous else "")
        + f" {t['median_ms']:.0f} (all windows) | {t['size_bytes'] / 2**20:,.0f} | - | - | {t['load_s']:.1f} |",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['label']} | failed: {r['error'][:160]} | | | | | | |")
            continue
        disturbed = r["torch_median_ms_same_window"] > 1.5 * t["median_ms"]
        earlier = ""
        if previous:
            value = previous["speedups"].get(r["config"])
            earlier = f" {value:.2f}x |" if value else " - |"
        lines.append(
            f"| {r['backend']} | {r['label']} | {r['median_ms']:.0f}{' *' if disturbed else ''} | "
            f"{r['speedup_vs_torch']:.2f}x |{earlier} "
            f"{r['torch_median_ms_same_window']:.0f} | {r['size_bytes'] / 2**20:,.0f} | {r['max_abs']:.1e} | "
            f"{r['max_rel']:.1e}{' NaN' if r['nan'] else ''} | {r['load_s'] + r['first_call_s']:.1f} |")
    if any("median_ms" in r and r["torch_median_ms_same_window"] > 1.5 * t["median_ms"] for r in result["rows"]):
        lines += ["", "\\* other work on the machine slowed this window (torch too, see its column): the absolute ms "
                  "are inflated, the interleaved ratio still holds."]
    lines += ["", "Build time per variant (s): " + ", ".join(f"{k} {v['build_s']:.0f}" for k, v in build.items()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["build", "time", "markdown"])
    parser.add_argument("--only", nargs="*", help="configurations / build steps to run (default: all)")
    parser.add_argument("--budget", type=float, default=45.0,
                        help="seconds of timed calls per configuration (torch included), at least 3 pairs")
    parser.add_argument("--pause", type=float, default=PAUSE_S, help="seconds of idle before each timed call")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--previous", type=Path,
                        help="with `markdown`: the .json of an earlier run, shown as a column beside this one")
    args = parser.parse_args()
    globals()["PAUSE_S"] = args.pause
    if args.phase == "markdown":
        path = args.out / "precision_speed.json"
        result = json.loads(path.read_text())
        if args.previous:
            earlier = json.loads(args.previous.read_text())
            result["previous_run"] = {
                "date": earlier["machine"]["date"], "pause_s": earlier.get("pause_s", 0.0),
                "speedups": {r["config"]: r["speedup_vs_torch"] for r in earlier["rows"] if "speedup_vs_torch" in r},
                "note": f"{earlier['machine']['date']}, same script and variants"
                        + (" without the pause between calls" if not earlier.get("pause_s") else "")
                        + f", load average {earlier['machine']['load_average_at_start']} at start; its speed-ups "
                        "are the 'earlier run' column (run-to-run spread on this shared 2-core machine: about 15%).",
            }
            path.write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "precision_speed.md").write_text(markdown(result))
        return
    if args.phase == "build":
        build(args.only)
    else:
        time_all(args.only, args.budget, args.out)


if __name__ == "__main__":
    main()
