"""DDIM: Denoising Diffusion Implicit Models (Song, Meng & Ermon 2020, https://arxiv.org/abs/2010.02502).

One step is eq. 12 of the paper:

    x_{t-1} = sqrt(a_{t-1}) * x0_pred + sqrt(1 - a_{t-1} - sigma_t^2) * eps_pred + sigma_t * z
    sigma_t = eta * sqrt((1 - a_{t-1}) / (1 - a_t)) * sqrt(1 - a_t / a_{t-1})          (eq. 16)

with a = alphas_cumprod. eta=0 is deterministic DDIM, eta=1 is DDPM-like ancestral sampling.
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


class DDIMScheduler(Scheduler):
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self.betas = make_betas("DDIMScheduler", num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_for(self.betas)
        # The "previous" alpha of the last step: 1 (a clean image) or, for models trained so, alphas_cumprod[0].
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64)

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        if num_inference_steps > self.config.num_train_timesteps:
            raise ValueError(
                f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.config.train_timesteps`: "
                f"{self.config.num_train_timesteps}."
            )
        self.num_inference_steps = num_inference_steps
        self.timesteps = spaced_timesteps(self.config, num_inference_steps)

    def _get_variance(self, timestep: int, prev_timestep: int):
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        return (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)

    def step(
        self,
        model_output: np.ndarray,
        timestep: int,
        sample: np.ndarray,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise: np.ndarray | None = None,
        return_dict: bool = True,
    ):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        config = self.config
        timestep = int(timestep)
        # DDIM steps a fixed stride back, even with "trailing"/"linspace" spacing (as diffusers does).
        prev_timestep = timestep - config.num_train_timesteps // self.num_inference_steps

        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t

        # x0 and eps predicted from the model output (eq. 12's "predicted x0" term)
        if config.prediction_type == "epsilon":
            pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
            pred_epsilon = model_output
        elif config.prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5
        elif config.prediction_type == "v_prediction":
            pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
            pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
        else:
            raise ValueError(
                f"prediction_type given as {config.prediction_type} must be one of `epsilon`, `sample`, or `v_prediction`"
            )

        if config.thresholding:
            pred_original_sample = threshold_sample(
                pred_original_sample, config.dynamic_thresholding_ratio, config.sample_max_value
            )
        elif config.clip_sample:
            pred_original_sample = np.clip(pred_original_sample, -config.clip_sample_range, config.clip_sample_range)

        variance = self._get_variance(timestep, prev_timestep)
        std_dev_t = eta * variance**0.5
        if use_clipped_model_output:
            # eps recomputed from the clipped x0 (as in Glide)
            pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5

        # eq. 12: the "direction pointing to x_t" plus the predicted x0, scaled to a_{t-1}. The direction's coefficient
        # sqrt(1 - a_{t-1} - sigma_t^2) is evaluated as the equal sqrt((1 - a_{t-1}) ((1 - eta^2) + eta^2 a_t
        # (1 - a_{t-1}) / (a_{t-1} (1 - a_t)))), a sum of terms >= 0 for eta in [0, 1]. diffusers evaluates the
        # difference, which at eta = 1 keeps 1 / kappa of 1 - a_{t-1}, kappa = s_t^2 / s_{t-1}^2 with s^2 = (1 - a) / a
        # (Euler ancestral's sigma_down cancels the same way), so its float32 rounding grows by kappa: 1.2e5 at 2 steps
        # (t 500 -> 0), where its value is 0.4% off; 4e8 with squaredcos_cap_v2 and "trailing" (t 999 -> 499), where
        # it rounds to 0 (or below: NaN). At eta = 0 both are 1 - a_{t-1}, bit for bit.
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        direction_variance = beta_prod_t_prev * (
            (1 - eta**2) + eta**2 * (alpha_prod_t * beta_prod_t_prev) / (alpha_prod_t_prev * beta_prod_t)
        )
        pred_sample_direction = direction_variance**0.5 * pred_epsilon
        prev_sample = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction

        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise; leave one of them None.")
            if variance_noise is None:
                variance_noise = randn(model_output.shape, generator, model_output.dtype)
            prev_sample = prev_sample + std_dev_t * variance_noise

        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        return velocity_vp(self.alphas_cumprod, sample, noise, timesteps)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
