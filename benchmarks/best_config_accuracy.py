"""Is a fast configuration still drawing what it is asked? The trained shapes model's accuracy per configuration.

compare_peers.py's "diffship best" is held to the shapes model's accuracy: within 1 point of fp32 (issue 13). This
scores each configuration the way benchmarks/shapes_accuracy.py scores precisions (all 60 prompts x 3 seeds, colour,
shape and position read from the pixels) against the exact reference on the same backend (f32 inference, no step
cache), at three schedules: the shapes benchmark's own (DDIM, 25 steps), compare_peers' scheduler (Euler) at 25
steps and at 5, all at the shapes benchmark's guidance. A step cache that skips the deep network on 2 of every 3
steps is a different bargain at 5 steps than at 25: the schedule is part of the configuration. The shapes model is exported once with --deepcache, so every cached configuration
and the uncached ones read the same graphs.

    python benchmarks/best_config_accuracy.py [--backend openvino]
        [--config 'NAME=JSON'] ...   # from_pretrained options and call arguments, e.g.
                                     # 'bf16 + DeepCache 3={"cache": "deepcache", "cache_interval": 3}'

Without --config: diffship's defaults (inference_precision "auto") with no cache, and with DeepCache every 2 and
every 3 steps. Keys of the JSON that from_pretrained takes (inference_precision, static_shapes) go there, the rest
to the pipeline call. Writes benchmarks/results/best_config_accuracy.{json,md}. Not timed; about 10 minutes on
2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
LOAD_OPTIONS = ("inference_precision", "static_shapes")  # from_pretrained's; the rest go to the call
EXPORTS = {"fp32": {}, "hybrid": {"quantize": "hybrid"}}  # --config's "export": export() keyword arguments
REFERENCE = ("fp32 export, f32 inference, no cache", {"inference_precision": "f32"})
DEFAULT_CONFIGS = [
    ("defaults, no cache", {}),
    ("defaults + DeepCache 2", {"cache": "deepcache", "cache_interval": 2}),
    ("defaults + DeepCache 3", {"cache": "deepcache", "cache_interval": 3}),
    ("hybrid int8, defaults, no cache", {"export": "hybrid"}),
    ("hybrid int8, defaults + DeepCache 3", {"export": "hybrid", "cache": "deepcache", "cache_interval": 3}),
]
# shapes_accuracy's; compare_peers' scheduler at as many steps, and at the 5 steps its quick runs take.
SCHEDULES = [("DDIMScheduler", 25), ("EulerDiscreteScheduler", 25), ("EulerDiscreteScheduler", 5)]


def parse_config(text: str) -> tuple[str, dict]:
    name, sep, body = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--config {text!r}: give NAME=JSON")
    try:
        options = json.loads(body)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"--config {name!r}: not JSON ({error})") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"--config {name!r}: give a JSON object")
    if options.get("export", "fp32") not in EXPORTS:
        raise argparse.ArgumentTypeError(f"--config {name!r}: \"export\" is one of {', '.join(EXPORTS)}")
    return name.strip(), options


def images_of(pipe_class, export_dir: Path, backend: str, options: dict, model: Path) -> tuple[dict, dict]:
    """{schedule name: {seed: images}} and the inference precisions the pipeline ran at."""
    from shapes_accuracy import GUIDANCE, PROMPTS, SEEDS, latents_for

    from diffship import schedulers

    load = {k: v for k, v in options.items() if k in LOAD_OPTIONS}
    call = {k: v for k, v in options.items() if k not in (*LOAD_OPTIONS, "export")}
    pipe = pipe_class.from_pretrained(export_dir, backend=backend, **load)
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for scheduler, steps in SCHEDULES:
        pipe.scheduler = getattr(schedulers, scheduler).from_config(pipe.scheduler.config)
        with np.errstate(all="ignore"):
            out[f"{scheduler} {steps}"] = {
                seed: pipe(PROMPTS, num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="np",
                           latents=latents_for(seed, model), **call).images for seed in SEEDS}
    return out, dict(pipe.inference_precisions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="openvino", choices=["openvino", "onnxruntime"])
    parser.add_argument("--config", type=parse_config, action="append", metavar="NAME=JSON",
                        help="a configuration to score (repeat); default: diffship's defaults with and without "
                             "DeepCache")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "best-config-accuracy")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from shapes_accuracy import accuracy, stacked

    from deepcache_quality import psnr
    from diffship.benchmarking.machine import machine_info, now, versions
    from diffship.exporters import export
    from diffship.pipelines import StableDiffusionPipeline
    from diffship.testing import shapes

    started = time.perf_counter()
    model = shapes.TRAINED_MODEL.resolve()
    formats = ["openvino"] if args.backend == "openvino" else ["onnx"]
    configs = [REFERENCE, *(args.config or DEFAULT_CONFIGS)]
    if args.backend == "onnxruntime":  # hybrid int8 is OpenVINO's
        configs = [(name, o) for name, o in configs if o.get("export", "fp32") != "hybrid"]
    exports = {}
    for kind in dict.fromkeys(options.get("export", "fp32") for _, options in configs):
        print(f"exporting the shapes model ({kind})", flush=True)
        exports[kind] = export(model, args.work / f"shapes-deepcache-{kind}", formats, progress=False,
                               overwrite=True, deepcache=True, **EXPORTS[kind])
    rows = []
    reference = None
    for name, options in configs:
        export_dir = exports[options.get("export", "fp32")]
        images, precisions = images_of(StableDiffusionPipeline, export_dir, args.backend, options, model)
        reference = reference or images
        for schedule, by_seed in images.items():
            row = {"config": name, "options": options, "schedule": schedule, "precisions": precisions,
                   **{k: v for k, v in accuracy(by_seed).items() if k != "per_seed"}}
            ref_row = next((r for r in rows if r["config"] == REFERENCE[0] and r["schedule"] == schedule), None)
            if ref_row is not None:
                row["points_from_reference"] = round(row["all"] - ref_row["all"], 2)
                row["psnr_db"] = round(psnr(stacked(by_seed), stacked(reference[schedule])), 2)
            rows.append(row)
            print(f"{name}, {schedule}: {row['all']} % all", flush=True)
    result = {"date": now(), "machine": machine_info(), "versions": versions(), "backend": args.backend,
              "model": str(model), "exports": {k: str(v) for k, v in exports.items()}, "rows": rows,
              "run_seconds": round(time.perf_counter() - started)}
    text = markdown(result)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "best_config_accuracy.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (args.out / "best_config_accuracy.md").write_text(text)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# The shapes model's accuracy per configuration (is the fast configuration still right?)", "",
        f"{result['date']} · {m.get('cpu')} ({m.get('cores')} cores, flags: {', '.join(m.get('cpu_flags') or [])}) · "
        f"{result['backend']} · the trained shapes model exported with --deepcache (fp32, and hybrid int8 where the "
        "configuration says) · all 60 prompts x 3 seeds per "
        f"row, scored from pixels (diffship.testing.shapes.score) · {result['run_seconds']} s. Made by "
        "`python benchmarks/best_config_accuracy.py`.", "",
        "Points and PSNR are against the first row of the same schedule (f32 inference, no cache). compare_peers' "
        "'diffship best' must stay within 1 point of it.", "",
        "| configuration | schedule | inference precision (UNet) | colour | shape | position | all | points vs f32 "
        "| PSNR dB vs f32 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        points = f"{r['points_from_reference']:+.1f}" if "points_from_reference" in r else "-"
        psnr_db = r.get("psnr_db", "-")
        lines.append(f"| {r['config']} | {r['schedule']} steps | {r['precisions'].get('unet')} | {r['colour']:.1f} % "
                     f"| {r['shape']:.1f} % | {r['position']:.1f} % | {r['all']:.1f} % | {points} | {psnr_db} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
