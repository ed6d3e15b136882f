"""The full-size SD3 Medium transformer (2.03 B parameters, random weights) exported here to both formats, validated,
and stepped on ONNX Runtime and OpenVINO:

    .venv/bin/python benchmarks/full_size_sd3.py WORK [--export-size 512] [--step-sizes 512] \
        [--out benchmarks/results/full_size_sd3]

1. WORK/model: `diffship tiny-model WORK/model --full-size --kind sd3` unless it is there (SD3 Medium's MMDiT and
   16-channel VAE at full size; its text encoders have SD3's widths but two layers, T5-XXL being past this machine:
   see diffship.testing.tiny_models).
2. WORK/export: `diffship export WORK/model WORK/export --backend onnx,openvino --height S --width S`, run through
   benchmarks/export_stages.py (the same export, its progress bar read for the stage names) in a child process
   whose memory is sampled as benchmarks/peers/export_peers.py samples it (RSS of the process tree every 0.2 s, never
   less than the kernel's ru_maxrss): wall time, peak RSS, x the transformer's fp32 weights, peak per stage.
3. The export's report: each component's max abs error against PyTorch (and its bound) on each backend.
4. The transformer's step, each backend (and OpenVINO in bf16 inference, as its defaults choose on a CPU with bf16)
   in its own child process: the graph loaded alone, fed the guided batch (2) at each step size with SD3's text length
   (77 CLIP + 256 T5 tokens); load time, one warm-up, then the median of --runs runs, and the process's peak RSS.

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks" / "peers"), str(REPO / "benchmarks")]

from export_peers import run_sampled, unet_fp32_bytes  # noqa: E402

TEXT_TOKENS = 77 + 256  # CLIP-L/G's 77 then T5's max_sequence_length 256, as SD3's pipelines feed the transformer

STEP_CHILD = r"""
import json, resource, statistics, sys, time
import numpy as np
export, backend, precision, size, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
text_tokens = int(sys.argv[6])
config = json.load(open(f"{export}/transformer/config.json"))
start = time.perf_counter()
if backend == "onnxruntime":
    from diffship.runtimes.onnxruntime import OnnxRuntimeSession
    session = OnnxRuntimeSession(f"{export}/transformer", cache_dir=False)
else:
    from diffship.runtimes.openvino import OpenVINOSession
    session = OpenVINOSession(f"{export}/transformer", inference_precision=precision, cache_dir=False)
    session.compile()
load = time.perf_counter() - start
rng = np.random.default_rng(0)
latent = size // 8
feeds = {"hidden_states": rng.standard_normal((2, config["in_channels"], latent, latent), dtype=np.float32),
         "encoder_hidden_states": rng.standard_normal((2, text_tokens, config["joint_attention_dim"]), dtype=np.float32),
         "pooled_projections": rng.standard_normal((2, config["pooled_projection_dim"]), dtype=np.float32),
         "timestep": np.full((2,), 500.0, dtype=np.float32)}
start = time.perf_counter()
session.run(feeds)
first = time.perf_counter() - start
times = []
for _ in range(runs):
    start = time.perf_counter()
    session.run(feeds)
    times.append(time.perf_counter() - start)
