"""Image sizes whose latent the UNet's up factor does not divide, on every task and both backends, with dynamic
exports and with static exports made at such a size: diffship matches diffusers.

diffusers runs Stable Diffusion at any multiple of 8; when the latent (image / 8) is not a multiple of the UNet's
up factor, its UNet passes each skip connection's size to the upsampler. A graph traced at a multiple has that
branch baked out and fails (ONNX Runtime: "Non concat axis dimensions must match" in an up block's Concat).
The tiny models have the 8x VAE; sd1's UNet has three levels (up factor 4), sd2's four (8, as SD 1.5's): at 40x64
and 72x48 the latents are 5x8 and 9x6, and the factor does not divide 5, 9 or 6.

Tolerance: 1e-3 max abs on output_type="np" images in [0, 1] (image_tasks.ATOL, as the other parity tests).
"""

from __future__ import annotations

import pytest

import diffusers
import diffship.pipelines
from diffship.exporters import export
from image_tasks import ATOL, BACKENDS, ReferenceCache, mask_image, max_abs, report, rgb_image, run_diffship, run_reference

SIZES = [(40, 64), (72, 48)]
STEPS = 3
SCHEDULER = "ddim"


def _inputs(task: str, height: int, width: int) -> dict:
    """The call arguments of `task` at height x width (image-to-image takes its size from the image)."""
    image, mask = rgb_image(height, width, seed=1), mask_image(height, width)
    return {
        "text2img": dict(height=height, width=width),
        "img2img": dict(image=image, strength=0.8),
        "inpaint": dict(image=image, mask_image=mask, height=height, width=width, strength=0.9),
        "depth2img": dict(image=image, strength=0.8),
    }[task]


# case -> (tiny model kind, pipeline class in diffusers and diffship, task)
CASES = {
    "text2img-sd1": ("sd1", "StableDiffusionPipeline", "text2img"),
    "text2img-sd2": ("sd2", "StableDiffusionPipeline", "text2img"),
    "img2img": ("sd1", "StableDiffusionImg2ImgPipeline", "img2img"),
    "inpaint-unet4": ("sd1", "StableDiffusionInpaintPipeline", "inpaint"),
    "inpaint-unet9": ("sd1-inpaint", "StableDiffusionInpaintPipeline", "inpaint"),
    "depth2img": ("sd2-depth", "StableDiffusionDepth2ImgPipeline", "depth2img"),
}
REFERENCES = ReferenceCache()
PIPELINES = ReferenceCache()  # diffship's pipelines, loaded (and compiled) once per directory, class and backend


@pytest.fixture(scope="module")
def references(tiny_model_dirs):
    cache = {}

    def get(kind, class_name):
        if (kind, class_name) not in cache:
            extra = {} if class_name == "StableDiffusionDepth2ImgPipeline" else {"safety_checker": None}
            pipe = getattr(diffusers, class_name).from_pretrained(tiny_model_dirs(kind), **extra)
            pipe.set_progress_bar_config(disable=True)
            cache[kind, class_name] = pipe
        return cache[kind, class_name]

    return get


@pytest.fixture(scope="module")
def static_exports(tiny_model_dirs, tmp_path_factory):
    """(kind, height, width) -> an export with batch, height and width fixed there, both formats."""
    root, cache = tmp_path_factory.mktemp("static-sizes"), {}

    def get(kind, height, width):
        if (kind, height, width) not in cache:
            cache[kind, height, width] = export(tiny_model_dirs(kind), root / f"{kind}-{height}x{width}",
                                                ["onnx", "openvino"], static=True, height=height, width=width,
                                                progress=False)
        return cache[kind, height, width]

    return get


def _compare(case, height, width, model_dir, backend, references, label):
    kind, class_name, task = CASES[case]
    kwargs = dict(prompt="a red circle on the left", num_inference_steps=STEPS, guidance_scale=7.5,
                  **_inputs(task, height, width))
    expected = REFERENCES.get((case, height, width),
                              lambda: run_reference(references(kind, class_name), SCHEDULER, seed=3, **kwargs))
    pipe = PIPELINES.get((model_dir, class_name, backend),
                         lambda: getattr(diffship.pipelines, class_name).from_pretrained(model_dir, backend=backend, inference_precision="f32"))
    pipe.set_progress_bar_config(disable=True)
    got = run_diffship(pipe, SCHEDULER, seed=3, **kwargs)
    assert got.shape == expected.shape == (1, height, width, 3)
    diff = max_abs(got, expected)
    report(f"{label} {case} {height}x{width} {backend}", diff)
    assert diff <= ATOL


@pytest.mark.parametrize("height, width", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_dynamic_export_matches_diffusers(case, backend, height, width, references, exported_dirs):
    _compare(case, height, width, exported_dirs(CASES[case][0]), backend, references, "dynamic")


# Static exports at a size the up factor does not divide: sd1 at 40x64 (latent 5x8) serves text-to-image,
# image-to-image and 4-channel inpainting; the 9-channel inpainting and depth models at 72x48 (latent 9x6).
STATIC = [("text2img-sd1", 40, 64), ("img2img", 40, 64), ("inpaint-unet4", 40, 64), ("inpaint-unet9", 72, 48),
          ("depth2img", 72, 48)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, height, width", STATIC, ids=[f"{c}-{h}x{w}" for c, h, w in STATIC])
def test_static_export_at_that_size_matches_diffusers(case, height, width, backend, references, static_exports):
    model_dir = static_exports(CASES[case][0], height, width)
    _compare(case, height, width, model_dir, backend, references, "static")
