"""The reverse interop check: a diffship export loads in Optimum's ORT and OpenVINO pipelines and gives diffusers'
images. Runs in the Optimum venv (benchmarks/peers/setup_optimum_venv.sh); `check_optimum_loads_diffship.sh` makes
the inputs with diffship's venv and calls it:

    .venv-optimum/bin/python benchmarks/peers/check_optimum_loads_diffship.py --export DIFFSHIP_EXPORT \
        --source TINY_MODEL [--work DIR] [--out benchmarks/results/optimum_loads_diffship]

DIFFSHIP_EXPORT is `diffship export TINY_MODEL DIFFSHIP_EXPORT --backend onnx,openvino` (each component folder holds
model.onnx and openvino_model.xml side by side); TINY_MODEL is the diffusers source (text encoder in the Hub layout,
so that this venv's transformers 4.x reads it).

What is compared: diffusers' StableDiffusionPipeline (torch, this venv) on TINY_MODEL, and Optimum's
ORTStableDiffusionPipeline.from_pretrained(DIFFSHIP_EXPORT) and OVStableDiffusionPipeline.from_pretrained(
DIFFSHIP_EXPORT, ov_config={"INFERENCE_PRECISION_HINT": "f32"}), with the same prompts (a batch of 2), latents (a
fixed array) and scheduler (PNDM, DDIM, Euler; diffusers' classes on every side), with and without guidance,
output_type="np": max abs difference of the images in [0, 1] against the bound 1e-3. Also recorded: OpenVINO with
the CPU plugin's default precision (bf16 where the CPU has it), and, if a pipeline fails to load the combined
directory, the error and a retry on a copy holding only that runtime's files.

Writes OUT.json (everything) and OUT.md (the summary, also printed). Exit status 1 if a pipeline failed to load or
a difference exceeds the bound.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
import traceback
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

ATOL = 1e-3
PROMPTS = ["a red circle on the left", "an oil painting of a castle at sunset"]
STEPS = 4
SCHEDULERS = ("PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler")
GUIDANCE = (7.5, 1.0)
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
VERSIONS = ["optimum", "optimum-onnx", "optimum-intel", "onnxruntime", "openvino", "diffusers", "transformers",
            "torch", "numpy"]
# The files of each runtime in a component folder, for the retry on a single-format copy.
FORMAT_FILES = {"onnx": ("model.onnx", "model.onnx_data"), "openvino": ("openvino_model.xml", "openvino_model.bin")}


def latents() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).standard_normal((2, 4, 32, 32)).astype(np.float32))


def generate(pipe, scheduler: str, guidance_scale: float) -> np.ndarray:
    import diffusers

    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    out = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale, latents=latents(),
               output_type="np")
    return np.asarray(out.images)


def single_format_copy(export: Path, fmt: str, work: Path) -> Path:
    """A copy of the export without the other runtime's graph files."""
    other = FORMAT_FILES["openvino" if fmt == "onnx" else "onnx"]
    dst = work / f"diffship-export-{fmt}-only"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(export, dst, ignore=lambda _d, names: [n for n in names if n in other])
    return dst


