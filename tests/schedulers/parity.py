"""Run a denoising trajectory through a diffusers scheduler and through diffship's, and compare them.

Both sides see the same stand-in model (a fixed linear function of sample and timestep, in float32 numpy: a noise
prediction, or a velocity for the schedulers of flow-matching models, `flow_stand_in_model`), the
same initial latents and the same step noise: diffusers' draws are recorded by wrapping the `randn_tensor` its
scheduler module calls, and replayed to diffship through the noise hook (an object with `randn(shape, dtype)`).
Each side's model sees that side's own samples, so the trajectories are independent computations.

Float type: float32 everywhere (latents, model outputs, scheduler state), as diffusers runs on CPU.
Tolerance: every intermediate sample and model input agrees with diffusers' to RTOL relative, elementwise, with an
absolute floor of RTOL times the tensor's largest magnitude (so elements crossing zero are not infinitely off), plus,
after a step that is ill-conditioned in float32, the bound on what that step adds, computed by `bounds.py` from
float32's roundoff and the step's own operations and values. Where a value diffusers computes (in its schedule or
its step) is ill-defined in float32, the test checks it within its rounding bound and runs diffusers from the exact
value (`bounds.py`, 1.).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import torch

import diffusers
import diffship.schedulers as ds

from . import bounds

SHAPE = (2, 4, 8, 8)
# 1e-5 = 84 float32 ulps (eps = 2^-23) of the tensor's scale. The two libraries run the same elementwise float32
# operations, correctly rounded and so identical on identical inputs; they differ only where a schedule value or a
# transcendental (log, exp, sqrt) is rounded differently, by at most 2 ulp (SIGMA_RTOL's measure) resp. 4 ulp
# (bounds.TRANSCENDENTAL_ULPS) per side. A well-conditioned trajectory meets a handful of such values per step and
# carries their effect forward without growing it: 2 sides x 4 ulp x ~10 such values = 80 ulp. A step that is not
# well conditioned gets its own computed bound (bounds.StepBounds) on top.
RTOL = 1e-5
# pred_original_sample is compared at 1e-4: x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) amplifies the float32
# rounding of x_t by up to 1 / sqrt(a_t) (~150x near t = T), in diffusers as much as here.
PRED_X0_RTOL = 1e-4
# sigmas and float timesteps: torch's float32 linspace (betas) differs from the correctly rounded one in the last
# bit for about a third of the entries; schedules built from betas inherit that, and rescale_betas_zero_snr
# amplifies it to ~1e-6.
SIGMA_RTOL = 1e-5

_PATTERN = np.random.default_rng(1234).standard_normal(SHAPE).astype(np.float32)
_INIT_NOISE = np.random.default_rng(5678).standard_normal(SHAPE).astype(np.float32)
_IMAGE_LATENTS = np.random.default_rng(91011).standard_normal(SHAPE).astype(np.float32) * np.float32(0.8)


def stand_in_model(sample: np.ndarray, timestep: float) -> np.ndarray:
    """A deterministic stand-in for a UNet: a fixed linear function of the (scaled) sample and the timestep."""
    return np.float32(0.5) * sample + np.float32(0.1 + float(timestep) / 1000.0) * _PATTERN


def flow_stand_in_model(sample: np.ndarray, timestep: float) -> np.ndarray:
    """A deterministic stand-in for a flow-matching transformer: a velocity v = noise - x_0 (x_sigma = (1 - sigma)
    x_0 + sigma noise), with the sample itself as the noise estimate and a fixed pattern, weighted by the timestep
    (sigma * 1000), as x_0. Euler steps towards sigma = 0 pull the sample towards the pattern, as a real model's
    would towards its image; nothing divides by sigma, so schedules that reach sigma = 0 (invert_sigmas) stay finite."""
    return sample - np.float32(0.8 - 0.2 * float(timestep) / 1000.0) * _PATTERN


def is_flow_matching(class_name: str) -> bool:
    """diffusers' FlowMatch* classes: no scale_model_input / init_noise_sigma / add_noise; img2img uses scale_noise."""
    return class_name in ds.registry.FLOW_MATCHING


