"""Stable Diffusion XL -- base, refiner, Turbo and LCM -- : what is exported, and the numpy pipelines.

Export: two CLIP text encoders (`text_encoder`, a CLIPTextModel; `text_encoder_2`, a CLIPTextModelWithProjection
whose `text_embeds` is the pooled embedding), each with every hidden state; the UNet with SDXL's added conditions
(sample, timestep, encoder_hidden_states, text_embeds, time_ids; + timestep_cond for LCM UNets); the VAE's encoder
and decoder. The refiner has text_encoder_2 only. Names and layout are Optimum's.

Run time: one denoising loop, `StableDiffusionXLFamilyPipeline.generate`, line for line with diffusers'
StableDiffusionXLPipeline; the tasks (diffship.pipelines.tasks) supply where the latents start and what rides
along them. SDXL's own steps are here: the prompt encoded by both encoders (penultimate hidden states
concatenated, the pooled embedding of the second), zeros for an empty negative prompt where the model says so,
the size/crop (or aesthetic score, for the refiner) time ids, `denoising_end` / `denoising_start` for the base ->
refiner hand-off.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from diffship.checks import IMAGE_SIZE_MULTIPLE, check_image_size, check_int, check_number
from diffship.errors import DiffshipError
from diffship.families.base import Family
from diffship.layout import (
    CONTROLNET,
    FEATURE_EXTRACTOR,
    IMAGE_ENCODER,
    SCHEDULER,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TOKENIZER,
    TOKENIZER_2,
    UNET,
    UNET_SHALLOW,
    VAE_DECODER,
    VAE_ENCODER,
    controlnet_folder,
    vae_scale_factor,
)
from diffship.pipelines.base import DiffusionPipeline
from diffship.pipelines.controlnet import ControlNetConditioning, image_size, prepare_control, prompt_batch
from diffship.pipelines.prompts import check_negative_prompt, hidden_state_outputs, run_text_encoder, warn_truncated
from diffship.pipelines.steps import (
    as_generator,
    check_generation_options,
    end_timesteps,
    extra_step_kwargs,
    guidance_scale_embedding,
    retrieve_timesteps,
    valid_fraction,
)
from diffship.pipelines.step_cache import step_cache
from diffship.pipelines.tasks import ImageToImage, Inpaint, Task, check_image_task, check_inpaint_inputs
from diffship.pipelines.timing import StageTimer, stage_of

logger = logging.getLogger(__name__)

# ---- what is exported ------------------------------------------------------------------------------------------

# fp32 max-abs bounds, as for Stable Diffusion 1.x/2.x (see there): the same kinds of graph, only larger.
ATOL = {TEXT_ENCODER: 1e-3, TEXT_ENCODER_2: 1e-3, UNET: 1e-3, VAE_ENCODER: 1e-3, VAE_DECODER: 2e-3,
        CONTROLNET: 1e-3}


def export_specs(pipe, shapes, deepcache_branch: int | None = None, controlnets=()) -> list:
    """The components an SDXL pipeline (base, refiner, inpainting; Turbo and LCM alike) is exported as; with
    `deepcache_branch`, the UNet also outputs its deep feature there and DeepCache's shallow UNet follows it; with
    `controlnets`, each is exported (controlnet, controlnet_1, ...; they take the UNet's added conditions too) and
    the UNet takes their residuals."""
    from diffship.exporters.components import (
        controlnet_spec,
        text_encoder_spec,
        unet_shallow_spec,
        unet_spec,
        vae_decoder_spec,
        vae_encoder_spec,
        with_controlnet_residuals,
    )

    scale = vae_scale_factor(pipe.vae.config.block_out_channels)
    unet = pipe.unet.config
    pooled_dim = pipe.text_encoder_2.config.projection_dim
    conditioning = {
        "encoder_hidden_states": (shapes.sequence_length, unet.cross_attention_dim),
        "text_embeds": (pooled_dim,),
        "time_ids": ((unet.projection_class_embeddings_input_dim - pooled_dim) // unet.addition_time_embed_dim,),
    }
    lcm = unet.time_cond_proj_dim is not None
    if lcm:
        conditioning["timestep_cond"] = (unet.time_cond_proj_dim,)
    specs = []
    if getattr(pipe, "text_encoder", None) is not None:
        specs.append(text_encoder_spec(TEXT_ENCODER, pipe.text_encoder, shapes, ATOL[TEXT_ENCODER]))
    unet = unet_spec(pipe.unet, shapes, scale, conditioning, guided=not lcm, atol=ATOL[UNET],
                     deepcache_branch=deepcache_branch)
    nets = [controlnet_spec(controlnet_folder(i), net, unet, scale, ATOL[CONTROLNET])
            for i, net in enumerate(controlnets)]
    if controlnets:
        unet = with_controlnet_residuals(pipe.unet, unet)
    specs += [
        text_encoder_spec(TEXT_ENCODER_2, pipe.text_encoder_2, shapes, ATOL[TEXT_ENCODER_2]),
        unet,
        *([unet_shallow_spec(pipe.unet, unet, deepcache_branch)] if deepcache_branch is not None else []),
        vae_encoder_spec(pipe.vae, shapes, scale, ATOL[VAE_ENCODER]),
        vae_decoder_spec(pipe.vae, shapes, scale, ATOL[VAE_DECODER]),
        *nets,
    ]
    return specs


# ---- run time --------------------------------------------------------------------------------------------------

CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds", "add_text_embeds", "add_time_ids",
                          "negative_pooled_prompt_embeds", "negative_add_time_ids")


@dataclass
class StableDiffusionXLPipelineOutput:
    images: list | np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


def _as_list(text, batch_size: int) -> list[str]:
    return [text] * batch_size if isinstance(text, str) else list(text)


class StableDiffusionXLFamilyPipeline(DiffusionPipeline):
    """The steps every SDXL task takes, and `generate`, its one denoising loop. Not a pipeline to call: the task
    pipelines below are."""

    component_names = (VAE_ENCODER, VAE_DECODER, TEXT_ENCODER, TEXT_ENCODER_2, TOKENIZER, TOKENIZER_2, UNET,
                       SCHEDULER, IMAGE_ENCODER, FEATURE_EXTRACTOR)
    unused_components = (IMAGE_ENCODER, FEATURE_EXTRACTOR)
    required_components = (TEXT_ENCODER_2, UNET, VAE_DECODER)
    optional_components = (TEXT_ENCODER, VAE_ENCODER, UNET_SHALLOW)
    required_tokenizers = (TOKENIZER_2,)
    callback_tensor_inputs = CALLBACK_TENSOR_INPUTS

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        return bool(self.configs.get("model_index", {}).get("force_zeros_for_empty_prompt", True))

    @property
    def requires_aesthetics_score(self) -> bool:
        return bool(self.configs.get("model_index", {}).get("requires_aesthetics_score", False))

    def encoders(self) -> list[tuple]:
        """(tokenizer, text encoder) pairs in order: both for the base, text_encoder_2's alone for the refiner."""
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return [(t, e) for t, e in pairs if t is not None and e is not None]

    # ---- checks ------------------------------------------------------------------------------------------------
    def check_inputs(self, prompt, prompt_2, height, width, negative_prompt, negative_prompt_2, prompt_embeds,
                     negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, output_type,
                     callback_on_step_end_tensor_inputs, num_images_per_prompt, *, num_inference_steps=50,
                     timesteps=None, sigmas=None, guidance_scale=5.0, eta=0.0, clip_skip=None, guidance_rescale=0.0,
                     denoising_start=None, denoising_end=None, cache=None, cache_interval=None, cache_start=None):
        """diffusers' checks, and the ranges of the values it leaves unchecked, before any graph runs."""
        check_image_size({"height": height, "width": width}, max(IMAGE_SIZE_MULTIPLE, self.vae_scale_factor))
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass either prompt or prompt_embeds")
        if prompt_embeds is not None and (prompt is not None or prompt_2 is not None):
            raise ValueError("pass either prompt (and prompt_2) or prompt_embeds, not both")
        for name, text in (("prompt", prompt), ("prompt_2", prompt_2)):
            if text is not None and not isinstance(text, (str, list)):
                raise ValueError(f"{name} must be a str or a list of str, got {type(text).__name__}")
            if isinstance(text, list) and (not text or not all(isinstance(p, str) for p in text)):
                raise ValueError(f"{name} must be a non-empty list of str")
        if negative_prompt_embeds is not None and (negative_prompt is not None or negative_prompt_2 is not None):
            raise ValueError("pass either negative_prompt (and negative_prompt_2) or negative_prompt_embeds, not both")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds too (text_encoder_2's text_embeds)")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("negative_prompt_embeds needs negative_pooled_prompt_embeds too")
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else len(prompt_embeds)
        if prompt_2 is not None and len(_as_list(prompt_2, batch_size)) != batch_size:
            raise ValueError(f"prompt_2 has {len(prompt_2)} entries but prompt has {batch_size}")
        check_negative_prompt(prompt, negative_prompt, batch_size)
        check_negative_prompt(prompt, negative_prompt_2, batch_size)
        if prompt_embeds is not None and negative_prompt_embeds is not None \
                and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"prompt_embeds {prompt_embeds.shape} and negative_prompt_embeds "
                             f"{negative_prompt_embeds.shape} must have the same shape")
        check_generation_options(self, output_type, callback_on_step_end_tensor_inputs, num_images_per_prompt,
                                 num_inference_steps, timesteps, sigmas, guidance_scale, eta, guidance_rescale,
                                 cache, cache_interval, cache_start)
        for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
            if value is not None:
                check_number(value, name, 0.0, 1.0)
        if valid_fraction(denoising_start) and valid_fraction(denoising_end) and denoising_start >= denoising_end:
            raise ValueError(f"denoising_start ({denoising_start}) must be below denoising_end ({denoising_end})")
        if prompt is not None:
            self.check_clip_skip(clip_skip)

    def check_clip_skip(self, clip_skip, name: str = "clip_skip") -> None:
        """SDXL: layers back from the penultimate hidden state of both encoders (no final layer norm)."""
        if clip_skip is None:
            return
        layers = min(len(hidden_state_outputs(encoder)) for _, encoder in self.encoders())
        if not layers:
            raise DiffshipError(f"{name} needs text encoders with hidden_states.N outputs; export the model with "
                                "`diffship export`")
        check_int(clip_skip, name, 0, layers - 2)

    # ---- SDXL's own steps --------------------------------------------------------------------------------------
    def encode_prompt(self, prompt, prompt_2, num_images_per_prompt, do_classifier_free_guidance,
                      negative_prompt=None, negative_prompt_2=None, prompt_embeds=None, negative_prompt_embeds=None,
                      pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, clip_skip=None):
        """(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds), each
        repeated num_images_per_prompt times per prompt. The penultimate hidden states (or clip_skip layers
        earlier) of the encoders are concatenated; the pooled embedding is text_encoder_2's text_embeds."""
        encoders = self.encoders()
        if prompt_embeds is None:
            prompts = _as_list(prompt, 1)
            batch_size = len(prompts)
            prompts_2 = _as_list(prompt_2, batch_size) if prompt_2 is not None else prompts
            # As diffusers: the first prompt goes to the first encoder there is (the refiner's is text_encoder_2).
            prompt_embeds, pooled_prompt_embeds = self._encode([prompts, prompts_2], encoders, clip_skip, None)
        else:
            prompt_embeds = np.asarray(prompt_embeds, np.float32)
            pooled_prompt_embeds = np.asarray(pooled_prompt_embeds, np.float32)
            batch_size = prompt_embeds.shape[0]

        zero_out_negative_prompt = negative_prompt is None and self.force_zeros_for_empty_prompt
        if do_classifier_free_guidance and negative_prompt_embeds is None and zero_out_negative_prompt:
            negative_prompt_embeds = np.zeros_like(prompt_embeds)
            negative_pooled_prompt_embeds = np.zeros_like(pooled_prompt_embeds)
        elif do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            negative_prompt_2 = negative_prompt_2 or negative_prompt
            texts = [_as_list(negative_prompt, batch_size), _as_list(negative_prompt_2, batch_size)]
            negative_prompt_embeds, negative_pooled_prompt_embeds = self._encode(
                texts, encoders, None, prompt_embeds.shape[1], name="negative_prompt")

        prompt_embeds = np.repeat(prompt_embeds, num_images_per_prompt, axis=0)
        pooled_prompt_embeds = np.repeat(pooled_prompt_embeds, num_images_per_prompt, axis=0)
        if do_classifier_free_guidance:
            negative_prompt_embeds = np.repeat(np.asarray(negative_prompt_embeds, np.float32),
                                               num_images_per_prompt, axis=0)
            negative_pooled_prompt_embeds = np.repeat(np.asarray(negative_pooled_prompt_embeds, np.float32),
                                                      num_images_per_prompt, axis=0)
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    def _encode(self, texts, encoders, clip_skip, max_length, name="prompt"):
        hidden, pooled = [], None
        for batch, (tokenizer, encoder) in zip(texts, encoders):
            length = max_length or tokenizer.model_max_length
            warn_truncated(tokenizer, batch, name, length)
            outputs = run_text_encoder(encoder, tokenizer(batch, max_length=length))
            if pooled is None and "text_embeds" in outputs:
                pooled = outputs["text_embeds"]
            layers = hidden_state_outputs(encoder)
            hidden.append(outputs[layers[-2 if clip_skip is None else -(clip_skip + 2)]])
        if pooled is None:
            raise DiffshipError("no text encoder of this export outputs text_embeds (text_encoder_2's pooled "
                                "embedding, which the SDXL UNet takes); export the model with `diffship export`")
        return np.concatenate(hidden, axis=-1).astype(np.float32), pooled.astype(np.float32)

    def time_ids(self, original_size, crops_coords_top_left, target_size, aesthetic_score, pooled_dim) -> list:
        """The numbers the UNet's time_ids embed: sizes and crop (base), or size, crop and aesthetic score
        (refiner: requires_aesthetics_score), checked against the width the UNet's added embedding takes."""
        if self.requires_aesthetics_score:
            ids = list(original_size) + list(crops_coords_top_left) + [aesthetic_score]
        else:
            ids = list(original_size) + list(crops_coords_top_left) + list(target_size)
        config = self.unet_config
        expected = config.get("projection_class_embeddings_input_dim")
        passed = config.get("addition_time_embed_dim", 0) * len(ids) + pooled_dim
        if expected is not None and passed != expected:
            hint = ("; the model's requires_aesthetics_score in model_index.json does not match its UNet"
                    if abs(passed - expected) == config.get("addition_time_embed_dim") else "")
            raise DiffshipError(f"the UNet's added embedding takes {expected} features but {len(ids)} time ids and "
                                f"a {pooled_dim}-wide pooled embedding make {passed}{hint}")
        return ids

    # ---- one generation ----------------------------------------------------------------------------------------
    def denoiser_inputs(self, tensors: dict) -> dict:
        """The UNet's conditioning at each step: the prompts' embeddings, and SDXL's added conditions (the pooled
        embedding and the time ids), each [negative, positive] with guidance."""
        return {"encoder_hidden_states": tensors["prompt_embeds"], "text_embeds": tensors["add_text_embeds"],
                "time_ids": tensors["add_time_ids"].astype(self._time_ids_dtype(), copy=False)}

    def generate(self, task: Task, prompt=None, prompt_2=None, height=None, width=None, num_inference_steps=50,
                 timesteps=None, sigmas=None, denoising_end=None, guidance_scale=5.0, negative_prompt=None,
                 negative_prompt_2=None, num_images_per_prompt=1, eta=0.0, generator=None, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True, guidance_rescale=0.0,
                 original_size=None, crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None, aesthetic_score=6.0,
                 negative_aesthetic_score=2.5, clip_skip=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), cache=None, cache_interval=None,
                 cache_start=None, control: ControlNetConditioning | None = None):
        """One generation, for every task; inputs are checked by the caller. `cache`: a step cache, as for Stable
        Diffusion (StableDiffusionFamilyPipeline.generate). `control`: the ControlNets' inputs, preprocessed by the
        caller (pipelines/controlnet.py)."""
        start = time.perf_counter()
        timer = StageTimer()
        height, width = task.size(self, height, width)
        generator = as_generator(generator)

        # 1. Batch size and guidance. LCM UNets take the guidance scale as an embedding (timestep_cond) and run no
        # unconditional batch; Turbo runs at guidance_scale 0, unguided.
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else prompt_embeds.shape[0]
        images = batch_size * num_images_per_prompt
        time_cond_proj_dim = self.unet_config.get("time_cond_proj_dim")
        do_classifier_free_guidance = guidance_scale > 1.0 and time_cond_proj_dim is None
        self.prepare_request(batch_size, height, width, num_images_per_prompt, do_classifier_free_guidance)

        # 2. Encode the prompt with both encoders.
        with timer.stage(stage_of(TEXT_ENCODER)):
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = \
                self.encode_prompt(prompt, prompt_2, num_images_per_prompt, do_classifier_free_guidance,
                                   negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                                   pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip)

        # 3. The task's inputs as arrays (image, mask).
        task.preprocess(self, height, width, images, do_classifier_free_guidance, timer)

        # 4. Timesteps: the task's part of the schedule, cut at denoising_end for a hand-off to the refiner.
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, timesteps, sigmas)
        timesteps, num_inference_steps = task.schedule(self, timesteps, num_inference_steps)
        if valid_fraction(denoising_end):
            timesteps, num_inference_steps = end_timesteps(self.scheduler, timesteps, denoising_end)

        # 5. Initial latents (and the task's conditioning tensors).
        latents = task.prepare_latents(self, images, height, width, generator, latents, timesteps,
                                       do_classifier_free_guidance, timer)
        step_kwargs = extra_step_kwargs(self.scheduler, generator, eta)

        # 6. The added conditions: pooled text embedding and time ids (sizes default to the latents' image size).
        height, width = (d * self.vae_scale_factor for d in latents.shape[-2:])
        original_size = tuple(original_size or (height, width))
        target_size = tuple(target_size or (height, width))
        pooled_dim = pooled_prompt_embeds.shape[-1]
        add_time_ids = self.time_ids(original_size, crops_coords_top_left, target_size, aesthetic_score, pooled_dim)
        if type(task) is Task:
            # Text-to-image (diffusers' StableDiffusionXLPipeline): negative sizes only when both are given; the
            # [negative, positive] pair is then repeated over the batch.
            if negative_original_size is not None and negative_target_size is not None:
                negative_add_time_ids = self.time_ids(negative_original_size, negative_crops_coords_top_left,
                                                      negative_target_size, negative_aesthetic_score, pooled_dim)
            else:
                negative_add_time_ids = add_time_ids
            pair = [negative_add_time_ids, add_time_ids] if do_classifier_free_guidance else [add_time_ids]
            add_time_ids = np.tile(np.asarray(pair, np.float32), (images, 1))
            negative_add_time_ids = np.tile(np.asarray([negative_add_time_ids], np.float32), (images, 1))
        else:
            # Image-to-image and inpainting (diffusers' img2img/inpaint): negatives default to the positives, and
            # (without aesthetics) share the positive crop; each half repeated over the batch.
            negative_add_time_ids = self.time_ids(
                tuple(negative_original_size or original_size),
                crops_coords_top_left if not self.requires_aesthetics_score else negative_crops_coords_top_left,
                tuple(negative_target_size or target_size), negative_aesthetic_score, pooled_dim)
            positive = np.tile(np.asarray([add_time_ids], np.float32), (images, 1))
            negative_add_time_ids = np.tile(np.asarray([negative_add_time_ids], np.float32), (images, 1))
            add_time_ids = (np.concatenate([negative_add_time_ids, positive]) if do_classifier_free_guidance
                            else positive)
        add_text_embeds = pooled_prompt_embeds
        if do_classifier_free_guidance:
            prompt_embeds = np.concatenate([negative_prompt_embeds, prompt_embeds])
            add_text_embeds = np.concatenate([negative_pooled_prompt_embeds, add_text_embeds])
        conditioning = {}
        if time_cond_proj_dim is not None:
            w = np.full((images,), guidance_scale - 1, dtype=np.float32)
            conditioning["timestep_cond"] = guidance_scale_embedding(w, time_cond_proj_dim)

        if control is not None:  # the control images over the batch, each net's scale at each step
            control.start(images, num_images_per_prompt, do_classifier_free_guidance, timesteps)
        self.control = control

        # 7. Denoising loop (DiffusionPipeline.denoise), the UNet fed by denoiser_inputs (and the ControlNets'
        # residuals, which take the same conditioning), or, at the steps a step cache takes, what it runs in its place.
        self.step_cache = step_cache(cache, cache_interval, cache_start)
        tensors = {"latents": latents, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds,
                   "add_text_embeds": add_text_embeds, "add_time_ids": add_time_ids,
                   "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
                   "negative_add_time_ids": negative_add_time_ids}
        latents = self.denoise(task, timesteps, tensors, conditioning, do_classifier_free_guidance, guidance_scale,
                               guidance_rescale, step_kwargs, timer, callback_on_step_end,
                               callback_on_step_end_tensor_inputs)

        # 8. Decode.
        images = task.finish(self, self.decode_images(latents, output_type, timer))

        timings = timer.summary(time.perf_counter() - start, load=self.load_seconds)
        if not return_dict:
            return (images,)
        return StableDiffusionXLPipelineOutput(images=images, timings=timings)

    def _time_ids_dtype(self):
        info = next((i for i in self.unet.inputs if i.name == "time_ids"), None)
        return info.dtype if info is not None else np.dtype(np.float32)


