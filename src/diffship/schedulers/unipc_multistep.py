"""UniPC: a unified predictor-corrector framework for fast sampling of diffusion models (Zhao et al. 2023,
https://arxiv.org/abs/2302.04867).

Each step first corrects the sample just reached with the new model output (UniC, Algorithm 2 / eq. 8), then
predicts the next one (UniP, Algorithm 1), both of order p using the last p model outputs. The coefficients rho
solve the small linear system R rho = b of eq. 7, with B(h) = h ("bh1") or e^h - 1 ("bh2"). Works in x0
(`predict_x0`, UniPC with DPM-Solver++ data prediction) or eps parameterization.
"""

from __future__ import annotations

import math

import numpy as np

from .base import Scheduler
from .config import register_to_config
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


class UniPCMultistepScheduler(Scheduler):
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
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = [],  # noqa: B006 - diffusers' default, kept for config parity; never mutated
        solver_p=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        shift_terminal: float | None = None,
    ):
        check_one_sigma_spacing(self.config)
        self.betas = make_betas("UniPCMultistepScheduler", num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if shift_terminal is not None and not use_flow_sigmas:
            raise ValueError("`shift_terminal` is only supported when `use_flow_sigmas=True`.")
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_for(self.betas)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24
        self.alpha_t = np.sqrt(self.alphas_cumprod)
        self.sigma_t = np.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = np.log(self.alpha_t) - np.log(self.sigma_t)
        self.sigmas = training_sigmas(self.alphas_cumprod)
        self.init_noise_sigma = 1.0

        if solver_type not in ("bh1", "bh2"):
            if solver_type in ("midpoint", "heun", "logrho"):
                self._register_hidden({"solver_type": "bh2"})
            else:
                raise NotImplementedError(f"{solver_type} is not implemented for {type(self).__name__}")

        self.predict_x0 = predict_x0
        self.num_inference_steps = None
        self.timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self.model_outputs = [None] * solver_order
        self.timestep_list = [None] * solver_order
        self.lower_order_nums = 0
        self.disable_corrector = list(disable_corrector)
        self.solver_p = solver_p
        self.last_sample = None
        self._step_index = None
        self._begin_index = None

    # ---- schedule -----------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None):
        config = self.config
        if config.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
        if sigmas is not None:
            if not config.use_flow_sigmas:
                raise ValueError(
                    "Passing `sigmas` is only supported when `use_flow_sigmas=True`. Please set `use_flow_sigmas=True` "
                    "during scheduler initialization."
                )
            num_inference_steps = len(sigmas)

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

        spacing = sigma_spacing(config)
        if spacing is not None:
            if sigmas is None:
                sigmas = training_sigmas(self.alphas_cumprod)
            log_sigmas = np.log(sigmas)
            sigmas = convert_sigmas(config, np.flip(sigmas).copy(), num_inference_steps, spacing)
            if spacing == "karras" and config.use_flow_sigmas:
                sigmas = sigmas / (sigmas + 1)
                timesteps = (sigmas * n_train).copy()
            else:
                timesteps = sigma_to_t(sigmas, log_sigmas)
                if spacing == "karras":
                    timesteps = timesteps.round()
            sigma_last = self._final_sigma(sigmas[-1])
        elif config.use_flow_sigmas:
            if sigmas is None:
                sigmas = np.linspace(1, 1 / n_train, num_inference_steps + 1)[:-1]
            if config.use_dynamic_shifting:
                sigmas = self.time_shift(mu, 1.0, sigmas)
            else:
                sigmas = config.flow_shift * sigmas / (1 + (config.flow_shift - 1) * sigmas)
            if config.shift_terminal:
                sigmas = self.stretch_shift_to_terminal(sigmas)
            eps = 1e-06
            if np.fabs(sigmas[0] - 1) < eps:
                sigmas[0] -= eps  # sigma = 1 would make alpha_t = 0
            timesteps = (sigmas * n_train).copy()
            sigma_last = self._final_sigma(sigmas[-1])
        else:
            if sigmas is None:
                sigmas = training_sigmas(self.alphas_cumprod)
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
            sigma_last = self._final_sigma(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)

        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * config.solver_order
        self.lower_order_nums = 0
        self.last_sample = None
        if self.solver_p:
            self.solver_p.set_timesteps(self.num_inference_steps)
        self._step_index = None
        self._begin_index = None

    def _final_sigma(self, sigma_min):
        if self.config.final_sigmas_type == "sigma_min":
            return sigma_min
        if self.config.final_sigmas_type == "zero":
            return 0
        raise ValueError(f"`final_sigmas_type` must be one of 'zero', or 'sigma_min', but got {self.config.final_sigmas_type}")

    def time_shift(self, mu: float, sigma: float, t):
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        if self.config.time_shift_type == "linear":
            return mu / (mu + (1 / t - 1) ** sigma)
        return None

    def stretch_shift_to_terminal(self, t):
        """Stretch a flow schedule so that its last value is `shift_terminal`."""
        one_minus_z = 1 - t
        scale_factor = one_minus_z[-1] / (1 - self.config.shift_terminal)
        return 1 - one_minus_z / scale_factor

    def _sigma_to_alpha_sigma_t(self, sigma):
        if self.config.use_flow_sigmas:
            return 1 - sigma, sigma
        alpha_t = 1 / (sigma**2 + 1) ** 0.5
        return alpha_t, sigma * alpha_t

    def _lambda(self, index: int):
        """alpha, sigma and lambda = log(alpha / sigma) at schedule index `index` (lambda = inf at sigma = 0)."""
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index])
        with np.errstate(divide="ignore"):
            return alpha, sigma, np.log(alpha) - np.log(sigma)

    # ---- model output -> x0 or eps ------------------------------------------------------------------------
    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        config = self.config
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index])
        if self.predict_x0:
            if config.prediction_type == "epsilon":
                x0_pred = (sample - sigma_t * model_output) / alpha_t
            elif config.prediction_type == "sample":
                x0_pred = model_output
            elif config.prediction_type == "v_prediction":
                x0_pred = alpha_t * sample - sigma_t * model_output
            elif config.prediction_type == "flow_prediction":
                x0_pred = sample - self.sigmas[self.step_index] * model_output
            else:
                raise ValueError(
                    f"prediction_type given as {config.prediction_type} must be one of `epsilon`, `sample`, `v_prediction`, "
                    "or `flow_prediction` for the UniPCMultistepScheduler."
                )
            if config.thresholding:
                x0_pred = threshold_sample(x0_pred, config.dynamic_thresholding_ratio, config.sample_max_value)
            return x0_pred
        if config.prediction_type == "epsilon":
            return model_output
        if config.prediction_type == "sample":
            return (sample - alpha_t * model_output) / sigma_t
        if config.prediction_type == "v_prediction":
            return alpha_t * model_output + sigma_t * sample
        raise ValueError(
            f"prediction_type given as {config.prediction_type} must be one of `epsilon`, `sample`, or `v_prediction` "
            "for the UniPCMultistepScheduler."
        )

    # ---- the linear system of eq. 7 -----------------------------------------------------------------------
    def _coefficients(self, h, order: int, rks: list):
        """(R, b, h_phi_1, B_h) for order `order`: R[i] = rks^i, b[i] = i! phi_{i+1}(hh) / B(hh) (eq. 7)."""
        rks = np.array([*rks, np.float32(1.0)], dtype=np.float32)
        hh = -h if self.predict_x0 else h
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        if self.config.solver_type == "bh1":
            B_h = hh
        elif self.config.solver_type == "bh2":
            B_h = np.expm1(hh)
        else:
            raise NotImplementedError()
        R, b = [], []
        for i in range(1, order + 1):
            R.append(rks ** (i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        return np.stack(R).astype(np.float32), np.array(b, dtype=np.float32), h_phi_1, B_h

    def multistep_uni_p_bh_update(self, model_output: np.ndarray, sample: np.ndarray, order: int) -> np.ndarray:
        """UniP: predict x at the next timestep from the last `order` model outputs (Algorithm 1)."""
        model_output_list = self.model_outputs
        s0 = self.timestep_list[-1]
        m0 = model_output_list[-1]
        x = sample
        if self.solver_p:  # another solver as predictor (UniC on top of it)
            return self.solver_p.step(model_output, s0, x).prev_sample

        alpha_t, sigma_t, lambda_t = self._lambda(self.step_index + 1)
        alpha_s0, sigma_s0, lambda_s0 = self._lambda(self.step_index)
        h = lambda_t - lambda_s0

        rks, D1s = [], []
        for i in range(1, order):
            si = self.step_index - i
            mi = model_output_list[-(i + 1)]
            _, _, lambda_si = self._lambda(si)
            rk = (lambda_si - lambda_s0) / h
            rks.append(rk)
            D1s.append((mi - m0) / rk)
        R, b, h_phi_1, B_h = self._coefficients(h, order, rks)

        if D1s:
            rhos_p = np.array([0.5], dtype=x.dtype) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).astype(x.dtype)
            pred_res = _weighted_sum(rhos_p, D1s)
        else:
            pred_res = 0
        if self.predict_x0:
            x_t_ = (sigma_t / sigma_s0) * x - (alpha_t * h_phi_1) * m0
            x_t = x_t_ - (alpha_t * B_h) * pred_res
        else:
            x_t_ = (alpha_t / alpha_s0) * x - (sigma_t * h_phi_1) * m0
            x_t = x_t_ - (sigma_t * B_h) * pred_res
        return x_t.astype(x.dtype, copy=False)

    def multistep_uni_c_bh_update(self, this_model_output, last_sample, this_sample, order: int) -> np.ndarray:
        """UniC: correct the sample just reached using the model output there (Algorithm 2)."""
        model_output_list = self.model_outputs
        m0 = model_output_list[-1]
        x = last_sample
        model_t = this_model_output

        alpha_t, sigma_t, lambda_t = self._lambda(self.step_index)
        alpha_s0, sigma_s0, lambda_s0 = self._lambda(self.step_index - 1)
        h = lambda_t - lambda_s0

        rks, D1s = [], []
        for i in range(1, order):
            si = self.step_index - (i + 1)
            mi = model_output_list[-(i + 1)]
            _, _, lambda_si = self._lambda(si)
            rk = (lambda_si - lambda_s0) / h
            rks.append(rk)
            D1s.append((mi - m0) / rk)
        R, b, h_phi_1, B_h = self._coefficients(h, order, rks)
        rhos_c = np.array([0.5], dtype=x.dtype) if order == 1 else np.linalg.solve(R, b).astype(x.dtype)

        corr_res = _weighted_sum(rhos_c[:-1], D1s) if D1s else 0
        D1_t = model_t - m0
        if self.predict_x0:
            x_t_ = (sigma_t / sigma_s0) * x - (alpha_t * h_phi_1) * m0
            x_t = x_t_ - (alpha_t * B_h) * (corr_res + rhos_c[-1] * D1_t)
        else:
            x_t_ = (alpha_t / alpha_s0) * x - (sigma_t * h_phi_1) * m0
            x_t = x_t_ - (sigma_t * B_h) * (corr_res + rhos_c[-1] * D1_t)
        return x_t.astype(x.dtype, copy=False)

    # ---- step ---------------------------------------------------------------------------------------------
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

        use_corrector = (
            self.step_index > 0 and self.step_index - 1 not in self.disable_corrector and self.last_sample is not None
        )
        model_output_convert = self.convert_model_output(model_output, sample=sample)
        if use_corrector:
            sample = self.multistep_uni_c_bh_update(
                this_model_output=model_output_convert, last_sample=self.last_sample, this_sample=sample, order=self.this_order
            )

        for i in range(self.config.solver_order - 1):
            self.model_outputs[i] = self.model_outputs[i + 1]
            self.timestep_list[i] = self.timestep_list[i + 1]
        self.model_outputs[-1] = model_output_convert
        self.timestep_list[-1] = timestep

        if self.config.lower_order_final:
            this_order = min(self.config.solver_order, len(self.timesteps) - self.step_index)
        else:
            this_order = self.config.solver_order
        self.this_order = min(this_order, self.lower_order_nums + 1)  # warm up: order grows with the history
        assert self.this_order > 0

        self.last_sample = sample
        prev_sample = self.multistep_uni_p_bh_update(model_output=model_output, sample=sample, order=self.this_order)
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


def _weighted_sum(weights: np.ndarray, arrays: list[np.ndarray]) -> np.ndarray:
    """sum_k weights[k] * arrays[k] (diffusers' einsum 'k,bkc...->bc...' without stacking the arrays)."""
    total = weights[0] * arrays[0]
    for w, a in zip(weights[1:], arrays[1:]):
        total += w * a
    return total
