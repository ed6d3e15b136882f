"""How much of an end-to-end generation the scheduler takes: the tiny SD1 model on ONNX Runtime, 25 steps,
for every scheduler, with the scheduler's own calls (set_timesteps, scale_model_input, step) timed through a
proxy. The tiny model's UNet is very cheap, so this is the worst case for the scheduler's share; on a full-size
model the same milliseconds are a far smaller part.

    python benchmarks/scheduler_share.py     # writes benchmarks/results/scheduler_share.{json,md}
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from diffship.schedulers import scheduler_by_name

NAMES = ["pndm", "ddim", "euler", "euler-a", "heun", "dpm2", "dpm2-a", "lms", "dpm++2m-karras", "dpm++2m-sde",
         "dpm++2s", "unipc", "deis", "ddpm", "lcm", "tcd"]
STEPS, RUNS = 25, 5
RESULTS = Path(__file__).parent / "results"


class TimedScheduler:
    """Forwards everything to the scheduler; accumulates the seconds spent in its calls."""

    def __init__(self, scheduler):
        self.__dict__["_inner"], self.__dict__["seconds"] = scheduler, 0.0

    def __getattr__(self, name):
        value = getattr(self._inner, name)
        if name not in ("set_timesteps", "scale_model_input", "step"):
            return value

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return value(*args, **kwargs)
            finally:
                self.__dict__["seconds"] += time.perf_counter() - start

        return timed

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)


def main() -> None:
    from diffship.exporters import export
    from diffship.pipelines import StableDiffusionPipeline
    from diffship.testing.tiny_models import save_tiny_pipeline

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exported = export(save_tiny_pipeline(Path(tmp) / "tiny", "sd1"), Path(tmp) / "export", "onnx", progress=False)
        pipe = StableDiffusionPipeline.from_pretrained(exported)
        pipe.set_progress_bar_config(disable=True)
        base = pipe.scheduler.config
        for name in NAMES:
            shares, totals, sched = [], [], []
            for run in range(RUNS + 1):
                timed = TimedScheduler(scheduler_by_name(name, base))
                pipe.scheduler = timed
                result = pipe("a red circle on the left", num_inference_steps=STEPS, generator=run, output_type="np")
                if run:  # the first run is warm-up
                    totals.append(result.timings["total"])
                    sched.append(timed.seconds)
                    shares.append(timed.seconds / result.timings["total"])
            rows.append({"scheduler": name, "class": type(timed._inner).__name__,
                         "scheduler_ms": 1e3 * statistics.median(sched), "total_ms": 1e3 * statistics.median(totals),
                         "share": statistics.median(shares)})
    machine = {"platform": platform.platform(), "cpu": _cpu(), "cores": os.cpu_count(),
               "load_average": os.getloadavg(), "date": datetime.date.today().isoformat()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scheduler_share.json").write_text(json.dumps({"machine": machine, "steps": STEPS, "rows": rows},
                                                             indent=2) + "\n")
    lines = [f"# Scheduler share of an end-to-end generation (tiny SD1, ONNX Runtime, {STEPS} steps, 64x64, guidance 7.5)",
             "", f"{machine['cpu']}, {machine['cores']} cores, {machine['date']}, load average {machine['load_average'][0]:.1f}. "
             "Median of 5 runs after 1 warm-up.", "",
             "| scheduler | class | scheduler ms | generation ms | share |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['scheduler']} | {r['class']} | {r['scheduler_ms']:.2f} | {r['total_ms']:.1f} | {100 * r['share']:.2f}% |"
              for r in rows]
    (RESULTS / "scheduler_share.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _cpu() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
