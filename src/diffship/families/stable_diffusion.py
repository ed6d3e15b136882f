"""Stable Diffusion 1.x/2.x, with their LCM and Turbo variants: what is exported, and the numpy pipelines.

Export: a CLIP text encoder (with every hidden state, and its final layer norm beside it for clip_skip), the UNet
(sample, timestep, encoder_hidden_states; + timestep_cond for LCM UNets), the VAE's encoder and decoder, and the
DPT depth estimator of depth-to-image models.

Run time: one denoising loop, `StableDiffusionFamilyPipeline.generate`, line for line with diffusers'
StableDiffusionPipeline. The tasks differ only in named steps a `Task` supplies: where the latents start (noise,
or an image noised to where `strength` starts), what rides along the latents into the UNet (inpainting's mask and
masked-image latents, depth-to-image's depth), what happens after each step (a 4-channel inpainting UNet keeps the
original outside the mask), and the tensors callbacks may replace. Each pipeline class's `__call__` has diffusers'
signature for its task, checks what it was given, and hands its Task to `generate`. No pipeline inherits from
another task's pipeline.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from diffship.checks import IMAGE_SIZE_MULTIPLE, check_image_size, check_int
from diffship.errors import DiffshipError, MissingComponentError
from diffship.families.base import Family
from diffship.layout import (
    CONTROLNET,
    DEPTH_ESTIMATOR,
    FEATURE_EXTRACTOR,
    IMAGE_ENCODER,
    SAFETY_CHECKER,
    SCHEDULER,
    TEXT_ENCODER,
    TOKENIZER,
    UNET,
    UNET_SHALLOW,
    VAE_DECODER,
    VAE_ENCODER,
    controlnet_folder,
    vae_scale_factor,
)
from diffship.pipelines.base import DiffusionPipeline
from diffship.pipelines.controlnet import ControlNetConditioning, image_size, prepare_control, prompt_batch
from diffship.pipelines.image_processing import dpt_preprocess, interpolate_bicubic
from diffship.pipelines.prompts import check_clip_skip, check_negative_prompt, encode_prompt
from diffship.pipelines.steps import (
    as_generator,
    check_generation_options,
    extra_step_kwargs,
    guidance_scale_embedding,
    retrieve_timesteps,
    tile_to_batch,
)
from diffship.pipelines.step_cache import step_cache
from diffship.pipelines.tasks import ImageToImage, Inpaint, Task, check_image_task, check_inpaint_inputs
from diffship.pipelines.timing import StageTimer, stage_of
from diffship.runtimes import input_info

logger = logging.getLogger(__name__)

# ---- what is exported ------------------------------------------------------------------------------------------

# fp32 max-abs bounds of each component's validation. Graph rewrites and kernel choices reorder float sums, so
# exact equality is not expected; these sit well above what correct exports show (about 1e-6 to 1e-5 on the tiny
# models, 1e-4 on full-size UNets) and well below what a wrong graph gives. The VAE decoder's outputs are pixels
# after about 30 convolutions at full size, hence twice the bound.
ATOL = {TEXT_ENCODER: 1e-3, UNET: 1e-3, VAE_ENCODER: 1e-3, VAE_DECODER: 2e-3, DEPTH_ESTIMATOR: 1e-3,
        CONTROLNET: 1e-3}


def export_specs(pipe, shapes, deepcache_branch: int | None = None, controlnets=()) -> list:
    """The components a Stable Diffusion 1.x/2.x pipeline (any task: the UNet's in_channels say which; LCM UNets
    take the guidance embedding as timestep_cond) is exported as; with `deepcache_branch`, the UNet also outputs
    its deep feature there and DeepCache's shallow UNet follows it; with `controlnets` (ControlNetModels), each is
    exported (controlnet, controlnet_1, ...) and the UNet takes their residuals."""
    from diffship.exporters.components import (
        controlnet_spec,
        depth_estimator_spec,
        final_layer_norm_writer,
        text_encoder_spec,
        unet_shallow_spec,
        unet_spec,
        vae_decoder_spec,
        vae_encoder_spec,
        with_controlnet_residuals,
    )

    scale = vae_scale_factor(pipe.vae.config.block_out_channels)
    conditioning = {"encoder_hidden_states": (shapes.sequence_length, pipe.unet.config.cross_attention_dim)}
    lcm = pipe.unet.config.time_cond_proj_dim is not None
    if lcm:
        conditioning["timestep_cond"] = (pipe.unet.config.time_cond_proj_dim,)
    # LCM runs no unconditional batch.
    unet = unet_spec(pipe.unet, shapes, scale, conditioning, guided=not lcm, atol=ATOL[UNET],
                     deepcache_branch=deepcache_branch)
    nets = [controlnet_spec(controlnet_folder(i), net, unet, scale, ATOL[CONTROLNET])
            for i, net in enumerate(controlnets)]
    if controlnets:
        unet = with_controlnet_residuals(pipe.unet, unet)
    specs = [
        text_encoder_spec(TEXT_ENCODER, pipe.text_encoder, shapes, ATOL[TEXT_ENCODER],
                          write_extra=final_layer_norm_writer(pipe.text_encoder)),
        unet,
        *([unet_shallow_spec(pipe.unet, unet, deepcache_branch)] if deepcache_branch is not None else []),
        vae_encoder_spec(pipe.vae, shapes, scale, ATOL[VAE_ENCODER]),
        vae_decoder_spec(pipe.vae, shapes, scale, ATOL[VAE_DECODER]),
        *nets,
    ]
    if getattr(pipe, "depth_estimator", None) is not None:
        specs.append(depth_estimator_spec(pipe.depth_estimator, shapes, ATOL[DEPTH_ESTIMATOR]))
    return specs


# ---- run time --------------------------------------------------------------------------------------------------

CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")


@dataclass
class StableDiffusionPipelineOutput:
    images: list | np.ndarray
    nsfw_content_detected: list[bool] | None = None
    timings: dict[str, float] = field(default_factory=dict)


class DepthToImage(ImageToImage):
    """Image-to-image whose UNet also takes the image's depth, given or estimated, as a fifth channel."""

    def __init__(self, image, strength, depth_map):
        super().__init__(image, strength)
        self.depth_map = depth_map

    def preprocess(self, pipe, height, width, batch_size, do_classifier_free_guidance, timer):
        super().preprocess(pipe, height, width, batch_size, do_classifier_free_guidance, timer)
        depth = pipe.prepare_depth_map(self.original_image, self.depth_map, batch_size, do_classifier_free_guidance,
                                       timer)
        self.tensors = {"depth_mask": depth}

    def model_input(self, latent_model_input):
        return np.concatenate([latent_model_input, self.tensors["depth_mask"]], axis=1)


