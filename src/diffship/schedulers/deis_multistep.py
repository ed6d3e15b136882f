"""DEIS: Diffusion Exponential Integrator Sampler (Zhang & Chen 2022, https://arxiv.org/abs/2204.13902), the
multistep "log-rho" variant.

With rho = sigma_t / alpha_t, x / alpha is integrated exactly in its linear part; eps along the way is the
Lagrange polynomial (in log rho) through the last 1-3 eps outputs, whose integrals `ind_fn` have closed forms
(the paper's eq. 15 with polynomial extrapolation, sec. 4):

    x_t = alpha_t (x_s / alpha_s + sum_j coef_j eps_j)
"""

from __future__ import annotations

import numpy as np

from .base import Scheduler
from .config import register_to_config
from .output import SchedulerOutput
from .schedules import (
    alphas_cumprod_for,
    check_one_sigma_spacing,
    convert_sigmas,
    make_betas,
    sigma_spacing,
    sigma_to_t,
    threshold_sample,
    training_sigmas,
)


class DEISMultistepScheduler(Scheduler):
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "deis",
        solver_type: str = "logrho",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        check_one_sigma_spacing(self.config)
        self.betas = make_betas("DEISMultistepScheduler", num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_for(self.betas)
        self.alpha_t = np.sqrt(self.alphas_cumprod)
        self.sigma_t = np.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = np.log(self.alpha_t) - np.log(self.sigma_t)
        self.sigmas = training_sigmas(self.alphas_cumprod)
        self.init_noise_sigma = 1.0

        # other solvers' names map onto DEIS's only variant (as in diffusers)
        if algorithm_type != "deis":
            if algorithm_type in ("dpmsolver", "dpmsolver++"):
                self._register_hidden({"algorithm_type": "deis"})
            else:
                raise NotImplementedError(f"{algorithm_type} is not implemented for {type(self).__name__}")
        if solver_type != "logrho":
            if solver_type in ("midpoint", "heun", "bh1", "bh2"):
                self._register_hidden({"solver_type": "logrho"})
            else:
                raise NotImplementedError(f"solver type {solver_type} is not implemented for {type(self).__name__}")

        self.flow_shift = flow_shift
        self.num_inference_steps = None
        self.timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self.model_outputs = [None] * solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def set_timesteps(self, num_inference_steps: int, device=None, mu: float | None = None) -> None:
        config = self.config
        if mu is not None:
            if not (config.use_dynamic_shifting and config.time_shift_type == "exponential"):
                raise ValueError("`mu` needs use_dynamic_shifting=True and time_shift_type='exponential'.")
            self.flow_shift = np.exp(mu)
        n_train = config.num_train_timesteps
        if config.timestep_spacing == "linspace":
            timesteps = np.linspace(0, n_train - 1, num_inference_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif config.timestep_spacing == "leading":
            step_ratio = n_train // (num_inference_steps + 1)
            timesteps = (np.arange(0, num_inference_steps + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += config.steps_offset
        elif config.timestep_spacing == "trailing":
            step_ratio = n_train / num_inference_steps
            timesteps = np.arange(n_train, 0, -step_ratio).round().copy().astype(np.int64)
            timesteps -= 1
        else:
            raise ValueError(
                f"{config.timestep_spacing} is not supported. Please make sure to choose one of 'linspace', 'leading' or 'trailing'."
            )

        train_sigmas = training_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train_sigmas)
        spacing = sigma_spacing(config)
        if spacing is not None:
            sigmas = convert_sigmas(config, np.flip(train_sigmas).copy(), num_inference_steps, spacing)
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if spacing == "karras":
                timesteps = timesteps.round()
            # DEIS never steps to sigma = 0: the last sigma is repeated
            sigmas = np.concatenate([sigmas, sigmas[-1:]]).astype(np.float32)
        elif config.use_flow_sigmas:
            alphas = np.linspace(1, 1 / n_train, num_inference_steps + 1)
            sigmas = 1.0 - alphas
            sigmas = np.flip(self.flow_shift * sigmas / (1 + (self.flow_shift - 1) * sigmas))[:-1].copy()
            timesteps = (sigmas * n_train).copy()
            sigmas = np.concatenate([sigmas, sigmas[-1:]]).astype(np.float32)
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
            sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
            sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)

        self.sigmas = sigmas
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def _sigma_to_alpha_sigma_t(self, sigma):
        if self.config.use_flow_sigmas:
            return 1 - sigma, sigma
        alpha_t = 1 / (sigma**2 + 1) ** 0.5
        return alpha_t, sigma * alpha_t

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """The model output as eps (DEIS integrates eps), through x0 so that thresholding can apply."""
        config = self.config
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index])
        if config.prediction_type == "epsilon":
            x0_pred = (sample - sigma_t * model_output) / alpha_t
        elif config.prediction_type == "sample":
            x0_pred = model_output
        elif config.prediction_type == "v_prediction":
            x0_pred = alpha_t * sample - sigma_t * model_output
        elif config.prediction_type == "flow_prediction":
            sigma_t = self.sigmas[self.step_index]
            x0_pred = sample - sigma_t * model_output
        else:
            raise ValueError(
                f"prediction_type given as {config.prediction_type} must be one of `epsilon`, `sample`, `v_prediction`, "
                "or `flow_prediction` for the DEISMultistepScheduler."
            )
        if config.thresholding:
            x0_pred = threshold_sample(x0_pred, config.dynamic_thresholding_ratio, config.sample_max_value)
        if config.algorithm_type == "deis":
            return (sample - alpha_t * x0_pred) / sigma_t
        raise NotImplementedError("only support log-rho multistep deis now")

    def deis_first_order_update(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index + 1])
        alpha_s, sigma_s = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index])
        lambda_t = np.log(alpha_t) - np.log(sigma_t)
        lambda_s = np.log(alpha_s) - np.log(sigma_s)
        h = lambda_t - lambda_s
        return (alpha_t / alpha_s) * sample - (sigma_t * (np.exp(h) - 1.0)) * model_output

    def multistep_deis_second_order_update(self, model_output_list, sample: np.ndarray) -> np.ndarray:
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index + 1])
        alpha_s0, sigma_s0 = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index])
        alpha_s1, sigma_s1 = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index - 1])
        m0, m1 = model_output_list[-1], model_output_list[-2]
        rho_t, rho_s0, rho_s1 = sigma_t / alpha_t, sigma_s0 / alpha_s0, sigma_s1 / alpha_s1

        def ind_fn(t, b, c):
            # integral of the linear Lagrange basis (in log rho) that is 1 at b and 0 at c
            return t * (-np.log(c) + np.log(t) - 1) / (np.log(b) - np.log(c))

        coef1 = ind_fn(rho_t, rho_s0, rho_s1) - ind_fn(rho_s0, rho_s0, rho_s1)
        coef2 = ind_fn(rho_t, rho_s1, rho_s0) - ind_fn(rho_s0, rho_s1, rho_s0)
        return alpha_t * (sample / alpha_s0 + coef1 * m0 + coef2 * m1)

    def multistep_deis_third_order_update(self, model_output_list, sample: np.ndarray) -> np.ndarray:
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index + 1])
        alpha_s0, sigma_s0 = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index])
        alpha_s1, sigma_s1 = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index - 1])
        alpha_s2, sigma_s2 = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index - 2])
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        rho_t, rho_s0, rho_s1, rho_s2 = sigma_t / alpha_t, sigma_s0 / alpha_s0, sigma_s1 / alpha_s1, sigma_s2 / alpha_s2

        def ind_fn(t, b, c, d):
            # integral of the quadratic Lagrange basis (in log rho) that is 1 at b and 0 at c and d
            numerator = t * (
                np.log(c) * (np.log(d) - np.log(t) + 1)
                - np.log(d) * np.log(t)
                + np.log(d)
                + np.log(t) ** 2
                - 2 * np.log(t)
                + 2
            )
            denominator = (np.log(b) - np.log(c)) * (np.log(b) - np.log(d))
            return numerator / denominator

        coef1 = ind_fn(rho_t, rho_s0, rho_s1, rho_s2) - ind_fn(rho_s0, rho_s0, rho_s1, rho_s2)
        coef2 = ind_fn(rho_t, rho_s1, rho_s2, rho_s0) - ind_fn(rho_s0, rho_s1, rho_s2, rho_s0)
        coef3 = ind_fn(rho_t, rho_s2, rho_s0, rho_s1) - ind_fn(rho_s0, rho_s2, rho_s0, rho_s1)
        return alpha_t * (sample / alpha_s0 + coef1 * m0 + coef2 * m1 + coef3 * m2)

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """As the base rule, except that a timestep not in the schedule means the last step (diffusers)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        candidates = np.flatnonzero(schedule_timesteps == np.asarray(timestep).reshape(()))
        if len(candidates) == 0:
            return len(self.timesteps) - 1
        return int(candidates[1] if len(candidates) > 1 else candidates[0])

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        n = len(self.timesteps)
        lower_order_final = self.step_index == n - 1 and self.config.lower_order_final and n < 15
        lower_order_second = self.step_index == n - 2 and self.config.lower_order_final and n < 15

        model_output = self.convert_model_output(model_output, sample=sample)
        for i in range(self.config.solver_order - 1):
            self.model_outputs[i] = self.model_outputs[i + 1]
        self.model_outputs[-1] = model_output

        if self.config.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self.deis_first_order_update(model_output, sample=sample)
        elif self.config.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev_sample = self.multistep_deis_second_order_update(self.model_outputs, sample=sample)
        else:
            prev_sample = self.multistep_deis_third_order_update(self.model_outputs, sample=sample)

        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def scale_model_input(self, sample: np.ndarray, *args, **kwargs) -> np.ndarray:
        return sample

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        sigma = self.sigmas.astype(original_samples.dtype)[self._noise_step_indices(timesteps)]
        sigma = sigma.reshape((-1,) + (1,) * (original_samples.ndim - 1))
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        return alpha_t * original_samples + sigma_t * noise