@dataclass
class Trajectory:
    timesteps: np.ndarray
    sigmas: np.ndarray | None
    init_noise_sigma: float | None  # None: the scheduler has none (flow matching: the latents are plain noise)
    schedule: dict[str, np.ndarray] = field(default_factory=dict)  # sigmas_interpol, sigmas_down, ... where present
    coefficients: list | None = None  # per update call, where bounds.PROBED_UPDATES reads them
    model_inputs: list[np.ndarray] = field(default_factory=list)
    samples: list[np.ndarray] = field(default_factory=list)
    pred_original_samples: list[np.ndarray] = field(default_factory=list)


@dataclass
class Case:
    """One run: a scheduler class, config overrides, step count, and how set_timesteps / step are called."""

    class_name: str
    config: dict[str, Any]
    steps: int
    set_kwargs: Callable[[int], dict] | None = None  # steps -> kwargs replacing num_inference_steps
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    strength: float | None = None  # img2img: start part-way, as diffusers' img2img pipelines do
    learned_variance: bool = False  # the model also outputs a variance channel per channel (DDPM "learned*")


def _model_output(case: Case, model_input: np.ndarray, timestep: float) -> np.ndarray:
    # a velocity for the schedulers that drive a flow-matching model (also DPM++ / UniPC / DEIS configured for flow)
    if ds.scheduler_kind({"_class_name": case.class_name, **case.config}) == ds.FLOW:
        return flow_stand_in_model(model_input, timestep)
    out = stand_in_model(model_input, timestep)
    if case.learned_variance:  # a second half of channels: DDPM's "learned" variance, or learned_range's weight
        if case.config.get("variance_type") == "learned":
            # a variance, so positive and away from 0: the step takes its square root, which near 0 would turn a
            # last-bit difference into any size (and a sign flip into NaN on one side only)
            variance = np.float32(0.5) + np.float32(0.25) * np.tanh(out)
        else:
            variance = np.tanh(out)  # the interpolation weight of learned_range, in [-1, 1]
        out = np.concatenate([out, variance], axis=1)
    return out


def _instantiate(config: dict, lib_classes) -> dict:
    """`solver_p` names a scheduler class; each side gets an instance of its own library's class."""
    if isinstance(config.get("solver_p"), str):
        return {**config, "solver_p": lib_classes(config["solver_p"])()}
    return config


class NoiseRecorder:
    """Wraps the `randn_tensor` a diffusers scheduler module uses and keeps a numpy copy of every draw."""

    def __init__(self):
        self.draws: list[np.ndarray] = []

    @contextlib.contextmanager
    def patch(self, module):
        original = getattr(module, "randn_tensor", None)
        if original is None:
            yield
            return

        def recording_randn_tensor(*args, **kwargs):
            tensor = original(*args, **kwargs)
            self.draws.append(tensor.detach().cpu().numpy().copy())
            return tensor

        module.randn_tensor = recording_randn_tensor
        try:
            yield
        finally:
            module.randn_tensor = original


class ReplayGenerator:
    """A stand-in generator for diffship: hands out diffusers' recorded noise, in order, through the hook."""

    def __init__(self, draws: list[np.ndarray]):
        self.draws = list(draws)
        self.used = 0

    def randn(self, shape, dtype):
        assert self.used < len(self.draws), "diffship drew more noise than diffusers did"
        draw = self.draws[self.used]
        assert tuple(draw.shape) == tuple(shape), f"noise draw {self.used}: shape {shape} vs diffusers' {draw.shape}"
        self.used += 1
        return draw.astype(dtype)


def _timesteps_for(scheduler, case: Case):
    """The timesteps the loop runs: all, or from t_start on as diffusers' img2img pipelines do."""
    timesteps = scheduler.timesteps
    if case.strength is None:
        return timesteps
    n = case.steps
    if is_flow_matching(case.class_name):  # SD3's / Flux's img2img get_timesteps
        t_start = int(max(n - min(n * case.strength, n), 0))
    else:
        t_start = max(n - int(n * case.strength), 0)
    timesteps = timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps


