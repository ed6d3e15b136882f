"""Steps every family's pipelines take, as diffusers writes them (there, copied from pipeline to pipeline with a
"Copied from" marker; here, defined once): seeds, timesteps, strength, guidance, batching, callbacks."""

from __future__ import annotations

import inspect
import logging

import numpy as np

from diffship.checks import check_int, check_number
from diffship.pipelines.image_processing import OUTPUT_TYPES
from diffship.pipelines.step_cache import check_step_cache

logger = logging.getLogger(__name__)


def as_generator(generator):
    """An int seed becomes a numpy Generator; Generators, noise hooks and lists of them pass through."""
    if isinstance(generator, (int, np.integer)):
        check_int(generator, "generator (a seed)", 0)
        return np.random.default_rng(int(generator))
    return generator


def retrieve_timesteps(scheduler, num_inference_steps=None, timesteps=None, sigmas=None, **kwargs):
    """Set the scheduler's timesteps from a step count, or from custom `timesteps` / `sigmas` lists. `kwargs` go
    to set_timesteps (LCM's original_inference_steps)."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass either timesteps or sigmas, not both")
    params = inspect.signature(scheduler.set_timesteps).parameters
    if timesteps is not None:
        if "timesteps" not in params:
            raise ValueError(f"{type(scheduler).__name__} does not take custom timesteps")
        scheduler.set_timesteps(timesteps=timesteps, **kwargs)
    elif sigmas is not None:
        if "sigmas" not in params:
            raise ValueError(f"{type(scheduler).__name__} does not take custom sigmas")
        scheduler.set_timesteps(sigmas=sigmas, **kwargs)
    else:
        # The step count stays the one asked for, as in diffusers: PNDM's schedule has one entry more, and
        # image-to-image's `strength` counts steps, not entries.
        scheduler.set_timesteps(num_inference_steps, **kwargs)
        return scheduler.timesteps, num_inference_steps
    return scheduler.timesteps, len(scheduler.timesteps)


def check_schedule(scheduler, num_inference_steps, timesteps, sigmas) -> None:
    """A custom schedule is not empty; without one, the step count is within the model's training steps."""
    for name, schedule in (("timesteps", timesteps), ("sigmas", sigmas)):
        if schedule is not None and len(schedule) == 0:
            raise ValueError(f"{name} is empty; give the schedule's values, or num_inference_steps instead")
    if timesteps is None and sigmas is None:
        # More steps than the noise levels the model was trained on have no meaning (and DDIM, DDPM, PNDM
        # and LCM refuse them in set_timesteps).
        check_int(num_inference_steps, "num_inference_steps", 1, scheduler.config.get("num_train_timesteps"))