class StableDiffusionXLPipeline(StableDiffusionXLFamilyPipeline):
    """Text-to-image, as diffusers' StableDiffusionXLPipeline (SDXL-Turbo: guidance_scale 0, 1 to 4 steps; an LCM
    UNet takes the guidance as an embedding)."""

    required_tokenizers = (TOKENIZER, TOKENIZER_2)
    required_components = (TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER)
    optional_components = (VAE_ENCODER, UNET_SHALLOW)

    def __call__(self, prompt=None, prompt_2=None, height=None, width=None, num_inference_steps=50, timesteps=None,
                 sigmas=None, denoising_end=None, guidance_scale=5.0, negative_prompt=None, negative_prompt_2=None,
                 num_images_per_prompt=1, eta=0.0, generator=None, latents=None, prompt_embeds=None,
                 negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 output_type="pil", return_dict=True, guidance_rescale=0.0, original_size=None,
                 crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None, clip_skip=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",), cache=None,
                 cache_interval=None, cache_start=None):
        task = Task()
        height, width = task.size(self, height, width)
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt, negative_prompt_2, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, output_type,
                          callback_on_step_end_tensor_inputs, num_images_per_prompt,
                          num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                          guidance_scale=guidance_scale, eta=eta, clip_skip=clip_skip,
                          guidance_rescale=guidance_rescale, denoising_end=denoising_end, 
                          cache=cache, cache_interval=cache_interval, cache_start=cache_start)
        return self.generate(task, prompt, prompt_2, height, width, num_inference_steps, timesteps, sigmas,
                             denoising_end, guidance_scale, negative_prompt, negative_prompt_2, num_images_per_prompt,
                             eta, generator, latents, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                             negative_pooled_prompt_embeds, output_type, return_dict, guidance_rescale,
                             original_size, crops_coords_top_left, target_size, negative_original_size,
                             negative_crops_coords_top_left, negative_target_size, clip_skip=clip_skip,
                             callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                             cache=cache, cache_interval=cache_interval, cache_start=cache_start)


