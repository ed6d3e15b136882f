"""Flux.1 (dev, schnell, Fill): what is exported, and the numpy pipelines.

Export: the CLIP text encoder (`text_encoder`: Flux reads its pooled output), the T5 encoder (`text_encoder_2`:
input_ids -> last_hidden_state), the transformer (`transformer`: hidden_states, encoder_hidden_states,
pooled_projections, timestep, img_ids, txt_ids (+ guidance) -> out_hidden_states, Optimum's names and order) and
the 16-channel VAE's encoder and decoder.

Run time: `FluxFamilyPipeline.generate`, line for line with diffusers' Flux pipelines, on the shared denoising loop
(DiffusionPipeline.denoise). Flux's own steps are here:
- the latents are packed: each 2x2 patch of the 16 latent channels is one token of 64 ([B, h/2 * w/2, 64]), so the
  loop, the scheduler, the callbacks and output_type="latent" see packed latents, as in diffusers; the tasks build
  them in the VAE's layout (denoiser_latent_channels) and the Flux tasks below pack what they built;
- the transformer takes the position of every token: img_ids (0, row, column) of each patch, txt_ids zeros, fed as
  constant conditioning, in the dtype the graph declares (float here, int64 in Optimum's ONNX export);
- guidance: dev and Fill are guidance-distilled, the guidance scale is an input (`guidance`, [B]) and no
  unconditional batch runs; true classifier-free guidance (`true_cfg_scale` > 1 with a negative prompt) runs the
  negative batch beside the positive one, as the loop guides every family;
- the timestep is fed divided by 1000, and the schedule is diffusers' Flux one: sigmas linspace(1, 1/n, n), shifted
  by `mu` from the patch count where the scheduler shifts dynamically (dev), by its fixed shift otherwise (schnell).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import numpy as np

from diffship.checks import check_image_size, check_int, check_number
from diffship.families.base import Family
from diffship.layout import (
    FEATURE_EXTRACTOR,
    IMAGE_ENCODER,
    SCHEDULER,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TOKENIZER,
    TOKENIZER_2,
    TRANSFORMER,
    VAE_DECODER,
    VAE_ENCODER,
    vae_scale_factor,
)
from diffship.pipelines.base import DiffusionPipeline
from diffship.pipelines.image_processing import VaeImageProcessor
from diffship.pipelines.prompts import as_list, check_prompts, run_text_encoder, warn_truncated
from diffship.pipelines.step_cache import step_cache
from diffship.pipelines.steps import as_generator, check_generation_options, retrieve_timesteps, tile_to_batch
from diffship.pipelines.tasks import (
    FlowImageToImage,
    FlowInpaint,
    Task,
    check_flow_strength,
    check_inpaint_inputs,
)
from diffship.pipelines.timing import StageTimer, stage_of
from diffship.pipelines.tokenizer import T5Tokenizer
from diffship.runtimes import input_info
from diffship.schedulers import FLOW
from diffship.schedulers.schedules import calculate_shift_for, flux_default_sigmas

# ---- what is exported ------------------------------------------------------------------------------------------

# fp32 max-abs bounds: as for SD3's graphs of the same kinds (CLIP, T5, a transformer of matmuls, norms and
# softmaxes, the VAE).
ATOL = {TEXT_ENCODER: 1e-3, TEXT_ENCODER_2: 1e-3, TRANSFORMER: 1e-3, VAE_ENCODER: 1e-3, VAE_DECODER: 2e-3}
# T5's sequence lengths the graphs are traced and checked at: diffusers' default max_sequence_length, and 77.
T5_SEQUENCE_LENGTHS = (512, 77)
# Packing: a 2x2 patch of latents is one transformer token.
PACK = 2


def export_specs(pipe, shapes) -> list:
    """The components a Flux pipeline is exported as."""
    from diffship.exporters.components import (
        flux_transformer_spec,
        t5_encoder_spec,
        text_encoder_spec,
        vae_decoder_spec,
        vae_encoder_spec,
    )

    scale = vae_scale_factor(pipe.vae.config.block_out_channels)
    check_image_size({"height": shapes.height, "width": shapes.width}, scale * PACK)
    return [
        text_encoder_spec(TEXT_ENCODER, pipe.text_encoder, shapes, ATOL[TEXT_ENCODER]),
        t5_encoder_spec(TEXT_ENCODER_2, pipe.text_encoder_2, shapes, T5_SEQUENCE_LENGTHS, ATOL[TEXT_ENCODER_2]),
        flux_transformer_spec(pipe.transformer, shapes, scale, T5_SEQUENCE_LENGTHS, ATOL[TRANSFORMER]),
        vae_encoder_spec(pipe.vae, shapes, scale, ATOL[VAE_ENCODER]),
        vae_decoder_spec(pipe.vae, shapes, scale, ATOL[VAE_DECODER]),
    ]


# ---- packed latents (diffusers' FluxPipeline._pack_latents, _unpack_latents, _prepare_latent_image_ids) ----------

def pack_latents(latents: np.ndarray) -> np.ndarray:
    """[B, C, h, w] -> [B, h/2 * w/2, C * 4]: each 2x2 patch one token, its channels c * 4 + (row * 2 + column)."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // PACK, PACK, w // PACK, PACK).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(patches).reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(latents: np.ndarray, height: int, width: int, scale: int) -> np.ndarray:
    """pack_latents undone, for an image of height x width."""
    b, _, c = latents.shape
    h, w = PACK * (height // (scale * PACK)), PACK * (width // (scale * PACK))
    patches = latents.reshape(b, h // PACK, w // PACK, c // 4, PACK, PACK).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(patches).reshape(b, c // 4, h, w)


def latent_image_ids(height: int, width: int) -> np.ndarray:
    """(0, row, column) of each token of a height x width patch grid, row by row: [height * width, 3] float32."""
    ids = np.zeros((height, width, 3), np.float32)
    ids[..., 1] += np.arange(height, dtype=np.float32)[:, None]
    ids[..., 2] += np.arange(width, dtype=np.float32)[None, :]
    return ids.reshape(height * width, 3)


def pack_mask_pixels(mask: np.ndarray, scale: int) -> np.ndarray:
    """FluxFillPipeline's mask: [B, 1, H, W] pixels -> each scale x scale block as channels [B, scale^2, H/s, W/s],
    then packed."""
    b, _, height, width = mask.shape
    h, w = height // scale, width // scale
    blocks = mask[:, 0].reshape(b, h, scale, w, scale).transpose(0, 2, 4, 1, 3).reshape(b, scale * scale, h, w)
    return pack_latents(np.ascontiguousarray(blocks))


# ---- the Flux tasks: the shared ones, their latents packed ---------------------------------------------------------

def _check_packed(latents, pipe, batch_size: int, height: int, width: int, channels: int) -> np.ndarray:
    latents = np.asarray(latents, dtype=np.float32)
    h, w = height // pipe.vae_scale_factor // PACK, width // pipe.vae_scale_factor // PACK
    expected = (batch_size, h * w, channels * PACK * PACK)
    if latents.shape != expected:
        raise ValueError(f"latents have shape {latents.shape}, expected the packed {expected} (batch, patches of a "
                         f"{height}x{width} image, 2x2 x {channels} latent channels)")
    return latents


class FluxText2Image(Task):
    """Text-to-image: noise drawn in the VAE's layout, then packed (FluxPipeline.prepare_latents); `latents`, when
    given, are packed ones."""

    def schedule(self, pipe, timesteps, num_inference_steps):
        # FluxPipeline sets the scheduler's begin index before its loop (its first step finds no timestep).
        if hasattr(pipe.scheduler, "set_begin_index"):
            pipe.scheduler.set_begin_index(0)
        return timesteps, num_inference_steps

    def prepare_latents(self, pipe, batch_size, height, width, generator, latents, timesteps,
                        do_classifier_free_guidance, timer):
        if latents is not None:
            return _check_packed(latents, pipe, batch_size, height, width, pipe.denoiser_latent_channels)
        return pack_latents(super().prepare_latents(pipe, batch_size, height, width, generator, None, timesteps,
                                                    do_classifier_free_guidance, timer))


class FluxImageToImage(FlowImageToImage):
    """Image-to-image (FluxImg2ImgPipeline): FlowImageToImage's latents, packed; `latents`, when given, are packed
    ones and start the loop as they are."""

    def prepare_latents(self, pipe, batch_size, height, width, generator, latents, timesteps,
                        do_classifier_free_guidance, timer):
        if latents is not None:
            return _check_packed(latents, pipe, batch_size, height, width, pipe.denoiser_latent_channels)
        return pack_latents(super().prepare_latents(pipe, batch_size, height, width, generator, None, timesteps,
                                                    do_classifier_free_guidance, timer))


class FluxInpaint(FlowInpaint):
    """Inpainting (FluxInpaintPipeline): FlowInpaint with the 64-channel transformer (the original kept outside the
    mask after every step), everything it keeps packed: the latents, noise and image latents, the mask repeated to
    the latent channels, the masked image's latents. `latents`, when given, are in the VAE's layout (diffusers packs
    them here, unlike its other Flux pipelines)."""

    def prepare_latents(self, pipe, batch_size, height, width, generator, latents, timesteps,
                        do_classifier_free_guidance, timer):
        latents = super().prepare_latents(pipe, batch_size, height, width, generator, latents, timesteps,
                                          do_classifier_free_guidance, timer)
        channels = latents.shape[1]
        self.noise, self.image_latents = pack_latents(self.noise), pack_latents(self.image_latents)
        self.tensors = {"mask": pack_latents(np.repeat(self.tensors["mask"], channels, axis=1)),
                        "masked_image_latents": pack_latents(self.tensors["masked_image_latents"])}
        return pack_latents(latents)


class FluxFill(FlowImageToImage):
    """FluxFillPipeline's task: the latents as image-to-image's (the image encoded and taken along the flow to
    where `strength` starts; 1 by default: pure noise), and at every step the transformer also sees the masked
    image's latents and the mask's 8x8 pixel blocks, packed beside the latents (64 + 64 + 256 = 384 channels).
    `masked_image_latents`, when given, are that packed pair (320 channels)."""

    def __init__(self, image, mask_image, masked_image_latents, strength):
        super().__init__(image, strength)
        self.mask_image, self.masked_image_latents = mask_image, masked_image_latents

    def preprocess(self, pipe, height, width, batch_size, do_classifier_free_guidance, timer):
        super().preprocess(pipe, height, width, batch_size, do_classifier_free_guidance, timer)
        if self.masked_image_latents is None:
            self.mask = pipe.mask_processor.preprocess(self.mask_image, height=height, width=width,
                                                       name="mask_image")

    def prepare_latents(self, pipe, batch_size, height, width, generator, latents, timesteps,
                        do_classifier_free_guidance, timer):
        if latents is not None:
            latents = _check_packed(latents, pipe, batch_size, height, width, pipe.denoiser_latent_channels)
        else:
            latents = pack_latents(super().prepare_latents(pipe, batch_size, height, width, generator, None,
                                                           timesteps, do_classifier_free_guidance, timer))
        if self.masked_image_latents is not None:
            condition = np.asarray(self.masked_image_latents, dtype=np.float32)
        else:
            masked_image = self.image * (1 - self.mask)
            masked_image_latents = pipe.encode_vae_image(masked_image, generator, timer)
            masked_image_latents = tile_to_batch(masked_image_latents, batch_size, "images")
            mask = tile_to_batch(self.mask, batch_size, "masks")
            condition = np.concatenate([pack_latents(masked_image_latents),
                                        pack_mask_pixels(mask, pipe.vae_scale_factor)], axis=-1)
        if do_classifier_free_guidance:
            condition = np.concatenate([condition] * 2)
        self.tensors = {"masked_image_latents": condition.astype(np.float32, copy=False)}
        return latents

    def model_input(self, latent_model_input):
        return np.concatenate([latent_model_input, self.tensors["masked_image_latents"]], axis=-1)


# ---- run time --------------------------------------------------------------------------------------------------

CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds")


@dataclass
class FluxPipelineOutput:
    images: list | np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


def _check_packed_latents(pipe, latents, prompt, prompt_embeds, num_images_per_prompt, height, width, channels):
    """Packed `latents` of the request's shape, before any graph runs (text-to-image, image-to-image, Fill)."""
    if latents is None or (prompt is None and prompt_embeds is None):
        return
    batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else len(prompt_embeds)
    _check_packed(latents, pipe, batch_size * num_images_per_prompt, height, width, channels)


class FluxFamilyPipeline(DiffusionPipeline):
    """The steps every Flux task takes, and `generate`, its one generation. Not a pipeline to call: the task
    pipelines below are."""

    # diffusers' FluxPipeline components, the VAE as its two graphs.
    component_names = (SCHEDULER, VAE_ENCODER, VAE_DECODER, TEXT_ENCODER, TOKENIZER, TEXT_ENCODER_2, TOKENIZER_2,
                       TRANSFORMER, IMAGE_ENCODER, FEATURE_EXTRACTOR)
    unused_components = (IMAGE_ENCODER, FEATURE_EXTRACTOR)
    required_components = (TEXT_ENCODER, TEXT_ENCODER_2, TRANSFORMER, VAE_DECODER)
    optional_components = (VAE_ENCODER,)
    required_tokenizers = (TOKENIZER, TOKENIZER_2)
    tokenizer_classes = {TOKENIZER_2: T5Tokenizer}
    callback_tensor_inputs = CALLBACK_TENSOR_INPUTS
    denoiser = TRANSFORMER
    denoiser_sample = "hidden_states"
    denoiser_output = "out_hidden_states"
    denoiser_kind = FLOW
    scales_model_input = False
    unet_in_channels = (64,)  # the transformer's: 2x2 patches of 16 latent channels
    # diffusers' default_sample_size: the default image is 128 latents a side (1024 pixels).
    default_sample_size = 128
    # T5's token count of the current request (generate sets it), for request_shapes; diffusers' default.
    max_sequence_length = 512

    @property
    def denoiser_latent_channels(self) -> int:
        return int(self.denoiser_config.get("in_channels", 64)) // (PACK * PACK)

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * PACK  # a latent of whole 2x2 patches

    @property
    def default_height(self) -> int:
        return self._static_size(2) or self.default_sample_size * self.vae_scale_factor

    @property
    def default_width(self) -> int:
        return self._static_size(3) or self.default_sample_size * self.vae_scale_factor

    def _static_size(self, axis: int) -> int | None:
        """A static export's image side: the VAE decoder's fixed latent size (the packed transformer input does not
        say height and width apart)."""
        info = input_info(self.vae_decoder, "latent_sample") if self.vae_decoder is not None else None
        return info.shape[axis] * self.vae_scale_factor if info is not None and isinstance(info.shape[axis],
                                                                                           int) else None

    @property
    def image_processor(self) -> VaeImageProcessor:
        """Images to [-1, 1] NCHW at multiples of the VAE's factor times the packing (16)."""
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * PACK)

    @property
    def mask_processor(self) -> VaeImageProcessor:
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * PACK, do_normalize=False, do_binarize=True,
                                 do_convert_grayscale=True)

    def timestep_feed(self, t, batch: int, session=None) -> np.ndarray:
        # diffusers' Flux pipelines pass timestep / 1000 (the transformer multiplies by 1000 again), in float32.
        return super().timestep_feed(np.float32(t) / np.float32(1000), batch, session)

    def request_shapes(self, batch_size: int = 1, height: int | None = None, width: int | None = None,
                       num_images_per_prompt: int = 1, guidance: bool = False) -> dict[str, dict[str, tuple]]:
        """{component: {input: shape}} for the dynamic inputs of every graph at a request (see
        DiffusionPipeline.request_shapes): CLIP takes the prompts at 77 tokens, T5 at max_sequence_length, the
        transformer the images (twice with true classifier-free guidance) as packed patches, and their ids."""
        height = self.default_height if height is None else height
        width = self.default_width if width is None else width
        check_image_size({"height": height, "width": width}, self.size_multiple)
        check_int(batch_size, "batch_size", 1)
        check_int(num_images_per_prompt, "num_images_per_prompt", 1)
        images = batch_size * num_images_per_prompt
        denoised = images * (2 if guidance else 1)
        latent = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        patches = (latent[0] // PACK) * (latent[1] // PACK)
        text = self.max_sequence_length
        config = self.denoiser_config
        wanted = {
            TEXT_ENCODER: {"input_ids": (batch_size, self.tokenizer.model_max_length)},
            TEXT_ENCODER_2: {"input_ids": (batch_size, text)},
            TRANSFORMER: {"hidden_states": (denoised, patches, config.get("in_channels", 64)),
                          "encoder_hidden_states": (denoised, text, config.get("joint_attention_dim", 4096)),
                          "pooled_projections": (denoised, config.get("pooled_projection_dim", 768)),
                          "timestep": (denoised,), "guidance": (denoised,), "img_ids": (patches, 3),
                          "txt_ids": (text, 3)},
            **self.vae_request_shapes(images, height, width),
        }
        return self.dynamic_inputs_only(wanted)

    # ---- checks ------------------------------------------------------------------------------------------------
    def check_inputs(self, prompt, prompt_2, height, width, negative_prompt, negative_prompt_2, prompt_embeds,
                     negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, output_type,
                     callback_on_step_end_tensor_inputs, num_images_per_prompt, max_sequence_length,
                     num_inference_steps, sigmas, guidance_scale, true_cfg_scale, *, cache=None, cache_interval=None,
                     cache_start=None) -> None:
        """diffusers' checks, and the ranges of the values it leaves unchecked, before any graph runs. Sizes that
        are no multiple of 16 (VAE 8 x packing 2) are refused: diffusers warns and draws a smaller image."""
        check_image_size({"height": height, "width": width}, self.size_multiple)
        check_prompts({"prompt": prompt, "prompt_2": prompt_2},
                      {"negative_prompt": negative_prompt, "negative_prompt_2": negative_prompt_2}, prompt_embeds,
                      negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                      "CLIP's pooled output")
        check_int(max_sequence_length, "max_sequence_length", 1, 512)
        # guidance_scale is the guidance-distilled transformer's input (schnell ignores it); true_cfg_scale is the
        # classifier-free guidance scale the loop guides with.
        check_generation_options(self, output_type, callback_on_step_end_tensor_inputs, num_images_per_prompt,
                                 num_inference_steps, None, sigmas, guidance_scale, 0.0, 0.0, cache, cache_interval,
                                 cache_start)
        check_number(true_cfg_scale, "true_cfg_scale")

    # ---- Flux's own steps ----------------------------------------------------------------------------------------
    def encode_prompt(self, prompt, prompt_2=None, num_images_per_prompt=1, prompt_embeds=None,
                      pooled_prompt_embeds=None, max_sequence_length=512):
        """(prompt_embeds, pooled_prompt_embeds, text_ids), as diffusers' FluxPipeline.encode_prompt returns them:
        T5's last hidden state at max_sequence_length tokens, CLIP's pooled output at 77, zeros for the ids."""
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompts_2 = as_list(prompt_2 or prompt, len(prompts))
            warn_truncated(self.tokenizer, prompts, "prompt", self.tokenizer.model_max_length)
            pooled = run_text_encoder(self.text_encoder, self.tokenizer(prompts))["pooler_output"]
            pooled_prompt_embeds = np.repeat(pooled, num_images_per_prompt, axis=0)
            warn_truncated(self.tokenizer_2, prompts_2, "prompt_2", max_sequence_length)
            embeds = run_text_encoder(self.text_encoder_2, self.tokenizer_2(prompts_2, max_sequence_length))
            prompt_embeds = np.repeat(embeds["last_hidden_state"], num_images_per_prompt, axis=0)
        prompt_embeds = np.asarray(prompt_embeds, np.float32)
        pooled_prompt_embeds = np.asarray(pooled_prompt_embeds, np.float32)
        text_ids = np.zeros((prompt_embeds.shape[1], 3), np.float32)
        return prompt_embeds, pooled_prompt_embeds, text_ids

    def position_ids(self, name: str, ids: np.ndarray) -> np.ndarray:
        """img_ids / txt_ids in the dtype the transformer graph declares (Optimum's ONNX export: int64)."""
        info = input_info(self.transformer, name)
        return ids.astype(info.dtype if info is not None else np.float32, copy=False)

    def denoiser_inputs(self, tensors: dict) -> dict:
        """The transformer's conditioning at each step: T5's tokens and CLIP's pooled embedding ([negative,
        positive] with true classifier-free guidance). The ids and guidance are constant (generate's conditioning)."""
        return {"encoder_hidden_states": tensors["prompt_embeds"],
                "pooled_projections": tensors["pooled_prompt_embeds"]}

    def scheduler_kwargs(self, height: int, width: int, sigmas, num_inference_steps: int) -> dict:
        """What diffusers' Flux pipelines pass to set_timesteps: the sigmas (linspace(1, 1/n, n) unless given; none
        for a scheduler configured with use_flow_sigmas) and `mu` from the patch count (calculate_shift with the
        scheduler config's base/max values; only a dynamically shifting scheduler uses it)."""
        if sigmas is None:
            sigmas = flux_default_sigmas(num_inference_steps)
        if self.scheduler.config.get("use_flow_sigmas", None):
            sigmas = None
        image_seq_len = (height // self.vae_scale_factor // PACK) * (width // self.vae_scale_factor // PACK)
        kwargs = {"sigmas": sigmas}
        if "mu" in inspect.signature(self.scheduler.set_timesteps).parameters:
            kwargs["mu"] = calculate_shift_for(self.scheduler.config, image_seq_len)
        return kwargs

    def generate(self, task: Task, prompt=None, prompt_2=None, negative_prompt=None, negative_prompt_2=None,
                 true_cfg_scale=1.0, height=None, width=None, num_inference_steps=28, sigmas=None,
                 guidance_scale=3.5, num_images_per_prompt=1, generator=None, latents=None, prompt_embeds=None,
                 pooled_prompt_embeds=None, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 output_type="pil", return_dict=True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), max_sequence_length=512,
                 cache=None, cache_interval=None, cache_start=None):
        """One generation (see the module's docstring); inputs are checked by the caller. `cache`: a step
        cache (pipelines/step_cache.py: "taylorseer", the transformer's output forecast between full steps)."""
        start = time.perf_counter()
        timer = StageTimer()
        height, width = task.size(self, height, width)
        generator = as_generator(generator)

        # 1. Batch size, and true classifier-free guidance (a negative prompt and true_cfg_scale > 1).
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else len(prompt_embeds)
        images = batch_size * num_images_per_prompt
        has_neg_prompt = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None)
        do_true_cfg = true_cfg_scale > 1 and has_neg_prompt
        self.max_sequence_length = max_sequence_length
        self.prepare_request(batch_size, height, width, num_images_per_prompt, do_true_cfg)

        # 2. Encode the prompt (T5's tokens, CLIP's pooled embedding), and the negative one for true guidance.
        with timer.stage(stage_of(TEXT_ENCODER)):
            prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
                prompt, prompt_2, num_images_per_prompt, prompt_embeds, pooled_prompt_embeds, max_sequence_length)
            if do_true_cfg:
                negative = as_list(negative_prompt, batch_size) if negative_prompt is not None else None
                negative_2 = as_list(negative_prompt_2, batch_size) if negative_prompt_2 is not None else None
                negative_prompt_embeds, negative_pooled_prompt_embeds, _ = self.encode_prompt(
                    negative, negative_2, num_images_per_prompt, negative_prompt_embeds,
                    negative_pooled_prompt_embeds, max_sequence_length)
        if do_true_cfg:
            prompt_embeds = np.concatenate([negative_prompt_embeds, prompt_embeds])
            pooled_prompt_embeds = np.concatenate([negative_pooled_prompt_embeds, pooled_prompt_embeds])

        # 3. The task's inputs as arrays (image, mask).
        task.preprocess(self, height, width, images, do_true_cfg, timer)

        # 4. Timesteps: Flux's sigmas, shifted by `mu` from the patch count where the scheduler shifts dynamically.
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, None, **self.scheduler_kwargs(height, width, sigmas,
                                                                               num_inference_steps))
        timesteps, num_inference_steps = task.schedule(self, timesteps, num_inference_steps)

        # 5. Initial latents, packed; the patches' ids.
        latents = task.prepare_latents(self, images, height, width, generator, latents, timesteps, do_true_cfg,
                                       timer)
        grid = (height // self.vae_scale_factor // PACK, width // self.vae_scale_factor // PACK)
        conditioning = {"img_ids": self.position_ids("img_ids", latent_image_ids(*grid)),
                        "txt_ids": self.position_ids("txt_ids", text_ids)}
        # The guidance-distilled transformers' guidance scale, one per image (and per negative image).
        if self.denoiser_config.get("guidance_embeds", False):
            conditioning["guidance"] = np.full((images * (2 if do_true_cfg else 1),), guidance_scale, np.float32)

        self.step_cache = step_cache(cache, cache_interval, cache_start)
        # 6. Denoising loop (DiffusionPipeline.denoise): true guidance, if any, over the [negative, positive] batch.
        tensors = {"latents": latents, "prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}
        latents = self.denoise(task, timesteps, tensors, conditioning, do_true_cfg, true_cfg_scale, 0.0, {}, timer,
                               callback_on_step_end, callback_on_step_end_tensor_inputs)

        # 7. Decode: unpacked, (latents / scaling_factor) + shift_factor into the VAE decoder.
        if output_type != "latent":
            latents = unpack_latents(latents, height, width, self.vae_scale_factor)
        images = task.finish(self, self.decode_images(latents, output_type, timer))

        timings = timer.summary(time.perf_counter() - start, load=self.load_seconds)
        if not return_dict:
            return (images,)
        return FluxPipelineOutput(images=images, timings=timings)


class FluxPipeline(FluxFamilyPipeline):
    """Text-to-image, as diffusers' FluxPipeline (dev: guidance_scale is the transformer's guidance input;
    schnell: a transformer without one, usually 4 steps, guidance_scale 0, max_sequence_length 256)."""

    def __call__(self, prompt=None, prompt_2=None, negative_prompt=None, negative_prompt_2=None, true_cfg_scale=1.0,
                 height=None, width=None, num_inference_steps=28, sigmas=None, guidance_scale=3.5,
                 num_images_per_prompt=1, generator=None, latents=None, prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, output_type="pil",
                 return_dict=True, callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 max_sequence_length=512, cache=None, cache_interval=None, cache_start=None):
        task = FluxText2Image()
        height, width = task.size(self, height, width)
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt, negative_prompt_2, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, output_type,
                          callback_on_step_end_tensor_inputs, num_images_per_prompt, max_sequence_length,
                          num_inference_steps, sigmas, guidance_scale, true_cfg_scale,
                          cache=cache, cache_interval=cache_interval, cache_start=cache_start)
        _check_packed_latents(self, latents, prompt, prompt_embeds, num_images_per_prompt, height, width,
                              self.denoiser_latent_channels)
        return self.generate(task, prompt, prompt_2, negative_prompt, negative_prompt_2, true_cfg_scale, height,
                             width, num_inference_steps, sigmas, guidance_scale, num_images_per_prompt, generator,
                             latents, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                             negative_pooled_prompt_embeds, output_type, return_dict, callback_on_step_end,
                             callback_on_step_end_tensor_inputs, max_sequence_length,
                             cache=cache, cache_interval=cache_interval, cache_start=cache_start)


class FluxImg2ImgPipeline(FluxFamilyPipeline):
    """Image-to-image, as diffusers' FluxImg2ImgPipeline: the image resized to height x width (1024 unless given),
    encoded, and taken along the flow to where `strength` starts the schedule."""

    required_components = (TEXT_ENCODER, TEXT_ENCODER_2, TRANSFORMER, VAE_ENCODER, VAE_DECODER)
    optional_components = ()

    def __call__(self, prompt=None, prompt_2=None, negative_prompt=None, negative_prompt_2=None, true_cfg_scale=1.0,
                 image=None, height=None, width=None, strength=0.6, num_inference_steps=28, sigmas=None,
                 guidance_scale=7.0, num_images_per_prompt=1, generator=None, latents=None, prompt_embeds=None,
                 pooled_prompt_embeds=None, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 output_type="pil", return_dict=True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), max_sequence_length=512,
                 cache=None, cache_interval=None, cache_start=None):
        task = FluxImageToImage(image, strength)
        height, width = task.size(self, height, width)
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt, negative_prompt_2, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, output_type,
                          callback_on_step_end_tensor_inputs, num_images_per_prompt, max_sequence_length,
                          num_inference_steps, sigmas, guidance_scale, true_cfg_scale,
                          cache=cache, cache_interval=cache_interval, cache_start=cache_start)
        check_flow_strength(strength, num_inference_steps, sigmas)
        if image is None:
            raise ValueError(f"{type(self).__name__} needs image (PIL images or numpy arrays in [0, 1])")
        _check_packed_latents(self, latents, prompt, prompt_embeds, num_images_per_prompt, height, width,
                              self.denoiser_latent_channels)
        return self.generate(task, prompt, prompt_2, negative_prompt, negative_prompt_2, true_cfg_scale, height,
                             width, num_inference_steps, sigmas, guidance_scale, num_images_per_prompt, generator,
                             latents, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                             negative_pooled_prompt_embeds, output_type, return_dict, callback_on_step_end,
                             callback_on_step_end_tensor_inputs, max_sequence_length,
                             cache=cache, cache_interval=cache_interval, cache_start=cache_start)


