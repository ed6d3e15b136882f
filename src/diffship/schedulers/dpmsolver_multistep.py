"""DPM-Solver (Lu et al. 2022, https://arxiv.org/abs/2206.00927) and DPM-Solver++ (Lu et al. 2022,
https://arxiv.org/abs/2211.01095), multistep form, with the SDE variants.

The diffusion ODE is solved exactly in its linear part by working in lambda = log(alpha_t / sigma_t) (half the
log-SNR); the model's x0 (DPM-Solver++) or eps (DPM-Solver) prediction is extrapolated from the last 1-3 steps:

    first order  (== DDIM):  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D0               (++, eq. 5)
    second order (midpoint): ... - 0.5 alpha_t (e^{-h} - 1) D1,  D1 = (m0 - m1) / r0,  r0 = h_0 / h  (++, Alg. 2)

h = lambda_t - lambda_s. "sde-dpmsolver++" is the stochastic variant (DPM-Solver++ paper, sec. 5 / appendix),
which adds sigma_t sqrt(1 - e^{-2h}) z and doubles the exponent of the deterministic part.
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
    threshold_sample,
    training_sigmas,
)

ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")


class DPMSolverMultistepScheduler(Scheduler):
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
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        check_one_sigma_spacing(self.config)
        self.betas = make_betas(
            "DPMSolverMultistepScheduler", num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_for(self.betas)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # keep lambda finite at zero terminal SNR
        # VP schedule: alpha_t, sigma_t and half-log-SNR lambda_t of every training timestep
        self.alpha_t = np.sqrt(self.alphas_cumprod)
        self.sigma_t = np.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = np.log(self.alpha_t) - np.log(self.sigma_t)
        self.sigmas = training_sigmas(self.alphas_cumprod)
        self.init_noise_sigma = 1.0

        # legacy names diffusers maps onto supported ones
        if algorithm_type not in ALGORITHM_TYPES:
            if algorithm_type == "deis":
                self._register_hidden({"algorithm_type": "dpmsolver++"})
            else:
                raise NotImplementedError(f"{algorithm_type} is not implemented for {type(self).__name__}")
        if solver_type not in ("midpoint", "heun"):
            if solver_type in ("logrho", "bh1", "bh2"):
                self._register_hidden({"solver_type": "midpoint"})
            else:
                raise NotImplementedError(f"{solver_type} is not implemented for {type(self).__name__}")
        if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and final_sigmas_type == "zero":
            raise ValueError(
                f"`final_sigmas_type` {final_sigmas_type} is not supported for `algorithm_type` {algorithm_type}. "
                "Please choose `sigma_min` instead."
            )

        self.flow_shift = flow_shift
        self.num_inference_steps = None
        self.timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self.model_outputs = [None] * solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    # ---- schedule -----------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, mu: float | None = None, timesteps=None):
        config = self.config
        if mu is not None:
            if not (config.use_dynamic_shifting and config.time_shift_type == "exponential"):
                raise ValueError("`mu` needs use_dynamic_shifting=True and time_shift_type='exponential'.")
            self.flow_shift = np.exp(mu)
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        spacing = sigma_spacing(config)
        if timesteps is not None and (spacing is not None or config.use_lu_lambdas):
            raise ValueError(f"Cannot use `timesteps` with `config.use_{spacing or 'lu_lambdas'}{'_sigmas' if spacing else ''} = True`")

        if timesteps is not None:
            timesteps = np.array(timesteps).astype(np.int64)
        else:
            # lambda_min_clipped: skip the noisiest timesteps whose lambda is below it (cosine schedules)
            clipped_idx = int(np.searchsorted(self.lambda_t[::-1], config.lambda_min_clipped, side="left"))
            last_timestep = config.num_train_timesteps - clipped_idx
            if config.timestep_spacing == "linspace":
                timesteps = (
                    np.linspace(0, last_timestep - 1, num_inference_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
                )
            elif config.timestep_spacing == "leading":
                step_ratio = last_timestep // (num_inference_steps + 1)
                timesteps = (np.arange(0, num_inference_steps + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
                timesteps += config.steps_offset
            elif config.timestep_spacing == "trailing":
                step_ratio = config.num_train_timesteps / num_inference_steps
                timesteps = np.arange(last_timestep, 0, -step_ratio).round().copy().astype(np.int64)
                timesteps -= 1
            else:
                raise ValueError(
                    f"{config.timestep_spacing} is not supported. Please make sure to choose one of 'linspace', 'leading' or 'trailing'."
                )

        train_sigmas = training_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train_sigmas)
        round_timesteps = config.beta_schedule != "squaredcos_cap_v2"
        if spacing is not None:
            sigmas = convert_sigmas(config, np.flip(train_sigmas).copy(), num_inference_steps, spacing)
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if spacing == "karras" and round_timesteps:
                timesteps = timesteps.round()
        elif config.use_lu_lambdas:
            # Lu et al.'s original spacing: uniform in lambda
            lambdas = np.flip(log_sigmas.copy())
            lambdas = np.linspace(float(lambdas[0]), float(lambdas[-1]), num_inference_steps)
            sigmas = np.exp(lambdas)
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if round_timesteps:
                timesteps = timesteps.round()
        elif config.use_flow_sigmas:
            alphas = np.linspace(1, 1 / config.num_train_timesteps, num_inference_steps + 1)
            sigmas = 1.0 - alphas
            sigmas = np.flip(self.flow_shift * sigmas / (1 + (self.flow_shift - 1) * sigmas))[:-1].copy()
            timesteps = (sigmas * config.num_train_timesteps).copy()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)

        if config.final_sigmas_type == "sigma_min":
            sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        elif config.final_sigmas_type == "zero":
            sigma_last = 0
        else:
            raise ValueError(f"`final_sigmas_type` must be one of 'zero', or 'sigma_min', but got {config.final_sigmas_type}")
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def _sigma_to_alpha_sigma_t(self, sigma):
        """(alpha_t, sigma_t) of the VP process whose sigma-space noise level is `sigma` (or of a flow-matching one)."""
        if self.config.use_flow_sigmas:
            return 1 - sigma, sigma
        alpha_t = 1 / (sigma**2 + 1) ** 0.5
        return alpha_t, sigma * alpha_t

    def _lambda(self, index: int):
        """alpha, sigma and lambda = log(alpha / sigma) at schedule index `index` (lambda = inf at sigma = 0)."""
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index])
        with np.errstate(divide="ignore"):
            return alpha, sigma, np.log(alpha) - np.log(sigma)

    # ---- model output -> x0 (DPM-Solver++) or eps (DPM-Solver) --------------------------------------------
    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        config = self.config
        if config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            if config.prediction_type == "epsilon":
                if config.variance_type in ("learned", "learned_range"):
                    model_output = model_output[:, :3]
                alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index])
                x0_pred = (sample - sigma_t * model_output) / alpha_t
            elif config.prediction_type == "sample":
                x0_pred = model_output
            elif config.prediction_type == "v_prediction":
                alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index])
                x0_pred = alpha_t * sample - sigma_t * model_output
            elif config.prediction_type == "flow_prediction":
                x0_pred = sample - self.sigmas[self.step_index] * model_output
            else:
                raise ValueError(
                    f"prediction_type given as {config.prediction_type} must be one of `epsilon`, `sample`, `v_prediction`, "
                    "or `flow_prediction` for the DPMSolverMultistepScheduler."
                )
            if config.thresholding:
                x0_pred = threshold_sample(x0_pred, config.dynamic_thresholding_ratio, config.sample_max_value)
            return x0_pred

        # DPM-Solver: noise prediction
        if config.prediction_type == "epsilon":
            epsilon = model_output[:, :3] if config.variance_type in ("learned", "learned_range") else model_output
        elif config.prediction_type == "sample":
            alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index])
            epsilon = (sample - alpha_t * model_output) / sigma_t
        elif config.prediction_type == "v_prediction":
            alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index])
            epsilon = alpha_t * model_output + sigma_t * sample
        else:
            raise ValueError(
                f"prediction_type given as {config.prediction_type} must be one of `epsilon`, `sample`, or `v_prediction` "
                "for the DPMSolverMultistepScheduler."
            )
        if config.thresholding:
            alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index])
            x0_pred = (sample - sigma_t * epsilon) / alpha_t
            x0_pred = threshold_sample(x0_pred, config.dynamic_thresholding_ratio, config.sample_max_value)
            epsilon = (sample - alpha_t * x0_pred) / sigma_t
        return epsilon

    # ---- solver updates -----------------------------------------------------------------------------------
    def dpm_solver_first_order_update(self, model_output: np.ndarray, sample: np.ndarray, noise=None) -> np.ndarray:
        alpha_t, sigma_t, lambda_t = self._lambda(self.step_index + 1)
        alpha_s, sigma_s, lambda_s = self._lambda(self.step_index)
        h = lambda_t - lambda_s
        algorithm_type = self.config.algorithm_type
        if algorithm_type == "dpmsolver++":
            return (sigma_t / sigma_s) * sample - (alpha_t * (np.exp(-h) - 1.0)) * model_output
        if algorithm_type == "dpmsolver":
            return (alpha_t / alpha_s) * sample - (sigma_t * (np.exp(h) - 1.0)) * model_output
        if algorithm_type == "sde-dpmsolver++":
            return (
                (sigma_t / sigma_s * np.exp(-h)) * sample
                + (alpha_t * (1 - np.exp(-2.0 * h))) * model_output
                + (sigma_t * np.sqrt(1.0 - np.exp(-2 * h))) * noise
            )
        # sde-dpmsolver
        return (
            (alpha_t / alpha_s) * sample
            - (2.0 * (sigma_t * (np.exp(h) - 1.0))) * model_output
            + (sigma_t * np.sqrt(np.exp(2 * h) - 1.0)) * noise
        )

    def multistep_dpm_solver_second_order_update(self, model_output_list, sample: np.ndarray, noise=None) -> np.ndarray:
        alpha_t, sigma_t, lambda_t = self._lambda(self.step_index + 1)
        alpha_s0, sigma_s0, lambda_s0 = self._lambda(self.step_index)
        _, _, lambda_s1 = self._lambda(self.step_index - 1)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        algorithm_type, solver_type = self.config.algorithm_type, self.config.solver_type
        if algorithm_type == "dpmsolver++":
            if solver_type == "midpoint":
                return (
                    (sigma_t / sigma_s0) * sample
                    - (alpha_t * (np.exp(-h) - 1.0)) * D0
                    - (0.5 * (alpha_t * (np.exp(-h) - 1.0))) * D1
                )
            return (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (np.exp(-h) - 1.0)) * D0
                + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * D1
            )
        if algorithm_type == "dpmsolver":
            if solver_type == "midpoint":
                return (
                    (alpha_t / alpha_s0) * sample
                    - (sigma_t * (np.exp(h) - 1.0)) * D0
                    - (0.5 * (sigma_t * (np.exp(h) - 1.0))) * D1
                )
            return (
                (alpha_t / alpha_s0) * sample
                - (sigma_t * (np.exp(h) - 1.0)) * D0
                - (sigma_t * ((np.exp(h) - 1.0) / h - 1.0)) * D1
            )
        if algorithm_type == "sde-dpmsolver++":
            if solver_type == "midpoint":
                return (
                    (sigma_t / sigma_s0 * np.exp(-h)) * sample
                    + (alpha_t * (1 - np.exp(-2.0 * h))) * D0
                    + (0.5 * (alpha_t * (1 - np.exp(-2.0 * h)))) * D1
                    + (sigma_t * np.sqrt(1.0 - np.exp(-2 * h))) * noise
                )
            return (
                (sigma_t / sigma_s0 * np.exp(-h)) * sample
                + (alpha_t * (1 - np.exp(-2.0 * h))) * D0
                + (alpha_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
                + (sigma_t * np.sqrt(1.0 - np.exp(-2 * h))) * noise
            )
        # sde-dpmsolver
        if solver_type == "midpoint":
            return (
                (alpha_t / alpha_s0) * sample
                - (2.0 * (sigma_t * (np.exp(h) - 1.0))) * D0
                - (sigma_t * (np.exp(h) - 1.0)) * D1
                + (sigma_t * np.sqrt(np.exp(2 * h) - 1.0)) * noise
            )
        return (
            (alpha_t / alpha_s0) * sample
            - (2.0 * (sigma_t * (np.exp(h) - 1.0))) * D0
            - (2.0 * (sigma_t * ((np.exp(h) - 1.0) / h - 1.0))) * D1
            + (sigma_t * np.sqrt(np.exp(2 * h) - 1.0)) * noise
        )

    def multistep_dpm_solver_third_order_update(self, model_output_list, sample: np.ndarray, noise=None) -> np.ndarray:
        alpha_t, sigma_t, lambda_t = self._lambda(self.step_index + 1)
        alpha_s0, sigma_s0, lambda_s0 = self._lambda(self.step_index)
        _, _, lambda_s1 = self._lambda(self.step_index - 1)
        _, _, lambda_s2 = self._lambda(self.step_index - 2)
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D0 = m0
        D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        algorithm_type = self.config.algorithm_type
        if algorithm_type == "dpmsolver++":
            return (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (np.exp(-h) - 1.0)) * D0
                + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * D1
                - (alpha_t * ((np.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2
            )
        if algorithm_type == "dpmsolver":
            return (
                (alpha_t / alpha_s0) * sample
                - (sigma_t * (np.exp(h) - 1.0)) * D0
                - (sigma_t * ((np.exp(h) - 1.0) / h - 1.0)) * D1
                - (sigma_t * ((np.exp(h) - 1.0 - h) / h**2 - 0.5)) * D2
            )
        if algorithm_type == "sde-dpmsolver++":
            return (
                (sigma_t / sigma_s0 * np.exp(-h)) * sample
                + (alpha_t * (1.0 - np.exp(-2.0 * h))) * D0
                + (alpha_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
                + (alpha_t * ((1.0 - np.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2
                + (sigma_t * np.sqrt(1.0 - np.exp(-2 * h))) * noise
            )
        return None  # diffusers has no third-order sde-dpmsolver either: it returns None there

    # ---- step ---------------------------------------------------------------------------------------------
    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """As the base rule, except that a timestep not in the schedule means the last step (diffusers)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        candidates = np.flatnonzero(schedule_timesteps == np.asarray(timestep).reshape(()))
        if len(candidates) == 0:
            return len(self.timesteps) - 1
        return int(candidates[1] if len(candidates) > 1 else candidates[0])

    def step(
        self,
        model_output: np.ndarray,
        timestep,
        sample: np.ndarray,
        generator=None,
        variance_noise: np.ndarray | None = None,
        return_dict: bool = True,
    ):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        config = self.config
        n = len(self.timesteps)
        # Lower-order steps at the end stabilise few-step sampling (and a final sigma of 0 needs a 1st-order step).
        lower_order_final = self.step_index == n - 1 and (
            config.euler_at_final or (config.lower_order_final and n < 15) or config.final_sigmas_type == "zero"
        )
        lower_order_second = self.step_index == n - 2 and config.lower_order_final and n < 15

        model_output = self.convert_model_output(model_output, sample=sample)
        for i in range(config.solver_order - 1):
            self.model_outputs[i] = self.model_outputs[i + 1]
        self.model_outputs[-1] = model_output

        sample = sample.astype(np.float32, copy=False)
        if config.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++"):
            noise = randn(model_output.shape, generator, np.float32) if variance_noise is None else variance_noise.astype(np.float32)
        else:
            noise = None

        if config.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self.dpm_solver_first_order_update(model_output, sample=sample, noise=noise)
        elif config.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev_sample = self.multistep_dpm_solver_second_order_update(self.model_outputs, sample=sample, noise=noise)
        else:
            prev_sample = self.multistep_dpm_solver_third_order_update(self.model_outputs, sample=sample, noise=noise)

        if self.lower_order_nums < config.solver_order:
            self.lower_order_nums += 1
        prev_sample = prev_sample.astype(model_output.dtype, copy=False)
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