class StableDiffusionXLImg2ImgPipeline(StableDiffusionXLFamilyPipeline):
    """Image-to-image, as diffusers' StableDiffusionXLImg2ImgPipeline; with the refiner (requires_aesthetics_score)
    and `denoising_start`, it takes over the base's latents where its `denoising_end` stopped."""

    required_components = (TEXT_ENCODER_2, UNET, VAE_ENCODER, VAE_DECODER)
    optional_components = (TEXT_ENCODER, UNET_SHALLOW)

    def __call__(self, prompt=None, prompt_2=None, image=None, strength=0.3, num_inference_steps=50, timesteps=None,
                 sigmas=None, denoising_start=None, denoising_end=None, guidance_scale=5.0, negative_prompt=None,
                 negative_prompt_2=None, num_images_per_prompt=1, eta=0.0, generator=None, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True, guidance_rescale=0.0,
                 original_size=None, crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None, aesthetic_score=6.0,
                 negative_aesthetic_score=2.5, clip_skip=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), cache=None, cache_interval=None,
                 cache_start=None):
        self.check_inputs(prompt, prompt_2, None, None, negative_prompt, negative_prompt_2, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, output_type,
                          callback_on_step_end_tensor_inputs, num_images_per_prompt,
                          num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                          guidance_scale=guidance_scale, eta=eta, clip_skip=clip_skip,
                          guidance_rescale=guidance_rescale, denoising_start=denoising_start,
                          denoising_end=denoising_end,
                          cache=cache, cache_interval=cache_interval, cache_start=cache_start)
        start_at = denoising_start if valid_fraction(denoising_start) else None
        if start_at is None:
            check_image_task(self, image, strength, num_inference_steps, timesteps, sigmas)
        elif image is None:
            raise ValueError(f"{type(self).__name__} needs image (or the base's latents, with denoising_start)")
        task = ImageToImage(image, strength, start_at, accepts_latents=True)
        return self.generate(task, prompt, prompt_2, None, None, num_inference_steps, timesteps, sigmas,
                             denoising_end, guidance_scale, negative_prompt, negative_prompt_2, num_images_per_prompt,
                             eta, generator, None, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                             negative_pooled_prompt_embeds, output_type, return_dict, guidance_rescale,
                             original_size, crops_coords_top_left, target_size, negative_original_size,
                             negative_crops_coords_top_left, negative_target_size, aesthetic_score,
                             negative_aesthetic_score, clip_skip, callback_on_step_end,
                             callback_on_step_end_tensor_inputs,
                             cache=cache, cache_interval=cache_interval, cache_start=cache_start)


