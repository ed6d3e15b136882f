r"""diffship against PyTorch eager and Optimum, on the same full-size Stable Diffusion 1.5 architecture (random weights:
latency does not depend on the values), the same prompt, latents, scheduler and steps, in one interleaved run.

    bash benchmarks/peers/setup_optimum_venv.sh              # once: Optimum's venv (.venv-optimum)
    .venv/bin/diffship tiny-model out/full-size --full-size  # once: the diffusers source (4 GB)
    .venv/bin/diffship export out/full-size out/full-size-export --backend onnx,openvino --height 256 --width 256
    .venv/bin/python benchmarks/peers/export_peers.py out/full-size out/peer-exports  # once, 45-75 min: own exports
    .venv/bin/python benchmarks/peers/install_sizes.py --per-runtime      # once: runtime install sizes
    flock /tmp/diffship-bench.lock .venv/bin/python benchmarks/compare_peers.py --size 256 \
        --best-call '{"cache": "deepcache", "cache_interval": 3}'                                # 20-30 min
    flock /tmp/diffship-bench.lock .venv/bin/python benchmarks/compare_peers.py --size 512 --runs 2 --torch-apart \
        --groups ort,ov-static,own-ort,own-ov,own-ov-static,own-best \
        --best-call '{"cache": "deepcache", "cache_interval": 3}'                                # 40-60 min
    # the best configuration where its accuracy holds (benchmarks/best_config_accuracy.py): 25 steps, no PyTorch
    .venv/bin/diffship export out/full-size out/best --backend openvino --quantize hybrid --deepcache \
        --height 256 --width 256                                                                 # ~16 min
    flock /tmp/diffship-bench.lock .venv/bin/python benchmarks/compare_peers.py --size 512 --steps 25 --no-torch \
        --groups own-best --best-export out/best --best-call '{"cache": "deepcache", "cache_interval": 3}'

Two kinds of groups, each pipeline in its own worker process (benchmarks/peers/peer_worker.py for the peers, in
their venvs):

- Shared graphs (ort, ov, ov-static, ov-static-bf16): diffship on ONNX Runtime, on OpenVINO with dynamic shapes and
  reshaped to static shapes, and Optimum's ORTStableDiffusionPipeline and Optimum Intel's OVStableDiffusionPipeline
  (dynamic and static), all loading diffship's export directory (--export: the same graphs). OpenVINO runs fp32 on
  both sides (INFERENCE_PRECISION_HINT f32: the CPU plugin would otherwise run bf16 on this CPU); bf16 rows are
  extra. This isolates the pipelines (scheduler, glue, feeding the runtimes) from the graphs.
- Own exports (own-ort, own-ov, own-ov-static, own-best): the comparison users make. Each side loads its own export
  (--own-exports, made by benchmarks/peers/export_peers.py: `optimum-cli export onnx`, `optimum-cli export
  openvino`, `diffship export`) with its own defaults, nothing passed: `diffship.StableDiffusionPipeline
  .from_pretrained(dir, backend=...)`, `ORTStableDiffusionPipeline.from_pretrained(dir)`,
  `OVStableDiffusionPipeline.from_pretrained(dir)` (its default inference precision, dynamic shapes), and Optimum
  Intel reshaped to the request's static shapes and compiled, as its documentation recommends for CPU. "diffship
  best" is configured by flags: --best-export (default OWN_EXPORTS/diffship-best, export_peers.py's hybrid int8
  export, else OWN_EXPORTS/diffship), --best-backend, --best-options (from_pretrained keyword arguments, JSON) and
  --best-call (pipeline call keyword arguments, JSON, passed through as given: e.g. '{"cache": "deepcache",
  "cache_interval": 3}'); it is timed against Optimum Intel with its defaults (target: 0.5x).

The machine has too little memory for all of them at once (a full-size pipeline holds 4-9 GB), so they run in
groups: each group holds a diffship pipeline and its Optimum counterpart, interleaved run by run with the PyTorch
worker, which stays loaded through all groups, so that every ratio is taken between runs made side by side (the
own-export groups repeat a contestant where it is compared twice: "(2)"). Writes OUT.json (schema diffship-bench/1
plus "groups", "ratios", "targets", "install_sizes"; each result with its "group" and "config"), OUT.md and OUT.png.
On a tiny model (the whole chain in minutes): `diffship tiny-model /tmp/t`, `export_peers.py /tmp/t /tmp/t-exports
--out /tmp/t-exports/export_memory`, `diffship export /tmp/t /tmp/t-export --backend onnx,openvino`, then this with
--export /tmp/t-export --diffusers-model /tmp/t --own-exports /tmp/t-exports --size 64 --steps 2 --out /tmp/t-peers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from diffship.benchmarking import measure_roofline, vae_scale_factor
from diffship.benchmarking.interleave import Contestant, run_rounds, start_all
from diffship.benchmarking.machine import load_average, machine_info, now, versions
from diffship.benchmarking.plot import plot_report
from diffship.benchmarking.roofline import precision_peaks
from diffship.benchmarking.report import format_table
from diffship.benchmarking.summary import SCHEMA, attach_roofline, describe

REPO = Path(__file__).resolve().parents[1]
PEER_WORKER = REPO / "benchmarks" / "peers" / "peer_worker.py"
SCHEDULER = "EulerDiscreteScheduler"  # one UNet call per step on every side; diffusers' and diffship's alike
PROMPT = "a photo of an astronaut riding a horse on mars"
F32, BF16 = {"INFERENCE_PRECISION_HINT": "f32"}, {"INFERENCE_PRECISION_HINT": "bf16"}
TORCH = "PyTorch eager"
SHARED, BEST = "shared", "best"  # Member.export: diffship's export for every side (--export), or the best's


class Member(NamedTuple):
    """A pipeline of a group. precision: OpenVINO's inference precision, passed explicitly (None: nothing passed,
    the pipeline's own defaults); static: reshaped to the request's shapes after loading; export: which directory
    it loads: SHARED, BEST, or a folder of --own-exports (export_peers.py's names)."""
    name: str
    runtime: str
    backend: str
    static: bool = False
    precision: str | None = "f32"
    export: str = SHARED


# group -> [diffship contestant, its Optimum counterpart]; ratios and targets are the first over the second
GROUPS = {
    "ort": [Member("diffship ORT", "diffship", "onnxruntime"), Member("Optimum ORT", "optimum", "onnxruntime")],
    "ov": [Member("diffship OV", "diffship", "openvino"), Member("Optimum OV", "optimum", "openvino")],
    "ov-static": [Member("diffship OV static", "diffship", "openvino", True),
                  Member("Optimum OV static", "optimum", "openvino", True)],
    "ov-static-bf16": [Member("diffship OV static bf16", "diffship", "openvino", True, "bf16"),
                       Member("Optimum OV static bf16", "optimum", "openvino", True, "bf16")],
    "own-ort": [Member("diffship ORT, defaults", "diffship", "onnxruntime", False, None, "diffship"),
                Member("Optimum ORT, defaults", "optimum", "onnxruntime", False, None, "optimum-onnx")],
    "own-ov": [Member("diffship OV, defaults", "diffship", "openvino", False, None, "diffship"),
               Member("Optimum Intel, defaults", "optimum", "openvino", False, None, "optimum-openvino")],
    "own-ov-static": [Member("diffship OV, defaults (2)", "diffship", "openvino", False, None, "diffship"),
                      Member("Optimum Intel, static reshape", "optimum", "openvino", True, None, "optimum-openvino")],
    "own-best": [Member("diffship best", "diffship", "openvino", False, None, BEST),
                 Member("Optimum Intel, defaults (2)", "optimum", "openvino", False, None, "optimum-openvino")],
}
OWN_GROUPS = [g for g, members in GROUPS.items() if members[0].export != SHARED]
TARGETS = {"best_diffship_vs_torch": 0.5, "diffship_vs_optimum": 1.0, "glue_share_percent": 1.0,
           "install_size_ratio": 0.25, "diffship_best_vs_optimum_intel_defaults": 0.5}
GROUP_TARGETS = {"own-best": TARGETS["diffship_best_vs_optimum_intel_defaults"]}  # others: diffship_vs_optimum


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def mem_available_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def wait_for_memory(gb: float, timeout_s: float = 180) -> float | None:
    """Wait (a while) until `gb` GiB are available: other people's jobs share this machine."""
    deadline = time.time() + timeout_s
    while (available := mem_available_gb()) is not None and available < gb and time.time() < deadline:
        log(f"  waiting for memory: {available:.1f} GiB available, want {gb:.0f}")
        time.sleep(10)
    return mem_available_gb()


def peer_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def member_dir(member: Member, args) -> Path:
    """The export directory a member loads."""
    if member.export == SHARED:
        return args.export
    return args.best_export if member.export == BEST else args.own_exports / member.export


def make_contestant(member: Member, common: dict, args) -> Contestant:
    directory = member_dir(member, args)
    if member.runtime == "diffship":
        backend, options, call = member.backend, {}, {}
        if member.export == BEST:
            backend, options, call = args.best_backend, args.best_options, args.best_call
        elif member.precision is not None and backend == "openvino":
            # the shared groups: this precision, and the dynamic rows kept dynamic (static shapes are the default)
            options = {"inference_precision": member.precision, "static_shapes": member.static}
        spec = {**common, "model_dir": str(directory), "backend": backend, "static": member.static,
                "options": options, "call_kwargs": call}
        return Contestant(member.name, spec, runtime="diffship", backend=backend, static=member.static,
                          precision=member.precision or "defaults")
    if member.runtime == "diffusers":
        spec = {**common, "kind": "diffusers", "model_dir": str(args.diffusers_model)}
        return Contestant(member.name, spec, command=[sys.executable, str(PEER_WORKER)], env=peer_env(),
                          runtime="diffusers", backend="torch", precision="f32")
    kind = "optimum-ort" if member.backend == "onnxruntime" else "optimum-ov"
    ov_config = None if member.precision is None else (BF16 if member.precision == "bf16" else F32)
    spec = {**common, "kind": kind, "model_dir": str(directory), "static": member.static,
            "ov_config": ov_config if kind == "optimum-ov" else None}
    return Contestant(member.name, spec, command=[str(args.optimum_python), str(PEER_WORKER)], env=peer_env(),
                      runtime="optimum", backend=member.backend, static=member.static,
                      precision=member.precision or "defaults")


def contestant_config(c: Contestant) -> dict:
    """What a result was loaded and called with (its export directory, options, call arguments)."""
    keys = ("model_dir", "kind", "options", "call_kwargs", "ov_config", "static")
    return {k: c.spec[k] for k in keys if k in c.spec}


def optimum_versions(python: Path) -> dict:
    code = ("import json, platform; from importlib.metadata import version as v\n"
            "names = ['optimum', 'optimum-onnx', 'optimum-intel', 'onnxruntime', 'openvino', 'diffusers', "
            "'transformers', 'torch']\n"
            "out = {'python': platform.python_version()}\n"
            "for n in names:\n"
            "    try: out[n] = v(n)\n"
            "    except Exception: out[n] = None\n"
            "print(json.dumps(out))")
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=peer_env())
    return json.loads(result.stdout) if result.returncode == 0 else {"error": result.stderr[-500:]}