def check_generation_options(pipe, output_type, callback_on_step_end_tensor_inputs, num_images_per_prompt,
                             num_inference_steps, timesteps, sigmas, guidance_scale, eta, guidance_rescale,
                             cache=None, cache_interval=None, cache_start=None) -> None:
    """The options every family's check_inputs checks alike: output type, callback tensors, counts, schedule, the
    guidance numbers and the step cache."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    check_callback_inputs(callback_on_step_end_tensor_inputs, pipe.callback_tensor_inputs)
    check_int(num_images_per_prompt, "num_images_per_prompt", 1)
    check_schedule(pipe.scheduler, num_inference_steps, timesteps, sigmas)
    # A non-finite guidance_scale or eta turns every latent into NaN: a black image, not an error, without this.
    check_number(guidance_scale, "guidance_scale")
    # eta weighs DDIM's noise, in [0, 1] (the paper's eta): past 1 its variance can exceed what the schedule
    # leaves, and the step takes the square root of a negative number.
    check_number(eta, "eta", 0.0, 1.0)
    check_number(guidance_rescale, "guidance_rescale", 0.0, 1.0)
    check_step_cache(pipe, cache, cache_interval, cache_start)


def strength_steps(num_inference_steps: int, strength: float) -> int:
    """How many of the steps `strength` keeps: the last int(num_inference_steps * strength) (diffusers' rule)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def get_timesteps(scheduler, num_inference_steps: int, strength: float, denoising_start: float | None = None):
    """The tail of the schedule that `strength` keeps -- or, given `denoising_start` (SDXL's refiner), the
    timesteps below where that fraction of the denoising is done; schedulers that track a step index start
    there."""
    if denoising_start is None:
        t_start = max(num_inference_steps - strength_steps(num_inference_steps, strength), 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        return timesteps, num_inference_steps - t_start
    cutoff = denoising_cutoff(scheduler, denoising_start)
    num_inference_steps = int((np.asarray(scheduler.timesteps) < cutoff).sum())
    if scheduler.order == 2 and num_inference_steps % 2 == 0:
        # A second-order scheduler's steps come in pairs; an even count would start in the middle of one.
        num_inference_steps += 1
    t_start = len(scheduler.timesteps) - num_inference_steps
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start)
    return scheduler.timesteps[t_start:], num_inference_steps


def end_timesteps(scheduler, timesteps, denoising_end: float):
    """The head of the schedule down to where `denoising_end` of the denoising is done (SDXL's base, before the
    refiner takes over)."""
    cutoff = denoising_cutoff(scheduler, denoising_end)
    count = len([t for t in timesteps if t >= cutoff])
    return timesteps[:count], count


def check_strength(strength, num_inference_steps: int | None = None, timesteps=None, sigmas=None,
                   names: tuple[str, str] = ("strength", "num_inference_steps")) -> None:
    """strength in [0, 1], and, where the step count is given (checked before), leaving at least one of the steps
    (a custom schedule's length, else num_inference_steps). `names`: what errors call the two."""
    check_number(strength, names[0], 0.0, 1.0)
    steps = len(timesteps) if timesteps is not None else len(sigmas) if sigmas is not None else num_inference_steps
    if steps is not None and strength_steps(steps, strength) < 1:
        raise ValueError(f"{names[0]} {strength} leaves no denoising step of {steps}; raise {names[0]} or "
                         f"{names[1]}")


def check_image_channels(image: np.ndarray, expected: int, name: str = "image") -> None:
    if image.shape[1] != expected:
        raise ValueError(
            f"{name} has {image.shape[1]} channel(s); the VAE encoder takes {expected} (RGB): pass PIL images or "
            f"numpy arrays of shape (H, W, {expected}) or (N, H, W, {expected}) in [0, 1]"
        )


def tile_to_batch(array: np.ndarray, batch_size: int, name: str) -> np.ndarray:
    """Repeat a batch to `batch_size` as diffusers does (tiled: a, b, a, b)."""
    if array.shape[0] == batch_size:
        return array
    if array.shape[0] > batch_size or batch_size % array.shape[0]:
        raise ValueError(f"cannot spread {array.shape[0]} {name} over a batch of {batch_size} (prompts x "
                         f"num_images_per_prompt); give one per prompt, or a number that divides the batch")
    return np.concatenate([array] * (batch_size // array.shape[0]), axis=0)


def check_generators(generator, batch_size: int) -> None:
    if isinstance(generator, list) and len(generator) not in (1, batch_size):
        raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}; pass one per image")


def extra_step_kwargs(scheduler, generator, eta) -> dict:
    """eta (DDIM only) and the generator, for the schedulers whose step takes them."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    elif eta:
        logger.warning("eta=%g is ignored: %s takes no eta (DDIMScheduler does)", eta, type(scheduler).__name__)
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def rescale_noise_cfg(noise_cfg: np.ndarray, noise_pred_text: np.ndarray, guidance_rescale: float) -> np.ndarray:
    """Rescale guided noise towards the text prediction's std (Lin et al. 2023, section 3.4)."""
    axes = tuple(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(axis=axes, keepdims=True, ddof=1)
    std_cfg = noise_cfg.std(axis=axes, keepdims=True, ddof=1)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def guide(noise_pred: np.ndarray, guidance_scale: float, guidance_rescale: float = 0.0) -> np.ndarray:
    """Classifier-free guidance over the [unconditional, conditional] batch, then the optional rescale."""
    noise_pred_uncond, noise_pred_text = np.split(noise_pred, 2)
    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
    if guidance_rescale > 0.0:
        noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale)
    return noise_pred


def guidance_scale_embedding(w: np.ndarray, embedding_dim: int = 512) -> np.ndarray:
    """The sinusoidal embedding of the guidance scale that LCM UNets take as timestep_cond (VDM, appendix;
    diffusers' get_guidance_scale_embedding): w is scaled by 1000, then [sin, cos] of it at geometric
    frequencies."""
    w = np.asarray(w, dtype=np.float32) * np.float32(1000.0)
    half_dim = embedding_dim // 2
    scale = np.log(np.float32(10000.0)) / np.float32(half_dim - 1)
    frequencies = np.exp(np.arange(half_dim, dtype=np.float32) * -scale)
    angles = w[:, None] * frequencies[None, :]
    emb = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if embedding_dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


def check_callback_inputs(names, allowed: tuple[str, ...]) -> None:
    unknown = [k for k in names or [] if k not in allowed]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {allowed}")


def run_callback(pipe, callback, i, t, tensors: dict, names) -> dict:
    """callback_on_step_end(pipe, i, t, {name: tensor for the names asked}); the tensors it returns replace the
    pipeline's (diffusers' contract). Returns `tensors` updated."""
    if callback is None:
        return tensors
    outputs = callback(pipe, i, t, {k: tensors[k] for k in names}) or {}
    return {**tensors, **{k: v for k, v in outputs.items() if k in tensors}}


def denoising_cutoff(scheduler, fraction: float) -> int:
    """The training timestep at which `fraction` of the denoising is done (SDXL's denoising_end/start)."""
    train = scheduler.config.get("num_train_timesteps", 1000)
    return int(round(train - fraction * train))


def valid_fraction(value) -> bool:
    """diffusers uses denoising_start/end only when it is a float strictly between 0 and 1."""
    return isinstance(value, float) and 0 < value < 1
