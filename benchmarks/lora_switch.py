"""What changing LoRA costs: switching at run time on a `--swappable-lora` export, against reloading the pipeline
and against re-exporting with the LoRA baked in.

On the full-size SD 1.5 architecture (random weights, diffship.testing's "full-size"), with two LoRAs of rank
`--rank` made for it (diffusers/PEFT format, attention projections and resnet convolutions: a LoCon), per backend,
in a fresh process:

- reload: `from_pretrained` plus the first generation's extra time over a warm one (OpenVINO compiles at first run);
- each run-time change (`load_lora_weights`, `set_adapters` to the other adapter, `unload_lora_weights`): the call
  plus the next generation's extra time over a warm one (the sessions are rebuilt with the new weights);
- re-export: the wall time of `export(..., loras=[...])` to both formats (one run).

Medians of `--rounds` rounds of the switches; the generation is `--steps` Euler steps at `--size`, batch 1.

    .venv/bin/python benchmarks/lora_switch.py --work /tmp/lora-switch --out benchmarks/results/lora_switch
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from diffship.benchmarking.machine import machine_info, now, versions
from diffship.benchmarking.report import write_report

CHILD = r"""
import json, resource, sys, time
import numpy as np
from diffship.pipelines import AutoPipelineForText2Image
export, backend, lora_a, lora_b, rounds, steps, size = sys.argv[1:8]
rounds, steps, size = int(rounds), int(steps), int(size)
def generate():
    start = time.perf_counter()
    pipe("a castle on a hill", num_inference_steps=steps, height=size, width=size, output_type="np",
         generator=0)
    return time.perf_counter() - start
start = time.perf_counter()
pipe = AutoPipelineForText2Image.from_pretrained(export, backend=backend, compile_cache_dir=False)
pipe.set_progress_bar_config(disable=True)
load = time.perf_counter() - start
first = generate()
warm = min(generate() for _ in range(2))
out = {"load_s": load, "first_generation_s": first, "warm_generation_s": warm, "rounds": []}
for r in range(rounds):
    row = {}
    for label, call in [("load_lora_weights", lambda: pipe.load_lora_weights(lora_a, adapter_name=f"a{r}")),
                        ("load_second", lambda: pipe.load_lora_weights(lora_b, adapter_name=f"b{r}")),
                        ("set_adapters", lambda: pipe.set_adapters([f"a{r}"], adapter_weights=[0.7])),
                        ("unload_lora_weights", lambda: pipe.unload_lora_weights())]:
        start = time.perf_counter()
        call()
        seconds = time.perf_counter() - start
        row[label] = {"call_s": seconds, "next_generation_s": generate()}
    out["rounds"].append(row)
    warm = min(warm, generate())
out["warm_generation_s"] = warm
out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(out))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the model, LoRAs and exports")
    parser.add_argument("--model", type=Path, default=None, help="a diffusers SD 1.x folder (default: full-size)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--backends", default="onnxruntime,openvino")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--skip-reexport", action="store_true", help="do not time an export with the LoRA baked in")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()

    from diffship.exporters import export
    from diffship.testing.tiny_adapters import save_tiny_lora
    from diffship.testing.tiny_models import save_tiny_pipeline

    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or args.work / "full-size"
    if not (model / "model_index.json").is_file():
        print("building the full-size model", flush=True)
        save_tiny_pipeline(model, "full-size")
    loras = [args.work / f"lora_{name}.safetensors" for name in ("a", "b")]
    for seed, path in enumerate(loras):
        if not path.is_file():
            print(f"writing {path.name}", flush=True)
            save_tiny_lora(model, path, rank=args.rank, convolutions=True, seed=seed, strength=0.05)
    report = {"date": now(), "machine": machine_info(), "versions": versions(), "rank": args.rank,
              "steps": args.steps, "size": args.size, "results": {}}
    swappable = args.work / "swappable"
    if not (swappable / "export_report.json").is_file():
        print("exporting with --swappable-lora", flush=True)
        start = time.perf_counter()
        export(model, swappable, ["onnx", "openvino"], swappable_lora=True, overwrite=True)
        report["swappable_export_s"] = time.perf_counter() - start
    if not args.skip_reexport:
        print("re-exporting with the LoRA baked in", flush=True)
        start = time.perf_counter()
        export(model, args.work / "baked", ["onnx", "openvino"], loras=[loras[0]], overwrite=True)
        report["reexport_s"] = time.perf_counter() - start
    for backend in args.backends.split(","):
        print(f"{backend}: switching", flush=True)
        out = subprocess.run([sys.executable, "-c", CHILD, str(swappable), backend, str(loras[0]), str(loras[1]),
                              str(args.rounds), str(args.steps), str(args.size)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{backend}: the switching run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        warm = result["warm_generation_s"]
        result["reload_s"] = result["load_s"] + result["first_generation_s"] - warm
        result["switch_s"] = {
            label: statistics.median(r[label]["call_s"] + r[label]["next_generation_s"] - warm
                                     for r in result["rounds"])
            for label in result["rounds"][0]}
        report["results"][backend] = result
        print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1), flush=True)

    lines = [f"# LoRA: switching at run time vs reloading vs re-exporting (full-size SD 1.5 architecture)", "",
             f"{report['machine'].get('cpu', '')}, {report['date']}; two rank-{args.rank} LoCon LoRAs (attention "
             f"projections and resnet convolutions); each cost is the call plus the next generation's time over a "
             f"warm generation ({args.steps} Euler steps, {args.size}x{args.size}, batch 1); medians of "
             f"{args.rounds} rounds; no compile cache.", "",
             "| backend | warm generation | reload (load + first-run extra) | load_lora_weights | second adapter "
             "| set_adapters | unload_lora_weights | peak RSS |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for backend, r in report["results"].items():
        s = r["switch_s"]
        lines.append(f"| {backend} | {r['warm_generation_s']:.2f} s | {r['reload_s']:.2f} s | "
                     f"{s['load_lora_weights']:.2f} s | {s['load_second']:.2f} s | {s['set_adapters']:.2f} s | "
                     f"{s['unload_lora_weights']:.2f} s | {r['peak_rss'] / 2**30:.1f} GiB |")
    if "reexport_s" in report:
        lines += ["", f"Re-exporting with the LoRA baked in (`--lora`, ONNX and OpenVINO): {report['reexport_s']:.0f} s."]
    if "swappable_export_s" in report:
        lines += [f"The `--swappable-lora` export itself: {report['swappable_export_s']:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_report(args.out, report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
