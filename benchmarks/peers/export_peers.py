"""Each side's own export of one diffusers model, made as its users make it, each timed and its memory sampled:

    .venv/bin/python benchmarks/peers/export_peers.py out/full-size out/peer-exports     # full-size: 45-75 minutes

- optimum-onnx:     `optimum-cli export onnx --model SRC --task text-to-image` (Optimum's venv, .venv-optimum)
- optimum-openvino: `optimum-cli export openvino --model SRC --task text-to-image` (its defaults: no
                    --weight-format, so whatever Optimum Intel picks for the model's size)
- diffship:         `diffship export SRC OUT --backend onnx,openvino` (diffship's defaults otherwise)
- diffship-best:    `diffship export SRC OUT --backend openvino --quantize hybrid --deepcache` (hybrid int8, the
                    fastest configuration of diffship's precision benchmark, plus the shallow UNet that DeepCache
                    runs between full steps: compare_peers.py --best-call '{"cache": "deepcache", ...}' uses it);
                    `--best-args` changes it, `--best-args none` skips it

into OUT_ROOT/<name>/, one after another, each in a process tree whose resident memory is sampled every 0.2 s (the
exporter's RSS plus its descendants' PSS: its peak is what the machine must hold; memory-mapped weight files count
as they are touched) and whose wall time is taken. The UNet's fp32 weight size (its parameter count from the
source's safetensors headers, times 4 bytes) is the yardstick of the "peak RSS <= 2x the UNet's fp32 weights"
target. Writes benchmarks/results/export_memory.json and .md (or --out). `--height/--width` go to diffship's exports
(the size they are traced and validated at; Optimum's have no such option). An export folder already there is kept
(with its earlier figures, when the JSON has them) unless --force; --only picks exporters.

Optimum pins transformers 4.x, which reads CLIP text encoders only in the Hub's key layout (`text_model.` prefix;
see optimum_fixtures.py): a source saved without it is given to Optimum as a view (links to the source's files, the
text encoders' weights rewritten into OUT_ROOT/.optimum-source), so that both sides export the same weights and the
source is never modified. benchmarks/compare_peers.py then runs every side on its own export.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO / "benchmarks")]

from compare_peers import optimum_versions, peer_env  # noqa: E402
from optimum_fixtures import TEXT_ENCODERS, _hub_name, hub_layout  # noqa: E402

SAMPLE_S = 0.2
TARGET_X_UNET = 2.0  # peak RSS of an export <= 2x the UNet's fp32 weights
BEST_ARGS = "--backend openvino --quantize hybrid --deepcache"
EXPORTERS = ("optimum-onnx", "optimum-openvino", "diffship", "diffship-best")
SCHEMA = "diffship-export-memory/1"


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---- memory of a process tree ---------------------------------------------------------------------------------------

def _processes() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, start time in clock ticks since boot)} of every process now."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
        out[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return out


def _memory_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/{'status' if key == 'VmRSS' else 'smaps_rollup'}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_bytes(root: int, min_age_s: float = 1.0) -> int:
    """Resident memory of `root` (its RSS) and of its descendants (their PSS, so that pages shared with the parent
    by fork count once), for descendants alive `min_age_s` or more: a helper forked and exec'd at once (ldconfig,
    uname) shows its parent's pages until it execs, and would count them twice."""
    processes = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in processes.items():
        children.setdefault(ppid, []).append(pid)
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        now = float(f.read().split()[0]) * ticks
    total, todo = _memory_kb(root, "VmRSS"), list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        if now - processes[pid][1] >= min_age_s * ticks:
            total += _memory_kb(pid, "Pss")
    return total * 1024


def run_sampled(command: list[str], log_path: Path, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run `command` (output to `log_path`); its wall time, exit status, the peak of its process tree's summed RSS
    (sampled every SAMPLE_S) and the largest single process's own peak (the kernel's ru_maxrss)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start, peak = time.perf_counter(), 0
    with open(log_path, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, tree_rss_bytes(process.pid))
            time.sleep(SAMPLE_S)
    process.returncode = os.waitstatus_to_exitcode(status)
    largest = usage.ru_maxrss / 1024
    # the tree's peak is at least its largest process's, which the kernel knows exactly (sampling can miss it)
    return {"command": command, "returncode": process.returncode, "wall_s": time.perf_counter() - start,
            "peak_rss_mb": max(peak / 2**20, largest), "peak_rss_tree_sampled_mb": peak / 2**20,
            "max_rss_single_process_mb": largest, "log": str(log_path)}


