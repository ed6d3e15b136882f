"""Image quality of each precision configuration, end to end on the tiny models, against the fp32 export.

For the tiny `sd1` and `sd2` pipelines (diffship.testing) every configuration is exported with `diffship.export`
(so each graph passed its validation bound), then the numpy pipeline generates the same images from fixed
latents and prompts on each backend. The table gives the PSNR of those images against the fp32 export's images on
the same backend (peak 1.0, pixels in [0, 1]), the number of NaN pixels and the pixel standard deviation (a black
or flat image has ~0). The fp32 export is itself compared with diffusers (torch) as the baseline row.

The second table is the SD2/SDXL VAE fp16 overflow case: the tiny sd2 model with its VAE decoder made to overflow
fp16 the way those decoders do (diffship.testing.fp16_overflow), exported fp16 with each `vae_fp16` protection.
`vae_fp16="none"` is refused by the export's validation (NaN); the table still measures that graph, produced with
the same pass functions the export applies (cleanup -> to_float16). OpenVINO's alternative, scaling activations
(ACTIVATIONS_SCALE_FACTOR) with f16 inference, is probed on this CPU and the plugin's answer recorded.

    python benchmarks/precision_quality.py     # writes benchmarks/results/precision_quality.{json,md}

Not a timed benchmark (no lock needed); takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import time
import traceback
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle on the left", "a photo of a cat"]
STEPS = 10
SEED = 0

# name: (label, export kwargs, formats)
CONFIGS = {
    "fp32": ("fp32 (reference)", {}, ["onnx", "openvino"]),
    "fp16": ("fp16, VAE kept fp32 (vae_fp16=fp32)", dict(dtype="fp16"), ["onnx", "openvino"]),
    "fp16-mixed": ("fp16, VAE mixed (vae_fp16=mixed)", dict(dtype="fp16", vae_fp16="mixed"), ["onnx", "openvino"]),
    "fp16-mixed-optimize": ("fp16, VAE mixed, optimized", dict(dtype="fp16", vae_fp16="mixed", optimize=True),
                            ["onnx", "openvino"]),
    "optimize": ("fp32 optimized (cleanup + fusions)", dict(optimize=True), ["onnx", "openvino"]),
    "int8": ("int8 weights", dict(weight_format="int8"), ["onnx", "openvino"]),
    "int4": ("int4 weights (UNet; others int8)", dict(weight_format="int4"), ["onnx", "openvino"]),
    "hybrid": ("hybrid int8 (UNet weights + activations)", dict(quantize="hybrid", calibration_prompts=PROMPTS),
               ["openvino"]),
}
BACKENDS = {"onnx": "onnxruntime", "openvino": "openvino"}


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB for images in [0, 1]; None when either holds NaN (no meaningful figure)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def latents_for(kind: str) -> np.ndarray:
    return np.random.default_rng(SEED).standard_normal((len(PROMPTS), 4, 32, 32)).astype(np.float32)


def generate(export_dir: Path, backend: str, kind: str, **backend_options) -> np.ndarray:
    from diffship.pipelines import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(export_dir, backend=backend, **backend_options)
    pipe.set_progress_bar_config(disable=True)
    with np.errstate(all="ignore"):
        return pipe(PROMPTS, num_inference_steps=STEPS, latents=latents_for(kind), output_type="np").images


def diffusers_images(model_dir: Path, kind: str) -> np.ndarray:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=STEPS, latents=torch.from_numpy(latents_for(kind)),
                    output_type="np").images


def figures(images: np.ndarray, reference: np.ndarray) -> dict:
    value = psnr(images, reference)
    return {
        "psnr_db": None if value is None else (round(value, 2) if np.isfinite(value) else "inf"),
        "nan_pixels": int(np.isnan(images).sum()),
        "std": round(float(np.nanstd(images)), 4) if not np.isnan(images).all() else None,
        "max_abs_diff": None if value is None else round(float(np.max(np.abs(images - reference))), 5),
    }


def unet_validation(report: dict, backend: str) -> dict:
    v = report["components"]["unet"]["validation"].get(backend, {})
    return {"unet_max_abs": v.get("max_abs"), "unet_max_rel": v.get("max_rel"), "unet_precision": v.get("precision")}


def quality_table(work: Path, kinds: list[str]) -> list[dict]:
    from diffship.exporters import export
    from diffship.testing.tiny_models import save_tiny_pipeline

    rows = []
    for kind in kinds:
        model = save_tiny_pipeline(work / "models" / kind, kind)
        torch_images = diffusers_images(model, kind)
        references = {}
        for name, (label, kwargs, formats) in CONFIGS.items():
            start = time.perf_counter()
            out = export(model, work / "exports" / f"{kind}-{name}", formats, progress=False, overwrite=True, **kwargs)
            export_s = time.perf_counter() - start
            report = json.loads((out / "export_report.json").read_text())
            for fmt in formats:
                backend = BACKENDS[fmt]
                images = generate(out, backend, kind)
                if name == "fp32":
                    references[backend] = images
                    row = {"model": kind, "config": name, "label": "fp32 vs diffusers (torch)", "backend": backend,
                           **figures(images, torch_images)}
                else:
                    row = {"model": kind, "config": name, "label": label, "backend": backend,
                           **figures(images, references[backend])}
                row.update(unet_validation(report, backend), export_s=round(export_s, 1),
                           passes=sorted({p["pass"] for c in report["components"].values() for p in c["passes"]
                                          if p["format"] == fmt}))
                rows.append(row)
                print(kind, name, backend, row["psnr_db"], "NaN" if row["nan_pixels"] else "", flush=True)
            if name == "fp32":
                # OpenVINO's CPU plugin default on this CPU: fp32 graphs computed in bf16.
                images = generate(out, "openvino", kind, inference_precision="bf16")
                rows.append({"model": kind, "config": "fp32-bf16-inference",
                             "label": "fp32 IR, bf16 inference (OpenVINO CPU default here)", "backend": "openvino",
                             **figures(images, references["openvino"]), **unet_validation(report, "openvino"),
                             "passes": []})
                print(kind, "bf16 inference", rows[-1]["psnr_db"], flush=True)
    return rows


def unprotected_vae_export(protected: Path, target: Path) -> Path:
    """A copy of an fp16 export whose vae_decoder is converted to fp16 without protection, with the same pass
    functions the export applies for vae_fp16="none" (cleanup -> to_float16)."""
    import onnx

    from diffship.graphs.cleanup import cleanup
    from diffship.graphs.external_data import save_model
    from diffship.graphs.float16 import to_float16

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(protected, target)
    graph = target / "vae_decoder" / "model.onnx"
    save_model(to_float16(cleanup(onnx.load(str(graph)))), graph)
    return target


def probe_openvino_activation_scaling() -> dict:
    """What this CPU's OpenVINO plugin says to f16 inference and to ACTIVATIONS_SCALE_FACTOR."""
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints
    from openvino import opset13 as ops

    core = ov.Core()
    x = ops.parameter([1, 4], np.float32, name="x")
    model = ov.Model([ops.multiply(x, ops.constant(np.full((1, 4), 1e5, np.float32)))], [x])
    result = {
        "openvino": ov.__version__,
        "cpu_capabilities": list(core.get_property("CPU", props.device.capabilities)),
        "cpu_default_inference_precision": core.get_property("CPU", hints.inference_precision).get_type_name(),
        "activations_scale_factor_in_supported_properties":
            "ACTIVATIONS_SCALE_FACTOR" in core.get_property("CPU", props.supported_properties),
        "attempts": [],
    }
    attempts = [
        ("INFERENCE_PRECISION_HINT=f16", {hints.inference_precision: ov.Type.f16}),
        ("INFERENCE_PRECISION_HINT=f16 + ACTIVATIONS_SCALE_FACTOR=8",
         {hints.inference_precision: ov.Type.f16, hints.activations_scale_factor: 8.0}),
        ("ACTIVATIONS_SCALE_FACTOR=8 alone", {hints.activations_scale_factor: 8.0}),
    ]
    for label, config in attempts:
        entry = {"config": label}
        try:
            compiled = core.compile_model(model, "CPU", config)
            entry["compiled"] = True
            entry["effective_inference_precision"] = compiled.get_property(hints.inference_precision).get_type_name()
        except Exception as e:  # the plugin's own exception type
            entry["compiled"] = False
            entry["error"] = " ".join(str(e).split())
        result["attempts"].append(entry)
    # Optimum Intel also writes the factor into the model's rt_info (runtime_options), where the GPU plugin reads it.
    model.set_rt_info("8.0", ["runtime_options", "ACTIVATIONS_SCALE_FACTOR"])
    compiled = core.compile_model(model, "CPU", {hints.inference_precision: ov.Type.f16})
    result["attempts"].append({
        "config": "rt_info runtime_options/ACTIVATIONS_SCALE_FACTOR=8 + INFERENCE_PRECISION_HINT=f16",
        "compiled": True,
        "effective_inference_precision": compiled.get_property(hints.inference_precision).get_type_name(),
        "note": "accepted and ignored: the CPU plugin has no activations-scaling pass",
    })
    return result


