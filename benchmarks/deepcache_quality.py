"""Step caches (DeepCache, TaylorSeer): how much faster, and how much does the picture change, per cache interval.

`--cache deepcache` (the default) or `--cache taylorseer` (the denoiser's output forecast between full steps; any
export, no graph of its own).

1. Speed and quality on an export (DeepCache: made with `diffship export MODEL OUT --deepcache`): per backend, the
   uncached generation and one per interval (default 2, 3, 5), interleaved run by run (the order rotates each round)
   after a warm-up of each; medians of the end-to-end time and of the UNet's (full plus shallow steps), and the
   speed-up over the uncached run. Quality: PSNR (dB, pixels in [0, 1]) of each interval's images against the
   uncached images from the same latents, over `--seeds` seeds.
2. With `--shapes`: the trained shapes model (diffship.testing.shapes; README "The shapes model") exported (with
   --deepcache for DeepCache), all 60 prompts x 3 seeds as benchmarks/shapes_accuracy.py draws them (DDIM 25 steps,
   guidance 6): the accuracy of colour, shape and position (scored from pixels) per interval against the uncached
   run.

    python benchmarks/deepcache_quality.py OUT [--cache deepcache|taylorseer] [--backend onnxruntime
        --backend openvino] [--steps 50] [--intervals 2,3,5] [--cache-start N] [--runs 3] [--shapes] [--write]

`--write` writes benchmarks/results/{deepcache,taylorseer}_quality.{json,md} (run it on a quiet machine); without
it the figures are printed only.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
PROMPT = "a photo of an astronaut riding a horse on mars"
UNCACHED = None  # the interval key of the uncached runs


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB for images in [0, 1] (inf when identical)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def options(interval, args) -> dict:
    return {} if interval is UNCACHED else {"cache": args.cache, "cache_interval": interval,
                                            "cache_start": args.cache_start}


def unet_seconds(timings: dict) -> float:
    return timings["unet"] + timings.get("unet_shallow", 0.0)


def speed_and_quality(export_dir: Path, backend: str, args) -> dict:
    from diffship.pipelines import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(export_dir, backend=backend, inference_precision="f32")
    pipe.set_progress_bar_config(disable=True)
    height, width = args.height or pipe.default_height, args.width or pipe.default_width
    shape = (1, 4, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = {seed: np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) for seed in range(args.seeds)}
    configs = [UNCACHED, *args.intervals]

    def generate(interval, seed):
        return pipe(args.prompt, height=height, width=width, num_inference_steps=args.steps,
                    guidance_scale=args.guidance, latents=latents[seed], output_type="np",
                    **options(interval, args))

    for interval in configs:  # warm-up: first-call costs (allocations, OpenVINO's first inference) untimed
        for _ in range(args.warmup):
            generate(interval, 0)
    runs = {interval: [] for interval in configs}
    images = {interval: {} for interval in configs}
    for round_ in range(args.runs):
        order = configs[round_ % len(configs):] + configs[:round_ % len(configs)]
        for interval in order:
            result = generate(interval, 0)
            runs[interval].append(result.timings)
            images[interval][0] = result.images
        print(f"{backend} round {round_ + 1}/{args.runs}: " + ", ".join(
            f"{_name(i)} {runs[i][-1]['total']:.2f} s" for i in configs), flush=True)
    for seed in range(1, args.seeds):  # quality over more latents, untimed
        for interval in configs:
            images[interval][seed] = generate(interval, seed).images

    base_total = statistics.median(t["total"] for t in runs[UNCACHED])
    base_unet = statistics.median(unet_seconds(t) for t in runs[UNCACHED])
    rows = []
    for interval in configs:
        total = statistics.median(t["total"] for t in runs[interval])
        unet = statistics.median(unet_seconds(t) for t in runs[interval])
        last = runs[interval][-1]
        cached = np.concatenate([images[interval][s] for s in range(args.seeds)])
        uncached = np.concatenate([images[UNCACHED][s] for s in range(args.seeds)])
        rows.append({
            "interval": interval, "total_s": round(total, 4), "unet_s": round(unet, 4),
            # the steps the cache took: DeepCache's shallow ones, or the steps TaylorSeer forecast
            "full_steps": last["unet_steps"],
            "shallow_steps": last.get("unet_shallow_steps", runs[UNCACHED][-1]["unet_steps"] - last["unet_steps"]),
            "unet_per_step_s": round(statistics.median(t["unet_per_step"] for t in runs[interval]), 5),
            "shallow_per_step_s": (round(statistics.median(t["unet_shallow_per_step"] for t in runs[interval]), 5)
                                   if last.get("unet_shallow_steps") else None),
            "speedup_total": round(base_total / total, 3), "speedup_unet": round(base_unet / unet, 3),
            "psnr_db": None if interval is UNCACHED else round(psnr(cached, uncached), 2),
        })
    return {"backend": backend, "height": height, "width": width, "rows": rows}


def shapes_accuracy_rows(args) -> dict:
    """Accuracy of the trained shapes model per interval, as benchmarks/shapes_accuracy.py scores it."""
    from shapes_accuracy import GUIDANCE, PROMPTS, SEEDS, STEPS, accuracy, latents_for, stacked

    from diffship.exporters import export
    from diffship.pipelines import StableDiffusionPipeline
    from diffship.testing import shapes

    model = shapes.TRAINED_MODEL.resolve()
    out = export(model, args.work / f"shapes-{args.cache}", ["onnx"], progress=False, overwrite=True,
                 deepcache=args.cache == "deepcache")
    pipe = StableDiffusionPipeline.from_pretrained(out, backend="onnxruntime", inference_precision="f32")
    pipe.set_progress_bar_config(disable=True)
    images = {}
    for interval in [UNCACHED, *args.intervals]:
        images[interval] = {seed: pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                                       latents=latents_for(seed, model), output_type="np",
                                       **options(interval, args)).images for seed in SEEDS}
        print(f"shapes {_name(interval)}: {accuracy(images[interval])}", flush=True)
    rows = []
    for interval, by_seed in images.items():
        row = {"interval": interval, **accuracy(by_seed)}
        if interval is not UNCACHED:
            row["psnr_db"] = round(psnr(stacked(by_seed), stacked(images[UNCACHED])), 2)
            row["points_from_uncached"] = {a: round(row[a] - rows[0][a], 2) for a in (*shapes.ATTRIBUTES, "all")}
        rows.append(row)
    return {"steps": STEPS, "guidance_scale": GUIDANCE, "seeds": list(SEEDS), "images": len(PROMPTS) * len(SEEDS),
            "backend": "onnxruntime", "rows": rows}


def _name(interval) -> str:
    return "no cache" if interval is UNCACHED else f"interval {interval}"


def markdown(result: dict) -> str:
    m = result["machine"]
    deepcache = result.get("cache", "deepcache") == "deepcache"
    title, cached = ("DeepCache", "shallow") if deepcache else ("TaylorSeer", "forecast")
    branch = f" (DeepCache branch {result['branch']})" if deepcache else ""
    lines = [
        f"# {title}: speed-up and image change per cache interval", "",
        f"{result['date']} · {m.get('cpu')} ({m.get('cores')} cores) · export `{result['export']}`{branch} · "
        f"{result['steps']} steps, guidance {result['guidance_scale']}, cache_start "
        f"{result['cache_start'] if result['cache_start'] is not None else 'default'} · medians of "
        f"{result['runs']} interleaved runs after {result['warmup']} warm-up each · PSNR over {result['seeds']} "
        f"seed(s). Made by `python benchmarks/deepcache_quality.py --cache {result.get('cache', 'deepcache')}`.", "",
        f"| backend | size | cache | full / {cached} denoiser steps | total s | denoiser s | speed-up total | "
        f"speed-up denoiser | ms / full step | ms / {cached} step | PSNR dB vs no cache |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for side in result["speed"]:
        for r in side["rows"]:
            shallow = f"{r['shallow_per_step_s'] * 1e3:.1f}" if r["shallow_per_step_s"] else "-"
            quality = "-" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
            lines.append(f"| {side['backend']} | {side['width']}x{side['height']} | {_name(r['interval'])} | "
                         f"{r['full_steps']} / {r['shallow_steps']} | {r['total_s']:.2f} | {r['unet_s']:.2f} | "
                         f"{r['speedup_total']:.2f}x | {r['speedup_unet']:.2f}x | {r['unet_per_step_s'] * 1e3:.1f} | "
                         f"{shallow} | {quality} |")
    shapes_result = result.get("shapes")
    if shapes_result:
        lines += [
            "", "## The trained shapes model", "",
            f"All 60 prompts x {len(shapes_result['seeds'])} seeds ({shapes_result['images']} images), DDIM "
            f"{shapes_result['steps']} steps, guidance {shapes_result['guidance_scale']}, "
            f"{shapes_result['backend']}; scored from pixels (diffship.testing.shapes.score).", "",
            "| cache | colour | shape | position | all | points from no cache (all) | PSNR dB vs no cache |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in shapes_result["rows"]:
            points = f"{r['points_from_uncached']['all']:+.1f}" if "points_from_uncached" in r else "-"
            lines.append(f"| {_name(r['interval'])} | {r['colour']:.1f} % | {r['shape']:.1f} % | "
                         f"{r['position']:.1f} % | {r['all']:.1f} % | {points} | {r.get('psnr_db', '-')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path, help="an export (made with --deepcache for --cache deepcache)")
    parser.add_argument("--cache", choices=["deepcache", "taylorseer"], default="deepcache")
    parser.add_argument("--backend", action="append", help="onnxruntime, openvino (repeat); default both")
    parser.add_argument("--intervals", default="2,3,5", help="cache intervals, comma-separated (default 2,3,5)")
    parser.add_argument("--cache-start", type=int, default=None,
                        help="steps before this index run in full (default: the cache's own, DeepCache 0, "
                             "TaylorSeer 3)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--runs", type=int, default=3, help="timed rounds (each runs every configuration once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each configuration first")
    parser.add_argument("--seeds", type=int, default=3, help="latents the PSNR is measured over")
    parser.add_argument("--shapes", action="store_true", help="also the trained shapes model's accuracy")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "deepcache-quality")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/deepcache_quality.{json,md}")
    args = parser.parse_args()
    args.intervals = [int(i) for i in args.intervals.split(",") if i.strip()]
    if not args.intervals or min(args.intervals) < 1 or args.runs < 1 or args.seeds < 1:
        parser.error("--intervals needs integers of at least 1; --runs and --seeds at least 1")

    from diffship.benchmarking.machine import machine_info, now, versions

    report = json.loads((args.export_dir / "export_report.json").read_text())
    if args.cache == "deepcache" and "deepcache" not in report:
        parser.error(f"{args.export_dir} was exported without --deepcache")
    started = time.perf_counter()
    result = {
        "date": now(), "machine": machine_info(), "versions": versions(), "export": str(args.export_dir),
        "cache": args.cache, "branch": report.get("deepcache", {}).get("branch"), "steps": args.steps,
        "guidance_scale": args.guidance,
        "cache_start": args.cache_start, "runs": args.runs, "warmup": args.warmup, "seeds": args.seeds,
        "prompt": args.prompt,
        "speed": [speed_and_quality(args.export_dir, backend, args)
                  for backend in (args.backend or ["onnxruntime", "openvino"])],
    }
    if args.shapes:
        args.work.mkdir(parents=True, exist_ok=True)
        result["shapes"] = shapes_accuracy_rows(args)
    result["run_seconds"] = round(time.perf_counter() - started)
    text = markdown(result)
    print(text)
    if args.write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.cache}_quality.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        (RESULTS / f"{args.cache}_quality.md").write_text(text)


if __name__ == "__main__":
    main()
