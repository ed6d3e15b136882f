"""A benchmark's figures as a terminal table (in the style of TensorRT's diffusion demo) and as Markdown."""

from __future__ import annotations

import json
from pathlib import Path

from diffship.benchmarking.summary import stages_sum


def write_report(out: str | Path, report: dict, markdown: str) -> str:
    """A benchmark script's results: OUT.json (the figures, JSON; anything else written as its str) and OUT.md
    (their tables), the folder made if need be. Returns `markdown`, for the script to print."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown)
    return markdown

# (label, stage, statistic) rows of per-run latency, in milliseconds. The "unet" stages are the denoiser's steps,
# whichever it is: {denoiser} is "UNet" or "Transformer" (SD3, Flux), as the workers report it.
LATENCY_ROWS = [
    ("text encoder", "text_encoder", "median"),
    ("{denoiser} x {steps}", "unet", "median"),
    ("  {denoiser} per step (median)", "unet_per_step", "median"),
    ("  {denoiser} per step (p90)", "unet_per_step", "p90"),
    ("UNet shallow steps (DeepCache)", "unet_shallow", "median"),
    ("scheduler and glue", "scheduler_and_glue", "median"),
    ("VAE encode", "vae_encode", "median"),
    ("VAE decode", "vae_decode", "median"),
]


def _stage(result: dict, stage: str, stat: str = "median") -> float | None:
    figures = (result.get("stages") or {}).get(stage)
    return None if figures is None else figures[stat]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.1f} ms"


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:,.2f} s"


def _mb(mib: float | None) -> str:
    return "-" if mib is None else f"{mib:,.0f} MiB"


def gflops_cell(result: dict) -> str:
    """"324 (89 %)": achieved GFLOP/s and share of the peak; "... % of bf16" where the peak is of that precision."""
    if not result.get("unet_gflops"):
        return "-"
    of = f" of {result['unet_precision']}" if result.get("unet_precision") else ""
    return f"{result['unet_gflops']:.0f} ({result['unet_percent_of_peak']:.0f} %{of})"


def denoiser_label(report: dict) -> str:
    """"Transformer" where every pipeline's denoiser is one (SD3, Flux), else "UNet" (also for reports from before
    the workers named it)."""
    denoisers = {(r.get("info") or {}).get("denoiser") for r in report["results"]} - {None}
    return "Transformer" if denoisers == {"transformer"} else "UNet"


def rows(report: dict) -> list[tuple[str, list[str]] | None]:
    """(label, one cell per result) rows; None marks a separator."""
    results = report["results"]
    steps = next((r["unet_calls_per_run"] for r in results if r.get("unet_calls_per_run")), "?")
    denoiser = denoiser_label(report)
    out: list = []
    for label, stage, stat in LATENCY_ROWS:
        if stage in ("vae_encode", "unet_shallow") and all(_stage(r, stage) is None for r in results):
            continue  # no image to encode, no step cache
        out.append((label.format(steps=steps, denoiser=denoiser), [_ms(_stage(r, stage, stat)) for r in results]))
    out.append(None)
    out.append(("pipeline (median)", [_ms(_stage(r, "total")) for r in results]))
    out.append(("pipeline (p90)", [_ms(_stage(r, "total", "p90")) for r in results]))
    batch = report["settings"].get("batch_size", 1)
    out.append(("throughput", [f"{batch / t:.3f} img/s" if (t := _stage(r, "total")) else "-" for r in results]))
    glue = [(_stage(r, "scheduler_and_glue"), _stage(r, "total")) for r in results]
    out.append(("scheduler and glue share", [f"{100 * g / t:.2f} %" if g is not None and t else "-" for g, t in glue]))
    out.append(None)
    cold = [r.get("cold_start") or {} for r in results]
    out.append(("load and compile", [_s(c.get("load_and_compile_s")) for c in cold]))
    out.append(("time to first image", [_s(c.get("time_to_first_image_s")) for c in cold]))
    memory = [r.get("memory") or {} for r in results]
    out.append(("peak RSS", [_mb(m.get("peak_rss_mb")) for m in memory]))
    out.append(("inference precision", [_precisions(r) for r in results]))
    if report.get("roofline"):
        out.append(("UNet GFLOP/s (% of peak)", [gflops_cell(r) for r in results]))
    return out


def _precisions(result: dict) -> str:
    """"unet bf16, vae_decoder f32": what each graph computed in (the worker reports the pipeline's choice)."""
    chosen = ((result.get("info") or {}).get("inference_precisions")) or {}
    if not chosen:
        return "-"
    if len(set(chosen.values())) == 1:
        return f"all {next(iter(chosen.values()))}"
    return ", ".join(f"{name} {precision}" for name, precision in chosen.items())


def format_table(report: dict) -> str:
    results = report["results"]
    names = [r["name"] + (" (FAILED)" if r.get("error") else "") for r in results]
    table = rows(report)
    label_w = max(len(row[0]) for row in table if row) + 1
    widths = [max(len(n), *(len(row[1][i]) for row in table if row)) + 1 for i, n in enumerate(names)]
    rule = "|" + "-" * (label_w + 1) + "|" + "|".join("-" * (w + 1) for w in widths) + "|"
    lines = [rule, "| " + "stage".ljust(label_w) + "|" + "|".join(n.rjust(w) + " " for n, w in zip(names, widths)) + "|",
             rule]
    for row in table:
        if row is None:
            lines.append(rule)
            continue
        label, cells = row
        lines.append("| " + label.ljust(label_w) + "|" + "|".join(c.rjust(w) + " " for c, w in zip(cells, widths)) + "|")
    lines.append(rule)
    for r in results:
        if r.get("error"):
            lines.append(f"{r['name']} failed: {r['error'].splitlines()[0]}")
    return "\n".join(lines)


def settings_line(report: dict) -> str:
    s = report["settings"]
    return (f"{s['task']} {s['height']}x{s['width']}, batch {s['batch_size']}, {s['steps']} steps "
            f"({s.get('scheduler') or 'the model scheduler'}), guidance {s['guidance_scale']:g}; "
            f"median of {s['runs']} runs after {s['warmup']} warm-up, interleaved")


def machine_line(report: dict) -> str:
    m = report["machine"]
    load = m.get("loadavg_start")
    return (f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, {m['os']}"
            + (f"; load average at start {load[0]:.2f}" if load else ""))


def format_markdown(report: dict, title: str = "diffship bench", plot: str | None = None) -> str:
    results = report["results"]
    lines = [f"# {title}", "",
             f"{report['date']} · {machine_line(report)}", "",
             f"Model `{report['settings']['model']}`: {settings_line(report)}.", "",
             "| stage | " + " | ".join(r["name"] for r in results) + " |",
             "| --- | " + " | ".join("---:" for _ in results) + " |"]
    for row in rows(report):
        if row is not None:
            lines.append(f"| {row[0].strip()} | " + " | ".join(row[1]) + " |")
    if plot:
        lines += ["", f"![per-stage latency]({plot})"]
    v = report.get("versions", {})
    lines += ["", "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + "."]
    checks = [f"{r['name']}: stages sum to {100 * stages_sum(r['stages']) / _stage(r, 'total'):.1f} % of the total"
              for r in results if r.get("stages")]
    if checks:
        lines += ["", "Medians of the stages against the median end-to-end time: " + "; ".join(checks) + "."]
    for r in results:
        if r.get("error"):
            lines.append(f"\n**{r['name']} failed:** `{r['error'].splitlines()[0]}`")
    return "\n".join(lines) + "\n"
