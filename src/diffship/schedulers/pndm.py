"""PNDM: Pseudo Numerical Methods for Diffusion Models (Liu et al. 2022, https://arxiv.org/abs/2202.09778).

The denoising ODE is integrated with a linear multistep method (PLMS, a 4th-order Adams-Bashforth on the model's
eps outputs); its first three points come from Runge-Kutta steps (PRK, 4 model calls each) unless
`skip_prk_steps`, in which case a 2nd-order start replaces them (what Stable Diffusion uses). Every step moves x
with the "transfer" part of eq. 11, `_get_prev_sample`.
"""

from __future__ import annotations

import numpy as np

from .base import Scheduler
from .config import register_to_config
from .output import SchedulerOutput
from .schedules import add_noise_vp, alphas_cumprod_for, make_betas


class PNDMScheduler(Scheduler):
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ):
        self.betas = make_betas("PNDMScheduler", num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_for(self.betas)
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.pndm_order = 4  # PLMS uses the last 4 eps outputs
        self._reset_state()
        self.num_inference_steps = None
        self._timesteps = np.arange(0, num_train_timesteps)[::-1].copy()
        self.prk_timesteps = None
        self.plms_timesteps = None
        self.timesteps = None

    def _reset_state(self) -> None:
        self.cur_model_output = 0  # running RK4 weighted sum of eps over the 4 PRK sub-steps
        self.counter = 0
        self.cur_sample = None
        self.ets: list[np.ndarray] = []  # past eps outputs, newest last

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        config = self.config
        self.num_inference_steps = num_inference_steps
        n_train = config.num_train_timesteps
        if config.timestep_spacing == "linspace":
            self._timesteps = np.linspace(0, n_train - 1, num_inference_steps).round().astype(np.int64)
        elif config.timestep_spacing == "leading":
            step_ratio = n_train // num_inference_steps
            self._timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()
            self._timesteps += config.steps_offset
        elif config.timestep_spacing == "trailing":
            step_ratio = n_train / num_inference_steps
            self._timesteps = np.round(np.arange(n_train, 0, -step_ratio))[::-1].astype(np.int64)
            self._timesteps -= 1
        else:
            raise ValueError(
                f"{config.timestep_spacing} is not supported. Please make sure to choose one of 'linspace', 'leading' or 'trailing'."
            )

        if config.skip_prk_steps:
            # The second-to-last timestep is repeated: the 2nd-order start evaluates the model twice there.
            self.prk_timesteps = np.array([])
            self.plms_timesteps = np.concatenate(
                [self._timesteps[:-1], self._timesteps[-2:-1], self._timesteps[-1:]]
            )[::-1].copy()
        else:
            # Each PRK step visits t, t - h/2 (twice) and t - h.
            prk_timesteps = np.array(self._timesteps[-self.pndm_order :]).repeat(2) + np.tile(
                np.array([0, n_train // num_inference_steps // 2]), self.pndm_order
            )
            self.prk_timesteps = prk_timesteps[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = self._timesteps[:-3][::-1].copy()

        self.timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self._reset_state()

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray, return_dict: bool = True):
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self.step_prk(model_output, timestep, sample, return_dict=return_dict)
        return self.step_plms(model_output, timestep, sample, return_dict=return_dict)

    def step_prk(self, model_output: np.ndarray, timestep: int, sample: np.ndarray, return_dict: bool = True):
        """One Runge-Kutta sub-step; 4 of them make a step of the pseudo 4th-order RK method (eq. 13)."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        timestep = int(timestep)
        diff_to_prev = 0 if self.counter % 2 else self.config.num_train_timesteps // self.num_inference_steps // 2
        prev_timestep = timestep - diff_to_prev
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])

        # RK4 weights 1/6, 1/3, 1/3, 1/6 on the four eps evaluations
        if self.counter % 4 == 0:
            self.cur_model_output += 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif (self.counter - 1) % 4 == 0:
            self.cur_model_output += 1 / 3 * model_output
        elif (self.counter - 2) % 4 == 0:
            self.cur_model_output += 1 / 3 * model_output
        elif (self.counter - 3) % 4 == 0:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0

        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._get_prev_sample(cur_sample, timestep, prev_timestep, model_output)
        self.counter += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def step_plms(self, model_output: np.ndarray, timestep: int, sample: np.ndarray, return_dict: bool = True):
        """One linear multistep step (eq. 12): Adams-Bashforth on up to the last 4 eps outputs."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError(
                f"{type(self).__name__} can only be run AFTER scheduler has been run in 'prk' mode for at least 12 "
                "iterations."
            )
        timestep = int(timestep)
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps

        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            # the repeated timestep of the 2nd-order start: redo the previous step with the averaged eps
            prev_timestep = timestep
            timestep = timestep + self.config.num_train_timesteps // self.num_inference_steps

        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])

        prev_sample = self._get_prev_sample(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def scale_model_input(self, sample: np.ndarray, *args, **kwargs) -> np.ndarray:
        return sample

    def _get_prev_sample(self, sample: np.ndarray, timestep: int, prev_timestep: int, model_output: np.ndarray):
        """x_{t-delta} from x_t and eps: the transfer function phi of eq. 11, written with a = alphas_cumprod."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev

        if self.config.prediction_type == "v_prediction":
            model_output = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
        elif self.config.prediction_type != "epsilon":
            raise ValueError(f"prediction_type given as {self.config.prediction_type} must be one of `epsilon` or `v_prediction`")

        # (a_{t-d} / a_t)^0.5 x_t - (a_{t-d} - a_t) eps / (a_t (1 - a_{t-d})^0.5 + (a_t (1 - a_t) a_{t-d})^0.5)
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** 0.5
        model_output_denom_coeff = alpha_prod_t * beta_prod_t_prev**0.5 + (
            alpha_prod_t * beta_prod_t * alpha_prod_t_prev
        ) ** 0.5
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / model_output_denom_coeff

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)
