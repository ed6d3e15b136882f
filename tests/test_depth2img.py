"""Depth-to-image vs diffusers' StableDiffusionDepth2ImgPipeline on the tiny sd2-depth model (5-channel UNet, tiny
DPT): with a given depth map, and with the depth estimated by the exported depth_estimator after diffship's numpy
feature-extractor preprocessing (transformers' DPTImageProcessor, PIL backend, is the oracle).

Tolerance: 1e-3 max abs on output_type="np" images (image_tasks.ATOL); correct runs show about 1e-6 to 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffship.schedulers
from diffship.errors import MissingComponentError
from diffship.pipelines import StableDiffusionDepth2ImgPipeline
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
STRENGTH = 0.7


@pytest.fixture(scope="module")
def reference(tiny_model_dirs):
    from diffusers import StableDiffusionDepth2ImgPipeline as DiffusersDepth2Img

    pipe = DiffusersDepth2Img.from_pretrained(tiny_model_dirs("sd2-depth"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipelines(exported_dirs):
    cache = {}

    def get(backend):
        if backend not in cache:
            cache[backend] = StableDiffusionDepth2ImgPipeline.from_pretrained(exported_dirs("sd2-depth"),
                                                                              backend=backend, inference_precision="f32")
            cache[backend].set_progress_bar_config(disable=True)
        return cache[backend]

    return get


def _depth_map(height=40, width=48, seed=1) -> np.ndarray:
    """A depth map of another size than the latents (bicubic-resized, then scaled to [-1, 1] by the pipeline)."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    return (np.hypot(y - height / 2, x - width / 3) + rng.random((height, width)))[None].astype(np.float32)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("depth", ["given", "estimated"])
def test_depth2img_matches_diffusers(depth, backend, scheduler, reference, pipelines):
    kwargs = dict(prompt=PROMPTS, image=rgb_image(), strength=STRENGTH, num_inference_steps=STEPS, guidance_scale=7.5)
    depth_map = _depth_map() if depth == "given" else None
    expected = REFERENCES.get((depth, scheduler), lambda: run_reference(
        reference, scheduler, depth_map=None if depth_map is None else torch.from_numpy(depth_map), **kwargs))
    got = run_diffship(pipelines(backend), scheduler, depth_map=depth_map, **kwargs)
    assert got.shape == expected.shape == (2, 64, 64, 3)
    assert max_abs(expected[0], expected[1]) > 1e-2
    diff = max_abs(got, expected)
    report(f"depth2img {depth} depth {scheduler} {backend}", diff)
    assert diff <= ATOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_depth_estimator_and_preprocessing_match_transformers(backend, reference, pipelines):
    """The numpy DPTImageProcessor + the exported DPT vs transformers' processor + DPTForDepthEstimation, on PIL
    images of other sizes and modes than the DPT's input (resized with PIL bicubic to 32x32)."""
    images = [rgb_image(80, 72, seed=8), rgb_image(50, 61, seed=9).convert("RGBA").convert("RGB")]
    pixel_values = reference.feature_extractor(images=images, return_tensors="pt").pixel_values
    with torch.no_grad(), one_torch_thread():
        expected = reference.depth_estimator(pixel_values).predicted_depth.numpy()
    got = pipelines(backend).estimate_depth(images)
    assert got.shape == expected.shape
    scale = float(np.abs(expected).max())
    diff = max_abs(got, expected) / scale
    report(f"depth estimator (numpy preprocessing + {backend}) vs transformers, relative to max {scale:.2e}", diff)
    assert diff <= 1e-4


def test_images_per_prompt_and_timings(reference, pipelines):
    kwargs = dict(prompt="a castle", image=rgb_image(seed=4), num_images_per_prompt=2, strength=0.5,
                  num_inference_steps=4, guidance_scale=3.0)
    expected = run_reference(reference, "euler-a", seed=2, **kwargs)
    pipe = pipelines("onnxruntime")
    use_scheduler(pipe, "euler-a", diffship.schedulers)
    result = pipe(generator=TorchNoise(2), output_type="np", **kwargs)
    diff = max_abs(result.images, expected)
    report("depth2img 2 images per prompt, estimated depth, Euler a", diff)
    assert diff <= ATOL
    assert result.timings["depth_estimator"] > 0 and result.timings["vae_encode"] > 0


def test_bad_inputs(pipelines, exported_dirs, tmp_path):
    import shutil

    pipe = pipelines("onnxruntime")
    for strength in (-1, 2):
        with pytest.raises(ValueError, match=r"strength must be between 0.0 and 1.0"):
            pipe("a cat", image=rgb_image(), strength=strength, num_inference_steps=2)
    with pytest.raises(ValueError, match=r"StableDiffusionDepth2ImgPipeline needs image"):
        pipe("a cat", depth_map=_depth_map(), num_inference_steps=2)
    with pytest.raises(ValueError, match=r"image has 1 channel\(s\)"):
        pipe("a cat", image=np.zeros((1, 64, 64, 1), np.float32), num_inference_steps=2)
    with pytest.raises(ValueError, match=r"depth_map must be \(H, W\) or \(N, H, W\)"):
        pipe("a cat", image=rgb_image(), depth_map=np.zeros((1, 1, 8, 8)), num_inference_steps=2)
    # Without the estimator, a depth map must be given; with it, the estimator is not needed.
    bare = shutil.copytree(exported_dirs("sd2-depth"), tmp_path / "no-estimator")
    shutil.rmtree(bare / "depth_estimator")
    no_estimator = StableDiffusionDepth2ImgPipeline.from_pretrained(bare)
    with pytest.raises(MissingComponentError, match=r"no depth_map was given and .*no-estimator has no depth_estimator"):
        no_estimator("a cat", image=rgb_image(), num_inference_steps=2)
    assert no_estimator("a cat", image=rgb_image(), depth_map=_depth_map(), num_inference_steps=2,
                        output_type="np").images.shape == (1, 64, 64, 3)


def test_export_holds_the_depth_estimator(exported_dirs):
    """`diffship export` of a depth model: the DPT graph validated on both backends, its feature-extractor
    settings copied, and model_index.json still naming it."""
    import json

    model_dir = exported_dirs("sd2-depth")
    report = json.loads((model_dir / "export_report.json").read_text())
    validation = report["components"]["depth_estimator"]["validation"]
    assert set(validation) == {"onnxruntime", "openvino"} and all(v["passed"] for v in validation.values())
    assert (model_dir / "feature_extractor" / "preprocessor_config.json").is_file()
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionDepth2ImgPipeline" and "feature_extractor" in index
    assert {"depth_estimator", "feature_extractor"} <= set(StableDiffusionDepth2ImgPipeline.from_pretrained(
        model_dir).configs)
