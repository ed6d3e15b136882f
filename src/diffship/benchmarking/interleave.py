"""Pipelines side by side: each in its own worker process, loaded one after another (so every cold start has the
machine to itself), then run by run in turn (so a change in the machine's load touches them all alike)."""

from __future__ import annotations

import os
import sys
import time

from diffship.benchmarking.machine import load_average
from diffship.benchmarking.protocol import Worker, WorkerError
from diffship.benchmarking.summary import complete_run, stage_figures

# Between two workers' runs: thread pools that spin-wait after a run (ONNX Runtime, OpenMP) settle first.
PAUSE_S = 0.2


class Contestant:
    """One pipeline in a benchmark: how to start its worker, what to load, and what it measured."""

    def __init__(self, name: str, spec: dict, command: list[str] | None = None, env: dict | None = None,
                 runtime: str = "diffship", backend: str | None = None, static: bool = False,
                 precision: str | None = None):
        self.name = name
        self.spec = spec
        self.command = command or [sys.executable, "-m", "diffship.benchmarking.worker"]
        self.env = env
        self.runtime = runtime
        self.backend = backend or spec.get("backend")
        self.static = static
        self.precision = precision
        self.worker: Worker | None = None
        self.error: str | None = None
        self.info: dict = {}
        self.cold_start: dict = {}
        self.memory: dict = {}
        self.warm_runs = 0
        self.runs: list[dict] = []

    @property
    def alive(self) -> bool:
        return self.worker is not None and self.error is None

    def fail(self, error: Exception | str) -> None:
        self.error = str(error)
        if self.worker is not None:
            self.worker.terminate()
            self.worker = None

    def start(self) -> None:
        """Spawn the worker and load the pipeline; the time to here is the cold start."""
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("HF_HUB_OFFLINE", "1")
        try:
            self.worker = Worker(self.name, self.command, env=env)
            reply = self.worker.request("load", spec=self.spec)
        except (WorkerError, OSError) as e:
            self.fail(e)
            return
        self.info = reply.get("info", {})
        self.cold_start = {"startup_s": time.perf_counter() - self.worker.spawned,
                           "load_and_compile_s": reply["load_and_compile_s"]}
        self.memory = {"rss_after_load_mb": reply.get("rss_mb")}

    def run_once(self, timed: bool) -> float | None:
        """One generation; its end-to-end seconds (None if the worker failed)."""
        try:
            timings = self.worker.request("run")["timings"]
        except WorkerError as e:
            self.fail(e)
            return None
        if not self.cold_start.get("first_run_s"):
            self.cold_start["first_run_s"] = timings["total"]
            self.cold_start["time_to_first_image_s"] = self.cold_start["startup_s"] + timings["total"]
        if timed:
            self.runs.append(complete_run(timings, (load_average() or [None])[0]))
        else:
            self.warm_runs += 1
        return timings["total"]

    def finish(self) -> None:
        """Close the worker and keep its memory figures."""
        if not self.alive:
            return
        try:
            reply = self.worker.close()
        except WorkerError as e:
            self.fail(e)
            return
        self.worker = None
        self.memory.update(peak_rss_mb=reply.get("peak_rss_mb"), rss_end_mb=reply.get("rss_mb"),
                           rss_anon_end_mb=reply.get("rss_anon_mb"))

    def result(self) -> dict:
        out = {"name": self.name, "runtime": self.runtime, "backend": self.backend, "static": self.static,
               "precision": self.precision, "info": self.info, "error": self.error,
               "cold_start": self.cold_start or None, "memory": self.memory or None}
        out["unet_calls_per_run"] = len(self.runs[0]["unet_steps"]) if self.runs else None
        out["stages"] = stage_figures(self.runs) if self.runs else None
        out["runs"] = self.runs
        return out


def run_rounds(contestants: list[Contestant], warmup: int, runs: int, log=None) -> None:
    """Each live contestant does what is left of its `warmup` untimed runs and then `runs` timed runs, in turn:
    round 1 runs every contestant once, then round 2, and so on."""
    todo = {id(c): max(warmup - c.warm_runs, 0) + runs for c in contestants}
    rounds = max(todo.values(), default=0)
    for round_index in range(rounds):
        for c in contestants:
            if not c.alive or todo[id(c)] == 0:
                continue
            timed = c.warm_runs >= warmup
            total = c.run_once(timed)
            todo[id(c)] -= 1
            if log is not None:
                what = "FAILED: " + c.error.splitlines()[0] if total is None else f"{total:.2f} s"
                log(f"  round {round_index + 1}/{rounds}  {c.name:<28} {'run' if timed else 'warm-up'} {what}")
            time.sleep(PAUSE_S)


def start_all(contestants: list[Contestant], log=None) -> None:
    for c in contestants:
        if log is not None:
            log(f"  loading {c.name} ...")
        c.start()
        if log is not None:
            log(f"  {c.name}: " + (f"FAILED: {c.error.splitlines()[0]}" if c.error else
                                   f"ready in {c.cold_start['startup_s']:.1f} s "
                                   f"(load and compile {c.cold_start['load_and_compile_s']:.1f} s)"))
