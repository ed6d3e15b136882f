"""Noise schedules shared by the schedulers: betas, alphas_cumprod, sigma spacings, thresholding.

Everything a model was trained with is float32, as in diffusers (whose torch tensors are float32 on CPU), so the
values here match diffusers' to the last bit or two; cumulative products are accumulated in float64 because that
is what torch's CPU `cumprod` does for float32 input.
"""

from __future__ import annotations

import math

import numpy as np

from diffship.errors import DiffshipError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999, alpha_transform_type: str = "cosine"):
    """Betas that discretize a continuous alpha_bar(t) (Nichol & Dhariwal 2021, the "cosine" schedule)."""
    if alpha_transform_type == "cosine":

        def alpha_bar_fn(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    elif alpha_transform_type == "laplace":

        def alpha_bar_fn(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))

    elif alpha_transform_type == "exp":

        def alpha_bar_fn(t):
            return math.exp(t * -12.0)

    else:
        raise ValueError(f"Unsupported alpha_transform_type: {alpha_transform_type}")
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar_fn(t2) / alpha_bar_fn(t1), max_beta))
    return np.array(betas, dtype=np.float32)


def make_betas(
    scheduler_name: str,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas=None,
    extra_schedules: tuple[str, ...] = (),
) -> np.ndarray:
    """The float32 beta schedule named by a scheduler config."""
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float32)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64).astype(np.float32)
    if beta_schedule == "scaled_linear":
        # Stable Diffusion's schedule: linear in sqrt(beta).
        roots = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64).astype(np.float32)
        return roots**2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    if beta_schedule == "exp" and "exp" in extra_schedules:
        return betas_for_alpha_bar(num_train_timesteps, alpha_transform_type="exp")
    if beta_schedule == "laplace" and "laplace" in extra_schedules:
        return betas_for_alpha_bar(num_train_timesteps, alpha_transform_type="laplace")
    if beta_schedule == "sigmoid" and "sigmoid" in extra_schedules:
        x = np.linspace(-6, 6, num_train_timesteps, dtype=np.float64).astype(np.float32)
        return (1 / (1 + np.exp(-x))) * np.float32(beta_end - beta_start) + np.float32(beta_start)
    supported = ", ".join((*BETA_SCHEDULES, *extra_schedules))
    raise NotImplementedError(f"beta_schedule {beta_schedule!r} is not implemented for {scheduler_name}; use one of {supported}.")


def cumprod(values: np.ndarray) -> np.ndarray:
    """float32 cumulative product accumulated in float64 (torch's CPU cumprod does the same)."""
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Algorithm 1)."""
    alphas = 1.0 - betas
    alphas_bar_sqrt = np.sqrt(cumprod(alphas))
    alphas_bar_sqrt_0 = alphas_bar_sqrt[0].copy()
    alphas_bar_sqrt_T = alphas_bar_sqrt[-1].copy()
    # Shift so the last timestep is zero, then scale so the first timestep is back to its old value.
    alphas_bar_sqrt -= alphas_bar_sqrt_T
    alphas_bar_sqrt *= alphas_bar_sqrt_0 / (alphas_bar_sqrt_0 - alphas_bar_sqrt_T)
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def alphas_cumprod_for(betas: np.ndarray) -> np.ndarray:
    return cumprod(1.0 - betas)


# ---- sigma spacings (k-diffusion's) ----------------------------------------------------------------------------
def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM), eq. 5: sigmas evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> np.ndarray:
    """Sigmas evenly spaced in log(sigma)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_inference_steps))


def beta_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, alpha: float = 0.6, beta: float = 0.6):
    """"Beta Sampling is All You Need" (Lee et al. 2024): sigmas at the quantiles of a Beta(alpha, beta)."""
    try:
        import scipy.stats
    except ImportError as error:  # same requirement as diffusers
        raise DiffshipError("use_beta_sigmas=True needs scipy: pip install scipy") from error
    quantiles = [scipy.stats.beta.ppf(t, alpha, beta) for t in 1 - np.linspace(0, 1, num_inference_steps)]
    return np.array([sigma_min + ppf * (sigma_max - sigma_min) for ppf in quantiles])


def check_one_sigma_spacing(config) -> None:
    flags = [config.get("use_beta_sigmas"), config.get("use_exponential_sigmas"), config.get("use_karras_sigmas")]
    if sum(bool(f) for f in flags) > 1:
        raise ValueError(
            "Only one of `config.use_beta_sigmas`, `config.use_exponential_sigmas`, `config.use_karras_sigmas` can be used."
        )
    if config.get("use_beta_sigmas"):
        try:
            import scipy  # noqa: F401
        except ImportError as error:
            raise DiffshipError("use_beta_sigmas=True needs scipy: pip install scipy") from error


def convert_sigmas(config, in_sigmas: np.ndarray, num_inference_steps: int, kind: str) -> np.ndarray:
    """Respace `in_sigmas` (descending) with the `kind` spacing, honouring config.sigma_min / sigma_max."""
    sigma_min = config.get("sigma_min")
    sigma_max = config.get("sigma_max")
    sigma_min = sigma_min if sigma_min is not None else float(in_sigmas[-1])
    sigma_max = sigma_max if sigma_max is not None else float(in_sigmas[0])
    if kind == "karras":
        return karras_sigmas(sigma_min, sigma_max, num_inference_steps)
    if kind == "exponential":
        return exponential_sigmas(sigma_min, sigma_max, num_inference_steps)
    if kind == "beta":
        return beta_sigmas(sigma_min, sigma_max, num_inference_steps)
    raise ValueError(kind)


def sigma_spacing(config) -> str | None:
    for kind in ("karras", "exponential", "beta"):
        if config.get(f"use_{kind}_sigmas"):
            return kind
    return None


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep(s) for `sigma`: linear interpolation in log-sigma over the training sigmas."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    # the last training index whose log-sigma is <= ours, kept so that a pair (low, high) exists
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


# ---- sample post-processing ------------------------------------------------------------------------------------
def threshold_sample(sample: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Dynamic thresholding (Saharia et al. 2022, Imagen, sec. 2.3): per sample, clip to the `ratio` quantile s
    of |x| (at least 1, at most `max_value`) and divide by s."""
    dtype = sample.dtype
    batch_size, channels, *remaining_dims = sample.shape
    if dtype not in (np.float32, np.float64):
        sample = sample.astype(np.float32)
    flat = sample.reshape(batch_size, channels * int(np.prod(remaining_dims)))
    s = np.quantile(np.abs(flat), ratio, axis=1).astype(flat.dtype)
    s = np.clip(s, 1, max_value)[:, None]
    flat = np.clip(flat, -s, s) / s
    return flat.reshape(sample.shape).astype(dtype, copy=False)


def expand_to(values: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape per-batch scalars (B,) to (B, 1, 1, ...) so they broadcast against a sample of `ndim` dims."""
    values = np.asarray(values).reshape(-1)
    return values.reshape(values.shape + (1,) * (ndim - 1))


def add_noise_vp(alphas_cumprod: np.ndarray, original_samples, noise, timesteps) -> np.ndarray:
    """Forward diffusion q(x_t | x_0) of a variance-preserving schedule: sqrt(a_t) x_0 + sqrt(1 - a_t) noise."""
    alphas_cumprod = alphas_cumprod.astype(original_samples.dtype, copy=False)
    timesteps = np.asarray(timesteps).astype(np.int64)
    a = alphas_cumprod[timesteps]
    sqrt_alpha_prod = expand_to(a**0.5, original_samples.ndim)
    sqrt_one_minus_alpha_prod = expand_to((1 - a) ** 0.5, original_samples.ndim)
    return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise


def velocity_vp(alphas_cumprod: np.ndarray, sample, noise, timesteps) -> np.ndarray:
    """The v-prediction target (Salimans & Ho 2022): sqrt(a_t) noise - sqrt(1 - a_t) x_0."""
    a = alphas_cumprod.astype(sample.dtype, copy=False)[np.asarray(timesteps).astype(np.int64)]
    return expand_to(a**0.5, sample.ndim) * noise - expand_to((1 - a) ** 0.5, sample.ndim) * sample


# ---- inference timesteps ---------------------------------------------------------------------------------------
def spaced_timesteps(config, num_inference_steps: int) -> np.ndarray:
    """Descending int64 inference timesteps for `config.timestep_spacing` ("Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Table 2): linspace, leading (+ steps_offset) or trailing."""
    n_train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, num_inference_steps).round()[::-1].copy().astype(np.int64)
    if config.timestep_spacing == "leading":
        step_ratio = n_train // num_inference_steps
        timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].copy().astype(np.int64)
        return timesteps + config.steps_offset
    if config.timestep_spacing == "trailing":
        step_ratio = n_train / num_inference_steps
        return np.round(np.arange(n_train, 0, -step_ratio)).astype(np.int64) - 1
    raise ValueError(
        f"{config.timestep_spacing} is not supported. Please make sure to choose one of 'linspace', 'leading' or 'trailing'."
    )


def spaced_float_timesteps(config, num_inference_steps: int) -> np.ndarray:
    """Descending float32 inference timesteps (the k-diffusion family's form of `spaced_timesteps`)."""
    n_train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, num_inference_steps, dtype=np.float32)[::-1].copy()
    if config.timestep_spacing == "leading":
        step_ratio = n_train // num_inference_steps
        timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].copy().astype(np.float32)
        return timesteps + np.float32(config.steps_offset)
    if config.timestep_spacing == "trailing":
        step_ratio = n_train / num_inference_steps
        return np.arange(n_train, 0, -step_ratio).round().copy().astype(np.float32) - np.float32(1)
    raise ValueError(
        f"{config.timestep_spacing} is not supported. Please make sure to choose one of 'linspace', 'leading' or 'trailing'."
    )


def training_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - a_t) / a_t) for every training timestep (float32, ascending in t)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def k_diffusion_sigmas(config, alphas_cumprod: np.ndarray, num_inference_steps: int, timesteps=None, round_karras=False):
    """The k-diffusion family's inference schedule: (timesteps, sigmas without the final 0, training log-sigmas).

    Timesteps come from config.timestep_spacing (or `timesteps`), sigmas are the training sigmas interpolated at
    them, optionally respaced (Karras / exponential / beta), in which case the timesteps are recomputed from the
    new sigmas. Dtypes follow diffusers: float32 timesteps, float64 when recomputed from sigmas.
    """
    if timesteps is not None:
        timesteps = np.array(timesteps, dtype=np.float32)
    else:
        timesteps = spaced_float_timesteps(config, num_inference_steps)
    train_sigmas = training_sigmas(alphas_cumprod)
    log_sigmas = np.log(train_sigmas)
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    spacing = sigma_spacing(config)
    if spacing is not None:
        sigmas = convert_sigmas(config, sigmas, num_inference_steps, spacing)
        timesteps = sigma_to_t(sigmas, log_sigmas)
        if round_karras and spacing == "karras":
            timesteps = timesteps.round()
    return timesteps, sigmas, log_sigmas


def torch_lerp(start: np.ndarray, end: np.ndarray, weight: float) -> np.ndarray:
    """torch.lerp's formula (its rounding differs from start + w (end - start) for w >= 0.5)."""
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)


# ---- flow matching (rectified flow: x_sigma = (1 - sigma) x_0 + sigma noise) -----------------------------------
def shift_sigmas(shift: float, sigmas):
    """SD3's resolution shift of flow-matching sigmas (Esser et al. 2024, eq. 23): shift sigma / (1 + (shift - 1) sigma)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(time_shift_type: str, mu: float, sigma: float, t):
    """Resolution-dependent shift of flow-matching times t in (0, 1] by `mu` (Flux's dynamic shifting):
    exponential e^mu / (e^mu + (1/t - 1)^sigma), or linear mu / (mu + (1/t - 1)^sigma)."""
    if time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
    if time_shift_type == "linear":
        return mu / (mu + (1 / t - 1) ** sigma)
    raise ValueError("`time_shift_type` must either be 'exponential' or 'linear'.")


def stretch_shift_to_terminal(t, shift_terminal: float):
    """Stretch a flow schedule so that it ends at `shift_terminal` (LTX-Video's rf.py)."""
    one_minus_z = 1 - t
    scale_factor = one_minus_z[-1] / (1 - shift_terminal)
    return 1 - (one_minus_z / scale_factor)


# What diffusers' SD3 and Flux pipelines compute before calling a flow-matching scheduler's set_timesteps; the
# numpy pipelines of those families call these. The defaults are Flux's (SD3's pipeline reads max_shift with a
# default of 1.16 when the config lacks it: pass `max_shift=config.get("max_shift", 1.16)` there).
def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """`mu` for `set_timesteps(mu=...)` from the image's token count, linear in it from (base_seq_len, base_shift)
    to (max_seq_len, max_shift) (diffusers' `calculate_shift`). image_seq_len: (height / 8 / 2) * (width / 8 / 2)
    for Flux's packed latents and SD3's 2x2 patches."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def calculate_shift_for(config, image_seq_len: int, max_shift_default: float = 1.15) -> float:
    """`calculate_shift` with the scheduler config's base / max values, as the SD3 (max_shift_default=1.16) and
    Flux (1.15) pipelines read them: config.get("base_image_seq_len", 256), ... ."""
    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", max_shift_default),
    )


def flux_default_sigmas(num_inference_steps: int) -> np.ndarray:
    """The sigmas Flux's pipelines pass to set_timesteps when the caller gave none: linspace(1, 1/n, n) (float64);
    diffusers passes None instead when the scheduler has use_flow_sigmas (DPM++ / UniPC configured for flow)."""
    return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
