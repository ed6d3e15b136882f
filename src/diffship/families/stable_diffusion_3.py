"""Stable Diffusion 3 / 3.5 (MMDiT): what is exported, and the numpy pipelines.

Export: two CLIP text encoders with projections (`text_encoder`, `text_encoder_2`: pooled `text_embeds` first, then
every hidden state; SD3 reads the penultimate one), the T5 encoder (`text_encoder_3`: input_ids ->
last_hidden_state), the transformer (`transformer`: hidden_states, encoder_hidden_states, pooled_projections,
timestep -> out_hidden_states) and the 16-channel VAE's encoder and decoder. Names and folders are Optimum's
(`transformer/`, `text_encoder_3/`, `tokenizer_3/`).

Run time: `StableDiffusion3FamilyPipeline.generate`, line for line with diffusers' StableDiffusion3Pipeline, on the
shared denoising loop (DiffusionPipeline.denoise): the transformer is the denoiser, fed the joint text tokens and the
pooled embedding at every step; the scheduler is a flow-matching one (denoiser_kind FLOW), which neither scales the
latents nor the model input. SD3's own steps are here: the prompt encoded by three encoders (the CLIP pair's
penultimate hidden states side by side, zero-padded to T5's width, then T5's tokens after them; the two pooled
embeddings side by side), T5 tokenized with the `tokenizers` library, and the dynamic shift `mu` computed from the
image's patch count when the scheduler asks for it. The tasks are the shared ones for text-to-image (Task) and the
flow-matching ones for image-to-image and inpainting (FlowImageToImage, FlowInpaint: `scale_noise` where the UNet
families add noise).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from diffship.checks import check_image_size, check_int, check_number
from diffship.errors import DiffshipError
from diffship.families.base import Family
from diffship.layout import (
    FEATURE_EXTRACTOR,
    IMAGE_ENCODER,
    SCHEDULER,
    SKIP_LAYERS,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TEXT_ENCODER_3,
    TOKENIZER,
    TOKENIZER_2,
    TOKENIZER_3,
    TRANSFORMER,
    VAE_DECODER,
    VAE_ENCODER,
    vae_scale_factor,
)
from diffship.pipelines.base import DiffusionPipeline
from diffship.pipelines.prompts import (
    as_list,
    check_prompts,
    hidden_state_outputs,
    run_text_encoder,
    warn_truncated,
)
from diffship.pipelines.step_cache import step_cache
from diffship.pipelines.steps import as_generator, check_generation_options, retrieve_timesteps
from diffship.pipelines.tasks import FlowImageToImage, FlowInpaint, Task, check_flow_strength, check_inpaint_inputs
from diffship.pipelines.timing import STEP_STAGE, StageTimer, stage_of
from diffship.pipelines.tokenizer import T5Tokenizer
from diffship.runtimes.base import input_info
from diffship.schedulers import FLOW
from diffship.schedulers.schedules import calculate_shift_for

logger = logging.getLogger(__name__)

# ---- what is exported ------------------------------------------------------------------------------------------

# fp32 max-abs bounds: as for the UNet families' graphs of the same kinds (CLIP, VAE); the transformer and T5 are
# matmuls, layer norms and softmaxes whose float32 reordering stays far below 1e-3 at these depths.
ATOL = {TEXT_ENCODER: 1e-3, TEXT_ENCODER_2: 1e-3, TEXT_ENCODER_3: 1e-3, TRANSFORMER: 1e-3, VAE_ENCODER: 1e-3,
        VAE_DECODER: 2e-3}
# T5's sequence lengths a graph is traced and checked at: diffusers' default max_sequence_length, and CLIP's 77.
T5_SEQUENCE_LENGTHS = (256, 77)


def export_specs(pipe, shapes, skip_layer_guidance: bool = False) -> list:
    """The components an SD3 pipeline is exported as (text_encoder_3 only where the model has one);
    `skip_layer_guidance`: the transformer also takes SKIP_LAYERS (StableDiffusion3Pipeline's skip_guidance_layers)."""
    from diffship.exporters.components import (
        sd3_transformer_spec,
        t5_encoder_spec,
        text_encoder_spec,
        vae_decoder_spec,
        vae_encoder_spec,
    )

    scale = vae_scale_factor(pipe.vae.config.block_out_channels)
    clip_length = shapes.sequence_length
    text_lengths = tuple(clip_length + t5 for t5 in T5_SEQUENCE_LENGTHS)
    specs = [
        text_encoder_spec(TEXT_ENCODER, pipe.text_encoder, shapes, ATOL[TEXT_ENCODER]),
        text_encoder_spec(TEXT_ENCODER_2, pipe.text_encoder_2, shapes, ATOL[TEXT_ENCODER_2]),
    ]
    if getattr(pipe, "text_encoder_3", None) is not None:
        specs.append(t5_encoder_spec(TEXT_ENCODER_3, pipe.text_encoder_3, shapes, T5_SEQUENCE_LENGTHS,
                                     ATOL[TEXT_ENCODER_3]))
    specs += [
        sd3_transformer_spec(pipe.transformer, shapes, scale, text_lengths, ATOL[TRANSFORMER],
                             skip_layers=skip_layer_guidance),
        vae_encoder_spec(pipe.vae, shapes, scale, ATOL[VAE_ENCODER]),
        vae_decoder_spec(pipe.vae, shapes, scale, ATOL[VAE_DECODER]),
    ]
    return specs


# ---- run time --------------------------------------------------------------------------------------------------

CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "pooled_prompt_embeds")