def load(kind: str, path: Path, **kwargs):
    if kind == "ort":
        from optimum.onnxruntime import ORTStableDiffusionPipeline as cls
    else:
        from optimum.intel import OVStableDiffusionPipeline as cls
    t0 = time.perf_counter()
    pipe = cls.from_pretrained(str(path), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe, round(time.perf_counter() - t0, 2)


def describe_pipe(pipe) -> dict:
    """Each component's class, graph file and graph inputs, as the loaded pipeline holds them."""
    parts = {}
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        part = getattr(pipe, name, None)
        if part is None:
            continue
        session = getattr(part, "session", None)
        if session is not None:  # ORT
            path = rel(Path(getattr(part, "path", "") or ""))
            inputs = [f"{i.name}: {i.type} {i.shape}" for i in session.get_inputs()]
        else:  # OpenVINO: OVStableDiffusionPipeline reads <component>/openvino_model.xml unless from_onnx=True
            path = "openvino_model.xml (optimum-intel's default file name, from_onnx=False)"
            inputs = [f"{p.get_any_name()}: {p.get_element_type().get_type_name()} {p.get_partial_shape()}"
                      for p in part.model.inputs]
        parts[name] = {"class": type(part).__name__, "graph": path, "inputs": inputs}
    return {"class": type(pipe).__name__, "tokenizer": type(pipe.tokenizer).__name__, "components": parts}


def check_load(name: str, kind: str, export: Path, work: Path, reference: dict, settings, **kwargs) -> dict:
    res: dict = {"pipeline": "ORTStableDiffusionPipeline" if kind == "ort" else "OVStableDiffusionPipeline",
                 "from_pretrained_kwargs": {k: v for k, v in kwargs.items()}, "dir": rel(export)}
    try:
        pipe, res["load_s"] = load(kind, export, **kwargs)
        res["loaded_from"] = "combined export (model.onnx and openvino_model.xml side by side)"
    except Exception as exc:
        res["combined_dir_error"] = f"{type(exc).__name__}: {exc}"[:800]
        res["combined_dir_traceback"] = traceback.format_exc().strip().splitlines()[-6:]
        single = single_format_copy(export, "onnx" if kind == "ort" else "openvino", work)
        try:
            pipe, res["load_s"] = load(kind, single, **kwargs)
            res["loaded_from"] = f"single-format copy {single.name}"
        except Exception as exc2:
            res["error"] = f"{type(exc2).__name__}: {exc2}"[:800]
            res["traceback"] = traceback.format_exc().strip().splitlines()[-6:]
            res["ok"] = False
            print(f"  {name}: FAILED to load: {res['error']}")
            return res
    res["described"] = describe_pipe(pipe)
    res["runs"] = {}
    for scheduler, guidance_scale in settings:
        key = f"{scheduler} guidance={guidance_scale}"
        t0 = time.perf_counter()
        try:
            images = generate(pipe, scheduler, guidance_scale)
            diff = float(np.abs(images - reference[scheduler, guidance_scale]).max())
            res["runs"][key] = {"max_abs_diff": diff, "seconds": round(time.perf_counter() - t0, 2),
                                "shape": list(images.shape)}
        except Exception as exc:
            res["runs"][key] = {"error": f"{type(exc).__name__}: {exc}"[:800],
                                "traceback": traceback.format_exc().strip().splitlines()[-6:]}
        print(f"  {name} {key}: {res['runs'][key].get('max_abs_diff', res['runs'][key].get('error'))}")
    diffs = [r["max_abs_diff"] for r in res["runs"].values() if "max_abs_diff" in r]
    res["max_abs_diff"] = max(diffs) if diffs else None
    res["ok"] = len(diffs) == len(res["runs"])
    return res


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def versions() -> dict:
    out = {}
    for n in VERSIONS:
        try:
            out[n] = version(n)
        except Exception:
            out[n] = None
    return out


def write_markdown(report: dict, path: Path) -> str:
    lines = [
        "# Optimum loads diffship's exports",
        "",
        f"Date: {report['date']}. Machine: {report['machine']}. "
        "Made by `bash benchmarks/peers/check_optimum_loads_diffship.sh`.",
        "",
        f"diffship {report['diffship_version']} exported `diffship tiny-model --kind sd1` with "
        "`--backend onnx,openvino` (one directory, `model.onnx` and `openvino_model.xml` side by side in each "
        "component folder). Optimum's pipelines loaded that directory as is and generated; diffusers (torch) on the "
        f"source model is the oracle. Same prompts (batch of 2), latents and scheduler, {STEPS} steps, 64x64, "
        f"output_type np; bound {ATOL:g} max abs.",
        "",
        "Optimum venv: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
        "| pipeline | loaded from | "
        + " | ".join(f"{s.replace('Scheduler', '')} g={g:g}" for s, g in report["settings"]) + " | max |",
        "| --- | --- | " + " | ".join("---:" for _ in report["settings"]) + " | ---: |",
    ]
    for name, res in report["loads"].items():
        cells = []
        for s, g in report["settings"]:
            run = res.get("runs", {}).get(f"{s} guidance={g}")
            cells.append("-" if run is None else (f"{run['max_abs_diff']:.1e}" if "max_abs_diff" in run else "error"))
        worst = f"{res['max_abs_diff']:.1e}" if res.get("max_abs_diff") is not None else "failed"
        lines.append(f"| {name} | {res.get('loaded_from', 'failed: ' + res.get('error', ''))} | " + " | ".join(cells)
                     + f" | {worst} |")
    lines += ["", f"Result: **{'pass' if report['passed'] else 'FAIL'}** (every f32 run within {ATOL:g})."]
    notes = []
    for name, res in report["loads"].items():
        if "combined_dir_error" in res:
            notes.append(f"- {name}: the combined directory did not load: `{res['combined_dir_error']}`")
        for key, run in res.get("runs", {}).items():
            if "error" in run:
                notes.append(f"- {name} {key}: `{run['error']}`")
    if notes:
        lines += ["", "Errors:", "", *notes]
    lines += ["", *(f"- {note}" for note in report["notes"])]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, required=True, help="diffship export (--backend onnx,openvino)")
    parser.add_argument("--source", type=Path, required=True, help="the diffusers model it was exported from")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: beside --export)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/optimum_loads_diffship"))
    parser.add_argument("--diffship-version", default="unknown")
    args = parser.parse_args()
    # Absolute paths: optimum-intel takes a relative one for a hub id before it finds the folder.
    args.export, args.source = args.export.resolve(), args.source.resolve()
    work = (args.work or args.export.parent).resolve()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    import diffusers
    import openvino as ov

    settings = [(s, g) for s in SCHEDULERS for g in GUIDANCE]
    print("diffusers (torch) reference")
    ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(args.source), safety_checker=None)
    ref_pipe.set_progress_bar_config(disable=True)
    reference = {(s, g): generate(ref_pipe, s, g) for s, g in settings}
    prompts_differ = float(np.abs(reference[settings[0]][0] - reference[settings[0]][1]).max())

    loads = {
        "ORT <- diffship export": check_load("ORT", "ort", args.export, work, reference, settings),
        "OV f32 <- diffship export": check_load("OV f32", "ov", args.export, work, reference, settings,
                                                ov_config=F32),
        # For information: the CPU plugin's default precision (not held to the bound).
        "OV default precision <- diffship export": check_load(
            "OV default", "ov", args.export, work, reference, settings[:1]),
    }
    core = ov.Core()
    hint = core.get_property("CPU", "INFERENCE_PRECISION_HINT")
    default_precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    passed = all(loads[k]["ok"] and loads[k]["max_abs_diff"] <= ATOL
                 for k in ("ORT <- diffship export", "OV f32 <- diffship export"))
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "diffship_version": args.diffship_version,
        "versions": versions(),
        "export": rel(args.export),
        "source": rel(args.source),
        "prompts": PROMPTS,
        "steps": STEPS,
        "atol": ATOL,
        "settings": settings,
        "reference_prompts_differ_by": prompts_differ,
        "openvino_cpu_default_inference_precision": default_precision,
        "loads": loads,
        "passed": passed,
        "notes": [
            f"OpenVINO's CPU plugin defaults to {default_precision} inference here; the 'OV default precision' row "
            "shows what Optimum's OV pipeline gives without `ov_config={\"INFERENCE_PRECISION_HINT\": \"f32\"}` "
            "(not held to the bound).",
            f"The two prompts' reference images differ by {prompts_differ:.2f} max abs, so the text path matters.",
            *[f"UNet inputs as {k.split(' <-')[0]} loaded them: "
              + "; ".join(v["described"]["components"]["unet"]["inputs"])
              for k, v in loads.items() if "described" in v and not k.startswith("OV default")],
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(write_markdown(report, args.out.with_suffix(".md")))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