class StableDiffusionXLInpaintPipeline(StableDiffusionXLFamilyPipeline):
    """Inpainting, as diffusers' StableDiffusionXLInpaintPipeline, with a regular 4-channel SDXL UNet or a
    9-channel inpainting one."""

    required_components = (TEXT_ENCODER_2, UNET, VAE_ENCODER, VAE_DECODER)
    optional_components = (TEXT_ENCODER, UNET_SHALLOW)
    unet_in_channels = (4, 9)
    callback_tensor_inputs = (*CALLBACK_TENSOR_INPUTS, "mask", "masked_image_latents")

    def __call__(self, prompt=None, prompt_2=None, image=None, mask_image=None, masked_image_latents=None,
                 height=None, width=None, padding_mask_crop=None, strength=0.9999, num_inference_steps=50,
                 timesteps=None, sigmas=None, denoising_start=None, denoising_end=None, guidance_scale=7.5,
                 negative_prompt=None, negative_prompt_2=None, num_images_per_prompt=1, eta=0.0, generator=None,
                 latents=None, prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True, guidance_rescale=0.0,
                 original_size=None, crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None, aesthetic_score=6.0,
                 negative_aesthetic_score=2.5, clip_skip=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), cache=None, cache_interval=None,
                 cache_start=None):
        start_at = denoising_start if valid_fraction(denoising_start) else None
        task = Inpaint(image, mask_image, masked_image_latents, strength, padding_mask_crop, start_at)
        height, width = task.size(self, height, width)
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt, negative_prompt_2, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, output_type,
                          callback_on_step_end_tensor_inputs, num_images_per_prompt,
                          num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                          guidance_scale=guidance_scale, eta=eta, clip_skip=clip_skip,
                          guidance_rescale=guidance_rescale, denoising_start=denoising_start,
                          denoising_end=denoising_end,
                          cache=cache, cache_interval=cache_interval, cache_start=cache_start)
        check_inpaint_inputs(image, mask_image, strength, output_type, padding_mask_crop,
                             None if start_at is not None else num_inference_steps, timesteps, sigmas)
        return self.generate(task, prompt, prompt_2, height, width, num_inference_steps, timesteps, sigmas,
                             denoising_end, guidance_scale, negative_prompt, negative_prompt_2, num_images_per_prompt,
                             eta, generator, latents, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                             negative_pooled_prompt_embeds, output_type, return_dict, guidance_rescale,
                             original_size, crops_coords_top_left, target_size, negative_original_size,
                             negative_crops_coords_top_left, negative_target_size, aesthetic_score,
                             negative_aesthetic_score, clip_skip, callback_on_step_end,
                             callback_on_step_end_tensor_inputs,
                             cache=cache, cache_interval=cache_interval, cache_start=cache_start)


