"""The one place a scheduler draws random noise.

`generator` is what the user passed to the pipeline / `step`:

- a `numpy.random.Generator`: its uniform float32 draws are turned into normal ones by the Box-Muller transform
  (below), which is ~3x faster than `Generator.standard_normal` (Ziggurat) on latent-sized arrays and keeps a
  stochastic scheduler step as fast as diffusers' (torch's `randn` is a vectorized Box-Muller too). Same seed, same
  noise; but not the numbers `standard_normal` would give;
- any other object with `standard_normal(size, dtype=)` (a stand-in generator), whose draws are used as they are;
- an object with a `randn(shape, dtype)` method: the hook. The scheduler calls it and uses what it returns, so a
  test or an application can feed exactly the noise it wants (for parity with diffusers, a stand-in replays the
  tensors diffusers' `randn_tensor` drew, in order);
- a list of those, one per batch item (diffusers' convention): item i's noise comes from generator i;
- None: a fresh `numpy.random.default_rng()`.
"""

from __future__ import annotations

import numpy as np


def randn(shape: tuple[int, ...], generator=None, dtype=np.float32) -> np.ndarray:
    """Standard normal noise of `shape` and `dtype` drawn from `generator` (see the module docstring)."""
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    if isinstance(generator, (list, tuple)) and len(generator) == 1:  # diffusers treats [g] as g
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"Got {len(generator)} generators for a batch of {shape[0]}; pass one per batch item.")
        return np.concatenate([randn((1, *shape[1:]), g, dtype) for g in generator], axis=0)
    if generator is None:
        generator = np.random.default_rng()
    hook = getattr(generator, "randn", None)
    if callable(hook):
        noise = np.asarray(hook(shape, dtype))
        if noise.shape != shape:
            raise ValueError(f"The noise hook returned shape {noise.shape}; the scheduler asked for {shape}.")
        return noise.astype(dtype, copy=True)  # the scheduler owns (and may overwrite) what it gets
    if isinstance(generator, np.random.Generator):
        return box_muller(generator, shape).astype(dtype, copy=False)
    # standard_normal draws float32 or float64 only; other float types are cast from float32.
    draw_dtype = dtype if dtype in (np.dtype(np.float32), np.dtype(np.float64)) else np.dtype(np.float32)
    return generator.standard_normal(shape, dtype=draw_dtype).astype(dtype, copy=False)


_TWO_PI = np.float32(2 * np.pi)


def box_muller(generator: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 N(0, 1) noise: z = sqrt(-2 ln u1) (cos 2 pi u2, sin 2 pi u2) for uniform u1, u2 (Box & Muller 1958).

    One uniform draw per output value; all passes in place on float32 (the tails end at 5.8 sigma, the float32
    resolution of u1, like torch's float32 randn)."""
    n = int(np.prod(shape))
    half = (n + 1) // 2
    uniform = generator.random(2 * half, dtype=np.float32)
    radius, angle = uniform[:half], uniform[half:]
    np.subtract(np.float32(1), radius, out=radius)  # (0, 1]: log stays finite
    np.log(radius, out=radius)
    radius *= np.float32(-2)
    np.sqrt(radius, out=radius)
    angle *= _TWO_PI
    out = np.empty(2 * half, dtype=np.float32)
    np.cos(angle, out=out[:half])
    np.sin(angle, out=out[half:])
    out[:half] *= radius
    out[half:] *= radius
    return out[:n].reshape(shape)
