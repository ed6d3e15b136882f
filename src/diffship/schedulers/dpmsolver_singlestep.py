"""DPM-Solver / DPM-Solver++, singlestep form (Lu et al. 2022, https://arxiv.org/abs/2206.00927, Algorithms 1-2;
https://arxiv.org/abs/2211.01095, Algorithm 1).

Unlike the multistep form, a k-th order step reuses no history from earlier intervals: the schedule is cut into
groups of 1, 2 or 3 timesteps (`order_list`), each group starting from the sample at its first timestep (`self.sample`)
and using the model outputs at the intermediate timesteps inside the group. The model-output conversion and the
first-order update are the multistep scheduler's.
"""

from __future__ import annotations

import numpy as np

from .base import Scheduler
from .config import register_to_config
from .dpmsolver_multistep import DPMSolverMultistepScheduler
from .noise import randn
from .output import SchedulerOutput
from .schedules import (
    alphas_cumprod_for,
    check_one_sigma_spacing,
    convert_sigmas,
    make_betas,
    sigma_spacing,
    sigma_to_t,
    training_sigmas,
)

ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++", "sde-dpmsolver++")


class DPMSolverSinglestepScheduler(Scheduler):
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
        lower_order_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        check_one_sigma_spacing(self.config)
        self.betas = make_betas(
            "DPMSolverSinglestepScheduler", num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_for(self.betas)
        self.alpha_t = np.sqrt(self.alphas_cumprod)
        self.sigma_t = np.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = np.log(self.alpha_t) - np.log(self.sigma_t)
        self.sigmas = training_sigmas(self.alphas_cumprod)
        self.init_noise_sigma = 1.0

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
        if algorithm_type == "dpmsolver" and thresholding:
            # diffusers indexes its schedule with a timestep it no longer receives and fails on this combination
            raise NotImplementedError("thresholding with algorithm_type='dpmsolver' is not supported; use 'dpmsolver++'.")

        self.flow_shift = flow_shift
        self.num_inference_steps = None
        self.timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self.model_outputs = [None] * solver_order
        self.sample = None
        self.order_list = self.get_order_list(num_train_timesteps)
        self._step_index = None
        self._begin_index = None

    # shared with the multistep solver: same conversion to x0 / eps, same DDIM-like first-order step
    _sigma_to_alpha_sigma_t = DPMSolverMultistepScheduler._sigma_to_alpha_sigma_t
    _lambda = DPMSolverMultistepScheduler._lambda
    convert_model_output = DPMSolverMultistepScheduler.convert_model_output
    dpm_solver_first_order_update = DPMSolverMultistepScheduler.dpm_solver_first_order_update
    index_for_timestep = DPMSolverMultistepScheduler.index_for_timestep

    def get_order_list(self, num_inference_steps: int) -> list[int]:
        """The solver order of each step: repeating groups [1, 2, 3] (or [1, 2]), lower order at the end."""
        steps = num_inference_steps
        order = self.config.solver_order
        if order > 3:
            raise ValueError("Order > 3 is not supported by this scheduler")
        if self.config.lower_order_final:
            if order == 3:
                if steps % 3 == 0:
                    orders = [1, 2, 3] * (steps // 3 - 1) + [1, 2] + [1]
                elif steps % 3 == 1:
                    orders = [1, 2, 3] * (steps // 3) + [1]
                else:
                    orders = [1, 2, 3] * (steps // 3) + [1, 2]
            elif order == 2:
                if steps % 2 == 0:
                    orders = [1, 2] * (steps // 2 - 1) + [1, 1]
                else:
                    orders = [1, 2] * (steps // 2) + [1]
            else:
                orders = [1] * steps
        elif order == 3:
            orders = [1, 2, 3] * (steps // 3)
        elif order == 2:
            orders = [1, 2] * (steps // 2)
        else:
            orders = [1] * steps
        if self.config.final_sigmas_type == "zero":
            orders[-1] = 1
        return orders

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, mu: float | None = None, timesteps=None):
        config = self.config
        if mu is not None:
            if not (config.use_dynamic_shifting and config.time_shift_type == "exponential"):
                raise ValueError("`mu` needs use_dynamic_shifting=True and time_shift_type='exponential'.")
            self.flow_shift = np.exp(mu)
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Must pass exactly one of  `num_inference_steps` or `timesteps`.")
        spacing = sigma_spacing(config)
        if timesteps is not None and spacing is not None:
            raise ValueError(f"Cannot set `timesteps` with `config.use_{spacing}_sigmas = True`.")
        num_inference_steps = num_inference_steps or len(timesteps)
        self.num_inference_steps = num_inference_steps

        if timesteps is not None:
            timesteps = np.array(timesteps).astype(np.int64)
        else:
            clipped_idx = int(np.searchsorted(self.lambda_t[::-1], config.lambda_min_clipped, side="left"))
            timesteps = (
                np.linspace(0, config.num_train_timesteps - 1 - clipped_idx, num_inference_steps + 1)
                .round()[::-1][:-1]
                .copy()
                .astype(np.int64)
            )

        train_sigmas = training_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train_sigmas)
        if spacing is not None:
            sigmas = convert_sigmas(config, np.flip(train_sigmas).copy(), num_inference_steps, spacing)
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if spacing == "karras":
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
            raise ValueError(f" `final_sigmas_type` must be one of `sigma_min` or `zero`, but got {config.final_sigmas_type}")
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.model_outputs = [None] * config.solver_order
        self.sample = None

        # An uneven step count, or a final sigma of 0, needs lower-order final steps; diffusers switches the
        # config over for good (and so do we, so that later set_timesteps calls agree with it).
        if not config.lower_order_final and (num_inference_steps % config.solver_order != 0 or config.final_sigmas_type == "zero"):
            self._register_hidden({"lower_order_final": True})
        self.order_list = self.get_order_list(num_inference_steps)
        self._step_index = None
        self._begin_index = None

    # ---- updates within a group (h measured from the group's start s_{k-1}) ------------------------------
    def singlestep_dpm_solver_second_order_update(self, model_output_list, sample: np.ndarray, noise=None) -> np.ndarray:
        alpha_t, sigma_t, lambda_t = self._lambda(self.step_index + 1)
        _, _, lambda_s0 = self._lambda(self.step_index)
        alpha_s1, sigma_s1, lambda_s1 = self._lambda(self.step_index - 1)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        h, h_0 = lambda_t - lambda_s1, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m1, (1.0 / r0) * (m0 - m1)
        algorithm_type, solver_type = self.config.algorithm_type, self.config.solver_type
        if algorithm_type == "dpmsolver++":
            if solver_type == "midpoint":
                return (
                    (sigma_t / sigma_s1) * sample
                    - (alpha_t * (np.exp(-h) - 1.0)) * D0
                    - (0.5 * (alpha_t * (np.exp(-h) - 1.0))) * D1
                )
            return (
                (sigma_t / sigma_s1) * sample
                - (alpha_t * (np.exp(-h) - 1.0)) * D0
                + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * D1
            )
        if algorithm_type == "dpmsolver":
            if solver_type == "midpoint":
                return (
                    (alpha_t / alpha_s1) * sample
                    - (sigma_t * (np.exp(h) - 1.0)) * D0
                    - (0.5 * (sigma_t * (np.exp(h) - 1.0))) * D1
                )
            return (
                (alpha_t / alpha_s1) * sample
                - (sigma_t * (np.exp(h) - 1.0)) * D0
                - (sigma_t * ((np.exp(h) - 1.0) / h - 1.0)) * D1
            )
        # sde-dpmsolver++
        if solver_type == "midpoint":
            return (
                (sigma_t / sigma_s1 * np.exp(-h)) * sample
                + (alpha_t * (1 - np.exp(-2.0 * h))) * D0
                + (0.5 * (alpha_t * (1 - np.exp(-2.0 * h)))) * D1
                + (sigma_t * np.sqrt(1.0 - np.exp(-2 * h))) * noise
            )
        return (
            (sigma_t / sigma_s1 * np.exp(-h)) * sample
            + (alpha_t * (1 - np.exp(-2.0 * h))) * D0
            + (alpha_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
            + (sigma_t * np.sqrt(1.0 - np.exp(-2 * h))) * noise
        )

    def singlestep_dpm_solver_third_order_update(self, model_output_list, sample: np.ndarray, noise=None) -> np.ndarray:
        alpha_t, sigma_t, lambda_t = self._lambda(self.step_index + 1)
        _, _, lambda_s0 = self._lambda(self.step_index)
        _, _, lambda_s1 = self._lambda(self.step_index - 1)
        alpha_s2, sigma_s2, lambda_s2 = self._lambda(self.step_index - 2)
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = lambda_t - lambda_s2, lambda_s0 - lambda_s2, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D0 = m2
        D1_0, D1_1 = (1.0 / r1) * (m1 - m2), (1.0 / r0) * (m0 - m2)
        D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
        D2 = 2.0 * (D1_1 - D1_0) / (r0 - r1)
        algorithm_type, solver_type = self.config.algorithm_type, self.config.solver_type
        if algorithm_type == "dpmsolver++":
            if solver_type == "midpoint":
                return (
                    (sigma_t / sigma_s2) * sample
                    - (alpha_t * (np.exp(-h) - 1.0)) * D0
                    + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * D1_1
                )
            return (
                (sigma_t / sigma_s2) * sample
                - (alpha_t * (np.exp(-h) - 1.0)) * D0
                + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * D1
                - (alpha_t * ((np.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2
            )
        if algorithm_type == "dpmsolver":
            if solver_type == "midpoint":
                return (
                    (alpha_t / alpha_s2) * sample
                    - (sigma_t * (np.exp(h) - 1.0)) * D0
                    - (sigma_t * ((np.exp(h) - 1.0) / h - 1.0)) * D1_1
                )
            return (
                (alpha_t / alpha_s2) * sample
                - (sigma_t * (np.exp(h) - 1.0)) * D0
                - (sigma_t * ((np.exp(h) - 1.0) / h - 1.0)) * D1
                - (sigma_t * ((np.exp(h) - 1.0 - h) / h**2 - 0.5)) * D2
            )
        # sde-dpmsolver++
        if solver_type == "midpoint":
            return (
                (sigma_t / sigma_s2 * np.exp(-h)) * sample
                + (alpha_t * (1.0 - np.exp(-2.0 * h))) * D0
                + (alpha_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1_1
                + (sigma_t * np.sqrt(1.0 - np.exp(-2 * h))) * noise
            )
        return (
            (sigma_t / sigma_s2 * np.exp(-h)) * sample
            + (alpha_t * (1.0 - np.exp(-2.0 * h))) * D0
            + (alpha_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
            + (alpha_t * ((1.0 - np.exp(-2.0 * h) + -2.0 * h) / (-2.0 * h) ** 2 - 0.5)) * D2
            + (sigma_t * np.sqrt(1.0 - np.exp(-2 * h))) * noise
        )

    def singlestep_dpm_solver_update(self, model_output_list, sample: np.ndarray, order: int, noise=None) -> np.ndarray:
        if order == 1:
            return self.dpm_solver_first_order_update(model_output_list[-1], sample=sample, noise=noise)
        if order == 2:
            return self.singlestep_dpm_solver_second_order_update(model_output_list, sample=sample, noise=noise)
        if order == 3:
            return self.singlestep_dpm_solver_third_order_update(model_output_list, sample=sample, noise=noise)
        raise ValueError(f"Order must be 1, 2, 3, got {order}")

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        model_output = self.convert_model_output(model_output, sample=sample)
        for i in range(self.config.solver_order - 1):
            self.model_outputs[i] = self.model_outputs[i + 1]
        self.model_outputs[-1] = model_output

        noise = randn(model_output.shape, generator, model_output.dtype) if self.config.algorithm_type == "sde-dpmsolver++" else None

        order = self.order_list[self.step_index]
        # after a part-way start the history is short: fall back to the order it supports
        while self.model_outputs[-order] is None:
            order -= 1
        if order == 1:  # a new group starts from the current sample
            self.sample = sample
        prev_sample = self.singlestep_dpm_solver_update(self.model_outputs, sample=self.sample, order=order, noise=noise)

        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def scale_model_input(self, sample: np.ndarray, *args, **kwargs) -> np.ndarray:
        return sample

    add_noise = DPMSolverMultistepScheduler.add_noise
