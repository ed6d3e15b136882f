"""Peak resident memory of one `diffship export`, stage by stage, in this process:

    .venv/bin/python benchmarks/export_stages.py MODEL OUT --backend onnx,openvino [--out benchmarks/results/NAME]

Each stage is what the export tells its progress bar ("export unet: tracing", "export unet: writing ONNX", ...),
plus loading (before the first component) and finishing (tokenizers, report, rename). At each stage's start the
kernel's peak-RSS mark (VmHWM) is reset (`/proc/self/clear_refs`, 5), so each stage's figure is the peak of the
process's resident memory during that stage (exact: the kernel's own mark, no sampling), memory-mapped weight files
counted as they are touched, as in benchmarks/peers/export_peers.py; the export's peak is the largest of them. The
export runs in-process, so this is the exporter's own process only (diffship's export starts no children).

Writes OUT.json and OUT.md when --out is given; prints the table either way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class StageLog:
    """The stages as they come: name, seconds, peak RSS (VmHWM since its start), RSS at its end."""

    def __init__(self):
        self.stages: list[dict] = []
        self._name, self._start = None, None
        self.resets = True

    def enter(self, name: str) -> None:
        self.close()
        self.resets &= _reset_peak()
        self._name, self._start = name, time.perf_counter()

    def close(self) -> None:
        if self._name is None:
            return
        self.stages.append({"stage": self._name, "seconds": round(time.perf_counter() - self._start, 2),
                            "peak_rss_gib": round(_status_kb("VmHWM") / 2**20, 3),
                            "rss_after_gib": round(_status_kb("VmRSS") / 2**20, 3)})
        print(f"{self.stages[-1]}", file=sys.stderr, flush=True)
        self._name = None


def profiled_export(model: str, out: str, log: StageLog, **kwargs) -> Path:
    """diffship.export with its progress bar replaced by one that tells `log` each stage."""
    from diffship.exporters import export_pipeline

    class Bar:
        def __init__(self, iterable, desc="", **_):
            self.iterable = iterable

        def __iter__(self):
            for item in self.iterable:
                log.enter(f"{item.name}: start")
                yield item
            log.enter("finishing (tokenizers, report, rename)")

        def set_description(self, text: str) -> None:
            log.enter(text.removeprefix("export "))

    export_pipeline.tqdm = Bar
    log.enter("loading the PyTorch pipeline")
    try:
        return export_pipeline.export(model, out, **kwargs)
    finally:
        log.close()


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Peak RSS of `diffship export`, stage by stage", "",
             f"{report['date']} · {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM · `{report['command']}`",
             "", f"Export: {report['wall_s'] / 60:.1f} min, **peak RSS {report['peak_rss_gib']:.2f} GiB** "
                 f"(the kernel's VmHWM, reset at each stage).", "",
             "| stage | seconds | peak RSS (GiB) | RSS after (GiB) |", "| --- | ---: | ---: | ---: |"]
    for s in report["stages"]:
        lines.append(f"| {s['stage']} | {s['seconds']:.1f} | {s['peak_rss_gib']:.2f} | {s['rss_after_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--backend", default="onnx,openvino")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = parser.parse_args()

    from diffship.benchmarking.machine import machine_info, now
    from diffship.benchmarking.report import write_report

    log = StageLog()
    start = time.perf_counter()
    profiled_export(args.model, args.output, log, backend=args.backend, height=args.height, width=args.width,
                    dtype=args.dtype, overwrite=args.overwrite, progress=True)
    report = {"schema": "diffship-export-stages/1", "date": now(), "command": " ".join(sys.argv),
              "machine": machine_info(), "wall_s": round(time.perf_counter() - start, 1),
              "peak_rss_gib": max(s["peak_rss_gib"] for s in log.stages), "peak_reset_per_stage": log.resets,
              "stages": log.stages}
    text = to_markdown(report)
    print(text)
    if args.out:
        write_report(args.out, report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
