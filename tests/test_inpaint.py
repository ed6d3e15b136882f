"""Inpainting vs diffusers' StableDiffusionInpaintPipeline, with a dedicated 9-channel inpainting UNet (tiny
sd1-inpaint) and with a regular 4-channel UNet (tiny sd1: latents blended with the mask after every step).

Tolerance: 1e-3 max abs on output_type="np" images (image_tasks.ATOL); correct runs show about 1e-6 to 1e-5. A mask
resized with another filter, or blended at the wrong timestep, shows 1e-2 or more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffship.pipelines import StableDiffusionInpaintPipeline
from image_tasks import (
    ATOL,
    BACKENDS,
    PROMPTS,
    SCHEDULERS,
    STEPS,
    ReferenceCache,
    max_abs,
    mask_image,
    report,
    rgb_image,
    run_diffship,
    run_reference,
)

REFERENCES = ReferenceCache()
# kind -> the strength its main case runs at: the inpainting UNet at diffusers' default (1.0: pure noise inside
# the mask), the regular UNet part-way (0.8: the image noised, then blended back outside the mask every step).
KINDS = {"sd1-inpaint": 1.0, "sd1": 0.8}


@pytest.fixture(scope="module")
def references(tiny_model_dirs):
    cache = {}

    def get(kind):
        if kind not in cache:
            from diffusers import StableDiffusionInpaintPipeline as DiffusersInpaint

            cache[kind] = DiffusersInpaint.from_pretrained(tiny_model_dirs(kind), safety_checker=None)
            cache[kind].set_progress_bar_config(disable=True)
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def pipelines(exported_dirs):
    cache = {}

    def get(kind, backend):
        if (kind, backend) not in cache:
            pipe = StableDiffusionInpaintPipeline.from_pretrained(exported_dirs(kind), backend=backend, inference_precision="f32")
            pipe.set_progress_bar_config(disable=True)
            cache[kind, backend] = pipe
        return cache[kind, backend]

    return get


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(KINDS), ids=["unet9", "unet4"])
def test_inpaint_matches_diffusers(kind, backend, scheduler, references, pipelines):
    kwargs = dict(prompt=PROMPTS, image=rgb_image(), mask_image=mask_image(), strength=KINDS[kind],
                  num_inference_steps=STEPS, guidance_scale=7.5)
    expected = REFERENCES.get((kind, scheduler), lambda: run_reference(references(kind), scheduler, **kwargs))
    got = run_diffship(pipelines(kind, backend), scheduler, **kwargs)
    assert got.shape == expected.shape == (2, 64, 64, 3)
    assert max_abs(expected[0], expected[1]) > 1e-2
    diff = max_abs(got, expected)
    report(f"inpaint {kind} {scheduler} {backend}", diff)
    assert diff <= ATOL


def test_mask_and_image_of_other_sizes_latents_and_strength(references, pipelines):
    """Image 80x96 and mask 40x52 (another aspect ratio) are both resized to height x width as diffusers does
    (lanczos, then the mask binarized and resized to the latents with nearest neighbours); given latents;
    strength below 1 on the inpainting UNet."""
    latents = np.random.default_rng(7).standard_normal((1, 4, 6, 8)).astype(np.float32)
    kwargs = dict(prompt="a castle", image=rgb_image(80, 96, seed=2),
                  mask_image=mask_image(40, 52, box=(0.1, 0.5, 0.9, 0.95)), height=48, width=64, strength=0.7,
                  num_inference_steps=4, guidance_scale=6.0)
    expected = run_reference(references("sd1-inpaint"), "euler-a", latents=torch.from_numpy(latents), **kwargs)
    got = run_diffship(pipelines("sd1-inpaint", "openvino"), "euler-a", latents=latents, **kwargs)
    assert got.shape == expected.shape == (1, 48, 64, 3)
    diff = max_abs(got, expected)
    report("inpaint sd1-inpaint image 80x96 + mask 40x52 -> 48x64, latents, strength 0.7, Euler a, openvino", diff)
    assert diff <= ATOL


def test_numpy_image_and_mask_batch(references, pipelines):
    """numpy NHWC images (two) with a (N, H, W) float mask batch, values in [0, 1] (binarized at 0.5)."""
    images = np.stack([np.asarray(rgb_image(seed=s), np.float32) / 255 for s in (3, 4)])
    masks = np.stack([np.asarray(mask_image(box=b), np.float32) / 255 * 0.8
                      for b in ((0.2, 0.2, 0.6, 0.6), (0.5, 0.1, 0.9, 0.7))])
    kwargs = dict(prompt=PROMPTS, image=images, mask_image=masks, strength=0.9, num_inference_steps=4)
    expected = run_reference(references("sd1"), "dpm++2m", seed=3, **kwargs)
    got = run_diffship(pipelines("sd1", "onnxruntime"), "dpm++2m", seed=3, **kwargs)
    diff = max_abs(got, expected)
    report("inpaint sd1 numpy NHWC images + (N, H, W) masks, DPM++ 2M, onnxruntime", diff)
    assert diff <= ATOL


@pytest.mark.parametrize("kind", list(KINDS), ids=["unet9", "unet4"])
def test_padding_mask_crop(kind, references, pipelines):
    """padding_mask_crop: image and mask cropped around the mask (grown to the output's aspect ratio), resized
    with "fill", generated, and pasted back into the original (a PIL image of the original's size)."""
    image = rgb_image(96, 80, seed=6)
    mask = mask_image(96, 80, box=(0.4, 0.3, 0.6, 0.55))
    kwargs = dict(prompt="a red circle", image=image, mask_image=mask, padding_mask_crop=4, num_inference_steps=3,
                  output_type="pil", strength=KINDS[kind])
    expected = run_reference(references(kind), "ddim", seed=5, **kwargs)
    got = run_diffship(pipelines(kind, "onnxruntime"), "ddim", seed=5, **kwargs)
    assert got[0].size == expected[0].size == image.size
    # PIL output is 8-bit: a 1e-6 difference can flip a rounding, so one level (1/255) is the bound here.
    diff = max_abs(np.asarray(got[0]), np.asarray(expected[0])) / 255
    report(f"inpaint {kind} padding_mask_crop=4 (PIL output, 8-bit)", diff)
    assert diff <= 1 / 255 + 1e-9
    # Outside the crop the original is kept exactly.
    np.testing.assert_array_equal(np.asarray(got[0])[:8], np.asarray(image)[:8])


def test_bad_inputs(pipelines):
    pipe = pipelines("sd1-inpaint", "onnxruntime")
    with pytest.raises(ValueError, match=r"inpainting needs image, .*\(mask_image was given without it\)"):
        pipe("a cat", mask_image=mask_image(), num_inference_steps=2)
    with pytest.raises(ValueError, match=r"inpainting needs mask_image"):
        pipe("a cat", image=rgb_image(), num_inference_steps=2)
    for strength in (-0.5, 1.01):
        with pytest.raises(ValueError, match=r"strength must be between 0.0 and 1.0"):
            pipe("a cat", image=rgb_image(), mask_image=mask_image(), strength=strength, num_inference_steps=2)
    with pytest.raises(ValueError, match=r"mask_image must be a PIL image, a numpy array .*\(1, 2, 64, 64, 1\)"):
        pipe("a cat", image=rgb_image(), mask_image=np.zeros((1, 2, 64, 64, 1), np.float32), num_inference_steps=2)
    with pytest.raises(ValueError, match=r"image has 2 channel\(s\)"):
        pipe("a cat", image=np.zeros((64, 64, 2), np.float32), mask_image=mask_image(), num_inference_steps=2)
    with pytest.raises(ValueError, match=r"padding_mask_crop needs image as a PIL image"):
        pipe("a cat", image=np.zeros((64, 64, 3), np.float32), mask_image=mask_image(), padding_mask_crop=2)
    with pytest.raises(ValueError, match=r"padding_mask_crop needs output_type='pil'"):
        pipe("a cat", image=rgb_image(), mask_image=mask_image(), padding_mask_crop=2, output_type="np")
    with pytest.raises(ValueError, match=r"got 2 images and 3 masks"):
        pipe("a cat", image=np.zeros((2, 64, 64, 3), np.float32), mask_image=np.zeros((3, 64, 64), np.float32),
             num_inference_steps=2)