class StableDiffusionFamilyPipeline(DiffusionPipeline):
    """The steps every Stable Diffusion 1.x/2.x task takes, and `generate`, its one denoising loop. Not a
    pipeline to call: the task pipelines below are."""

    component_names = (VAE_ENCODER, VAE_DECODER, TEXT_ENCODER, TOKENIZER, UNET, SCHEDULER, SAFETY_CHECKER,
                       FEATURE_EXTRACTOR, IMAGE_ENCODER)
    unused_components = (SAFETY_CHECKER, FEATURE_EXTRACTOR, IMAGE_ENCODER)
    required_components = (TEXT_ENCODER, UNET, VAE_DECODER)
    optional_components = (VAE_ENCODER, UNET_SHALLOW)
    callback_tensor_inputs = CALLBACK_TENSOR_INPUTS

    def check_inputs(self, prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                     output_type, callback_on_step_end_tensor_inputs, num_images_per_prompt, *,
                     num_inference_steps=50, timesteps=None, sigmas=None, guidance_scale=7.5, eta=0.0,
                     clip_skip=None, guidance_rescale=0.0, cache=None, cache_interval=None, cache_start=None):
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
        check_generation_options(self, output_type, callback_on_step_end_tensor_inputs, num_images_per_prompt,
                                 num_inference_steps, timesteps, sigmas, guidance_scale, eta, guidance_rescale,
                                 cache, cache_interval, cache_start)
        if guidance_scale <= 1 and (negative_prompt is not None or negative_prompt_embeds is not None):
            logger.warning("the negative prompt is ignored: guidance_scale %g (<= 1) turns classifier-free guidance "
                           "off", guidance_scale)
        if prompt is not None:  # diffusers applies clip_skip when it encodes a prompt, not to prompt_embeds
            self.check_clip_skip(clip_skip)

    def check_clip_skip(self, clip_skip, name: str = "clip_skip") -> None:
        """SD 1.x/2.x: the hidden states and the final layer norm diffusers applies to the chosen one."""
        check_clip_skip(self.text_encoder, clip_skip, self.text_encoder_final_layer_norm, name)

    def denoiser_inputs(self, tensors: dict) -> dict:
        """The UNet's conditioning at each step: the prompt's embeddings ([negative, positive] with guidance)."""
        return {"encoder_hidden_states": tensors["prompt_embeds"]}

    def generate(self, task: Task, prompt=None, height=None, width=None, num_inference_steps=50, timesteps=None,
                 sigmas=None, guidance_scale=7.5, negative_prompt=None, num_images_per_prompt=1, eta=0.0,
                 generator=None, latents=None, prompt_embeds=None, negative_prompt_embeds=None, output_type="pil",
                 return_dict=True, callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 clip_skip=None, guidance_rescale=0.0, set_timesteps_kwargs=None, cache=None, cache_interval=None,
                 cache_start=None, control: ControlNetConditioning | None = None):
        """One generation, for every task (see the module's docstring); inputs are checked by the caller. `cache`:
        a step cache (pipelines/step_cache.py: "deepcache", a full UNet step every `cache_interval` steps from
        `cache_start` on, every step before it, and the shallow UNet on the cached deep feature at the others;
        "taylorseer", the UNet's output forecast between full steps).
        `control`: the ControlNets' inputs (pipelines/controlnet.py), preprocessed by the caller."""
        start = time.perf_counter()
        timer = StageTimer()
        height, width = task.size(self, height, width)
        generator = as_generator(generator)

        # 1. Batch size and guidance. LCM UNets take the guidance scale as an embedding (timestep_cond) and run no
        # unconditional batch.
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else prompt_embeds.shape[0]
        images = batch_size * num_images_per_prompt
        time_cond_proj_dim = self.unet_config.get("time_cond_proj_dim")
        do_classifier_free_guidance = guidance_scale > 1.0 and time_cond_proj_dim is None
        self.prepare_request(batch_size, height, width, num_images_per_prompt, do_classifier_free_guidance)

        # 2. Encode the prompt (and the negative prompt, for guidance).
        with timer.stage(stage_of(TEXT_ENCODER)):
            prompt_embeds, negative_prompt_embeds = encode_prompt(
                self.text_encoder, self.tokenizer, prompt, num_images_per_prompt, do_classifier_free_guidance,
                negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip, self.text_encoder_final_layer_norm,
            )
        if do_classifier_free_guidance:
            prompt_embeds = np.concatenate([negative_prompt_embeds, prompt_embeds])
        conditioning = {}
        if time_cond_proj_dim is not None:
            w = np.full((images,), guidance_scale - 1, dtype=np.float32)
            conditioning["timestep_cond"] = guidance_scale_embedding(w, time_cond_proj_dim)

        # 3. The task's inputs as arrays (image, mask, depth).
        task.preprocess(self, height, width, images, do_classifier_free_guidance, timer)

        # 4. Timesteps: all of the schedule, or the part the task runs.
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, timesteps, sigmas,
                                                            **(set_timesteps_kwargs or {}))
        timesteps, num_inference_steps = task.schedule(self, timesteps, num_inference_steps)

        # 5. Initial latents (and the task's conditioning tensors).
        latents = task.prepare_latents(self, images, height, width, generator, latents, timesteps,
                                       do_classifier_free_guidance, timer)
        step_kwargs = extra_step_kwargs(self.scheduler, generator, eta)
        if control is not None:  # the control images over the batch, each net's scale at each step
            control.start(images, num_images_per_prompt, do_classifier_free_guidance, timesteps)
        self.control = control

        # 6. Denoising loop (DiffusionPipeline.denoise), the UNet fed by denoiser_inputs (and the ControlNets'
        # residuals), or, at the steps a step cache takes, what it runs in its place.
        self.step_cache = step_cache(cache, cache_interval, cache_start)
        latents = self.denoise(task, timesteps, {"latents": latents, "prompt_embeds": prompt_embeds,
                                                 "negative_prompt_embeds": negative_prompt_embeds},
                               conditioning, do_classifier_free_guidance, guidance_scale, guidance_rescale,
                               step_kwargs, timer, callback_on_step_end, callback_on_step_end_tensor_inputs)

        # 7. Decode.
        images = task.finish(self, self.decode_images(latents, output_type, timer))

        timings = timer.summary(time.perf_counter() - start, load=self.load_seconds)
        if not return_dict:
            return images, None
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None, timings=timings)


