"""Cold start: how long loading an exported pipeline takes the first time and the second, per backend.

The first load compiles (ONNX Runtime's graph optimizations, OpenVINO's compile) and writes the compile cache
(runtimes/cache.py); the second reads it. Each load is a fresh process (nothing warm in Python), with a fresh cache
folder per backend and round; the file cache of the OS is left as it is (the export's files are read in both).

    .venv/bin/python benchmarks/cold_start.py EXPORT_DIR [--rounds 2] [--out benchmarks/results/cold_start]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from diffship.benchmarking.machine import machine_info, now, versions
from diffship.benchmarking.report import write_report

# One load in a child process: (seconds from_pretrained took, peak RSS in bytes) as JSON on stdout.
CHILD = """
import json, resource, sys, time
from diffship.pipelines import AutoPipelineForText2Image
start = time.perf_counter()
pipe = AutoPipelineForText2Image.from_pretrained(sys.argv[1], backend=sys.argv[2], compile_cache_dir=sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - start, "pipeline": type(pipe).__name__,
                  "precisions": pipe.inference_precisions,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def load_once(export: Path, backend: str, cache: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(export), backend, str(cache)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--backends", default="onnxruntime,openvino")
    parser.add_argument("--rounds", type=int, default=2, help="first/second load pairs per backend")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    report = {"date": now(), "machine": machine_info(), "versions": versions(), "export": str(args.export),
              "results": {}}
    for backend in args.backends.split(","):
        rounds = []
        for r in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="diffship-cold-start-") as cache:
                first = load_once(args.export, backend, Path(cache))
                second = load_once(args.export, backend, Path(cache))
            rounds.append({"first": first, "second": second})
            print(f"{backend} round {r + 1}: first {first['seconds']:.2f} s, second {second['seconds']:.2f} s",
                  flush=True)
        firsts = [x["first"]["seconds"] for x in rounds]
        seconds = [x["second"]["seconds"] for x in rounds]
        report["results"][backend] = {
            "rounds": rounds, "first_median_s": statistics.median(firsts),
            "second_median_s": statistics.median(seconds),
            "speedup": statistics.median(firsts) / statistics.median(seconds),
            "peak_rss_first": max(x["first"]["peak_rss"] for x in rounds),
            "peak_rss_second": max(x["second"]["peak_rss"] for x in rounds)}
    lines = [f"# Cold start: first and second load of {args.export.name}", "",
             f"{report['machine'].get('cpu', '')}, {report['date']}; medians of {args.rounds} rounds, each load a "
             "fresh process, a fresh compile cache per round.", "",
             "| backend | first load | second load | speed-up | peak RSS first / second |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for backend, r in report["results"].items():
        lines.append(f"| {backend} | {r['first_median_s']:.2f} s | {r['second_median_s']:.2f} s | "
                     f"{r['speedup']:.1f}x | {r['peak_rss_first'] / 2**30:.1f} / {r['peak_rss_second'] / 2**30:.1f} GiB |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_report(args.out, report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
