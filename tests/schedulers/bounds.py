"""How far diffship's and diffusers' float32 results may lie apart where a scheduler's arithmetic is ill-conditioned:
bounds the test computes from float32's roundoff, the operations performed and the values they act on -- never from
what one machine happened to produce.

Most of a trajectory is well conditioned and is compared at `parity.RTOL`. A few steps of a few schedulers subtract
nearly equal float32 numbers, so that a difference in the last bit grows by the condition number of the subtraction.
Last-bit differences are everywhere: torch builds schedules with float32 ops that are not correctly rounded (its
linspace, pow and sqrt differ from numpy's in the last bit for a fraction of the entries, differently on AVX2 and
AVX-512 CPUs), and torch and numpy round log / exp differently (each by instruction set, too).

The tool is running error analysis (Wilkinson; Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed.,
ch. 3): every quantity is a `Bounded` -- a value and a bound on how far the two libraries' float32 values of it may
lie apart -- and each operation propagates its operands' bounds (first order, plus the second-order term of
products) and adds its own rounding: + - * / are correctly rounded (IEEE 754), at most u |result| per side
(u = 2^-24), and none at all on identical operands; log, exp, pow and sqrt at most TRANSCENDENTAL_ULPS ulp per
side (an ulp of y is at most eps |y|, eps = 2^-23).

Three uses, each narrow:

1. `fix_reference_schedule`: where a value diffusers computes -- in its schedule or inside its step -- is
   ill-defined in float32 (its rounding bound exceeds the schedule tolerance), the test checks diffusers' value
   against the exact one within that bound, then gives the diffusers scheduler the exact value, so that the rest of
   the trajectory compares what is well defined. Only the ancestral split's square root of a difference has such
   values: sigma_down = sqrt(sigma_next^2 - sigma_up^2) of KDPM2 ancestral (in its schedule, with the sigma and
   timestep interpolated from it) and Euler ancestral (in its step), and DDIM's sqrt(1 - a_prev - std_dev^2) with
   eta near 1 (in its step).
2. `StepBounds` (Heun, KDPM2, KDPM2 ancestral): their second-order step divides x - x0 = sigma m, a difference of
   nearly equal tensors when sigma is small, by sigma and multiplies it by dt, up to 500x sigma (2 steps: 14.6 ->
   0.029). A shadow copy of diffship's scheduler runs each step again on `Bounded` inputs, through the scheduler's
   own code; its result bounds the discrepancy that step adds.
3. `record_coefficients` (DEIS): the ill-conditioned part of a DEIS step is its scalar coefficients; the test reads
   both libraries' coefficients, checks them in float64 at the same sigmas (the formula, to float64's rounding
   bound) and in float32 (their difference within its worst-case bound), and adds that difference's exact effect.

What a step may add is added to the tolerance of every tensor computed after it (parity.carried_bounds): a measured
effect (3.) always, as it is exact; a worst-case bound (2., 3.) where it exceeds what RTOL allows -- the
ill-conditioned steps -- as RTOL covers the rounding of the well-conditioned rest. Later steps carry a discrepancy
forward without growing it (the stand-in model's output is half its input, and every solver tested is stable for
it), so the additions of several steps add up.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import inspect

import numpy as np

EPS = float(np.finfo(np.float32).eps)  # 2^-23: one ulp of 1.0
U = EPS / 2  # unit roundoff: a correctly rounded float32 operation is off by at most u |result|
# Neither library rounds its float32 log / exp / pow / sqrt correctly: torch's (SLEEF's 1-ulp functions) were within
# 0.56 ulp over 2e6 arguments, numpy's SIMD log / exp within 3.5 / 2.4 ulp (on AVX-512; other instruction sets run
# other code). 4 ulp per side covers both.
TRANSCENDENTAL_ULPS = 4


class Bounded:
    """A float64 value (scalar or array) and `err`, a bound on how far a float32 computation of it may lie off.

    `sides` = 2: the bound is on the difference between two float32 computations (diffship's and diffusers'), each
    rounding independently; `sides` = 1: between one float32 computation and the exact value. `identical`: both
    sides hold the very same float32 value (by default: when err is 0); a correctly rounded operation on identical
    operands gives identical results, so it adds no rounding to the difference. A tensor whose two sides differ
    by an amount accounted for elsewhere has err 0 but is not identical.
    """

    __slots__ = ("value", "err", "sides", "identical")

    def __init__(self, value, err=0.0, sides: int = 2, identical: bool | None = None):
        self.value = np.asarray(value, dtype=np.float64)
        self.err = np.broadcast_to(np.asarray(err, dtype=np.float64), self.value.shape).copy()
        self.sides = sides
        self.identical = (not np.any(self.err)) if identical is None else identical

    # what the schedulers' code reads off an array
    @property
    def shape(self):
        return self.value.shape

    @property
    def dtype(self):
        return np.dtype(np.float32)

    def __repr__(self):
        return f"Bounded({self.value!r}, err={self.err!r})"

    # ---- rounding of one operation ----
    def _rounded(self, value, err, *operands, transcendental=False):
        if not transcendental and self.sides == 2 and all(x.identical for x in (self, *operands)):
            return Bounded(value, err, self.sides, identical=True)
        # transcendentals: the two libraries' implementations differ, identical arguments or not
        per_side = TRANSCENDENTAL_ULPS * EPS if transcendental else U
        return Bounded(value, err + self.sides * per_side * np.abs(value), self.sides, identical=False)

    def _lift(self, other) -> "Bounded":
        return other if isinstance(other, Bounded) else Bounded(other, 0.0, self.sides)

    # ---- arithmetic ----
    def __add__(self, other):
        other = self._lift(other)
        return self._rounded(self.value + other.value, self.err + other.err, other)

    def __radd__(self, other):
        return self._lift(other) + self

    def __sub__(self, other):
        other = self._lift(other)
        return self._rounded(self.value - other.value, self.err + other.err, other)

    def __rsub__(self, other):
        return self._lift(other) - self

    def __neg__(self):
        return Bounded(-self.value, self.err, self.sides, self.identical)

    def __mul__(self, other):
        other = self._lift(other)
        err = np.abs(self.value) * other.err + np.abs(other.value) * self.err + self.err * other.err
        return self._rounded(self.value * other.value, err, other)

    def __rmul__(self, other):
        return self._lift(other) * self

    def __truediv__(self, other):
        other = self._lift(other)
        value = self.value / other.value
        margin = np.abs(other.value) - other.err  # how far the divisor stays from 0
        with np.errstate(divide="ignore", invalid="ignore"):
            err = np.where(margin > 0, (self.err + np.abs(value) * other.err) / margin, np.inf)
        return self._rounded(value, err, other)

    def __rtruediv__(self, other):
        return self._lift(other) / self

    def __pow__(self, exponent):
        exponent = float(exponent.value if isinstance(exponent, Bounded) else exponent)
        if exponent == 1:
            return self
        if exponent == 2:  # x ** 2 is x * x in torch and numpy: correctly rounded
            return self * self
        value = self.value**exponent
        return self._rounded(value, self._relative_image(lambda r: r**exponent, value), transcendental=True)

    def _relative_image(self, fn, value):
        """|f(x (1 +- r)) - f(x)| for f homogeneous (f(x (1 + r)) = f(x) fn(1 + r)), r = err / |x|."""
        with np.errstate(divide="ignore", invalid="ignore"):
            r = self.err / np.abs(self.value)
            spread = np.maximum(np.abs(fn(1 + r) - 1), np.abs(fn(np.maximum(1 - r, 0)) - 1))
            return np.where(r < 1, np.abs(value) * spread, np.inf)

    def log(self):
        value = np.log(self.value)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = self.err / np.abs(self.value)
            err = np.where(r < 1, -np.log1p(-np.minimum(r, 1.0)), np.inf)  # |log(x (1 - r)) - log x| >= the + side
        return self._rounded(value, err, transcendental=True)

    def exp(self):
        value = np.exp(self.value)
        return self._rounded(value, np.abs(value) * np.expm1(self.err), transcendental=True)

    def sqrt(self):
        return self**0.5

    def clip(self, low, high, out=None, **kwargs):
        """Clipping moves no two values further apart."""
        return Bounded(np.clip(self.value, low, high), self.err, self.sides, self.identical)

    # numpy: ndarray (op) Bounded, np.log(Bounded), ... come here
    _UFUNCS = {
        np.add: lambda a, b: a + b,
        np.subtract: lambda a, b: a - b,
        np.multiply: lambda a, b: a * b,
        np.true_divide: lambda a, b: a / b,
        np.power: lambda a, b: a**b,
        np.negative: lambda a: -a,
        np.log: lambda a: a.log(),
        np.exp: lambda a: a.exp(),
        np.sqrt: lambda a: a.sqrt(),
    }

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        op = self._UFUNCS.get(ufunc)
        if method != "__call__" or kwargs or op is None:
            return NotImplemented
        return op(*(self._lift(x) for x in inputs))


def bounded_array(values: np.ndarray, errs: np.ndarray, sides: int = 2) -> np.ndarray:
    """An object array of `Bounded` scalars: what a scheduler indexes (`self.sigmas[i]`) in the shadow."""
    out = np.empty(len(values), dtype=object)
    for i, (value, err) in enumerate(zip(values, errs)):
        out[i] = Bounded(value, err, sides)
    return out


def _discrepancy(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """|ours - ref| elementwise; entries non-finite on both sides (NaN from 0/0 at the end of a schedule) are 0."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.abs(ours - ref)
    both_nonfinite = ~np.isfinite(ours) & ~np.isfinite(ref)
    return np.where(both_nonfinite, 0.0, diff)


