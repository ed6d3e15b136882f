"""`diffship bench`: per-stage latency on every installed backend, its JSON schema, Markdown and PNG outputs, errors,
and the FLOP counter of the roofline. Tiny runs (2 steps, 1 warm-up, 2 runs): these tests check the figures' shape
and consistency, not speed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffship.benchmarking import bench, default_size, installed_backends
from diffship.benchmarking.report import format_table
from diffship.benchmarking.summary import ADDITIVE_STAGES, SCHEMA, STAGES, stages_sum
from diffship.cli import main

STAT_KEYS = {"median", "p90", "min", "max", "mean"}
RESULT_KEYS = {"name", "runtime", "backend", "static", "precision", "info", "error", "cold_start", "memory",
               "unet_calls_per_run", "stages", "unet_gflops", "unet_percent_of_peak", "runs"}
RUN_KEYS = {"text_encoder", "unet", "unet_steps", "scheduler_and_glue", "vae_encode", "vae_decode", "total",
            "cpu_s", "loadavg_1m"}


def no_torch_env(tmp_path: Path) -> dict:
    """An environment where importing torch, diffusers or transformers fails, as at run time."""
    shadow = tmp_path / "shadow"
    for name in ("torch", "diffusers", "transformers"):
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shadow), env.get("PYTHONPATH", "")])
    return env


def check_schema(report: dict, runs: int, unet_calls: int) -> None:
    assert report["schema"] == SCHEMA
    assert {"schema", "date", "duration_s", "command", "machine", "versions", "settings", "roofline",
            "results"} <= set(report)
    assert {"cpu", "cores", "memory_gb", "os", "loadavg_start", "loadavg_end"} <= set(report["machine"])
    assert report["versions"]["diffship"] and report["versions"]["numpy"]
    for result in report["results"]:
        assert set(result) == RESULT_KEYS, result.get("error")
        assert result["error"] is None, result["error"]
        assert set(result["cold_start"]) == {"startup_s", "load_and_compile_s", "first_run_s",
                                             "time_to_first_image_s"}
        assert 0 < result["cold_start"]["load_and_compile_s"] < result["cold_start"]["startup_s"]
        assert result["memory"]["peak_rss_mb"] >= result["memory"]["rss_after_load_mb"] > 10
        assert set(result["stages"]) == set(STAGES)
        for stage, figures in result["stages"].items():
            if figures is not None:
                assert set(figures) == STAT_KEYS
                assert 0 <= figures["min"] <= figures["median"] <= figures["p90"] <= figures["max"], stage
        assert len(result["runs"]) == runs
        assert result["unet_calls_per_run"] == unet_calls
        for run in result["runs"]:
            assert set(run) == RUN_KEYS
            assert len(run["unet_steps"]) == unet_calls
            assert run["cpu_s"] > 0
            # each run's stages add up to its total (scheduler and glue is the remainder, never negative)
            assert sum(run.get(s) or 0.0 for s in ADDITIVE_STAGES) == pytest.approx(run["total"], rel=1e-9)
        # ... and the stages' medians to the median end-to-end time, within 5 %
        total = result["stages"]["total"]["median"]
        assert abs(stages_sum(result["stages"]) - total) <= 0.05 * total, result["name"]


def test_bench_cli_every_backend_without_torch(exported_dirs, tmp_path):
    """The command line on every installed backend, in a process (and workers) where torch cannot be imported."""
    out = tmp_path / "out"
    diffship = Path(sys.executable).parent / "diffship"
    command = [str(diffship)] if diffship.exists() else [sys.executable, "-m", "diffship"]
    result = subprocess.run(
        [*command, "bench", str(exported_dirs("sd1")), "--runs", "2", "--warmup", "1", "--steps", "2",
         "--scheduler", "euler", "--json", str(out / "bench.json"), "--markdown", str(out / "bench.md"),
         "--plot", str(out / "bench.png")],
        env=no_torch_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    backends = installed_backends()
    assert backends, "no backend installed"
    for backend in backends:
        assert backend in result.stdout
    assert "UNet per step (p90)" in result.stdout and "time to first image" in result.stdout
    assert "warm-up" in result.stderr and "round 3/3" in result.stderr  # progress goes to stderr

    report = json.loads((out / "bench.json").read_text())
    check_schema(report, runs=2, unet_calls=2)
    assert [r["name"] for r in report["results"]] == backends
    assert report["settings"]["steps"] == 2 and report["settings"]["scheduler"] == "euler"
    assert all(r["stages"]["vae_encode"] is None for r in report["results"])  # text-to-image has none

    markdown = (out / "bench.md").read_text()
    assert "| stage | " + " | ".join(backends) + " |" in markdown
    assert "![per-stage latency](bench.png)" in markdown

    from PIL import Image

    with Image.open(out / "bench.png") as image:
        image.verify()
    with Image.open(out / "bench.png") as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 100


@pytest.mark.skipif("openvino" not in installed_backends(), reason="needs openvino")
def test_bench_openvino_static(exported_dirs):
    report = bench(exported_dirs("sd1"), ["ov"], static=True, steps=2, runs=1, warmup=0, scheduler="ddim",
                   height=64, width=64)
    check_schema(report, runs=1, unet_calls=2)
    (result,) = report["results"]
    assert result["name"] == "openvino static" and result["static"] and result["info"]["static"]


@pytest.mark.parametrize("kind,pipeline", [("sd3", "StableDiffusion3Pipeline"), ("flux", "FluxPipeline")])
def test_bench_times_the_transformer_families(kind, pipeline, exported_dirs):
    """A transformer family's steps are timed as the denoiser's (its transformer's calls), its encoders (T5 too) as
    the text encoder; the default size is the transformer's (SD3: sample_size x 8; Flux: 128 latents)."""
    from test_flux import flux_export

    model_dir = exported_dirs("sd3") if kind == "sd3" else flux_export(exported_dirs, kind)  # the suite's exports
    report = bench(model_dir, ["onnxruntime"], steps=2, runs=1, warmup=0, height=64, width=64)
    check_schema(report, runs=1, unet_calls=2)
    (result,) = report["results"]
    assert result["info"]["pipeline"] == pipeline and result["stages"]["text_encoder"]["median"] > 0
    assert default_size(model_dir) == (64 if kind == "sd3" else 1024)
    table = format_table(report)  # the step rows name the transformer, not a UNet
    assert "Transformer x 2" in table and "Transformer per step (median)" in table and "UNet x" not in table


@pytest.mark.skipif("onnxruntime" not in installed_backends(), reason="needs onnxruntime")
def test_bench_image_to_image_times_the_vae_encoder(exported_dirs):
    report = bench(exported_dirs("sd1"), ["onnxruntime"], task="image-to-image", strength=0.5, steps=4, runs=1,
                   warmup=0, scheduler="euler")
    check_schema(report, runs=1, unet_calls=2)  # strength 0.5 of 4 steps
    (result,) = report["results"]
    assert result["stages"]["vae_encode"]["median"] > 0
    assert result["info"]["pipeline"] == "StableDiffusionImg2ImgPipeline"


def test_bench_errors(exported_dirs, tmp_path, capsys):
    export = str(exported_dirs("sd1"))
    if importlib.util.find_spec("tensorrt") is None:  # tests/test_tensorrt.py covers the other missing pieces
        assert main(["bench", export, "--backend", "tensorrt"]) == 2
        err = capsys.readouterr().err
        assert "needs NVIDIA TensorRT, which is not installed" in err and "pip install 'diffship[tensorrt]'" in err
    assert main(["bench", export, "--backend", "cuda-magic"]) == 2
    assert "unknown backend 'cuda-magic'" in capsys.readouterr().err
    assert main(["bench", str(tmp_path)]) == 2
    assert "no model_index.json" in capsys.readouterr().err
    assert main(["bench", export, "--runs", "0"]) == 2
    assert "--runs must be an integer of at least 1" in capsys.readouterr().err
    assert main(["bench", export, "--task", "image-to-image", "--static"]) == 2
    assert "text-to-image only" in capsys.readouterr().err


def test_failed_worker_keeps_its_row(exported_dirs, tmp_path):
    """A backend that fails to load is reported with its error; the others still run."""
    from diffship.benchmarking.interleave import Contestant, run_rounds, start_all

    broken = Contestant("broken", {"model_dir": str(tmp_path), "backend": "onnxruntime", "steps": 1,
                                   "height": 64, "width": 64})
    start_all([broken])
    run_rounds([broken], warmup=0, runs=1)
    result = broken.result()
    assert result["error"] and "no model_index.json" in result["error"]
    assert result["stages"] is None and result["runs"] == []


def test_flop_counter_on_a_hand_built_graph(tmp_path):
    """Conv and MatMul FLOPs from shapes, against the formula; dynamic dims take the given sizes."""
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from diffship.benchmarking.roofline import count_flops

    weight = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")
    proj = numpy_helper.from_array(np.zeros((16, 5), np.float32), "p")
    shape = numpy_helper.from_array(np.array([0, 8, -1], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("Reshape", ["y", "shape"], ["r"]),  # [B, 8, 16]
         helper.make_node("MatMul", ["r", "p"], ["z"])],      # [B, 8, 5]
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], initializer=[weight, proj, shape])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    counted = count_flops(path, {"x": [2, 3, 4, 4]})
    assert counted["uncounted_nodes"] == 0
    assert counted["by_op"]["Conv"] == 2 * (2 * 8 * 4 * 4) * (3 * 3 * 3)
    assert counted["by_op"]["MatMul"] == 2 * (2 * 8 * 5) * 16


