"""The shared loading base: an exported directory -> sessions, tokenizer, scheduler and configs."""

from __future__ import annotations

import contextlib
import inspect
import time
from pathlib import Path

import numpy as np
# Imported with the module, not on the first denoising loop, so its import time is not billed to a generation.
from tqdm.auto import tqdm

from diffship.checks import check_fields, check_image_size, check_int, read_json_object
from diffship.errors import DiffshipError, MissingComponentError, NotAPipelineError
from diffship.layout import (
    CONFIG,
    CONTROLNET,
    DOWN_BLOCK_ADDITIONAL_RESIDUAL,
    FEATURE_EXTRACTOR,
    FINAL_LAYER_NORM_FILE,
    GRAPH_COMPONENTS,
    IMAGE_SIZE_MULTIPLE,
    MID_BLOCK_ADDITIONAL_RESIDUAL,
    MODEL_INDEX,
    PREPROCESSOR_CONFIG,
    SCHEDULER,
    SCHEDULER_CONFIG,
    TOKENIZER,
    TOKENIZER_2,
    TOKENIZER_3,
    UNET,
    UNET_SHALLOW,
    VAE_DECODER,
    VAE_ENCODER,
    controlnet_folder,
    vae_scale_factor,
)
from diffship.pipelines.image_processing import VaeImageProcessor, postprocess
from diffship.pipelines.lora import LoraLoaderMixin
from diffship.pipelines.precision import session_options
from diffship.pipelines.saving import save_pipeline
from diffship.pipelines.steps import guide, run_callback
from diffship.pipelines.textual_inversion import TextualInversionLoaderMixin
from diffship.pipelines.timing import STEP_STAGE
from diffship.pipelines.tokenizer import CLIPTokenizer
from diffship.runtimes import Session, choose_backend, holds_graph, input_info, load_session
from diffship.schedulers import NOISE, check_scheduler_kind, scheduler_class
from diffship.schedulers.config import FrozenConfig
from diffship.schedulers.noise import randn

# Plain-file components read at load: the folder and the file holding their settings.
SETTINGS_FILES = {FEATURE_EXTRACTOR: PREPROCESSOR_CONFIG}
# The settings the pipelines read from each component's config (and model_index.json), with their JSON types:
# checked at load, so that a hand-edited file is named instead of failing later inside numpy.
_VAE_FIELDS = {"block_out_channels": list, "scaling_factor": float, "shift_factor": (float, None),
               "latent_channels": int, "in_channels": int}
CONFIG_FIELDS = {
    "model_index": {"_class_name": str},
    UNET: {"in_channels": int, "sample_size": int, "cross_attention_dim": (int, list),
           "time_cond_proj_dim": (int, None), "addition_time_embed_dim": (int, None)},
    VAE_ENCODER: _VAE_FIELDS,
    VAE_DECODER: _VAE_FIELDS,
    FEATURE_EXTRACTOR: {"size": (int, dict), "image_mean": list, "image_std": list, "do_resize": bool,
                          "keep_aspect_ratio": bool, "ensure_multiple_of": int, "resample": int, "do_rescale": bool,
                          "rescale_factor": float, "do_normalize": bool, "do_pad": bool, "size_divisor": (int, None)},
}
# Python annotations of scheduler __init__ arguments -> the JSON types their config values may have.
_ANNOTATION_KINDS = {"int": int, "float": float, "bool": bool, "str": str, "None": None}


