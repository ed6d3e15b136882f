"""Image conversions between the VAE's [-1, 1] NCHW arrays and what users hold (PIL images, [0, 1] NHWC arrays)."""

from __future__ import annotations

import numpy as np
from PIL import Image

OUTPUT_TYPES = ("pil", "np", "latent")


def denormalize(sample: np.ndarray) -> np.ndarray:
    """VAE output [-1, 1] NCHW -> [0, 1] NHWC float32."""
    return np.clip(sample / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1).astype(np.float32, copy=False)


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """[0, 1] NHWC floats -> PIL images, rounded as diffusers rounds them."""
    images = (images * 255).round().astype(np.uint8)
    if images.shape[-1] == 1:
        return [Image.fromarray(image[..., 0], mode="L") for image in images]
    return [Image.fromarray(image) for image in images]


def postprocess(sample: np.ndarray, output_type: str = "pil"):
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if output_type == "latent":
        return sample
    images = denormalize(sample)
    return numpy_to_pil(images) if output_type == "pil" else images