@dataclass
class StableDiffusion3PipelineOutput:
    images: list | np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SkipLayerGuidance:
    """diffusers' skip-layer guidance (SD3.5): at the steps i with steps * start < i < steps * stop, the
    conditional batch runs again with `layers` skipped, and (conditional - skipped) * scale is added to the guided
    noise. `mask` is the transformer's SKIP_LAYERS input for that run."""

    mask: np.ndarray
    scale: float
    start: float
    stop: float
    steps: int

    def active(self, i: int) -> bool:
        return self.steps * self.start < i < self.steps * self.stop


class StableDiffusion3FamilyPipeline(DiffusionPipeline):
    """The steps every SD3 task takes, and `generate`, its one generation. Not a pipeline to call: the task
    pipelines below are."""

    # diffusers' StableDiffusion3Pipeline components, the VAE as its two graphs.
    component_names = (TRANSFORMER, SCHEDULER, VAE_ENCODER, VAE_DECODER, TEXT_ENCODER, TOKENIZER, TEXT_ENCODER_2,
                       TOKENIZER_2, TEXT_ENCODER_3, TOKENIZER_3, IMAGE_ENCODER, FEATURE_EXTRACTOR)
    unused_components = (IMAGE_ENCODER, FEATURE_EXTRACTOR)
    required_components = (TEXT_ENCODER, TEXT_ENCODER_2, TRANSFORMER, VAE_DECODER)
    # Without text_encoder_3 (SD3 can drop T5) its tokens are zeros, as in diffusers.
    optional_components = (TEXT_ENCODER_3, VAE_ENCODER)
    required_tokenizers = (TOKENIZER, TOKENIZER_2)
    tokenizer_classes = {TOKENIZER_3: T5Tokenizer}
    callback_tensor_inputs = CALLBACK_TENSOR_INPUTS
    denoiser = TRANSFORMER
    denoiser_sample = "hidden_states"
    denoiser_output = "out_hidden_states"
    denoiser_kind = FLOW
    scales_model_input = False
    unet_in_channels = (16,)  # the transformer's latent channels

    @property
    def patch_size(self) -> int:
        return int(self.denoiser_config.get("patch_size", 2))

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.patch_size  # a latent of whole patches

    # T5's token count of the current request (generate sets it), for request_shapes; diffusers' default.
    max_sequence_length = 256

    def request_shapes(self, batch_size: int = 1, height: int | None = None, width: int | None = None,
                       num_images_per_prompt: int = 1, guidance: bool = True) -> dict[str, dict[str, tuple]]:
        """{component: {input: shape}} for the dynamic inputs of every graph at a request (see
        DiffusionPipeline.request_shapes): the CLIP encoders take the prompts at 77 tokens, T5 at
        max_sequence_length, the transformer twice the images with guidance and the joint text of both."""
        height = self.default_height if height is None else height
        width = self.default_width if width is None else width
        check_image_size({"height": height, "width": width}, self.size_multiple)
        check_int(batch_size, "batch_size", 1)
        check_int(num_images_per_prompt, "num_images_per_prompt", 1)
        images = batch_size * num_images_per_prompt
        denoised = images * (2 if guidance else 1)
        latent = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        clip = self.tokenizer.model_max_length
        config = self.denoiser_config
        wanted = {
            TEXT_ENCODER: {"input_ids": (batch_size, clip)},
            TEXT_ENCODER_2: {"input_ids": (batch_size, clip)},
            TEXT_ENCODER_3: {"input_ids": (batch_size, self.max_sequence_length)},
            TRANSFORMER: {"hidden_states": (denoised, config.get("in_channels", 16), *latent),
                          "encoder_hidden_states": (denoised, clip + self.max_sequence_length,
                                                    config.get("joint_attention_dim", 4096)),
                          "pooled_projections": (denoised, config.get("pooled_projection_dim", 2048)),
                          "timestep": (denoised,)},
            **self.vae_request_shapes(images, height, width),
        }
        return self.dynamic_inputs_only(wanted)

    # ---- checks ------------------------------------------------------------------------------------------------
    def check_inputs(self, prompt, prompt_2, prompt_3, height, width, negative_prompt, negative_prompt_2,
                     negative_prompt_3, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                     negative_pooled_prompt_embeds, output_type, callback_on_step_end_tensor_inputs,
                     num_images_per_prompt, max_sequence_length, num_inference_steps, sigmas, guidance_scale,
                     clip_skip, *, cache=None, cache_interval=None, cache_start=None) -> None:
        """diffusers' checks, and the ranges of the values it leaves unchecked, before any graph runs."""
        if height is not None or width is not None:
            check_image_size({"height": height, "width": width}, self.size_multiple)
        check_prompts({"prompt": prompt, "prompt_2": prompt_2, "prompt_3": prompt_3},
                      {"negative_prompt": negative_prompt, "negative_prompt_2": negative_prompt_2,
                       "negative_prompt_3": negative_prompt_3}, prompt_embeds, negative_prompt_embeds,
                      pooled_prompt_embeds, negative_pooled_prompt_embeds, "both CLIP encoders' pooled outputs")
        check_int(max_sequence_length, "max_sequence_length", 1, 512)
        check_generation_options(self, output_type, callback_on_step_end_tensor_inputs, num_images_per_prompt,
                                 num_inference_steps, None, sigmas, guidance_scale, 0.0, 0.0, cache, cache_interval,
                                 cache_start)
        self.check_clip_skip(clip_skip)

    def check_clip_skip(self, clip_skip, name: str = "clip_skip") -> None:
        """SD3: layers back from the CLIP pair's penultimate hidden states (no final layer norm)."""
        if clip_skip is not None:
            layers = min(len(hidden_state_outputs(e)) for e in (self.text_encoder, self.text_encoder_2))
            check_int(clip_skip, name, 0, layers - 2)

    # ---- SD3's own steps ---------------------------------------------------------------------------------------
    def clip_prompt_embeds(self, tokenizer, text_encoder, prompts: list[str], num_images_per_prompt: int,
                           clip_skip: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(hidden states, pooled) of one CLIP encoder: the penultimate layer (clip_skip layers earlier still) and
        the projected pooled embedding, each repeated num_images_per_prompt times per prompt."""
        warn_truncated(tokenizer, prompts, "prompt", tokenizer.model_max_length)
        outputs = run_text_encoder(text_encoder, tokenizer(prompts))
        hidden = hidden_state_outputs(text_encoder)
        embeds = outputs[hidden[-((clip_skip or 0) + 2)]]
        return (np.repeat(embeds, num_images_per_prompt, axis=0),
                np.repeat(outputs["text_embeds"], num_images_per_prompt, axis=0))

    def t5_prompt_embeds(self, prompts: list[str], num_images_per_prompt: int, max_sequence_length: int):
        """T5's last hidden state, or zeros (at the transformer's joint_attention_dim) without text_encoder_3."""
        if self.text_encoder_3 is None or self.tokenizer_3 is None:
            width = int(self.denoiser_config.get("joint_attention_dim", 4096))
            return np.zeros((len(prompts) * num_images_per_prompt, max_sequence_length, width), np.float32)
        warn_truncated(self.tokenizer_3, prompts, "prompt_3", max_sequence_length)
        embeds = run_text_encoder(self.text_encoder_3, self.tokenizer_3(prompts, max_sequence_length))
        return np.repeat(embeds["last_hidden_state"], num_images_per_prompt, axis=0)

    def joint_prompt_embeds(self, prompts, prompts_2, prompts_3, num_images_per_prompt, clip_skip,
                            max_sequence_length) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_embeds, pooled_prompt_embeds), as diffusers' encode_prompt makes them."""
        embeds, pooled = self.clip_prompt_embeds(self.tokenizer, self.text_encoder, prompts, num_images_per_prompt,
                                                 clip_skip)
        embeds_2, pooled_2 = self.clip_prompt_embeds(self.tokenizer_2, self.text_encoder_2, prompts_2,
                                                     num_images_per_prompt, clip_skip)
        clip_embeds = np.concatenate([embeds, embeds_2], axis=-1)
        t5_embeds = self.t5_prompt_embeds(prompts_3, num_images_per_prompt, max_sequence_length)
        # torch.nn.functional.pad to T5's width: zeros on the right (a negative width would crop, as there).
        extra = t5_embeds.shape[-1] - clip_embeds.shape[-1]
        clip_embeds = (np.pad(clip_embeds, ((0, 0), (0, 0), (0, extra))) if extra >= 0
                       else clip_embeds[..., :t5_embeds.shape[-1]])
        return (np.concatenate([clip_embeds, t5_embeds], axis=-2).astype(np.float32, copy=False),
                np.concatenate([pooled, pooled_2], axis=-1).astype(np.float32, copy=False))

    def encode_prompt(self, prompt, prompt_2, prompt_3, num_images_per_prompt=1, do_classifier_free_guidance=True,
                      negative_prompt=None, negative_prompt_2=None, negative_prompt_3=None, prompt_embeds=None,
                      negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                      clip_skip=None, max_sequence_length=256):
        """(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds), as
        diffusers' StableDiffusion3Pipeline.encode_prompt returns them (numpy)."""
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            batch_size = len(prompts)
        else:
            batch_size = np.shape(prompt_embeds)[0]
        if prompt_embeds is None:
            prompts_2 = as_list(prompt_2 or prompt, batch_size)
            prompts_3 = as_list(prompt_3 or prompt, batch_size)
            prompt_embeds, pooled_prompt_embeds = self.joint_prompt_embeds(
                prompts, prompts_2, prompts_3, num_images_per_prompt, clip_skip, max_sequence_length)
        else:
            prompt_embeds = np.asarray(prompt_embeds, np.float32)
            pooled_prompt_embeds = np.asarray(pooled_prompt_embeds, np.float32)

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            negative_prompt_2 = negative_prompt_2 or negative_prompt
            negative_prompt_3 = negative_prompt_3 or negative_prompt
            negative_prompt_embeds, negative_pooled_prompt_embeds = self.joint_prompt_embeds(
                as_list(negative_prompt, batch_size), as_list(negative_prompt_2, batch_size),
                as_list(negative_prompt_3, batch_size), num_images_per_prompt, None, max_sequence_length)
        elif negative_prompt_embeds is not None:
            negative_prompt_embeds = np.asarray(negative_prompt_embeds, np.float32)
            negative_pooled_prompt_embeds = np.asarray(negative_pooled_prompt_embeds, np.float32)
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    # The current generation's skip-layer guidance (set by generate; None: none).
    skip_layer_guidance: SkipLayerGuidance | None = None

    def denoiser_inputs(self, tensors: dict) -> dict:
        """The transformer's conditioning at each step: the joint text tokens and the pooled embedding
        ([negative, positive] with guidance); no layer skipped, where the graph takes skip_layers."""
        feeds = {"encoder_hidden_states": tensors["prompt_embeds"],
                 "pooled_projections": tensors["pooled_prompt_embeds"]}
        layers = self.skip_layer_count  # the graph's inputs looked up once per step, not twice
        if layers:
            feeds[SKIP_LAYERS] = np.zeros(layers, dtype=np.bool_)
        return feeds

    @property
    def skip_layer_count(self) -> int:
        """The transformer's joint blocks, where its graph takes skip_layers (an export made with
        --skip-layer-guidance); 0 where it does not."""
        info = input_info(self.sessions.get(self.denoiser), SKIP_LAYERS)
        if info is None:
            return 0
        return info.shape[0] if isinstance(info.shape[0], int) else int(self.denoiser_config["num_layers"])

    def add_guidance(self, i: int, feeds: dict, noise_pred: np.ndarray, guided: np.ndarray, timer) -> np.ndarray:
        """Skip-layer guidance, at the steps its window covers: the conditional half of the step's feeds through
        the transformer with the chosen layers skipped, as diffusers' StableDiffusion3Pipeline does."""
        slg = self.skip_layer_guidance
        if slg is None or not slg.active(i):
            return guided
        half = noise_pred.shape[0] // 2
        conditional = {name: value[half:] if name != SKIP_LAYERS and np.ndim(value) and len(value) == 2 * half
                       else value for name, value in feeds.items()}
        conditional[SKIP_LAYERS] = slg.mask
        with timer.stage(STEP_STAGE):
            skipped = self.sessions[self.denoiser].run(conditional)[self.denoiser_output]
        return guided + (noise_pred[half:] - skipped) * slg.scale

    def check_skip_guidance_layers(self, skip_guidance_layers, skip_layer_guidance_scale, skip_layer_guidance_start,
                                   skip_layer_guidance_stop) -> None:
        """The layers must be the transformer's joint blocks, and the export's transformer must take skip_layers."""
        if skip_guidance_layers is None:
            return
        if not self.skip_layer_count:
            raise DiffshipError("skip_guidance_layers: this export's transformer cannot skip layers; export the "
                                "model with --skip-layer-guidance (export(..., skip_layer_guidance=True))")
        layers = self.skip_layer_count
        if isinstance(skip_guidance_layers, (str, bytes)) or not isinstance(skip_guidance_layers, (list, tuple)) \
                or not skip_guidance_layers:
            raise ValueError(f"skip_guidance_layers must be a non-empty list of the transformer's block indices "
                             f"(0 to {layers - 1}), got {skip_guidance_layers!r}")
        for index in skip_guidance_layers:
            check_int(index, "skip_guidance_layers", 0, layers - 1)
        check_number(skip_layer_guidance_scale, "skip_layer_guidance_scale")
        check_number(skip_layer_guidance_start, "skip_layer_guidance_start", 0, 1)
        check_number(skip_layer_guidance_stop, "skip_layer_guidance_stop", 0, 1)

    def skip_layers(self, skip_guidance_layers, scale, start, stop, steps: int) -> SkipLayerGuidance | None:
        if skip_guidance_layers is None:
            return None
        mask = np.zeros(self.skip_layer_count, dtype=np.bool_)
        mask[list(skip_guidance_layers)] = True
        return SkipLayerGuidance(mask, float(scale), float(start), float(stop), steps)

    def scheduler_kwargs(self, height: int, width: int, mu: float | None) -> dict:
        """`mu` for set_timesteps: given, or, where the scheduler shifts dynamically, computed from the number of
        patches the transformer sees (SD3's max_shift default is 1.16)."""
        if self.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            latent_height, latent_width = height // self.vae_scale_factor, width // self.vae_scale_factor
            image_seq_len = (latent_height // self.patch_size) * (latent_width // self.patch_size)
            mu = calculate_shift_for(self.scheduler.config, image_seq_len, 1.16)
        return {"mu": mu} if mu is not None else {}

    def generate(self, task: Task, prompt=None, prompt_2=None, prompt_3=None, height=None, width=None,
                 num_inference_steps=28, sigmas=None, guidance_scale=7.0, negative_prompt=None,
                 negative_prompt_2=None, negative_prompt_3=None, num_images_per_prompt=1, generator=None,
                 latents=None, prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True, clip_skip=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 max_sequence_length=256, mu=None, skip_guidance_layers=None, skip_layer_guidance_scale=2.8,
                 skip_layer_guidance_stop=0.2, skip_layer_guidance_start=0.01,
                 cache=None, cache_interval=None, cache_start=None):
        """One generation (see the module's docstring); inputs are checked by the caller. `cache`: a step
        cache (pipelines/step_cache.py: "taylorseer", the transformer's output forecast between full steps)."""
        start = time.perf_counter()
        timer = StageTimer()
        height, width = task.size(self, height, width)
        generator = as_generator(generator)

        # 1. Batch size and guidance.
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else len(prompt_embeds)
        images = batch_size * num_images_per_prompt
        do_classifier_free_guidance = guidance_scale > 1.0
        self.max_sequence_length = max_sequence_length
        self.prepare_request(batch_size, height, width, num_images_per_prompt, do_classifier_free_guidance)

        # 2. Encode the prompt with the three encoders.
        with timer.stage(stage_of(TEXT_ENCODER)):
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = \
                self.encode_prompt(prompt, prompt_2, prompt_3, num_images_per_prompt, do_classifier_free_guidance,
                                   negative_prompt, negative_prompt_2, negative_prompt_3, prompt_embeds,
                                   negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                                   clip_skip, max_sequence_length)
        if do_classifier_free_guidance:
            prompt_embeds = np.concatenate([negative_prompt_embeds, prompt_embeds])
            pooled_prompt_embeds = np.concatenate([negative_pooled_prompt_embeds, pooled_prompt_embeds])

        # 3. The task's inputs as arrays (image).
        task.preprocess(self, height, width, images, do_classifier_free_guidance, timer)

        # 4. Timesteps (the flow-matching schedule, shifted by `mu` where the scheduler shifts dynamically).
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, None, sigmas,
                                                            **self.scheduler_kwargs(height, width, mu))
        timesteps, num_inference_steps = task.schedule(self, timesteps, num_inference_steps)
        # Skip-layer guidance (text-to-image) needs classifier-free guidance's conditional half, as in diffusers.
        self.skip_layer_guidance = self.skip_layers(skip_guidance_layers, skip_layer_guidance_scale,
                                                    skip_layer_guidance_start, skip_layer_guidance_stop,
                                                    num_inference_steps) if do_classifier_free_guidance else None

        # 5. Initial latents: plain noise (flow matching does not scale it).
        latents = task.prepare_latents(self, images, height, width, generator, latents, timesteps,
                                       do_classifier_free_guidance, timer)

        self.step_cache = step_cache(cache, cache_interval, cache_start)
        # 6. Denoising loop (DiffusionPipeline.denoise), the transformer fed by denoiser_inputs. diffusers' SD3
        # pipeline steps the scheduler with no generator (nor eta): none here either.
        tensors = {"latents": latents, "prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}
        latents = self.denoise(task, timesteps, tensors, {}, do_classifier_free_guidance, guidance_scale, 0.0, {},
                               timer, callback_on_step_end, callback_on_step_end_tensor_inputs)

        # 7. Decode: (latents / scaling_factor) + shift_factor into the VAE decoder.
        images = task.finish(self, self.decode_images(latents, output_type, timer))

        timings = timer.summary(time.perf_counter() - start, load=self.load_seconds)
        if not return_dict:
            return (images,)
        return StableDiffusion3PipelineOutput(images=images, timings=timings)


class StableDiffusion3Pipeline(StableDiffusion3FamilyPipeline):
    """Text-to-image, as diffusers' StableDiffusion3Pipeline."""

    def __call__(self, prompt=None, prompt_2=None, prompt_3=None, height=None, width=None, num_inference_steps=28,
                 sigmas=None, guidance_scale=7.0, negative_prompt=None, negative_prompt_2=None,
                 negative_prompt_3=None, num_images_per_prompt=1, generator=None, latents=None, prompt_embeds=None,
                 negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 output_type="pil", return_dict=True, clip_skip=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), max_sequence_length=256, skip_guidance_layers=None,
                 skip_layer_guidance_scale=2.8, skip_layer_guidance_stop=0.2, skip_layer_guidance_start=0.01,
                 mu=None, cache=None, cache_interval=None, cache_start=None):
        """`skip_guidance_layers` (e.g. [7, 8, 9] for SD3.5 medium): skip-layer guidance, on an export made with
        --skip-layer-guidance; the other arguments as diffusers'."""
        task = Task()
        height, width = task.size(self, height, width)
        self.check_inputs(prompt, prompt_2, prompt_3, height, width, negative_prompt, negative_prompt_2,
                          negative_prompt_3, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                          negative_pooled_prompt_embeds, output_type, callback_on_step_end_tensor_inputs,
                          num_images_per_prompt, max_sequence_length, num_inference_steps, sigmas, guidance_scale,
                          clip_skip,
                          cache=cache, cache_interval=cache_interval, cache_start=cache_start)
        self.check_skip_guidance_layers(skip_guidance_layers, skip_layer_guidance_scale, skip_layer_guidance_start,
                                        skip_layer_guidance_stop)
        return self.generate(task, prompt, prompt_2, prompt_3, height, width, num_inference_steps, sigmas,
                             guidance_scale, negative_prompt, negative_prompt_2, negative_prompt_3,
                             num_images_per_prompt, generator, latents, prompt_embeds, negative_prompt_embeds,
                             pooled_prompt_embeds, negative_pooled_prompt_embeds, output_type, return_dict, clip_skip,
                             callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length, mu,
                             skip_guidance_layers, skip_layer_guidance_scale, skip_layer_guidance_stop,
                             skip_layer_guidance_start,
                             cache=cache, cache_interval=cache_interval, cache_start=cache_start)


