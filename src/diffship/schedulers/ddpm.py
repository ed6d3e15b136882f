"""DDPM: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020, https://arxiv.org/abs/2006.11239).

Ancestral sampling from the posterior q(x_{t-1} | x_t, x0) with x0 predicted by the model (eqs. 6-7):

    mean     = sqrt(a_{t-1}) beta_t / (1 - a_t) * x0 + sqrt(alpha_t) (1 - a_{t-1}) / (1 - a_t) * x_t
    variance = (1 - a_{t-1}) / (1 - a_t) * beta_t                                  ("fixed_small", beta tilde)

with a = alphas_cumprod and beta_t, alpha_t those of the (possibly strided) step from t to its predecessor.
"""

from __future__ import annotations

import numpy as np

from .base import Scheduler
from .config import register_to_config
from .noise import randn
from .output import SchedulerOutput
from .schedules import (
    add_noise_vp,
    alphas_cumprod_for,
    make_betas,
    rescale_zero_terminal_snr,
    spaced_timesteps,
    threshold_sample,
    velocity_vp,
)

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


class DDPMScheduler(Scheduler):
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self.betas = make_betas(
            "DDPMScheduler", num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            extra_schedules=("laplace", "sigmoid"),
        )
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_for(self.betas)
        self.one = np.float32(1.0)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.timesteps = np.arange(0, num_train_timesteps)[::-1].copy()
        self.variance_type = variance_type

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None) -> None:
        """Evenly spaced timesteps (config.timestep_spacing), or the descending `timesteps` given."""
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        n_train = self.config.num_train_timesteps
        if timesteps is not None:
            for i in range(1, len(timesteps)):
                if timesteps[i] >= timesteps[i - 1]:
                    raise ValueError("`custom_timesteps` must be in descending order.")
            if timesteps[0] >= n_train:
                raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: {n_train}.")
            self.timesteps = np.array(timesteps, dtype=np.int64)
            self.custom_timesteps = True
            return
        if num_inference_steps > n_train:
            raise ValueError(
                f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.config.train_timesteps`: {n_train}."
            )
        self.num_inference_steps = num_inference_steps
        self.custom_timesteps = False
        self.timesteps = spaced_timesteps(self.config, num_inference_steps)

    def previous_timestep(self, timestep: int) -> int:
        """The timestep the sampler goes to from `timestep`: the next one in the schedule, -1 after the last."""
        if self.custom_timesteps or self.num_inference_steps:
            index = int(np.flatnonzero(self.timesteps == timestep)[0])
            return -1 if index == self.timesteps.shape[0] - 1 else int(self.timesteps[index + 1])
        return timestep - 1

    def _get_variance(self, t: int, predicted_variance=None, variance_type: str | None = None):
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev

        # posterior variance beta tilde (eq. 7); clamped so its log stays finite at t = 0
        variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t
        variance = np.maximum(variance, np.float32(1e-20))

        variance_type = variance_type or self.config.variance_type
        if variance_type == "fixed_small":
            return variance
        if variance_type == "fixed_small_log":  # the standard deviation, through log for stability (as in Glide)
            return np.exp(0.5 * np.log(variance))
        if variance_type == "fixed_large":
            return current_beta_t
        if variance_type == "fixed_large_log":
            return np.log(current_beta_t)
        if variance_type == "learned":
            return predicted_variance
        if variance_type == "learned_range":  # interpolate log-variance between beta tilde and beta (Improved DDPM)
            min_log = np.log(variance)
            max_log = np.log(current_beta_t)
            frac = (predicted_variance + 1) / 2
            return frac * max_log + (1 - frac) * min_log
        raise ValueError(f"variance_type {variance_type!r} is not one of {', '.join(VARIANCE_TYPES)}")

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray, generator=None, return_dict: bool = True):
        config = self.config
        t = int(timestep)
        prev_t = self.previous_timestep(t)

        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in ["learned", "learned_range"]:
            model_output, predicted_variance = np.split(model_output, [sample.shape[1]], axis=1)
        else:
            predicted_variance = None

        # 1. alphas, betas of this (possibly strided) step
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        # 2. predicted x0 (eq. 15)
        if config.prediction_type == "epsilon":
            pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        elif config.prediction_type == "sample":
            pred_original_sample = model_output
        elif config.prediction_type == "v_prediction":
            pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
        else:
            raise ValueError(
                f"prediction_type given as {config.prediction_type} must be one of `epsilon`, `sample` or `v_prediction`  for the DDPMScheduler."
            )

        # 3. clip or threshold x0
        if config.thresholding:
            pred_original_sample = threshold_sample(
                pred_original_sample, config.dynamic_thresholding_ratio, config.sample_max_value
            )
        elif config.clip_sample:
            pred_original_sample = np.clip(pred_original_sample, -config.clip_sample_range, config.clip_sample_range)

        # 4. posterior mean (eq. 7)
        pred_original_sample_coeff = (alpha_prod_t_prev**0.5 * current_beta_t) / beta_prod_t
        current_sample_coeff = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
        pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample

        # 5. add noise, except at the last step
        if t > 0:
            variance_noise = randn(model_output.shape, generator, model_output.dtype)
            if self.variance_type == "fixed_small_log":
                variance = self._get_variance(t, predicted_variance=predicted_variance) * variance_noise
            elif self.variance_type == "learned_range":
                variance = np.exp(0.5 * self._get_variance(t, predicted_variance=predicted_variance)) * variance_noise
            else:
                variance = self._get_variance(t, predicted_variance=predicted_variance) ** 0.5 * variance_noise
            pred_prev_sample = pred_prev_sample + variance

        if not return_dict:
            return (pred_prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=pred_prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        return velocity_vp(self.alphas_cumprod, sample, noise, timesteps)