class DiffusionPipeline(LoraLoaderMixin, TextualInversionLoaderMixin):
    """The loading half every family's pipelines share. Components are plain attributes: `text_encoder`,
    `unet`, `vae_decoder`, ... are Sessions, each carrying its component's config.json as `.config`;
    `tokenizer` / `tokenizer_2` the numpy CLIP tokenizers.

    Built as diffusers builds its pipelines: `from_pretrained(dir)`, `from_pipe(pipe)`, or from components by
    name, `StableDiffusionImg2ImgPipeline(**pipe.components)`, which shares `pipe`'s sessions (nothing is
    reloaded)."""

    # diffusers' component names for this pipeline, in its order: what `components` holds and the constructor
    # takes. The VAE is two graphs here (vae_encoder, vae_decoder); DeepCache's unet_shallow is taken too.
    component_names: tuple[str, ...] = ()
    # Those of component_names that diffship runs nothing for (safety_checker, ...): always None, as diffusers
    # has them when a model has none.
    unused_components: tuple[str, ...] = ()
    # Graph components this pipeline cannot run without, and those it uses when present.
    required_components: tuple[str, ...] = ()
    optional_components: tuple[str, ...] = ()
    # Tokenizer folders it needs (SDXL's refiner has tokenizer_2 only).
    required_tokenizers: tuple[str, ...] = (TOKENIZER,)
    # UNet input widths this pipeline runs: 4 latent channels, + mask and masked-image latents (9), + depth (5).
    unet_in_channels: tuple[int, ...] = (4,)
    # The current generation's step cache (pipelines/step_cache.py), set by generate; None: every step runs the UNet.
    step_cache = None
    # What the denoiser predicts, so what kind of scheduler can drive it (schedulers.scheduler_kind): NOISE for the
    # UNet families (epsilon / v / sample), FLOW for the flow-matching ones (a velocity). Checked whenever a
    # scheduler is set, so that `pipe.scheduler = FlowMatchEulerDiscreteScheduler(...)` on a UNet pipeline fails
    # there, naming what fits, instead of generating noise.
    denoiser_kind: str = NOISE
    # The current generation's ControlNet inputs (pipelines/controlnet.py), set by generate; None: no ControlNet runs
    # (a UNet that takes residuals gets zeros).
    control = None
    # The graph that denoises, its latent input and its prediction, by the names its export gives them: the UNet
    # families' `unet` (sample -> out_sample); the diffusion transformers' `transformer` (hidden_states ->
    # out_hidden_states, Optimum's names).
    denoiser: str = UNET
    denoiser_sample: str = "sample"
    denoiser_output: str = "out_sample"
    # Whether the loop scales the latents by the scheduler (init_noise_sigma, scale_model_input), as diffusers' UNet
    # pipelines do; its flow-matching pipelines (SD3, Flux) call neither, whatever the scheduler.
    scales_model_input: bool = True
    # Tokenizer folders whose tokenizer is not CLIP's: folder -> class with from_pretrained (SD3's T5 tokenizer).
    tokenizer_classes: dict = {}

    def __init__(self, *, model_index: dict | None = None, **components):
        """The pipeline on these components, by diffusers' names (`component_names`): Sessions for the graphs
        (each with its `.config`), diffship's CLIPTokenizers, a numpy scheduler, and for depth-to-image the
        feature extractor's settings (preprocessor_config.json as a dict). `model_index`: model_index.json's
        contents (SDXL's force_zeros_for_empty_prompt and requires_aesthetics_score are read from it); by default
        this class's name and diffusers' defaults, as `Pipeline(**components)` gives in diffusers."""
        name = type(self).__name__
        accepted = set(self.component_names) | {UNET_SHALLOW}
        unknown = sorted(set(components) - accepted)
        if unknown:
            raise TypeError(f"{name} got unexpected components {unknown}; it takes {', '.join(self.component_names)}")
        for key in self.unused_components:
            if components.get(key) is not None:
                raise ValueError(f"{name} runs no {key}: pass {key}=None (diffship does not run it)")
        # controlnet: one Session, or a list of them (diffusers' MultiControlNetModel): controlnet, controlnet_1, ...
        controlnets = components.get(CONTROLNET)
        controlnets = list(controlnets) if isinstance(controlnets, (list, tuple)) else \
            [controlnets] if controlnets is not None else []
        sessions = {key: components[key] for key in GRAPH_COMPONENTS
                    if key != CONTROLNET and components.get(key) is not None}
        sessions.update({controlnet_folder(i): session for i, session in enumerate(controlnets)})
        for key, session in sessions.items():
            if not isinstance(session, Session):
                raise TypeError(f"{key} must be a diffship Session (a component of a pipeline loaded with "
                                f"from_pretrained), got {type(session).__name__}")
            if not session.config:
                session.config = _config_beside(session)
        tokenizers = {key: components[key] for key in (TOKENIZER, TOKENIZER_2, TOKENIZER_3)
                      if components.get(key) is not None}
        folders = {Path(session.path).parent.parent for session in sessions.values()}
        model_dir = folders.pop() if len(folders) == 1 else None
        where = f" {model_dir}" if model_dir is not None else " this pipeline"
        for key in self.required_components:
            if sessions.get(key) is None:
                on_disk = model_dir is not None and (model_dir / key).is_dir()
                raise MissingComponentError(
                    f"{name} needs the {key} component, which{where} does not have "
                    + ("loaded; load it with from_pretrained" if on_disk
                       else f"(no {key}/ folder with a graph); export the model again with `diffship export`")
                )
        for key in self.required_tokenizers:
            if tokenizers.get(key) is None:
                raise MissingComponentError(f"{name} needs {key}/, which{where} does not have")
        if components.get(SCHEDULER) is None:
            raise MissingComponentError(f"{name} needs a scheduler, e.g. scheduler=PNDMScheduler.from_config(...)")
        configs = {key: session.config for key, session in sessions.items()}
        if components.get(FEATURE_EXTRACTOR) is not None:
            configs[FEATURE_EXTRACTOR] = components[FEATURE_EXTRACTOR]
        configs["model_index"] = dict(model_index) if model_index is not None else {"_class_name": name}
        in_channels = configs.get(self.denoiser, {}).get("in_channels", 4)
        if in_channels not in self.unet_in_channels:
            raise DiffshipError(f"{name} cannot run{where}: its UNet takes {in_channels} input "
                                f"channels; {_pipelines_for(in_channels)}")
        self.sessions = sessions
        for key in GRAPH_COMPONENTS:
            setattr(self, key, sessions.get(key))
        self.controlnets = [sessions[controlnet_folder(i)] for i in range(len(controlnets))]
        self.controlnet = self.controlnets if len(self.controlnets) > 1 else sessions.get(CONTROLNET)
        if self.controlnets:
            from diffship.pipelines.controlnet import check_controlnets

            check_controlnets(self.controlnets, self.unet, where)
        for key in self.unused_components:
            setattr(self, key, None)
        self.feature_extractor = components.get(FEATURE_EXTRACTOR)
        self.tokenizers = tokenizers
        self.tokenizer = tokenizers.get(TOKENIZER)
        self.tokenizer_2 = tokenizers.get(TOKENIZER_2)
        self.tokenizer_3 = tokenizers.get(TOKENIZER_3)
        self.scheduler = components[SCHEDULER]
        self.configs = configs
        self.model_dir = model_dir
        self.backend = "+".join(sorted({session.backend for session in sessions.values()}))
        self.load_seconds = 0.0
        self._progress_bar_config: dict = {}
        self._requests_seen: set = set()  # (batch, height, width, images per prompt, guidance) run before

    @property
    def scheduler(self):
        return self._scheduler

    @scheduler.setter
    def scheduler(self, scheduler) -> None:
        check_scheduler_kind(scheduler, self.denoiser_kind, type(self).__name__)
        self._scheduler = scheduler

    @property
    def components(self) -> dict:
        """{name: component}, as diffusers' `pipe.components`: every name the constructor takes, so that
        `OtherPipeline(**pipe.components)` builds another task's pipeline on the same sessions. The VAE is
        vae_encoder and vae_decoder; unet_shallow is listed when a DeepCache export loaded it."""
        names = self.component_names + ((UNET_SHALLOW,) if self.unet_shallow is not None else ())
        return {name: getattr(self, name) for name in names}

    # ---- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir, backend: str | None = None, compile: bool = True,
                        inference_precision="auto", static_shapes: bool | None = None, *,
                        revision: str | None = None, cache_dir=None, token: str | bool | None = None,
                        local_files_only: bool = False, compile_cache_dir=None, **backend_options):
        """Load an exported pipeline, a local directory or a hub repo id, on `backend` ("onnxruntime", "openvino",
        "tensorrt"; None: the one the export's graphs are for, onnxruntime where it holds both). `inference_precision`
        ("auto": bf16 where the export measured it within bound and the CPU has it, f32 elsewhere; "f32" for
        parity with PyTorch; see precision.py) and `static_shapes` (OpenVINO compiles each request's shapes; its
        default) pick how each graph runs; `compile_cache_dir` is where compiled graphs are cached (runtimes/
        cache.py; False: no compile cache); `backend_options` go to the session class, e.g. `provider="cuda"` (or
        `providers=[...]`) for onnxruntime, `device="GPU"` for OpenVINO, `shapes=ShapeRange.static(1, 512, 512),
        cuda_graph=True` for TensorRT (runtimes/tensorrt.py).

        A hub repo id (`org/name`, where no such directory exists) is downloaded with huggingface_hub, only the
        files the backend reads, as in diffusers: `revision`, `cache_dir` (the hub cache), `token`,
        `local_files_only` (also `HF_HUB_OFFLINE=1`: the cached snapshot, no network).

        On DiffusionPipeline itself, as in diffusers: the pipeline class model_index.json's `_class_name` names."""
        from diffship.hub import HubOptions, exported_pipeline

        model_dir, backend = exported_pipeline(model_dir, backend, HubOptions(revision, cache_dir, token,
                                                                              local_files_only))
        if compile_cache_dir is not None:
            backend_options["cache_dir"] = compile_cache_dir
        if cls is DiffusionPipeline:
            from diffship.pipelines.auto_pipeline import pipeline_class_named

            return pipeline_class_named(model_dir).from_pretrained(
                model_dir, backend, compile, inference_precision, static_shapes, **backend_options)
        start = time.perf_counter()
        model_dir = Path(model_dir).expanduser()
        index = _read_index(model_dir)
        names = [n for n in cls.required_components + cls.optional_components]
        if CONTROLNET in cls.component_names:  # the export's further ControlNets: controlnet_1, controlnet_2, ...
            from diffship.pipelines.controlnet import controlnet_names

            names += controlnet_names(model_dir)[1:]
        present = [n for n in names if holds_graph(model_dir / n)]
        for name in cls.required_components:
            if name not in present:
                raise MissingComponentError(f"{model_dir / name} is missing: {cls.__name__} needs the {name} "
                                            "component. Re-export with `diffship export`.")
        backend = choose_backend([model_dir / n for n in present], backend)
        options = session_options(names, model_dir, backend, inference_precision, static_shapes)
        # Every settings file first: a malformed one fails before any graph is loaded.
        components = {name: cls.tokenizer_classes.get(name, CLIPTokenizer).from_pretrained(
                      _required_dir(model_dir, name)) for name in cls.required_tokenizers}
        components.update({name: cls.tokenizer_classes.get(name, CLIPTokenizer).from_pretrained(model_dir / name)
                           for name in (TOKENIZER, TOKENIZER_2, TOKENIZER_3)
                           if name not in components and name in cls.component_names and (model_dir / name).is_dir()})
        components[SCHEDULER] = read_scheduler(_required_dir(model_dir, SCHEDULER) / SCHEDULER_CONFIG)
        configs = {name: read_config(model_dir, name) for name in present}
        components.update({name: read_config(model_dir, name, file) for name, file in SETTINGS_FILES.items()
                           if name in cls.component_names and name not in cls.unused_components
                           and (model_dir / name / file).is_file()})
        for name in present:
            try:
                components[name] = load_session(model_dir / name, backend, **options[name], **backend_options)
            except TypeError as e:
                raise DiffshipError(f"backend option not understood by {backend}: {e}") from e
            components[name].config = configs[name]
        controlnets = [components.pop(controlnet_folder(i)) for i in range(len(present))
                       if controlnet_folder(i) in components]
        if controlnets:
            components[CONTROLNET] = controlnets if len(controlnets) > 1 else controlnets[0]
        pipe = cls(model_index=index, **components)
        if compile:
            pipe.compile()
        pipe.load_seconds = time.perf_counter() - start
        return pipe

    @classmethod
    def from_pipe(cls, pipe: "DiffusionPipeline", scheduler=None):
        """This task's pipeline on `pipe`'s components (its sessions, tokenizers and configs; those this class
        does not take are left out): nothing is read from disk, reloaded or recompiled. The scheduler is a new
        one of `pipe`'s scheduler class and config (stepping state is per pipeline), or `scheduler` when given."""
        start = time.perf_counter()
        if not isinstance(pipe, DiffusionPipeline):
            raise TypeError(f"from_pipe takes a diffship pipeline, got {type(pipe).__name__}")
        if scheduler is None:
            scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        # diffusers' from_pipe: the components this class takes; those it runs nothing for are left at None.
        accepted = set(cls.component_names) - set(cls.unused_components) | {UNET_SHALLOW}
        components = {name: value for name, value in pipe.components.items() if name in accepted}
        new = cls(model_index=pipe.configs["model_index"], **{**components, SCHEDULER: scheduler})
        new._progress_bar_config = dict(pipe._progress_bar_config)
        if hasattr(pipe, "_final_layer_norm"):
            new._final_layer_norm = pipe._final_layer_norm
        new.load_seconds = time.perf_counter() - start
        return new

    def save_pretrained(self, save_directory) -> Path:
        """Write this pipeline as an exported directory that from_pretrained loads again, with its current
        scheduler (after `pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)`, the saved
        scheduler_config.json and model_index.json name EulerDiscreteScheduler), as diffusers' save_pretrained.
        The graphs, configs and tokenizers are copied from where they were loaded. `save_directory` must be new,
        empty, or a directory diffship wrote (then replaced); never the one the pipeline was loaded from. An
        interrupted save leaves nothing behind (pipelines/saving.py)."""
        return save_pipeline(self, save_directory)

    # ---- facts read from configs and graphs ----------------------------------------------------------------
    @property
    def inference_precisions(self) -> dict[str, str]:
        """{component: the precision its graph computes in}: "f32", "bf16", or "default" (the runtime's choice)."""
        return {name: getattr(session, "inference_precision", "f32") for name, session in self.sessions.items()}

    @property
    def vae_config(self) -> dict:
        return self.configs.get(VAE_DECODER) or self.configs.get(VAE_ENCODER) or {}

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae_config.get("block_out_channels", [0, 0, 0, 0]))

    @property
    def size_multiple(self) -> int:
        """What image sides must be multiples of: the VAE's scale factor (at least 8); the transformer families
        multiply it by their patch size."""
        return max(IMAGE_SIZE_MULTIPLE, self.vae_scale_factor)

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae_config.get("scaling_factor", 0.18215))

    @property
    def vae_shift_factor(self) -> float:
        """Latents are (z - shift) * scale; Stable Diffusion 1.x/2.x VAEs have no shift (None in their config)."""
        return float(self.vae_config.get("shift_factor") or 0.0)

    @property
    def text_encoder_final_layer_norm(self):
        """(weight, bias, eps) of the text encoder's final layer norm, for clip_skip; None if not exported."""
        if not hasattr(self, "_final_layer_norm"):
            # Written at export beside the text encoder's graph: read from the session's own folder.
            path = Path(self.text_encoder.path).parent / FINAL_LAYER_NORM_FILE if self.text_encoder else None
            if path is not None and path.is_file():
                with np.load(path) as data:
                    self._final_layer_norm = (data["weight"], data["bias"], float(data["eps"]))
            else:
                self._final_layer_norm = None
        return self._final_layer_norm

    @property
    def denoiser_config(self) -> dict:
        """The denoiser's config.json (the UNet's, or the transformer's)."""
        return self.configs.get(self.denoiser, {})

    unet_config = denoiser_config  # the UNet families' name for it

    @property
    def denoiser_latent_channels(self) -> int:
        """The denoiser's input channels counted in the VAE's latent layout, which the tasks build latents in (Flux
        packs 2x2 patches of them: its transformer's in_channels are four times this)."""
        return int(self.denoiser_config.get("in_channels", 4))

    @property
    def image_processor(self) -> VaeImageProcessor:
        """Images to the VAE's [-1, 1] NCHW at multiples of its scale factor, and back (diffusers' attribute)."""
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def mask_processor(self) -> VaeImageProcessor:
        """Masks to binarized grayscale [0, 1] at multiples of the VAE's scale factor."""
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True,
                                 do_convert_grayscale=True)

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options for the denoising progress bar, e.g. `disable=True`."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable):
        return tqdm(iterable, **self._progress_bar_config)

    def reshape(self, batch_size: int = 1, height: int | None = None, width: int | None = None,
                num_images_per_prompt: int = 1, guidance: bool = True) -> None:
        """Fix the graphs to static shapes where the backend can (OpenVINO: faster on CPU); a later call with other
        sizes must reshape again. (OpenVINO pipelines do this by themselves for each request's shapes unless
        loaded with static_shapes=False; reshape() also fixes the shapes the graphs declare.)"""
        if not all(session.can_reshape for session in self.sessions.values()):
            raise DiffshipError(f"reshape() needs a backend that can fix shapes (openvino); {self.backend} takes "
                                "dynamic shapes as they come")
        for name, shapes in self.request_shapes(batch_size, height, width, num_images_per_prompt, guidance).items():
            if shapes:
                self.sessions[name].reshape(shapes)
            self.sessions[name].compile()

    def compile(self, batch_size: int | None = None, height: int | None = None, width: int | None = None,
                num_images_per_prompt: int = 1, guidance: bool = True) -> None:
        """Compile every graph now rather than at its first call: at the shapes the graphs declare (what loading
        does), or, given a request (batch_size, and height / width when not the default), with static shapes
        for that request where the backend compiles them (OpenVINO), as a server does for the size it serves:
        that request then runs static code from its first call."""
        if batch_size is None and height is None and width is None:
            for session in self.sessions.values():
                session.compile()
            return
        key = (batch_size or 1, height or self.default_height, width or self.default_width, num_images_per_prompt,
               guidance)
        self._requests_seen.add(key)
        request = self.request_shapes(*key)
        for name, session in self.sessions.items():
            shapes = {info.name: request[name].get(info.name, info.shape) for info in session.inputs}
            if getattr(session, "static_shapes", False) and all(
                    isinstance(d, int) for shape in shapes.values() for d in shape):
                session.fit(shapes)
            else:  # dynamic graphs, and a graph whose request shapes are not known before the call (depth)
                session.compile()

    def vae_request_shapes(self, images: int, height: int, width: int) -> dict[str, dict[str, tuple]]:
        """The VAE graphs' input shapes at a request of `images` images of height x width (request_shapes)."""
        latent = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        return {VAE_DECODER: {"latent_sample": (images, self.vae_config.get("latent_channels", 4), *latent)},
                VAE_ENCODER: {"sample": (images, self.vae_config.get("in_channels", 3), height, width)}}

    def dynamic_inputs_only(self, wanted: dict[str, dict[str, tuple]]) -> dict[str, dict[str, tuple]]:
        """`wanted` {component: {input: shape}} kept for the inputs each graph declares with a dynamic axis
        (request_shapes: a fixed input keeps its size)."""
        return {name: {info.name: wanted[name][info.name] for info in session.inputs
                       if info.name in wanted.get(name, {}) and not all(isinstance(d, int) for d in info.shape)}
                for name, session in self.sessions.items()}

    def prepare_request(self, batch_size: int, height: int, width: int, num_images_per_prompt: int,
                        guidance: bool) -> None:
        """Called as a generation starts: a request seen before (same batch, size, guidance) is compiled static
        (OpenVINO's static_shapes "auto": static code is faster, and a request that repeats earns its compile,
        which the compile cache keeps for the next process); a new one runs on the dynamic graphs, which loading
        compiled."""
        key = (batch_size, height, width, num_images_per_prompt, guidance)
        if not any(getattr(s, "static_shapes", False) == "auto" for s in self.sessions.values()):
            return
        if key in self._requests_seen:
            self.compile(*key)
        self._requests_seen.add(key)

    def request_shapes(self, batch_size: int = 1, height: int | None = None, width: int | None = None,
                       num_images_per_prompt: int = 1, guidance: bool = True) -> dict[str, dict[str, tuple]]:
        """{component: {input: shape}} for the dynamic inputs of every graph at a request: batch axes the images
        (text encoders: the prompts; the UNet: twice the images with guidance), image axes the size, the sequence
        axis the tokenizer's length; fixed axes keep their size."""
        height = self.default_height if height is None else height
        width = self.default_width if width is None else width
        check_image_size({"height": height, "width": width}, self.size_multiple)
        check_int(batch_size, "batch_size", 1)
        check_int(num_images_per_prompt, "num_images_per_prompt", 1)
        images = batch_size * num_images_per_prompt
        latent = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        sequence = max(t.model_max_length for t in self.tokenizers.values())
        # LCM UNets (time_cond_proj_dim) run no unconditional batch, whatever the guidance scale.
        guided = guidance and self.unet_config.get("time_cond_proj_dim") is None
        batches = {UNET: images * (2 if guided else 1), VAE_DECODER: images, VAE_ENCODER: images}
        sizes = {UNET: latent, VAE_DECODER: latent, VAE_ENCODER: (height, width)}
        batches[UNET_SHALLOW], sizes[UNET_SHALLOW] = batches[UNET], latent  # DeepCache's: the UNet's inputs
        for name in self.sessions:  # ControlNets: the UNet's batch and latent (guess_mode aside), images full size
            if name.startswith(CONTROLNET):
                batches[name], sizes[name] = batches[UNET], latent
        # The UNet's ControlNet residuals: one size per level of its down path.
        from diffship.pipelines.controlnet import residual_shapes

        residuals = residual_shapes(self.unet_config, batches[UNET], *latent) if self.unet_config.get(
            "block_out_channels") else []
        residuals = {name: shape for name, shape in zip(
            [DOWN_BLOCK_ADDITIONAL_RESIDUAL.format(k) for k in range(len(residuals) - 1)]
            + [MID_BLOCK_ADDITIONAL_RESIDUAL], residuals)}
        request = {}
        for name, session in self.sessions.items():
            shapes = {}
            for info in session.inputs:
                if info.rank == 0 or all(isinstance(d, int) for d in info.shape):
                    continue  # timestep, and inputs already static
                shape = list(info.shape)
                shape[0] = batches.get(name, batch_size)
                if name == UNET and info.name in residuals:
                    shape = list(residuals[info.name])
                elif info.name == "controlnet_cond":
                    shape[2:] = (height, width)
                elif info.rank == 4 and name in sizes:
                    shape[2:] = sizes[name]
                elif info.rank >= 2 and not isinstance(shape[1], int):
                    shape[1] = sequence
                shapes[info.name] = tuple(shape)
            request[name] = shapes
        return request

    @property
    def default_height(self) -> int:
        return self._static_latent_dim(2) or self.unet_config.get("sample_size", 64) * self.vae_scale_factor

    @property
    def default_width(self) -> int:
        return self._static_latent_dim(3) or self.unet_config.get("sample_size", 64) * self.vae_scale_factor

    def _static_latent_dim(self, axis: int) -> int | None:
        denoiser = self.sessions.get(self.denoiser)
        info = input_info(denoiser, self.denoiser_sample) if denoiser is not None else None
        if info is not None and isinstance(info.shape[axis], int):
            return info.shape[axis] * self.vae_scale_factor
        return None

    def encode_vae_image(self, image: np.ndarray, generator, timer=None) -> np.ndarray:
        """Image in [-1, 1] NCHW -> scaled latents sampled from the VAE encoder's distribution with `generator`
        (item i from generator i when it is a list, as diffusers does)."""
        if isinstance(generator, list) and len(generator) > 1:
            generator = generator[: image.shape[0]]
        with timer.stage("vae_encode") if timer is not None else contextlib.nullcontext():
            parameters = self.vae_encoder.run({"sample": image.astype(np.float32, copy=False)})["latent_parameters"]
        latents = retrieve_latents(parameters, generator)
        return (latents - np.float32(self.vae_shift_factor)) * np.float32(self.vae_scaling_factor)

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        latents = latents / np.float32(self.vae_scaling_factor) + np.float32(self.vae_shift_factor)
        return self.vae_decoder.run({"latent_sample": latents})["sample"]

    def check_clip_skip(self, clip_skip, name: str = "clip_skip") -> None:
        """clip_skip within what this pipeline's text encoders have (each family's rule); `name`: what errors call
        it. A family without clip_skip refuses it."""
        if clip_skip is not None:
            raise DiffshipError(f"{name}: {type(self).__name__} takes no clip_skip")

    def denoiser_inputs(self, tensors: dict) -> dict:
        """The UNet's conditioning inputs at a step, from the loop's tensors (which callbacks may replace): how a
        family feeds its denoiser. Every family defines it."""
        raise NotImplementedError(f"{type(self).__name__} does not say how its denoiser is fed")

    def denoise(self, task, timesteps, tensors: dict, conditioning: dict, do_classifier_free_guidance: bool,
                guidance_scale: float, guidance_rescale: float, step_kwargs: dict, timer, callback_on_step_end=None,
                callback_on_step_end_tensor_inputs=("latents",)) -> np.ndarray:
        """The denoising loop, written once for every family and task. `tensors`: "latents" and what the family's
        denoiser_inputs reads, all replaceable by callback_on_step_end; `conditioning`: UNet inputs that stay the
        same over the steps (LCM's timestep_cond). The task adds what rides along the latents into the UNet, and
        what happens after each step. Returns the final latents."""
        tensors = {**tensors, **task.tensors}
        for i, t in enumerate(self.progress_bar(timesteps)):
            latents = tensors["latents"]
            latent_model_input = np.concatenate([latents] * 2) if do_classifier_free_guidance else latents
            if self.scales_model_input:
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
            latent_model_input = latent_model_input.astype(np.float32, copy=False)
            sample = task.model_input(latent_model_input)

            feeds = {
                self.denoiser_sample: sample.astype(np.float32, copy=False),
                "timestep": self.timestep_feed(t, sample.shape[0]),
                **self.denoiser_inputs(tensors),
                **conditioning,
            }
            feeds.update(self.control_residuals(i, t, latent_model_input, feeds, timer))
            noise_pred = self.run_denoiser(i, feeds, timer)

            if do_classifier_free_guidance:
                noise_pred = self.add_guidance(i, feeds, noise_pred,
                                               guide(noise_pred, guidance_scale, guidance_rescale), timer)

            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            tensors["latents"] = task.after_step(self, i, timesteps, latents)
            tensors = run_callback(self, callback_on_step_end, i, t, tensors, callback_on_step_end_tensor_inputs)
            task.tensors = {k: tensors[k] for k in task.tensors}
        return tensors["latents"]

    def add_guidance(self, i: int, feeds: dict, noise_pred: np.ndarray, guided: np.ndarray, timer) -> np.ndarray:
        """Step i's guided noise with the family's further guidance terms (SD3's skip-layer guidance), from the
        step's feeds and the [unconditional, conditional] prediction; classifier-free guidance alone by default."""
        return guided

    def control_residuals(self, i: int, t, latent_model_input: np.ndarray, feeds: dict, timer) -> dict:
        """The UNet's ControlNet residual inputs at step i (none for a UNet that takes none): what the generation's
        ControlNets give (pipelines/controlnet.py), from the step's latents before a task's extra channels and the
        UNet's conditioning in `feeds`; zeros without ControlNets."""
        if self.control is not None:
            return self.control.residuals(self, i, t, latent_model_input, feeds, timer)
        from diffship.pipelines.controlnet import zero_residuals

        return zero_residuals(self, feeds)

    def run_denoiser(self, i: int, feeds: dict[str, np.ndarray], timer) -> np.ndarray:
        """Step i's noise prediction: the UNet's, or, when the generation has a step cache (generate sets
        `step_cache`: DeepCache), whatever that cache runs in its place at this step."""
        if self.step_cache is None:
            with timer.stage(STEP_STAGE):
                return self.sessions[self.denoiser].run(feeds)[self.denoiser_output]
        return self.step_cache.run(self, i, feeds, timer)

    def decode_images(self, latents: np.ndarray, output_type: str, timer) -> list | np.ndarray:
        """The generation's result: the latents themselves (output_type "latent"), or decoded and postprocessed."""
        if output_type == "latent":
            return latents
        with timer.stage("vae_decode"):
            image = self.decode_latents(latents)
        return postprocess(image, output_type)

    def timestep_feed(self, t, batch: int, session=None) -> np.ndarray:
        """The timestep in the form this denoiser graph (or `session`'s: a ControlNet) takes: float rank-0
        (Optimum's ONNX) or [B] of its dtype."""
        info = input_info(session if session is not None else self.sessions.get(self.denoiser), "timestep")
        dtype = info.dtype if info is not None else np.dtype(np.float32)
        if info is not None and info.rank == 0:
            return np.asarray(t, dtype=dtype)
        # A static length ([1], as Optimum's Python OpenVINO export writes it) broadcasts in the graph; feed it.
        length = info.shape[0] if info is not None and isinstance(info.shape[0], int) else batch
        return np.full((length,), t, dtype=dtype)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v!r}" for k, v in self.sessions.items())
        return f"{type(self).__name__}(backend={self.backend!r}, {parts}, scheduler={type(self.scheduler).__name__})"


