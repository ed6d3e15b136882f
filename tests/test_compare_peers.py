"""benchmarks/compare_peers.py's groups, contestants, ratios, targets and Markdown, on made-up figures (the benchmark
itself runs full-size pipelines: the lead's machine, not the suite), and export_peers.py's memory sampler."""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from diffship.benchmarking.summary import SCHEMA, attach_roofline, complete_run, stage_figures

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path[:0] = [str(BENCHMARKS), str(BENCHMARKS / "peers")]

import compare_peers  # noqa: E402
from compare_peers import GROUPS, OWN_GROUPS, Member, make_contestant  # noqa: E402


def args(tmp_path, **kw) -> Namespace:
    base = dict(export=tmp_path / "shared", own_exports=tmp_path / "own", best_export=tmp_path / "own" / "best",
                best_backend="openvino", best_options={"inference_precision": "bf16"},
                best_call={"cache": "deepcache", "cache_interval": 3}, diffusers_model=tmp_path / "src",
                optimum_python=tmp_path / "py")
    return Namespace(**{**base, **kw})


def test_contestants_defaults_explicit_and_best(tmp_path):
    a = args(tmp_path)
    own = {m.name: make_contestant(m, {"height": 64}, a) for g in OWN_GROUPS for m in GROUPS[g]}
    defaults = own["diffship OV, defaults"].spec
    assert defaults["model_dir"] == str(tmp_path / "own" / "diffship")
    assert defaults["options"] == {} and defaults["call_kwargs"] == {} and not defaults["static"]  # nothing passed
    intel = own["Optimum Intel, defaults"].spec
    assert intel["kind"] == "optimum-ov" and intel["ov_config"] is None and not intel["static"]
    assert intel["model_dir"] == str(tmp_path / "own" / "optimum-openvino")
    assert own["Optimum Intel, static reshape"].spec["static"]
    assert own["Optimum ORT, defaults"].spec["model_dir"] == str(tmp_path / "own" / "optimum-onnx")
    best = own["diffship best"].spec
    assert best["model_dir"] == str(tmp_path / "own" / "best") and best["backend"] == "openvino"
    assert best["options"] == {"inference_precision": "bf16"}
    assert best["call_kwargs"] == {"cache": "deepcache", "cache_interval": 3}
    # the shared groups as before: diffship's export on both sides, f32 forced, the dynamic rows kept dynamic
    shared = make_contestant(GROUPS["ov"][0], {}, a).spec
    assert shared["model_dir"] == str(tmp_path / "shared")
    assert shared["options"] == {"inference_precision": "f32", "static_shapes": False}
    assert make_contestant(GROUPS["ov-static-bf16"][1], {}, a).spec["ov_config"] == {"INFERENCE_PRECISION_HINT": "bf16"}
    assert make_contestant(GROUPS["ort"][0], {}, a).spec["options"] == {}
    names = [m.name for members in GROUPS.values() for m in members]
    assert len(names) == len(set(names))  # every result's name is unique in a report


def result(member: Member, group: str, total: float, precision: str, model_dir: str = "/x/e") -> dict:
    runs = [complete_run({"text_encoder": 0.01, "vae_encode": None, "vae_decode": 0.1 * total,
                          "unet_steps": [0.2 * total] * 4, "total": total, "cpu_s": 2 * total})]
    out = {"name": member.name, "runtime": member.runtime, "backend": member.backend, "static": member.static,
           "precision": member.precision or "defaults", "error": None, "group": group,
           "info": {"unet_session": {"INFERENCE_PRECISION_HINT": precision}} if member.backend == "openvino" else {},
           "config": {"model_dir": model_dir + "/" + member.export, "options": {}, "call_kwargs": {}},
           "cold_start": {"startup_s": 3.0, "load_and_compile_s": 2.0, "first_run_s": 1.0,
                          "time_to_first_image_s": 4.0},
           "memory": {"rss_after_load_mb": 1000.0, "peak_rss_mb": 2048.0}, "unet_calls_per_run": 4,
           "stages": stage_figures(runs), "runs": runs}
    attach_roofline(out, 1e9, 10.0, {"f32": {"gflops": 10.0}, "bf16": {"gflops": 40.0}})
    return out


