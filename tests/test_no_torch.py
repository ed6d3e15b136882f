"""Runtime code never imports torch: `diffship generate` runs where importing torch raises ImportError."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BLOCKED


def test_shadow_really_blocks_torch(torch_blocked_env):
    result = subprocess.run([sys.executable, "-c", "import torch"], env=torch_blocked_env, capture_output=True,
                            text=True)
    assert result.returncode != 0 and "torch is blocked" in result.stderr


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_generate_cli_without_torch(backend, exported_dirs, torch_blocked_env, tmp_path):
    out = tmp_path / "image.png"
    diffship = Path(sys.executable).parent / "diffship"
    command = [str(diffship)] if diffship.exists() else [sys.executable, "-m", "diffship"]
    result = subprocess.run(
        [*command, "generate", str(exported_dirs("sd1")), "--prompt", "a red circle", "--steps", "3",
         "--seed", "0", "--backend", backend, "--out", str(out), "--no-progress"],
        env=torch_blocked_env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert out.is_file() and out.stat().st_size > 0
    assert "UNet (" in result.stdout and "steps)" in result.stdout and "VAE decode" in result.stdout


def test_save_pretrained_without_torch(exported_dirs, torch_blocked_env, tmp_path):
    """A pipeline loads, swaps its scheduler and saves itself where torch cannot be imported."""
    code = (
        "import sys; from diffship import DiffusionPipeline, DDIMScheduler\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)\n"
        "pipe.save_pretrained(sys.argv[2])\n"
        "print(type(DiffusionPipeline.from_pretrained(sys.argv[2]).scheduler).__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(exported_dirs("sd1")), str(tmp_path / "saved")],
                            env=torch_blocked_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("DDIMScheduler")


def test_runtime_modules_import_no_torch():
    """Importing the public API, pipelines (saving included), schedulers, runtimes and the serving layer loads none
    of the torch stack."""
    code = (
        "import sys, diffship, diffship.pipelines, diffship.schedulers, diffship.runtimes, "
        "diffship.runtimes.onnxruntime, diffship.runtimes.openvino, diffship.runtimes.tensorrt, "
        "diffship.runtimes.engines, diffship.runtimes.cuda, diffship.cli, diffship.families, "
        "diffship.families.stable_diffusion, diffship.families.stable_diffusion_xl, "
        "diffship.families.stable_diffusion_3, diffship.layout, "
        "diffship.pipelines.controlnet, diffship.pipelines.tasks, "
        "diffship.output_directory, diffship.pipelines.saving, diffship.serving, diffship.serving.options, "
        "diffship.serving.requests, diffship.serving.model, diffship.serving.metrics, diffship.serving.app, "
        "diffship.pipelines.lora, diffship.pipelines.textual_inversion\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