def _initial_sample(scheduler, case: Case, timesteps, to_lib, batch_timestep):
    """The loop's first latents as the pipelines make them: noise (times init_noise_sigma where the scheduler has
    one), or for img2img the image latents noised to the first timestep (add_noise; scale_noise for flow)."""
    noise, image = to_lib(_INIT_NOISE.copy()), to_lib(_IMAGE_LATENTS.copy())
    if case.strength is None:
        return noise if is_flow_matching(case.class_name) else noise * scheduler.init_noise_sigma
    latent_timestep = batch_timestep(timesteps[:1], SHAPE[0])
    if is_flow_matching(case.class_name):
        return scheduler.scale_noise(image, latent_timestep, noise)
    return scheduler.add_noise(image, noise, latent_timestep)


def _scale_model_input(scheduler, sample, t):
    return scheduler.scale_model_input(sample, t) if hasattr(scheduler, "scale_model_input") else sample


def _init_noise_sigma(scheduler) -> float | None:
    return float(scheduler.init_noise_sigma) if hasattr(scheduler, "init_noise_sigma") else None


def _set_timesteps(scheduler, case: Case):
    if case.set_kwargs is not None:
        scheduler.set_timesteps(**case.set_kwargs(case.steps))
    else:
        scheduler.set_timesteps(case.steps)


def _schedule_arrays(scheduler, to_numpy) -> dict[str, np.ndarray]:
    return {
        name: to_numpy(getattr(scheduler, name)).copy()
        for name in bounds.SCHEDULE_ARRAYS
        if getattr(scheduler, name, None) is not None
    }


def _accepts(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def diffusers_trajectory(case: Case) -> tuple[Trajectory, list[np.ndarray]]:
    cls = getattr(diffusers, case.class_name)
    scheduler = cls(**_instantiate(case.config, lambda name: getattr(diffusers, name)))
    recorder = NoiseRecorder()
    module = inspect.getmodule(cls)
    with recorder.patch(module):
        _set_timesteps(scheduler, case)
        bounds.fix_reference_schedule(case.class_name, scheduler, SIGMA_RTOL)
        timesteps = _timesteps_for(scheduler, case)
        traj = Trajectory(
            timesteps=scheduler.timesteps.numpy().copy(),
            sigmas=scheduler.sigmas.numpy().copy() if hasattr(scheduler, "sigmas") else None,
            init_noise_sigma=_init_noise_sigma(scheduler),
            schedule=_schedule_arrays(scheduler, lambda t: t.numpy()),
        )
        traj.coefficients = bounds.record_coefficients(
            case.class_name,
            scheduler,
            bounds.Backend(torch.from_numpy, lambda t: t.detach().cpu().numpy()),
            exact_sigmas=traj.sigmas,
        )
        sample = _initial_sample(scheduler, case, timesteps, torch.from_numpy, lambda t, n: t.repeat(n))
        traj.samples.append(sample.numpy().copy())
        generator = torch.Generator().manual_seed(0)
        extra = dict(case.step_kwargs)
        if _accepts(scheduler.step, "generator"):
            extra["generator"] = generator
        for t in timesteps:
            model_input = _scale_model_input(scheduler, sample, t)
            traj.model_inputs.append(model_input.numpy().copy())
            model_output = torch.from_numpy(_model_output(case, model_input.numpy(), float(t)))
            out = scheduler.step(model_output, t, sample, **extra)
            sample = out.prev_sample
            traj.samples.append(sample.numpy().copy())
            pred = getattr(out, "pred_original_sample", None)
            if pred is not None:
                traj.pred_original_samples.append(pred.numpy().copy())
    return traj, recorder.draws


def diffship_trajectory(
    case: Case, draws: list[np.ndarray], ref: Trajectory | None = None
) -> tuple[Trajectory, ReplayGenerator, bounds.StepBounds | None]:
    """diffship's run; with the reference run `ref`, also the per-step discrepancy bounds (bounds.StepBounds)."""
    cls = ds.SCHEDULERS[case.class_name]
    scheduler = cls(**_instantiate(case.config, lambda name: ds.SCHEDULERS[name]))
    _set_timesteps(scheduler, case)
    timesteps = _timesteps_for(scheduler, case)
    traj = Trajectory(
        timesteps=np.asarray(scheduler.timesteps).copy(),
        sigmas=np.asarray(scheduler.sigmas).copy() if hasattr(scheduler, "sigmas") else None,
        init_noise_sigma=_init_noise_sigma(scheduler),
        schedule=_schedule_arrays(scheduler, np.asarray),
    )
    step_bounds = None
    if ref is not None and ref.sigmas is not None:
        step_bounds = bounds.step_bounds_for(case.class_name, scheduler, {"sigmas": ref.sigmas, **ref.schedule})
        traj.coefficients = bounds.record_coefficients(
            case.class_name, scheduler, bounds.NUMPY, exact_sigmas=ref.sigmas, ref_records=ref.coefficients,
            ref_sigmas=ref.sigmas,
        )
    sample = _initial_sample(scheduler, case, timesteps, np.asarray, np.repeat)
    traj.samples.append(np.array(sample))
    generator = ReplayGenerator(draws)
    extra = dict(case.step_kwargs)
    if _accepts(scheduler.step, "generator"):
        extra["generator"] = generator
    for t in timesteps:
        model_input = _scale_model_input(scheduler, sample, t)
        traj.model_inputs.append(np.array(model_input))
        model_output = _model_output(case, model_input, float(t))
        out = scheduler.step(model_output, t, sample, **extra)
        sample = out.prev_sample
        assert sample.dtype == np.float32, f"prev_sample dtype {sample.dtype}"
        traj.samples.append(np.array(sample))
        pred = getattr(out, "pred_original_sample", None)
        if pred is not None:
            traj.pred_original_samples.append(np.array(pred))
    return traj, generator, step_bounds


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str, rtol: float = RTOL, extra_atol: float = 0.0) -> None:
    """Elementwise within rtol (|ref| + the tensor's scale), plus `extra_atol`: what ill-conditioned steps before
    this tensor may add (bounds.StepBounds)."""
    ours = np.asarray(ours)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs diffusers' {ref.shape}"
    assert np.all(np.isfinite(ref)) == np.all(np.isfinite(ours)), f"{what}: finiteness differs"
    scale = float(np.max(np.abs(ref[np.isfinite(ref)]), initial=0.0))
    what = f"{what} (computed bound of earlier ill-conditioned steps: {extra_atol:.3g})" if extra_atol else what
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * scale + extra_atol, err_msg=what)