class FluxInpaintPipeline(FluxFamilyPipeline):
    """Inpainting, as diffusers' FluxInpaintPipeline: the original kept outside the mask after every step, taken
    along the flow to the next sigma."""

    required_components = (TEXT_ENCODER, TEXT_ENCODER_2, TRANSFORMER, VAE_ENCODER, VAE_DECODER)
    optional_components = ()

    def __call__(self, prompt=None, prompt_2=None, negative_prompt=None, negative_prompt_2=None, true_cfg_scale=1.0,
                 image=None, mask_image=None, masked_image_latents=None, height=None, width=None,
                 padding_mask_crop=None, strength=0.6, num_inference_steps=28, sigmas=None, guidance_scale=7.0,
                 num_images_per_prompt=1, generator=None, latents=None, prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, output_type="pil",
                 return_dict=True, callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 max_sequence_length=512, cache=None, cache_interval=None, cache_start=None):
        task = FluxInpaint(image, mask_image, masked_image_latents, strength, padding_mask_crop)
        height, width = task.size(self, height, width)
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt, negative_prompt_2, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, output_type,
                          callback_on_step_end_tensor_inputs, num_images_per_prompt, max_sequence_length,
                          num_inference_steps, sigmas, guidance_scale, true_cfg_scale,
                          cache=cache, cache_interval=cache_interval, cache_start=cache_start)
        check_inpaint_inputs(image, mask_image, strength, output_type, padding_mask_crop, None)
        check_flow_strength(strength, num_inference_steps, sigmas)
        return self.generate(task, prompt, prompt_2, negative_prompt, negative_prompt_2, true_cfg_scale, height,
                             width, num_inference_steps, sigmas, guidance_scale, num_images_per_prompt, generator,
                             latents, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                             negative_pooled_prompt_embeds, output_type, return_dict, callback_on_step_end,
                             callback_on_step_end_tensor_inputs, max_sequence_length,
                             cache=cache, cache_interval=cache_interval, cache_start=cache_start)