class StableDiffusionPipeline(StableDiffusionFamilyPipeline):
    """Text-to-image, as diffusers' StableDiffusionPipeline (an LCM UNet takes the guidance as an embedding)."""

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
        cache: str | None = None,
        cache_interval: int | None = None,
        cache_start: int | None = None,
    ):
        task = Task()
        height, width = task.size(self, height, width)
        self.check_inputs(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          output_type, callback_on_step_end_tensor_inputs, num_images_per_prompt,
                          num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                          guidance_scale=guidance_scale, eta=eta, clip_skip=clip_skip,
                          guidance_rescale=guidance_rescale,
                          cache=cache, cache_interval=cache_interval, cache_start=cache_start)
        return self.generate(task, prompt, height, width, num_inference_steps, timesteps, sigmas, guidance_scale,
                             negative_prompt, num_images_per_prompt, eta, generator, latents, prompt_embeds,
                             negative_prompt_embeds, output_type, return_dict, callback_on_step_end,
                             callback_on_step_end_tensor_inputs, clip_skip, guidance_rescale,
                             cache=cache, cache_interval=cache_interval, cache_start=cache_start)


class LatentConsistencyModelPipeline(StableDiffusionFamilyPipeline):
    """Text-to-image with a Latent Consistency Model, as diffusers' LatentConsistencyModelPipeline: the UNet takes
    the guidance scale's embedding (timestep_cond), no unconditional batch runs, and a few steps (default 4) of
    LCMScheduler, whose schedule `original_inference_steps` spaces."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 4,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        guidance_scale: float = 8.5,
        num_images_per_prompt: int = 1,
        generator=None,
        latents: np.ndarray | None = None,
        prompt_embeds: np.ndarray | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        clip_skip: int | None = None,
        cache: str | None = None,
        cache_interval: int | None = None,
        cache_start: int | None = None,
    ):
        if self.unet_config.get("time_cond_proj_dim") is None:
            raise DiffshipError(f"{type(self).__name__} needs an LCM UNet (one with time_cond_proj_dim, which takes "
                                "the guidance embedding); this one has none: use StableDiffusionPipeline")
        task = Task()
        height, width = task.size(self, height, width)
        self.check_inputs(prompt, height, width, None, prompt_embeds, None, output_type,
                          callback_on_step_end_tensor_inputs, num_images_per_prompt,
                          num_inference_steps=num_inference_steps, timesteps=timesteps,
                          guidance_scale=guidance_scale, clip_skip=clip_skip,
                          cache=cache, cache_interval=cache_interval, cache_start=cache_start)
        if original_inference_steps is not None:
            check_int(original_inference_steps, "original_inference_steps", 1,
                      self.scheduler.config.get("num_train_timesteps"))
        extra = {"original_inference_steps": original_inference_steps} if original_inference_steps else {}
        return self.generate(task, prompt, height, width, num_inference_steps, timesteps, None, guidance_scale,
                             None, num_images_per_prompt, 0.0, generator, latents, prompt_embeds, None, output_type,
                             return_dict, callback_on_step_end, callback_on_step_end_tensor_inputs, clip_skip,
                             set_timesteps_kwargs=extra,
                             cache=cache, cache_interval=cache_interval, cache_start=cache_start)


class StableDiffusionImg2ImgPipeline(StableDiffusionFamilyPipeline):
    """Image-to-image, as diffusers' StableDiffusionImg2ImgPipeline: encode the image, noise it to the timestep
    `strength` starts at, denoise from there."""

    required_components = (TEXT_ENCODER, UNET, VAE_ENCODER, VAE_DECODER)
    optional_components = (UNET_SHALLOW,)

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
        guidance_rescale: float = 0.0,
        cache: str | None = None,
        cache_interval: int | None = None,
        cache_start: int | None = None,
    ):
        # The size comes from the image (checked when it is preprocessed).
        self.check_inputs(prompt, None, None, negative_prompt, prompt_embeds, negative_prompt_embeds, output_type,
                          callback_on_step_end_tensor_inputs, num_images_per_prompt,
                          num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                          guidance_scale=guidance_scale, eta=eta, clip_skip=clip_skip,
                          guidance_rescale=guidance_rescale,
                          cache=cache, cache_interval=cache_interval, cache_start=cache_start)
        check_image_task(self, image, strength, num_inference_steps, timesteps, sigmas)
        return self.generate(ImageToImage(image, strength), prompt, None, None, num_inference_steps, timesteps,
                             sigmas, guidance_scale, negative_prompt, num_images_per_prompt, eta, generator, None,
                             prompt_embeds, negative_prompt_embeds, output_type, return_dict, callback_on_step_end,
                             callback_on_step_end_tensor_inputs, clip_skip, guidance_rescale,
                             cache=cache, cache_interval=cache_interval, cache_start=cache_start)


class StableDiffusionInpaintPipeline(StableDiffusionFamilyPipeline):
    """Inpainting, as diffusers' StableDiffusionInpaintPipeline, with a dedicated 9-channel inpainting UNet or a
    regular 4-channel one (see Inpaint)."""

    required_components = (TEXT_ENCODER, UNET, VAE_ENCODER, VAE_DECODER)
    optional_components = (UNET_SHALLOW,)
    unet_in_channels = (4, 9)
    callback_tensor_inputs = (*CALLBACK_TENSOR_INPUTS, "mask", "masked_image_latents")

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
        guidance_rescale: float = 0.0,
        cache: str | None = None,
        cache_interval: int | None = None,
        cache_start: int | None = None,
    ):
        task = Inpaint(image, mask_image, masked_image_latents, strength, padding_mask_crop)
        # Like diffusers, the size defaults to the UNet's, not to the image's: image and mask are resized to it.
        height, width = task.size(self, height, width)
        self.check_inputs(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          output_type, callback_on_step_end_tensor_inputs, num_images_per_prompt,
                          num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                          guidance_scale=guidance_scale, eta=eta, clip_skip=clip_skip,
                          guidance_rescale=guidance_rescale,
                          cache=cache, cache_interval=cache_interval, cache_start=cache_start)
        check_inpaint_inputs(image, mask_image, strength, output_type, padding_mask_crop, num_inference_steps,
                             timesteps, sigmas)
        return self.generate(task, prompt, height, width, num_inference_steps, timesteps, sigmas, guidance_scale,
                             negative_prompt, num_images_per_prompt, eta, generator, latents, prompt_embeds,
                             negative_prompt_embeds, output_type, return_dict, callback_on_step_end,
                             callback_on_step_end_tensor_inputs, clip_skip, guidance_rescale,
                             cache=cache, cache_interval=cache_interval, cache_start=cache_start)


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


class StableDiffusionDepth2ImgPipeline(StableDiffusionFamilyPipeline):
    """Depth-to-image, as diffusers' StableDiffusionDepth2ImgPipeline: image-to-image whose UNet also takes the
    image's depth (5 input channels), given as `depth_map` or estimated by the exported `depth_estimator` (DPT)
    after its feature-extractor preprocessing, done here in numpy."""

    component_names = (VAE_ENCODER, VAE_DECODER, TEXT_ENCODER, TOKENIZER, UNET, SCHEDULER, DEPTH_ESTIMATOR,
                       FEATURE_EXTRACTOR)
    unused_components = ()
    required_components = (TEXT_ENCODER, UNET, VAE_ENCODER, VAE_DECODER)
    optional_components = (DEPTH_ESTIMATOR, UNET_SHALLOW)
    unet_in_channels = (5,)
    callback_tensor_inputs = (*CALLBACK_TENSOR_INPUTS, "depth_mask")

    @property
    def feature_extractor_settings(self) -> dict:
        """The depth estimator's preprocessor_config.json (DPTImageProcessor settings)."""
        return self.configs.get(FEATURE_EXTRACTOR, {})

    def estimate_depth(self, images) -> np.ndarray:
        """predicted_depth [N, h, w] of the exported DPT for PIL images or numpy arrays in [0, 1]."""
        if self.depth_estimator is None:
            where = self.model_dir if self.model_dir is not None else "this pipeline"
            raise MissingComponentError(
                f"no depth_map was given and {where} has no depth_estimator component to estimate one; pass "
                "depth_map, or export the model with its depth estimator"
            )
        if FEATURE_EXTRACTOR not in self.configs:
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
            with timer.stage(stage_of(DEPTH_ESTIMATOR)):
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
        cache: str | None = None,
        cache_interval: int | None = None,
        cache_start: int | None = None,
    ):
        self.check_inputs(prompt, None, None, negative_prompt, prompt_embeds, negative_prompt_embeds, output_type,
                          callback_on_step_end_tensor_inputs, num_images_per_prompt,
                          num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                          guidance_scale=guidance_scale, eta=eta, clip_skip=clip_skip,
                          cache=cache, cache_interval=cache_interval, cache_start=cache_start)
        check_image_task(self, image, strength, num_inference_steps, timesteps, sigmas)
        return self.generate(DepthToImage(image, strength, depth_map), prompt, None, None, num_inference_steps,
                             timesteps, sigmas, guidance_scale, negative_prompt, num_images_per_prompt, eta,
                             generator, None, prompt_embeds, negative_prompt_embeds, output_type, return_dict,
                             callback_on_step_end, callback_on_step_end_tensor_inputs, clip_skip,
                             cache=cache, cache_interval=cache_interval, cache_start=cache_start)