class StableDiffusion3Img2ImgPipeline(StableDiffusion3FamilyPipeline):
    """Image-to-image, as diffusers' StableDiffusion3Img2ImgPipeline: the image resized to height x width (the
    model's default size unless given), encoded, and taken along the flow to where `strength` starts the schedule."""

    required_components = (TEXT_ENCODER, TEXT_ENCODER_2, TRANSFORMER, VAE_ENCODER, VAE_DECODER)
    optional_components = (TEXT_ENCODER_3,)

    def __call__(self, prompt=None, prompt_2=None, prompt_3=None, height=None, width=None, image=None,
                 strength=0.6, num_inference_steps=50, sigmas=None, guidance_scale=7.0, negative_prompt=None,
                 negative_prompt_2=None, negative_prompt_3=None, num_images_per_prompt=1, generator=None,
                 latents=None, prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True, clip_skip=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",), max_sequence_length=256,
                 mu=None, cache=None, cache_interval=None, cache_start=None):
        task = FlowImageToImage(image, strength)
        height, width = task.size(self, height, width)
        self.check_inputs(prompt, prompt_2, prompt_3, height, width, negative_prompt, negative_prompt_2,
                          negative_prompt_3, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                          negative_pooled_prompt_embeds, output_type, callback_on_step_end_tensor_inputs,
                          num_images_per_prompt, max_sequence_length, num_inference_steps, sigmas, guidance_scale,
                          clip_skip,
                          cache=cache, cache_interval=cache_interval, cache_start=cache_start)
        check_flow_strength(strength, num_inference_steps, sigmas)
        if image is None:
            raise ValueError(f"{type(self).__name__} needs image (PIL images or numpy arrays in [0, 1])")
        return self.generate(task, prompt, prompt_2, prompt_3, height, width, num_inference_steps, sigmas,
                             guidance_scale, negative_prompt, negative_prompt_2, negative_prompt_3,
                             num_images_per_prompt, generator, latents, prompt_embeds, negative_prompt_embeds,
                             pooled_prompt_embeds, negative_pooled_prompt_embeds, output_type, return_dict, clip_skip,
                             callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length, mu,
                             cache=cache, cache_interval=cache_interval, cache_start=cache_start)


