"""Euler sampler of a flow-matching (rectified flow) ODE: Stable Diffusion 3 and Flux's scheduler (Esser et al. 2024,
"Scaling Rectified Flow Transformers", https://arxiv.org/abs/2403.03206).

The noisy sample is x_sigma = (1 - sigma) x_0 + sigma noise and the model predicts the velocity
v = dx / dsigma = noise - x_0, so a step is x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v. Timesteps are sigma * 1000.
The sigmas are shifted towards noise (`shift`, or with `use_dynamic_shifting` by `mu` computed from the image size:
`schedules.calculate_shift`). Unlike the noise-prediction schedulers there is no `scale_model_input`,
`init_noise_sigma` or `add_noise`: the model takes the sample as it is, the initial latents are plain noise, and
`scale_noise` is the forward process img2img and inpainting use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .base import Scheduler
from .config import register_to_config
from .noise import randn
from .output import _StepOutput
from .schedules import (
    check_one_sigma_spacing,
    convert_sigmas,
    expand_to,
    shift_sigmas,
    sigma_spacing,
    stretch_shift_to_terminal,
    time_shift,
)

logger = logging.getLogger(__name__)


@dataclass
class FlowMatchEulerDiscreteSchedulerOutput(_StepOutput):
    prev_sample: np.ndarray


def check_float_timestep(timestep, class_name: str) -> None:
    """diffusers refuses integer timesteps here: an index from `enumerate(timesteps)` passed by mistake."""
    if isinstance(timestep, (int, np.integer)) or (
        isinstance(timestep, np.ndarray) and np.issubdtype(timestep.dtype, np.integer)
    ):
        raise ValueError(
            "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
            f" `{class_name}.step()` is not supported. Make sure to pass one of the `scheduler.timesteps` as a timestep."
        )


# A float16 model output times a schedule scalar, as torch (so diffusers) computes it; numpy would promote the
# product to float32. torch gives the tensor's dtype either way, but rounds the scalar to float16 first when it is
# the left operand (`dt * model_output`) and multiplies in float32 when it is the right one (`model_output * sigma`).
# For float32 outputs both are the plain float32 product; an array `value` (per-token sigmas) promotes as in numpy.
def scalar_times(value, array: np.ndarray) -> np.ndarray:
    return (array.dtype.type(value) if np.ndim(value) == 0 else value) * array


def times_scalar(array: np.ndarray, value) -> np.ndarray:
    if np.ndim(value) > 0:
        return array * value
    if array.dtype == np.float16:
        return (array.astype(np.float32) * np.float32(value)).astype(np.float16)
    return array * array.dtype.type(value)


class FlowMatchEulerDiscreteScheduler(Scheduler):
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ):
        check_one_sigma_spacing(self.config)
        if time_shift_type not in {"exponential", "linear"}:
            raise ValueError("`time_shift_type` must either be 'exponential' or 'linear'.")

        # the training schedule: t = 1000 .. 1, sigma = t / 1000 (shifted unless the shift comes per image, with mu)
        timesteps = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        sigmas = timesteps / num_train_timesteps
        if not use_dynamic_shifting:
            sigmas = shift_sigmas(shift, sigmas)
        self.timesteps = sigmas * num_train_timesteps
        self.sigmas = sigmas
        self.sigma_min = float(sigmas[-1])
        self.sigma_max = float(sigmas[0])
        self.num_inference_steps = None
        self._shift = shift
        self._step_index = None
        self._begin_index = None

    @property
    def shift(self) -> float:
        """The shift set_timesteps applies (the config's, until set_shift changes it)."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = shift

    # ---- schedule -----------------------------------------------------------------------------------------
    def _sigma_to_t(self, sigma):
        return sigma * self.config.num_train_timesteps

    def time_shift(self, mu: float, sigma: float, t):
        return time_shift(self.config.time_shift_type, mu, sigma, t)

    def stretch_shift_to_terminal(self, t):
        return stretch_shift_to_terminal(t, self.config.shift_terminal)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device=None,
        sigmas=None,
        mu: float | None = None,
        timesteps=None,
    ) -> None:
        """The inference schedule: `num_inference_steps` evenly spaced sigmas from sigma_max to sigma_min, or the
        `sigmas` / `timesteps` given; then shifted (by `shift`, or by `mu` with use_dynamic_shifting), stretched
        to shift_terminal, respaced (Karras / exponential / beta), and ended with sigma 0 (1 if invert_sigmas)."""
        config = self.config
        if config.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("`sigmas` and `timesteps` should have the same length")
        if num_inference_steps is not None:
            if (sigmas is not None and len(sigmas) != num_inference_steps) or (
                timesteps is not None and len(timesteps) != num_inference_steps
            ):
                raise ValueError(
                    "`sigmas` and `timesteps` should have the same length as num_inference_steps, if "
                    "`num_inference_steps` is provided"
                )
        elif sigmas is None and timesteps is None:
            raise ValueError("Pass num_inference_steps, or the schedule's `sigmas` or `timesteps`.")
        else:
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        self.num_inference_steps = num_inference_steps

        # 1. sigmas before shifting: evenly spaced in t (float64), or the caller's (float32)
        timesteps_given = timesteps is not None
        if timesteps_given and sigmas is None:
            logger.warning(
                "`timesteps` were passed without `sigmas`. The timesteps are used as given, while the sigmas derived "
                "from them go through the scheduler's shifting, so the two may not be consistent. Pass `sigmas` to "
                "get a shifted schedule, or pass both `sigmas` and `timesteps` to control them separately."
            )
        if timesteps_given:
            timesteps = np.array(timesteps).astype(np.float32)
        if sigmas is None:
            if timesteps is None:
                timesteps = np.linspace(
                    self._sigma_to_t(self.sigma_max), self._sigma_to_t(self.sigma_min), num_inference_steps
                )
            sigmas = timesteps / config.num_train_timesteps
        else:
            sigmas = np.array(sigmas).astype(np.float32)
            num_inference_steps = len(sigmas)

        # 2. shift towards noise: by the fixed shift, or by mu (the image's size)
        if config.use_dynamic_shifting:
            sigmas = self.time_shift(mu, 1.0, sigmas)
        else:
            sigmas = shift_sigmas(self.shift, sigmas)
        # 3. end the schedule at shift_terminal
        if config.shift_terminal:
            sigmas = self.stretch_shift_to_terminal(sigmas)
        # 4. respace
        spacing = sigma_spacing(config)
        if spacing is not None:
            sigmas = convert_sigmas(config, sigmas, num_inference_steps, spacing)

        sigmas = np.asarray(sigmas).astype(np.float32)
        if timesteps_given:
            timesteps = timesteps.astype(np.float32)
        else:
            timesteps = sigmas * config.num_train_timesteps
        # 5. the terminal sigma; invert_sigmas (Mochi) runs the schedule from sigma ~0 up to 1
        if config.invert_sigmas:
            sigmas = np.float32(1.0) - sigmas
            timesteps = sigmas * config.num_train_timesteps
            sigmas = np.concatenate([sigmas, np.ones(1, dtype=np.float32)])
        else:
            sigmas = np.concatenate([sigmas, np.zeros(1, dtype=np.float32)])
        self.timesteps = timesteps
        self.sigmas = sigmas
        self._step_index = None
        self._begin_index = None

    # ---- forward process (img2img, inpainting) ------------------------------------------------------------
    def scale_noise(self, sample: np.ndarray, timestep, noise: np.ndarray | None = None) -> np.ndarray:
        """x_sigma = sigma noise + (1 - sigma) sample at each batch item's timestep (looked up in the schedule,
        or the begin / current index once a pipeline set begin_index)."""
        sigmas = self.sigmas.astype(sample.dtype, copy=False)
        sigma = expand_to(sigmas[self._noise_step_indices(timestep)], sample.ndim)
        return sigma * noise + (1.0 - sigma) * sample

    # ---- the step -----------------------------------------------------------------------------------------
    def step(
        self,
        model_output: np.ndarray,
        timestep,
        sample: np.ndarray,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator=None,
        per_token_timesteps: np.ndarray | None = None,
        return_dict: bool = True,
    ):
        """One Euler step along the predicted velocity `model_output`. s_churn, s_tmin, s_tmax and s_noise are
        accepted and unused, as in diffusers. With stochastic_sampling the step goes through x_0 and draws fresh
        noise: x_{i+1} = (1 - sigma_{i+1}) x_0 + sigma_{i+1} noise. `per_token_timesteps`: a sigma per token
        (tokens of shape [B, N] of the sample [B, N, C]), each stepping to the next lower sigma of the schedule."""
        check_float_timestep(timestep, type(self).__name__)
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = sample.astype(np.float32, copy=False)  # the update in float32 whatever the model's dtype

        if per_token_timesteps is not None:
            per_token_sigmas = np.asarray(per_token_timesteps) / self.config.num_train_timesteps
            sigmas = self.sigmas[:, None, None]
            lower_mask = sigmas < per_token_sigmas[None] - 1e-6
            lower_sigmas = (lower_mask * sigmas).max(axis=0)
            current_sigma = per_token_sigmas[..., None]
            next_sigma = lower_sigmas[..., None]
            dt = current_sigma - next_sigma
        else:
            current_sigma = self.sigmas[self.step_index]
            next_sigma = self.sigmas[self.step_index + 1]
            dt = next_sigma - current_sigma

        if self.config.stochastic_sampling:
            x0 = sample - scalar_times(current_sigma, model_output)
            noise = randn(sample.shape, generator, sample.dtype)
            prev_sample = (1.0 - next_sigma) * x0 + next_sigma * noise
        else:
            prev_sample = sample + scalar_times(dt, model_output)

        self._step_index += 1
        if per_token_timesteps is None:
            prev_sample = prev_sample.astype(model_output.dtype, copy=False)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)
