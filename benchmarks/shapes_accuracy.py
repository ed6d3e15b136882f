"""How often the trained shapes model draws what it is asked, scored from pixels, on every side and precision.

For all 60 prompts "a {colour} {shape} on the {position}" and 3 seeds (one image per prompt and seed, 180
images), DDIM with 25 steps and guidance 6, the same initial latents everywhere (numpy, one array per seed):

1. diffusers (torch) against diffship on ONNX Runtime and on OpenVINO (fp32 export, f32 inference): the accuracy
   of colour, shape and position (diffship.testing.shapes.score) and how far each diffship figure is from
   diffusers'. A picture grid of seed 0 per side.
2. Every precision configuration of benchmarks/precision_quality.py exported from this model (fp16, int8, int4,
   hybrid int8; bf16 inference), with the same accuracies next to its PSNR against the fp32 export's images.

    python benchmarks/shapes_accuracy.py [--model DIR]   # default: the model shipped in diffship.testing

Writes benchmarks/results/shapes_accuracy.{json,md} and shapes_grid_{torch,onnxruntime,openvino}.png. Not a timed
benchmark; about 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from precision_quality import BACKENDS, CONFIGS, machine, psnr, unet_validation  # noqa: E402

from diffship.testing import shapes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 25
GUIDANCE = 6.0
SEEDS = (0, 1, 2)
PROMPTS = list(shapes.PROMPTS)


def latents_for(seed: int, model_dir: Path) -> np.ndarray:
    config = json.loads((model_dir / "unet" / "config.json").read_text())
    size = config["sample_size"]
    return np.random.default_rng(seed).standard_normal((len(PROMPTS), config["in_channels"], size, size),
                                                       dtype=np.float32)


def torch_images(model_dir: Path) -> dict[int, np.ndarray]:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return {seed: pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                           latents=torch.from_numpy(latents_for(seed, model_dir))).images for seed in SEEDS}


def diffship_images(export_dir: Path, backend: str, model_dir: Path, **options) -> dict[int, np.ndarray]:
    from diffship.pipelines import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(export_dir, backend=backend, **options)
    pipe.set_progress_bar_config(disable=True)
    with np.errstate(all="ignore"):
        return {seed: pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                           latents=latents_for(seed, model_dir)).images for seed in SEEDS}


def accuracy(images: dict[int, np.ndarray]) -> dict:
    """Accuracy over all seeds, plus per seed (to show the spread)."""
    results = {seed: shapes.score(batch, PROMPTS) for seed, batch in images.items()}
    every = [r for seed in results for r in results[seed]]
    return {**{k: round(v, 2) for k, v in shapes.accuracy(every).items()},
            "per_seed": {seed: {k: round(v, 2) for k, v in shapes.accuracy(r).items()} for seed, r in results.items()}}


def stacked(images: dict[int, np.ndarray]) -> np.ndarray:
    return np.concatenate([images[s] for s in SEEDS])


def save_grid(images: np.ndarray, title: str, path: Path) -> None:
    """12 rows (colour x shape) by 5 columns (positions) of 2x-enlarged images, labelled."""
    from PIL import Image, ImageDraw

    cell, left, top = 2 * shapes.SIZE + 4, 110, 40
    positions, rows = list(shapes.POSITIONS), [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
    grid = Image.new("RGB", (left + cell * len(positions), top + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), title, fill="black")
    for j, position in enumerate(positions):
        draw.text((left + j * cell + 4, top - 14), position, fill="black")
    for i, (colour, shape) in enumerate(rows):
        draw.text((4, top + i * cell + cell // 2 - 6), f"{colour} {shape}", fill="black")
        for j, position in enumerate(positions):
            image = images[PROMPTS.index(shapes.make_prompt(colour, shape, position))]
            tile = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).resize(
                (2 * shapes.SIZE, 2 * shapes.SIZE), Image.NEAREST)
            grid.paste(tile, (left + j * cell + 2, top + i * cell + 2))
    grid.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a diffusers directory (default: the shipped shapes model)")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "shapes-accuracy")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-precision", action="store_true", help="only the fp32 table")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the committed .json")
    args = parser.parse_args()
    if args.markdown_only:
        result = json.loads((args.out / "shapes_accuracy.json").read_text())
        (args.out / "shapes_accuracy.md").write_text(markdown(result))
        return

    from diffship.exporters import export

    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    model = (args.model or shapes.TRAINED_MODEL).resolve()
    sides = {"torch": torch_images(model)}
    fp32 = export(model, args.work / "fp32", list(BACKENDS), progress=False, overwrite=True)
    for backend in BACKENDS.values():
        sides[backend] = diffship_images(fp32, backend, model)
    rows = []
    for side, images in sides.items():
        row = {"side": side, **accuracy(images)}
        if side != "torch":
            row["max_abs_vs_torch"] = float(np.max(np.abs(stacked(images) - stacked(sides["torch"]))))
            row["points_from_torch"] = {a: round(row[a] - rows[0][a], 2) for a in (*shapes.ATTRIBUTES, "all")}
        rows.append(row)
        print(side, {a: row[a] for a in (*shapes.ATTRIBUTES, "all")}, flush=True)
        save_grid(images[SEEDS[0]], f"{side}: DDIM {STEPS} steps, guidance {GUIDANCE}, seed {SEEDS[0]}",
                  args.out / f"shapes_grid_{side}.png")

    precision_rows = []
    if not args.no_precision:
        precision_rows = precision_table(model, args.work, {b: sides[b] for b in BACKENDS.values()})

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{machine()['cpu']}, {os.cpu_count()} cores",
        "model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model),
        "training": _training_summary(model),
        "steps": STEPS, "guidance_scale": GUIDANCE, "seeds": list(SEEDS), "scheduler": "DDIMScheduler",
        "images": len(PROMPTS) * len(SEEDS), "versions": machine()["versions"],
        "rows": rows, "precision": precision_rows, "run_seconds": round(time.perf_counter() - started),
    }
    (args.out / "shapes_accuracy.json").write_text(json.dumps(result, indent=1))
    (args.out / "shapes_accuracy.md").write_text(markdown(result))


def precision_table(model: Path, work: Path, fp32_images: dict[str, dict]) -> list[dict]:
    from diffship.exporters import export

    calibration = {"calibration_prompts": PROMPTS[::7]}
    runs = [("fp32-bf16-inference", "fp32 IR, bf16 inference", work / "fp32", "openvino",
             {"inference_precision": "bf16"})]
    for name, (label, kwargs, formats) in CONFIGS.items():
        if name == "fp32":
            continue
        kwargs = {**kwargs, **calibration} if "calibration_prompts" in kwargs else kwargs
        out = export(model, work / name, formats, progress=False, overwrite=True, **kwargs)
        runs += [(name, label, out, BACKENDS[fmt], {}) for fmt in formats]
    rows = []
    for name, label, out, backend, options in runs:
        images = diffship_images(out, backend, model, **options)
        report = json.loads((out / "export_report.json").read_text())
        value = psnr(stacked(images), stacked(fp32_images[backend]))
        row = {"config": name, "label": label, "backend": backend, **accuracy(images),
               "psnr_db": None if value is None else round(value, 2),
               "nan_pixels": int(np.isnan(stacked(images)).sum()), **unet_validation(report, backend)}
        rows.append(row)
        print(name, backend, row["psnr_db"], {a: row[a] for a in shapes.ATTRIBUTES}, flush=True)
    return rows


def _training_summary(model: Path) -> dict | None:
    path = model / "training_log.json"
    if not path.is_file():
        return None
    log = json.loads(path.read_text())
    return {k: log[k] for k in ("total_seconds", "vae_seconds", "threads", "parameters", "machine") if k in log}


def _pct(row: dict) -> str:
    return " | ".join(f"{row[a]:.1f} %" for a in (*shapes.ATTRIBUTES, "all"))


def markdown(result: dict) -> str:
    t = result.get("training") or {}
    params = t.get("parameters", {})
    lines = [
        "# The trained shapes model: does it draw what it is asked?", "",
        f"{result['date']} · {result['machine']} · diffship {result['versions']['diffship']}, torch "
        f"{result['versions']['torch']}, diffusers {result['versions']['diffusers']}, onnxruntime "
        f"{result['versions']['onnxruntime']}, openvino {result['versions']['openvino']} · {result['run_seconds']} s. "
        "Made by `python benchmarks/shapes_accuracy.py`." + (f" Note: {result['note']}." if result.get("note") else ""),
        "",
        f"Model: `{result['model']}`"
        + (f" ({sum(params.values()) / 1e6:.2f} M parameters: UNet {params['unet'] / 1e6:.2f} M, VAE "
           f"{params['vae'] / 1e6:.2f} M, text encoder {params['text_encoder'] / 1e6:.2f} M; trained in "
           f"{t['total_seconds'] / 60:.1f} min on {t['threads']} threads)" if params else "") + ".",
        f"All 60 prompts \"a {{colour}} {{shape}} on the {{position}}\" x {len(result['seeds'])} seeds "
        f"({result['images']} images, one per prompt and seed), {result['scheduler']} {result['steps']} steps, "
        f"guidance {result['guidance_scale']}, the same initial latents on every side (numpy, one array per seed). "
        "Scored from pixels alone by `diffship.testing.shapes.score`: colour (nearest of 4 reference colours), "
        "shape (how much of its bounding box the shape fills), position (where its centroid lies); \"all\" is the "
        "three at once.", "",
        "| side | colour | shape | position | all | points from diffusers (colour / shape / position) | max abs vs diffusers |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for row in result["rows"]:
        points = row.get("points_from_torch")
        delta = " / ".join(f"{points[a]:+.1f}" for a in shapes.ATTRIBUTES) if points else "-"
        diff = f"{row['max_abs_vs_torch']:.1e}" if "max_abs_vs_torch" in row else "-"
        name = {"torch": "diffusers (torch)", "onnxruntime": "diffship ONNX Runtime (fp32)",
                "openvino": "diffship OpenVINO (fp32, f32 inference)"}[row["side"]]
        lines.append(f"| {name} | {_pct(row)} | {delta} | {diff} |")
    lines += ["", "Per seed (colour / shape / position):", ""]
    for row in result["rows"]:
        per = "; ".join(f"seed {s}: " + " / ".join(f"{v[a]:.0f}" for a in shapes.ATTRIBUTES)
                        for s, v in row["per_seed"].items())
        lines.append(f"- {row['side']}: {per}")
    lines += ["", "Seed 0, every prompt (rows: colour and shape; columns: position):", "",
              "| diffusers (torch) | diffship ONNX Runtime | diffship OpenVINO |", "| --- | --- | --- |",
              "| ![torch](shapes_grid_torch.png) | ![ort](shapes_grid_onnxruntime.png) | "
              "![ov](shapes_grid_openvino.png) |"]
    if result["precision"]:
        lines += [
            "", "## Precision: accuracy next to PSNR", "",
            "Each configuration of `benchmarks/precision_quality.py` exported from this model with `diffship.export` "
            "(each graph passed its validation bound) and run on the same 180 latents. PSNR (dB, peak 1.0, pixels "
            "in [0, 1]) is against the fp32 export's images on the same backend (the fp32 rows above).", "",
            "| configuration | backend | PSNR dB | colour | shape | position | all | UNet max rel |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in result["precision"]:
            value = "NaN" if row["psnr_db"] is None else f"{row['psnr_db']:.1f}"
            rel = f"{row['unet_max_rel']:.1e}" if row.get("unet_max_rel") is not None else "-"
            lines.append(f"| {row['label']} | {row['backend']} | {value} | {_pct(row)} | {rel} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
