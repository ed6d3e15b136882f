"""Heun's method (2nd order) for a flow-matching ODE (Karras et al. 2022, https://arxiv.org/abs/2206.00364,
Algorithm 2, on the rectified-flow schedule of flow_match_euler_discrete.py: x_sigma = (1 - sigma) x_0 + sigma noise,
the model predicts the velocity).

Each sigma interval costs two model calls, so the schedule lists every timestep after the first twice (`order = 2`):
the first call makes an Euler step to sigma_{i+1}; the second evaluates the velocity there and redoes the step from
x_i with the average of both (the trapezoidal rule). With s_churn > 0, noise first raises sigma_i to
sigma_hat = sigma_i (1 + gamma).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Scheduler
from .config import register_to_config
from .flow_match_euler_discrete import check_float_timestep, times_scalar
from .noise import randn
from .output import _StepOutput
from .schedules import shift_sigmas


@dataclass
class FlowMatchHeunDiscreteSchedulerOutput(_StepOutput):
    prev_sample: np.ndarray


class FlowMatchHeunDiscreteScheduler(Scheduler):
    order = 2

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        timesteps = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        sigmas = shift_sigmas(shift, timesteps / num_train_timesteps)
        self.timesteps = sigmas * num_train_timesteps
        self.sigmas = sigmas
        self.sigma_min = float(sigmas[-1])
        self.sigma_max = float(sigmas[0])
        self.num_inference_steps = None
        self.prev_derivative = None
        self.dt = None
        self.sample = None
        self._step_index = None
        self._begin_index = None

    # ---- schedule -----------------------------------------------------------------------------------------
    def _sigma_to_t(self, sigma):
        return sigma * self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """n sigmas evenly spaced in t from sigma_max to sigma_min (float64), shifted, then each one after the
        first listed twice (timesteps [t0, t1, t1, t2, t2, ...], sigmas [s0, s1, s1, ..., 0])."""
        self.num_inference_steps = num_inference_steps
        n_train = self.config.num_train_timesteps
        timesteps = np.linspace(self._sigma_to_t(self.sigma_max), self._sigma_to_t(self.sigma_min), num_inference_steps)
        sigmas = shift_sigmas(self.config.shift, timesteps / n_train).astype(np.float32)
        timesteps = sigmas * n_train
        self.timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])
        sigmas = np.concatenate([sigmas, np.zeros(1, dtype=np.float32)])
        self.sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        self.prev_derivative = None
        self.dt = None
        self._step_index = None
        self._begin_index = None

    @property
    def state_in_first_order(self) -> bool:
        return self.dt is None

    # ---- forward process (img2img, inpainting) ------------------------------------------------------------
    def scale_noise(self, sample: np.ndarray, timestep, noise: np.ndarray) -> np.ndarray:
        """sigma noise + (1 - sigma) sample at the current step (found from `timestep` before the first step;
        diffusers' Heun sets the step index here)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
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
        return_dict: bool = True,
    ):
        check_float_timestep(timestep, type(self).__name__)
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = sample.astype(np.float32, copy=False)

        if self.state_in_first_order:
            sigma = self.sigmas[self.step_index]
            sigma_next = self.sigmas[self.step_index + 1]
        else:
            sigma = self.sigmas[self.step_index - 1]
            sigma_next = self.sigmas[self.step_index]

        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * np.float32(gamma + 1)
        if gamma > 0:
            noise = randn(model_output.shape, generator, model_output.dtype)
            eps = times_scalar(noise, s_noise)
            sample = sample + times_scalar(eps, np.sqrt(sigma_hat * sigma_hat - sigma * sigma))

        if self.state_in_first_order:
            # Euler step to sigma_next; keep its velocity, dt and start for the correction
            denoised = sample - times_scalar(model_output, sigma)
            derivative = (sample - denoised) / sigma_hat
            dt = sigma_next - sigma_hat
            self.prev_derivative = derivative
            self.dt = dt
            self.sample = sample
        else:
            # the velocity at sigma_next, averaged with the first one, applied from the interval's start
            denoised = sample - times_scalar(model_output, sigma_next)
            derivative = (sample - denoised) / sigma_next
            derivative = 0.5 * (self.prev_derivative + derivative)
            dt = self.dt
            sample = self.sample
            self.prev_derivative = None
            self.dt = None
            self.sample = None

        prev_sample = (sample + derivative * dt).astype(model_output.dtype, copy=False)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return FlowMatchHeunDiscreteSchedulerOutput(prev_sample=prev_sample)