# ---- ControlNet ------------------------------------------------------------------------------------------------

CONTROLNET_COMPONENTS = (VAE_ENCODER, VAE_DECODER, TEXT_ENCODER, TOKENIZER, UNET, CONTROLNET, SCHEDULER,
                         SAFETY_CHECKER, FEATURE_EXTRACTOR, IMAGE_ENCODER)


class StableDiffusionControlNetPipeline(StableDiffusionFamilyPipeline):
    """Text-to-image guided by ControlNets, as diffusers' StableDiffusionControlNetPipeline: `image` is the
    control image (a list, one per ControlNet, for several); the size is its own unless height and width are
    given. The ControlNets run at each step inside the one denoising loop (pipelines/controlnet.py)."""

    component_names = CONTROLNET_COMPONENTS
    required_components = (TEXT_ENCODER, UNET, CONTROLNET, VAE_DECODER)
    optional_components = (VAE_ENCODER,)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
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
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        control = ControlNetConditioning(self, image, controlnet_conditioning_scale, control_guidance_start,
                                         control_guidance_end, guess_mode, name="image")
        check_image_size({"height": height, "width": width}, max(IMAGE_SIZE_MULTIPLE, self.vae_scale_factor))
        height, width = prepare_control(self, control, None, height, width, prompt_batch(prompt, prompt_embeds))
        self.check_inputs(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          output_type, callback_on_step_end_tensor_inputs, num_images_per_prompt,
                          num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                          guidance_scale=guidance_scale, eta=eta, clip_skip=clip_skip)
        return self.generate(Task(), prompt, height, width, num_inference_steps, timesteps, sigmas, guidance_scale,
                             negative_prompt, num_images_per_prompt, eta, generator, latents, prompt_embeds,
                             negative_prompt_embeds, output_type, return_dict, callback_on_step_end,
                             callback_on_step_end_tensor_inputs, clip_skip, control=control)


