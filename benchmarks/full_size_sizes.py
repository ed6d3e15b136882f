"""The full-size Stable Diffusion 1.5 architecture (random weights), exported to ONNX and OpenVINO in one command,
run at 512x512 (a 64x64 latent, which the UNet's up factor of 8 divides) and at 520x520 (65x65, which it does not)
on both backends, against diffusers (torch eager, fp32) on the same latents: max abs difference of the images and
the time of each generation, interleaved run by run (one warm-up, then the timed runs; medians).

    diffship tiny-model --full-size SD15
    diffship export SD15 SD15-EXPORT --backend onnx,openvino
    python benchmarks/full_size_sizes.py SD15 SD15-EXPORT      # writes benchmarks/results/full_size_sizes.{json,md}
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from diffship.benchmarking.machine import machine_info, now, versions
from diffship.benchmarking.report import write_report

RESULTS = Path(__file__).parent / "results"
PROMPT = "a photo of an astronaut riding a horse on mars"
BACKENDS = ("onnxruntime", "openvino")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, nargs="?", help="the diffusers directory (diffship tiny-model --full-size)")
    parser.add_argument("exported", type=Path, nargs="?", help="its export to both formats")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 520])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2, help="timed runs per side and size, after one warm-up")
    parser.add_argument("--out", type=Path, default=RESULTS / "full_size_sizes")
    parser.add_argument("--render", action="store_true", help="only rewrite the Markdown from OUT.json")
    args = parser.parse_args()
    if args.render:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.out.with_suffix(".json").read_text())))
        return
    if args.exported is None:
        parser.error("give MODEL and EXPORTED (or --render)")

    import diffusers

    from diffship.pipelines import StableDiffusionPipeline

    sides = {"diffusers (torch eager)": diffusers.StableDiffusionPipeline.from_pretrained(args.model,
                                                                                          safety_checker=None)}
    for backend in BACKENDS:
        sides[f"diffship {backend}"] = StableDiffusionPipeline.from_pretrained(args.exported, backend=backend)
    for pipe in sides.values():
        pipe.set_progress_bar_config(disable=True)

    results = []
    for size in args.sizes:
        latents = np.random.default_rng(size).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
        images, seconds = {}, {name: [] for name in sides}
        for run in range(1 + args.runs):
            for name, pipe in sides.items():
                feed = torch.from_numpy(latents) if name.startswith("diffusers") else latents
                start = time.perf_counter()
                with torch.no_grad():
                    out = pipe(PROMPT, height=size, width=size, num_inference_steps=args.steps, guidance_scale=7.5,
                               latents=feed, output_type="np").images
                if run:
                    seconds[name].append(time.perf_counter() - start)
                images[name] = np.asarray(out, dtype=np.float64)
                print(f"{size}x{size} {name} run {run}: {time.perf_counter() - start:.1f} s", flush=True)
        reference = images["diffusers (torch eager)"]
        for name in sides:
            results.append({"size": size, "latent": size // 8, "side": name, "image_shape": list(images[name].shape),
                            "finite": bool(np.isfinite(images[name]).all()),
                            "max_abs_vs_diffusers": float(np.abs(images[name] - reference).max()),
                            "seconds": seconds[name], "median_s": statistics.median(seconds[name])})

    report = {"date": now(), "machine": machine_info(), "versions": versions(("diffship", "numpy", "torch",
                                                                               "diffusers", "onnxruntime",
                                                                               "openvino")),
              "settings": {"prompt": PROMPT, "steps": args.steps, "guidance_scale": 7.5, "runs": args.runs,
                           "scheduler": type(sides["diffship onnxruntime"].scheduler).__name__},
              "peak_rss_mib_all_sides": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "export_report": json.loads((args.exported / "export_report.json").read_text())["components"]["unet"],
              "results": results}
    print(write_report(args.out, report, markdown(report)))


def markdown(report: dict) -> str:
    machine, settings = report["machine"], report["settings"]
    lines = [
        "# Full-size SD 1.5 at 512x512 and 520x520",
        "",
        f"{report['date']} · {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB; load average at "
        f"start {machine['loadavg_start']}",
        "",
        f"The SD 1.5 architecture with random weights, exported to ONNX and OpenVINO in one `diffship export "
        f"--backend onnx,openvino`; text-to-image, {settings['steps']} steps ({settings['scheduler']}), guidance "
        f"{settings['guidance_scale']}, batch 1, the same latents on every side; medians of {settings['runs']} runs "
        "after a warm-up, the sides interleaved run by run in one process.",
        "",
        "| size | latent | side | image | max abs vs diffusers | generation (median) |",
        "| --- | ---: | --- | --- | ---: | ---: |",
    ]
    for r in report["results"]:
        shape = "x".join(str(d) for d in r["image_shape"][1:3]) + (" finite" if r["finite"] else " NOT finite")
        diff = "-" if r["side"].startswith("diffusers") else f"{r['max_abs_vs_diffusers']:.1e}"
        lines.append(f"| {r['size']}x{r['size']} | {r['latent']}x{r['latent']} | {r['side']} | {shape} | {diff} | "
                     f"{r['median_s']:.1f} s |")
    unet = report["export_report"]["validation"]
    lines += ["", "The export's validation of the UNet against PyTorch (`export_report.json`), per backend and "
              "input shape:", "", "| backend | sample | max abs | atol |", "| --- | --- | ---: | ---: |"]
    for backend, v in unet.items():
        for case in v["cases"]:
            lines.append(f"| {backend} | {case['inputs']['sample']} | {case['max_abs']:.1e} | {v['atol']:g} |")
    versions_line = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
    lines += ["", f"Peak RSS of the process holding all three pipelines: {report['peak_rss_mib_all_sides']:,.0f} MiB. "
              "What this run shows is that each side runs both sizes and agrees with diffusers; its timings come "
              "from one process holding three full-size pipelines near the machine's memory limit, so for latency "
              "see `diffship bench`'s per-backend figures (bench_full_size_512.md, bench_full_size_520.md), each "
              "backend in its own process.", "", f"Versions: {versions_line}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
