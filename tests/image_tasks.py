"""Shared by the image-task parity tests (img2img, inpainting, depth2img): inputs, schedulers, noise, and a cache of
diffusers' reference outputs so that both backends compare against one reference run.

Noise: diffusers draws every random tensor (the VAE encoder's sample, the initial noise, the ancestral schedulers'
noise) from one torch.Generator, in the order the pipeline asks for them. `TorchNoise` is diffship's noise hook
(`generator=` object with a `randn(shape, dtype)` method) that draws from a torch.Generator with the same seed:
when diffship asks for the same shapes in the same order, it gets the very same tensors.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from PIL import Image

ATOL = 1e-3  # max abs difference on output_type="np" images in [0, 1], the bound
STEPS = 5
PROMPTS = ["a red circle on the left", "an oil painting of a castle at sunset"]
BACKENDS = ["onnxruntime", "openvino"]
VAE_SCALE_FACTOR = 8  # the tiny models' VAE, as every Stable Diffusion's: a 64x64 image has an 8x8 latent
# name: (class name in diffusers and diffship, config overrides). The model's own config is the base.
SCHEDULERS = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


class TorchNoise:
    """diffship noise hook replaying torch.randn draws from a seeded torch.Generator."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def randn(self, shape, dtype):
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32).numpy().astype(dtype)


def latents(batch: int = 2, height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    """Initial latents for `batch` images of height x width, drawn from `seed`."""
    shape = (batch, 4, height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def rgb_image(height=64, width=64, seed=0) -> Image.Image:
    """A smooth colour pattern with some noise: structure for the VAE and the depth estimator to respond to."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    pattern = np.stack([np.sin(6 * x + seed), np.cos(5 * y), np.sin(4 * (x + y))], axis=-1) * 0.4 + 0.5
    pixels = np.clip(pattern + rng.normal(0, 0.05, pattern.shape), 0, 1)
    return Image.fromarray((pixels * 255).astype(np.uint8))


def mask_image(height=64, width=64, box=(0.25, 0.3, 0.7, 0.8)) -> Image.Image:
    """White (repaint) inside `box` = (top, left, bottom, right) as fractions, black elsewhere."""
    mask = np.zeros((height, width), np.uint8)
    top, left, bottom, right = box
    mask[int(top * height):int(bottom * height), int(left * width):int(right * width)] = 255
    return Image.fromarray(mask, mode="L")


def use_scheduler(pipe, name: str, package) -> None:
    class_name, overrides = SCHEDULERS[name]
    pipe.scheduler = getattr(package, class_name).from_config(pipe.scheduler.config, **overrides)


class ReferenceCache:
    """diffusers' output for each setting, computed once and shared by both backends' tests."""

    def __init__(self):
        self.results: dict = {}

    def get(self, key, run):
        if key not in self.results:
            self.results[key] = run()
        return self.results[key]


def run_reference(pipe, scheduler: str, seed: int = 0, **kwargs) -> np.ndarray:
    import diffusers

    use_scheduler(pipe, scheduler, diffusers)
    kwargs.setdefault("output_type", "np")
    with one_torch_thread():
        return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


@contextlib.contextmanager
def one_torch_thread():
    """On a shared 2-core machine torch's thread pool spins against the other processes and runs these tiny
    models several times slower; one thread does not. Results do not depend on it beyond float noise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_diffship(pipe, scheduler: str, seed: int = 0, **kwargs):
    import diffship.schedulers

    use_scheduler(pipe, scheduler, diffship.schedulers)
    kwargs.setdefault("output_type", "np")
    return pipe(generator=TorchNoise(seed), **kwargs).images


# diffusers' images per (pipeline, seed, arguments), computed once and shared by both backends' tests.
_DIFFUSERS_IMAGES: dict = {}


def diffusers_images(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    """diffusers' output_type="np" images for these call arguments (`latents` as numpy, given to diffusers as
    torch), its generator seeded with `seed`; computed once per pipeline and arguments."""
    key = (id(pipe), seed, repr(sorted((k, repr(v)) for k, v in kwargs.items())))
    if key not in _DIFFUSERS_IMAGES:
        kwargs = dict(kwargs)
        if kwargs.get("latents") is not None:
            kwargs["latents"] = torch.from_numpy(kwargs["latents"])
        with one_torch_thread():
            _DIFFUSERS_IMAGES[key] = pipe(generator=torch.Generator().manual_seed(seed), output_type="np",
                                          **kwargs).images
    return _DIFFUSERS_IMAGES[key]


def diffship_images(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    """diffship's output_type="np" images for the same arguments, its noise drawn as torch draws it from `seed`."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=TorchNoise(seed), output_type="np", **kwargs).images


def check_parity(case: str, expected, got) -> None:
    """diffship's images against diffusers': the same shape and max abs below ATOL (printed for the tables)."""
    diff = max_abs(expected, got)
    report(case, diff)
    assert np.asarray(got).shape == np.asarray(expected).shape
    assert diff < ATOL, f"{case}: max abs {diff:.2e} >= {ATOL}"


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def report(case: str, diff: float) -> None:
    """Printed figures (pytest -s, or in the captured output of a failure) for the parity tables."""
    print(f"PARITY {case}: max abs {diff:.2e}")


def load_embedding_in_diffusers(pipe, token, file, fmt):
    """A textual inversion file into a diffusers pipeline, diffusers' way for each format (SDXL's: one load per
    text encoder, as its documentation shows)."""
    if fmt == "sdxl":
        from safetensors.torch import load_file

        state = load_file(str(file))
        pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    else:
        pipe.load_textual_inversion(str(file), token=token if fmt == "a1111-safetensors" else None)