class StableDiffusionControlNetImg2ImgPipeline(StableDiffusionFamilyPipeline):
    """Image-to-image guided by ControlNets, as diffusers' StableDiffusionControlNetImg2ImgPipeline: `image` is
    edited, `control_image` guides; both come out at height x width (their own size when not given, which must
    then be one)."""

    component_names = CONTROLNET_COMPONENTS
    required_components = (TEXT_ENCODER, UNET, CONTROLNET, VAE_ENCODER, VAE_DECODER)
    optional_components = ()

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        control_image=None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
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
        controlnet_conditioning_scale: float | list[float] = 0.8,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        control = ControlNetConditioning(self, control_image, controlnet_conditioning_scale, control_guidance_start,
                                         control_guidance_end, guess_mode, name="control_image")
        self.check_inputs(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds, output_type,
                          callback_on_step_end_tensor_inputs, num_images_per_prompt,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                          clip_skip=clip_skip)
        check_image_task(self, image, strength, num_inference_steps)
        prepare_control(self, control, image, height, width, prompt_batch(prompt, prompt_embeds))
        return self.generate(ImageToImage(image, strength, height=height, width=width), prompt, None, None,
                             num_inference_steps, None, None, guidance_scale, negative_prompt, num_images_per_prompt,
                             eta, generator, None, prompt_embeds, negative_prompt_embeds, output_type, return_dict,
                             callback_on_step_end, callback_on_step_end_tensor_inputs, clip_skip, control=control)


