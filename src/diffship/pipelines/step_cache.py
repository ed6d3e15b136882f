"""Step caching: a denoiser whose work at some steps is reused from earlier ones instead of computed afresh.

A StepCache decides, step by step, whether the denoiser runs in full or from its cache, and runs it;
`DiffusionPipeline.denoise` asks it for each step's noise prediction (`run_denoiser`). One object per generation:
it holds that generation's cache. The pipelines take `cache=` (a name in STEP_CACHES), `cache_interval` and
`cache_start`, and `check_step_cache` checks them before any graph runs.

DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free") is the first: a UNet's deep
features change little from one step to the next, so a full step (the `unet` graph, exported with --deepcache)
also outputs the deep feature entering its last up block's layers at a branch, and the steps up to the next full
one run only the shallow network around it (the `unet_shallow` graph) on that feature. Transformer families plug in
the same way (a first-block cache, TaylorSeer-style forecasting of the features): a StepCache subclass, its graphs,
and its line in STEP_CACHES.
"""

from __future__ import annotations

import numpy as np

from diffship.checks import check_int
from diffship.errors import MissingComponentError
from diffship.layout import DEEP_FEATURES, UNET_SHALLOW
from diffship.pipelines.timing import SHALLOW_STEP_STAGE, STEP_STAGE


class StepCache:
    """Runs the denoiser at each step of one generation, in full or from what earlier steps cached.

    `interval`: a full step every `interval` steps; `start`: the steps before this index all run in full."""

    # The graph components it runs besides the UNet (checked by check_step_cache).
    components: tuple[str, ...] = ()

    def __init__(self, interval: int, start: int):
        self.interval = interval
        self.start = start

    def is_full_step(self, i: int) -> bool:
        """Step i runs the whole denoiser: every step before `start`, then one in every `interval` from there."""
        return i < self.start or (i - self.start) % self.interval == 0

    def run(self, pipe, i: int, feeds: dict[str, np.ndarray], timer) -> np.ndarray:
        """The noise prediction (out_sample) of step i for the UNet `feeds`."""
        raise NotImplementedError


class DeepCache(StepCache):
    """Full steps run the UNet and keep its deep_features output; the steps between run unet_shallow on them. The
    branch (where the shallow network joins the cached feature) is fixed at export (export_report.json)."""

    components = (UNET_SHALLOW,)

    def __init__(self, interval: int, start: int):
        super().__init__(interval, start)
        self.deep_features = None  # the last full step's

    def run(self, pipe, i, feeds, timer):
        if self.deep_features is None or self.is_full_step(i):
            with timer.stage(STEP_STAGE):
                outputs = pipe.unet.run(feeds)
            self.deep_features = outputs[DEEP_FEATURES]
            return outputs["out_sample"]
        with timer.stage(SHALLOW_STEP_STAGE):
            return pipe.unet_shallow.run({**feeds, DEEP_FEATURES: self.deep_features})["out_sample"]


STEP_CACHES: dict[str, type[StepCache]] = {"deepcache": DeepCache}
# The export option that adds each cache's graphs, for errors.
EXPORT_FLAGS = {"deepcache": "--deepcache"}


def check_step_cache(pipe, cache, cache_interval, cache_start) -> None:
    """`cache` None or a name in STEP_CACHES whose graphs `pipe` has; `cache_interval` at least 1; `cache_start` at
    least 0."""
    check_int(cache_interval, "cache_interval", 1)
    check_int(cache_start, "cache_start", 0)
    if cache is None:
        return
    if cache not in STEP_CACHES:
        raise ValueError(f"cache must be None or one of {', '.join(map(repr, STEP_CACHES))}, got {cache!r}")
    where = pipe.model_dir if pipe.model_dir is not None else "this pipeline"
    for name in STEP_CACHES[cache].components:
        if getattr(pipe, name, None) is None:
            raise MissingComponentError(f"cache={cache!r} needs the {name} graph, which {where} does not have: "
                                        f"export the model with {EXPORT_FLAGS[cache]}")
    if cache == "deepcache" and DEEP_FEATURES not in {info.name for info in pipe.unet.outputs}:
        raise MissingComponentError(f"cache='deepcache' needs a UNet that outputs {DEEP_FEATURES}; {where}'s does "
                                    f"not: export the model again with {EXPORT_FLAGS[cache]}")


def step_cache(cache, cache_interval: int, cache_start: int) -> StepCache | None:
    """The generation's step cache (checked by check_step_cache), or None: every step runs the whole UNet."""
    return None if cache is None else STEP_CACHES[cache](cache_interval, cache_start)
