"""diffship against PyTorch eager and Optimum, on the same full-size Stable Diffusion 1.5 architecture (random weights:
latency does not depend on the values), the same prompt, latents, scheduler and steps, in one interleaved run.

    bash benchmarks/peers/setup_optimum_venv.sh              # once: Optimum's venv (.venv-optimum)
    .venv/bin/diffship tiny-model out/full-size --full-size  # once: the diffusers source (4 GB)
    .venv/bin/diffship export out/full-size out/full-size-export --backend onnx,openvino --height 256 --width 256
    .venv/bin/python benchmarks/peers/install_sizes.py --per-runtime      # once: runtime install sizes
    flock /tmp/diffship-bench.lock .venv/bin/python benchmarks/compare_peers.py --size 256

Contestants, each in its own worker process (benchmarks/peers/peer_worker.py for the peers, in their venvs):
PyTorch eager (diffusers' StableDiffusionPipeline on CPU), diffship on ONNX Runtime, on OpenVINO with dynamic shapes
and reshaped to static shapes, Optimum's ORTStableDiffusionPipeline and Optimum Intel's OVStableDiffusionPipeline
(dynamic and static), both loading diffship's export directory (the same graphs). OpenVINO runs fp32 on both sides
(INFERENCE_PRECISION_HINT f32: the CPU plugin would otherwise run bf16 on this CPU); bf16 rows are extra.

The machine has too little memory for all of them at once (a full-size pipeline holds 4-9 GB), so they run in
groups: each group holds a diffship pipeline and its Optimum counterpart, interleaved run by run with the PyTorch
worker, which stays loaded through all groups, so that every ratio is taken between runs made side by side.
Writes OUT.json (schema diffship-bench/1 plus "groups", "ratios", "targets", "install_sizes"), OUT.md and OUT.png.
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

import numpy as np

from diffship.benchmarking import measure_roofline, vae_scale_factor
from diffship.benchmarking.interleave import Contestant, run_rounds, start_all
from diffship.benchmarking.machine import load_average, machine_info, now, versions
from diffship.benchmarking.plot import plot_report
from diffship.benchmarking.roofline import matmul_peak
from diffship.benchmarking.report import format_table
from diffship.benchmarking.summary import SCHEMA, attach_roofline, describe

REPO = Path(__file__).resolve().parents[1]
PEER_WORKER = REPO / "benchmarks" / "peers" / "peer_worker.py"
SCHEDULER = "EulerDiscreteScheduler"  # one UNet call per step on every side; diffusers' and diffship's alike
PROMPT = "a photo of an astronaut riding a horse on mars"
F32, BF16 = {"INFERENCE_PRECISION_HINT": "f32"}, {"INFERENCE_PRECISION_HINT": "bf16"}
TORCH = "PyTorch eager"
# group -> (diffship contestant, its Optimum counterpart): (name, runtime, backend, static, precision)
GROUPS = {
    "ort": [("diffship ORT", "diffship", "onnxruntime", False, "f32"),
            ("Optimum ORT", "optimum", "onnxruntime", False, "f32")],
    "ov": [("diffship OV", "diffship", "openvino", False, "f32"),
           ("Optimum OV", "optimum", "openvino", False, "f32")],
    "ov-static": [("diffship OV static", "diffship", "openvino", True, "f32"),
                  ("Optimum OV static", "optimum", "openvino", True, "f32")],
    "ov-static-bf16": [("diffship OV static bf16", "diffship", "openvino", True, "bf16"),
                       ("Optimum OV static bf16", "optimum", "openvino", True, "bf16")],
}
TARGETS = {"best_diffship_vs_torch": 0.5, "diffship_vs_optimum": 1.0, "glue_share_percent": 1.0,
           "install_size_ratio": 0.25}


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


def make_contestant(name, runtime, backend, static, precision, common: dict, args) -> Contestant:
    if runtime == "diffship":
        options = {"inference_precision": precision} if backend == "openvino" else {}
        spec = {**common, "model_dir": str(args.export), "backend": backend, "static": static, "options": options}
        return Contestant(name, spec, runtime="diffship", backend=backend, static=static, precision=precision)
    if runtime == "diffusers":
        spec = {**common, "kind": "diffusers", "model_dir": str(args.diffusers_model)}
        return Contestant(name, spec, command=[sys.executable, str(PEER_WORKER)], env=peer_env(),
                          runtime="diffusers", backend="torch", precision="f32")
    kind = "optimum-ort" if backend == "onnxruntime" else "optimum-ov"
    spec = {**common, "kind": kind, "model_dir": str(args.export), "static": static,
            "ov_config": (BF16 if precision == "bf16" else F32) if kind == "optimum-ov" else None}
    return Contestant(name, spec, command=[str(args.optimum_python), str(PEER_WORKER)], env=peer_env(),
                      runtime="optimum", backend=backend, static=static, precision=precision)


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image height and width")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per contestant per group")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"which groups, of {', '.join(GROUPS)}")
    parser.add_argument("--export", type=Path, default=REPO / "out" / "full-size-export")
    parser.add_argument("--diffusers-model", type=Path, default=REPO / "out" / "full-size")
    parser.add_argument("--optimum-python", type=Path, default=REPO / ".venv-optimum" / "bin" / "python")
    parser.add_argument("--install-sizes", type=Path, default=REPO / "benchmarks" / "results" / "install_sizes.json")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/peers_SIZE")
    parser.add_argument("--budget-minutes", type=float, default=19.0,
                        help="fewer runs per group when the projected end passes this")
    parser.add_argument("--torch-apart", action="store_true",
                        help="run PyTorch alone first instead of alongside every group (for sizes where three "
                             "full-size pipelines do not fit in memory at once, e.g. 512)")
    parser.add_argument("--min-free-gb", type=float, default=12,
                        help="wait (up to 3 min) for this much available memory before loading a group")
    parser.add_argument("--rerender", type=Path, metavar="OUT.json",
                        help="only rebuild OUT.md and OUT.png (and the ratios) from an earlier run's JSON")
    args = parser.parse_args()
    if args.rerender:
        return rerender(args.rerender, args.install_sizes)
    args.out = args.out or REPO / "benchmarks" / "results" / f"peers_{args.size}"
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown groups {unknown}; choose from {', '.join(GROUPS)}")
    for path in (args.export, args.diffusers_model, args.optimum_python):
        if not path.exists():
            parser.error(f"{path} is missing; see the set-up steps in this script's docstring")

    started, date = time.perf_counter(), now()
    machine = machine_info()
    log(f"{date}: {machine['cpu']}, {machine['cores']} cores, load average {machine['loadavg_start']}")
    work = Path(tempfile.mkdtemp(prefix="diffship-peers-"))
    latents_file = work / "latents.npy"
    latent = args.size // vae_scale_factor(args.export)
    np.save(latents_file, np.random.default_rng(0).standard_normal((1, 4, latent, latent)).astype(np.float32))
    common = {"height": args.size, "width": args.size, "steps": args.steps, "guidance_scale": 7.5,
              "prompt": PROMPT, "negative_prompt": None, "scheduler": SCHEDULER, "latents": str(latents_file),
              "batch_size": 1}

    log("roofline: FLOPs per UNet call and the matmul peak")
    roofline = measure_roofline(args.export, 2, args.size, args.size, log)

    torch = make_contestant(TORCH, "diffusers", "torch", False, "f32", common, args)
    start_all([torch], log)
    contestants, group_log = [torch], {}
    runs = args.runs
    torch_apart = None
    if args.torch_apart:  # PyTorch first, on its own; then the pairs without it (less memory at once)
        group_start, load_start = time.perf_counter(), load_average()
        run_rounds([torch], args.warmup, runs, log)
        torch.finish()
        torch_apart = torch.runs
        group_log["torch"] = {"members": [TORCH], "runs": runs, "loadavg_start": load_start,
                              "loadavg_end": load_average(), "seconds": time.perf_counter() - group_start,
                              "mem_available_gb_at_start": mem_available_gb()}
    for index, group in enumerate(groups):
        group_start = time.perf_counter()
        members = [make_contestant(*entry, common, args) for entry in GROUPS[group]]
        available = wait_for_memory(args.min_free_gb)
        load_start = load_average()
        log(f"group {group}: {', '.join(m.name for m in members)}"
            + ("" if torch_apart else f" (+ {TORCH})") + f"; {available:.1f} GiB available")
        start_all(members, log)
        torch_before = len(torch.runs)
        run_rounds(members if torch_apart else [torch, *members], args.warmup, runs, log)
        for m in members:
            m.finish()
        contestants += members
        torch_runs = torch_apart or torch.runs[torch_before:]
        group_log[group] = {
            "members": [m.name for m in members], "runs": runs, "mem_available_gb_at_start": available,
            "loadavg_start": load_start, "loadavg_end": load_average(), "seconds": time.perf_counter() - group_start,
            "torch": "its own group, before the pairs" if torch_apart else "interleaved in this group",
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
    torch.finish()
    machine["loadavg_end"] = load_average()
    if roofline:
        # Other jobs on the machine lower a peak measured once; the better of two is nearer the machine's own.
        end_peak = matmul_peak()
        roofline["peak_at_end"] = end_peak
        if end_peak["peak_gflops"] > roofline["peak_gflops"]:
            roofline["peak"], roofline["peak_gflops"] = end_peak, end_peak["peak_gflops"]

    versions_here = versions(("diffship", "numpy", "onnxruntime", "openvino", "torch", "diffusers", "transformers"))
    report = {
        "schema": SCHEMA, "date": date, "duration_s": None, "command": " ".join(sys.argv), "machine": machine,
        "versions": versions_here, "versions_optimum_venv": optimum_versions(args.optimum_python),
        "settings": {"model": f"{args.export.name} (diffusers source {args.diffusers_model.name}): SD1.5 "
                              "architecture, random weights, fp32",
                     "task": "text-to-image", "height": args.size, "width": args.size, "steps": args.steps,
                     "batch_size": 1, "guidance_scale": 7.5, "scheduler": SCHEDULER, "prompt": PROMPT,
                     "negative_prompt": None, "runs": args.runs, "warmup": args.warmup, "seed": 0,
                     "strength": None},
        "roofline": roofline,
        "results": [],
        "groups": group_log,
    }
    for c in contestants:
        result = c.result()
        result["group"] = "all" if c is torch else next(g for g, e in GROUPS.items() if c.name in [x[0] for x in e])
        attach_roofline(result, (roofline or {}).get("unet_flops_per_call"), (roofline or {}).get("peak_gflops"))
        report["results"].append(result)
    finish_report(report, args.install_sizes)
    report["duration_s"] = time.perf_counter() - started
    write_report(report, args.out)
    print(format_table(report))
    print(args.out.with_suffix(".md").read_text())
    log(f"done in {report['duration_s'] / 60:.1f} min: {args.out}.json/.md/.png")
    return 0


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
            ratios[f"{entries[0][0]} / {entries[1][0]}"] = pair
    diffship_rows = [n for n in ratios if n.startswith("diffship") and "/" not in n]
    f32_rows = [n for n in diffship_rows if "bf16" not in n]

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
        targets[f"{pair} (end to end)"] = target(ratios[pair]["total"], TARGETS["diffship_vs_optimum"])
    worst_glue = max(diffship_rows, key=lambda n: ratios[n]["glue_share_percent"], default=None)
    targets["glue_share_percent"] = {**target(ratios[worst_glue]["glue_share_percent"] if worst_glue else None,
                                              TARGETS["glue_share_percent"]), "pipeline": worst_glue}
    targets["install_size_ratio"] = target(None, TARGETS["install_size_ratio"])
    return ratios, targets


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
    sys.exit(main())