def _pipelines_for(in_channels: int) -> str:
    """Which pipelines run a UNet of `in_channels` input channels, for errors."""
    from diffship.families import all_pipelines

    names = [cls.__name__ for cls in all_pipelines() if in_channels in cls.unet_in_channels]
    return f"use {' or '.join(names)}" if names else "no diffship pipeline runs such a model"


def retrieve_latents(latent_parameters: np.ndarray, generator=None, sample_mode: str = "sample") -> np.ndarray:
    """The VAE encoder's latent distribution (mean and logvar, concatenated on channels) -> a sample
    (mean + std * noise drawn from `generator`) or, with sample_mode="argmax", its mode (the mean)."""
    mean, logvar = np.split(latent_parameters, 2, axis=1)
    if sample_mode == "argmax":
        return mean
    if sample_mode != "sample":
        raise ValueError(f"sample_mode must be 'sample' or 'argmax', got {sample_mode!r}")
    std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
    return mean + std * randn(mean.shape, generator, mean.dtype)


def _read_index(model_dir: Path) -> dict:
    if not model_dir.exists():
        raise NotAPipelineError(f"{model_dir} does not exist")
    if not model_dir.is_dir():
        raise NotAPipelineError(f"{model_dir} is a file; give the exported pipeline's directory")
    index_path = model_dir / MODEL_INDEX
    if not index_path.is_file():
        raise NotAPipelineError(
            f"{model_dir} is not an exported pipeline: it has no model_index.json "
            f"(export one with `diffship export MODEL {model_dir}`)"
        )
    return read_json_object(index_path, CONFIG_FIELDS["model_index"])


