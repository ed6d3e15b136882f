"""AutoPipelineFor{Text2Image,Image2Image,Inpainting}: the class picked per model and task, from_pipe on the same
loaded sessions, the errors for a model that cannot do a task, and `diffship generate` choosing the task."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from diffship import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from diffship.cli import main
from diffship.errors import DiffshipError, MissingComponentError
from image_tasks import mask_image, rgb_image

AUTO = {"text2img": AutoPipelineForText2Image, "img2img": AutoPipelineForImage2Image,
        "inpaint": AutoPipelineForInpainting}
# kind -> task -> the class picked, or the start of the error
EXPECTED = {
    "sd1": {"text2img": StableDiffusionPipeline, "img2img": StableDiffusionImg2ImgPipeline,
            "inpaint": StableDiffusionInpaintPipeline},
    "sd1-inpaint": {"text2img": "is an inpainting model", "img2img": "is an inpainting model",
                    "inpaint": StableDiffusionInpaintPipeline},
    "sd2-depth": {"text2img": "is a depth-to-image model", "img2img": StableDiffusionDepth2ImgPipeline,
                  "inpaint": "is a depth-to-image model"},
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_class_picked_per_model_and_task(kind, exported_dirs):
    model_dir = exported_dirs(kind)
    for task, expected in EXPECTED[kind].items():
        if isinstance(expected, str):
            with pytest.raises(DiffshipError, match=rf"{model_dir} {expected} .*it cannot do"):
                AUTO[task].pipeline_class(model_dir)
        else:
            assert AUTO[task].pipeline_class(model_dir) is expected


def test_depth_model_asked_for_inpainting(exported_dirs):
    """From a directory, from a loaded pipeline, and through the pipeline class itself: a clear error each."""
    model_dir = exported_dirs("sd2-depth")
    message = rf"{model_dir} is a depth-to-image model .*it cannot do inpainting: use AutoPipelineForImage2Image"
    with pytest.raises(DiffshipError, match=message):
        AutoPipelineForInpainting.from_pretrained(model_dir)
    depth = AutoPipelineForImage2Image.from_pretrained(model_dir)
    with pytest.raises(DiffshipError, match=message):
        AutoPipelineForInpainting.from_pipe(depth)
    with pytest.raises(DiffshipError, match=r"StableDiffusionInpaintPipeline cannot run .*UNet takes 5 input channels"):
        StableDiffusionInpaintPipeline.from_pipe(depth)


def test_text_only_export_asked_for_img2img(exported_dirs, tmp_path):
    text_only = shutil.copytree(exported_dirs("sd1"), tmp_path / "text-only")
    shutil.rmtree(text_only / "vae_encoder")
    with pytest.raises(MissingComponentError, match=r"text-only/vae_encoder is missing: StableDiffusionImg2ImgPipeline "
                                                    r"needs the vae_encoder component"):
        AutoPipelineForImage2Image.from_pretrained(text_only)
    text2img = AutoPipelineForText2Image.from_pretrained(text_only)
    assert text2img.vae_encoder is None
    for auto in (AutoPipelineForImage2Image, AutoPipelineForInpainting):
        with pytest.raises(MissingComponentError, match=r"needs the vae_encoder component, which .*text-only does not "
                                                        r"have"):
            auto.from_pipe(text2img)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_from_pipe_reuses_sessions(backend, exported_dirs, tmp_path, capsys):
    """from_pipe shares the session objects (identity), tokenizer and configs (which travel with the sessions),
    reads nothing from disk (the directory is gone when it runs), and generates what a pipeline loaded from the
    directory generates."""
    model_dir = shutil.copytree(exported_dirs("sd1"), tmp_path / "model")
    start = time.perf_counter()
    text2img = AutoPipelineForText2Image.from_pretrained(model_dir, backend=backend, inference_precision="f32")
    load_seconds = time.perf_counter() - start
    text2img.set_progress_bar_config(disable=True)
    image = rgb_image()
    kwargs = dict(image=image, strength=0.6, num_inference_steps=3, generator=1, output_type="np")
    expected_img2img = StableDiffusionImg2ImgPipeline.from_pretrained(model_dir, backend=backend, inference_precision="f32")(
        "a cat", **kwargs).images
    shutil.rmtree(model_dir)

    timings = {}
    for name, auto in (("img2img", AutoPipelineForImage2Image), ("inpaint", AutoPipelineForInpainting),
                       ("text2img", AutoPipelineForText2Image)):
        start = time.perf_counter()
        pipe = auto.from_pipe(text2img)
        timings[name] = time.perf_counter() - start
        assert type(pipe) is EXPECTED["sd1"][name]
        assert pipe.sessions == text2img.sessions
        for component in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
            assert getattr(pipe, component) is getattr(text2img, component)
        assert pipe.tokenizer is text2img.tokenizer and pipe.unet_config is text2img.unet_config
        assert pipe.scheduler is not text2img.scheduler and dict(pipe.scheduler.config) == dict(text2img.scheduler.config)

    img2img = AutoPipelineForImage2Image.from_pipe(text2img)
    np.testing.assert_array_equal(img2img("a cat", **kwargs).images, expected_img2img)
    inpainted = AutoPipelineForInpainting.from_pipe(img2img)("a cat", image=image, mask_image=mask_image(),
                                                             num_inference_steps=2, output_type="np").images
    assert inpainted.shape == (1, 64, 64, 3)

    worst = max(timings.values())
    with capsys.disabled():
        print(f"\nFROM_PIPE {backend}: from_pretrained {load_seconds * 1e3:.1f} ms; from_pipe "
              + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in timings.items())
              + f"; worst from_pipe / from_pretrained = {worst / load_seconds:.4%}")


def test_from_pipe_keeps_the_scheduler_class_and_takes_one(exported_dirs):
    from diffship.schedulers import DDIMScheduler, EulerAncestralDiscreteScheduler

    text2img = AutoPipelineForText2Image.from_pretrained(exported_dirs("sd1"))
    text2img.scheduler = EulerAncestralDiscreteScheduler.from_config(text2img.scheduler.config)
    assert isinstance(AutoPipelineForImage2Image.from_pipe(text2img).scheduler, EulerAncestralDiscreteScheduler)
    ddim = DDIMScheduler.from_config(text2img.scheduler.config)
    assert AutoPipelineForInpainting.from_pipe(text2img, scheduler=ddim).scheduler is ddim
    with pytest.raises(TypeError, match="built with from_pretrained"):
        AutoPipelineForText2Image()


# ---- the command line ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rgb_image(72, 64).save(folder / "in.png")
    mask_image(40, 48).save(folder / "mask.png")
    depth = (np.hypot(*np.mgrid[0:32, 0:40]) * 1000).astype(np.uint16)
    from PIL import Image

    Image.fromarray(depth).save(folder / "depth.png")
    return folder


@pytest.mark.parametrize("kind,flags,pipeline", [
    ("sd1", ["--image", "in.png", "--strength", "0.5"], "StableDiffusionImg2ImgPipeline"),
    ("sd1", ["--image", "in.png", "--mask", "mask.png"], "StableDiffusionInpaintPipeline"),
    ("sd1-inpaint", ["--image", "in.png", "--mask", "mask.png", "--backend", "openvino"],
     "StableDiffusionInpaintPipeline"),
    ("sd2-depth", ["--image", "in.png"], "StableDiffusionDepth2ImgPipeline"),
    ("sd2-depth", ["--image", "in.png", "--depth-map", "depth.png", "--backend", "openvino"],
     "StableDiffusionDepth2ImgPipeline"),
])
def test_generate_picks_the_task(kind, flags, pipeline, exported_dirs, inputs, tmp_path, capsys):
    flags = [str(inputs / f) if f.endswith(".png") else f for f in flags]
    out = tmp_path / "out.png"
    assert main(["generate", str(exported_dirs(kind)), "--prompt", "a cat", "--steps", "3", "--seed", "0",
                 "--out", str(out), "--no-progress", *flags]) == 0
    stdout = capsys.readouterr().out
    assert pipeline in stdout and "VAE encode" in stdout
    assert ("depth estimator" in stdout) == (kind == "sd2-depth" and "--depth-map" not in flags)
    from PIL import Image

    # image-to-image keeps the input's size; inpainting the model's (as diffusers does)
    assert Image.open(out).size == ((64, 72) if "--mask" not in flags else (64, 64))


@pytest.mark.parametrize("flags,message", [
    (["--mask", "mask.png"], "--mask needs --image"),
    (["--depth-map", "depth.png"], "--depth-map needs --image"),
    (["--strength", "0.5"], "--strength needs --image"),
    (["--image", "in.png", "--strength", "1.5"], "strength must be between 0.0 and 1.0, got 1.5"),
    (["--image", "missing.png"], "--image .*missing.png does not exist"),
    (["--image", "in.png", "--depth-map", "depth.png"], "--depth-map needs a depth-to-image model"),
    (["--image", "in.png", "--height", "64"], "image-to-image takes its size from --image"),
])
def test_generate_errors(flags, message, exported_dirs, inputs, capsys):
    flags = [str(inputs / f) if f.endswith(".png") else f for f in flags]
    assert main(["generate", str(exported_dirs("sd1")), "--prompt", "a cat", "--steps", "2", "--no-progress",
                 *flags]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_tiny_model_kinds_on_the_command_line():
    from diffship.cli import build_parser

    for kind in ("sd1-inpaint", "sd2-depth"):
        assert build_parser().parse_args(["tiny-model", "out", "--kind", kind]).kind == kind


def test_depth2img_cli_without_torch(exported_dirs, inputs, tmp_path):
    """The depth estimator's preprocessing is numpy + PIL: depth-to-image runs where torch, diffusers and
    transformers cannot be imported."""
    shadow = tmp_path / "shadow"
    for name in ("torch", "diffusers", "transformers"):
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    diffship = Path(sys.executable).parent / "diffship"
    command = [str(diffship)] if diffship.exists() else [sys.executable, "-m", "diffship"]
    result = subprocess.run(
        [*command, "generate", str(exported_dirs("sd2-depth")), "--prompt", "a cat", "--image",
         str(inputs / "in.png"), "--steps", "2", "--out", str(tmp_path / "out.png"), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "depth estimator" in result.stdout and (tmp_path / "out.png").is_file()
