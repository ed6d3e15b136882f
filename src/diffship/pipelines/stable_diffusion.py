"""Text-to-image with Stable Diffusion 1.x/2.x in numpy, line for line with diffusers' StableDiffusionPipeline."""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from diffship.checks import IMAGE_SIZE_MULTIPLE, check_image_size, check_int, check_number
from diffship.pipelines.base import DiffusionPipeline
from diffship.pipelines.image_processing import OUTPUT_TYPES, postprocess
from diffship.pipelines.prompts import check_clip_skip, check_negative_prompt, encode_prompt
from diffship.pipelines.timing import StageTimer
from diffship.schedulers.noise import randn

CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")

logger = logging.getLogger(__name__)


@dataclass
class StableDiffusionPipelineOutput:
    images: list | np.ndarray
    nsfw_content_detected: list[bool] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def as_generator(generator):
    """An int seed becomes a numpy Generator; Generators, noise hooks and lists of them pass through."""
    if isinstance(generator, (int, np.integer)):
        check_int(generator, "generator (a seed)", 0)
        return np.random.default_rng(int(generator))
    return generator


def retrieve_timesteps(scheduler, num_inference_steps=None, timesteps=None, sigmas=None):
    """Set the scheduler's timesteps from a step count, or from custom `timesteps` / `sigmas` lists."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass either timesteps or sigmas, not both")
    params = inspect.signature(scheduler.set_timesteps).parameters
    if timesteps is not None:
        if "timesteps" not in params:
            raise ValueError(f"{type(scheduler).__name__} does not take custom timesteps")
        scheduler.set_timesteps(timesteps=timesteps)
    elif sigmas is not None:
        if "sigmas" not in params:
            raise ValueError(f"{type(scheduler).__name__} does not take custom sigmas")
        scheduler.set_timesteps(sigmas=sigmas)
    else:
        # The step count stays the one asked for, as in diffusers: PNDM's schedule has one entry more, and
        # image-to-image's `strength` counts steps, not entries.
        scheduler.set_timesteps(num_inference_steps)
        return scheduler.timesteps, num_inference_steps
    return scheduler.timesteps, len(scheduler.timesteps)


def rescale_noise_cfg(noise_cfg: np.ndarray, noise_pred_text: np.ndarray, guidance_rescale: float) -> np.ndarray:
    """Rescale guided noise towards the text prediction's std (Lin et al. 2023, section 3.4)."""
    axes = tuple(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(axis=axes, keepdims=True, ddof=1)
    std_cfg = noise_cfg.std(axis=axes, keepdims=True, ddof=1)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


class StableDiffusionPipeline(DiffusionPipeline):
    required_components = ("text_encoder", "unet", "vae_decoder")
    optional_components = ("vae_encoder",)

    def check_inputs(self, prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                     output_type, callback_on_step_end_tensor_inputs, num_images_per_prompt, *,
                     num_inference_steps=50, timesteps=None, sigmas=None, guidance_scale=7.5, eta=0.0,
                     clip_skip=None, guidance_rescale=0.0):
        """diffusers' checks, and the ranges of the values it leaves unchecked, before any graph runs. height and
        width None: the size comes from an input image (checked when it is preprocessed)."""
        check_image_size({"height": height, "width": width}, max(IMAGE_SIZE_MULTIPLE, self.vae_scale_factor))
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass either prompt or prompt_embeds")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
        if isinstance(prompt, list) and (not prompt or not all(isinstance(p, str) for p in prompt)):
            raise ValueError("prompt must be a non-empty list of str")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else len(prompt_embeds)
        check_negative_prompt(prompt, negative_prompt, batch_size)
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    f"prompt_embeds {prompt_embeds.shape} and negative_prompt_embeds "
                    f"{negative_prompt_embeds.shape} must have the same shape"
                )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in CALLBACK_TENSOR_INPUTS]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {CALLBACK_TENSOR_INPUTS}")
        check_int(num_images_per_prompt, "num_images_per_prompt", 1)
        for name, schedule in (("timesteps", timesteps), ("sigmas", sigmas)):
            if schedule is not None and len(schedule) == 0:
                raise ValueError(f"{name} is empty; give the schedule's values, or num_inference_steps instead")
        if timesteps is None and sigmas is None:
            # More steps than the noise levels the model was trained on have no meaning (and DDIM, DDPM, PNDM
            # and LCM refuse them in set_timesteps).
            check_int(num_inference_steps, "num_inference_steps", 1, self.scheduler.config.get("num_train_timesteps"))
        # A non-finite guidance_scale or eta turns every latent into NaN: a black image, not an error, without this.
        check_number(guidance_scale, "guidance_scale")
        # eta weighs DDIM's noise, in [0, 1] (the paper's eta): past 1 its variance can exceed what the schedule
        # leaves, and the step takes the square root of a negative number.
        check_number(eta, "eta", 0.0, 1.0)
        check_number(guidance_rescale, "guidance_rescale", 0.0, 1.0)
        if guidance_scale <= 1 and (negative_prompt is not None or negative_prompt_embeds is not None):
            logger.warning("the negative prompt is ignored: guidance_scale %g (<= 1) turns classifier-free guidance "
                           "off", guidance_scale)
        if prompt is not None:  # diffusers applies clip_skip when it encodes a prompt, not to prompt_embeds
            check_clip_skip(self.text_encoder, clip_skip, self.text_encoder_final_layer_norm)

    def prepare_latents(self, batch_size, height, width, generator, latents=None):
        shape = (batch_size, self.unet_config.get("in_channels", 4),
                 height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn(shape, generator, np.float32)
        else:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != shape:
                raise ValueError(f"latents have shape {latents.shape}, expected {shape}")
        # Sigma-parameterised schedulers start from noise of std init_noise_sigma.
        return latents * np.float32(self.scheduler.init_noise_sigma)

    def prepare_extra_step_kwargs(self, generator, eta):
        """eta (DDIM only) and the generator, for the schedulers whose step takes them."""
        params = inspect.signature(self.scheduler.step).parameters
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        elif eta:
            logger.warning("eta=%g is ignored: %s takes no eta (DDIMScheduler does)", eta,
                           type(self.scheduler).__name__)
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        latents = latents / np.float32(self.vae_scaling_factor) + np.float32(self.vae_shift_factor)
        return self.vae_decoder.run({"latent_sample": latents})["sample"]

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator=None,
        latents: np.ndarray | None = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        clip_skip: int | None = None,
        guidance_rescale: float = 0.0,
    ):
        start = time.perf_counter()
        timer = StageTimer()
        height = self.default_height if height is None else height
        width = self.default_width if width is None else width
        self.check_inputs(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          output_type, callback_on_step_end_tensor_inputs, num_images_per_prompt,
                          num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                          guidance_scale=guidance_scale, eta=eta, clip_skip=clip_skip,
                          guidance_rescale=guidance_rescale)
        generator = as_generator(generator)

        # 1. Batch size and guidance.
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        do_classifier_free_guidance = guidance_scale > 1.0

        # 2. Encode the prompt (and the negative prompt, for guidance).
        with timer.stage("text_encoder"):
            prompt_embeds, negative_prompt_embeds = encode_prompt(
                self.text_encoder, self.tokenizer, prompt, num_images_per_prompt, do_classifier_free_guidance,
                negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip, self.text_encoder_final_layer_norm,
            )
        if do_classifier_free_guidance:
            prompt_embeds = np.concatenate([negative_prompt_embeds, prompt_embeds])

        # 3. Timesteps.
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, timesteps, sigmas)

        # 4. Initial latents.
        latents = self.prepare_latents(batch_size * num_images_per_prompt, height, width, generator, latents)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 5. Denoising loop.
        for i, t in enumerate(self.progress_bar(timesteps)):
            latent_model_input = np.concatenate([latents] * 2) if do_classifier_free_guidance else latents
            latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

            with timer.stage("unet"):
                noise_pred = self.unet.run({
                    "sample": latent_model_input.astype(np.float32, copy=False),
                    "timestep": self.timestep_feed(t, latent_model_input.shape[0]),
                    "encoder_hidden_states": prompt_embeds,
                })["out_sample"]

            if do_classifier_free_guidance:
                noise_pred_uncond, noise_pred_text = np.split(noise_pred, 2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                if guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale)

            latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

            if callback_on_step_end is not None:
                local = {"latents": latents, "prompt_embeds": prompt_embeds,
                         "negative_prompt_embeds": negative_prompt_embeds}
                callback_kwargs = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                latents = callback_outputs.get("latents", latents)
                prompt_embeds = callback_outputs.get("prompt_embeds", prompt_embeds)

        # 6. Decode.
        if output_type == "latent":
            image = latents
        else:
            with timer.stage("vae_decode"):
                image = self.decode_latents(latents)
        images = postprocess(image, output_type)

        timings = timer.summary(time.perf_counter() - start, load=self.load_seconds)
        if not return_dict:
            return images, None
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None, timings=timings)