def overflow_table(work: Path) -> tuple[list[dict], dict]:
    from diffship.errors import ValidationError
    from diffship.exporters import export
    from diffship.testing.fp16_overflow import make_vae_overflow_fp16
    from diffship.testing.tiny_models import save_tiny_pipeline

    model = make_vae_overflow_fp16(save_tiny_pipeline(work / "models" / "sd2-vae-overflow", "sd2"))
    kind = "sd2"
    rows = []
    fp32 = export(model, work / "exports" / "overflow-fp32", ["onnx", "openvino"], progress=False, overwrite=True)
    reference = {b: generate(fp32, b, kind) for b in ("onnxruntime", "openvino")}
    fp32_report = json.loads((fp32 / "export_report.json").read_text())
    dec = fp32_report["components"]["vae_decoder"]["validation"]["onnxruntime"]
    print("overflow model fp32 vae_decoder max_abs", dec["max_abs"], flush=True)

    def add(protection, backend, outcome, images=None, ref=None, **extra):
        row = {"model": "sd2 + overflowing VAE", "vae_fp16": protection, "backend": backend, "export": outcome}
        if images is not None:
            row.update(figures(images, ref if ref is not None else reference[backend]))
        row.update(extra)
        rows.append(row)
        print("overflow", protection, backend, outcome, row.get("psnr_db"), row.get("nan_pixels"), flush=True)

    # vae_fp16=none: refused by validation; measure the graph anyway.
    try:
        export(model, work / "exports" / "overflow-none", "onnx", dtype="fp16", vae_fp16="none", progress=False,
               overwrite=True)
        refused = None
    except ValidationError as e:
        refused = str(e)
    protected = {}
    for protection in ("fp32", "mixed"):
        out = export(model, work / "exports" / f"overflow-{protection}", ["onnx", "openvino"], dtype="fp16",
                     vae_fp16=protection, progress=False, overwrite=True)
        protected[protection] = out
    unprotected = unprotected_vae_export(protected["fp32"], work / "exports" / "overflow-none-unvalidated")
    add("none", "onnxruntime", "refused by validation" if refused else "accepted (protection missing!)",
        generate(unprotected, "onnxruntime", kind), error=refused,
        note="images from the graph the export refused, rebuilt with cleanup -> to_float16")
    for protection, out in protected.items():
        report = json.loads((out / "export_report.json").read_text())
        decoder = report["components"]["vae_decoder"]
        for backend in ("onnxruntime", "openvino"):
            add(protection, backend, "validated", generate(out, backend, kind),
                vae_decoder_precision=decoder["precision"][backend],
                vae_decoder_max_rel=decoder["validation"][backend]["max_rel"],
                vae_decoder_passes=[p["pass"] for p in decoder["passes"]
                                    if p["format"] == ("onnx" if backend == "onnxruntime" else "openvino")])
    # OpenVINO: the fp16 IR stores weights in fp16 and computes in the inference precision. On this CPU f16
    # inference is not available (the hint falls back to bf16, which has fp32's range: no overflow).
    try:
        ov_none = export(model, work / "exports" / "overflow-none-openvino", "openvino", dtype="fp16",
                         vae_fp16="none", progress=False, overwrite=True)
        add("none (fp16 IR, f32 inference)", "openvino", "validated", generate(ov_none, "openvino", kind))
        for precision in ("bf16", "f16"):
            add(f"none (fp16 IR, inference_precision={precision})", "openvino", "not validated (runtime option)",
                generate(ov_none, "openvino", kind, inference_precision=precision),
                note="f16 resolves to bf16 on this CPU (no FP16 capability)" if precision == "f16" else None)
    except Exception as e:  # recorded, not fatal: the table says what happened
        add("none (fp16 IR)", "openvino", f"failed: {' '.join(str(e).split())[:400]}")
    probe = probe_openvino_activation_scaling()
    return rows, probe


