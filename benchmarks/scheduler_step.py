"""One scheduler `step` on SD-sized latents (2, 4, 128, 128), diffship (numpy) vs diffusers (torch, CPU).

For every algorithm both schedulers run the same 50-step denoising trajectory side by side (a cheap stand-in
model, outside the timed region); each `step` call is timed, the two libraries alternating which goes first at
each step. The first trajectory is warm-up; the figure is the median over the timed steps of the next ones.
Stochastic schedulers draw their real noise (numpy Generator / torch Generator), so noise generation is included.

torch runs with 1 intra-op thread by default, matching numpy, whose elementwise ops are single-threaded; pass
`--torch-threads 1 0` to also time torch at its default (all cores), which adds a column. On a machine whose cores
are busy with other work that column measures thread wake-up stalls (a 131k-element torch multiply took 12 ms
instead of 0.012 ms with 2 threads on a loaded 2-core machine), so it is only meaningful on a quiet machine.

    python benchmarks/scheduler_step.py            # writes benchmarks/results/scheduler_step.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import diffusers
import diffship.schedulers as ds

SHAPE = (2, 4, 128, 128)
STEPS = 50
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}

# (label, class name, config, step kwargs): each algorithm in the configuration pipelines use it in
CASES = [
    ("DDPM", "DDPMScheduler", {**SD, "clip_sample": False}, {}),
    ("DDIM", "DDIMScheduler", {**SD, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}, {}),
    ("DDIM eta=1", "DDIMScheduler", {**SD, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}, {"eta": 1.0}),
    ("PNDM (PLMS)", "PNDMScheduler", {**SD, "skip_prk_steps": True, "steps_offset": 1}, {}),
    ("LMS", "LMSDiscreteScheduler", SD, {}),
    ("Euler", "EulerDiscreteScheduler", SD, {}),
    ("Euler ancestral", "EulerAncestralDiscreteScheduler", SD, {}),
    ("Heun", "HeunDiscreteScheduler", SD, {}),
    ("KDPM2", "KDPM2DiscreteScheduler", SD, {}),
    ("KDPM2 ancestral", "KDPM2AncestralDiscreteScheduler", SD, {}),
    ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {**SD, "use_karras_sigmas": True}, {}),
    ("DPM++ 3M", "DPMSolverMultistepScheduler", {**SD, "solver_order": 3}, {}),
    ("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {**SD, "algorithm_type": "sde-dpmsolver++"}, {}),
    ("DPM++ 2S", "DPMSolverSinglestepScheduler", SD, {}),
    ("UniPC", "UniPCMultistepScheduler", SD, {}),
    ("UniPC order 3", "UniPCMultistepScheduler", {**SD, "solver_order": 3}, {}),
    ("DEIS", "DEISMultistepScheduler", SD, {}),
    ("LCM", "LCMScheduler", SD, {}),
    ("TCD", "TCDScheduler", SD, {}),
    # flow matching (SD3's shift): the model takes the sample unscaled and the latents start as plain noise
    ("Flow Euler", "FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, {}),
    ("Flow Euler stochastic", "FlowMatchEulerDiscreteScheduler", {"shift": 3.0, "stochastic_sampling": True}, {}),
    ("Flow Heun", "FlowMatchHeunDiscreteScheduler", {"shift": 3.0}, {}),
]


def stand_in_model(sample: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    return 0.5 * sample + pattern


def time_case(class_name: str, config: dict, step_kwargs: dict, trajectories: int) -> tuple[list[float], list[float]]:
    """Per-step seconds (diffship, diffusers) over `trajectories` timed trajectories after one warm-up."""
    rng = np.random.default_rng(0)
    pattern = rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(0.1)
    init = rng.standard_normal(SHAPE, dtype=np.float32)
    ours_times: list[float] = []
    ref_times: list[float] = []
    steps = 4 if class_name == "LCMScheduler" or class_name == "TCDScheduler" else STEPS
    for trajectory in range(trajectories + 1):
        ours = ds.SCHEDULERS[class_name](**config)
        ref = getattr(diffusers, class_name)(**config)
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        # the flow-matching schedulers have no init_noise_sigma / scale_model_input (as in diffusers)
        ours_sample = init * np.float32(getattr(ours, "init_noise_sigma", 1.0))
        ref_sample = torch.from_numpy(init.copy()) * getattr(ref, "init_noise_sigma", 1.0)
        ours_gen = np.random.default_rng(trajectory)
        ref_gen = torch.Generator().manual_seed(trajectory)
        ours_kwargs = dict(step_kwargs)
        ref_kwargs = dict(step_kwargs)
        if "generator" in __import__("inspect").signature(ref.step).parameters:
            ours_kwargs["generator"] = ours_gen
            ref_kwargs["generator"] = ref_gen
        for i, (t_ours, t_ref) in enumerate(zip(ours.timesteps, ref.timesteps)):
            ours_in = ours.scale_model_input(ours_sample, t_ours) if hasattr(ours, "scale_model_input") else ours_sample
            ref_in = ref.scale_model_input(ref_sample, t_ref) if hasattr(ref, "scale_model_input") else ref_sample
            ours_out = stand_in_model(ours_in, pattern)
            ref_out = torch.from_numpy(stand_in_model(ref_in.numpy(), pattern))

            def run_ours():
                return ours.step(ours_out, t_ours, ours_sample, **ours_kwargs).prev_sample

            def run_ref():
                return ref.step(ref_out, t_ref, ref_sample, **ref_kwargs).prev_sample

            order = (run_ours, run_ref) if i % 2 == 0 else (run_ref, run_ours)
            results = {}
            for fn in order:
                start = time.perf_counter()
                results[fn] = fn()
                results[fn, "t"] = time.perf_counter() - start
            ours_sample, ref_sample = results[run_ours], results[run_ref]
            if trajectory > 0:
                ours_times.append(results[run_ours, "t"])
                ref_times.append(results[run_ref, "t"])
    return ours_times, ref_times


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        # other work on the machine slows both sides alike (interleaved), but it is worth knowing
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=3, help="timed trajectories per algorithm (after 1 warm-up)")
    parser.add_argument("--torch-threads", type=int, nargs="*", default=[1], help="torch intra-op threads; 0 = default")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--only", nargs="*", help="labels to run (default: all)")
    args = parser.parse_args()

    info = machine()
    default_threads = torch.get_num_threads()
    thread_settings = [t if t > 0 else default_threads for t in args.torch_threads]
    rows = []
    for label, class_name, config, step_kwargs in CASES:
        if args.only and label not in args.only:
            continue
        row = {"algorithm": label, "class": class_name, "config": config, "step_kwargs": step_kwargs}
        for threads in thread_settings:
            torch.set_num_threads(threads)
            ours, ref = time_case(class_name, config, step_kwargs, args.trajectories)
            row[f"torch_threads_{threads}"] = {
                "diffship_ms": statistics.median(ours) * 1e3,
                "diffusers_ms": statistics.median(ref) * 1e3,
                "ratio": statistics.median(ours) / statistics.median(ref),
                "timed_steps": len(ours),
            }
        torch.set_num_threads(default_threads)
        rows.append(row)
        print(label, {k: round(v["ratio"], 3) for k, v in row.items() if k.startswith("torch_threads")}, flush=True)

    result = {"benchmark": "scheduler_step", "latents": list(SHAPE), "dtype": "float32", "machine": info, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scheduler_step.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "scheduler_step.md").write_text(markdown(result, thread_settings))


def markdown(result: dict, thread_settings: list[int]) -> str:
    m = result["machine"]
    lines = [
        "# Scheduler step: diffship (numpy) vs diffusers (torch CPU)",
        "",
        f"One `step` on float32 latents {tuple(result['latents'])}, median over the steps of 50-step trajectories "
        "(4 for LCM/TCD) after a warm-up trajectory; the two libraries alternate at each step. "
        "Ratio = diffship / diffusers (below 1.0: diffship is faster). torch intra-op threads: "
        + ", ".join(str(t) for t in thread_settings)
        + " (numpy's elementwise ops use one).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}. Python {m['python']}, numpy {m['numpy']}, "
        f"torch {m['torch']}, diffusers {m['diffusers']}. {m['date']}, load average {m['load_average_1min_at_start']} "
        "at start (the machine was shared).",
        "",
    ]
    header = "| algorithm | diffship ms |"
    sep = "| --- | ---: |"
    for t in thread_settings:
        header += f" diffusers ms (torch {t} thr) | ratio |"
        sep += " ---: | ---: |"
    lines += [header, sep]
    for row in result["rows"]:
        first = row[f"torch_threads_{thread_settings[0]}"]
        line = f"| {row['algorithm']} | {first['diffship_ms']:.3f} |"
        for t in thread_settings:
            cell = row[f"torch_threads_{t}"]
            line += f" {cell['diffusers_ms']:.3f} | {cell['ratio']:.2f} |"
        lines.append(line)
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