def _required_dir(model_dir: Path, name: str) -> Path:
    if not (model_dir / name).is_dir():
        raise MissingComponentError(f"{model_dir / name} is missing; the pipeline needs its {name}")
    return model_dir / name


def _config_beside(session) -> dict:
    """The config.json in a session's component folder, for a session made by hand (from_pretrained sets it);
    {} where there is none (the pipelines then use diffusers' defaults)."""
    folder = Path(session.path).parent
    return read_config(folder.parent, folder.name) if (folder / CONFIG).is_file() else {}


def read_config(model_dir: Path, name: str, file: str = "config.json") -> dict:
    """A component's settings file, with the fields the pipelines read type-checked (CONFIG_FIELDS); read-only,
    with attribute access (`pipe.unet.config.in_channels`), as diffusers' configs."""
    return FrozenConfig(read_json_object(Path(model_dir) / name / file, CONFIG_FIELDS.get(name)))


def read_scheduler(path: Path):
    """The scheduler a scheduler_config.json describes. Its values are checked against the types the scheduler
    class's arguments are annotated with, and a value the class refuses is reported with the file's name."""
    config = read_json_object(path, {"_class_name": str})
    if "_class_name" not in config:
        raise DiffshipError(f"{path} has no _class_name: name the scheduler class, e.g. \"PNDMScheduler\"")
    try:
        cls = scheduler_class(config["_class_name"])
    except DiffshipError as e:
        raise DiffshipError(f"{path}: {e}") from e
    check_fields(config, _annotated_kinds(cls), path)
    try:
        return cls.from_config(config)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise DiffshipError(f"{path}: {e}") from e


def _annotated_kinds(cls) -> dict:
    """argument -> JSON types, for the __init__ arguments annotated with int, float, bool, str, None or list[...]
    (joined with |); arguments with other annotations are left to the class."""
    kinds = {}
    for parameter in inspect.signature(cls.__init__).parameters.values():
        if parameter.annotation is inspect.Parameter.empty:
            continue
        parts = [p.strip() for p in str(parameter.annotation).split("|")]
        if all(p in _ANNOTATION_KINDS or p.startswith("list[") for p in parts):
            kinds[parameter.name] = tuple(list if p.startswith("list[") else _ANNOTATION_KINDS[p] for p in parts)
    return kinds
