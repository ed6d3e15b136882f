"""How a benchmark talks to its workers: one subprocess per pipeline, JSON lines over pipes.

Each backend (and each peer: diffusers on torch, Optimum's pipelines) runs in its own process, so that its import,
load and compile are a true cold start and its peak RSS is its own. The parent sends one request per line on the
worker's stdin and reads one reply per line:

    {"op": "load", "spec": {...}}  -> {"ok": true, "load_and_compile_s", "rss_mb", "info": {...}}
    {"op": "run"}                  -> {"ok": true, "timings": {text_encoder, unet_steps: [...], vae_encode,
                                                                vae_decode, total, cpu_s}}
    {"op": "close"}                -> {"ok": true, "peak_rss_mb", "rss_mb", "rss_anon_mb"}, then the worker exits
    any failure                    -> {"ok": false, "error": "...", "traceback": "..."}

This module is standard library only: the peers' workers run in other virtual environments (without diffship
installed) and load it by its file path.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager

# Stages a worker times by wrapping its pipeline's component calls; what they leave out is scheduler and glue.
COMPONENT_STAGES = ("text_encoder", "unet", "vae_encode", "vae_decode")


class StageRecorder:
    """Seconds spent in each component call during one generation (`unet` call by call)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.calls: dict[str, list[float]] = {name: [] for name in COMPONENT_STAGES}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.calls.setdefault(name, []).append(time.perf_counter() - start)

    def wrap(self, fn, name: str):
        """`fn` timed as one call of stage `name`."""

        def timed(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)

        timed.__wrapped__ = fn
        return timed

    def timings(self, total: float) -> dict:
        """One run's record. Stages a pipeline never called are None (e.g. vae_encode in text-to-image)."""
        out = {name: (sum(calls) if calls else None) for name, calls in self.calls.items() if name != "unet"}
        out["unet_steps"] = list(self.calls["unet"])
        out["total"] = total
        return out


def memory_mb() -> dict:
    """Current RSS, its anonymous part (memory-mapped weight files are shared page cache, not private memory) and
    the peak RSS of this process, in MiB."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        out["rss_mb"] = int(fields["VmRSS"].split()[0]) / 1024
        out["rss_anon_mb"] = int(fields["RssAnon"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        out["rss_mb"] = out["rss_anon_mb"] = None
    return out


def serve(load) -> int:
    """The worker's side. `load(spec) -> (run, info)` builds the pipeline; `run() -> timings` makes one image.
    Replies go to the original stdout; anything the libraries print goes to stderr instead."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")

    run = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "load":
                t0 = time.perf_counter()
                run, info = load(request["spec"])
                reply({"ok": True, "load_and_compile_s": time.perf_counter() - t0,
                       **memory_mb(), "info": info})
            elif request["op"] == "run":
                before = resource.getrusage(resource.RUSAGE_SELF)
                timings = run()
                after = resource.getrusage(resource.RUSAGE_SELF)
                # CPU seconds of all the worker's threads: against the wall time, how much of the machine it got
                # (other jobs taking cores show as a lower ratio).
                timings["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                reply({"ok": True, "timings": timings})
            elif request["op"] == "close":
                reply({"ok": True, **memory_mb()})
                return 0
            else:
                raise ValueError(f"unknown request {request['op']!r}")
        except Exception as e:  # the parent records the failure and goes on with the other workers
            reply({"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
    return 0


class WorkerError(RuntimeError):
    pass


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, name: str, command: list[str], env: dict | None = None, cwd=None):
        self.name = name
        self.command = command
        self._log = tempfile.TemporaryFile(mode="w+")
        self.spawned = time.perf_counter()
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                        text=True, bufsize=1, env=env, cwd=cwd)

    def request(self, op: str, **fields) -> dict:
        try:
            self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the worker died; reading its (missing) reply says so with its log
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            raise WorkerError(f"{self.name}: the worker exited (status {self.process.returncode}) during {op}:\n"
                              f"{self.log_tail()}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise WorkerError(f"{self.name}: {op} failed: {reply.get('error')}\n{reply.get('traceback', '')}")
        return reply

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-chars:]

    def close(self) -> dict:
        """The worker's final memory figures; the process is gone afterwards."""
        try:
            return self.request("close")
        finally:
            self.terminate()

    def terminate(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=30)
            except (subprocess.TimeoutExpired, OSError):
                self.process.kill()
                self.process.wait()
        self._log.close()