class FluxFillPipeline(FluxFamilyPipeline):
    """Inpainting and outpainting with FLUX.1-Fill, as diffusers' FluxFillPipeline: a 384-channel transformer that
    sees the masked image's latents and the mask at every step (no negative prompt: Fill is guidance-distilled)."""

    # diffusers' FluxFillPipeline takes no IP-Adapter components.
    component_names = (SCHEDULER, VAE_ENCODER, VAE_DECODER, TEXT_ENCODER, TOKENIZER, TEXT_ENCODER_2, TOKENIZER_2,
                       TRANSFORMER)
    unused_components = ()
    required_components = (TEXT_ENCODER, TEXT_ENCODER_2, TRANSFORMER, VAE_ENCODER, VAE_DECODER)
    optional_components = ()
    unet_in_channels = (384,)

    @property
    def denoiser_latent_channels(self) -> int:
        return int(self.vae_config.get("latent_channels", 16))

    def __call__(self, prompt=None, prompt_2=None, image=None, mask_image=None, masked_image_latents=None,
                 height=None, width=None, strength=1.0, num_inference_steps=50, sigmas=None, guidance_scale=30.0,
                 num_images_per_prompt=1, generator=None, latents=None, prompt_embeds=None, pooled_prompt_embeds=None,
                 output_type="pil", return_dict=True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), max_sequence_length=512,
                 cache=None, cache_interval=None, cache_start=None):
        task = FluxFill(image, mask_image, masked_image_latents, strength)
        height, width = task.size(self, height, width)
        self.check_inputs(prompt, prompt_2, height, width, None, None, prompt_embeds, None, pooled_prompt_embeds,
                          None, output_type, callback_on_step_end_tensor_inputs, num_images_per_prompt,
                          max_sequence_length, num_inference_steps, sigmas, guidance_scale, 1.0,
                          cache=cache, cache_interval=cache_interval, cache_start=cache_start)
        check_flow_strength(strength, num_inference_steps, sigmas)
        if image is None:
            raise ValueError("FluxFillPipeline needs image, the picture to paint into")
        if mask_image is None and masked_image_latents is None:
            raise ValueError("FluxFillPipeline needs mask_image (white where to paint) or masked_image_latents")
        if mask_image is not None and masked_image_latents is not None:
            raise ValueError("pass either mask_image or masked_image_latents, not both")
        _check_packed_latents(self, latents, prompt, prompt_embeds, num_images_per_prompt, height, width,
                              self.denoiser_latent_channels)
        return self.generate(task, prompt, prompt_2, None, None, 1.0, height, width, num_inference_steps, sigmas,
                             guidance_scale, num_images_per_prompt, generator, latents, prompt_embeds,
                             pooled_prompt_embeds, None, None, output_type, return_dict, callback_on_step_end,
                             callback_on_step_end_tensor_inputs, max_sequence_length,
                             cache=cache, cache_interval=cache_interval, cache_start=cache_start)


FAMILY = Family(
    name="flux",
    class_names=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxFillPipeline"),
    components=ATOL,
    export_specs=f"{__name__}:export_specs",
    tasks={"text-to-image": {64: FluxPipeline}, "image-to-image": {64: FluxImg2ImgPipeline},
           "inpainting": {64: FluxInpaintPipeline, 384: FluxFillPipeline}},
    copied=(TOKENIZER, TOKENIZER_2, SCHEDULER),
)
