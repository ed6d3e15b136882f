"""`diffship.export`: a diffusers pipeline -> one validated graph per component, in Optimum's layout.

Every argument is checked before any model is loaded. The export writes into a staging directory beside the
output and renames it at the end (diffship/output_directory.py), so a failed or interrupted export (a component
beyond tolerance, SIGTERM, Ctrl-C) leaves nothing behind, and only a previous diffship export is ever replaced.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from diffship.checks import check_image_size, check_int, check_number, read_json_object
from diffship.errors import DiffshipError
from diffship.exporters.components import ExportShapes
from diffship.exporters.controlnet import check_controlnets, check_fits, controlnet_index_entry, load_controlnets
from diffship.exporters.memory import collect_only_new_objects, release
from diffship.exporters.loading import load_reference_pipeline, resolve_source
from diffship.exporters.lora import apply_loras, check_loras
from diffship.exporters.textual_inversion import (
    apply_textual_inversions,
    check_textual_inversions,
    reserve_token_rows,
)
from diffship.exporters.component_export import export_component
from diffship.exporters.onnx import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from diffship.exporters.optimize import ExportOptions, check_component_names, component_dtypes
from diffship.output_directory import EXPORTER, REPORT_FILE, ExportDirectory, check_output, list_files
from diffship.exporters.formats import EXPORT_FORMATS, format_name
from diffship.families import family_for
from diffship.graphs.external_data import TWO_GB
from diffship.graphs.weight_map import layer_digests, write_weight_map
from diffship.hub import HubOptions
from diffship.layout import (
    CONFIG,
    CONTROLNET,
    DEEP_FEATURES,
    FEATURE_EXTRACTOR,
    GRAPH_COMPONENTS,
    IMAGE_ENCODER,
    LORA_COMPONENTS,
    LORA_WEIGHTS,
    MODEL_INDEX,
    SAFETY_CHECKER,
    SKIP_LAYERS,
    SOURCE_VAE,
    TOKENIZER,
    TOKENIZER_2,
    TOKENIZER_3,
    TRANSFORMER,
    UNET,
    UNET_SHALLOW,
    vae_scale_factor,
)

logger = logging.getLogger(__name__)

# What an OpenVINO tokenizer must tokenize as the tokenizer does: words, case, punctuation, accents, digits, emoji,
# runs of white space, an empty prompt, and one past the 77-token limit (truncation).
TOKENIZER_CHECK_PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "An Oil Painting of a Castle at Sunset, trending on ArtStation!!",
    "café naïve façade, 10% off: 3.5x zoom (detailed)",
    "\U0001F431 cat   with\ttabs\nand newlines",
    "",
    " ".join(["a very long prompt that goes on"] * 20),
)

# Images per call a graph is traced at: past this, a batch is a typo (and the traced example alone would not fit).
MAX_BATCH_SIZE = 256


def check_arguments(*, backend="onnx", height=None, width=None, batch_size=1, opset=DEFAULT_OPSET, atol=None,
                    external_data_threshold=TWO_GB, calibration_prompts=None, deepcache=False, deepcache_branch=0,
                    name=lambda argument: argument) -> tuple[list[str], dict[str, float] | None]:
    """Check export's arguments before anything is read or loaded; the formats and per-component atols they give.
    Errors name each argument as `name(argument)` says: export()'s own names, or the command line's flags."""
    check_int(batch_size, name("batch_size"), 1, MAX_BATCH_SIZE)
    if not isinstance(deepcache, bool):
        raise ValueError(f"{name('deepcache')} must be True or False, got {deepcache!r}")
    check_int(deepcache_branch, name("deepcache_branch"), 0)
    if deepcache_branch and not deepcache:
        raise ValueError(f"{name('deepcache_branch')} is DeepCache's: give {name('deepcache')} too")
    check_image_size({name("height"): height, name("width"): width})
    check_int(opset, name("opset"), MIN_OPSET, MAX_OPSET)
    check_int(external_data_threshold, name("external_data_threshold"), 0, TWO_GB)
    if calibration_prompts is not None and (isinstance(calibration_prompts, str) or not calibration_prompts
                                            or not all(isinstance(p, str) and p for p in calibration_prompts)):
        raise ValueError(f"{name('calibration_prompts')} must be a non-empty list of non-empty prompts")
    return _formats(backend, name("backend")), _atols(atol, name("atol"))


def _formats(backend, flag: str) -> list[str]:
    names = [backend] if isinstance(backend, str) else list(backend)
    names = [n.strip() for name in names for n in name.split(",") if n.strip()]
    if not names:
        raise DiffshipError(f"{flag}: no export backend given; choose from {', '.join(EXPORT_FORMATS)}")
    chosen = {format_name(n, flag) for n in names}
    chosen |= {need for name in chosen for need in EXPORT_FORMATS[name].needs}  # TensorRT builds from the ONNX
    return [name for name in EXPORT_FORMATS if name in chosen]  # the registry's order: ONNX first


def _atols(atol, flag: str) -> dict[str, float] | None:
    """The user's max-abs-error overrides per component; None keeps each precision's default bound."""
    if atol is None:
        return None
    if not isinstance(atol, dict):
        check_number(atol, flag, low=0)
        return {k: float(atol) for k in GRAPH_COMPONENTS}
    check_component_names(atol, flag)
    for component, value in atol.items():
        check_number(value, f"{flag} for {component}", low=0)
    return {k: float(v) for k, v in atol.items()}


def export(
    model: str | os.PathLike,
    output: str | os.PathLike,
    backend: str | list[str] = "onnx",
    *,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    static: bool = False,
    opset: int = DEFAULT_OPSET,
    atol: float | dict[str, float] | None = None,
    overwrite: bool = False,
    external_data_threshold: int = TWO_GB,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    dtype: str = "fp32",
    optimize: bool = False,
    target: str = "cpu",
    weight_format: str | None = None,
    quantize: str | None = None,
    vae_fp16: str = "fp32",
    calibration_prompts: list[str] | None = None,
    deepcache: bool = False,
    deepcache_branch: int = 0,
    loras=None,
    textual_inversions=None,
    swappable_lora: bool = False,
    tensorrt_static: bool = False,
    tensorrt_precision: str | None = None,
    tensorrt_max_batch: int | None = None,
    controlnet=None,
    skip_layer_guidance: bool = False,
) -> Path:
    """Export `model` (a diffusers directory or hub id) to `output` for `backend` ("onnx", "openvino", "tensorrt",
    or a list of them).

    Every component is validated against PyTorch on the target backend(s), for dynamic graphs at the traced
    shapes and at others (another batch, a latent size the UNet's up factor does not divide); the figures go to
    `output/export_report.json`. Static shapes (`static=True`) fix batch, height and width in the graphs.

    A hub id is downloaded as diffusers downloads it (`revision`, `variant` such as "fp16": that variant's weights
    where a component has them, exported in the export's own dtype all the same; `cache_dir`: the hub cache;
    `token`; `local_files_only`, or HF_HUB_OFFLINE=1: the cached snapshot, no network); the commit it resolved to
    goes into the report. Weights load from safetensors only: pickled `.bin` weights run code when loaded, and
    need `allow_pickle=True`.

    `output` must be new, an empty folder, or (with `overwrite=True`) a previous diffship export holding only
    what that export wrote; nothing else is ever replaced.

    Precision and optimisation: `dtype` "fp16" converts weights and activations (the VAE stays fp32 unless
    `vae_fp16` says "mixed"); a dict gives it per component (`{"transformer": "fp16", "text_encoder_3": "fp16"}`:
    those in fp16, the others fp32 or the dict's "default"); `optimize` cleans the graphs and fuses them for onnxruntime on `target`
    ("cpu" or "cuda"); `weight_format` "int8"/"int4" compresses weights (onnxruntime dynamic quantization,
    NNCF for OpenVINO); `quantize="hybrid"` also quantizes the UNet's activations (OpenVINO), calibrated on
    `calibration_prompts`.

    `loras`: LoRA files baked into the weights, each a path (scale 1.0) or a (path, scale) pair: loaded with
    diffusers' loaders (diffusers/PEFT and kohya formats), fused at their scales, recorded in the report with each
    file's sha256 (exporters/lora.py). A LoRA that does not fit the model is refused, never partly applied.
    `textual_inversions`: embeddings added to the tokenizers and text encoders, each a path or a (path, token)
    pair (diffusers' and Automatic1111's formats, multi-vector ones, SDXL's clip_l/clip_g pairs;
    exporters/textual_inversion.py); the exported tokenizers know the new tokens.
    `swappable_lora=True` keeps the weights LoRA adapts (every Linear, Conv2d and Embedding of the UNet and text
    encoders) swappable: each component's `lora_weights.json` maps its layers to graph weights, and the pipelines'
    `load_lora_weights` / `set_adapters` / `fuse_lora` / `unload_lora_weights` replace them at run time
    (pipelines/lora.py) with no re-export; the text encoders' token tables get RESERVED_TOKEN_ROWS spare rows
    that `load_textual_inversion` fills at run time (pipelines/textual_inversion.py).

    `backend="tensorrt"` (with the ONNX graphs it is built from) also builds a TensorRT engine per component on
    this machine's GPU, written beside model.onnx (model.plan) and validated on TensorRT (exporters/tensorrt.py):
    its profile is static at `batch_size`, `height`, `width` with `static` or `tensorrt_static`, else a range
    around them (1 to `tensorrt_max_batch` images, default max(batch_size, 4); sides from half to twice);
    `tensorrt_precision` ("fp32", "tf32", "fp16", "bf16", "strongly_typed"; default strongly typed for `dtype`
    "fp16", fp32 otherwise). TensorRT, CUDA's Python binding and a GPU are checked before anything is loaded.

    `controlnet`: a ControlNet (a diffusers ControlNetModel folder or hub id) or a list of them, exported beside the
    model as controlnet/, controlnet_1/, ... (exporters/controlnet.py); the UNet then takes their residuals as
    inputs (down_block_additional_residuals.N, mid_block_additional_residual) and runs with any ControlNet of its
    family. model_index.json names the family's ControlNet pipeline, as diffusers saves one.

    `deepcache=True` makes the UNet also output the deep feature DeepCache caches (`deep_features`, after
    `out_sample`) at `deepcache_branch` (0, the shallowest, to the UNet's layers per block), and adds the shallow
    UNet that the cached steps run (`unet_shallow/`); the pipelines then take `cache="deepcache"`.

    `skip_layer_guidance=True` (SD3): the transformer also takes `skip_layers` (bool per joint block), so that
    StableDiffusion3Pipeline's `skip_guidance_layers` runs (SD3.5-medium's [7, 8, 9]). Optimum's and OpenVINO
    GenAI's pipelines do not feed that input: export without it for them.
    """
    # Every argument first, before anything is read, downloaded or loaded.
    formats, atols = check_arguments(backend=backend, height=height, width=width, batch_size=batch_size,
                                     opset=opset, atol=atol, external_data_threshold=external_data_threshold,
                                     calibration_prompts=calibration_prompts, deepcache=deepcache,
                                     deepcache_branch=deepcache_branch)
    dtype, component_dtype = component_dtypes(dtype)
    options = ExportOptions(dtype=dtype, component_dtype=component_dtype, optimize=optimize, target=target, weight_format=weight_format,
                            quantize=quantize, vae_fp16=vae_fp16,
                            calibration_prompts=tuple(calibration_prompts) if calibration_prompts else None,
                            swappable_lora=swappable_lora)
    if not isinstance(swappable_lora, bool):
        raise ValueError(f"swappable_lora must be True or False, got {swappable_lora!r}")
    if not isinstance(skip_layer_guidance, bool):
        raise ValueError(f"skip_layer_guidance must be True or False, got {skip_layer_guidance!r}")
    options.check(formats)
    device = check_tensorrt_export(formats, tensorrt_static, tensorrt_precision, tensorrt_max_batch)
    adapters = check_loras(loras, allow_pickle)
    embeddings = check_textual_inversions(textual_inversions, allow_pickle)
    if "openvino" in formats:
        check_openvino_tokenizers()
    output = Path(output).expanduser().resolve()
    local = Path(model).expanduser()
    check_output(output, overwrite, local if local.exists() else None)

    if variant is not None and (not isinstance(variant, str) or not variant.strip()):
        raise ValueError(f"variant must be a weight variant's name such as 'fp16', got {variant!r}")
    hub_options = HubOptions(revision, cache_dir, token, local_files_only)
    # `revision` is the model's; a ControlNet hub id is fetched at its default branch.
    controlnets = check_controlnets(controlnet, HubOptions(None, cache_dir, token, local_files_only), allow_pickle)
    if controlnets and "tensorrt" in formats:
        raise DiffshipError("controlnet: TensorRT engines are not built for ControlNets and the UNet that takes their "
                            "residuals yet (their profiles need each residual's size); export to onnx and/or openvino")
    if controlnets and deepcache:
        raise DiffshipError("controlnet and deepcache: DeepCache's shallow UNet takes no ControlNet residuals; "
                            "export one or the other")
    resolved = resolve_source(model, hub_options, variant, allow_pickle)
    source = resolved.path
    if source != local:  # a hub id: its snapshot in the cache must not be replaced either
        check_output(output, overwrite, source)
    index = read_json_object(source / MODEL_INDEX, {"_class_name": str})
    family = family_for(index.get("_class_name"), source)
    vae_config = read_json_object(source / SOURCE_VAE / CONFIG, {"block_out_channels": list})
    scale = vae_scale_factor(vae_config.get("block_out_channels", [0] * 4))
    check_image_size({"height": height, "width": width}, multiple=max(scale, 8))
    if skip_layer_guidance and "skip_layer_guidance" not in family.export_flags:
        raise DiffshipError(f"skip_layer_guidance (--skip-layer-guidance): skip-layer guidance is Stable Diffusion 3's (its transformer's "
                            f"joint blocks), not {family.name}'s; export without it")
    if skip_layer_guidance and "tensorrt" in formats:
        raise DiffshipError("skip_layer_guidance (--skip-layer-guidance): TensorRT profiles are not built for the skip_layers input yet; "
                            "export to onnx and/or openvino")
    if swappable_lora and UNET not in family.components:
        raise DiffshipError(f"swappable_lora: run-time LoRA is built for the UNet families (SD 1.x/2.x, SDXL), not "
                            f"{family.name}; bake LoRAs in with loras= (--lora) instead")
    if deepcache:
        check_deepcache(family, source, deepcache_branch)
        if swappable_lora:  # the shallow UNet would keep the base weights while the UNet's are swapped
            raise DiffshipError("swappable_lora and deepcache cannot be combined: export one or the other")
    if controlnets:
        check_controlnet_model(family, source, index, controlnets)

    with ExportDirectory(output, overwrite) as target_dir, collect_only_new_objects():
        pipe = load_reference_pipeline(source, variant, allow_pickle)
        apply_loras(pipe, adapters)
        embedding_report = apply_textual_inversions(pipe, embeddings)
        if swappable_lora:
            reserve_token_rows(pipe)
        controlnet_models = load_controlnets(controlnets, allow_pickle)
        # The UNet families' denoiser or the transformers'; only its config is kept here: a reference to the
        # module would keep its weights (a full-size UNet's 3.4 GB) alive after its export frees it. Flux's
        # transformer has no sample_size: its pipelines' default_sample_size is 128 latents.
        denoiser_config = (getattr(pipe, "unet", None) or pipe.transformer).config
        default_size = getattr(denoiser_config, "sample_size", 128) * scale
        tokenizer = getattr(pipe, "tokenizer", None) or pipe.tokenizer_2
        shapes = ExportShapes(
            batch_size=batch_size,
            height=height or default_size,
            width=width or default_size,
            sequence_length=tokenizer.model_max_length,
            static=static,
        )
        if device is not None:
            from diffship.exporters import tensorrt

            ranges = tensorrt.shape_range(batch_size, shapes.height, shapes.width, static or tensorrt_static,
                                          tensorrt_max_batch)
            options = dataclasses.replace(options, tensorrt=tensorrt.settings(ranges, scale, tensorrt_precision))
        staging = target_dir.path
        report = _export_components(family, pipe, shapes, staging, formats, atols, opset, external_data_threshold,
                                    progress, options, deepcache_branch if deepcache else None, controlnet_models,
                                    {"skip_layer_guidance": skip_layer_guidance})
        del controlnet_models
        if skip_layer_guidance:
            report["skip_layer_guidance"] = {"component": TRANSFORMER, "input": SKIP_LAYERS}
        if deepcache:
            report["deepcache"] = {"branch": deepcache_branch, "output": DEEP_FEATURES, "component": UNET_SHALLOW}
        report.update(
            exporter=EXPORTER,
            family=family.name,
            source=str(model),
            hub=resolved.to_report(),
            loras=[adapter.to_report() for adapter in adapters],
            textual_inversions=embedding_report,
            controlnets=[source.to_report() for source in controlnets],
            variant=variant,
            formats=formats,
            opset=opset,
            shapes={"static": static, "batch_size": batch_size, "height": shapes.height, "width": shapes.width},
            options=options.to_dict(),
            passes=sorted({p["pass"] for c in report["components"].values() for p in c["passes"]}),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            versions=_versions(),
        )
        if controlnets:  # diffusers' ControlNet pipeline of the model's task, and its controlnet entry
            index = {**index, "_class_name": family.controlnet_class_name(index.get("_class_name")),
                     CONTROLNET: controlnet_index_entry(len(controlnets))}
        _write_pipeline_files(family, source, staging, index, pipe if embeddings else None)
        if "openvino" in formats:
            report["tokenizers"] = _openvino_tokenizers(pipe, staging)
        # The list of every file the export wrote: what marks the directory as diffship's, and all that a later
        # export with overwrite=True may delete.
        report["files"] = sorted(set(list_files(staging)) | {REPORT_FILE})
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        return target_dir.commit()


def _export_components(family, pipe, shapes, staging, formats, atols, opset, threshold, progress, options,
                       deepcache_branch=None, controlnets=(), flags=None) -> dict:
    calibration = None
    if options.quantize == "hybrid":
        from diffship.exporters.calibration import DEFAULT_PROMPTS, unet_calibration_feeds

        calibration = unet_calibration_feeds(pipe, shapes.height, shapes.width,
                                             options.calibration_prompts or DEFAULT_PROMPTS, progress=progress)
    components = {}
    specs = family.specs(pipe, shapes, deepcache_branch, controlnets, **(flags or {}))
    bar = tqdm(specs, desc="export", unit="component", disable=not progress)
    for i, spec in enumerate(bar):
        folder = staging / spec.name
        _hand_over(pipe, spec, specs[i + 1:])
        status = lambda text, name=spec.name: bar.set_description(f"export {name}: {text}")  # noqa: E731
        layers = None
        if options.swappable_lora and spec.name in LORA_COMPONENTS:
            status("hashing the weights LoRA adapts")
            layers = layer_digests(next(spec.module.children()), options.dtype_of(spec.name))
        components[spec.name] = export_component(
            spec, folder, formats, options, opset, threshold, atols, calibration if spec.name == UNET else None,
            status=status)
        if layers is not None:
            status("mapping LoRA layers to graph weights")
            components[spec.name]["lora_weights"] = write_weight_map(folder, spec.name, layers)
            components[spec.name]["files"].append(LORA_WEIGHTS)
        _save_config(spec, folder)
        if spec.write_extra is not None:
            spec.write_extra(folder)
        release()
    return {"components": components}


def check_controlnet_model(family, source: Path, index: dict, controlnets) -> None:
    """ControlNets need a model whose task the family has a ControlNet pipeline for (not depth-to-image), and each
    must mirror its UNet (exporters/controlnet.check_fits), before anything is loaded."""
    from diffship.families import diffusers_class_name

    class_name = diffusers_class_name(index.get("_class_name") or "StableDiffusionPipeline")
    if not family.controlnet_tasks:
        raise DiffshipError(f"controlnet: diffship runs no ControlNets with {family.name} models ({source})")
    unet_config = read_json_object(source / UNET / CONFIG, {"in_channels": int})
    pipeline_name = family.controlnet_class_name(class_name)
    pipeline = next((p for p in family.controlnet_tasks.values() if p.__name__ == pipeline_name), None)
    if pipeline is None or unet_config.get("in_channels", 4) not in pipeline.unet_in_channels:
        raise DiffshipError(f"controlnet: {source} is a {class_name} whose UNet takes "
                            f"{unet_config.get('in_channels', 4)} input channels; diffship runs ControlNets with "
                            f"{', '.join(p.__name__ for p in family.controlnet_tasks.values())} models")
    check_fits(controlnets, unet_config, family.name)


def check_tensorrt_export(formats: list[str], static: bool, precision: str | None, max_batch: int | None,
                          name=lambda argument: argument):
    """The tensorrt format's arguments, and TensorRT, CUDA's binding and a GPU, before anything is loaded; the
    device's info (None without the format)."""
    if "tensorrt" not in formats:
        for argument, value in (("tensorrt_static", static), ("tensorrt_precision", precision),
                                ("tensorrt_max_batch", max_batch)):
            if value:
                raise DiffshipError(f"{name(argument)} is for TensorRT engines: add tensorrt to {name('backend')}")
        return None
    from diffship.runtimes.engines import PRECISIONS, BuildOptions, check_tensorrt

    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"{name('tensorrt_precision')} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if max_batch is not None:
        check_int(max_batch, name("tensorrt_max_batch"), 1, MAX_BATCH_SIZE)
    device = check_tensorrt()
    if precision is not None:
        BuildOptions(precision).check_version(device.tensorrt_version)
    return device


def check_deepcache(family, source: Path, branch: int) -> None:
    """DeepCache needs a family that runs it and a UNet with `branch`: one of its last up block's layers (from the
    UNet's config, before it is loaded)."""
    if "deepcache" not in family.step_caches:
        raise DiffshipError(f"deepcache: {family.name} models have no DeepCache export")
    config = read_json_object(source / UNET / CONFIG, {"layers_per_block": (int, list)})
    layers = config.get("layers_per_block", 2)
    layers = layers[0] if isinstance(layers, list) else layers  # the first down block's: the last up block's - 1
    if branch > layers:
        raise ValueError(f"deepcache_branch must be from 0 to {layers} for this UNet (its last up block "
                         f"has {layers + 1} layers), got {branch}")


def _hand_over(pipe, spec, later_specs) -> None:
    """Leave `spec` the only holder of its PyTorch module when no later component is exported from it, so that
    export_component can free it once traced: a full-size SDXL UNet is 10 GB of weights, and validating its graph
    needs that memory for the runtime's copy (the shared VAE stays until its decoder is exported)."""
    module = next(spec.module.children(), None)
    if module is None or any(next(s.module.children(), None) is module for s in later_specs):
        return
    for name, component in list(pipe.components.items()):
        if component is module:
            setattr(pipe, name, None)
    spec.release_after_trace = True


def _save_config(spec, folder: Path) -> None:
    """The component's own config.json (diffusers or transformers), as Optimum writes it."""
    config = spec.config_source
    if hasattr(config, "to_json_string"):  # transformers PretrainedConfig
        (folder / CONFIG).write_text(config.to_json_string())
    else:  # diffusers FrozenDict
        data = {k: v for k, v in dict(config).items()}
        (folder / CONFIG).write_text(json.dumps(data, indent=2, default=list) + "\n")


def _write_pipeline_files(family, source: Path, staging: Path, index: dict, tokenizers_from=None) -> None:
    """The family's plain files (tokenizers, scheduler), and model_index.json without what was not exported.
    `tokenizers_from`: the pipeline whose tokenizers learnt new tokens (textual inversion): saved, not copied."""
    for name in family.copied:
        tokenizer = getattr(tokenizers_from, name, None) if name in (TOKENIZER, TOKENIZER_2) else None
        if tokenizer is not None:
            tokenizer.save_pretrained(staging / name)
        elif (source / name).is_dir():
            shutil.copytree(source / name, staging / name)
    # The components that are not exported are removed from the index so that loaders do not look for them.
    dropped = (SAFETY_CHECKER, FEATURE_EXTRACTOR, IMAGE_ENCODER)
    if "depth_estimator" in index and (source / FEATURE_EXTRACTOR).is_dir():
        # Depth-to-image keeps its DPT feature extractor: the numpy pipeline reads its preprocessor_config.json.
        shutil.copytree(source / FEATURE_EXTRACTOR, staging / FEATURE_EXTRACTOR)
        dropped = (SAFETY_CHECKER, IMAGE_ENCODER)
    index = {k: v for k, v in index.items() if k not in dropped}
    (staging / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def check_openvino_tokenizers() -> None:
    """OpenVINO exports carry their tokenizers as OpenVINO models too (what OpenVINO GenAI tokenizes with)."""
    try:
        import openvino_tokenizers  # noqa: F401
    except ImportError as e:
        raise DiffshipError("exporting to OpenVINO needs openvino-tokenizers, which writes the tokenizers OpenVINO "
                            "GenAI runs: pip install 'diffship[export]'") from e


def _openvino_tokenizers(pipe, staging: Path) -> dict:
    """Each tokenizer folder also as OpenVINO models, checked against the tokenizer on TOKENIZER_CHECK_PROMPTS."""
    from diffship.exporters.openvino import convert_tokenizer

    report = {}
    for name in (TOKENIZER, TOKENIZER_2, TOKENIZER_3):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None and (staging / name).is_dir():
            report[name] = convert_tokenizer(tokenizer, staging / name, TOKENIZER_CHECK_PROMPTS)
            if report[name]["mismatches"]:
                logger.warning("%s: OpenVINO GenAI will tokenize %d of %d check prompts unlike the tokenizer (an "
                               "openvino-tokenizers limitation; diffship's runtime is not affected): %r", name,
                               len(report[name]["mismatches"]), len(TOKENIZER_CHECK_PROMPTS),
                               report[name]["mismatches"])
    return report


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for name in ("diffship", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu",
                 "openvino", "openvino-tokenizers", "tensorrt", "cuda-bindings"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions
