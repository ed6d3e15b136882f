"""Which options each scheduler is tested with: one option at a time on top of the defaults (the cartesian
product explodes), plus the configs real pipelines ship (SD 1.x / 2.x v-prediction / SDXL-like)."""

from __future__ import annotations

import numpy as np

STEPS = (1, 2, 4, 25, 50)

# Stable Diffusion's training schedule; most real configs use it.
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
TRAINED_BETAS = np.linspace(0.0001, 0.02, 1000).tolist()


def custom_timesteps(steps: int) -> dict:
    return {"timesteps": np.linspace(999, 0, steps).round().astype(int).tolist()[: steps] if steps > 1 else [999]}


def custom_float_timesteps(steps: int) -> dict:
    return {"timesteps": np.linspace(999, 0, steps).round().tolist() if steps > 1 else [999.0]}


def custom_sigmas(steps: int) -> dict:
    return {"sigmas": np.geomspace(14.6, 0.03, steps).tolist() + [0.0]}


COMMON_BETAS = {
    "linear": {"beta_schedule": "linear"},
    "scaled_linear": dict(SD),
    "squaredcos": {"beta_schedule": "squaredcos_cap_v2"},
    "trained_betas": {"trained_betas": TRAINED_BETAS},
    "train_500": {"num_train_timesteps": 500},
}
SPACINGS = {
    "linspace": {"timestep_spacing": "linspace"},
    "leading": {"timestep_spacing": "leading", "steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing"},
}
PREDICTIONS = {
    "epsilon": {"prediction_type": "epsilon"},
    "v_prediction": {**SD, "prediction_type": "v_prediction"},
    "sample": {"prediction_type": "sample"},
}
THRESHOLDING = {
    "thresholding": {"thresholding": True, "sample_max_value": 1.5},
    "thresholding_ratio": {"thresholding": True, "sample_max_value": 1.2, "dynamic_thresholding_ratio": 0.9},
}
SIGMA_SPACINGS = {
    "karras": {**SD, "use_karras_sigmas": True},
    "exponential": {**SD, "use_exponential_sigmas": True},
    "beta_sigmas": {**SD, "use_beta_sigmas": True},
}


def opt(config=None, set_kwargs=None, step_kwargs=None, learned_variance=False):
    return {
        "config": config or {},
        "set_kwargs": set_kwargs,
        "step_kwargs": step_kwargs or {},
        "learned_variance": learned_variance,
    }


def _from(*dicts: dict[str, dict], **extra) -> dict[str, dict]:
    out = {}
    for d in dicts:
        for name, cfg in d.items():
            out[name] = opt(cfg)
    for name, value in extra.items():
        out[name] = value if isinstance(value, dict) and "config" in value else opt(value)
    return out


OPTIONS: dict[str, dict[str, dict]] = {
    "DDPMScheduler": _from(
        COMMON_BETAS,
        SPACINGS,
        PREDICTIONS,
        THRESHOLDING,
        sigmoid={"beta_schedule": "sigmoid"},
        no_clip={"clip_sample": False},
        clip_range={"clip_sample_range": 0.5},
        fixed_small_log={"variance_type": "fixed_small_log"},
        fixed_large={"variance_type": "fixed_large"},
        learned=opt({"variance_type": "learned"}, learned_variance=True),
        learned_range=opt({"variance_type": "learned_range"}, learned_variance=True),
        zero_snr={**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
        custom_timesteps=opt(set_kwargs=custom_timesteps),
    ),
    "DDIMScheduler": _from(
        COMMON_BETAS,
        SPACINGS,
        PREDICTIONS,
        THRESHOLDING,
        no_clip={"clip_sample": False},
        clip_range={"clip_sample_range": 0.5},
        alpha_to_one_false={"set_alpha_to_one": False},
        zero_snr={**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        eta=opt(step_kwargs={"eta": 0.7}),
        eta_clipped_output=opt({"clip_sample_range": 0.5}, step_kwargs={"eta": 1.0, "use_clipped_model_output": True}),
    ),
    "PNDMScheduler": _from(
        COMMON_BETAS,
        SPACINGS,
        prk={"skip_prk_steps": False},
        skip_prk={"skip_prk_steps": True},
        sd={**SD, "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1},
        v_prediction={**SD, "prediction_type": "v_prediction", "skip_prk_steps": True},
        alpha_to_one={"set_alpha_to_one": True},
    ),
    "EulerDiscreteScheduler": _from(
        COMMON_BETAS,
        SPACINGS,
        PREDICTIONS,
        SIGMA_SPACINGS,
        log_linear={**SD, "interpolation_type": "log_linear"},
        sigma_min_max={**SD, "use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 10.0},
        final_sigma_min={**SD, "final_sigmas_type": "sigma_min"},
        continuous_v={**SD, "timestep_type": "continuous", "prediction_type": "v_prediction"},
        zero_snr={**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
        custom_timesteps=opt(set_kwargs=custom_float_timesteps),
        custom_sigmas=opt(SD, set_kwargs=custom_sigmas),
        churn=opt(SD, step_kwargs={"s_churn": 0.5, "s_tmin": 0.1, "s_tmax": 10.0}),
    ),
}

OPTIONS["EulerAncestralDiscreteScheduler"] = _from(
    COMMON_BETAS,
    SPACINGS,
    PREDICTIONS,
    zero_snr={**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
)



K_FAMILY_BASE = _from(COMMON_BETAS, SPACINGS, SIGMA_SPACINGS)
OPTIONS["LMSDiscreteScheduler"] = {**K_FAMILY_BASE, **_from(PREDICTIONS)}
OPTIONS["HeunDiscreteScheduler"] = {
    **K_FAMILY_BASE,
    **_from(
        PREDICTIONS,
        exp_betas={"beta_schedule": "exp"},
        clip_sample={"clip_sample": True, "clip_sample_range": 2.0, "prediction_type": "sample"},
        custom_timesteps=opt(SD, set_kwargs=custom_float_timesteps),
    ),
}
OPTIONS["KDPM2DiscreteScheduler"] = {**K_FAMILY_BASE, **_from(PREDICTIONS)}
OPTIONS["KDPM2AncestralDiscreteScheduler"] = {**K_FAMILY_BASE, **_from(PREDICTIONS)}

def flow_sigmas(steps: int) -> dict:
    return {"num_inference_steps": None, "sigmas": np.linspace(1.0, 0.05, steps)}  # an array, as pipelines pass it


def flow_mu(steps: int) -> dict:
    return {"num_inference_steps": steps, "mu": 0.8}


DPM_SOLVER = {
    **_from(COMMON_BETAS, SPACINGS, PREDICTIONS, THRESHOLDING, SIGMA_SPACINGS),
    **_from(
        lu_lambdas={**SD, "use_lu_lambdas": True},
        order_1={"solver_order": 1},
        order_3={"solver_order": 3},
        heun={"solver_type": "heun"},
        dpmsolver={"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
        dpmsolver_heun_order3={"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun", "solver_order": 3},
        sde_dpmsolver_pp={**SD, "algorithm_type": "sde-dpmsolver++"},
        sde_dpmsolver_pp_heun={**SD, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
        sde_dpmsolver_pp_order3={**SD, "algorithm_type": "sde-dpmsolver++", "solver_order": 3},
        sde_dpmsolver={"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"},
        sde_dpmsolver_heun={"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun"},
        no_lower_order_final={"lower_order_final": False},
        euler_at_final={**SD, "euler_at_final": True, "use_karras_sigmas": True},
        final_sigma_min={**SD, "final_sigmas_type": "sigma_min"},
        lambda_min_clipped={"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
        karras_squaredcos={"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True},
        zero_snr={**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        flow={"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"},
        flow_dynamic_shift=opt(
            {"use_flow_sigmas": True, "use_dynamic_shifting": True, "time_shift_type": "exponential", "prediction_type": "flow_prediction"},
            set_kwargs=flow_mu,
        ),
        # what SD3 / Flux / Sana users switch to (the velocity stand-in model drives every flow option)
        flow_order_3={"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction", "solver_order": 3},
        flow_sde={"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction", "algorithm_type": "sde-dpmsolver++"},
        flow_karras={"use_flow_sigmas": True, "use_karras_sigmas": True, "prediction_type": "flow_prediction"},
        legacy_deis_name={"algorithm_type": "deis", "final_sigmas_type": "sigma_min"},
        legacy_bh2_name={"solver_type": "bh2"},
        custom_timesteps=opt(SD, set_kwargs=custom_timesteps),
        sd_karras={**SD, "use_karras_sigmas": True, "steps_offset": 1, "timestep_spacing": "leading"},
    ),
}
OPTIONS["DPMSolverMultistepScheduler"] = DPM_SOLVER

OPTIONS["DPMSolverSinglestepScheduler"] = {
    **_from(COMMON_BETAS, PREDICTIONS, THRESHOLDING, SIGMA_SPACINGS),
    **_from(
        order_1={"solver_order": 1},
        order_3={"solver_order": 3},
        order_3_heun={"solver_order": 3, "solver_type": "heun"},
        heun={"solver_type": "heun"},
        lower_order_final={"lower_order_final": True},
        dpmsolver={"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
        dpmsolver_order3={"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3},
        dpmsolver_heun={"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun", "solver_order": 3},
        dpmsolver_thresholding={"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "thresholding": True},
        sde_dpmsolver_pp={**SD, "algorithm_type": "sde-dpmsolver++"},
        sde_dpmsolver_pp_order3={**SD, "algorithm_type": "sde-dpmsolver++", "solver_order": 3},
        sde_dpmsolver_pp_order3_heun={**SD, "algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun"},
        final_sigma_min={**SD, "final_sigmas_type": "sigma_min"},
        final_sigma_min_order3={**SD, "final_sigmas_type": "sigma_min", "solver_order": 3},
        lambda_min_clipped={"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
        flow={"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"},
        flow_dynamic_shift=opt(
            {"use_flow_sigmas": True, "use_dynamic_shifting": True, "time_shift_type": "exponential", "prediction_type": "flow_prediction"},
            set_kwargs=flow_mu,
        ),
        custom_timesteps=opt(SD, set_kwargs=custom_timesteps),
    ),
}


OPTIONS["UniPCMultistepScheduler"] = {
    **_from(COMMON_BETAS, SPACINGS, PREDICTIONS, THRESHOLDING, SIGMA_SPACINGS),
    **_from(
        order_1={"solver_order": 1},
        order_3={"solver_order": 3},
        bh1={"solver_type": "bh1"},
        bh1_order3={"solver_type": "bh1", "solver_order": 3},
        predict_eps={"predict_x0": False},
        predict_eps_v={**SD, "predict_x0": False, "prediction_type": "v_prediction", "solver_order": 3},
        no_lower_order_final={"lower_order_final": False},
        disable_corrector={"disable_corrector": [0, 2]},
        final_sigma_min={**SD, "final_sigmas_type": "sigma_min"},
        karras_sigma_min_max={**SD, "use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
        zero_snr={**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        flow={"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"},
        flow_karras={"use_flow_sigmas": True, "use_karras_sigmas": True, "prediction_type": "flow_prediction"},
        flow_bh1_order_3={"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction", "solver_type": "bh1", "solver_order": 3},
        flow_shift_terminal={"use_flow_sigmas": True, "shift_terminal": 0.1, "prediction_type": "flow_prediction"},
        flow_custom_sigmas=opt({"use_flow_sigmas": True, "prediction_type": "flow_prediction"}, set_kwargs=flow_sigmas),
        flow_dynamic_shift=opt(
            {"use_flow_sigmas": True, "use_dynamic_shifting": True, "prediction_type": "flow_prediction"}, set_kwargs=flow_mu
        ),
        flow_dynamic_shift_linear=opt(
            {"use_flow_sigmas": True, "use_dynamic_shifting": True, "time_shift_type": "linear", "prediction_type": "flow_prediction"},
            set_kwargs=flow_mu,
        ),
        legacy_midpoint_name={"solver_type": "midpoint"},
        solver_p={"solver_p": "DPMSolverMultistepScheduler"},
    ),
}

OPTIONS["DEISMultistepScheduler"] = {
    **_from(COMMON_BETAS, SPACINGS, PREDICTIONS, THRESHOLDING, SIGMA_SPACINGS),
    **_from(
        order_1={"solver_order": 1},
        order_3={"solver_order": 3},
        order_3_karras={**SD, "solver_order": 3, "use_karras_sigmas": True},
        no_lower_order_final={"lower_order_final": False, "solver_order": 3},
        flow={"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"},
        flow_dynamic_shift=opt(
            {"use_flow_sigmas": True, "use_dynamic_shifting": True, "time_shift_type": "exponential", "prediction_type": "flow_prediction"},
            set_kwargs=flow_mu,
        ),
        legacy_dpmsolver_name={"algorithm_type": "dpmsolver++", "solver_type": "midpoint"},
    ),
}

# Flow matching (SD3, Flux, and the video models' options). The scheduler ignores base/max shift and image seq len:
# the pipelines turn them into `mu` (schedules.calculate_shift, compared with diffusers' in test_flow_matching.py);
# the options that set them pass the mu they give.
from diffship.schedulers.schedules import calculate_shift, flux_default_sigmas  # noqa: E402

FLUX_IMAGE_SEQ_LEN = 1024  # a 512 x 512 image: (512 / 8 / 2) ** 2 packed latent tokens


def flux_schedule(steps: int) -> dict:
    """What FluxPipeline passes: its default sigmas and mu from the image size (with the config's defaults)."""
    return {"sigmas": flux_default_sigmas(steps), "mu": calculate_shift(FLUX_IMAGE_SEQ_LEN)}


def flow_mu_from_seq_lens(steps: int) -> dict:
    return {"num_inference_steps": steps, "mu": calculate_shift(FLUX_IMAGE_SEQ_LEN, 128, 8192, 0.3, 1.5)}


def flow_custom_sigmas(steps: int) -> dict:
    return {"sigmas": np.linspace(1.0, 0.05, steps).tolist()}


def flow_custom_timesteps(steps: int) -> dict:
    return {"timesteps": np.linspace(1000.0, 50.0, steps).tolist()}


def flow_sigmas_and_timesteps(steps: int) -> dict:
    sigmas = np.linspace(1.0, 0.05, steps)
    return {"num_inference_steps": steps, "sigmas": sigmas.tolist(), "timesteps": (sigmas * 900).tolist()}


SD3_SHIFT = {"shift": 3.0}
OPTIONS["FlowMatchEulerDiscreteScheduler"] = _from(
    sd3=SD3_SHIFT,
    train_500={"num_train_timesteps": 500, "shift": 3.0},
    flux_dev=opt(
        {"use_dynamic_shifting": True, "shift": 3.0, "base_shift": 0.5, "max_shift": 1.15,
         "base_image_seq_len": 256, "max_image_seq_len": 4096},
        set_kwargs=flux_schedule,
    ),
    flux_schnell=opt({"shift": 1.0}, set_kwargs=lambda steps: {"sigmas": flux_default_sigmas(steps)}),
    dynamic_shift_seq_lens=opt(
        {"use_dynamic_shifting": True, "base_shift": 0.3, "max_shift": 1.5, "base_image_seq_len": 128,
         "max_image_seq_len": 8192},
        set_kwargs=flow_mu_from_seq_lens,
    ),
    dynamic_shift_linear=opt({"use_dynamic_shifting": True, "time_shift_type": "linear"}, set_kwargs=flow_mu),
    invert_sigmas={"invert_sigmas": True, "shift": 3.0},  # Mochi
    shift_terminal={"shift": 3.0, "shift_terminal": 0.1},  # LTX-Video
    karras={**SD3_SHIFT, "use_karras_sigmas": True},
    exponential={**SD3_SHIFT, "use_exponential_sigmas": True},
    beta_sigmas={**SD3_SHIFT, "use_beta_sigmas": True},
    stochastic={**SD3_SHIFT, "stochastic_sampling": True},
    custom_sigmas=opt(SD3_SHIFT, set_kwargs=flow_custom_sigmas),
    custom_timesteps=opt(SD3_SHIFT, set_kwargs=flow_custom_timesteps),
    sigmas_and_timesteps=opt(SD3_SHIFT, set_kwargs=flow_sigmas_and_timesteps),
    churn_arguments=opt(SD3_SHIFT, step_kwargs={"s_churn": 0.5, "s_tmin": 0.1, "s_tmax": 10.0, "s_noise": 1.003}),
)
OPTIONS["FlowMatchHeunDiscreteScheduler"] = _from(
    sd3=SD3_SHIFT,
    train_500={"num_train_timesteps": 500, "shift": 3.0},
    churn=opt(SD3_SHIFT, step_kwargs={"s_churn": 1.0}),
    churn_window=opt(SD3_SHIFT, step_kwargs={"s_churn": 1.0, "s_tmin": 0.2, "s_tmax": 0.8, "s_noise": 1.003}),
)

# No per-case tolerances. Where a step is ill-conditioned in float32 -- in diffusers as much as here -- the test
# computes what it may add from float32's roundoff and the step's own values (bounds.py: Heun / KDPM2 correctors,
# DEIS coefficients), and where a value diffusers computes is ill-defined it checks that value within its bound and
# compares the rest from the exact one (bounds.fix_reference_schedule: KDPM2 and Euler ancestral's sigma_down,
# DDIM's direction coefficient at eta near 1).


def lcm_custom_timesteps(steps: int) -> dict:
    return {"timesteps": [999, 759, 499, 259, 19][: max(1, min(steps, 5))]}


def with_original_steps(steps: int) -> dict:
    return {"num_inference_steps": steps, "original_inference_steps": 100}


def with_strength(steps: int) -> dict:
    return {"num_inference_steps": steps, "strength": 0.6}


_CONSISTENCY = _from(
    COMMON_BETAS,
    PREDICTIONS,
    THRESHOLDING,
    clip_sample={"clip_sample": True, "clip_sample_range": 0.8},
    alpha_to_one_false={"set_alpha_to_one": False},
    timestep_scaling={"timestep_scaling": 5.0},
    original_steps_config={"original_inference_steps": 100},
    zero_snr={"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    custom_timesteps=opt(set_kwargs=lcm_custom_timesteps),
    original_steps_argument=opt(set_kwargs=with_original_steps),
    strength_argument=opt(set_kwargs=with_strength),
    keys_without_effect={"steps_offset": 1, "timestep_spacing": "trailing"},
)
OPTIONS["LCMScheduler"] = dict(_CONSISTENCY)
OPTIONS["TCDScheduler"] = {
    **_CONSISTENCY,
    **_from(
        eta_0=opt(step_kwargs={"eta": 0.0}),
        eta_1=opt(step_kwargs={"eta": 1.0}),
    ),
}

# Combinations diffusers itself refuses (raises on); the test asserts diffship refuses them too, and that nothing
# else is refused, so an option cannot silently drop out of the comparison.
_ALL = set(STEPS)
EXPECTED_REFUSALS: dict[tuple[str, str], set[int]] = {
    **{("PNDMScheduler", name): {1, 2} for name in OPTIONS["PNDMScheduler"] if name not in ("skip_prk", "sd", "v_prediction")},
    ("EulerAncestralDiscreteScheduler", "sample"): _ALL,  # NotImplementedError in diffusers
    ("KDPM2DiscreteScheduler", "sample"): _ALL,
    ("KDPM2AncestralDiscreteScheduler", "sample"): _ALL,
    # beta / Karras spacings that produce duplicate timesteps step past the end of the schedule
    ("DPMSolverMultistepScheduler", "beta_sigmas"): {50},
    ("DPMSolverMultistepScheduler", "karras_squaredcos"): {4, 25, 50},
    ("DPMSolverSinglestepScheduler", "beta_sigmas"): {50},
    ("UniPCMultistepScheduler", "beta_sigmas"): {50},
    ("DEISMultistepScheduler", "beta_sigmas"): {50},
    ("DPMSolverSinglestepScheduler", "dpmsolver_thresholding"): _ALL,  # diffusers indexes with a None timestep
    ("LCMScheduler", "strength_argument"): {50},  # 50 steps > 50 x 0.6 original steps
    ("TCDScheduler", "strength_argument"): {50},
    # one step: the stretch divides by 1 - sigma_last = 0, the timestep is NaN and not found in the schedule
    ("FlowMatchEulerDiscreteScheduler", "shift_terminal"): {1},
}