def test_unet_flops_of_the_tiny_export(exported_dirs):
    pytest.importorskip("onnx")
    from diffship.benchmarking.roofline import unet_flops

    tiny, small, large = (unet_flops(exported_dirs("sd1"), 2, size, size)["flops"] for size in (32, 64, 128))
    assert unet_flops(exported_dirs("sd1"), 2, 64, 64)["uncounted_nodes"] == 0 and tiny > 0
    # FLOPs = C + a*pixels + b*pixels^2: the text's keys and values and the time embedding do not depend on the size
    # (C), convolutions grow with the pixels (a), self-attention with their square (b). So each 4x in pixels adds at
    # least 4x what the previous 4x added, whatever C is.
    assert large - small >= 4 * (small - tiny) * 0.99 and small > tiny


def synthetic_report() -> dict:
    """A report as `bench` writes it, with made-up figures: one pipeline with a roofline, one that failed."""
    from diffship.benchmarking.summary import attach_roofline, complete_run, stage_figures

    runs = [complete_run({"text_encoder": 0.01, "vae_encode": None, "vae_decode": 0.2, "unet_steps": [0.1 * k, 0.1],
                          "total": 0.5 + 0.1 * k}) for k in (1, 2, 3)]
    ok = {"name": "openvino", "runtime": "diffship", "backend": "openvino", "static": False, "precision": "f32",
          "info": {}, "error": None, "unet_calls_per_run": 2, "stages": stage_figures(runs), "runs": runs,
          "cold_start": {"startup_s": 2.0, "load_and_compile_s": 1.5, "first_run_s": 0.9,
                         "time_to_first_image_s": 2.9},
          "memory": {"rss_after_load_mb": 100.0, "peak_rss_mb": 150.0}}
    attach_roofline(ok, unet_flops=2e9, peak_gflops=100.0)
    failed = {"name": "onnxruntime", "runtime": "diffship", "backend": "onnxruntime", "static": False,
              "precision": "f32", "info": {}, "error": "BackendError: no ONNX model\ntraceback", "cold_start": None,
              "memory": None, "unet_calls_per_run": None, "stages": None, "runs": [], "unet_gflops": None,
              "unet_percent_of_peak": None}
    return {"schema": SCHEMA, "date": "2026-01-01T00:00:00+00:00", "duration_s": 1.0, "command": "test",
            "machine": {"cpu": "a CPU", "cores": 2, "memory_gb": 8, "os": "Linux", "loadavg_start": [0.5, 0.5, 0.5]},
            "versions": {"diffship": "0"}, "roofline": {"unet_flops_per_call": 2e9, "peak_gflops": 100.0},
            "settings": {"model": "m", "task": "text-to-image", "height": 64, "width": 64, "steps": 2,
                         "batch_size": 1, "guidance_scale": 7.5, "scheduler": "euler", "runs": 3, "warmup": 1},
            "results": [ok, failed]}


def test_table_markdown_and_plot_from_a_report(tmp_path):
    from PIL import Image

    from diffship.benchmarking import write_outputs

    report = synthetic_report()
    ok = report["results"][0]
    assert ok["stages"]["unet_per_step"]["median"] == pytest.approx(0.1)  # pooled steps: .1 .1 .1 .2 .3 .1
    assert ok["unet_gflops"] == pytest.approx(20.0) and ok["unet_percent_of_peak"] == pytest.approx(20.0)
    table = format_table(report)
    assert "UNet x 2" in table and "20 (20 %)" in table and "onnxruntime (FAILED)" in table
    assert "onnxruntime failed: BackendError: no ONNX model" in table
    write_outputs(report, tmp_path / "r.json", tmp_path / "r.md", tmp_path / "plots" / "r.png")
    markdown = (tmp_path / "r.md").read_text()
    assert "![per-stage latency](plots/r.png)" in markdown and "**onnxruntime failed:**" in markdown
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["name"] == "openvino"
    with Image.open(tmp_path / "plots" / "r.png") as image:
        assert image.format == "PNG"
