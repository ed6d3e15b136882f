"""Latency benchmarks of exported pipelines: `diffship bench`, and the pieces benchmarks/compare_peers.py builds on.

Each backend runs in its own worker process (cold start and peak RSS are its own), the workers are loaded one after
another and then run in turn, run by run; the figures are medians (and p90) over the timed runs after warm-up.
See `summary.py` for the JSON schema.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

from diffship.benchmarking.interleave import Contestant, run_rounds, start_all
from diffship.benchmarking.machine import load_average, machine_info, now, versions
from diffship.benchmarking.summary import SCHEMA, attach_roofline
from diffship.errors import BackendError, DiffshipError
from diffship.layout import TENSORRT_ENGINE, TRANSFORMER, UNET
from diffship.runtimes import backends_for, choose_backend, graph_folders

# Backend name -> the module that must import for it.
BACKEND_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}
TASKS = ("text-to-image", "image-to-image")


def installed_backends() -> list[str]:
    """The diffship backends whose runtime package is installed here."""
    from diffship.runtimes import BACKENDS

    return [b for b in BACKENDS if importlib.util.find_spec(BACKEND_MODULES.get(b, b)) is not None]


def runnable_backends(model_dir) -> list[str]:
    """The installed backends that can run every graph in `model_dir` (an OpenVINO-only export has no onnxruntime
    row; OpenVINO also runs ONNX graphs)."""
    folders = graph_folders(model_dir)
    # TensorRT only where the export built engines: elsewhere it would build them first (minutes at full size).
    return [b for b in installed_backends() if b in backends_for(folders)
            and (b != "tensorrt" or any((f / TENSORRT_ENGINE).is_file() for f in folders))]


def check_backend(name: str) -> str:
    """The canonical backend name, or an error that says why it cannot run here: for tensorrt, TensorRT, CUDA's
    Python binding and a GPU are checked too (runtimes/engines.check_tensorrt), before any worker starts."""
    from diffship.runtimes import backend_name

    canonical = backend_name(name)
    if canonical == "tensorrt":
        from diffship.runtimes.engines import check_tensorrt

        check_tensorrt()
    elif importlib.util.find_spec(BACKEND_MODULES.get(canonical, canonical)) is None:
        raise BackendError(f"the {canonical} backend is not installed here: pip install diffship[{canonical}]")
    return canonical


def _config(model_dir: Path, name: str) -> dict:
    from diffship.pipelines.base import read_config

    from diffship.layout import CONFIG

    return read_config(model_dir, name) if (Path(model_dir) / name / CONFIG).is_file() else {}


def vae_scale_factor(model_dir) -> int:
    """Image pixels per latent pixel of an exported directory's VAE (8 for Stable Diffusion's)."""
    from diffship.layout import VAE_DECODER, VAE_ENCODER
    from diffship.layout import vae_scale_factor as scale_factor

    vae = _config(model_dir, VAE_DECODER) or _config(model_dir, VAE_ENCODER)
    return scale_factor(vae.get("block_out_channels", [0] * 4))


def default_size(model_dir) -> int:
    """The model's native image size: the denoiser's sample_size (the UNet's, or the transformer's) times the VAE's
    scale factor; a transformer without one (Flux) defaults to 128 latents, as its diffusers pipelines do."""
    unet = _config(model_dir, UNET)
    latent = unet.get("sample_size", 64) if unet else _config(model_dir, TRANSFORMER).get("sample_size", 128)
    return latent * vae_scale_factor(model_dir)


def check_bench_arguments(names: dict | None = None, *, runs, warmup, steps, batch_size, height, width,
                          guidance_scale, task, strength, seed, static, scheduler) -> None:
    """bench()'s arguments, checked before anything is loaded; `names` maps an argument to the name errors use
    (the command line's flags). strength None: not given."""
    from diffship.checks import MAX_SEED, check_image_size, check_int, check_number, check_scheduler_name
    from diffship.pipelines.steps import check_strength

    names = {k: (names or {}).get(k, k) for k in ("runs", "warmup", "steps", "batch_size", "height", "width",
                                                   "guidance_scale", "task", "strength", "seed", "static",
                                                   "scheduler")}
    for name, value, low in (("runs", runs, 1), ("warmup", warmup, 0), ("steps", steps, 1),
                             ("batch_size", batch_size, 1)):
        check_int(value, names[name], low)
    check_image_size({names["height"]: height, names["width"]: width})
    check_number(guidance_scale, names["guidance_scale"])
    check_int(seed, names["seed"], 0, MAX_SEED)
    if task not in TASKS:
        raise ValueError(f"{names['task']} must be one of {', '.join(TASKS)}, got {task!r}")
    if static and task != "text-to-image":
        raise ValueError(f"{names['static']} reshapes for text-to-image only")
    if task == "image-to-image" and strength is not None:
        check_strength(strength, steps, names=(names["strength"], names["steps"]))
    if scheduler is not None:
        check_scheduler_name(scheduler, names["scheduler"])  # here, not in each backend's worker


def bench(model_dir, backends: list[str] | None = None, *, height: int | None = None, width: int | None = None,
          steps: int = 25, batch_size: int = 1, runs: int = 3, warmup: int = 1, static: bool = False,
          prompt: str = "a photo of an astronaut riding a horse on mars", negative_prompt: str | None = None,
          scheduler: str | None = None, guidance_scale: float = 7.5, task: str = "text-to-image",
          strength: float = 0.75, seed: int = 0, inference_precision: str | None = None, roofline: bool = False,
          log=None, call_kwargs: dict | None = None, provider: str | None = None) -> dict:
    """Benchmark an exported directory on each backend; returns the report (schema in summary.py).

    `static`: OpenVINO reshapes to the request; TensorRT builds engines for exactly the request and replays them
    as CUDA graphs (otherwise a dynamic range around it). `provider`: onnxruntime's ("cuda", "tensorrt": its GPU
    providers)."""
    from diffship.pipelines.base import _read_index

    started, date = time.perf_counter(), now()
    check_bench_arguments(runs=runs, warmup=warmup, steps=steps, batch_size=batch_size, height=height, width=width,
                          guidance_scale=guidance_scale, task=task, strength=strength, seed=seed, static=static,
                          scheduler=scheduler)
    given = str(model_dir)
    model_dir = Path(model_dir).expanduser().resolve()
    _read_index(model_dir)  # a clear error for a directory that is not an exported pipeline
    folders = graph_folders(model_dir)
    backends = [check_backend(b) for b in (backends or runnable_backends(model_dir))]
    if not backends:
        if not installed_backends():
            raise BackendError("no backend is installed: pip install diffship[onnxruntime] or diffship[openvino]")
        raise BackendError(f"no installed backend ({', '.join(installed_backends())}) runs the graphs in {model_dir}: "
                           "install the one its graphs are for")
    for backend in backends:  # a backend the export has no graphs for: said now, not by each worker
        choose_backend(folders, backend)
    height = default_size(model_dir) if height is None else height
    width = default_size(model_dir) if width is None else width

    settings = {"model": given, "task": task, "height": height, "width": width, "steps": steps,
                "batch_size": batch_size, "guidance_scale": guidance_scale, "scheduler": scheduler, "prompt": prompt,
                "negative_prompt": negative_prompt, "runs": runs, "warmup": warmup, "seed": seed,
                "strength": strength if task != "text-to-image" else None, "call_kwargs": dict(call_kwargs or {})}
    machine = machine_info()
    contestants = []
    for backend in dict.fromkeys(backends):
        is_static = static and backend in ("openvino", "tensorrt")
        options = {}
        if inference_precision is not None and backend == "openvino":
            options["inference_precision"] = inference_precision
        if provider is not None and backend == "onnxruntime":
            options["provider"] = provider
        if backend == "tensorrt":
            options.update(tensorrt_options(batch_size, height, width, guidance_scale > 1, static))
        spec = {"model_dir": str(model_dir), "backend": backend, "static": is_static and backend == "openvino",
                "options": options,
                "call_kwargs": dict(call_kwargs or {}),
                **{k: v for k, v in settings.items() if k not in ("model", "runs", "warmup")}}
        precision = (inference_precision or "auto") if backend == "openvino" else "f32"
        name = (backend + (f" {provider}" if provider and backend == "onnxruntime" else "")
                + (" static" if is_static else "") + (f" {precision}" if precision not in ("f32", "auto") else ""))
        contestants.append(Contestant(name, spec, runtime="diffship", backend=backend, static=is_static,
                                      precision=precision))

    start_all(contestants, log)
    run_rounds(contestants, warmup, runs, log)
    for c in contestants:
        c.finish()
    machine["loadavg_end"] = load_average()

    report = {"schema": SCHEMA, "date": date, "duration_s": None, "command": " ".join(sys.argv),
              "machine": machine, "versions": versions(), "settings": settings, "roofline": None,
              "results": [c.result() for c in contestants]}
    if roofline:
        report["roofline"] = measure_roofline(model_dir, batch_size * (2 if guidance_scale > 1 else 1), height,
                                              width, log)
    for result in report["results"]:
        rl = report["roofline"] or {}
        attach_roofline(result, rl.get("unet_flops_per_call"), rl.get("peak_gflops"), rl.get("peaks"), model_dir)
    report["duration_s"] = time.perf_counter() - started
    return report


def tensorrt_options(batch_size: int, height: int, width: int, guidance: bool, static: bool) -> dict:
    """The TensorRT sessions' options for a benchmark's request: engines for exactly it, replayed as CUDA graphs
    (static), or a range around it; the export's engines serve when they were built for the same."""
    from diffship.runtimes.engines import ShapeRange

    if static:
        return {"shapes": ShapeRange.static(batch_size, height, width, guidance).to_dict(), "cuda_graph": True}
    return {"shapes": ShapeRange.dynamic(batch_size, height, width, guidance).to_dict()}


def measure_roofline(model_dir: Path, unet_batch: int, height: int, width: int, log=None) -> dict | None:
    """FLOPs per UNet call (from unet/model.onnx) and the measured matmul peaks (fp32 as "peak", every precision
    in "peaks"); None where a part is missing."""
    from diffship.benchmarking.roofline import precision_peaks, unet_flops

    try:
        counted = unet_flops(model_dir, unet_batch, height, width)
    except ImportError as e:
        if log is not None:
            log(f"  roofline skipped: counting FLOPs needs the onnx package ({e})")
        return None
    if counted is None:
        if log is not None:
            log("  roofline skipped: the export has no unet/model.onnx to count FLOPs from")
        return None
    if counted["uncounted_nodes"] and log is not None:
        log(f"  roofline: {counted['uncounted_nodes']} Conv/MatMul nodes had no inferred shapes and are not counted "
            f"({counted['shape_inference']} shape inference; onnxruntime's symbolic one needs sympy)")
    peaks = precision_peaks()
    return {"unet_flops_per_call": counted["flops"], "unet_flops_by_op": counted["by_op"],
            "unet_input_shapes": counted["input_shapes"], "shape_inference": counted["shape_inference"],
            "uncounted_nodes": counted["uncounted_nodes"], "peak_gflops": peaks["f32"]["gflops"],
            "peak": peaks["f32"], "peaks": peaks}


def write_outputs(report: dict, json_path=None, markdown_path=None, plot_path=None, title: str = "diffship bench"):
    """Write the JSON, Markdown and PNG files asked for; the Markdown links the plot when both are written."""
    from diffship.benchmarking.report import format_markdown

    if plot_path:
        from diffship.benchmarking.plot import plot_report

        plot_report(report, plot_path)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    if markdown_path:
        link = None
        if plot_path:
            try:
                link = str(Path(plot_path).resolve().relative_to(Path(markdown_path).resolve().parent))
            except ValueError:
                link = str(Path(plot_path).resolve())
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_path).write_text(format_markdown(report, title=title, plot=link))


__all__ = ["DiffshipError", "bench", "check_backend", "default_size", "installed_backends", "measure_roofline",
           "vae_scale_factor", "write_outputs"]