# ---- ControlNet ------------------------------------------------------------------------------------------------

CONTROLNET_COMPONENTS = (VAE_ENCODER, VAE_DECODER, TEXT_ENCODER, TEXT_ENCODER_2, TOKENIZER, TOKENIZER_2, UNET,
                         CONTROLNET, SCHEDULER, IMAGE_ENCODER, FEATURE_EXTRACTOR)


class StableDiffusionXLControlNetPipeline(StableDiffusionXLFamilyPipeline):
    """Text-to-image guided by ControlNets, as diffusers' StableDiffusionXLControlNetPipeline: `image` is the
    control image (a list, one per ControlNet, for several); the size is its own unless height and width are
    given. The ControlNets take SDXL's added conditions as the UNet does."""

    component_names = CONTROLNET_COMPONENTS
    required_tokenizers = (TOKENIZER, TOKENIZER_2)
    required_components = (TEXT_ENCODER, TEXT_ENCODER_2, UNET, CONTROLNET, VAE_DECODER)
    optional_components = (VAE_ENCODER,)

    def __call__(self, prompt=None, prompt_2=None, image=None, height=None, width=None, num_inference_steps=50,
                 timesteps=None, sigmas=None, denoising_end=None, guidance_scale=5.0, negative_prompt=None,
                 negative_prompt_2=None, num_images_per_prompt=1, eta=0.0, generator=None, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True,
                 controlnet_conditioning_scale=1.0, guess_mode=False, control_guidance_start=0.0,
                 control_guidance_end=1.0, original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                 negative_original_size=None, negative_crops_coords_top_left=(0, 0), negative_target_size=None,
                 clip_skip=None, callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        control = ControlNetConditioning(self, image, controlnet_conditioning_scale, control_guidance_start,
                                         control_guidance_end, guess_mode, name="image")
        check_image_size({"height": height, "width": width}, max(IMAGE_SIZE_MULTIPLE, self.vae_scale_factor))
        height, width = prepare_control(self, control, None, height, width, prompt_batch(prompt, prompt_embeds))
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt, negative_prompt_2, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, output_type,
                          callback_on_step_end_tensor_inputs, num_images_per_prompt,
                          num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                          guidance_scale=guidance_scale, eta=eta, clip_skip=clip_skip, denoising_end=denoising_end)
        return self.generate(Task(), prompt, prompt_2, height, width, num_inference_steps, timesteps, sigmas,
                             denoising_end, guidance_scale, negative_prompt, negative_prompt_2, num_images_per_prompt,
                             eta, generator, latents, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                             negative_pooled_prompt_embeds, output_type, return_dict, 0.0, original_size,
                             crops_coords_top_left, target_size, negative_original_size,
                             negative_crops_coords_top_left, negative_target_size, clip_skip=clip_skip,
                             callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, control=control)