# ---- 1. reference values that float32 leaves ill-defined -----------------------------------------------------------
# The ancestral samplers split the move to the next noise level into a deterministic part and fresh noise, and
# diffusers computes the deterministic part's size as the square root of a difference: sqrt(sigma_next^2 - sigma_up^2)
# (Euler ancestral, KDPM2 ancestral), sqrt(1 - a_prev - std_dev^2) (DDIM, whose eta = 1 is the same split in
# variance-preserving form). Where the noise takes nearly all of it, the difference cancels all but 1 / kappa of its
# minuend, kappa = (sigma / sigma_next)^2 (VE sigmas; with eta = 1 exactly, less with a smaller eta), and its float32
# rounding grows by kappa. diffship evaluates the exact closed forms instead; the test checks diffusers' value against
# that exact value within its rounding bound and gives diffusers the exact value to run on.
class ReferenceCheckFailed(AssertionError):
    """diffusers' own value outside its rounding bound (or no longer computed as analysed), found while diffusers
    runs: a failure of the test, which the harness must not take for diffusers refusing the case."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ReferenceCheckFailed(message)


def _ancestral_sigma_down(sigma: Bounded, sigma_next: Bounded) -> Bounded:
    """diffusers' split of an ancestral step, op for op (float32 torch tensors), in
    KDPM2AncestralDiscreteScheduler.set_timesteps and EulerAncestralDiscreteScheduler.step alike:
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    Exact value: sigma_next^2 / sigma."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    return (sigma_next**2 - sigma_up**2) ** 0.5


