"""TCD: Trajectory Consistency Distillation (Zheng et al. 2024, https://arxiv.org/abs/2402.19159), strategic
stochastic sampling (sec. 4.3, Algorithm 4).

From x_t the model's x0 and eps give a point on the trajectory at an intermediate time s = floor((1 - gamma) t'),
t' the next timestep: x_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps ("pred_noised_sample"); then forward-diffuse from s
to t' with fresh noise. gamma (`eta`, default 0.3) sets the stochasticity: gamma = 0 is deterministic DDIM-like
jumps, gamma = 1 is LCM's multistep sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Scheduler
from .config import register_to_config
from .noise import randn
from .output import _StepOutput
from .schedules import add_noise_vp, alphas_cumprod_for, make_betas, rescale_zero_terminal_snr, velocity_vp


@dataclass
class TCDSchedulerOutput(_StepOutput):
    prev_sample: np.ndarray
    pred_noised_sample: np.ndarray | None = None


class TCDScheduler(Scheduler):
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
        self.betas = make_betas("TCDScheduler", num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
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
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `custom_timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        n_train = self.config.num_train_timesteps
        original_steps = original_inference_steps if original_inference_steps is not None else self.config.original_inference_steps

        # The distillation schedule: every k-th training timestep. diffusers switches to *all* training timesteps
        # when original_inference_steps is passed explicitly (it tests the argument, not the resolved value).
        if original_inference_steps is None:
            if original_steps > n_train:
                raise ValueError(f"`original_steps`: {original_steps} cannot be larger than `self.config.train_timesteps`: {n_train}.")
            k = n_train // original_steps
            tcd_origin_timesteps = np.asarray(list(range(1, int(original_steps * strength) + 1))) * k - 1
        else:
            tcd_origin_timesteps = np.asarray(list(range(0, int(n_train * strength))))

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
            if original_steps is not None:
                skipping_step = len(tcd_origin_timesteps) // num_inference_steps
                if skipping_step < 1:
                    raise ValueError(
                        f"The combination of `original_steps x strength`: {original_steps} x {strength} is smaller than "
                        f"`num_inference_steps`: {num_inference_steps}."
                    )
            self.num_inference_steps = num_inference_steps
            if original_steps is not None:
                if num_inference_steps > original_steps:
                    raise ValueError(
                        f"`num_inference_steps`: {num_inference_steps} cannot be larger than `original_inference_steps`: {original_steps}."
                    )
            elif num_inference_steps > n_train:
                raise ValueError(f"`num_inference_steps`: {num_inference_steps} cannot be larger than `num_train_timesteps`: {n_train}.")
            tcd_origin_timesteps = tcd_origin_timesteps[::-1].copy()
            inference_indices = np.linspace(0, len(tcd_origin_timesteps), num=num_inference_steps, endpoint=False)
            inference_indices = np.floor(inference_indices).astype(np.int64)
            timesteps = tcd_origin_timesteps[inference_indices]

        self.timesteps = timesteps.astype(np.int64)
        self._step_index = None
        self._begin_index = None

    def step(
        self,
        model_output: np.ndarray,
        timestep,
        sample: np.ndarray,
        eta: float = 0.3,
        generator=None,
        return_dict: bool = True,
    ):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        assert 0 <= eta <= 1.0, "gamma must be less than or equal to 1.0"
        timestep = int(timestep)

        # 1. the next timestep t' and the intermediate s = floor((1 - gamma) t')
        prev_step_index = self.step_index + 1
        prev_timestep = int(self.timesteps[prev_step_index]) if prev_step_index < len(self.timesteps) else 0
        timestep_s = int(np.floor(np.float32(1 - eta) * np.float32(prev_timestep)))

        # 2. alphas and betas
        alpha_prod_t = self.alphas_cumprod[timestep]
        beta_prod_t = 1 - alpha_prod_t
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        alpha_prod_s = self.alphas_cumprod[timestep_s]
        beta_prod_s = 1 - alpha_prod_s

        # 3. x0 and eps from the model output; the trajectory point at s (DDIM from t to s)
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            pred_original_sample = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(alpha_prod_t)
            pred_epsilon = model_output
        elif prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5
        elif prediction_type == "v_prediction":
            pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
            pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
        else:
            raise ValueError(
                f"prediction_type given as {prediction_type} must be one of `epsilon`, `sample` or `v_prediction` for `TCDScheduler`."
            )
        pred_noised_sample = np.sqrt(alpha_prod_s) * pred_original_sample + np.sqrt(beta_prod_s) * pred_epsilon

        # 4. forward-diffuse from s to t' with fresh noise (not at the last step, nor with gamma = 0)
        if eta > 0 and self.step_index != self.num_inference_steps - 1:
            noise = randn(model_output.shape, generator, pred_noised_sample.dtype)
            prev_sample = (
                np.sqrt(alpha_prod_t_prev / alpha_prod_s) * pred_noised_sample
                + np.sqrt(1 - alpha_prod_t_prev / alpha_prod_s) * noise
            )
        else:
            prev_sample = pred_noised_sample

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_noised_sample)
        return TCDSchedulerOutput(prev_sample=prev_sample, pred_noised_sample=pred_noised_sample)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        return velocity_vp(self.alphas_cumprod, sample, noise, timesteps)
