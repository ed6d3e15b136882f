"""Heun's method (2nd-order) for the probability-flow ODE (Karras et al. 2022, https://arxiv.org/abs/2206.00364,
Algorithm 1).

Each sigma interval costs two model calls, so the schedule lists every timestep after the first twice
(`order = 2`): the first call makes an Euler step to sigma_{i+1}; the second evaluates the derivative there and
redoes the step from x_i with the average of both derivatives (the trapezoidal rule).
"""

from __future__ import annotations

import numpy as np

from .base import Scheduler
from .config import register_to_config
from .output import SchedulerOutput
from .schedules import alphas_cumprod_for, check_one_sigma_spacing, k_diffusion_sigmas, make_betas, sigma_spacing


class HeunDiscreteScheduler(Scheduler):
    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        check_one_sigma_spacing(self.config)
        self.betas = make_betas(
            "HeunDiscreteScheduler", num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            extra_schedules=("exp",),
        )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_for(self.betas)
        self.set_timesteps(num_train_timesteps)
        self.use_karras_sigmas = use_karras_sigmas

    @property
    def init_noise_sigma(self):
        if self.config.timestep_spacing in ["linspace", "trailing"]:
            return self.sigmas.max()
        return (self.sigmas.max() ** 2 + 1) ** 0.5

    @property
    def state_in_first_order(self) -> bool:
        return self.dt is None

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        return sample / (sigma**2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, num_train_timesteps=None, timesteps=None):
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `custom_timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        spacing = sigma_spacing(self.config)
        if timesteps is not None and spacing is not None:
            raise ValueError(f"Cannot set `timesteps` with `config.use_{spacing}_sigmas = True`.")
        num_inference_steps = num_inference_steps or len(timesteps)
        self.num_inference_steps = num_inference_steps

        timesteps, sigmas, _ = k_diffusion_sigmas(self.config, self.alphas_cumprod, num_inference_steps, timesteps)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        # every sigma but the first and the final 0 is visited twice (Euler predictor, then corrector)
        self.sigmas = np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])
        self.timesteps = np.concatenate([timesteps[:1], timesteps[1:].repeat(2)]).astype(np.float32)

        self.prev_derivative = None
        self.dt = None
        self.sample = None
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, return_dict: bool = True):
        if self.step_index is None:
            self._init_step_index(timestep)
        first_order = self.state_in_first_order
        if first_order:
            sigma = self.sigmas[self.step_index]
            sigma_next = self.sigmas[self.step_index + 1]
        else:  # 2nd-order / Heun step
            sigma = self.sigmas[self.step_index - 1]
            sigma_next = self.sigmas[self.step_index]
        sigma_hat = sigma  # no churn (gamma = 0)

        prediction_type = self.config.prediction_type
        sigma_input = sigma_hat if first_order else sigma_next
        if prediction_type == "epsilon":
            pred_original_sample = sample - sigma_input * model_output
        elif prediction_type == "v_prediction":
            pred_original_sample = model_output * (-sigma_input / (sigma_input**2 + 1) ** 0.5) + sample / (sigma_input**2 + 1)
        elif prediction_type == "sample":
            pred_original_sample = model_output
        else:
            raise ValueError(f"prediction_type given as {prediction_type} must be one of `epsilon`, or `v_prediction`")
        if self.config.clip_sample:
            pred_original_sample = np.clip(pred_original_sample, -self.config.clip_sample_range, self.config.clip_sample_range)

        if first_order:
            # Euler predictor to sigma_next; remember the slope and where we started
            derivative = (sample - pred_original_sample) / sigma_hat
            dt = sigma_next - sigma_hat
            self.prev_derivative = derivative
            self.dt = dt
            self.sample = sample
        else:
            # corrector: restart from x_i with the mean of the two slopes
            derivative = (sample - pred_original_sample) / sigma_next
            derivative = (self.prev_derivative + derivative) / 2
            dt = self.dt
            sample = self.sample
            self.prev_derivative = None
            self.dt = None
            self.sample = None

        prev_sample = sample + derivative * dt
        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        sigma = self.sigmas.astype(original_samples.dtype)[self._noise_step_indices(timesteps)]
        return original_samples + noise * sigma.reshape((-1,) + (1,) * (original_samples.ndim - 1))
