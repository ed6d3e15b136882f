"""LCM: Latent Consistency Models (Luo et al. 2023, https://arxiv.org/abs/2310.04378), multistep consistency sampling
(Algorithm 3 of the paper; Song et al. 2023's consistency models, Algorithm 1).

The model output gives x0 (through the DDIM parameterization); the consistency function adds the boundary-condition
skip connection: denoised = c_out(t) x0 + c_skip(t) x_t. Each step jumps to `denoised` and, except at the last
step, re-noises it to the next timestep with fresh noise. Timesteps are a subset of the `original_inference_steps`
schedule the model was distilled on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Scheduler
from .config import register_to_config
from .noise import randn
from .output import _StepOutput
from .schedules import (
    add_noise_vp,
    alphas_cumprod_for,
    make_betas,
    rescale_zero_terminal_snr,
    threshold_sample,
    velocity_vp,
)


@dataclass
class LCMSchedulerOutput(_StepOutput):
    prev_sample: np.ndarray
    denoised: np.ndarray | None = None


class LCMScheduler(Scheduler):
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas=None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
    ):
        self.betas = make_betas("LCMScheduler", num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_for(self.betas)
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64)
        self.custom_timesteps = False
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device=None,
        original_inference_steps: int | None = None,
        timesteps=None,
        strength: float = 1.0,
    ) -> None:
        """`num_inference_steps` evenly skipped over the distillation schedule (the last `strength` of it), or the
        descending custom `timesteps`."""
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `custom_timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        n_train = self.config.num_train_timesteps
        original_steps = original_inference_steps if original_inference_steps is not None else self.config.original_inference_steps
        if original_steps > n_train:
            raise ValueError(f"`original_steps`: {original_steps} cannot be larger than `self.config.train_timesteps`: {n_train}.")

        # the distillation schedule: every k-th training timestep, k = n_train // original_steps
        k = n_train // original_steps
        lcm_origin_timesteps = np.asarray(list(range(1, int(original_steps * strength) + 1))) * k - 1

        if timesteps is not None:
            for i in range(1, len(timesteps)):
                if timesteps[i] >= timesteps[i - 1]:
                    raise ValueError("`custom_timesteps` must be in descending order.")
            if timesteps[0] >= n_train:
                raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: {n_train}.")
            timesteps = np.array(timesteps, dtype=np.int64)
            self.num_inference_steps = len(timesteps)
            self.custom_timesteps = True
            init_timestep = min(int(self.num_inference_steps * strength), self.num_inference_steps)
            t_start = max(self.num_inference_steps - init_timestep, 0)
            timesteps = timesteps[t_start * self.order :]
        else:
            if num_inference_steps > n_train:
                raise ValueError(f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.config.train_timesteps`: {n_train}.")
            skipping_step = len(lcm_origin_timesteps) // num_inference_steps
            if skipping_step < 1:
                raise ValueError(
                    f"The combination of `original_steps x strength`: {original_steps} x {strength} is smaller than "
                    f"`num_inference_steps`: {num_inference_steps}."
                )
            self.num_inference_steps = num_inference_steps
            if num_inference_steps > original_steps:
                raise ValueError(
                    f"`num_inference_steps`: {num_inference_steps} cannot be larger than `original_inference_steps`: {original_steps}."
                )
            lcm_origin_timesteps = lcm_origin_timesteps[::-1].copy()
            inference_indices = np.linspace(0, len(lcm_origin_timesteps), num=num_inference_steps, endpoint=False)
            inference_indices = np.floor(inference_indices).astype(np.int64)
            timesteps = lcm_origin_timesteps[inference_indices]

        self.timesteps = timesteps.astype(np.int64)
        self._step_index = None
        self._begin_index = None

    def get_scalings_for_boundary_condition_discrete(self, timestep):
        """(c_skip, c_out) of the consistency parameterization (Song et al. 2023, appendix C), sigma_data = 0.5;
        timestep_scaling sharpens them so that c_skip ~ 0 away from t = 0."""
        self.sigma_data = 0.5
        scaled_timestep = np.float32(timestep) * np.float32(self.config.timestep_scaling)
        c_skip = self.sigma_data**2 / (scaled_timestep**2 + self.sigma_data**2)
        c_out = scaled_timestep / (scaled_timestep**2 + self.sigma_data**2) ** 0.5
        return c_skip, c_out

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        config = self.config
        timestep = int(timestep)

        # 1. the next timestep of the schedule (the current one at the last step)
        prev_step_index = self.step_index + 1
        prev_timestep = int(self.timesteps[prev_step_index]) if prev_step_index < len(self.timesteps) else timestep

        # 2. alphas and betas
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev

        # 3. boundary-condition scalings
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(timestep)

        # 4. x0 from the model output
        if config.prediction_type == "epsilon":
            predicted_original_sample = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(alpha_prod_t)
        elif config.prediction_type == "sample":
            predicted_original_sample = model_output
        elif config.prediction_type == "v_prediction":
            predicted_original_sample = np.sqrt(alpha_prod_t) * sample - np.sqrt(beta_prod_t) * model_output
        else:
            raise ValueError(
                f"prediction_type given as {config.prediction_type} must be one of `epsilon`, `sample` or `v_prediction` for `LCMScheduler`."
            )

        # 5. clip or threshold x0
        if config.thresholding:
            predicted_original_sample = threshold_sample(
                predicted_original_sample, config.dynamic_thresholding_ratio, config.sample_max_value
            )
        elif config.clip_sample:
            predicted_original_sample = np.clip(predicted_original_sample, -config.clip_sample_range, config.clip_sample_range)

        # 6. the consistency-model output
        denoised = c_out * predicted_original_sample + c_skip * sample

        # 7. re-noise to the next timestep (multistep consistency sampling), except at the last step
        if self.step_index != self.num_inference_steps - 1:
            noise = randn(model_output.shape, generator, denoised.dtype)
            prev_sample = np.sqrt(alpha_prod_t_prev) * denoised
            noise *= np.sqrt(beta_prod_t_prev)
            prev_sample += noise
        else:
            prev_sample = denoised

        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        return velocity_vp(self.alphas_cumprod, sample, noise, timesteps)

    def previous_timestep(self, timestep: int) -> int:
        if self.custom_timesteps or self.num_inference_steps:
            index = int(np.flatnonzero(self.timesteps == timestep)[0])
            return -1 if index == self.timesteps.shape[0] - 1 else int(self.timesteps[index + 1])
        return timestep - 1
