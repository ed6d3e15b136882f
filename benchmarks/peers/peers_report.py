"""The Markdown page of benchmarks/compare_peers.py: latency per pipeline, ratios, targets, install sizes, roofline."""

from __future__ import annotations

import json

from diffship.benchmarking.report import gflops_cell


def _ms(seconds):
    return "-" if seconds is None else (f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.0f} ms")


def _x(value):
    return "-" if value is None else f"{value:.2f}x"


def _stage(result, stage, stat="median"):
    figures = (result.get("stages") or {}).get(stage)
    return figures[stat] if figures else None


def _cold_and_memory(r) -> str:
    """The load + compile, first image and peak RSS cells of a row."""
    cold, memory = r.get("cold_start") or {}, r.get("memory") or {}
    return (f"{_ms(cold.get('load_and_compile_s'))} | {_ms(cold.get('time_to_first_image_s'))} | "
            f"{memory.get('peak_rss_mb', 0) / 1024:.1f} GiB")


def own_exports_section(report: dict) -> list[str]:
    """The own-export groups: each side on its own export with its own defaults, and the exports' cost."""
    ratios = report["ratios"]
    rows = [r for r in report["results"] if (r.get("config") or {}).get("model_dir") and
            r.get("group", "").startswith("own-")]
    if not rows:
        return []
    lines = ["", "## Each side on its own export, with its own defaults", "",
             "Optimum's pipelines load `optimum-cli export onnx` / `optimum-cli export openvino` exports, diffship "
             "its own `diffship export`, each with nothing passed but the directory (and diffship's backend); "
             "Optimum Intel static is reshaped to the request and compiled, as its documentation recommends. "
             "UNet precision: what the UNet ran in, as the runtime reported it (int8: the graph quantizes "
             "activations); its % of peak is of that precision's peak.", "",
             "| pipeline | export | UNet precision | end to end | UNet per step | vs PyTorch | vs Optimum defaults, "
             "same backend | UNet GFLOP/s (% of peak) | load + compile | first image | peak RSS |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        config = r["config"]
        export = config["model_dir"].rstrip("/").split("/")[-1]
        extra = {k: v for k, v in {"options": config.get("options"), "call": config.get("call_kwargs")}.items() if v}
        if extra:
            export += " " + ", ".join(f"{k} `{json.dumps(v)}`" for k, v in extra.items())
        if r.get("error"):
            lines.append(f"| {r['name']} | {export} | failed: {r['error'].splitlines()[0][:120]} |" + " |" * 8)
            continue
        own = ratios.get(r["name"], {})
        lines.append(f"| {r['name']} | {export} | {r.get('unet_precision') or r.get('precision')} | "
                     f"{_ms(_stage(r, 'total'))} | {_ms(_stage(r, 'unet_per_step'))} | "
                     f"{_x(own.get('vs_torch_total'))} | {_x(own.get('vs_optimum_defaults_total'))} | {gflops_cell(r)} | "
                     f"{_cold_and_memory(r)} |")
    memory = report.get("export_memory")
    if memory:
        unet_gb = (memory["source"].get("fp32_bytes") or 0) / 2**30
        lines += ["", f"The exports (benchmarks/peers/export_peers.py, {memory['date']}; the UNet's fp32 weights: "
                  f"{unet_gb:.2f} GiB, target peak RSS ≤ {memory['target_x_unet_fp32']:g}x that):", "",
                  "| exporter | wall time | peak RSS | x UNet fp32 weights | output |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, e in memory["exports"].items():
            if "wall_s" not in e:
                continue
            x_unet, output = e.get("peak_rss_x_unet_fp32"), e.get("output_mb")
            lines.append(f"| {name} | {e['wall_s'] / 60:.1f} min | {e['peak_rss_mb'] / 1024:.2f} GiB | "
                         f"{'-' if x_unet is None else f'{x_unet:.2f}x'} | "
                         f"{'-' if output is None else f'{output / 1024:.2f} GiB'} |")
    return lines


def format_peers_markdown(report: dict, plot_name: str | None = None) -> str:
    s, m = report["settings"], report["machine"]
    ratios = report["ratios"]
    load = m.get("loadavg_start") or [None]
    load_end = m.get("loadavg_end") or [None]
    lines = [
        f"# diffship vs PyTorch eager and Optimum: SD1.5 architecture, {s['height']}x{s['width']}",
        "",
        f"{report['date']} · {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, {m['os']} · "
        f"load average {load[0]} at start, {load_end[0]} at end (other jobs share this machine) · "
        f"{report['duration_s'] / 60:.1f} min. Made by `python {report['command']}`.",
        "",
        f"Full-size Stable Diffusion 1.5 UNet, text encoder and VAE with random weights (fp32), text-to-image, "
        f"batch 1 with classifier-free guidance (UNet batch 2), {s['steps']} steps of {s['scheduler']} on every "
        f"side, the same prompt and latents. Medians of {s['runs']} timed runs after {s['warmup']} warm-up, "
        "each pipeline in its own process, interleaved run by run (see Method).",
        "",
        "| pipeline | end to end | UNet per step (median / p90) | text encoder | VAE decode | scheduler + glue "
        "(share) | vs PyTorch | vs Optimum | UNet GFLOP/s (% of peak) | load + compile | first image | peak RSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    pairs = {k.split(" / ")[0]: v for k, v in ratios.items() if " / " in k}
    for r in report["results"]:
        if r.get("error"):
            lines.append(f"| {r['name']} | failed: {r['error'].splitlines()[0][:120]} |" + " |" * 10)
            continue
        own = ratios.get(r["name"], {})
        vs_torch = 1.0 if r["runtime"] == "diffusers" else own.get("vs_torch_total")
        glue, total = _stage(r, "scheduler_and_glue"), _stage(r, "total")
        lines.append(
            f"| {r['name']} | {_ms(total)} | {_ms(_stage(r, 'unet_per_step'))} / "
            f"{_ms(_stage(r, 'unet_per_step', 'p90'))} | {_ms(_stage(r, 'text_encoder'))} | "
            f"{_ms(_stage(r, 'vae_decode'))} | {_ms(glue)} ({100 * glue / total:.2f} %) | {_x(vs_torch)} | "
            f"{_x((pairs.get(r['name']) or {}).get('total'))} | {gflops_cell(r)} | {_cold_and_memory(r)} |")
    if plot_name:
        lines += ["", f"![median latency per stage]({plot_name})"]

    lines += own_exports_section(report)
    lines += ["", "## Against the issue's targets", "", "| what | measured | target | met |", "| --- | ---: | ---: | --- |"]
    for name, t in report["targets"].items():
        value = t.get("value")
        shown = "-" if value is None else (f"{value:.2f} %" if "percent" in name else f"{value:.2f}x")
        goal = f"{t['target']:g} %" if "percent" in name else f"≤ {t['target']:g}x"
        label = name.replace("_", " ") + (f" ({t['pipeline']})" if t.get("pipeline") else "")
        met = "-" if t.get("met") is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {label} | {shown} | {goal} | {met} |")

    lines += ["", "Per-stage ratios of diffship to its Optimum counterpart (ratios of medians; the same graphs on the "
              "same runtime in the shared groups, each side's own export in the own-export ones). The last column pairs the runs made in the same round, seconds apart: its spread is "
              "what the machine's noise alone does to a ratio.", "",
              "| pair | end to end | UNet per step | text encoder | VAE decode | scheduler + glue | "
              "end to end, run by run |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for pair, v in ratios.items():
        if " / " in pair:
            per_round = ", ".join(f"{x:.2f}" for x in v.get("total_per_round", []))
            lines.append(f"| {pair} | {_x(v['total'])} | {_x(v['unet_per_step'])} | {_x(v['text_encoder'])} | "
                         f"{_x(v['vae_decode'])} | {_x(v['scheduler_and_glue'])} | {per_round} |")

    sizes = report.get("install_sizes")
    if sizes:
        lines += ["", "## Runtime install size", "",
                  "| environment | site-packages | whole venv | packages | has torch |", "| --- | ---: | ---: | ---: | --- |"]
        for name, v in sizes["sizes"].items():
            lines.append(f"| {name} | {v['site_packages_mb']:.0f} MiB | {v['venv_mb']:.0f} MiB | {v['packages']} | "
                         f"{'yes' if v['has_torch'] else 'no'} |")
        lines += [""] + [f"- {k}: **{v:.2f}x**" for k, v in sizes["ratios"].items() if v is not None]
        lines.append(f"- measured {sizes['date']} by `benchmarks/peers/install_sizes.py --per-runtime` "
                     f"({sizes['measure']})")

    rl = report.get("roofline")
    if rl:
        peak = rl["peak"]
        by_op = ", ".join(f"{op} {v / 1e9:.1f}" for op, v in rl["unet_flops_by_op"].items() if v)
        lines += ["", "## Roofline", "",
                  f"- FLOPs per UNet call (batch 2, {s['height']}x{s['width']}): **{rl['unet_flops_per_call'] / 1e9:.1f} "
                  f"GFLOP** ({by_op}), counted from `unet/model.onnx` with {rl['shape_inference']} shape inference "
                  f"({rl['uncounted_nodes']} Conv/MatMul/Gemm nodes left uncounted); normalisations, softmax and "
                  "elementwise ops are not counted.",
                  f"- measured fp32 peak: **{rl['peak_gflops']:.0f} GFLOP/s**, the best of numpy "
                  f"({peak['numpy_gflops']:.0f}), ONNX Runtime ({peak.get('onnxruntime_gflops') or 0:.0f})"
                  + (f" and OpenVINO ({peak['openvino_gflops']:.0f})" if peak.get("openvino_gflops") else "")
                  + f" on a {peak['n']}x{peak['n']}x{peak['n']} matmul with {peak['threads']} threads, the better of "
                  "its measurements at the start and the end of the benchmark (other jobs on the machine lower it)."]
        peaks = rl.get("peaks")
        if peaks:
            lines += ["- Each row's % of peak is of the peak of the precision its UNet ran in:", "",
                      "| precision | peak GFLOP/s | measured with | kernel | instructions on this CPU |",
                      "| --- | ---: | --- | --- | --- |"]
            for precision, p in peaks.items():
                how = ", ".join(f"{k.removesuffix('_gflops')} {v:.0f}" for k, v in p.items()
                                if k.endswith("_gflops") and k != "peak_gflops" and v)
                lines.append(f"| {precision} | {p['gflops']:.0f} | {how} | {p.get('openvino_kernel') or '-'} | "
                             f"{p['label']} |")
        else:
            lines.append("- The percentages of the bf16 rows are of this fp32 peak: bf16 (AVX512-BF16) has a higher "
                         "roof, which they pass.")

    busy = [(r["name"], [run["cpu_s"] / run["total"] for run in r["runs"] if run.get("cpu_s")],
             [run.get("loadavg_1m") for run in r["runs"]]) for r in report["results"] if r.get("runs")]
    if any(b for _, b, _ in busy):
        lines += ["", "## How quiet the machine was", "",
                  "CPU seconds each worker got per second of wall time in each timed run (2.0: both cores, all the "
                  "time; other jobs taking a core show as less) and the 1-minute load average when it ended:", "",
                  "| pipeline | cores busy, run by run | load average, run by run |", "| --- | --- | --- |"]
        for name, shares, loads in busy:
            lines.append(f"| {name} | {', '.join(f'{x:.2f}' for x in shares) or '-'} | "
                         f"{', '.join(f'{x:.1f}' for x in loads if x is not None)} |")

    lines += ["", "## Method", ""]
    apart = any(v.get("torch", "").startswith("its own") for v in report["groups"].values())
    grouping = (
        "- A full-size pipeline holds 4-9 GB (more at 512x512), too much for three at once on this machine: PyTorch "
        "ran first on its own, then each diffship pipeline interleaved run by run with its Optimum counterpart. "
        "Ratios to PyTorch are therefore across groups (minutes apart)." if apart else
        "- A full-size pipeline holds 4-9 GB, too much for all of them at once on this machine: they run in groups "
        "(each diffship pipeline with its Optimum counterpart), interleaved run by run with the PyTorch worker, "
        "which stays loaded through all groups. Ratios to PyTorch use PyTorch's runs of the same group.")
    lines += [
        "- Each pipeline runs in its own worker process (`src/diffship/benchmarking/worker.py` for diffship, "
        "`benchmarks/peers/peer_worker.py` in each peer's venv): its load and compile are a cold start and its "
        "peak RSS is its own. Memory-mapped weights count in RSS (OpenVINO maps its .bin files).",
        grouping,
        "- Stages are timed the same way on every side, by wrapping the component calls (diffship's Sessions; "
        "the Optimum and diffusers model objects' `forward` and `vae.decode`); scheduler + glue is the pipeline "
        "call's wall time less its component calls (tokenizing, guidance, scheduler steps, postprocessing to PIL).",
        "- Shared-graph groups: Optimum loads diffship's export directory, so both run the very same graphs with "
        "the same runtime versions; OpenVINO in fp32 on both sides (`INFERENCE_PRECISION_HINT: f32`), bf16 rows "
        "are extra. Own-export groups: each side its own export and defaults (see that section).",
        "- Groups, in order: " + "; ".join(
            f"{g}: {v['seconds']:.0f} s, {v['runs']} runs, {v['mem_available_gb_at_start']:.1f} GiB free at start, "
            f"load average {(v.get('loadavg_start') or ['?'])[0]} at start and {(v['loadavg_end'] or ['?'])[0]} "
            "at end" for g, v in report["groups"].items()) + ".",
        "- diffship venv: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v) + ".",
        "- Optimum venv: " + ", ".join(f"{k} {v}" for k, v in report["versions_optimum_venv"].items() if v) + ".",
    ]
    return "\n".join(lines) + "\n"