class StableDiffusion3InpaintPipeline(StableDiffusion3FamilyPipeline):
    """Inpainting, as diffusers' StableDiffusion3InpaintPipeline: with SD3's 16-channel transformer the original is
    kept outside the mask after every step (taken along the flow to the next sigma); a 33-channel inpainting
    transformer sees the mask and the masked image's latents at every step."""

    required_components = (TEXT_ENCODER, TEXT_ENCODER_2, TRANSFORMER, VAE_ENCODER, VAE_DECODER)
    optional_components = (TEXT_ENCODER_3,)
    unet_in_channels = (16, 33)
    callback_tensor_inputs = (*CALLBACK_TENSOR_INPUTS, "mask", "masked_image_latents")

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        # diffusers' StableDiffusion3InpaintPipeline decodes latents / scaling_factor without adding the VAE's
        # shift_factor back (its text-to-image and image-to-image pipelines add it); kept, since diffusers is the
        # oracle: a shift of 0.0609 in latent space moves the tiny model's pixels by about 0.04.
        return self.vae_decoder.run({"latent_sample": latents / np.float32(self.vae_scaling_factor)})["sample"]

    def __call__(self, prompt=None, prompt_2=None, prompt_3=None, image=None, mask_image=None,
                 masked_image_latents=None, height=None, width=None, padding_mask_crop=None, strength=0.6,
                 num_inference_steps=50, sigmas=None, guidance_scale=7.0, negative_prompt=None,
                 negative_prompt_2=None, negative_prompt_3=None, num_images_per_prompt=1, generator=None,
                 latents=None, prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True, clip_skip=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",), max_sequence_length=256,
                 mu=None, cache=None, cache_interval=None, cache_start=None):
        task = FlowInpaint(image, mask_image, masked_image_latents, strength, padding_mask_crop)
        height, width = task.size(self, height, width)
        self.check_inputs(prompt, prompt_2, prompt_3, height, width, negative_prompt, negative_prompt_2,
                          negative_prompt_3, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                          negative_pooled_prompt_embeds, output_type, callback_on_step_end_tensor_inputs,
                          num_images_per_prompt, max_sequence_length, num_inference_steps, sigmas, guidance_scale,
                          clip_skip,
                          cache=cache, cache_interval=cache_interval, cache_start=cache_start)
        check_inpaint_inputs(image, mask_image, strength, output_type, padding_mask_crop, None)
        check_flow_strength(strength, num_inference_steps, sigmas)
        return self.generate(task, prompt, prompt_2, prompt_3, height, width, num_inference_steps, sigmas,
                             guidance_scale, negative_prompt, negative_prompt_2, negative_prompt_3,
                             num_images_per_prompt, generator, latents, prompt_embeds, negative_prompt_embeds,
                             pooled_prompt_embeds, negative_pooled_prompt_embeds, output_type, return_dict, clip_skip,
                             callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length, mu,
                             cache=cache, cache_interval=cache_interval, cache_start=cache_start)


FAMILY = Family(
    name="stable-diffusion-3",
    class_names=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
    components=ATOL,
    export_specs=f"{__name__}:export_specs",
    tasks={"text-to-image": {16: StableDiffusion3Pipeline}, "image-to-image": {16: StableDiffusion3Img2ImgPipeline},
           "inpainting": {16: StableDiffusion3InpaintPipeline, 33: StableDiffusion3InpaintPipeline}},
    copied=(TOKENIZER, TOKENIZER_2, TOKENIZER_3, SCHEDULER),
    export_flags=("skip_layer_guidance",),
)