print("RESULT " + json.dumps({"load_s": load, "first_run_s": first, "runs_s": times,
                             "median_s": statistics.median(times),
                             "settings": {k: str(v) for k, v in session.settings().items()},
                             "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def validation_table(export: Path) -> dict:
    report = json.loads((export / "export_report.json").read_text())
    table = {}
    for name, entry in report["components"].items():
        table[name] = {backend: {"max_abs": v["max_abs"], "atol": v.get("atol"), "rtol": v.get("rtol"),
                                 "passed": v.get("passed")}
                       for backend, v in entry["validation"].items()}
        choice = entry.get("inference_precision", {}).get("openvino")
        if choice:
            table[name]["openvino_bf16"] = {"choice": choice["choice"], **(choice.get("bf16") or {})}
    return table


def step(export: Path, backend: str, precision: str, size: int, runs: int, logs: Path) -> dict:
    log(f"step: {backend} {precision} {size}x{size}")
    figures = run_sampled([sys.executable, "-c", STEP_CHILD, str(export), backend, precision, str(size), str(runs),
                           str(TEXT_TOKENS)], logs / f"step_{backend}_{precision}_{size}.log")
    lines = [line for line in Path(figures["log"]).read_text().splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1][len("RESULT "):]) if lines else {"error": f"no result, see {figures['log']}"}
    result.update(backend=backend, precision=precision, size=size, batch=2, text_tokens=TEXT_TOKENS,
                  peak_rss_mb=figures["peak_rss_mb"], returncode=figures["returncode"])
    log(f"  {json.dumps({k: result.get(k) for k in ('load_s', 'median_s', 'peak_rss_mb')})}")
    return result


def to_markdown(r: dict) -> str:
    m, e = r["machine"], r["export"]
    gib = r["transformer"]["fp32_bytes"] / 2**30
    lines = [
        "# Full-size SD3 Medium transformer: exported here, validated, stepped on both backends", "",
        f"{r['date']} · {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, load average at start "
        f"{m.get('loadavg_start')} · made by `benchmarks/full_size_sd3.py`.", "",
        f"Model: `diffship tiny-model MODEL --full-size --kind sd3`: SD3 Medium's MMDiT transformer "
        f"({r['transformer']['parameters']:,} values in its safetensors: 2.03 B parameters and its position "
        f"embedding table; **{gib:.2f} GiB in fp32**) and 16-channel VAE at full size, "
        "random weights; its text encoders have SD3's widths (CLIP-L 768, CLIP-G 1280, T5 4096) but two layers "
        "(T5: one), as T5-XXL (4.7 B parameters, 17.7 GiB in fp32) cannot be exported in fp32 on this 24 GB machine "
        "(see flux_memory.md for what such encoders need).", "",
        f"## Export: `{e['command_line']}`", "",
        "The graphs are dynamic (any batch, size and text length run); the size is the one they are traced and "
        "validated at (each component also at a second batch, size and text length).", "",
        f"**{e['wall_s'] / 60:.1f} min, peak RSS {e['peak_rss_mb'] / 1024:.2f} GiB = "
        f"{e['peak_rss_mb'] * 2**20 / r['transformer']['fp32_bytes']:.2f}x the transformer's fp32 weights** "
        f"(process tree sampled every 0.2 s and the kernel's ru_maxrss, as export_memory.md); "
        f"return code {e['returncode']}.", "",
    ]
    if e.get("stages"):
        lines += ["Peak RSS per stage of the transformer (the kernel's VmHWM, reset at each stage):", "",
                  "| stage | seconds | peak RSS (GiB) |", "| --- | ---: | ---: |"]
        lines += [f"| {s['stage']} | {s['seconds']:.0f} | {s['peak_rss_gib']:.2f} |" for s in e["stages"]
                  if s["stage"].startswith("transformer") or s["stage"].startswith("loading")]
        lines.append("")
    if r.get("validation"):
        lines += ["Validation against PyTorch (max abs error over the shapes validated; bound):", "",
                  "| component | ONNX Runtime | OpenVINO | OpenVINO bf16 inference (max rel; default choice) |",
                  "| --- | ---: | ---: | --- |"]
        for name, v in r["validation"].items():
            cells = []
            for backend in ("onnxruntime", "openvino"):
                x = v.get(backend)
                cells.append(f"{x['max_abs']:.2g} ({x['atol'] if x['atol'] is not None else x['rtol']:g})" if x
                             else "-")
            bf16 = v.get("openvino_bf16")
            cells.append(f"{bf16['max_rel']:.2g}; {bf16['choice']}" if bf16 and "max_rel" in bf16
                         else (bf16["choice"] if bf16 else "-"))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if r.get("steps"):
        lines += ["## Transformer step", "",
                  f"One denoising step with guidance: batch 2, {TEXT_TOKENS} text tokens, each backend in its own "
                  f"process, the graph loaded alone; median of the runs after one warm-up (the first run). Other "
                  f"work ran on the machine meanwhile. OpenVINO's peak RSS counts its memory-mapped .bin beside the "
                  f"weights its CPU plugin repacks (f32: both, about 2x the weights; the export hands those pages "
                  f"back while it validates, the runtime session does not).", "",
                  "| backend | inference precision | size | step (median) | runs | first run | load | peak RSS |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for s in r["steps"]:
            if "median_s" not in s:
                lines.append(f"| {s['backend']} | {s['precision']} | {s['size']} | {s.get('error')} | | | | |")
                continue
            lines.append(f"| {s['backend']} | {s['precision']} | {s['size']}x{s['size']} | {s['median_s']:.1f} s | "
                         f"{', '.join(f'{t:.1f}' for t in s['runs_s'])} | {s['first_run_s']:.1f} s | "
                         f"{s['load_s']:.1f} s | {s['peak_rss_mb'] / 1024:.2f} GiB |")
        lines.append("")
    lines += [f"{note}\n" for note in r.get("notes", [])]
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v) + ".")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--export-size", type=int, default=512,
                        help="the size the export traces and validates at (its graphs are dynamic: any size runs)")
    parser.add_argument("--step-sizes", default="512", help="comma-separated image sizes the step is timed at")
    parser.add_argument("--runs", type=int, default=2, help="timed runs after the warm-up")
    parser.add_argument("--configs", default="onnxruntime:f32,openvino:f32,openvino:bf16",
                        help="backend:inference precision pairs the step is timed on")
    parser.add_argument("--skip-export", action="store_true", help="keep WORK/export and the figures in --out")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "full_size_sd3")
    args = parser.parse_args()

    from diffship.benchmarking.machine import machine_info, now, versions
    from diffship.benchmarking.report import write_report

    work = args.work.resolve()
    model, export, logs = work / "model", work / "export", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not (model / "model_index.json").is_file():
        log(f"writing {model}")
        made = run_sampled([str(Path(sys.executable).parent / "diffship"), "tiny-model", str(model), "--full-size",
                            "--kind", "sd3"], logs / "tiny_model.log")
        if made["returncode"]:
            raise SystemExit(f"tiny-model failed: see {made['log']}")
    weights = unet_fp32_bytes(model, "transformer")
    earlier = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").is_file() else {}
    report = {"schema": "diffship-full-size-sd3/1", "date": now(), "command": " ".join(sys.argv),
              "machine": machine_info(), "versions": versions(("diffship", "onnxruntime", "openvino", "torch",
                                                                 "diffusers", "transformers")),
              "model": str(model), "transformer": weights, "export": earlier.get("export"),
              "validation": earlier.get("validation"), "steps": []}
    if not args.skip_export:
        size = str(args.export_size)
        command = [sys.executable, str(REPO / "benchmarks" / "export_stages.py"), str(model), str(export),
                   "--backend", "onnx,openvino", "--height", size, "--width", size, "--overwrite",
                   "--out", str(logs / "export_stages")]
        log("export: " + " ".join(command))
        figures = run_sampled(command, logs / "export.log")
        stages = (json.loads((logs / "export_stages.json").read_text())["stages"]
                  if (logs / "export_stages.json").is_file() and figures["returncode"] == 0 else None)
        if stages:  # export_stages.py resets the kernel's peak mark per stage: the stages' marks are the peaks
            peak_mb = max(s["peak_rss_gib"] for s in stages) * 1024
            figures.update(peak_rss_mb=max(figures["peak_rss_mb"], peak_mb),
                           max_rss_single_process_mb=max(figures["max_rss_single_process_mb"], peak_mb))
        report["export"] = {**figures, "stages": stages,
                            "command_line": f"diffship export MODEL OUT --backend onnx,openvino --height {size} "
                                            f"--width {size}"}
        log(f"  {figures['wall_s'] / 60:.1f} min, peak RSS {figures['peak_rss_mb'] / 1024:.2f} GiB, "
            f"rc {figures['returncode']}")
        if figures["returncode"]:
            args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
            return 1
    report["validation"] = validation_table(export)
    sizes = [int(s) for s in args.step_sizes.split(",") if s.strip()]
    configs = [tuple(c.split(":")) for c in args.configs.split(",") if c.strip()]
    # Steps timed earlier at other sizes or on other backends are kept (a step at 1024 is timed apart).
    report["steps"] = [s for s in earlier.get("steps", [])
                       if (s["size"], (s["backend"], s["precision"])) not in {(z, c) for z in sizes for c in configs}]
    for size in sizes:
        for backend, precision in configs:
            report["steps"].append(step(export, backend, precision, size, args.runs, logs))
            args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(write_report(args.out, report, to_markdown(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
