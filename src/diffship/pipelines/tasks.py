"""The tasks a latent diffusion loop runs, as named steps its family's `generate` calls: where the latents start,
what rides along them into the denoiser, what happens after each step, and the tensors callbacks may replace.
They know nothing of a family's conditioning (text encoders, added embeddings), only of latents, the VAE and the
scheduler, so every family's loop takes them as they are.

- Task (text-to-image): pure noise in.
- ImageToImage: the image, encoded (or given as latents) and noised to where `strength` (or `denoising_start`)
  starts the schedule.
- Inpaint: a 9-channel UNet sees the mask and the masked image's latents at every step; with a 4-channel UNet
  the latents outside the mask are reset to the original's after every step.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from diffship.checks import check_int, check_number
from diffship.pipelines.image_processing import interpolate_nearest
from diffship.pipelines.steps import (
    check_generators,
    check_image_channels,
    check_strength,
    get_timesteps,
    tile_to_batch,
)
from diffship.schedulers.noise import randn


class Task:
    """Text-to-image: the latents start from noise, the UNet sees only them. Other tasks replace these steps."""

    # Extra tensors callback_on_step_end may read and replace: name -> array, set in prepare_latents.
    tensors: dict

    def __init__(self):
        self.tensors = {}

    def size(self, pipe, height, width) -> tuple[int, int]:
        return (pipe.default_height if height is None else height, pipe.default_width if width is None else width)

    def preprocess(self, pipe, height, width, batch_size, do_classifier_free_guidance, timer) -> None:
        """Turn the task's inputs (images, masks, depth) into arrays, before the schedule is set."""

    def schedule(self, pipe, timesteps, num_inference_steps):
        """The part of the schedule this task runs (all of it)."""
        return timesteps, num_inference_steps

    def prepare_latents(self, pipe, batch_size, height, width, generator, latents, timesteps,
                        do_classifier_free_guidance, timer) -> np.ndarray:
        shape = (batch_size, pipe.denoiser_latent_channels, height // pipe.vae_scale_factor,
                 width // pipe.vae_scale_factor)
        if latents is None:
            latents = randn(shape, generator, np.float32)
        else:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != shape:
                raise ValueError(f"latents have shape {latents.shape}, expected {shape}")
        # Sigma-parameterised schedulers start from noise of std init_noise_sigma (the flow pipelines: plain noise).
        return latents * np.float32(pipe.scheduler.init_noise_sigma) if pipe.scales_model_input else latents

    def model_input(self, latent_model_input: np.ndarray) -> np.ndarray:
        """What the UNet's sample input is made of at each step: the (scaled) latents alone."""
        return latent_model_input

    def after_step(self, pipe, i, timesteps, latents) -> np.ndarray:
        return latents

    def finish(self, pipe, images):
        return images


def latent_input(pipe, image) -> np.ndarray | None:
    """`image` when it already is latents (N, latent channels, h, w) -- an SDXL base handing its output_type="latent"
    to the refiner --, else None."""
    channels = int(pipe.vae_config.get("latent_channels", 4))
    if isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[1] == channels:
        return image.astype(np.float32, copy=False)
    return None


class ImageToImage(Task):
    """The latents start from `image`, encoded and noised to where `strength` starts the schedule. With
    `denoising_start` (a fraction of the schedule, SDXL's base -> refiner hand-off) the schedule starts there
    instead, and the image -- latents, usually -- is taken as it is, not noised again. `accepts_latents`: whether
    the family takes latents as `image`. `height`, `width`: the size the image is resized to (its own when None;
    diffusers' ControlNet image-to-image pipelines take them)."""

    def __init__(self, image, strength, denoising_start=None, accepts_latents=False, height=None, width=None):
        super().__init__()
        self.image, self.strength, self.denoising_start = image, strength, denoising_start
        self.accepts_latents = accepts_latents
        self.height, self.width = height, width

    def size(self, pipe, height, width):
        return None, None  # the image's (preprocess keeps it, rounded to the VAE's multiple)

    def preprocess(self, pipe, height, width, batch_size, do_classifier_free_guidance, timer):
        self.original_image = self.image
        latents = latent_input(pipe, self.image) if self.accepts_latents else None
        if latents is not None:
            self.image = latents
            return
        self.image = pipe.image_processor.preprocess(self.image, height=self.height, width=self.width, name="image")
        check_image_channels(self.image, pipe.vae_config.get("in_channels", 3))

    def schedule(self, pipe, timesteps, num_inference_steps):
        return get_timesteps(pipe.scheduler, num_inference_steps, self.strength, self.denoising_start)

    def prepare_latents(self, pipe, batch_size, height, width, generator, latents, timesteps,
                        do_classifier_free_guidance, timer):
        check_generators(generator, batch_size)
        image = self.image
        if image.shape[1] == int(pipe.vae_config.get("latent_channels", 4)) and self.accepts_latents:
            init_latents = image
        else:
            if isinstance(generator, list) and len(generator) > 1:
                # One encoder sample per generator: the image is repeated to the batch first.
                image = tile_to_batch(image, batch_size, "images")
            init_latents = pipe.encode_vae_image(image, generator, timer)
        init_latents = tile_to_batch(init_latents, batch_size, "images")
        if self.denoising_start is not None:
            return init_latents
        noise = randn(init_latents.shape, generator, np.float32)
        return pipe.scheduler.add_noise(init_latents, noise, np.repeat(timesteps[:1], batch_size))


class Inpaint(Task):
    """Paint where `mask_image` is white. A 9-channel UNet sees the mask and the masked image's latents at every
    step; with a 4-channel UNet, the latents outside the mask are reset to the original's after every step."""

    def __init__(self, image, mask_image, masked_image_latents, strength, padding_mask_crop, denoising_start=None):
        super().__init__()
        self.image, self.mask_image, self.strength = image, mask_image, strength
        self.masked_image_latents, self.padding_mask_crop = masked_image_latents, padding_mask_crop
        self.denoising_start = denoising_start

    def preprocess(self, pipe, height, width, batch_size, do_classifier_free_guidance, timer):
        # With padding_mask_crop, image and mask are cropped to the mask's region first.
        image_processor, mask_processor = pipe.image_processor, pipe.mask_processor
        self.image_processor = image_processor
        if self.padding_mask_crop is not None:
            self.crops_coords = mask_processor.get_crop_region(self.mask_image, width, height,
                                                               pad=self.padding_mask_crop)
            resize_mode = "fill"
        else:
            self.crops_coords, resize_mode = None, "default"
        self.init_image = image_processor.preprocess(self.image, height=height, width=width,
                                                     crops_coords=self.crops_coords, resize_mode=resize_mode,
                                                     name="image")
        check_image_channels(self.init_image, pipe.vae_config.get("in_channels", 3))
        self.mask_condition = mask_processor.preprocess(self.mask_image, height=height, width=width,
                                                        resize_mode=resize_mode, crops_coords=self.crops_coords,
                                                        name="mask_image")
        if self.mask_condition.shape[0] not in (1, self.init_image.shape[0]) and self.init_image.shape[0] != 1:
            raise ValueError(f"got {self.init_image.shape[0]} images and {self.mask_condition.shape[0]} masks; give "
                             "one mask per image, or one for all")

    def schedule(self, pipe, timesteps, num_inference_steps):
        return get_timesteps(pipe.scheduler, num_inference_steps, self.strength, self.denoising_start)

    def prepare_latents(self, pipe, batch_size, height, width, generator, latents, timesteps,
                        do_classifier_free_guidance, timer):
        self.timesteps = timesteps
        self.do_classifier_free_guidance = do_classifier_free_guidance
        self.unet_channels = pipe.unet_config.get("in_channels", 4)
        latent_channels = int(pipe.vae_config.get("latent_channels", 4))
        shape = (batch_size, latent_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        check_generators(generator, batch_size)
        is_strength_max = self.strength == 1.0
        # 1. The starting latents, and for a 4-channel UNet the image's latents to keep outside the mask.
        add_noise = self.denoising_start is None
        self.image_latents = None
        if self.unet_channels == 4 or (latents is None and not is_strength_max) or not add_noise:
            image = self.init_image
            image_latents = image if image.shape[1] == latent_channels else pipe.encode_vae_image(image, generator,
                                                                                                   timer)
            self.image_latents = tile_to_batch(image_latents, batch_size, "images")
        if not add_noise:  # denoising_start: the image's latents are where the schedule's part starts
            self.noise = randn(shape, generator, np.float32)
            latents = self.image_latents
        elif latents is None:
            self.noise = randn(shape, generator, np.float32)
            # strength 1 starts from pure noise; below 1 from the image noised to the first timestep.
            if is_strength_max:
                latents = self.noise * np.float32(pipe.scheduler.init_noise_sigma)
            else:
                latents = pipe.scheduler.add_noise(self.image_latents, self.noise, np.repeat(timesteps[:1], batch_size))
        else:
            self.noise = np.asarray(latents, dtype=np.float32)
            if self.noise.shape != shape:
                raise ValueError(f"latents have shape {self.noise.shape}, expected {shape}")
            latents = self.noise * np.float32(pipe.scheduler.init_noise_sigma)

        # 2. The mask at the latents' size (nearest neighbours, as diffusers), and the masked image's latents.
        masked_image = (self.init_image * (self.mask_condition < 0.5) if self.masked_image_latents is None
                        else self.masked_image_latents)
        mask = interpolate_nearest(self.mask_condition, shape[2:])
        if masked_image.shape[1] == latent_channels:
            masked_image_latents = np.asarray(masked_image, dtype=np.float32)
        else:
            masked_image_latents = pipe.encode_vae_image(masked_image, generator, timer)
        mask = tile_to_batch(mask, batch_size, "masks")
        masked_image_latents = tile_to_batch(masked_image_latents, batch_size, "images")
        if do_classifier_free_guidance:
            mask = np.concatenate([mask] * 2)
            masked_image_latents = np.concatenate([masked_image_latents] * 2)
        self.tensors = {"mask": mask.astype(np.float32, copy=False),
                        "masked_image_latents": masked_image_latents.astype(np.float32, copy=False)}
        if self.unet_channels == 9:
            total = latent_channels + mask.shape[1] + masked_image_latents.shape[1]
            if total != self.unet_channels:
                raise ValueError(f"the UNet takes {self.unet_channels} channels but latents ({latent_channels}) + "
                                 f"mask ({mask.shape[1]}) + masked image latents ({masked_image_latents.shape[1]}) "
                                 f"make {total}")
        return latents

    def model_input(self, latent_model_input):
        if self.unet_channels != 9:
            return latent_model_input
        return np.concatenate([latent_model_input, self.tensors["mask"], self.tensors["masked_image_latents"]],
                              axis=1)

    def after_step(self, pipe, i, timesteps, latents):
        if self.unet_channels != 4:
            return latents
        # Keep the original outside the mask, noised to where the next step starts.
        init_latents_proper = self.image_latents
        mask = self.tensors["mask"]
        init_mask = np.split(mask, 2)[0] if self.do_classifier_free_guidance else mask
        if i < len(timesteps) - 1:
            init_latents_proper = pipe.scheduler.add_noise(init_latents_proper, self.noise,
                                                           np.array([timesteps[i + 1]]))
        return (1 - init_mask) * init_latents_proper + init_mask * latents

    def finish(self, pipe, images):
        # With padding_mask_crop, the generated crop is pasted back into the original image.
        if self.padding_mask_crop is None:
            return images
        return [self.image_processor.apply_overlay(self.mask_image, self.image, i, self.crops_coords)
                for i in images]


# ---- the checks each task adds to its family's check_inputs ----------------------------------------------------

def check_image_task(pipe, image, strength, num_inference_steps, timesteps=None, sigmas=None) -> None:
    """The checks image-to-image and depth-to-image add to check_inputs."""
    check_strength(strength, num_inference_steps, timesteps, sigmas)
    if image is None:
        raise ValueError(f"{type(pipe).__name__} needs image (PIL images or numpy arrays in [0, 1])")


def check_inpaint_inputs(image, mask_image, strength, output_type, padding_mask_crop, num_inference_steps,
                         timesteps=None, sigmas=None) -> None:
    """strength, image, mask and padding_mask_crop, as every family's inpainting pipeline takes them."""
    check_strength(strength, num_inference_steps, timesteps, sigmas)
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


def check_flow_strength(strength, num_inference_steps, sigmas) -> None:
    """strength in [0, 1], leaving at least one step as diffusers' flow pipelines count them (FlowImageToImage)."""
    check_number(strength, "strength", 0.0, 1.0)
    steps = len(sigmas) if sigmas is not None else num_inference_steps
    if steps - int(max(steps - min(steps * strength, steps), 0)) < 1:
        raise ValueError(f"strength {strength} leaves no denoising step of {steps}; raise strength or "
                         "num_inference_steps")


class FlowImageToImage(ImageToImage):
    """Image-to-image for the flow-matching families (diffusers' StableDiffusion3Img2ImgPipeline): the image is
    resized to the requested size (the model's default unless given), encoded, and taken along the flow to the first
    kept sigma with the scheduler's `scale_noise` (there is no add_noise). `latents`, when given, start the loop as
    they are. The kept tail of the schedule is counted as diffusers' flow pipelines count it:
    t_start = int(n - min(n * strength, n)), not int(n * strength) steps (5 steps at strength 0.5 keep 3, not 2)."""

    def __init__(self, image, strength):
        super().__init__(image, strength)

    def size(self, pipe, height, width):
        return Task.size(self, pipe, height, width)

    def preprocess(self, pipe, height, width, batch_size, do_classifier_free_guidance, timer):
        self.original_image = self.image
        self.image = pipe.image_processor.preprocess(self.image, height=height, width=width, name="image")
        check_image_channels(self.image, pipe.vae_config.get("in_channels", 3))

    def schedule(self, pipe, timesteps, num_inference_steps):
        init_timestep = min(num_inference_steps * self.strength, num_inference_steps)
        t_start = int(max(num_inference_steps - init_timestep, 0))
        pipe.scheduler.set_begin_index(t_start * pipe.scheduler.order)
        return pipe.scheduler.timesteps[t_start * pipe.scheduler.order:], num_inference_steps - t_start

    def prepare_latents(self, pipe, batch_size, height, width, generator, latents, timesteps,
                        do_classifier_free_guidance, timer):
        if latents is not None:
            return np.asarray(latents, dtype=np.float32)
        check_generators(generator, batch_size)
        image = self.image
        if isinstance(generator, list) and len(generator) > 1:
            image = tile_to_batch(image, batch_size, "images")
        init_latents = tile_to_batch(pipe.encode_vae_image(image, generator, timer), batch_size, "images")
        noise = randn(init_latents.shape, generator, np.float32)
        return pipe.scheduler.scale_noise(init_latents, np.repeat(timesteps[:1], batch_size), noise)


class FlowInpaint(Inpaint):
    """Inpainting for the flow-matching families (diffusers' StableDiffusion3InpaintPipeline): as Inpaint, with
    the flow's forward process (`scale_noise`) where the UNet pipelines add noise, plain noise at strength 1 (no
    init_noise_sigma), the kept tail counted as FlowImageToImage counts it, and the denoiser's widths: one of the
    latents' (the original kept outside the mask after every step) or latents + mask + masked-image latents (33 for
    SD3)."""

    def __init__(self, image, mask_image, masked_image_latents, strength, padding_mask_crop):
        super().__init__(image, mask_image, masked_image_latents, strength, padding_mask_crop)

    schedule = FlowImageToImage.schedule

    def prepare_latents(self, pipe, batch_size, height, width, generator, latents, timesteps,
                        do_classifier_free_guidance, timer):
        self.timesteps = timesteps
        self.do_classifier_free_guidance = do_classifier_free_guidance
        latent_channels = int(pipe.vae_config.get("latent_channels", 16))
        self.keeps_original = pipe.denoiser_latent_channels == latent_channels
        self.unet_channels = None  # Inpaint's model_input / after_step are replaced below
        shape = (batch_size, latent_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        check_generators(generator, batch_size)
        is_strength_max = self.strength == 1.0
        self.image_latents = None
        if self.keeps_original or (latents is None and not is_strength_max):
            image = self.init_image
            image_latents = (image if image.shape[1] == latent_channels
                             else pipe.encode_vae_image(image, generator, timer))
            self.image_latents = tile_to_batch(image_latents, batch_size, "images")
        if latents is None:
            self.noise = randn(shape, generator, np.float32)
            latents = self.noise if is_strength_max else pipe.scheduler.scale_noise(
                self.image_latents, np.repeat(timesteps[:1], batch_size), self.noise)
        else:
            self.noise = latents = np.asarray(latents, dtype=np.float32)
        masked_image = (self.init_image * (self.mask_condition < 0.5) if self.masked_image_latents is None
                        else self.masked_image_latents)
        mask = interpolate_nearest(self.mask_condition, shape[2:])
        masked_image_latents = (np.asarray(masked_image, dtype=np.float32) if masked_image.shape[1] == latent_channels
                                else pipe.encode_vae_image(masked_image, generator, timer))
        mask = tile_to_batch(mask, batch_size, "masks")
        masked_image_latents = tile_to_batch(masked_image_latents, batch_size, "images")
        if do_classifier_free_guidance:
            mask = np.concatenate([mask] * 2)
            masked_image_latents = np.concatenate([masked_image_latents] * 2)
        self.tensors = {"mask": mask.astype(np.float32, copy=False),
                        "masked_image_latents": masked_image_latents.astype(np.float32, copy=False)}
        return latents

    def model_input(self, latent_model_input):
        if self.keeps_original:
            return latent_model_input
        return np.concatenate([latent_model_input, self.tensors["mask"], self.tensors["masked_image_latents"]],
                              axis=1)

    def after_step(self, pipe, i, timesteps, latents):
        if not self.keeps_original:
            return latents
        init_latents_proper = self.image_latents
        mask = self.tensors["mask"]
        init_mask = np.split(mask, 2)[0] if self.do_classifier_free_guidance else mask
        if i < len(timesteps) - 1:
            init_latents_proper = pipe.scheduler.scale_noise(init_latents_proper, np.array([timesteps[i + 1]]),
                                                             self.noise)
        return (1 - init_mask) * init_latents_proper + init_mask * latents