class StableDiffusionControlNetInpaintPipeline(StableDiffusionFamilyPipeline):
    """Inpainting guided by ControlNets, as diffusers' StableDiffusionControlNetInpaintPipeline, with a regular
    4-channel UNet or a 9-channel inpainting one (the ControlNets see the 4 latent channels). The size is the
    image's unless height and width are given; the control image comes out at it (with padding_mask_crop,
    cropped as image and mask are)."""

    component_names = CONTROLNET_COMPONENTS
    required_components = (TEXT_ENCODER, UNET, CONTROLNET, VAE_ENCODER, VAE_DECODER)
    optional_components = ()
    unet_in_channels = (4, 9)
    callback_tensor_inputs = (*CALLBACK_TENSOR_INPUTS, "mask", "masked_image_latents")

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        control_image=None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
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
        controlnet_conditioning_scale: float | list[float] = 0.5,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        control = ControlNetConditioning(self, control_image, controlnet_conditioning_scale, control_guidance_start,
                                         control_guidance_end, guess_mode, name="control_image")
        check_inpaint_inputs(image, mask_image, strength, output_type, padding_mask_crop, num_inference_steps)
        self.check_inputs(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds, output_type,
                          callback_on_step_end_tensor_inputs, num_images_per_prompt,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                          clip_skip=clip_skip)
        crops_coords, resize_mode = None, "default"
        if padding_mask_crop is not None:
            height, width = image_size(self, image, height, width, "image")
            crops_coords = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        height, width = prepare_control(self, control, image, height, width, prompt_batch(prompt, prompt_embeds),
                                        crops_coords, resize_mode)
        task = Inpaint(image, mask_image, None, strength, padding_mask_crop)
        return self.generate(task, prompt, height, width, num_inference_steps, None, None, guidance_scale,
                             negative_prompt, num_images_per_prompt, eta, generator, latents, prompt_embeds,
                             negative_prompt_embeds, output_type, return_dict, callback_on_step_end,
                             callback_on_step_end_tensor_inputs, clip_skip, control=control)


FAMILY = Family(
    name="stable-diffusion",
    class_names=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                 "StableDiffusionDepth2ImgPipeline", "LatentConsistencyModelPipeline",
                 "StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline",
                 "StableDiffusionControlNetInpaintPipeline"),
    components=ATOL,
    export_specs=f"{__name__}:export_specs",
    # 4: a regular model (inpainting then blends latents with the mask); 9: a dedicated inpainting model; 5: a
    # depth-to-image model.
    tasks={
        "text-to-image": {4: StableDiffusionPipeline},
        "image-to-image": {4: StableDiffusionImg2ImgPipeline, 5: StableDiffusionDepth2ImgPipeline},
        "inpainting": {4: StableDiffusionInpaintPipeline, 9: StableDiffusionInpaintPipeline},
    },
    by_class={"LatentConsistencyModelPipeline": {"text-to-image": LatentConsistencyModelPipeline}},
    copied=(TOKENIZER, SCHEDULER),
    step_caches=("deepcache",),
    controlnet_tasks={"text-to-image": StableDiffusionControlNetPipeline,
                      "image-to-image": StableDiffusionControlNetImg2ImgPipeline,
                      "inpainting": StableDiffusionControlNetInpaintPipeline},
)