def synthetic_report() -> dict:
    torch = Member(compare_peers.TORCH, "diffusers", "torch")
    totals = {"diffship ORT, defaults": (5.0, "f32"), "Optimum ORT, defaults": (5.5, "f32"),
              "diffship OV, defaults": (3.0, "bf16"), "Optimum Intel, defaults": (3.3, "bf16"),
              "diffship OV, defaults (2)": (3.1, "bf16"), "Optimum Intel, static reshape": (3.2, "bf16"),
              "diffship best": (1.5, "bf16"), "Optimum Intel, defaults (2)": (3.4, "bf16"),
              "diffship ORT": (6.0, "f32"), "Optimum ORT": (6.1, "f32")}
    groups = ["ort", *OWN_GROUPS]
    results = [result(torch, "all", 12.0, "f32")]
    results += [result(m, g, *totals[m.name]) for g in groups for m in GROUPS[g]]
    group_log = {g: {"members": [m.name for m in GROUPS[g]], "runs": 1, "mem_available_gb_at_start": 20.0,
                     "loadavg_start": [1.0], "loadavg_end": [1.0], "seconds": 60.0, "torch": "interleaved",
                     "torch_total": {"median": 12.0}, "torch_unet_per_step": {"median": 2.4}} for g in groups}
    peaks = {"f32": {"gflops": 10.0, "numpy_gflops": 10.0, "label": "AVX-512", "features": ["avx512f"],
                     "native": True, "n": 8, "threads": 2},
             "bf16": {"gflops": 40.0, "openvino_gflops": 40.0, "openvino_kernel": "brgemm_avx512_amx_bf16",
                      "label": "AMX-BF16", "features": ["amx_bf16"], "native": True}}
    return {"schema": SCHEMA, "date": "2026-01-01T00:00:00+00:00", "duration_s": 600.0, "command": "test",
            "machine": {"cpu": "a CPU", "cores": 2, "memory_gb": 24, "os": "Linux", "loadavg_start": [1.0],
                        "loadavg_end": [1.0]},
            "versions": {"diffship": "0"}, "versions_optimum_venv": {"optimum": "0"},
            "settings": {"model": "m", "height": 64, "width": 64, "steps": 4, "scheduler": "Euler", "runs": 1,
                         "warmup": 1},
            "roofline": {"unet_flops_per_call": 1e9, "unet_flops_by_op": {"Conv": 1e9}, "shape_inference": "x",
                         "uncounted_nodes": 0, "peak_gflops": 10.0, "peak": peaks["f32"], "peaks": peaks},
            "results": results, "groups": group_log,
            "export_memory": {"date": "2026-01-01", "target_x_unet_fp32": 2.0, "source": {"fp32_bytes": 2**30},
                              "exports": {"diffship": {"wall_s": 60.0, "peak_rss_mb": 1536.0,
                                                       "peak_rss_x_unet_fp32": 1.5, "output_mb": 2048.0}}}}


def test_ratios_targets_and_markdown_of_the_own_export_groups(tmp_path):
    from peers_report import format_peers_markdown

    report = synthetic_report()
    compare_peers.finish_report(report, tmp_path / "no-install-sizes.json")
    ratios, targets = report["ratios"], report["targets"]
    # each own row against Optimum's defaults on its backend: of its own group where there is one
    assert ratios["diffship ORT, defaults"]["vs_optimum_defaults_total"] == pytest.approx(5.0 / 5.5)
    assert ratios["diffship OV, defaults"]["vs_optimum_defaults_total"] == pytest.approx(3.0 / 3.3)
    assert ratios["diffship best"]["optimum_defaults"] == "Optimum Intel, defaults (2)"
    assert ratios["diffship best"]["vs_optimum_defaults_total"] == pytest.approx(1.5 / 3.4)
    assert ratios["Optimum Intel, static reshape"]["optimum_defaults"] == "Optimum Intel, defaults"
    assert "vs_optimum_defaults_total" not in ratios["diffship ORT"]  # shared groups: their pairs only
    best = targets["diffship best / Optimum Intel, defaults (2) (end to end)"]
    assert best == {"value": pytest.approx(1.5 / 3.4), "target": 0.5, "met": True}
    assert targets["diffship OV, defaults / Optimum Intel, defaults (end to end)"]["target"] == 1.0
    # f32 by the precision the UNet ran in: the OV defaults rows ran bf16
    assert targets["best_diffship_vs_torch_f32"]["pipeline"] == "diffship ORT, defaults"
    assert targets["best_diffship_vs_torch_any_precision"]["pipeline"] == "diffship best"

    markdown = format_peers_markdown(report)
    assert "## Each side on its own export, with its own defaults" in markdown
    # 1 GFLOP per UNet call in 0.3 s: 3.3 GFLOP/s, 8 % of the bf16 peak (40) it ran in
    assert ("| diffship best | best | bf16 | 1.50 s | 300 ms | 0.12x | 0.44x | 3 (8 % of bf16) | 2.00 s | 4.00 s | "
            "2.0 GiB |") in markdown
    assert "| diffship | 1.0 min | 1.50 GiB | 1.50x | 2.00 GiB |" in markdown  # the exports' cost
    assert "| bf16 | 40 | openvino 40 | brgemm_avx512_amx_bf16 | AMX-BF16 |" in markdown
    json.dumps(report)  # the report stays JSON


def test_tree_rss_and_wall_time_of_a_command(tmp_path):
    from export_peers import run_sampled

    # a child that holds ~60 MB and a grandchild that holds ~60 MB more, for 2.5 s (helpers younger than a second
    # are not counted)
    hold = "import time; x = bytearray(60 * 2**20); time.sleep(2.5)"
    code = f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {hold!r}]); {hold}; p.wait()"
    figures = run_sampled([sys.executable, "-c", code], tmp_path / "log.txt")
    assert figures["returncode"] == 0 and figures["wall_s"] >= 2.5
    assert figures["peak_rss_tree_sampled_mb"] >= 110  # both processes, summed
    assert figures["max_rss_single_process_mb"] >= 60
    assert figures["peak_rss_mb"] == max(figures["peak_rss_tree_sampled_mb"], figures["max_rss_single_process_mb"])
    failed = run_sampled([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log2.txt")
    assert failed["returncode"] == 3