def fresh_discrepancies(
    step_bounds: bounds.StepBounds | None, ours: Trajectory, ref: Trajectory
) -> list[tuple[float, float]] | None:
    """Per model call, what the step may add to the discrepancy, as (measured, bound): the worst-case bound of a
    shadow run (bounds.StepBounds), or the exact effect of its coefficients' difference and the bound on the
    rounding of the step's sum (bounds.PROBED_UPDATES)."""
    if step_bounds is not None:
        return [(0.0, err) for err in step_bounds.sample_errs]
    if ours.coefficients is not None and ref.coefficients is not None:
        return bounds.coefficient_discrepancies(ours.coefficients, ref.coefficients, "step coefficients")
    return None


def carried_bounds(fresh: list[tuple[float, float]] | None, ref: Trajectory, rtol: float):
    """The extra allowance of each compared tensor: the sum of what the steps before it may add.

    A measured effect always counts; a worst-case bound only where it exceeds what `rtol` allows on the sample the
    step produces (an ill-conditioned step): `rtol` covers the rounding of the well-conditioned ones. Model input k
    and pred_original_sample k come before step k's update, sample k + 1 after it."""
    n = len(ref.model_inputs)
    if fresh is None:
        return [0.0] * n, [0.0] * (n + 1), [0.0] * n
    added = []
    for k in range(n):
        after = ref.samples[k + 1]
        scale = float(np.max(np.abs(after[np.isfinite(after)]), initial=0.0))
        measured, bound = fresh[k]
        added.append(measured + (bound if bound > rtol * scale else 0.0))
    before = [float(b) for b in np.concatenate([[0.0], np.cumsum(added)])]  # before[k]: steps 0 .. k-1
    return before[:n], before, before[:n]