def median_of(result: dict, stage: str) -> float | None:
    figures = (result.get("stages") or {}).get(stage)
    return figures["median"] if figures else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image height and width")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per contestant per group")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"which groups, of {', '.join(GROUPS)}")
    parser.add_argument("--export", type=Path, default=REPO / "out" / "full-size-export",
                        help="diffship's export that every side of the shared groups loads")
    parser.add_argument("--own-exports", type=Path, default=REPO / "out" / "peer-exports",
                        help="export_peers.py's folder: each side's own export, for the own-export groups")
    parser.add_argument("--best-export", type=Path, default=None,
                        help="the export 'diffship best' loads (default OWN_EXPORTS/diffship-best where there is "
                             "one, else OWN_EXPORTS/diffship)")
    parser.add_argument("--best-backend", default="openvino", choices=["openvino", "onnxruntime"])
    parser.add_argument("--best-options", type=json.loads, default={}, metavar="JSON",
                        help="from_pretrained keyword arguments of 'diffship best', e.g. '{\"inference_precision\": "
                             "\"bf16\"}' (default: none, diffship's defaults)")
    parser.add_argument("--best-call", type=json.loads, default={}, metavar="JSON",
                        help="pipeline call keyword arguments of 'diffship best', passed as given, e.g. "
                             "'{\"cache\": \"deepcache\", \"cache_interval\": 3}'")
    parser.add_argument("--diffusers-model", type=Path, default=REPO / "out" / "full-size")
    parser.add_argument("--optimum-python", type=Path, default=REPO / ".venv-optimum" / "bin" / "python")
    parser.add_argument("--install-sizes", type=Path, default=REPO / "benchmarks" / "results" / "install_sizes.json")
    parser.add_argument("--export-memory", type=Path,
                        default=REPO / "benchmarks" / "results" / "export_memory.json",
                        help="export_peers.py's JSON, shown with the own-export groups when it is of --own-exports")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/peers_SIZE")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="fewer runs per group when the projected end passes this (default: 5 per group)")
    parser.add_argument("--torch-apart", action="store_true",
                        help="run PyTorch alone first instead of alongside every group (for sizes where three "
                             "full-size pipelines do not fit in memory at once, e.g. 512)")
    parser.add_argument("--no-torch", action="store_true",
                        help="leave PyTorch out (no 'vs PyTorch' ratios): for long settings, where a PyTorch run "
                             "takes minutes")
    parser.add_argument("--min-free-gb", type=float, default=12,
                        help="wait (up to 3 min) for this much available memory before loading a group")
    parser.add_argument("--rerender", type=Path, metavar="OUT.json",
                        help="only rebuild OUT.md and OUT.png (and the ratios) from an earlier run's JSON")
    args = parser.parse_args()
    if args.rerender:
        return args
    args.out = args.out or REPO / "benchmarks" / "results" / f"peers_{args.size}"
    args.groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown groups {unknown}; choose from {', '.join(GROUPS)}")
    args.budget_minutes = args.budget_minutes or 5.0 * len(args.groups)
    if args.best_export is None:
        best = args.own_exports / "diffship-best"
        args.best_export = best if (best / "model_index.json").is_file() else args.own_exports / "diffship"
    if "own-best" in args.groups and args.best_export == args.own_exports / "diffship" and not (
            args.best_options or args.best_call):
        log("group own-best skipped: no --best-export, --best-options or --best-call, and no "
            f"{args.own_exports / 'diffship-best'}: 'diffship best' would be diffship's defaults again")
        args.groups.remove("own-best")
    needed = [args.diffusers_model, args.optimum_python]
    needed += [member_dir(m, args) for g in args.groups for m in GROUPS[g] if m.runtime != "diffusers"]
    for path in dict.fromkeys(needed):
        if not path.exists():
            parser.error(f"{path} is missing; see the set-up steps in this script's docstring")
    return args