# ---- the source ----------------------------------------------------------------------------------------------------

def unet_fp32_bytes(source: Path, component: str = "unet") -> dict:
    """The UNet's (or another component's) parameter count (from its safetensors headers; no weight is read) and
    its size in fp32."""
    folder = source / component
    files = sorted(p for p in folder.glob("*.safetensors") if ".fp16." not in p.name) or sorted(
        folder.glob("*.safetensors"))
    if not files:
        return {"parameters": None, "fp32_bytes": None, "files": []}
    count = 0
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                count += math.prod(entry["shape"])
    return {"parameters": count, "fp32_bytes": 4 * count, "files": [p.name for p in files]}


def optimum_source(source: Path, work: Path) -> Path:
    """`source`, or a view of it whose text encoders are in the Hub's key layout (see the module docstring)."""
    from safetensors import safe_open

    weights = [source / name / "model.safetensors" for name in TEXT_ENCODERS]
    needs = False
    for path in (w for w in weights if w.is_file()):
        with safe_open(str(path), "np") as f:
            needs |= any(_hub_name(k) != k for k in f.keys())
    if not needs:
        return source
    view = work / ".optimum-source"
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name in TEXT_ENCODERS and entry.is_dir():
            (view / entry.name).mkdir()
            for item in entry.iterdir():
                if item.name == "model.safetensors":
                    shutil.copyfile(item, view / entry.name / item.name)  # rewritten below: a copy, not a link
                else:
                    (view / entry.name / item.name).symlink_to(item.resolve())
        else:
            (view / entry.name).symlink_to(entry.resolve())
    hub_layout(view)
    log(f"  Optimum reads {view} (the source with its text encoders in the Hub layout)")
    return view


# ---- the exports ---------------------------------------------------------------------------------------------------

def commands(args, source_for_optimum: Path) -> dict[str, list[str]]:
    optimum_cli = str(args.optimum_python.parent / "optimum-cli")
    diffship = [str(args.diffship_python.parent / "diffship"), "export", str(args.source)]
    size = [*(["--height", str(args.height)] if args.height else []), *(["--width", str(args.width)] if args.width
                                                                          else [])]
    out = {
        "optimum-onnx": [optimum_cli, "export", "onnx", "--model", str(source_for_optimum), "--task", "text-to-image",
                         str(args.out_root / "optimum-onnx")],
        "optimum-openvino": [optimum_cli, "export", "openvino", "--model", str(source_for_optimum), "--task",
                             "text-to-image", str(args.out_root / "optimum-openvino")],
        "diffship": [*diffship, str(args.out_root / "diffship"), "--backend", "onnx,openvino", *size],
    }
    if args.stages:  # the same export, through export_stages.py: its peak RSS per stage besides
        out["diffship"] = [str(args.diffship_python), str(REPO / "benchmarks" / "export_stages.py"), str(args.source),
                           str(args.out_root / "diffship"), "--backend", "onnx,openvino", *size,
                           "--out", str(args.out_root / "logs" / "diffship_stages")]
    if args.best_args.strip().lower() != "none":
        out["diffship-best"] = [*diffship, str(args.out_root / "diffship-best"), *args.best_args.split(), *size]
    return out


