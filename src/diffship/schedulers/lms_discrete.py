"""Linear multistep (LMS) sampler of the probability-flow ODE (k-diffusion's `sample_lms`; Karras et al. 2022).

The derivative d_i = (x_i - D(x_i)) / sigma_i of the last `order` steps is extrapolated by its Lagrange
interpolating polynomial in sigma, which is integrated exactly over [sigma_i, sigma_{i+1}] (Adams-Bashforth):

    x_{i+1} = x_i + sum_j c_ij d_{i-j},   c_ij = integral_{sigma_i}^{sigma_{i+1}} prod_{k != j} (s - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k}) ds
"""

from __future__ import annotations

import numpy as np

from .base import Scheduler
from .config import register_to_config
from .output import SchedulerOutput
from .schedules import alphas_cumprod_for, check_one_sigma_spacing, k_diffusion_sigmas, make_betas, training_sigmas

# Gauss-Legendre with 4 nodes integrates polynomials up to degree 7 exactly; the Lagrange basis has degree <= 3.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(4)


class LMSDiscreteScheduler(Scheduler):
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
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
        self.betas = make_betas("LMSDiscreteScheduler", num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_for(self.betas)
        self.sigmas = np.concatenate([training_sigmas(self.alphas_cumprod)[::-1], [0.0]]).astype(np.float32)
        self.num_inference_steps = None
        self.use_karras_sigmas = use_karras_sigmas
        self.set_timesteps(num_train_timesteps)
        self.derivatives: list[np.ndarray] = []
        self.is_scale_input_called = False

    @property
    def init_noise_sigma(self):
        if self.config.timestep_spacing in ["linspace", "trailing"]:
            return self.sigmas.max()
        return (self.sigmas.max() ** 2 + 1) ** 0.5

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        self.is_scale_input_called = True
        return sample / (sigma**2 + 1) ** 0.5

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """c_{t, current_order}: the integral over [sigma_t, sigma_{t+1}] of the Lagrange basis polynomial that is
        1 at sigma_{t - current_order} and 0 at the other `order - 1` past sigmas."""
        sigmas = self.sigmas.astype(np.float64)
        a, b = sigmas[t], sigmas[t + 1]
        tau = (b - a) / 2 * _GL_NODES + (a + b) / 2
        basis = np.ones_like(tau)
        for k in range(order):
            if k == current_order:
                continue
            basis *= (tau - sigmas[t - k]) / (sigmas[t - current_order] - sigmas[t - k])
        return float((b - a) / 2 * np.dot(_GL_WEIGHTS, basis))

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.num_inference_steps = num_inference_steps
        timesteps, sigmas, _ = k_diffusion_sigmas(self.config, self.alphas_cumprod, num_inference_steps)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = np.asarray(timesteps).astype(np.float32)
        self._step_index = None
        self._begin_index = None
        self.derivatives = []

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, order: int = 4, return_dict: bool = True):
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]

        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            pred_original_sample = sample - sigma * model_output
        elif prediction_type == "v_prediction":
            pred_original_sample = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        elif prediction_type == "sample":
            pred_original_sample = model_output
        else:
            raise ValueError(f"prediction_type given as {prediction_type} must be one of `epsilon`, or `v_prediction`")

        derivative = (sample - pred_original_sample) / sigma
        self.derivatives.append(derivative)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)

        # fewer past derivatives exist at the start: lower the order
        order = min(self.step_index + 1, order)
        lms_coeffs = [self.get_lms_coefficient(order, self.step_index, curr_order) for curr_order in range(order)]
        prev_sample = sample + sum(coeff * d for coeff, d in zip(lms_coeffs, reversed(self.derivatives)))

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        sigma = self.sigmas.astype(original_samples.dtype)[self._noise_step_indices(timesteps)]
        return original_samples + noise * sigma.reshape((-1,) + (1,) * (original_samples.ndim - 1))