def main() -> int:
    args = parse_args()
    if args.rerender:
        return rerender(args.rerender, args.install_sizes)
    groups = args.groups
    # the FLOPs and the latent size come from a diffship export's ONNX UNet: the shared one, else diffship's own
    counted_dir = args.export if args.export.exists() else args.own_exports / "diffship"

    started, date = time.perf_counter(), now()
    machine = machine_info()
    log(f"{date}: {machine['cpu']}, {machine['cores']} cores, load average {machine['loadavg_start']}")
    work = Path(tempfile.mkdtemp(prefix="diffship-peers-"))
    latents_file = work / "latents.npy"
    latent = args.size // vae_scale_factor(counted_dir)
    np.save(latents_file, np.random.default_rng(0).standard_normal((1, 4, latent, latent)).astype(np.float32))
    common = {"height": args.size, "width": args.size, "steps": args.steps, "guidance_scale": 7.5,
              "prompt": PROMPT, "negative_prompt": None, "scheduler": SCHEDULER, "latents": str(latents_file),
              "batch_size": 1}

    log("roofline: FLOPs per UNet call and the matmul peaks (f32, bf16, int8)")
    roofline = measure_roofline(counted_dir, 2, args.size, args.size, log)

    # --no-torch: the pairs alone (at 512x512 and 25 steps a PyTorch run takes minutes); no "vs PyTorch" ratios.
    torch = None if args.no_torch else make_contestant(Member(TORCH, "diffusers", "torch"), common, args)
    contestants, group_of, group_log = [], {}, {}
    if torch is not None:
        start_all([torch], log)
        contestants, group_of = [torch], {id(torch): "all"}
    runs = args.runs
    torch_apart = None
    if args.torch_apart and torch is not None:  # PyTorch first, on its own; then the pairs without it (less memory)
        group_start, load_start = time.perf_counter(), load_average()
        run_rounds([torch], args.warmup, runs, log)
        torch.finish()
        torch_apart = torch.runs
        group_log["torch"] = {"members": [TORCH], "runs": runs, "loadavg_start": load_start,
                              "loadavg_end": load_average(), "seconds": time.perf_counter() - group_start,
                              "mem_available_gb_at_start": mem_available_gb()}
    for index, group in enumerate(groups):
        group_start = time.perf_counter()
        members = [make_contestant(member, common, args) for member in GROUPS[group]]
        available = wait_for_memory(args.min_free_gb)
        load_start = load_average()
        log(f"group {group}: {', '.join(m.name for m in members)}"
            + ("" if torch_apart or torch is None else f" (+ {TORCH})") + f"; {available:.1f} GiB available")
        start_all(members, log)
        torch_before = len(torch.runs) if torch is not None else 0
        run_rounds(members if torch_apart or torch is None else [torch, *members], args.warmup, runs, log)
        for m in members:
            m.finish()
            group_of[id(m)] = group
        contestants += members
        torch_runs = torch_apart or (torch.runs[torch_before:] if torch is not None else [])
        group_log[group] = {
            "members": [m.name for m in members], "runs": runs, "mem_available_gb_at_start": available,
            "loadavg_start": load_start, "loadavg_end": load_average(), "seconds": time.perf_counter() - group_start,
            "torch": ("not run (--no-torch)" if torch is None else
                      "its own group, before the pairs" if torch_apart else "interleaved in this group"),
            "torch_total": describe([r["total"] for r in torch_runs]),
            "torch_unet_per_step": describe([s for r in torch_runs for s in r["unet_steps"]]),
        }
        elapsed = (time.perf_counter() - started) / 60
        left = len(groups) - index - 1
        projected = elapsed + left * group_log[group]["seconds"] / 60
        log(f"group {group} took {group_log[group]['seconds']:.0f} s; {elapsed:.1f} min so far, "
            f"about {projected:.1f} min projected")
        if left and projected > args.budget_minutes and runs > 2:
            runs -= 1
            log(f"  over the {args.budget_minutes:g} min budget: {runs} runs per contestant from now on")
    if torch is not None:
        torch.finish()
    machine["loadavg_end"] = load_average()
    if roofline:
        # Other jobs on the machine lower a peak measured once; the better of two is nearer the machine's own.
        end_peaks = precision_peaks()
        roofline["peaks_at_end"] = end_peaks
        for precision, peak in end_peaks.items():
            if peak["gflops"] > (roofline["peaks"].get(precision) or {}).get("gflops", 0):
                roofline["peaks"][precision] = peak
        roofline["peak"], roofline["peak_gflops"] = roofline["peaks"]["f32"], roofline["peaks"]["f32"]["gflops"]

    versions_here = versions(("diffship", "numpy", "onnxruntime", "openvino", "torch", "diffusers", "transformers"))
    own = [g for g in groups if g in OWN_GROUPS]
    report = {
        "schema": SCHEMA, "date": date, "duration_s": None, "command": " ".join(sys.argv), "machine": machine,
        "versions": versions_here, "versions_optimum_venv": optimum_versions(args.optimum_python),
        "settings": {"model": f"{counted_dir.name} (diffusers source {args.diffusers_model.name}): SD1.5 "
                              "architecture, random weights, fp32"
                              + (f"; own exports in {args.own_exports}" if own else ""),
                     "task": "text-to-image", "height": args.size, "width": args.size, "steps": args.steps,
                     "batch_size": 1, "guidance_scale": 7.5, "scheduler": SCHEDULER, "prompt": PROMPT,
                     "negative_prompt": None, "runs": args.runs, "warmup": args.warmup, "seed": 0,
                     "strength": None},
        "roofline": roofline,
        "results": [],
        "groups": group_log,
    }
    if own:
        report["export_memory"] = export_memory(args.export_memory, args.own_exports)
    rl = roofline or {}
    for c in contestants:
        result = c.result()
        result["group"], result["config"] = group_of[id(c)], contestant_config(c)
        # a cache (DeepCache) makes some UNet calls partial: FLOPs per call no longer hold
        cached = any(v not in (None, False) and k.startswith("cache") for k, v in c.spec.get("call_kwargs", {}).items())
        attach_roofline(result, None if cached else rl.get("unet_flops_per_call"), rl.get("peak_gflops"),
                        rl.get("peaks"), c.spec.get("model_dir") if c.runtime != "diffusers" else None)
        report["results"].append(result)
    finish_report(report, args.install_sizes)
    report["duration_s"] = time.perf_counter() - started
    write_report(report, args.out)
    print(format_table(report))
    print(args.out.with_suffix(".md").read_text())
    log(f"done in {report['duration_s'] / 60:.1f} min: {args.out}.json/.md/.png")
    return 0


