"""Optimum's SDXL exports load in diffship and give diffusers' images.

Fixtures under tests/fixtures/optimum-sdxl/ (committed, made by `benchmarks/peers/make_optimum_fixtures.sh --kind
sdxl` in Optimum's own venv; MANIFEST.json records the commands, versions and every file's sha256):

    tiny-sdxl/  the source: `diffship tiny-model --kind sdxl` (the oracle runs on it)
    onnx/       `optimum-cli export onnx --task text-to-image` of it (optimum-onnx 0.1.0)
    openvino/   `optimum-cli export openvino --task text-to-image --weight-format fp32` (optimum-intel 1.27.0)

What differs from diffship's own SDXL export, and is checked so that the test notices a swapped fixture: Optimum's
OpenVINO UNet takes timestep int64 [batch] and a sequence fixed at 77 (its ONNX, float32 rank 0 as diffship's);
there is no export_report.json. Tolerance: 1e-3 max abs on output_type="np" images in [0, 1] (the issue's bound).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from diffship.pipelines import AutoPipelineForText2Image, StableDiffusionXLPipeline
from diffship.runtimes import input_info

FIXTURES = Path(__file__).parent / "fixtures" / "optimum-sdxl"
SOURCE, ONNX_DIR, OPENVINO_DIR = FIXTURES / "tiny-sdxl", FIXTURES / "onnx", FIXTURES / "openvino"
ATOL = 1e-3
PROMPTS = ["a red circle on the left", "an oil painting of a castle at sunset"]
LOADS = {"onnx-onnxruntime": (ONNX_DIR, "onnxruntime"), "openvino-openvino": (OPENVINO_DIR, "openvino")}


def test_fixture_files_match_manifest():
    manifest = json.loads((FIXTURES / "MANIFEST.json").read_text())
    for folder, entry in manifest["folders"].items():
        root = FIXTURES / folder
        on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        assert on_disk == [f["path"] for f in entry["files"]], f"{folder}: files added or removed"
        for f in entry["files"]:
            assert hashlib.sha256((root / f["path"]).read_bytes()).hexdigest() == f["sha256"], f["path"]
    assert not (ONNX_DIR / "export_report.json").exists()


@pytest.fixture(scope="module")
def reference():
    from diffusers import StableDiffusionXLPipeline as Diffusers

    pipe = Diffusers.from_pretrained(SOURCE, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
@pytest.mark.parametrize("load", list(LOADS))
def test_optimum_sdxl_export_matches_diffusers(load, guidance_scale, reference):
    import torch

    folder, backend = LOADS[load]
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    kwargs = dict(prompt=PROMPTS, num_inference_steps=3, guidance_scale=guidance_scale, output_type="np")
    torch.set_num_threads(1)
    expected = reference(latents=torch.from_numpy(latents), **kwargs).images
    pipe = AutoPipelineForText2Image.from_pretrained(folder, backend=backend, inference_precision="f32")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    timestep = input_info(pipe.unet, "timestep")
    if load == "openvino-openvino":
        assert timestep.dtype == np.int64 and timestep.rank == 1  # Optimum's OpenVINO form, not diffship's
    else:
        assert timestep.dtype == np.float32 and timestep.rank == 0
    pipe.set_progress_bar_config(disable=True)
    got = pipe(latents=latents, **kwargs).images
    diff = float(np.abs(np.asarray(got, np.float64) - expected).max())
    print(f"PARITY optimum sdxl {load} guidance {guidance_scale}: max abs {diff:.2e}")
    assert diff < ATOL
