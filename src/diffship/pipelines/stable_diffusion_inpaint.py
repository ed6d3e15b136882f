"""Inpainting with Stable Diffusion 1.x/2.x in numpy, line for line with diffusers' StableDiffusionInpaintPipeline.

Two kinds of UNet run here, as in diffusers:

- a dedicated inpainting UNet (9 input channels): the latents, the mask and the masked image's latents are
  concatenated on channels at every step;
- a regular UNet (4 channels): after every step the latents outside the mask are replaced by the original image's
  latents noised to the next timestep, so only the masked region is generated.
"""

from __future__ import annotations

import time

import numpy as np
from PIL import Image

from diffship.checks import check_int
from diffship.pipelines.image_processing import VaeImageProcessor, interpolate_nearest, postprocess
from diffship.pipelines.prompts import encode_prompt
from diffship.pipelines.stable_diffusion import (
    CALLBACK_TENSOR_INPUTS,
    StableDiffusionPipeline,
    StableDiffusionPipelineOutput,
    as_generator,
    retrieve_timesteps,
)
from diffship.pipelines.stable_diffusion_img2img import (
    check_image_channels,
    check_strength,
    get_timesteps,
    tile_to_batch,
)
from diffship.pipelines.timing import StageTimer
from diffship.schedulers.noise import randn