class StableDiffusionXLControlNetImg2ImgPipeline(StableDiffusionXLFamilyPipeline):
    """Image-to-image guided by ControlNets, as diffusers' StableDiffusionXLControlNetImg2ImgPipeline: `image` is
    edited, `control_image` guides; both come out at height x width (their own size, which must then be one)."""

    component_names = CONTROLNET_COMPONENTS
    required_components = (TEXT_ENCODER_2, UNET, CONTROLNET, VAE_ENCODER, VAE_DECODER)
    optional_components = (TEXT_ENCODER,)

    def __call__(self, prompt=None, prompt_2=None, image=None, control_image=None, height=None, width=None,
                 strength=0.8, num_inference_steps=50, guidance_scale=5.0, negative_prompt=None,
                 negative_prompt_2=None, num_images_per_prompt=1, eta=0.0, generator=None, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True,
                 controlnet_conditioning_scale=0.8, guess_mode=False, control_guidance_start=0.0,
                 control_guidance_end=1.0, original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                 negative_original_size=None, negative_crops_coords_top_left=(0, 0), negative_target_size=None,
                 aesthetic_score=6.0, negative_aesthetic_score=2.5, clip_skip=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        control = ControlNetConditioning(self, control_image, controlnet_conditioning_scale, control_guidance_start,
                                         control_guidance_end, guess_mode, name="control_image")
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt, negative_prompt_2, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, output_type,
                          callback_on_step_end_tensor_inputs, num_images_per_prompt,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                          clip_skip=clip_skip)
        check_image_task(self, image, strength, num_inference_steps)
        prepare_control(self, control, image, height, width, prompt_batch(prompt, prompt_embeds))
        task = ImageToImage(image, strength, height=height, width=width)
        return self.generate(task, prompt, prompt_2, None, None, num_inference_steps, None, None, None,
                             guidance_scale, negative_prompt, negative_prompt_2, num_images_per_prompt, eta,
                             generator, None, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                             negative_pooled_prompt_embeds, output_type, return_dict, 0.0, original_size,
                             crops_coords_top_left, target_size, negative_original_size,
                             negative_crops_coords_top_left, negative_target_size, aesthetic_score,
                             negative_aesthetic_score, clip_skip, callback_on_step_end,
                             callback_on_step_end_tensor_inputs, control=control)


