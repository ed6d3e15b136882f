"""Euler ancestral sampler (k-diffusion's `sample_euler_ancestral`; Karras et al. 2022, https://arxiv.org/abs/2206.00364).

Each step splits the move from sigma_i to sigma_{i+1} into a deterministic Euler step down to sigma_down and fresh
noise of size sigma_up, with sigma_down^2 + sigma_up^2 = sigma_{i+1}^2 (the ancestral sampling step of DDPM, written
in sigma-space):

    sigma_up   = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)
    sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2) = sigma_{i+1}^2 / sigma_i
    x_{i+1}    = x_i + (sigma_down - sigma_i) (x_i - D(x_i)) / sigma_i + sigma_up z
"""

from __future__ import annotations

import numpy as np

from .base import Scheduler
from .config import register_to_config
from .noise import randn
from .output import SchedulerOutput
from .schedules import alphas_cumprod_for, make_betas, rescale_zero_terminal_snr, spaced_float_timesteps, training_sigmas


class EulerAncestralDiscreteScheduler(Scheduler):
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self.betas = make_betas(
            "EulerAncestralDiscreteScheduler", num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_for(self.betas)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # keep the terminal sigma finite
        sigmas = training_sigmas(self.alphas_cumprod)
        self.sigmas = np.concatenate([sigmas[::-1], [0.0]]).astype(np.float32)
        self.num_inference_steps = None
        self.timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=float)[::-1].copy()
        self.is_scale_input_called = False
        self._step_index = None
        self._begin_index = None

    @property
    def init_noise_sigma(self):
        if self.config.timestep_spacing in ["linspace", "trailing"]:
            return self.sigmas.max()
        return (self.sigmas.max() ** 2 + 1) ** 0.5

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        """Divide by sqrt(sigma^2 + 1): the model expects variance-preserving input."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        self.is_scale_input_called = True
        return sample / (sigma**2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.num_inference_steps = num_inference_steps
        timesteps = spaced_float_timesteps(self.config, num_inference_steps)
        sigmas = training_sigmas(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = timesteps
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None, return_dict: bool = True):
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to `step()` is not supported. "
                "Make sure to pass one of the `scheduler.timesteps` as a timestep."
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        sample = sample.astype(np.float32, copy=False)

        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            pred_original_sample = sample - sigma * model_output
        elif prediction_type == "v_prediction":
            pred_original_sample = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        elif prediction_type == "sample":
            raise NotImplementedError("prediction_type not implemented yet: sample")
        else:
            raise ValueError(f"prediction_type given as {prediction_type} must be one of `epsilon`, or `v_prediction`")

        sigma_from = self.sigmas[self.step_index]
        sigma_to = self.sigmas[self.step_index + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        # sigma_down = sqrt(sigma_to^2 - sigma_up^2) = sigma_to^2 / sigma_from exactly. diffusers evaluates the
        # difference, which keeps 1 / kappa of sigma_to^2, kappa = (sigma_from / sigma_to)^2, so its float32 rounding
        # grows by kappa: 2.5e5 at 2 SD steps (14.6 -> 0.029), where its value is 1% off and depends on the last bits
        # of the sigmas and of torch's sqrt (which differ by CPU); 1.3e8 at 4 squaredcos_cap_v2 steps (2e4 -> 1.75),
        # where the difference rounds below zero and diffusers gets NaN. The quotient is within an ulp for any kappa.
        # sigma_up keeps diffusers' form: sigma_from^2 - sigma_to^2 loses only a factor kappa / (kappa - 1) (< 1.5 at
        # 50 steps, large only for nearly equal consecutive sigmas), and an error in it only scales the fresh noise.
        sigma_down = sigma_to**2 / sigma_from

        derivative = (sample - pred_original_sample) / sigma
        dt = sigma_down - sigma
        # x + d dt + z sigma_up, in place on fresh arrays (same roundings as the out-of-place form)
        prev_sample = derivative
        prev_sample *= dt
        prev_sample += sample
        noise = randn(model_output.shape, generator, model_output.dtype)
        noise *= sigma_up
        prev_sample += noise
        prev_sample = prev_sample.astype(model_output.dtype, copy=False)

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        sigma = self.sigmas.astype(original_samples.dtype)[self._noise_step_indices(timesteps)]
        return original_samples + noise * sigma.reshape((-1,) + (1,) * (original_samples.ndim - 1))
