"""What ControlNet costs per denoising step, on the full-size SD 1.5 architecture (random weights: latency does not
depend on weight values), CPU, ONNX Runtime and OpenVINO.

    python benchmarks/controlnet_step.py build   # out/full-size, out/full-size-controlnet, the export (minutes, ~8 GB)
    python benchmarks/controlnet_step.py time --write   # -> benchmarks/results/controlnet_step.{json,md}
    python benchmarks/controlnet_step.py report         # the .md again from the .json

`build` writes SD 1.5's pipeline (`diffship tiny-model out/full-size --kind full-size`, kept if there), SD 1.5's
ControlNet architecture (lllyasviel's sd-controlnet-*: the UNet's down path, conditioning channels 16/32/96/256;
testing/tiny_controlnets.save_full_size_controlnet) and exports both at 256x256 to ONNX and OpenVINO
(out/full-size-controlnet-export).

`time`, per backend, in one process: the export loaded once as StableDiffusionControlNetPipeline and, on the same
sessions, as StableDiffusionPipeline (`from_pipe`: no ControlNet runs and the UNet is fed zero residuals, which is
the UNet without ControlNet plus 13 additions), run in turn after a warm-up of each, guidance on (batch 2 through
UNet and ControlNet). Figures are medians over the runs: the UNet's time per step, the ControlNet's per step
(pipelines' `controlnet` stage), and the whole step with and without, and their ratio; and the ControlNet's time
over the UNet's in the same steps (`ControlNet / UNet`), the figure a loaded machine disturbs least.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "out" / "full-size"
CONTROLNET = ROOT / "out" / "full-size-controlnet"
EXPORT = ROOT / "out" / "full-size-controlnet-export"
RESULTS = ROOT / "benchmarks" / "results"
SIZE = 256
PROMPT = "a photo of an astronaut riding a horse on the moon"


def build() -> None:
    from diffship.exporters import export
    from diffship.testing.tiny_controlnets import save_full_size_controlnet
    from diffship.testing.tiny_models import save_tiny_pipeline

    if not (MODEL / "model_index.json").is_file():
        save_tiny_pipeline(MODEL, "full-size")
    if not (CONTROLNET / "config.json").is_file():
        save_full_size_controlnet(MODEL, CONTROLNET)
    if not (EXPORT / "export_report.json").is_file():
        start = time.perf_counter()
        export(MODEL, EXPORT, ["onnx", "openvino"], height=SIZE, width=SIZE, controlnet=CONTROLNET, overwrite=True)
        print(f"exported in {time.perf_counter() - start:.0f} s")


def control_image():
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    edges = ((np.sin(20 * x) > 0.9) | (np.cos(17 * y) > 0.9)).astype(np.uint8) * 255
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def time_backend(backend: str, steps: int, runs: int, warmup: int, precision: str) -> dict:
    from diffship import StableDiffusionControlNetPipeline, StableDiffusionPipeline

    start = time.perf_counter()
    with_cn = StableDiffusionControlNetPipeline.from_pretrained(EXPORT, backend=backend,
                                                                inference_precision=precision)
    load_s = time.perf_counter() - start
    without = StableDiffusionPipeline.from_pipe(with_cn)
    image = control_image()
    pipes = {
        "without ControlNet": lambda: without(PROMPT, height=SIZE, width=SIZE, num_inference_steps=steps,
                                              output_type="latent"),
        "with ControlNet": lambda: with_cn(PROMPT, image=image, num_inference_steps=steps, output_type="latent"),
    }
    for pipe in (with_cn, without):
        pipe.set_progress_bar_config(disable=True)
    timings = {name: [] for name in pipes}
    for round_ in range(warmup + runs):
        for name, run in (pipes.items() if round_ % 2 == 0 else reversed(pipes.items())):
            time.sleep(0.3)  # thread pools that spin after a run settle before the next
            result = run()
            if round_ >= warmup:
                timings[name].append(result.timings)
    rows = {}
    for name, runs_ in timings.items():
        unet = statistics.median(t["unet_per_step"] for t in runs_)
        controlnet = statistics.median(t.get("controlnet_per_step", 0.0) for t in runs_)
        step = statistics.median((t["unet"] + t.get("controlnet", 0.0)) / t["unet_steps"] for t in runs_)
        rows[name] = {"unet_ms_per_step": round(unet * 1e3, 1),
                      "controlnet_ms_per_step": round(controlnet * 1e3, 1),
                      "step_ms": round(step * 1e3, 1),
                      "total_s": round(statistics.median(t["total"] for t in runs_), 2)}
    rows["with ControlNet"]["step_ratio"] = round(rows["with ControlNet"]["step_ms"]
                                                  / rows["without ControlNet"]["step_ms"], 2)
    return {"backend": backend, "inference_precision": with_cn.inference_precisions, "load_s": round(load_s, 1),
            "rows": rows}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# ControlNet per-step cost, full-size SD 1.5 architecture (random weights)",
        "",
        f"{SIZE}x{SIZE} (latent 32x32), guidance on (batch 2 through the UNet and the ControlNet), {result['steps']} "
        f"steps, medians of {result['runs']} interleaved runs after {result['warmup']} warm-up; one ControlNet "
        "(SD 1.5's architecture). Without ControlNet: the same export's UNet fed zero residuals "
        "(StableDiffusionPipeline.from_pipe). `python benchmarks/controlnet_step.py time --write`.",
        "",
        f"Machine: {m.get('cpu')} ({m.get('cores')} cores), {m.get('memory_gb')} GB; load average at start "
        f"{m.get('loadavg_start')}; {result['date']}.",
        "",
        "| backend | inference precision | pipeline | UNet ms / step | ControlNet ms / step | ControlNet / UNet | "
        "step ms | step vs without | total s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for backend in result["backends"]:
        precision = backend["inference_precision"].get("unet", "f32")
        for name, row in backend["rows"].items():
            share = row["controlnet_ms_per_step"] / row["unet_ms_per_step"] if row["unet_ms_per_step"] else 0.0
            lines.append(f"| {backend['backend']} | {precision} | {name} | {row['unet_ms_per_step']} | "
                         f"{row['controlnet_ms_per_step']} | {share:.2f} | {row['step_ms']} | "
                         f"{row.get('step_ratio', 1.0)}x | {row['total_s']} |")
    return "\n".join(lines) + "\n" + (f"\n{result['note']}\n" if result.get("note") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["build", "time", "report"])
    parser.add_argument("--backend", default="onnxruntime,openvino")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--inference-precision", default="f32")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/controlnet_step.{json,md}")
    args = parser.parse_args()
    if args.phase == "build":
        build()
        return
    if args.phase == "report":
        result = json.loads((RESULTS / "controlnet_step.json").read_text())
        (RESULTS / "controlnet_step.md").write_text(markdown(result))
        print(markdown(result))
        return
    from diffship.benchmarking.machine import machine_info, now

    machine = machine_info()
    backends = [time_backend(b, args.steps, args.runs, args.warmup, args.inference_precision)
                for b in args.backend.split(",")]
    result = {"machine": machine, "date": now(), "size": SIZE, "steps": args.steps, "runs": args.runs,
              "warmup": args.warmup, "backends": backends}
    text = markdown(result)
    print(text)
    if args.write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "controlnet_step.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "controlnet_step.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