class StableDiffusionXLControlNetInpaintPipeline(StableDiffusionXLFamilyPipeline):
    """Inpainting guided by ControlNets, as diffusers' StableDiffusionXLControlNetInpaintPipeline, with a regular
    4-channel SDXL UNet or a 9-channel inpainting one. The size is the image's unless height and width are given."""

    component_names = CONTROLNET_COMPONENTS
    required_components = (TEXT_ENCODER_2, UNET, CONTROLNET, VAE_ENCODER, VAE_DECODER)
    optional_components = (TEXT_ENCODER,)
    unet_in_channels = (4, 9)
    callback_tensor_inputs = (*CALLBACK_TENSOR_INPUTS, "mask", "masked_image_latents")

    def __call__(self, prompt=None, prompt_2=None, image=None, mask_image=None, control_image=None, height=None,
                 width=None, padding_mask_crop=None, strength=0.9999, num_inference_steps=50, denoising_start=None,
                 denoising_end=None, guidance_scale=5.0, negative_prompt=None, negative_prompt_2=None,
                 num_images_per_prompt=1, eta=0.0, generator=None, latents=None, prompt_embeds=None,
                 negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 output_type="pil", return_dict=True, controlnet_conditioning_scale=1.0, guess_mode=False,
                 control_guidance_start=0.0, control_guidance_end=1.0, guidance_rescale=0.0, original_size=None,
                 crops_coords_top_left=(0, 0), target_size=None, aesthetic_score=6.0, negative_aesthetic_score=2.5,
                 clip_skip=None, callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        control = ControlNetConditioning(self, control_image, controlnet_conditioning_scale, control_guidance_start,
                                         control_guidance_end, guess_mode, name="control_image")
        start_at = denoising_start if valid_fraction(denoising_start) else None
        check_inpaint_inputs(image, mask_image, strength, output_type, padding_mask_crop,
                             None if start_at is not None else num_inference_steps)
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt, negative_prompt_2, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, output_type,
                          callback_on_step_end_tensor_inputs, num_images_per_prompt,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                          clip_skip=clip_skip, guidance_rescale=guidance_rescale, denoising_start=denoising_start,
                          denoising_end=denoising_end)
        crops_coords, resize_mode = None, "default"
        if padding_mask_crop is not None:
            height, width = image_size(self, image, height, width, "image")
            crops_coords = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        height, width = prepare_control(self, control, image, height, width, prompt_batch(prompt, prompt_embeds),
                                        crops_coords, resize_mode)
        task = Inpaint(image, mask_image, None, strength, padding_mask_crop, start_at)
        return self.generate(task, prompt, prompt_2, height, width, num_inference_steps, None, None, denoising_end,
                             guidance_scale, negative_prompt, negative_prompt_2, num_images_per_prompt, eta,
                             generator, latents, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                             negative_pooled_prompt_embeds, output_type, return_dict, guidance_rescale,
                             original_size, crops_coords_top_left, target_size, None, (0, 0), None, aesthetic_score,
                             negative_aesthetic_score, clip_skip, callback_on_step_end,
                             callback_on_step_end_tensor_inputs, control=control)


FAMILY = Family(
    name="stable-diffusion-xl",
    class_names=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
                 "StableDiffusionXLControlNetPipeline", "StableDiffusionXLControlNetImg2ImgPipeline",
                 "StableDiffusionXLControlNetInpaintPipeline"),
    components=ATOL,
    export_specs=f"{__name__}:export_specs",
    tasks={
        "text-to-image": {4: StableDiffusionXLPipeline},
        "image-to-image": {4: StableDiffusionXLImg2ImgPipeline},
        "inpainting": {4: StableDiffusionXLInpaintPipeline, 9: StableDiffusionXLInpaintPipeline},
    },
    copied=(TOKENIZER, TOKENIZER_2, SCHEDULER),
    step_caches=("deepcache",),
    controlnet_tasks={"text-to-image": StableDiffusionXLControlNetPipeline,
                      "image-to-image": StableDiffusionXLControlNetImg2ImgPipeline,
                      "inpainting": StableDiffusionXLControlNetInpaintPipeline},
)
