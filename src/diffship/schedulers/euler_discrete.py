"""Euler sampler of the probability-flow ODE in k-diffusion form (Karras et al. 2022, https://arxiv.org/abs/2206.00364,
Algorithm 2 with its optional "churn").

With x in sigma-space (x = x0 + sigma * eps) the ODE is dx/dsigma = (x - D(x, sigma)) / sigma, D the denoiser, and
a step is x_{i+1} = x_i + (sigma_{i+1} - sigma_hat_i) * (x_i - D(x_i)) / sigma_hat_i. With s_churn > 0, noise first
raises sigma_i to sigma_hat_i = sigma_i (1 + gamma).
"""

from __future__ import annotations

import numpy as np

from .base import Scheduler
from .config import register_to_config
from .noise import randn
from .output import SchedulerOutput
from .schedules import (
    alphas_cumprod_for,
    check_one_sigma_spacing,
    convert_sigmas,
    make_betas,
    rescale_zero_terminal_snr,
    sigma_spacing,
    sigma_to_t,
    spaced_float_timesteps,
    training_sigmas,
)


class EulerDiscreteScheduler(Scheduler):
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
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        check_one_sigma_spacing(self.config)
        self.betas = make_betas("EulerDiscreteScheduler", num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_for(self.betas)
        if rescale_betas_zero_snr:
            # zero terminal SNR would make sigma infinite; keep it huge but finite (as diffusers does)
            self.alphas_cumprod[-1] = 2**-24

        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)[::-1].copy()
        timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=float)[::-1].astype(np.float32)
        self.num_inference_steps = None
        if timestep_type == "continuous" and prediction_type == "v_prediction":
            self.timesteps = (0.25 * np.log(sigmas)).astype(np.float32)
        else:
            self.timesteps = timesteps
        self.sigmas = np.concatenate([sigmas, np.zeros(1, dtype=np.float32)])
        self.is_scale_input_called = False
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas
        self._step_index = None
        self._begin_index = None

    @property
    def init_noise_sigma(self):
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ["linspace", "trailing"]:
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        """Divide by sqrt(sigma^2 + 1): the model was trained on variance-preserving x_t, not sigma-space x."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        self.is_scale_input_called = True
        return sample / (sigma**2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None) -> None:
        config = self.config
        if timesteps is not None and sigmas is not None:
            raise ValueError("Only one of `timesteps` or `sigmas` should be set.")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps` or `sigmas.")
        if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
            raise ValueError("Can only pass one of `num_inference_steps` or `timesteps` or `sigmas`.")
        spacing = sigma_spacing(config)
        if timesteps is not None and spacing is not None:
            raise ValueError(f"Cannot set `timesteps` with `config.use_{spacing}_sigmas = True`.")
        continuous_v = config.timestep_type == "continuous" and config.prediction_type == "v_prediction"
        if timesteps is not None and continuous_v:
            raise ValueError(
                "Cannot set `timesteps` with `config.timestep_type = 'continuous'` and `config.prediction_type = 'v_prediction'`."
            )
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        self.num_inference_steps = num_inference_steps

        train_sigmas = training_sigmas(self.alphas_cumprod)  # float32, ascending in t
        log_sigmas = np.log(train_sigmas)
        if sigmas is not None:
            sigmas = np.array(sigmas).astype(np.float32)
            timesteps = sigma_to_t(sigmas[:-1], log_sigmas)
        else:
            if timesteps is not None:
                timesteps = np.array(timesteps).astype(np.float32)
            else:
                timesteps = spaced_float_timesteps(config, num_inference_steps)

            if config.interpolation_type == "linear":
                sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
            elif config.interpolation_type == "log_linear":
                log_range = np.linspace(float(log_sigmas[-1]), float(log_sigmas[0]), num_inference_steps + 1)
                sigmas = np.exp(log_range.astype(np.float32))
            else:
                raise ValueError(
                    f"{config.interpolation_type} is not implemented. Please specify interpolation_type to either 'linear' or 'log_linear'"
                )

            if spacing is not None:
                sigmas = convert_sigmas(config, sigmas, self.num_inference_steps, spacing)
                timesteps = sigma_to_t(sigmas, log_sigmas)

            if config.final_sigmas_type == "sigma_min":
                sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
            elif config.final_sigmas_type == "zero":
                sigma_last = 0
            else:
                raise ValueError(
                    f"`final_sigmas_type` must be one of 'zero', or 'sigma_min', but got {config.final_sigmas_type}"
                )
            sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)

        sigmas = sigmas.astype(np.float32)
        if continuous_v:
            self.timesteps = (0.25 * np.log(sigmas[:-1])).astype(np.float32)
        else:
            self.timesteps = timesteps.astype(np.float32)
        self._step_index = None
        self._begin_index = None
        self.sigmas = sigmas

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
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to `EulerDiscreteScheduler.step()`"
                " is not supported. Make sure to pass one of the `scheduler.timesteps` as a timestep."
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = sample.astype(np.float32, copy=False)
        sigma = self.sigmas[self.step_index]

        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = randn(model_output.shape, generator, model_output.dtype)
            eps = noise * s_noise
            sample = sample + eps * (sigma_hat**2 - sigma**2) ** 0.5

        # the denoised estimate D(x) from the model output
        prediction_type = self.config.prediction_type
        if prediction_type in ("original_sample", "sample"):
            pred_original_sample = model_output
        elif prediction_type == "epsilon":
            pred_original_sample = sample - sigma_hat * model_output
        elif prediction_type == "v_prediction":
            pred_original_sample = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        else:
            raise ValueError(f"prediction_type given as {prediction_type} must be one of `epsilon`, or `v_prediction`")

        derivative = (sample - pred_original_sample) / sigma_hat
        dt = self.sigmas[self.step_index + 1] - sigma_hat
        prev_sample = (sample + derivative * dt).astype(model_output.dtype, copy=False)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """x = x0 + sigma * noise at the sigma of `timesteps` (or of begin_index / step_index once set)."""
        sigma = self.sigmas.astype(original_samples.dtype)[self._noise_step_indices(timesteps)]
        return original_samples + noise * sigma.reshape((-1,) + (1,) * (original_samples.ndim - 1))
