"""The one place a scheduler draws random noise.

`generator` is what the user passed to the pipeline / `step`:

- a `numpy.random.Generator` (or anything with `standard_normal(size, dtype=)`), used as is;
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
        return noise.astype(dtype, copy=False)
    # standard_normal draws float32 or float64 only; other float types are cast from float32.
    draw_dtype = dtype if dtype in (np.dtype(np.float32), np.dtype(np.float64)) else np.dtype(np.float32)
    return generator.standard_normal(shape, dtype=draw_dtype).astype(dtype, copy=False)
