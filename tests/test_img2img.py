"""Image-to-image vs diffusers' StableDiffusionImg2ImgPipeline: same image, prompts, strength and noise.

Tolerance: 1e-3 max abs on output_type="np" images (image_tasks.ATOL); correct runs show about 1e-6 to 1e-5. A
schedule started at the wrong step, a VAE sample from other noise or a wrong resampling shows 1e-1 or more.
"""

from __future__ import annotations

import numpy as np
import pytest

from diffship.pipelines import StableDiffusionImg2ImgPipeline
from image_tasks import (
    ATOL,
    BACKENDS,
    PROMPTS,
    SCHEDULERS,
    STEPS,
    ReferenceCache,
    TorchNoise,
    max_abs,
    one_torch_thread,
    report,
    rgb_image,
    run_diffship,
    run_reference,
    use_scheduler,
)

REFERENCES = ReferenceCache()


@pytest.fixture(scope="module")
def reference(tiny_model_dirs):
    from diffusers import StableDiffusionImg2ImgPipeline as DiffusersImg2Img

    pipe = DiffusersImg2Img.from_pretrained(tiny_model_dirs("sd1"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipelines(exported_dirs):
    cache = {}

    def get(backend):
        if backend not in cache:
            cache[backend] = StableDiffusionImg2ImgPipeline.from_pretrained(exported_dirs("sd1"), backend=backend, inference_precision="f32")
            cache[backend].set_progress_bar_config(disable=True)
        return cache[backend]

    return get


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_img2img_matches_diffusers(backend, scheduler, reference, pipelines):
    # strength 0.6 of 5 steps: the schedule starts at its third step (PNDM: its fourth entry).
    kwargs = dict(prompt=PROMPTS, image=rgb_image(), strength=0.6, num_inference_steps=STEPS, guidance_scale=7.5)
    expected = REFERENCES.get(scheduler, lambda: run_reference(reference, scheduler, **kwargs))
    got = run_diffship(pipelines(backend), scheduler, **kwargs)
    assert got.shape == expected.shape == (2, 64, 64, 3)
    assert max_abs(expected[0], expected[1]) > 1e-2  # the prompts matter: the text path is exercised
    diff = max_abs(got, expected)
    report(f"img2img sd1 {scheduler} {backend}", diff)
    assert diff <= ATOL


def test_numpy_batch_odd_size_images_per_prompt_and_eta(reference, pipelines):
    """numpy NHWC input whose size is not a multiple of the VAE factor (resized as diffusers does, nearest),
    two images per prompt, DDIM with eta (noise drawn in its step), strength 0.8."""
    image = np.asarray(rgb_image(69, 77, seed=3), dtype=np.float32)[None] / 255.0
    kwargs = dict(prompt="a castle", image=image, strength=0.8, num_inference_steps=4, guidance_scale=5.0,
                  num_images_per_prompt=2, eta=0.5)
    expected = run_reference(reference, "ddim", seed=4, **kwargs)
    got = run_diffship(pipelines("onnxruntime"), "ddim", seed=4, **kwargs)
    assert got.shape == expected.shape == (2, 64, 72, 3)  # rounded down to multiples of the VAE's 8
    assert max_abs(expected[0], expected[1]) > 1e-3  # different noise per image
    diff = max_abs(got, expected)
    report("img2img numpy NHWC 69x77, 2 per prompt, DDIM eta 0.5", diff)
    assert diff <= ATOL


def test_list_of_generators_and_timings(reference, pipelines):
    """One generator per image (diffusers: the image is repeated, each copy encoded with its own generator)."""
    import diffusers
    import torch

    import diffship.schedulers

    kwargs = dict(prompt=PROMPTS, image=rgb_image(seed=5), strength=0.5, num_inference_steps=4, output_type="np")
    use_scheduler(reference, "euler-a", diffusers)
    with one_torch_thread():
        expected = reference(generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kwargs).images
    pipe = pipelines("openvino")
    use_scheduler(pipe, "euler-a", diffship.schedulers)
    result = pipe(generator=[TorchNoise(1), TorchNoise(2)], **kwargs)
    diff = max_abs(result.images, expected)
    report("img2img list of generators, Euler a, openvino", diff)
    assert diff <= ATOL
    assert result.timings["vae_encode"] > 0 and result.timings["unet_steps"] == 2


@pytest.mark.parametrize("strength", [-0.1, 1.5, "0.5"])
def test_strength_out_of_range(pipelines, strength):
    with pytest.raises(ValueError, match=r"strength must be between 0.0 and 1.0, got"):
        pipelines("onnxruntime")("a cat", image=rgb_image(), strength=strength, num_inference_steps=2)


@pytest.mark.parametrize("image,message", [
    (np.zeros((1, 1, 64, 64, 3), np.float32), r"image must be a PIL image, a numpy array .*shape \(1, 1, 64, 64, 3\)"),
    (np.zeros(64, np.float32), r"image must be a PIL image, a numpy array .*shape \(64,\)"),
    (np.zeros((64, 64, 4), np.float32), r"image has 4 channel\(s\); the VAE encoder takes 3"),
    (np.zeros((2, 64, 64, 1), np.float32), r"image has 1 channel\(s\); the VAE encoder takes 3"),
    (np.zeros((64, 64, 3), np.uint8), r"image: numpy images must be floats in \[0, 1\]; got uint8"),
    ("in.png", r"image must be a PIL image, .*got a str"),
    (None, r"StableDiffusionImg2ImgPipeline needs image"),
])
def test_bad_images(pipelines, image, message):
    with pytest.raises(ValueError, match=message):
        pipelines("onnxruntime")("a cat", image=image, num_inference_steps=2)


def test_strength_leaving_no_step(pipelines):
    with pytest.raises(ValueError, match=r"strength 0.1 leaves no denoising step"):
        pipelines("onnxruntime")("a cat", image=rgb_image(), strength=0.1, num_inference_steps=5)
