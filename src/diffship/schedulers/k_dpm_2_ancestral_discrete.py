"""DPM-Solver-2 ancestral (k-diffusion's `sample_dpm_2_ancestral`; Karras et al. 2022 after Lu et al. 2022).

As KDPM2DiscreteScheduler, but each interval first splits sigma_{i+1} into a deterministic target sigma_down and
fresh noise sigma_up (sigma_down^2 + sigma_up^2 = sigma_{i+1}^2, see EulerAncestralDiscreteScheduler); the
midpoint step then goes to sigma_down and the noise is added after the second model call.
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
    k_diffusion_sigmas,
    make_betas,
    sigma_to_t,
    torch_lerp,
)


class KDPM2AncestralDiscreteScheduler(Scheduler):
    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        check_one_sigma_spacing(self.config)
        self.betas = make_betas(
            "KDPM2AncestralDiscreteScheduler", num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_for(self.betas)
        self.set_timesteps(num_train_timesteps)

    @property
    def init_noise_sigma(self):
        if self.config.timestep_spacing in ["linspace", "trailing"]:
            return self.sigmas.max()
        return (self.sigmas.max() ** 2 + 1) ** 0.5

    @property
    def state_in_first_order(self) -> bool:
        return self.sample is None

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index] if self.state_in_first_order else self.sigmas_interpol[self.step_index - 1]
        return sample / (sigma**2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int, device=None, num_train_timesteps: int | None = None) -> None:
        self.num_inference_steps = num_inference_steps
        timesteps, sigmas, log_sigmas = k_diffusion_sigmas(
            self.config, self.alphas_cumprod, num_inference_steps, round_karras=True
        )
        self.log_sigmas = log_sigmas
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)

        with np.errstate(divide="ignore", invalid="ignore"):  # the final sigma is 0: NaN / -inf that are overwritten or unused
            sigmas_next = np.roll(sigmas, -1)
            sigmas_next[-1] = 0.0
            sigmas_up = (sigmas_next**2 * (sigmas**2 - sigmas_next**2) / sigmas**2) ** 0.5
            # sigma_down = sqrt(sigma_next^2 - sigma_up^2) = sigma_next^2 / sigma exactly. diffusers evaluates the
            # difference, whose float32 rounding grows by kappa = (sigma / sigma_next)^2: 2.5e5 on a 2-step SD
            # schedule (14.6 -> 0.029), where its sigma_down is 1-4% off and depends on the last bit of the sigmas
            # (torch builds them differently on AVX2 and AVX-512 CPUs), so that the timestep interpolated from it
            # (exactly that of sigma_next, the smallest training sigma) comes out 0 on one CPU and 0.0096 on
            # another; and 1e8 with squaredcos_cap_v2 (sigma_max 2e4), where the difference rounds below zero and
            # diffusers gets NaN. The quotient is within an ulp for every kappa, and within a few ulps of
            # diffusers' value wherever that is well defined (kappa < ~10 at 25 steps and more).
            sigmas_down = sigmas_next**2 / sigmas
            sigmas_down[-1] = 0.0
            # midpoint in log-sigma between sigma_i and sigma_down (= sigma_next: the model is evaluated at the
            # next sigma's level, from a different sample). The last two entries (log 0 = -inf) are overwritten.
            sigmas_interpol = np.exp(torch_lerp(np.log(sigmas), np.log(sigmas_down), 0.5))
        sigmas_interpol[-2:] = 0.0

        def doubled(values):
            return np.concatenate([values[:1], values[1:].repeat(2), values[-1:]])

        self.sigmas = doubled(sigmas)
        self.sigmas_interpol = doubled(sigmas_interpol)
        self.sigmas_up = doubled(sigmas_up)
        self.sigmas_down = doubled(sigmas_down)

        timesteps_interpol = sigma_to_t(sigmas_interpol, log_sigmas).astype(timesteps.dtype)
        interleaved = np.stack((timesteps_interpol[:-2], timesteps[1:]), axis=-1).reshape(-1)
        self.timesteps = np.concatenate([timesteps[:1], interleaved])

        self.sample = None
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None, return_dict: bool = True):
        if self.step_index is None:
            self._init_step_index(timestep)
        first_order = self.state_in_first_order
        if first_order:
            sigma = self.sigmas[self.step_index]
            sigma_interpol = self.sigmas_interpol[self.step_index]
            sigma_up = self.sigmas_up[self.step_index]
            sigma_down = self.sigmas_down[self.step_index - 1]
        else:  # 2nd order: the model was evaluated at the midpoint
            sigma = self.sigmas[self.step_index - 1]
            sigma_interpol = self.sigmas_interpol[self.step_index - 1]
            sigma_up = self.sigmas_up[self.step_index - 1]
            sigma_down = self.sigmas_down[self.step_index - 1]
        sigma_hat = sigma  # no churn (gamma = 0)

        prediction_type = self.config.prediction_type
        sigma_input = sigma_hat if first_order else sigma_interpol
        if prediction_type == "epsilon":
            pred_original_sample = sample - sigma_input * model_output
        elif prediction_type == "v_prediction":
            pred_original_sample = model_output * (-sigma_input / (sigma_input**2 + 1) ** 0.5) + sample / (sigma_input**2 + 1)
        elif prediction_type == "sample":
            raise NotImplementedError("prediction_type not implemented yet: sample")
        else:
            raise ValueError(f"prediction_type given as {prediction_type} must be one of `epsilon`, or `v_prediction`")

        if first_order:
            # Euler step to the midpoint
            derivative = (sample - pred_original_sample) / sigma_hat
            dt = sigma_interpol - sigma_hat
            self.sample = sample
            self.dt = dt
            prev_sample = sample + derivative * dt
        else:
            # the midpoint's derivative carries x_i to sigma_down, then noise brings it up to sigma_{i+1}
            derivative = (sample - pred_original_sample) / sigma_interpol
            dt = sigma_down - sigma_hat
            sample = self.sample
            self.sample = None
            # x + d dt + z sigma_up, in place on fresh arrays (same roundings as the out-of-place form)
            prev_sample = derivative * dt
            prev_sample += sample
            noise = randn(model_output.shape, generator, model_output.dtype)
            noise *= sigma_up
            prev_sample += noise

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        sigma = self.sigmas.astype(original_samples.dtype)[self._noise_step_indices(timesteps)]
        return original_samples + noise * sigma.reshape((-1,) + (1,) * (original_samples.ndim - 1))