def _with_stage_peaks(figures: dict) -> None:
    """export_stages.py resets the kernel's peak mark at each stage, so the process's ru_maxrss is its last stage's:
    its largest process's peak is the largest stage peak (the kernel's own marks) instead."""
    peak_mb = max(s["peak_rss_gib"] for s in figures["stages"]) * 1024
    figures["max_rss_single_process_mb"] = max(figures["max_rss_single_process_mb"], peak_mb)
    figures["peak_rss_mb"] = max(figures["peak_rss_mb"], peak_mb)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a diffusers model directory (e.g. out/full-size)")
    parser.add_argument("out_root", type=Path, help="where the exports go, one folder each (e.g. out/peer-exports)")
    parser.add_argument("--height", type=int, help="diffship's exports: the size traced and validated at")
    parser.add_argument("--width", type=int)
    parser.add_argument("--best-args", default=BEST_ARGS,
                        help=f"diffship export flags of the 'diffship-best' export (default '{BEST_ARGS}'; 'none' "
                             "skips it)")
    parser.add_argument("--only", default=",".join(EXPORTERS), help=f"which of {', '.join(EXPORTERS)}")
    parser.add_argument("--force", action="store_true", help="remake exports that are already there")
    parser.add_argument("--stages", action="store_true",
                        help="run diffship's export through benchmarks/export_stages.py (the same export, in its "
                             "own process as `diffship export`) and report its peak RSS per stage too")
    parser.add_argument("--optimum-python", type=Path, default=REPO / ".venv-optimum" / "bin" / "python")
    parser.add_argument("--diffship-python", type=Path, default=Path(sys.executable))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "export_memory",
                        help="OUT.json and OUT.md (default benchmarks/results/export_memory)")
    args = parser.parse_args()
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := [n for n in only if n not in EXPORTERS]:
        parser.error(f"unknown exporters {unknown}; choose from {', '.join(EXPORTERS)}")
    if not (args.source / "model_index.json").is_file():
        parser.error(f"{args.source} is not a diffusers model directory (no model_index.json)")
    if any(n.startswith("optimum") for n in only) and not args.optimum_python.exists():
        parser.error(f"{args.optimum_python} is missing: bash benchmarks/peers/setup_optimum_venv.sh")
    args.source, args.out_root = args.source.resolve(), args.out_root.resolve()
    args.out_root.mkdir(parents=True, exist_ok=True)

    from diffship.benchmarking.machine import machine_info, now, versions
    from diffship.benchmarking.report import write_report

    earlier, earlier_machine = {}, None
    if args.out.with_suffix(".json").is_file():
        earlier_report = json.loads(args.out.with_suffix(".json").read_text())
        earlier, earlier_machine = earlier_report.get("exports", {}), earlier_report.get("machine")
    report = {"schema": SCHEMA, "date": now(), "command": " ".join(sys.argv), "machine": machine_info(),
              "versions": versions(("diffship", "onnxruntime", "openvino", "torch", "diffusers", "transformers",
                                    "nncf")),
              "versions_optimum_venv": None, "out_root": str(args.out_root),
              "source": {"path": str(args.source), **unet_fp32_bytes(args.source)},
              "target_x_unet_fp32": TARGET_X_UNET, "exports": {}}
    if args.optimum_python.exists():
        report["versions_optimum_venv"] = optimum_versions(args.optimum_python)
    elif earlier:  # the rows kept from an earlier run were made with that run's Optimum venv
        report["versions_optimum_venv"] = earlier_report.get("versions_optimum_venv")
    needs_optimum = any(n.startswith("optimum") for n in only)
    todo = commands(args, optimum_source(args.source, args.out_root) if needs_optimum else args.source)
    unet_bytes = report["source"]["fp32_bytes"]
    for name, command in todo.items():
        dest = args.out_root / name
        if name not in only or ((dest / "model_index.json").is_file() and not args.force):
            if name in only:
                log(f"{name}: keeping {dest} (--force remakes it)")
            if name in earlier:  # the machine it was measured on goes with it
                report["exports"][name] = {"machine": earlier_machine, "date": earlier_report.get("date"),
                                           **earlier[name], "kept": True}
            continue
        if dest.exists():
            if not (dest / "model_index.json").is_file() and any(dest.iterdir()):
                log(f"{name}: {dest} holds something that is not an export; not touching it")
                report["exports"][name] = {"command": command, "error": f"{dest} is not an export: left alone"}
                continue
            shutil.rmtree(dest)
        log(f"{name}: {' '.join(command)}")
        env = peer_env() if name.startswith("optimum") else None
        figures = run_sampled(command, args.out_root / "logs" / f"{name}.log", env=env)
        stages = args.out_root / "logs" / "diffship_stages.json"
        if name == "diffship" and args.stages and stages.is_file() and figures["returncode"] == 0:
            figures["stages"] = json.loads(stages.read_text())["stages"]
            _with_stage_peaks(figures)
        figures["output_mb"] = (sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) / 2**20
                                if dest.is_dir() else None)
        ratio = figures["peak_rss_mb"] * 2**20 / unet_bytes if unet_bytes else None
        figures.update(peak_rss_x_unet_fp32=ratio, met=None if ratio is None else ratio <= TARGET_X_UNET,
                       error=None if figures["returncode"] == 0 else f"exit status {figures['returncode']}, see "
                                                                     f"{figures['log']}")
        report["exports"][name] = figures
        log(f"  {name}: {figures['wall_s'] / 60:.1f} min, peak RSS {figures['peak_rss_mb'] / 1024:.2f} GiB"
            + (f" ({ratio:.2f}x the UNet's fp32 weights)" if ratio else "") + (f"; FAILED: {figures['error']}"
                                                                              if figures["error"] else ""))
    print(write_report(args.out, report, format_markdown(report)))
    return 0 if all(not e.get("error") for e in report["exports"].values()) else 1