def assert_schedules_equal(ours: Trajectory, ref: Trajectory, float_rtol: float = SIGMA_RTOL) -> None:
    """Timesteps exactly (integer) or within float_rtol, with an absolute 1e-4 near t = 0 (a sigma within SIGMA_RTOL
    moves t = sigma_to_t(sigma) by SIGMA_RTOL / (log sigma_1 - log sigma_0) there: 3e-5 for the training
    schedules tested, whose first log-sigma step is >= 0.34); sigmas within SIGMA_RTOL."""
    assert ours.timesteps.dtype == ref.timesteps.dtype, f"timesteps dtype {ours.timesteps.dtype} vs {ref.timesteps.dtype}"
    if np.issubdtype(ref.timesteps.dtype, np.integer):
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps, err_msg="timesteps")
    else:
        np.testing.assert_allclose(ours.timesteps, ref.timesteps, rtol=float_rtol, atol=1e-4, err_msg="timesteps")
    assert (ours.sigmas is None) == (ref.sigmas is None), "one side has sigmas, the other not"
    if ref.sigmas is not None:
        assert ours.sigmas.dtype == ref.sigmas.dtype, f"sigmas dtype {ours.sigmas.dtype} vs {ref.sigmas.dtype}"
        np.testing.assert_allclose(ours.sigmas, ref.sigmas, rtol=SIGMA_RTOL, atol=0, err_msg="sigmas")
    assert sorted(ours.schedule) == sorted(ref.schedule), f"schedule arrays {sorted(ours.schedule)} vs diffusers'"
    for name, values in ref.schedule.items():  # sigmas_interpol, sigmas_down, sigmas_up (equal_nan: 0 / 0 at the end)
        np.testing.assert_allclose(ours.schedule[name], values, rtol=SIGMA_RTOL, atol=0, equal_nan=True, err_msg=name)
    assert (ours.init_noise_sigma is None) == (ref.init_noise_sigma is None), "init_noise_sigma on one side only"
    if ref.init_noise_sigma is not None:
        np.testing.assert_allclose(ours.init_noise_sigma, ref.init_noise_sigma, rtol=SIGMA_RTOL, err_msg="init_noise_sigma")


def _needs_scipy(case: Case) -> bool:
    return case.class_name == "LMSDiscreteScheduler" or bool(case.config.get("use_beta_sigmas"))


def check_case(case: Case) -> str:
    """Run `case` on both sides and assert parity. Returns "refused" when diffusers refuses the combination
    (and asserts diffship refuses it too), else "ok"."""
    rtol = RTOL
    if _needs_scipy(case) and importlib.util.find_spec("scipy") is None:
        # the oracle needs scipy (diffship does not, for LMS): say so rather than report diffusers refusing
        pytest.skip("diffusers' LMSDiscreteScheduler and use_beta_sigmas need scipy; pip install scipy (diffship[test])")
    try:
        ref, draws = diffusers_trajectory(case)
    except bounds.ReferenceCheckFailed:  # the test's own check of diffusers' values, not diffusers refusing
        raise
    except Exception as diffusers_error:  # noqa: BLE001 - whatever diffusers refuses with, diffship must refuse too
        try:
            diffship_trajectory(case, [])
        except Exception:  # noqa: BLE001 - any refusal matches; the kind is diffship's own
            return "refused"
        raise AssertionError(f"diffusers refuses this case ({diffusers_error!r}) but diffship ran it")
    ours, generator, step_bounds = diffship_trajectory(case, draws, ref)
    assert_schedules_equal(ours, ref)
    assert generator.used == len(draws), f"diffship drew noise {generator.used} times, diffusers {len(draws)}"
    assert len(ours.samples) == len(ref.samples), f"{len(ours.samples)} samples vs diffusers' {len(ref.samples)}"
    extra_inputs, extra_samples, extra_x0s = carried_bounds(fresh_discrepancies(step_bounds, ours, ref), ref, rtol)
    for i, (a, b) in enumerate(zip(ours.model_inputs, ref.model_inputs)):
        assert_close(a, b, f"model input {i}", rtol=rtol, extra_atol=extra_inputs[i])
    for i, (a, b) in enumerate(zip(ours.samples, ref.samples)):
        assert_close(a, b, f"sample after step {i} of {len(ref.samples) - 1}", rtol=rtol, extra_atol=extra_samples[i])
    assert len(ours.pred_original_samples) == len(ref.pred_original_samples), "pred_original_sample presence"
    for i, (a, b) in enumerate(zip(ours.pred_original_samples, ref.pred_original_samples)):
        assert_close(a, b, f"pred_original_sample {i}", rtol=max(PRED_X0_RTOL, rtol), extra_atol=extra_x0s[i])
    return "ok"
