"""The shapes world: captioned 64x64 pictures of one flat shape, rendered in numpy, and a scorer that reads colour,
shape and position back from pixels alone.

Prompts are "a {colour} {shape} on the {position}": 4 colours x 3 shapes x 5 positions = 60 prompts. The trained
reference model (`diffship tiny-model --trained`) learnt from `render`; `score` says, per generated image, whether
each of the three attributes matches its prompt, so a model's pictures can be graded without a person looking.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffship.layout import MODEL_INDEX

SIZE = 64
# Reference colours (sRGB). Renders jitter them a little; the scorer picks the nearest one.
COLOURS = {"red": (214, 38, 38), "green": (36, 158, 60), "blue": (38, 76, 214), "yellow": (238, 198, 22)}
SHAPES = ("circle", "square", "triangle")
# Where the shape's centre sits, as fractions (x, y) of the image side.
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
ATTRIBUTES = ("colour", "shape", "position")

_PROMPT = re.compile(r"^a (\w+) (\w+) on the (\w+)$")


def make_prompt(colour: str, shape: str, position: str) -> str:
    return f"a {colour} {shape} on the {position}"


# All 60 prompts, colour-major.
PROMPTS = tuple(make_prompt(c, s, p) for c, s, p in itertools.product(COLOURS, SHAPES, POSITIONS))


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """(colour, shape, position) of a prompt of this world; ValueError naming the prompt otherwise."""
    match = _PROMPT.match(prompt.strip().lower())
    if not match or match[1] not in COLOURS or match[2] not in SHAPES or match[3] not in POSITIONS:
        raise ValueError(f"{prompt!r} is not a shapes prompt: expected 'a {{colour}} {{shape}} on the {{position}}' "
                         f"with colour in {list(COLOURS)}, shape in {list(SHAPES)}, position in {list(POSITIONS)}")
    return match[1], match[2], match[3]


def render(prompt: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """One (size, size, 3) uint8 picture of `prompt`: a light plain background (its shade and tint vary) and the
    shape, antialiased by 4x supersampling, with its size, exact place and colour jittered a little."""
    colour, shape, position = parse_prompt(prompt)
    background = rng.uniform(222, 250) + rng.uniform(-6, 6, size=3)
    fill = np.clip(np.array(COLOURS[colour], float) + rng.uniform(-14, 14, size=3), 0, 255)
    half = rng.uniform(0.13, 0.18) * size                       # half the side / the radius
    fx, fy = POSITIONS[position]
    cx, cy = (np.array([fx, fy]) + rng.uniform(-0.035, 0.035, size=2)) * size

    s = 4
    coords = (np.arange(size * s) + 0.5) / s
    y, x = np.meshgrid(coords, coords, indexing="ij")
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:  # upright triangle: apex at the top, base at the bottom, as wide as it is tall
        depth = (y - (cy - half)) / (2 * half)              # 0 at the apex, 1 at the base
        inside = (depth >= 0) & (depth <= 1) & (np.abs(x - cx) <= half * depth)
    coverage = inside.reshape(size, s, size, s).mean(axis=(1, 3))[..., None]
    image = background * (1 - coverage) + fill * coverage
    return np.round(image).astype(np.uint8)


def render_dataset(count_per_prompt: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, list[str]]:
    """`count_per_prompt` renders of each of the 60 prompts: (N, size, size, 3) uint8 and the N prompts."""
    rng = np.random.default_rng(seed)
    prompts = [p for p in PROMPTS for _ in range(count_per_prompt)]
    return np.stack([render(p, rng, size) for p in prompts]), prompts


def _as_uint8_images(images) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    out = []
    for image in images:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"expected RGB images (H, W, 3) or PIL images, got an array of shape {array.shape}")
        if array.dtype != np.uint8:  # float pipeline output in [0, 1]
            array = np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
        out.append(array)
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def read_image(image: np.ndarray) -> dict:
    """What one picture shows, from its pixels: {"colour", "shape", "position"} (None where no shape is found).

    Background: the median of the 2-pixel frame. Shape pixels: the largest connected region at least 60 (of 441)
    away from it in RGB. Colour: the nearest reference colour to the mean of that region's inner half (edges blend
    with the background). Shape: how much of its bounding box the region fills (square 1, circle pi/4, triangle
    1/2). Position: where its centroid lies, "center" within 1/8 of the side of the middle.
    """
    pixels = image.astype(np.float64)
    size = pixels.shape[0]
    frame = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                            pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    distance = np.linalg.norm(pixels - np.median(frame, axis=0), axis=-1)
    mask = _largest_component(distance > 60)
    if mask.sum() < 12:
        return {"colour": None, "shape": None, "position": None}

    core = mask & (distance >= np.median(distance[mask]))
    mean = pixels[core].mean(axis=0)
    colour = min(COLOURS, key=lambda name: np.linalg.norm(mean - np.array(COLOURS[name])))

    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    shape = "square" if fill > 0.89 else "circle" if fill > 0.64 else "triangle"

    dx, dy = (xs.mean() + 0.5) / size - 0.5, (ys.mean() + 0.5) / size - 0.5
    if max(abs(dx), abs(dy)) < 0.125:
        position = "center"
    elif abs(dx) >= abs(dy):
        position = "left" if dx < 0 else "right"
    else:
        position = "top" if dy < 0 else "bottom"
    return {"colour": colour, "shape": shape, "position": position}


def score(images, prompts: Sequence[str]) -> list[dict]:
    """Per image, whether its colour, shape and position match its prompt, read from the pixels alone.

    `images`: PIL images, (H, W, 3) uint8 arrays, or float arrays in [0, 1] (a pipeline's numpy output, batched or
    not). Returns one dict per image: {"colour": bool, "shape": bool, "position": bool, "seen": read_image(...)}.
    """
    images = _as_uint8_images(images)
    if len(images) != len(prompts):
        raise ValueError(f"score got {len(images)} images but {len(prompts)} prompts; give one prompt per image")
    results = []
    for image, prompt in zip(images, prompts):
        wanted = dict(zip(ATTRIBUTES, parse_prompt(prompt)))
        seen = read_image(image)
        results.append({**{a: seen[a] == wanted[a] for a in ATTRIBUTES}, "seen": seen})
    return results


def accuracy(results: Sequence[dict]) -> dict[str, float]:
    """Percentage of images correct per attribute, and for all three at once ("all")."""
    if not results:
        raise ValueError("accuracy of no results: score some images first")
    n = len(results)
    out = {a: 100.0 * sum(r[a] for r in results) / n for a in ATTRIBUTES}
    out["all"] = 100.0 * sum(all(r[a] for a in ATTRIBUTES) for r in results) / n
    return out


# The trained reference model shipped with diffship (written by diffship.testing.shapes_training).
TRAINED_MODEL = Path(__file__).with_name("shapes_model")


def save_trained_pipeline(out: str | Path) -> Path:
    """Copy the shipped shapes model (a diffusers Stable Diffusion directory) to `out` and return its path."""
    import shutil

    from diffship.errors import DiffshipError

    out = Path(out)
    if not (TRAINED_MODEL / MODEL_INDEX).is_file():
        raise DiffshipError(f"the trained shapes model is missing from {TRAINED_MODEL}; reinstall diffship, or "
                                "train one with `python -m diffship.testing.shapes_training OUT`")
    if out.exists() and any(out.iterdir()):
        raise DiffshipError(f"{out} is not empty; give a new directory for the trained model")
    shutil.copytree(TRAINED_MODEL, out, dirs_exist_ok=True)
    return out
