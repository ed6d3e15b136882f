"""Depth-to-image with Stable Diffusion 2 in numpy, line for line with diffusers' StableDiffusionDepth2ImgPipeline:
image-to-image whose UNet also takes the image's depth (5 input channels), given as `depth_map` or estimated by the
exported `depth_estimator` (DPT) after its feature-extractor preprocessing, done here in numpy.
"""

from __future__ import annotations

import time

import numpy as np
from PIL import Image

from diffship.errors import DiffshipError, MissingComponentError
from diffship.pipelines.image_processing import dpt_preprocess, interpolate_bicubic, postprocess
from diffship.pipelines.prompts import encode_prompt
from diffship.pipelines.stable_diffusion import CALLBACK_TENSOR_INPUTS, StableDiffusionPipelineOutput, as_generator
from diffship.pipelines.stable_diffusion_img2img import (
    StableDiffusionImg2ImgPipeline,
    check_image_channels,
    get_timesteps,
    tile_to_batch,
)
from diffship.pipelines.timing import StageTimer
from diffship.runtimes import input_info


def depth_map_array(depth_map) -> np.ndarray:
    """A user's depth map -> float32 [N, H, W]: numpy (H, W) or (N, H, W), a PIL image (8- or 16-bit
    grayscale), or a list of either. Only relative depth matters: the pipeline rescales it to [-1, 1]."""
    if isinstance(depth_map, (list, tuple)):
        return np.concatenate([depth_map_array(d) for d in depth_map], axis=0)
    if isinstance(depth_map, Image.Image):
        if depth_map.mode not in ("I", "I;16", "F", "L"):
            depth_map = depth_map.convert("L")
        return np.asarray(depth_map, dtype=np.float32)[None]
    array = np.asarray(depth_map, dtype=np.float32)
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3:
        raise ValueError(f"depth_map must be (H, W) or (N, H, W), or PIL images; got shape {array.shape}")
    return array


class StableDiffusionDepth2ImgPipeline(StableDiffusionImg2ImgPipeline):
    required_components = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
    optional_components = ("depth_estimator",)
    unet_in_channels = (5,)
    callback_tensor_inputs = (*CALLBACK_TENSOR_INPUTS, "depth_mask")

    @property
    def feature_extractor_settings(self) -> dict:
        """The depth estimator's preprocessor_config.json (DPTImageProcessor settings)."""
        return self.configs.get("feature_extractor", {})

    def estimate_depth(self, images) -> np.ndarray:
        """predicted_depth [N, h, w] of the exported DPT for PIL images or numpy arrays in [0, 1]."""
        if self.depth_estimator is None:
            where = self.model_dir if self.model_dir is not None else "this pipeline"
            raise MissingComponentError(
                f"no depth_map was given and {where} has no depth_estimator component to estimate one; pass "
                "depth_map, or export the model with its depth estimator"
            )
        if "feature_extractor" not in self.configs:
            raise MissingComponentError(
                f"{self.model_dir}/feature_extractor/preprocessor_config.json is missing: the depth estimator's "
                "preprocessing needs it; export the model again with `diffship export`"
            )
        pixel_values = dpt_preprocess(images, self.feature_extractor_settings)
        info = input_info(self.depth_estimator, "pixel_values")
        fixed = tuple(info.shape[2:]) if info is not None else ()
        if all(isinstance(d, int) for d in fixed) and len(fixed) == 2 and fixed != pixel_values.shape[2:]:
            raise DiffshipError(
                f"the depth estimator graph takes {fixed[0]}x{fixed[1]} images but the feature extractor settings "
                f"give {pixel_values.shape[2]}x{pixel_values.shape[3]}; export with matching settings"
            )
        return self.depth_estimator.run({"pixel_values": pixel_values})["predicted_depth"]

    def prepare_depth_map(self, image, depth_map, batch_size, do_classifier_free_guidance, timer=None):
        images = [image] if isinstance(image, Image.Image) or (isinstance(image, np.ndarray) and image.ndim < 4) \
            else list(image)
        if isinstance(images[0], Image.Image):
            width, height = images[0].size
        else:
            # diffusers reads (width, height) from a numpy image's shape[:-1], which swaps them; (H, W) here.
            height, width = images[0].shape[:2]

        if depth_map is None:
            timer = timer or StageTimer()
            with timer.stage("depth_estimator"):
                depth_map = self.estimate_depth(images)
        else:
            depth_map = depth_map_array(depth_map)

        depth_map = interpolate_bicubic(depth_map[:, None].astype(np.float32),
                                        (height // self.vae_scale_factor, width // self.vae_scale_factor))
        depth_min = depth_map.min(axis=(1, 2, 3), keepdims=True)
        depth_max = depth_map.max(axis=(1, 2, 3), keepdims=True)
        depth_map = (2.0 * (depth_map - depth_min) / (depth_max - depth_min) - 1.0).astype(np.float32)

        if depth_map.shape[0] < batch_size:
            depth_map = tile_to_batch(depth_map, batch_size, "depth maps")
        return np.concatenate([depth_map] * 2) if do_classifier_free_guidance else depth_map

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        depth_map=None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
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
        # 1. Check inputs.
        self.check_image_inputs(prompt, image, strength, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                output_type, callback_on_step_end_tensor_inputs, num_images_per_prompt,
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                                clip_skip=clip_skip)
        generator = as_generator(generator)

        # 2. Batch size and guidance.
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else prompt_embeds.shape[0]
        do_classifier_free_guidance = guidance_scale > 1.0

        # 3. Encode the prompt.
        with timer.stage("text_encoder"):
            prompt_embeds, negative_prompt_embeds = encode_prompt(
                self.text_encoder, self.tokenizer, prompt, num_images_per_prompt, do_classifier_free_guidance,
                negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip, self.text_encoder_final_layer_norm,
            )
        if do_classifier_free_guidance:
            prompt_embeds = np.concatenate([negative_prompt_embeds, prompt_embeds])

        # 4. Preprocess the image (checked before the depth estimator sees it).
        original_image = image
        image = self.image_processor.preprocess(image, name="image")
        check_image_channels(image, self.vae_config.get("in_channels", 3))

        # 5. The depth map, at the latents' size, in [-1, 1].
        depth_mask = self.prepare_depth_map(original_image, depth_map, batch_size * num_images_per_prompt,
                                            do_classifier_free_guidance, timer)

        # 6. Timesteps: the last `strength` of the schedule.
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps, num_inference_steps = get_timesteps(self.scheduler, num_inference_steps, strength)
        latent_timestep = np.repeat(timesteps[:1], batch_size * num_images_per_prompt)

        # 7. Initial latents: the encoded image, noised to the first timestep.
        latents = self.prepare_latents(image, latent_timestep, batch_size, num_images_per_prompt, generator, timer)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 8. Denoising loop: the depth map rides along as the UNet's fifth channel.
        for i, t in enumerate(self.progress_bar(timesteps)):
            latent_model_input = np.concatenate([latents] * 2) if do_classifier_free_guidance else latents
            latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
            latent_model_input = np.concatenate([latent_model_input, depth_mask], axis=1)

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
                         "negative_prompt_embeds": negative_prompt_embeds, "depth_mask": depth_mask}
                callback_outputs = callback_on_step_end(
                    self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs}) or {}
                latents = callback_outputs.get("latents", latents)
                prompt_embeds = callback_outputs.get("prompt_embeds", prompt_embeds)
                depth_mask = callback_outputs.get("depth_mask", depth_mask)

        # 9. Decode.
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