def _ddim_direction_root(alpha_prod_t: Bounded, alpha_prod_t_prev: Bounded, eta: float) -> Bounded:
    """diffusers' DDIMScheduler.step, op for op: the coefficient of pred_epsilon,
        variance = ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = eta * variance ** 0.5
        (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5
    Exact value: the root of (1 - a_prev) ((1 - eta^2) + eta^2 a_t (1 - a_prev) / (a_prev (1 - a_t)))."""
    variance = ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance**0.5
    return (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5


def _ill_defined(computed: Bounded, exact: float, rtol: float) -> tuple[float, float] | None:
    """(exact, the bound of diffusers' float32 value `computed`) where that bound exceeds `rtol` of the value; None
    where diffusers' value is determined to `rtol`."""
    bound = float(computed.err)
    return None if bound <= rtol * exact else (exact, bound)


def _ill_defined_sigma_downs(sigmas: np.ndarray, sigma_rtol: float):
    """(i, exact sigma_down, bound on diffusers' value) for each step sigmas[i] -> sigmas[i + 1] where diffusers'
    sigma_down is not determined to `sigma_rtol`."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma_next == 0:  # sigma_up = sigma_down = 0 exactly: nothing ill-conditioned
            continue
        computed = _ancestral_sigma_down(Bounded(sigma, sides=1), Bounded(sigma_next, sides=1))
        found = _ill_defined(computed, sigma_next**2 / sigma, sigma_rtol)
        if found is not None:
            yield (i, *found)


def _check_reference(ref: float, exact: float, bound: float, what: str) -> None:
    """diffusers' float32 value within its rounding bound of the exact value. Where the bound reaches the value
    itself (infinite: the float32 difference under the root may round to a negative number), any value, NaN
    included, is what diffusers' formula can give."""
    _require(
        (not np.isfinite(bound) and not np.isfinite(ref)) or abs(ref - exact) <= bound,
        f"diffusers' {what} = {ref} is {abs(ref - exact):.3g} from the exact "
        f"{exact:.8g}, beyond its float32 rounding bound {bound:.3g}",
    )


def _override_root_in_step(scheduler, find, what: str) -> None:
    """Wrap a diffusers scheduler instance's `step` so that, in a call for which `find(arguments)` (the call's
    arguments by name, defaults applied) gives (exact, bound, minuend), diffusers' `(minuend - x) ** 0.5` is checked
    against `exact` within `bound` and replaced by `exact`; the rest of the step is diffusers' own. The value is found
    as it is made, by a torch function mode: the 0-d subtraction whose minuend equals `minuend`, then the power of
    its result."""
    import torch  # the reference side only: this module is otherwise backend-free

    class RootOverride(torch.overrides.TorchFunctionMode):
        def __init__(self, exact, bound, minuend):
            super().__init__()
            self.exact, self.bound, self.minuend = exact, bound, minuend
            self.difference = None  # diffusers' minuend - x, once made
            self.replaced = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            name = getattr(func, "__name__", "")
            first = args[0] if args else None
            if name in ("sub", "__sub__") and isinstance(first, torch.Tensor) and first.ndim == 0:
                if self.difference is None and float(first) == self.minuend:
                    self.difference = result
            elif name in ("pow", "__pow__") and self.difference is not None and first is self.difference:
                _check_reference(float(result), self.exact, self.bound, what)
                self.difference = None
                self.replaced += 1
                return torch.full_like(result, float(np.float32(self.exact)))
            return result

    original_step = scheduler.step
    signature = inspect.signature(original_step)

    @functools.wraps(original_step)  # the same signature: the harness asks it whether `generator` is taken
    def step(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        target = find(call.arguments)
        if target is None:
            return original_step(*args, **kwargs)
        override = RootOverride(*target)
        with override:
            out = original_step(*args, **kwargs)
        _require(
            override.replaced == 1,
            f"diffusers' {type(scheduler).__name__}.step at t = {float(call.arguments['timestep'])}: {what} found "
            f"{override.replaced} times, not once: its formula changed (see bounds.REFERENCE_FIXES)",
        )
        return out

    scheduler.step = step


def _torch_lerp_half(start: Bounded, end: Bounded) -> Bounded:
    """torch.lerp(start, end, 0.5): end - (end - start) * 0.5 (torch's formula for weights >= 0.5)."""
    return end - (end - start) * 0.5


def fix_kdpm2_ancestral(scheduler, sigma_rtol: float) -> None:
    """Where diffusers' float32 sigma_down is not determined to `sigma_rtol`, check it (and the interpolated sigma
    and timestep derived from it) against the exact value within its rounding bound, then put the exact values in."""
    doubled = scheduler.sigmas.numpy().astype(np.float64)
    base = np.concatenate([doubled[:1], doubled[1::2]])  # sigma_0 .. sigma_n (= 0), un-doubled
    log_sigmas = scheduler.log_sigmas.numpy()
    for i, exact_down, bound in _ill_defined_sigma_downs(base, sigma_rtol):
        sigma, sigma_next = base[i], base[i + 1]
        positions = [0] if i == 0 else [2 * i - 1, 2 * i]
        _check_reference(scheduler.sigmas_down.numpy()[positions[0]], exact_down, bound, f"sigma_down[{i}]")
        interpol = _torch_lerp_half(Bounded(sigma, sides=1).log(), Bounded(exact_down, bound, sides=1).log()).exp()
        exact_interpol = np.float32(sigma_next)  # exp of the log-midpoint of sigma and sigma_next^2 / sigma
        if i + 1 < len(base) - 1:  # the interpolated timestep of interval i sits at 2 i + 1 (none for the last)
            ref_t = float(scheduler.timesteps[2 * i + 1])
            if np.isfinite(interpol.err) and interpol.err < interpol.value:
                low, high = (scheduler._sigma_to_t(np.array(s), log_sigmas) for s in (
                    interpol.value - interpol.err, interpol.value + interpol.err))
                _require(
                    low - 1e-6 <= ref_t <= high + 1e-6,  # 1e-6: float64 rounding of the interval's ends
                    f"diffusers' interpolated timestep {ref_t} outside [{low}, {high}], where its sigma may lie",
                )
            scheduler.timesteps[2 * i + 1] = float(scheduler._sigma_to_t(np.array(exact_interpol), log_sigmas))
        for p in positions:
            scheduler.sigmas_down[p] = float(np.float32(exact_down))
            scheduler.sigmas_interpol[p] = float(exact_interpol)


def fix_euler_ancestral(scheduler, sigma_rtol: float) -> None:
    """EulerAncestralDiscreteScheduler computes sigma_down in `step`, from sigmas[i] and sigmas[i + 1] (the step at
    timesteps[i]); where it is not determined to `sigma_rtol`, check and replace it there."""
    ill = {  # timestep -> (exact sigma_down, bound on diffusers' value, diffusers' minuend sigma_to**2)
        float(scheduler.timesteps[i]): (exact_down, bound, float(scheduler.sigmas[i + 1] ** 2))
        for i, exact_down, bound in _ill_defined_sigma_downs(scheduler.sigmas.numpy().astype(np.float64), sigma_rtol)
    }
    if ill:
        find = lambda arguments: ill.get(float(arguments["timestep"]))  # noqa: E731
        _override_root_in_step(scheduler, find, "sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5")


def fix_ddim(scheduler, sigma_rtol: float) -> None:
    """DDIMScheduler computes the coefficient of pred_epsilon in `step`, from the timestep and the step's eta; where
    it is not determined to `sigma_rtol` (eta near 1), check and replace it there."""
    alphas_cumprod = scheduler.alphas_cumprod

    def find(arguments):
        timestep, eta = int(arguments["timestep"]), float(arguments["eta"])
        if eta == 0:  # std_dev_t = 0 exactly: the root of 1 - a_prev, well conditioned
            return None
        prev = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps  # as diffusers' step
        a_t = alphas_cumprod[timestep]
        a_prev = alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        at, ap = float(a_t), float(a_prev)
        if ap == 1:  # the last step, to final_alpha_cumprod = 1: 0 exactly
            return None
        exact = np.sqrt((1 - ap) * ((1 - eta**2) + eta**2 * at * (1 - ap) / (ap * (1 - at))))
        found = _ill_defined(_ddim_direction_root(Bounded(at, sides=1), Bounded(ap, sides=1), eta), exact, sigma_rtol)
        return None if found is None else (*found, float(1 - a_prev))

    _override_root_in_step(scheduler, find, "(1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5")


REFERENCE_FIXES = {
    "KDPM2AncestralDiscreteScheduler": fix_kdpm2_ancestral,
    "EulerAncestralDiscreteScheduler": fix_euler_ancestral,
    "DDIMScheduler": fix_ddim,
}


def fix_reference_schedule(class_name: str, scheduler, sigma_rtol: float) -> None:
    """Right after diffusers' set_timesteps: fix its ill-defined schedule values, or wrap its step to fix those the
    step computes."""
    fix = REFERENCE_FIXES.get(class_name)
    if fix is not None:
        fix(scheduler, sigma_rtol)


# ---- 2. per-step discrepancy bounds, through a shadow of diffship's scheduler ---------------------------------------
# The schedule arrays a shadow reads as Bounded (each entry carrying its measured diffship-vs-diffusers difference).
SCHEDULE_ARRAYS = ("sigmas", "sigmas_interpol", "sigmas_down", "sigmas_up")
ANALYZED = {
    "HeunDiscreteScheduler": "heun_discrete",
    "KDPM2DiscreteScheduler": "k_dpm_2_discrete",
    "KDPM2AncestralDiscreteScheduler": "k_dpm_2_ancestral_discrete",
}


class _ShadowNoise:
    """Hands the shadow the draw the real step just took, as an exact (err 0) Bounded."""

    def __init__(self):
        self.last = None

    def wrap(self, generator):
        outer = self

        class Recording:
            def randn(self, shape, dtype):
                draw = generator.randn(shape, dtype)
                outer.last = np.array(draw, dtype=np.float32)
                return draw

        return Recording()

    def randn(self, shape, generator=None, dtype=np.float32):
        return Bounded(self.last, 0.0)  # replayed: the very same draw on both sides


class StepBounds:
    """Runs a shadow of diffship's scheduler beside the real one and records, per model call, the bound on the
    discrepancy the step adds to prev_sample (the largest over the tensor). The shadow's schedule entries carry
    their measured diffship-vs-diffusers difference; its sample and model output carry none (what earlier steps
    left is carried separately), but are not identical on the two sides, so every operation on them rounds."""

    def __init__(self, class_name: str, scheduler, ref_schedule: dict[str, np.ndarray]):
        self.module = importlib.import_module(f"diffship.schedulers.{ANALYZED[class_name]}")
        self.shadow = copy.deepcopy(scheduler)
        for name in SCHEDULE_ARRAYS:
            ours = getattr(scheduler, name, None)
            if ours is None or name not in ref_schedule:
                continue
            ours = np.asarray(ours)
            setattr(self.shadow, name, bounded_array(ours, _discrepancy(ours, ref_schedule[name])))
        self.sample_errs: list[float] = []
        self.noise = _ShadowNoise()
        original_step = scheduler.step

        @functools.wraps(original_step)  # the same signature: the harness asks it whether `generator` is taken
        def step(model_output, timestep, sample, *args, **kwargs):
            if "generator" in kwargs and kwargs["generator"] is not None:
                kwargs["generator"] = self.noise.wrap(kwargs["generator"])
            out = original_step(model_output, timestep, sample, *args, **kwargs)
            self._shadow_step(model_output, timestep, sample, kwargs)
            return out

        scheduler.step = step

    @contextlib.contextmanager
    def _shadow_noise(self):
        """The scheduler module's `randn`, for the shadow: the real step's draw, as a Bounded."""
        if not hasattr(self.module, "randn"):
            yield
            return
        original = self.module.randn
        self.module.randn = self.noise.randn
        try:
            yield
        finally:
            self.module.randn = original

    def _shadow_step(self, model_output, timestep, sample, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k != "generator"}
        with self._shadow_noise(), np.errstate(all="ignore"):
            out = self.shadow.step(
                Bounded(model_output, identical=False), timestep, Bounded(sample, identical=False), **kwargs
            )
        self.sample_errs.append(_largest(out.prev_sample))


def _largest(x) -> float:
    if not isinstance(x, Bounded):
        return 0.0
    err = x.err[np.isfinite(x.value)] if x.value.ndim else x.err
    return float(np.max(err, initial=0.0))


def step_bounds_for(class_name: str, scheduler, ref_schedule: dict[str, np.ndarray]) -> StepBounds | None:
    return StepBounds(class_name, scheduler, ref_schedule) if class_name in ANALYZED else None


# ---- 3. scalar step coefficients (DEIS) ----------------------------------------------------------------------------
# A DEIS step is linear in its tensors: x_t = A x_s + sum_q C_q m_q (m_0 the newest eps). Its scalar coefficients
# are where float32 is ill-conditioned: the 2nd / 3rd-order ones are differences of nearly equal closed-form
# integrals (log-rho polynomials of magnitude ~100-1000 over (log rho_b - log rho_c)(log rho_b - log rho_d)), so that
# a last-bit change of a sigma or a log moves a 3rd-order coefficient by ~1e-4 of itself; and with flow sigmas the
# first step's A = alpha_t / alpha_s is 300 (4 steps) to 750 (2 steps), A x_s cancelled by C m_0 to a result that
# much smaller. The worst-case float32 bound of a 3rd-order coefficient at 50 Karras steps is of the order of the
# coefficient itself -- far above what the libraries' values differ by (both evaluate the same formula with the
# same float32 operations on inputs an ulp apart) and useless for catching a wrong coefficient. So the test splits
# what is well defined from what is not, reading both libraries' coefficients off their own update method (one-hot
# probes):
#   - the formula: both methods evaluated in float64 at the same sigmas (diffusers') must agree to the float64
#     rounding bound (the running error bound at float64's unit roundoff) -- this is what catches a wrong
#     coefficient;
#   - the float32 values: their difference, checked against its worst-case float32 bound, is ill-defined, and the
#     step may add exactly its effect |dA| |x_s| + sum_q |dC_q| |m_q|, plus the float32 rounding of the step's sum
#     of products (which matters where the terms cancel, as in the first flow step).
PROBED_UPDATES = {
    "DEISMultistepScheduler": (
        "deis_first_order_update",
        "multistep_deis_second_order_update",
        "multistep_deis_third_order_update",
    ),
}
FLOAT64_PER_FLOAT32_ROUNDOFF = 2.0**-29  # float64's unit roundoff over float32's: a first-order bound scales with it


class CoefficientRecord:
    """One update call: its float32 coefficients [A, C_0, C_1, ...] (m_0 the newest model output) and the float64
    ones at the reference's sigmas, the tensors it was called with (newest output first; None for an unused slot),
    and on diffship's side the bounds on the float32 and float64 coefficients' differences from diffusers'."""

    def __init__(self, method, coefficients, exact, sample, outputs):
        self.method = method
        self.coefficients = coefficients
        self.exact = exact
        self.sample = sample
        self.outputs = outputs
        self.bound = np.zeros_like(coefficients)
        self.exact_bound = np.zeros_like(coefficients)


class Backend:
    """What the probes need of a library: arrays to its tensors and back, and its scheduler's sigmas as float64."""

    def __init__(self, to_backend, to_numpy):
        self.to_backend = to_backend
        self.to_numpy = to_numpy


NUMPY = Backend(np.asarray, np.asarray)


def record_coefficients(class_name, scheduler, backend: Backend, exact_sigmas, ref_records=None, ref_sigmas=None):
    """Wrap the scheduler instance's update methods so that each call also records its coefficients: one-hot probes
    through the same method, in float32 as run and in float64 at `exact_sigmas`. On diffship's side (`ref_records`,
    `ref_sigmas`: diffusers' run), also the bounds on their differences from diffusers', where they differ at all."""
    names = PROBED_UPDATES.get(class_name)
    if names is None:
        return None
    records: list[CoefficientRecord] = []
    for name in names:
        original = getattr(scheduler, name)

        @functools.wraps(original)
        def wrapped(first, *args, sample=None, _original=original, _name=name, **kwargs):
            result = _original(first, *args, sample=sample, **kwargs)
            is_list = isinstance(first, (list, tuple))
            outputs = list(first) if is_list else [first]
            n = len(outputs)

            def probe(dtype):
                eye = np.eye(1 + n, dtype=dtype)
                # list position p (oldest first) is the (n - 1 - p)-th newest: its coefficient lands at 1 + n - 1 - p
                probes = [backend.to_backend(eye[n - p]) for p in range(n)]
                out = _original(probes if is_list else probes[0], *args, sample=backend.to_backend(eye[0]), **kwargs)
                return np.asarray(backend.to_numpy(out), dtype=np.float64)

            coefficients = probe(np.float32)
            sigmas = scheduler.sigmas
            scheduler.sigmas = backend.to_backend(np.asarray(exact_sigmas, dtype=np.float64))
            try:
                exact = probe(np.float64)
            finally:
                scheduler.sigmas = sigmas
            record = CoefficientRecord(
                _name, coefficients, exact, backend.to_numpy(sample),
                [None if o is None else backend.to_numpy(o) for o in reversed(outputs)],
            )
            ref = ref_records[len(records)] if ref_records is not None and len(records) < len(ref_records) else None
            if ref is not None and ref.method == _name:
                if not np.array_equal(coefficients, ref.coefficients):
                    record.bound = _coefficient_bound(scheduler, _name, n, is_list, sigmas, ref_sigmas)
                if not np.array_equal(exact, ref.exact):
                    at = np.asarray(exact_sigmas, dtype=np.float64)
                    bound32 = _coefficient_bound(scheduler, _name, n, is_list, at, at)
                    record.exact_bound = bound32 * FLOAT64_PER_FLOAT32_ROUNDOFF
            records.append(record)
            return result

        setattr(scheduler, name, wrapped)
    return records


def _coefficient_bound(scheduler, name, n, is_list, sigmas, ref_sigmas):
    """Worst-case bound on each coefficient's difference between the two libraries: one-hot probes through
    diffship's method in Bounded arithmetic, at `sigmas`, each carrying its difference from `ref_sigmas`."""
    method = getattr(type(scheduler), name)
    saved = scheduler.sigmas
    scheduler.sigmas = bounded_array(np.asarray(sigmas), _discrepancy(sigmas, ref_sigmas))
    eye = np.eye(1 + n)
    probes = [Bounded(eye[n - p]) for p in range(n)]
    try:
        with np.errstate(all="ignore"):
            out = method(scheduler, probes if is_list else probes[0], sample=Bounded(eye[0]))
    finally:
        scheduler.sigmas = saved
    return np.asarray(out.err, dtype=np.float64)


def coefficient_discrepancies(ours: list, ref: list, what: str) -> list[tuple[float, float]]:
    """Per update call: check the float64 coefficients (the formula) and the float32 ones (its rounding) against
    their bounds, and return what the step may add to the discrepancy (max over the tensor) as (measured, bound):

        measured = sum_i |dc_i| |v_i|,   bound = (n + 2) eps sum_i |c_i| |v_i|,   v = (x_s, m_0, m_1, ...), n = len(v)

    the exact effect of the float32 coefficients' difference, and the rounding of forming the sum of n products in
    float32 (each side at most (n + 2) u sum |terms|: Higham, eq. 3.5, and the final scaling by alpha_t), which
    exceeds RTOL only where the terms cancel."""
    assert len(ours) == len(ref), f"{what}: {len(ours)} update calls vs diffusers' {len(ref)}"
    effects = []
    for k, (a, b) in enumerate(zip(ours, ref)):
        assert a.method == b.method, f"{what}: step {k} uses {a.method}, diffusers {b.method}"
        exact_diff = np.abs(a.exact - b.exact)
        assert np.all(exact_diff <= a.exact_bound * (1 + 1e-6)), (  # 1e-6: the float64 evaluation of the bound
            f"{what}: step {k} ({a.method}) in float64 at the same sigmas: {a.exact} vs diffusers' {b.exact}, "
            f"difference {exact_diff} beyond the float64 rounding bound {a.exact_bound}"
        )
        diff = np.abs(a.coefficients - b.coefficients)
        assert np.all(diff <= a.bound * (1 + 1e-6)), (
            f"{what}: step {k} ({a.method}) float32 coefficients {a.coefficients} vs diffusers' {b.coefficients}: "
            f"difference {diff} beyond the float32 rounding bound {a.bound}"
        )
        inputs = [a.sample] + list(a.outputs)
        used = [(i, np.abs(v.astype(np.float64))) for i, v in enumerate(inputs) if v is not None]
        effect = sum(diff[i] * v for i, v in used)
        terms = sum(abs(a.coefficients[i]) * v for i, v in used)
        effects.append((float(np.max(effect)), float(np.max((len(used) + 2) * EPS * terms))))
    return effects
