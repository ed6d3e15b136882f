"""Image-to-image with Stable Diffusion 1.x/2.x in numpy, line for line with diffusers'
StableDiffusionImg2ImgPipeline: encode the image, noise it to the timestep `strength` starts at, denoise from there.
"""

from __future__ import annotations

import time

import numpy as np

from diffship.checks import check_number
from diffship.pipelines.base import retrieve_latents  # noqa: F401  (re-exported: diffusers has it here)
from diffship.pipelines.image_processing import VaeImageProcessor, postprocess
from diffship.pipelines.prompts import encode_prompt
from diffship.pipelines.stable_diffusion import (
    CALLBACK_TENSOR_INPUTS,
    StableDiffusionPipeline,
    StableDiffusionPipelineOutput,
    as_generator,
    retrieve_timesteps,
)
from diffship.pipelines.timing import StageTimer
from diffship.schedulers.noise import randn


def strength_steps(num_inference_steps: int, strength: float) -> int:
    """How many of the steps `strength` keeps: the last int(num_inference_steps * strength) (diffusers' rule)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def get_timesteps(scheduler, num_inference_steps: int, strength: float):
    """The tail of the schedule that `strength` keeps; schedulers that track a step index start there."""
    t_start = max(num_inference_steps - strength_steps(num_inference_steps, strength), 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps, num_inference_steps - t_start


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


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    required_components = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
    optional_components = ()
    callback_tensor_inputs = CALLBACK_TENSOR_INPUTS

    @property
    def image_processor(self) -> VaeImageProcessor:
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def check_image_inputs(self, prompt, image, strength, negative_prompt, prompt_embeds, negative_prompt_embeds,
                           output_type, callback_on_step_end_tensor_inputs, num_images_per_prompt, **denoising):
        """check_inputs (`denoising`: its keyword arguments), strength, and the image given."""
        # The size comes from the image (checked when it is preprocessed).
        self.check_inputs(prompt, None, None, negative_prompt, prompt_embeds, negative_prompt_embeds, output_type,
                          None, num_images_per_prompt, **denoising)
        check_strength(strength, denoising.get("num_inference_steps"), denoising.get("timesteps"),
                       denoising.get("sigmas"))
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self.callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {self.callback_tensor_inputs}")
        if image is None:
            raise ValueError(f"{type(self).__name__} needs image (PIL images or numpy arrays in [0, 1])")

    def prepare_latents(self, image, timestep, batch_size, num_images_per_prompt, generator, timer=None):
        batch_size = batch_size * num_images_per_prompt
        if isinstance(generator, list) and len(generator) not in (1, batch_size):
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}; pass one per image")
        if isinstance(generator, list) and len(generator) > 1:
            # One encoder sample per generator: the image is repeated to the batch first.
            image = tile_to_batch(image, batch_size, "images")
        init_latents = self.encode_vae_image(image, generator, timer)
        init_latents = tile_to_batch(init_latents, batch_size, "images")

        noise = randn(init_latents.shape, generator, np.float32)
        return self.scheduler.add_noise(init_latents, noise, timestep)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator=None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        clip_skip: int | None = None,
    ):
        start = time.perf_counter()
        timer = StageTimer()
        self.check_image_inputs(prompt, image, strength, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                output_type, callback_on_step_end_tensor_inputs, num_images_per_prompt,
                                num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                                guidance_scale=guidance_scale, eta=eta, clip_skip=clip_skip)
        generator = as_generator(generator)

        # 1. Batch size and guidance.
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else prompt_embeds.shape[0]
        do_classifier_free_guidance = guidance_scale > 1.0

        # 2. Encode the prompt.
        with timer.stage("text_encoder"):
            prompt_embeds, negative_prompt_embeds = encode_prompt(
                self.text_encoder, self.tokenizer, prompt, num_images_per_prompt, do_classifier_free_guidance,
                negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip, self.text_encoder_final_layer_norm,
            )
        if do_classifier_free_guidance:
            prompt_embeds = np.concatenate([negative_prompt_embeds, prompt_embeds])

        # 3. Preprocess the image: resized to multiples of the VAE's scale factor, [-1, 1] NCHW.
        image = self.image_processor.preprocess(image, name="image")
        check_image_channels(image, self.vae_config.get("in_channels", 3))

        # 4. Timesteps: the last `strength` of the schedule.
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, timesteps, sigmas)
        timesteps, num_inference_steps = get_timesteps(self.scheduler, num_inference_steps, strength)
        latent_timestep = np.repeat(timesteps[:1], batch_size * num_images_per_prompt)

        # 5. Initial latents: the encoded image, noised to the first timestep.
        latents = self.prepare_latents(image, latent_timestep, batch_size, num_images_per_prompt, generator, timer)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 6. Denoising loop.
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

            latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

            if callback_on_step_end is not None:
                local = {"latents": latents, "prompt_embeds": prompt_embeds,
                         "negative_prompt_embeds": negative_prompt_embeds}
                callback_outputs = callback_on_step_end(
                    self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs}) or {}
                latents = callback_outputs.get("latents", latents)
                prompt_embeds = callback_outputs.get("prompt_embeds", prompt_embeds)

        # 7. Decode.
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