class StableDiffusionInpaintPipeline(StableDiffusionPipeline):
    required_components = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
    optional_components = ()
    unet_in_channels = (4, 9)
    callback_tensor_inputs = (*CALLBACK_TENSOR_INPUTS, "mask", "masked_image_latents")

    @property
    def image_processor(self) -> VaeImageProcessor:
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def mask_processor(self) -> VaeImageProcessor:
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True,
                                 do_convert_grayscale=True)

    @property
    def num_channels_latents(self) -> int:
        return int(self.vae_config.get("latent_channels", 4))

    def check_inpaint_inputs(self, prompt, image, mask_image, height, width, strength, output_type, negative_prompt,
                             prompt_embeds, negative_prompt_embeds, callback_on_step_end_tensor_inputs,
                             padding_mask_crop, num_images_per_prompt, **denoising):
        """check_inputs (`denoising`: its keyword arguments), strength, image, mask and padding_mask_crop."""
        self.check_inputs(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          output_type, None, num_images_per_prompt, **denoising)
        check_strength(strength, denoising.get("num_inference_steps"), denoising.get("timesteps"),
                       denoising.get("sigmas"))
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self.callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {self.callback_tensor_inputs}")
        if image is None:
            raise ValueError("inpainting needs image, the picture to paint into" +
                             (" (mask_image was given without it)" if mask_image is not None else ""))
        if mask_image is None:
            raise ValueError("inpainting needs mask_image: white (1) where to paint, black (0) where to keep")
        if padding_mask_crop is not None:
            check_int(padding_mask_crop, "padding_mask_crop", 0)
            if not isinstance(image, Image.Image):
                raise ValueError(f"padding_mask_crop needs image as a PIL image, got {type(image).__name__}")
            if not isinstance(mask_image, Image.Image):
                raise ValueError(f"padding_mask_crop needs mask_image as a PIL image, got {type(mask_image).__name__}")
            if output_type != "pil":
                raise ValueError(f"padding_mask_crop needs output_type='pil', got {output_type!r}")

    def prepare_latents(self, batch_size, num_channels_latents, height, width, generator, latents=None, image=None,
                        timestep=None, is_strength_max=True, return_image_latents=False, timer=None):
        """(latents, noise, image_latents or None)."""
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) not in (1, batch_size):
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}; pass one per image")
        image_latents = None
        if return_image_latents or (latents is None and not is_strength_max):
            image_latents = (image if image.shape[1] == num_channels_latents
                             else self.encode_vae_image(image, generator, timer))
            image_latents = tile_to_batch(image_latents, batch_size, "images")

        if latents is None:
            noise = randn(shape, generator, np.float32)
            # strength 1 starts from pure noise; below 1 from the image noised to the first timestep.
            latents = noise if is_strength_max else self.scheduler.add_noise(image_latents, noise, timestep)
            latents = latents * np.float32(self.scheduler.init_noise_sigma) if is_strength_max else latents
        else:
            noise = np.asarray(latents, dtype=np.float32)
            if noise.shape != shape:
                raise ValueError(f"latents have shape {noise.shape}, expected {shape}")
            latents = noise * np.float32(self.scheduler.init_noise_sigma)
        return latents, noise, image_latents

    def prepare_mask_latents(self, mask, masked_image, batch_size, height, width, generator,
                             do_classifier_free_guidance, timer=None):
        # The mask is resized to the latents' size with nearest neighbours, as diffusers does.
        mask = interpolate_nearest(mask, (height // self.vae_scale_factor, width // self.vae_scale_factor))
        if masked_image.shape[1] == self.num_channels_latents:
            masked_image_latents = np.asarray(masked_image, dtype=np.float32)
        else:
            masked_image_latents = self.encode_vae_image(masked_image, generator, timer)
        mask = tile_to_batch(mask, batch_size, "masks")
        masked_image_latents = tile_to_batch(masked_image_latents, batch_size, "images")
        if do_classifier_free_guidance:
            mask = np.concatenate([mask] * 2)
            masked_image_latents = np.concatenate([masked_image_latents] * 2)
        return mask.astype(np.float32, copy=False), masked_image_latents.astype(np.float32, copy=False)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        masked_image_latents: np.ndarray | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
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
    ):
        start = time.perf_counter()
        timer = StageTimer()
        # Like diffusers, the size defaults to the UNet's, not to the image's: image and mask are resized to it.
        height = self.default_height if height is None else height
        width = self.default_width if width is None else width
        self.check_inpaint_inputs(prompt, image, mask_image, height, width, strength, output_type, negative_prompt,
                                  prompt_embeds, negative_prompt_embeds, callback_on_step_end_tensor_inputs,
                                  padding_mask_crop, num_images_per_prompt, num_inference_steps=num_inference_steps,
                                  timesteps=timesteps, sigmas=sigmas, guidance_scale=guidance_scale, eta=eta,
                                  clip_skip=clip_skip)
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

        # 3. Timesteps: the last `strength` of the schedule.
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, timesteps, sigmas)
        timesteps, num_inference_steps = get_timesteps(self.scheduler, num_inference_steps, strength)
        latent_timestep = np.repeat(timesteps[:1], batch_size * num_images_per_prompt)
        is_strength_max = strength == 1.0

        # 4. Preprocess image and mask; with padding_mask_crop, both are cropped to the mask's region first.
        if padding_mask_crop is not None:
            crops_coords = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        else:
            crops_coords = None
            resize_mode = "default"
        original_image = image
        init_image = self.image_processor.preprocess(image, height=height, width=width, crops_coords=crops_coords,
                                                     resize_mode=resize_mode, name="image")
        check_image_channels(init_image, self.vae_config.get("in_channels", 3))

        # 5. Initial latents (and, for a 4-channel UNet, the image's latents to blend back outside the mask).
        num_channels_latents = self.num_channels_latents
        num_channels_unet = self.unet_config.get("in_channels", 4)
        latents, noise, image_latents = self.prepare_latents(
            batch_size * num_images_per_prompt, num_channels_latents, height, width, generator, latents,
            image=init_image, timestep=latent_timestep, is_strength_max=is_strength_max,
            return_image_latents=num_channels_unet == 4, timer=timer,
        )

        # 6. The mask and the masked image's latents.
        mask_condition = self.mask_processor.preprocess(mask_image, height=height, width=width,
                                                        resize_mode=resize_mode, crops_coords=crops_coords,
                                                        name="mask_image")
        if mask_condition.shape[0] not in (1, init_image.shape[0]) and init_image.shape[0] != 1:
            raise ValueError(f"got {init_image.shape[0]} images and {mask_condition.shape[0]} masks; give one mask "
                             "per image, or one for all")
        masked_image = init_image * (mask_condition < 0.5) if masked_image_latents is None else masked_image_latents
        mask, masked_image_latents = self.prepare_mask_latents(
            mask_condition, masked_image, batch_size * num_images_per_prompt, height, width, generator,
            do_classifier_free_guidance, timer,
        )
        if num_channels_unet == 9:
            total = num_channels_latents + mask.shape[1] + masked_image_latents.shape[1]
            if total != num_channels_unet:
                raise ValueError(f"the UNet takes {num_channels_unet} channels but latents ({num_channels_latents}) + "
                                 f"mask ({mask.shape[1]}) + masked image latents ({masked_image_latents.shape[1]}) "
                                 f"make {total}")
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 7. Denoising loop.
        for i, t in enumerate(self.progress_bar(timesteps)):
            latent_model_input = np.concatenate([latents] * 2) if do_classifier_free_guidance else latents
            latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
            if num_channels_unet == 9:
                latent_model_input = np.concatenate([latent_model_input, mask, masked_image_latents], axis=1)

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

            if num_channels_unet == 4:
                # Keep the original outside the mask, noised to where the next step starts.
                init_latents_proper = image_latents
                init_mask = np.split(mask, 2)[0] if do_classifier_free_guidance else mask
                if i < len(timesteps) - 1:
                    noise_timestep = timesteps[i + 1]
                    init_latents_proper = self.scheduler.add_noise(init_latents_proper, noise,
                                                                   np.array([noise_timestep]))
                latents = (1 - init_mask) * init_latents_proper + init_mask * latents

            if callback_on_step_end is not None:
                local = {"latents": latents, "prompt_embeds": prompt_embeds,
                         "negative_prompt_embeds": negative_prompt_embeds, "mask": mask,
                         "masked_image_latents": masked_image_latents}
                callback_outputs = callback_on_step_end(
                    self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs}) or {}
                latents = callback_outputs.get("latents", latents)
                prompt_embeds = callback_outputs.get("prompt_embeds", prompt_embeds)
                mask = callback_outputs.get("mask", mask)
                masked_image_latents = callback_outputs.get("masked_image_latents", masked_image_latents)

        # 8. Decode; with padding_mask_crop, paste the generated crop back into the original image.
        if output_type == "latent":
            image = latents
        else:
            with timer.stage("vae_decode"):
                image = self.decode_latents(latents)
        images = postprocess(image, output_type)
        if padding_mask_crop is not None:
            images = [self.image_processor.apply_overlay(mask_image, original_image, i, crops_coords) for i in images]

        timings = timer.summary(time.perf_counter() - start, load=self.load_seconds)
        if not return_dict:
            return images, None
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None, timings=timings)