def format_markdown(report: dict) -> str:
    source, m = report["source"], report["machine"]
    unet_gb = (source["fp32_bytes"] or 0) / 2**30
    lines = [
        "# Export time and peak memory: diffship and Optimum, each exporting as its users do", "",
        f"{report['date']} · {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM · source `{source['path']}`: "
        f"UNet of {source['parameters'] or 0:,} parameters, **{unet_gb:.2f} GiB in fp32** (target: peak RSS "
        f"≤ {report['target_x_unet_fp32']:g}x that, {report['target_x_unet_fp32'] * unet_gb:.2f} GiB). Made by "
        "`benchmarks/peers/export_peers.py`.", "",
        "| exporter | wall time | peak RSS (process tree) | largest process | x UNet fp32 weights | ≤ 2x | output | "
        "command |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for name, e in report["exports"].items():
        if e.get("error") and "wall_s" not in e:
            lines.append(f"| {name} | {e['error']} |" + " |" * 6)
            continue
        met = "-" if e.get("met") is None else ("yes" if e["met"] else "**no**")
        ratio = "-" if e.get("peak_rss_x_unet_fp32") is None else f"{e['peak_rss_x_unet_fp32']:.2f}x"
        output = "-" if e.get("output_mb") is None else f"{e['output_mb'] / 1024:.2f} GiB"
        command = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(e["command"]))
        kept = (f" (kept from an earlier run: {e['date'] or '?'}, {e['machine']['cpu']})" if e.get("machine")
                else " (kept from an earlier run)")
        failed = f" (FAILED: {e['error']})" if e.get("error") else (kept if e.get("kept") else "")
        lines.append(f"| {name}{failed} | {e['wall_s'] / 60:.1f} min | {e['peak_rss_mb'] / 1024:.2f} GiB | "
                     f"{e['max_rss_single_process_mb'] / 1024:.2f} GiB | {ratio} | {met} | {output} | "
                     f"`{command}` |")
    lines += ["", "Peak RSS: the resident memory of the exporter's process (RSS) and of its child processes (PSS, so "
              "that pages shared by fork count once; helpers that live under a second are left out), summed, sampled "
              f"every {SAMPLE_S:g} s (a peak shorter than that can be missed); memory-mapped files count as they are "
              "read; never less than the largest process's own peak. Largest process: the kernel's peak for the "
              "biggest single process of the tree (ru_maxrss).", "",
              "- diffship venv: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v) + ".",
              "- Optimum venv" + (" (the kept rows')" if any(e.get("kept") for e in report["exports"].values())
                                  else "") + ": "
              + ", ".join(f"{k} {v}" for k, v in (report["versions_optimum_venv"] or {}).items() if v) + "."]
    lines += [f"- {name}: {e['note']}." for name, e in report["exports"].items() if e.get("note")]
    lines += [f"- {note}" for note in report.get("notes", [])]
    for name, e in report["exports"].items():
        if e.get("stages"):
            lines += ["", f"{name}: peak RSS per stage (the export process's own, the kernel's VmHWM reset at each "
                      "stage; `benchmarks/export_stages.py`), the stages of the largest component and any other "
                      "stage within 1 GiB of the peak:", "", "| stage | seconds | peak RSS |", "| --- | ---: | ---: |"]
            top = max(s["peak_rss_gib"] for s in e["stages"])
            largest = "unet"
            for s in e["stages"]:
                if s["stage"].startswith(largest) or s["peak_rss_gib"] >= top - 1:
                    lines.append(f"| {s['stage']} | {s['seconds']:.0f} | {s['peak_rss_gib']:.2f} GiB |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
