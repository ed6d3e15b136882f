"""Step caching: a denoiser whose work at some steps is reused from earlier ones instead of computed afresh.

A StepCache decides, step by step, whether the denoiser runs in full or from its cache, and runs it;
`DiffusionPipeline.denoise` asks it for each step's noise prediction (`run_denoiser`). One object per generation:
it holds that generation's cache. The pipelines take `cache=` (a name in STEP_CACHES, or a StepCache configured
by the caller, e.g. `TaylorSeer(interval=4, start=2, order=2)`), `cache_interval` and `cache_start` (None: the
cache's own defaults), and `check_step_cache` checks them before any graph runs.

DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free") is the first: a UNet's deep
features change little from one step to the next, so a full step (the `unet` graph, exported with --deepcache)
also outputs the deep feature entering its last up block's layers at a branch, and the steps up to the next full
one run only the shallow network around it (the `unet_shallow` graph) on that feature: UNet families, with graphs
of its own.

TaylorSeer (Liu et al. 2025, "From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers") needs
no graph of its own, so every family runs it (UNets, SD3's and Flux's transformers): between full steps the
denoiser's output is forecast by a Taylor series around the last full step, whose derivatives are finite
differences of the full steps' outputs. It is diffusers' TaylorSeerCacheConfig (hooks/taylorseer_cache.py) applied
to the denoiser's output layer (its "lite" form caches the transformers' proj_out, which is that output up to a
reshape), with the same schedule; tests/test_step_cache.py holds the two side by side. Other caches plug in the
same way: a StepCache subclass (its graphs, if any, in `components`) and its line in STEP_CACHES.
"""

from __future__ import annotations

import math

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
    # cache_interval and cache_start when the call leaves them None
    default_interval, default_start = 3, 0

    def __init__(self, interval: int | None = None, start: int | None = None):
        if interval is not None:
            check_int(interval, "interval", 1)
        if start is not None:
            check_int(start, "start", 0)
        self.interval = self.default_interval if interval is None else interval
        self.start = self.default_start if start is None else start

    def fresh(self) -> StepCache:
        """The same cache with nothing cached: one generation's (a configured instance serves many calls)."""
        return type(self)(self.interval, self.start)

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

    def __init__(self, interval: int | None = None, start: int | None = None):
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


class TaylorSeer(StepCache):
    """Full steps run the denoiser and update the Taylor factors of its output: factor 0 is the output, factor k+1
    the difference of factor k from its value at the previous full step, divided by the steps between them (up to
    `order`). The steps between forecast the output as sum_k factor_k * d^k / k!, d steps past the last full one.
    Schedule (diffusers'): every step before `start` in full, then step i in full when (i - start - 1) is a multiple
    of `interval` (so step `start` itself is forecast from the steps before it), and every step from `end` on. A
    step to forecast before any full one (start 0) runs in full, where diffusers raises."""

    default_interval, default_start = 5, 3  # diffusers' TaylorSeerCacheConfig defaults

    def __init__(self, interval: int | None = None, start: int | None = None, order: int = 1, end: int | None = None):
        super().__init__(interval, start)
        check_int(order, "order", 1)
        if end is not None:
            check_int(end, "end", 0)
        self.order, self.end = order, end
        self.factors: list[np.ndarray] = []  # Taylor factors 0..order at the last full step
        self.last_full_step: int | None = None

    def fresh(self) -> TaylorSeer:
        return TaylorSeer(self.interval, self.start, self.order, self.end)

    def is_full_step(self, i: int) -> bool:
        return i < self.start or (i - self.start - 1) % self.interval == 0 or (self.end is not None and i >= self.end)

    def run(self, pipe, i, feeds, timer):
        if self.last_full_step is None or self.is_full_step(i):
            with timer.stage(STEP_STAGE):
                output = pipe.sessions[pipe.denoiser].run(feeds)[pipe.denoiser_output]
            self.update(i, output)
            return output
        offset = i - self.last_full_step
        forecast = self.factors[0].copy()
        for k, factor in enumerate(self.factors[1:], start=1):
            forecast += factor * np.float32(offset ** k / math.factorial(k))
        return forecast

    def update(self, i: int, output: np.ndarray) -> None:
        factors = [output.astype(np.float32)]
        if self.last_full_step is not None:
            steps = np.float32(i - self.last_full_step)
            for previous in self.factors[:self.order]:
                if previous.shape != factors[-1].shape:  # another batch: the series starts again
                    break
                factors.append((factors[-1] - previous) / steps)
        self.factors, self.last_full_step = factors, i


STEP_CACHES: dict[str, type[StepCache]] = {"deepcache": DeepCache, "taylorseer": TaylorSeer}
# The export option that adds each cache's graphs, for errors.
EXPORT_FLAGS = {"deepcache": "--deepcache"}


def check_step_cache(pipe, cache, cache_interval=None, cache_start=None) -> None:
    """`cache` None, a name in STEP_CACHES or a StepCache, whose graphs `pipe` has; `cache_interval` None or at
    least 1; `cache_start` None or at least 0 (not both a configured StepCache and these)."""
    if cache_interval is not None:
        check_int(cache_interval, "cache_interval", 1)
    if cache_start is not None:
        check_int(cache_start, "cache_start", 0)
    if cache is None:
        return
    if isinstance(cache, StepCache):
        if cache_interval is not None or cache_start is not None:
            raise ValueError("pass cache_interval and cache_start to the StepCache given as cache, not beside it")
        cache_class = type(cache)
        cache = next((name for name, cls in STEP_CACHES.items() if cls is cache_class), cache_class.__name__)
    elif not isinstance(cache, str) or cache not in STEP_CACHES:
        raise ValueError(f"cache must be None, a StepCache or one of {', '.join(map(repr, STEP_CACHES))}, "
                         f"got {cache!r}")
    else:
        cache_class = STEP_CACHES[cache]
    where = pipe.model_dir if pipe.model_dir is not None else "this pipeline"
    if UNET_SHALLOW in cache_class.components and pipe.denoiser != "unet":
        raise ValueError(f"cache={cache!r} runs on UNets; {type(pipe).__name__}'s denoiser is its {pipe.denoiser}: "
                         "use cache='taylorseer', which needs no graph of its own")
    for name in cache_class.components:
        if getattr(pipe, name, None) is None:
            raise MissingComponentError(f"cache={cache!r} needs the {name} graph, which {where} does not have: "
                                        f"export the model with {EXPORT_FLAGS[cache]}")
    if cache == "deepcache" and DEEP_FEATURES not in {info.name for info in pipe.unet.outputs}:
        raise MissingComponentError(f"cache='deepcache' needs a UNet that outputs {DEEP_FEATURES}; {where}'s does "
                                    f"not: export the model again with {EXPORT_FLAGS[cache]}")


def step_cache(cache, cache_interval: int | None = None, cache_start: int | None = None) -> StepCache | None:
    """The generation's step cache (checked by check_step_cache), or None: every step runs the whole denoiser."""
    if cache is None:
        return None
    if isinstance(cache, StepCache):
        return cache.fresh()
    return STEP_CACHES[cache](cache_interval, cache_start)
