"""From the runs of each pipeline to the stable JSON figures: medians and p90 per stage.

The JSON a benchmark writes (`diffship bench --json`, `benchmarks/compare_peers.py`), schema "diffship-bench/1".
Every time is in seconds, every memory figure in MiB; a stage a pipeline does not have is null.

    {
      "schema": "diffship-bench/1",
      "date": "2026-01-01T12:00:00+00:00",              # UTC, when the benchmark started
      "duration_s": 123.4,                               # wall time of the whole benchmark
      "command": "diffship bench ...",
      "machine": {"cpu", "cpu_flags", "cores", "memory_gb", "os", "loadavg_start", "loadavg_end"},
      "versions": {"python", "diffship", "numpy", "onnxruntime", "openvino", ...},
      "settings": {"model", "task", "height", "width", "steps", "batch_size", "guidance_scale", "scheduler",
                   "prompt", "negative_prompt", "runs", "warmup", "seed", "strength"},
      "roofline": null | {"unet_flops_per_call", "peak_gflops", "peak": {...how it was measured},   # fp32
                          "peaks": {"f32" | "bf16" | "int8": {"gflops", "features", "native", "label", ...}}},
      "results": [
        {
          "name": "openvino static",                     # unique label in this benchmark
          "runtime": "diffship" | "diffusers" | "optimum",
          "backend": "onnxruntime" | "openvino" | "torch",
          "static": false, "precision": "f32",
          "info": {...},                                 # what the worker reported (pipeline and scheduler class)
          "error": null | "what failed",                 # a failed pipeline keeps its row, with no figures
          "cold_start": {"startup_s",                    # process start -> pipeline loaded and compiled
                         "load_and_compile_s",           # from_pretrained (+ reshape) + compile, in the worker
                         "first_run_s",                  # the first generation (lazy initialisation shows here)
                         "time_to_first_image_s"},       # startup_s + first_run_s
          "memory": {"rss_after_load_mb", "peak_rss_mb", "rss_end_mb", "rss_anon_end_mb"},
          "unet_calls_per_run": 25,
          "stages": {                                    # over the timed runs (warm-up excluded)
            "text_encoder" | "unet" | "unet_per_step" | "scheduler_and_glue" | "vae_encode" | "vae_decode" | "total":
                null | {"median", "p90", "min", "max", "mean"}
          },
          "unet_gflops": null | float,                   # with a roofline: FLOPs per UNet call / median step
          "unet_percent_of_peak": null | float,          # of the peak of the precision the UNet ran in:
          "unet_precision": "f32" | "bf16" | "int8",     # (with "peaks") that precision, and
          "unet_peak_gflops": float,                     # that peak (reports without "peaks": the fp32 one)
          "runs": [{"text_encoder", "unet", "unet_steps": [...], "scheduler_and_glue", "vae_encode",
                    "vae_decode", "total", "cpu_s", "loadavg_1m"}]   # cpu_s: CPU seconds of all the worker's
                                                                     # threads (cpu_s / total / cores: its share)
        }
      ]
    }

`unet_per_step` pools every UNet call of every timed run. `scheduler_and_glue` is the pipeline call's wall time less
its component calls (tokenizing, guidance arithmetic, scheduler steps, postprocessing); the stages of a run add up
to its total exactly, and their medians to the median total closely.
"""

from __future__ import annotations

import math
import statistics

SCHEMA = "diffship-bench/1"
STAGES = ("text_encoder", "unet", "unet_per_step", "unet_shallow", "scheduler_and_glue", "vae_encode", "vae_decode",
          "total")
# The stages that make up a run's total (unet_per_step is a view of unet; unet_shallow: the steps a step cache,
# DeepCache, serves with the shallow UNet).
ADDITIVE_STAGES = ("text_encoder", "unet", "unet_shallow", "scheduler_and_glue", "vae_encode", "vae_decode")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), interpolated linearly between the sorted values (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(position), math.ceil(position)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)


def describe(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": statistics.median(values), "p90": percentile(values, 90), "min": min(values),
            "max": max(values), "mean": statistics.fmean(values)}


def complete_run(timings: dict, loadavg_1m: float | None = None) -> dict:
    """A worker's record of one run, with `unet` (sum of its steps) and `scheduler_and_glue` filled in."""
    run = dict(timings)
    run["unet"] = sum(run["unet_steps"])
    # unet_shallow: the shallow UNet of steps a step cache (DeepCache) serves; a graph's time, not glue
    covered = sum(run.get(k) or 0.0 for k in ADDITIVE_STAGES if k != "scheduler_and_glue")
    run["scheduler_and_glue"] = max(run["total"] - covered, 0.0)
    run["loadavg_1m"] = loadavg_1m
    return run


def stage_figures(runs: list[dict]) -> dict:
    figures = {}
    for stage in STAGES:
        if stage == "unet_per_step":
            values = [step for run in runs for step in run["unet_steps"]]
        else:
            values = [run[stage] for run in runs if run.get(stage) is not None]
        figures[stage] = describe(values)
    return figures


def stages_sum(stages: dict) -> float:
    """The sum of the additive stages' medians (to hold against the median total)."""
    return sum(stages[s]["median"] for s in ADDITIVE_STAGES if stages.get(s))


def attach_roofline(result: dict, unet_flops: float | None, peak_gflops: float | None, peaks: dict | None = None,
                    model_dir=None) -> None:
    """Achieved GFLOP/s of the median UNet call and its share of the measured peak: with `peaks` (the roofline's
    per-precision peaks), the peak of the precision the UNet ran in (roofline.unet_precision: int8 where the UNet
    graph in `model_dir` quantizes activations, else what the worker reported), which the result then records as
    unet_precision and unet_peak_gflops."""
    step = (result.get("stages") or {}).get("unet_per_step")
    if peaks:
        from diffship.benchmarking.roofline import unet_precision

        result["unet_precision"] = unet_precision(result, model_dir)
        peak_gflops = (peaks.get(result["unet_precision"]) or {}).get("gflops") or peak_gflops
        result["unet_peak_gflops"] = peak_gflops
    if not unet_flops or not step:
        result["unet_gflops"] = result["unet_percent_of_peak"] = None
        return
    result["unet_gflops"] = unet_flops / step["median"] / 1e9
    result["unet_percent_of_peak"] = 100 * result["unet_gflops"] / peak_gflops if peak_gflops else None