def machine() -> dict:
    import importlib.metadata as md

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    versions = {}
    for name in ("diffship", "torch", "diffusers", "onnx", "onnxruntime", "openvino", "nncf", "onnxslim", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "versions": versions, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def _fmt_psnr(row) -> str:
    value = row.get("psnr_db")
    if value is None:
        return "NaN" if row.get("nan_pixels") else "-"
    return "identical" if value == "inf" else f"{value:.1f}"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Precision: image quality against fp32, end to end (tiny models)",
        "",
        f"Tiny `sd1` / `sd2` pipelines (diffship.testing, random weights), {len(PROMPTS)} prompts "
        f"{PROMPTS}, fixed latents (numpy seed {SEED}), {STEPS} steps, guidance 7.5, the model's scheduler "
        "(sd1: PNDM, sd2: DDIM v-prediction), 64x64 images. Every configuration was exported with "
        "`diffship.export` (each graph passed its validation bound) and run with the numpy pipeline. "
        "PSNR (dB, peak 1.0) is against the fp32 export's images on the same backend; the fp32 row is against "
        "diffusers (torch). NaN = NaN pixels; std = pixel standard deviation (about 0 for a black or flat image). "
        "UNet max rel = the export's validation figure for the UNet (max error / max |output|).",
        "",
        "Random weights draw noise, so PSNR is all these models can show. The same configurations on the trained "
        "shapes model, with the accuracy of what it draws (colour, shape, position) next to PSNR: "
        "[shapes_accuracy.md](shapes_accuracy.md#precision-accuracy-next-to-psnr).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f". {m['date']}, load average {m['load_average_at_start']} at start (shared machine; not timed). "
        f"Run time {result['run_time_s']:.0f} s.",
        "",
        "| model | configuration | backend | PSNR dB | NaN | std | UNet max rel | passes |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in result["quality"]:
        rel = r.get("unet_max_rel")
        lines.append(f"| {r['model']} | {r['label']} | {r['backend']} | {_fmt_psnr(r)} | {r['nan_pixels']} | "
                     f"{r['std'] if r['std'] is not None else '-'} | {'' if rel is None else f'{rel:.1e}'} | "
                     f"{', '.join(r.get('passes') or []) or '-'} |")
    lines += [
        "",
        "## SD2/SDXL VAE fp16 overflow",
        "",
        "The tiny sd2 model with `make_vae_overflow_fp16` (the VAE decoder's residual stream carries activations "
        "past fp16's 65504, as the SD2 and SDXL decoders do; fp32 never notices). Exported with `--dtype fp16` and "
        "each `--vae-fp16` protection; PSNR against the fp32 export of the same model.",
        "",
        "| vae_fp16 | backend | export | PSNR dB | NaN | std |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in result["vae_overflow"]:
        lines.append(f"| {r['vae_fp16']} | {r['backend']} | {r['export']} | {_fmt_psnr(r)} | "
                     f"{r.get('nan_pixels', '-')} | {r['std'] if r.get('std') is not None else '-'} |")
    refused = next((r.get("error") for r in result["vae_overflow"] if r["vae_fp16"] == "none" and r.get("error")), None)
    if refused:
        lines += ["", f"The export's refusal (vae_fp16=none): `{refused}`"]
    probe = result["openvino_activation_scaling"]
    lines += [
        "",
        "### OpenVINO's activation scaling (ACTIVATIONS_SCALE_FACTOR) on this CPU",
        "",
        f"OpenVINO {probe['openvino']}, CPU capabilities {probe['cpu_capabilities']}, default inference precision "
        f"{probe['cpu_default_inference_precision']}; ACTIVATIONS_SCALE_FACTOR in the CPU plugin's supported "
        f"properties: {probe['activations_scale_factor_in_supported_properties']}.",
        "",
        "| compile config | compiled | effective inference precision | error |",
        "| --- | --- | --- | --- |",
    ]
    for a in probe["attempts"]:
        lines.append(f"| {a['config']} | {a['compiled']} | {a.get('effective_inference_precision', '-')} | "
                     f"{a.get('error') or a.get('note') or ''} |")
    lines += ["", result["conclusion"], ""]
    return "\n".join(lines)


CONCLUSION = (
    "Conclusion: scaling activations cannot be measured on this machine. The CPU plugin rejects "
    "ACTIVATIONS_SCALE_FACTOR (it is a GPU-plugin property; Optimum Intel sets it for Intel GPUs), ignores it in "
    "the model's rt_info, and has no f16 inference on this CPU (no FP16 capability: the f16 hint silently becomes "
    "bf16, whose exponent range is fp32's, so nothing overflows and nothing needs scaling). On CPU, OpenVINO's fp16 "
    "IR only stores weights in fp16 and computes in f32 (or bf16), so the overflow cannot happen there at all. "
    "For ONNX Runtime, where fp16 graphs really compute in fp16, both protections that diffship offers (keep the "
    "VAE fp32; mixed: the overflowing nodes fp32) remove the NaN."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "precision-quality")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--kinds", nargs="*", default=["sd1", "sd2"])
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the committed .json")
    args = parser.parse_args()
    if args.markdown_only:
        result = json.loads((args.out / "precision_quality.json").read_text())
        (args.out / "precision_quality.md").write_text(markdown(result))
        return

    start = time.perf_counter()
    result = {"benchmark": "precision_quality", "prompts": PROMPTS, "steps": STEPS, "latent_seed": SEED,
              "machine": machine()}
    result["quality"] = quality_table(args.work, args.kinds)
    result["vae_overflow"], result["openvino_activation_scaling"] = overflow_table(args.work)
    result["conclusion"] = CONCLUSION
    result["run_time_s"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "precision_quality.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise SystemExit(1)