def export_memory(path: Path, own_exports: Path) -> dict | None:
    """export_peers.py's figures, where they are of these exports."""
    if not path.is_file():
        return None
    figures = json.loads(path.read_text())
    return figures if Path(figures.get("out_root", "")) == own_exports.resolve() else None


def finish_report(report: dict, install_sizes: Path) -> None:
    report["ratios"], report["targets"] = ratios_and_targets(report)
    report["install_sizes"] = json.loads(install_sizes.read_text()) if install_sizes.is_file() else None
    if report["install_sizes"]:
        value = report["install_sizes"]["ratios"]["diffship[onnxruntime,openvino] / optimum (ORT + OpenVINO)"]
        report["targets"]["install_size_ratio"] = target(value, TARGETS["install_size_ratio"])


def write_report(report: dict, out: Path) -> None:
    from peers_report import format_peers_markdown  # benchmarks/peers/peers_report.py

    s = report["settings"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot_report(report, out.with_suffix(".png"),
                title=f"SD1.5 architecture, {s['height']}x{s['width']}, {s['steps']} steps: median latency per stage")
    out.with_suffix(".md").write_text(format_peers_markdown(report, out.with_suffix(".png").name))


def rerender(path: Path, install_sizes: Path) -> int:
    report = json.loads(path.read_text())
    finish_report(report, install_sizes)
    write_report(report, path.with_suffix(""))
    print(path.with_suffix(".md").read_text())
    return 0


def target(value: float | None, goal: float) -> dict:
    return {"value": value, "target": goal, "met": None if value is None else value <= goal}


def vs_optimum_defaults(ratios: dict, by_name: dict, groups_run: dict) -> None:
    """Each own-export row's end to end against Optimum with its defaults on the same backend: the one of its
    group where there is one (run side by side), else the first group's."""
    defaults = [(g, m) for g in OWN_GROUPS if g in groups_run for m in GROUPS[g]
                if m.runtime == "optimum" and m.precision is None and not m.static and m.name in ratios]
    for group in (g for g in OWN_GROUPS if g in groups_run):
        for member in GROUPS[group]:
            if member.name not in ratios or any(m is member for _, m in defaults):
                continue
            backend = by_name[member.name]["backend"]
            same = [(g, m) for g, m in defaults if m.backend == backend]
            reference = next((m for g, m in same if g == group), same[0][1] if same else None)
            if reference is not None:
                ratios[member.name]["optimum_defaults"] = reference.name
                ratios[member.name]["vs_optimum_defaults_total"] = ratio(median_of(by_name[member.name], "total"),
                                                                         median_of(by_name[reference.name], "total"))


def ratios_and_targets(report: dict) -> tuple[dict, dict]:
    by_name = {r["name"]: r for r in report["results"]}
    ratios = {}
    for group, entries in GROUPS.items():
        if group not in report["groups"]:
            continue
        torch_total = (report["groups"][group]["torch_total"] or {}).get("median")
        torch_step = (report["groups"][group]["torch_unet_per_step"] or {}).get("median")
        for name, *_ in entries:
            r = by_name.get(name)
            if r is None or not r.get("stages"):
                continue
            ratios[name] = {"vs_torch_total": ratio(median_of(r, "total"), torch_total),
                            "vs_torch_unet_per_step": ratio(median_of(r, "unet_per_step"), torch_step),
                            "glue_share_percent": 100 * ratio(median_of(r, "scheduler_and_glue"), median_of(r, "total"))}
        mine, theirs = (by_name.get(entries[0][0]), by_name.get(entries[1][0]))
        if mine and theirs and mine.get("stages") and theirs.get("stages"):
            pair = {stage: ratio(median_of(mine, stage), median_of(theirs, stage))
                    for stage in ("total", "unet_per_step", "text_encoder", "vae_decode", "scheduler_and_glue")}
            # Run i of each was made in the same round, seconds apart: the spread of these per-round ratios shows
            # how much of a difference the machine's noise alone makes.
            paired = [a["total"] / b["total"] for a, b in zip(mine["runs"], theirs["runs"])]
            pair["total_per_round"] = paired
            pair["total_per_round_median"] = describe(paired)["median"] if paired else None
            pair["group"] = group
            ratios[f"{entries[0][0]} / {entries[1][0]}"] = pair
    vs_optimum_defaults(ratios, by_name, report["groups"])
    diffship_rows = [n for n in ratios if n.startswith("diffship") and "/" not in n]
    # f32 rows: by the precision the UNet ran in where the report has it (defaults may run bf16), else by name
    f32_rows = [n for n in diffship_rows if by_name[n].get("unet_precision", "bf16" if "bf16" in n else "f32") == "f32"]

    def best(rows):
        rows = [n for n in rows if ratios[n]["vs_torch_total"] is not None]
        return min(rows, key=lambda n: ratios[n]["vs_torch_total"]) if rows else None

    targets = {}
    for label, rows in (("best_diffship_vs_torch_f32", f32_rows), ("best_diffship_vs_torch_any_precision",
                                                                    diffship_rows)):
        name = best(rows)
        targets[label] = {**target(ratios[name]["vs_torch_total"] if name else None,
                                   TARGETS["best_diffship_vs_torch"]), "pipeline": name}
    for pair in [n for n in ratios if "/" in n]:
        goal = GROUP_TARGETS.get(ratios[pair].get("group"), TARGETS["diffship_vs_optimum"])
        targets[f"{pair} (end to end)"] = target(ratios[pair]["total"], goal)
    worst_glue = max(diffship_rows, key=lambda n: ratios[n]["glue_share_percent"], default=None)
    targets["glue_share_percent"] = {**target(ratios[worst_glue]["glue_share_percent"] if worst_glue else None,
                                              TARGETS["glue_share_percent"]), "pipeline": worst_glue}
    targets["install_size_ratio"] = target(None, TARGETS["install_size_ratio"])
    return ratios, targets


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
    sys.exit(main())
