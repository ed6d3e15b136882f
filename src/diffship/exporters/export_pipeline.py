"""`diffship.export`: a diffusers pipeline -> one validated graph per component, in Optimum's layout.

The export writes into a temporary sibling of the output directory and renames it at the end, so a failed
export (a component beyond tolerance included) leaves nothing behind.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from tqdm.auto import tqdm

from diffship.errors import DiffshipError
from diffship.exporters.components import ExportShapes, stable_diffusion_specs
from diffship.exporters.loading import load_reference_pipeline, resolve_model_dir
from diffship.exporters.component_export import export_component
from diffship.exporters.onnx import DEFAULT_OPSET
from diffship.exporters.optimize import ExportOptions
from diffship.exporters.validate import DEFAULT_ATOL
from diffship.graphs.external_data import TWO_GB
from diffship.pipelines.base import FINAL_LAYER_NORM_FILE

logger = logging.getLogger(__name__)

FORMATS = {"onnx": "onnx", "onnxruntime": "onnx", "ort": "onnx", "openvino": "openvino", "ov": "openvino"}
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                       "StableDiffusionDepth2ImgPipeline")
# Plain files copied as they are: what the numpy pipelines read besides the graphs.
_COPIED = ("tokenizer", "tokenizer_2", "scheduler")


def _formats(backend) -> list[str]:
    names = [backend] if isinstance(backend, str) else list(backend)
    names = [n.strip() for name in names for n in name.split(",") if n.strip()]
    unknown = [n for n in names if n.lower() not in FORMATS]
    if unknown or not names:
        raise DiffshipError(f"unknown export backend(s) {unknown or names}; choose from onnx, openvino")
    return sorted({FORMATS[n.lower()] for n in names}, key=["onnx", "openvino"].index)


def _atols(atol) -> dict[str, float] | None:
    """The user's max-abs-error overrides per component; None keeps each precision's default bound."""
    if atol is None:
        return None
    if isinstance(atol, (int, float)):
        return {k: float(atol) for k in DEFAULT_ATOL}
    unknown = set(atol) - set(DEFAULT_ATOL)
    if unknown:
        raise DiffshipError(f"atol given for unknown components {sorted(unknown)}; components: {sorted(DEFAULT_ATOL)}")
    return dict(atol)


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
    progress: bool = True,
    dtype: str = "fp32",
    optimize: bool = False,
    target: str = "cpu",
    weight_format: str | None = None,
    quantize: str | None = None,
    vae_fp16: str = "fp32",
    calibration_prompts: list[str] | None = None,
) -> Path:
    """Export `model` (a diffusers directory or hub id) to `output` for `backend` ("onnx", "openvino" or both).

    Every component is validated against PyTorch on the target backend(s); the figures go to
    `output/export_report.json`. Static shapes (`static=True`) fix batch, height and width in the graphs.

    Precision and optimisation: `dtype` "fp16" converts weights and activations (the VAE stays fp32 unless
    `vae_fp16` says "mixed"); `optimize` cleans the graphs and fuses them for onnxruntime on `target`
    ("cpu" or "cuda"); `weight_format` "int8"/"int4" compresses weights (onnxruntime dynamic quantization,
    NNCF for OpenVINO); `quantize="hybrid"` also quantizes the UNet's activations (OpenVINO), calibrated on
    `calibration_prompts`.
    """
    formats = _formats(backend)
    atols = _atols(atol)
    options = ExportOptions(dtype=dtype, optimize=optimize, target=target, weight_format=weight_format,
                            quantize=quantize, vae_fp16=vae_fp16,
                            calibration_prompts=tuple(calibration_prompts) if calibration_prompts else None)
    options.check(formats)
    output = Path(output).expanduser().resolve()
    if output.exists() and not overwrite:
        raise DiffshipError(f"{output} exists; pass overwrite=True (--overwrite) to replace it")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    source = resolve_model_dir(model, revision=revision)
    index = json.loads((source / "model_index.json").read_text())
    if index.get("_class_name") not in SUPPORTED_PIPELINES:
        raise DiffshipError(
            f"{source} holds a {index.get('_class_name')}; diffship exports {', '.join(SUPPORTED_PIPELINES)}"
        )
    pipe = load_reference_pipeline(source)
    vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    default_size = pipe.unet.config.sample_size * vae_scale_factor
    shapes = ExportShapes(
        batch_size=batch_size,
        height=height or default_size,
        width=width or default_size,
        sequence_length=pipe.tokenizer.model_max_length,
        static=static,
    )
    for name, value in (("height", shapes.height), ("width", shapes.width)):
        if value % 8:
            raise ValueError(f"{name} must be a multiple of 8, got {value}")

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        report = _export_components(pipe, shapes, staging, formats, atols, opset, external_data_threshold, progress,
                                    options)
        report.update(
            source=str(model),
            formats=formats,
            opset=opset,
            shapes={"static": static, "batch_size": batch_size, "height": shapes.height, "width": shapes.width},
            options=options.to_dict(),
            passes=sorted({p["pass"] for c in report["components"].values() for p in c["passes"]}),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            versions=_versions(),
        )
        _write_pipeline_files(source, staging, index)
        (staging / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
        _replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _export_components(pipe, shapes, staging, formats, atols, opset, threshold, progress, options) -> dict:
    calibration = None
    if options.quantize == "hybrid":
        from diffship.exporters.calibration import DEFAULT_PROMPTS, unet_calibration_feeds

        calibration = unet_calibration_feeds(pipe, shapes.height, shapes.width,
                                             options.calibration_prompts or DEFAULT_PROMPTS)
    components = {}
    specs = stable_diffusion_specs(pipe, shapes)
    bar = tqdm(specs, desc="export", unit="component", disable=not progress)
    for spec in bar:
        bar.set_description(f"export {spec.name}")
        folder = staging / spec.name
        components[spec.name] = export_component(spec, folder, formats, options, opset, threshold, atols,
                                                 calibration if spec.name == "unet" else None)
        _save_config(spec, folder)
        if spec.name == "text_encoder":
            _save_final_layer_norm(pipe.text_encoder, folder)
    return {"components": components}


def _save_config(spec, folder: Path) -> None:
    """The component's own config.json (diffusers or transformers), as Optimum writes it."""
    config = spec.config_source
    if hasattr(config, "to_json_string"):  # transformers PretrainedConfig
        (folder / "config.json").write_text(config.to_json_string())
    else:  # diffusers FrozenDict
        data = {k: v for k, v in dict(config).items()}
        data.setdefault("_class_name", type(spec.module).__name__)
        (folder / "config.json").write_text(json.dumps(data, indent=2, default=list) + "\n")


def _save_final_layer_norm(text_encoder, folder: Path) -> None:
    """clip_skip normalises an earlier hidden state with the final layer norm; the numpy pipeline needs its
    weights, and they are too small to be worth a graph of their own."""
    import numpy as np

    # transformers 4 nests it under text_model, transformers 5 does not.
    norm = next(m for name, m in text_encoder.named_modules() if name.endswith("final_layer_norm"))
    np.savez(
        folder / FINAL_LAYER_NORM_FILE,
        weight=norm.weight.detach().float().numpy(),
        bias=norm.bias.detach().float().numpy(),
        eps=np.float64(norm.eps),
    )


def _write_pipeline_files(source: Path, staging: Path, index: dict) -> None:
    for name in _COPIED:
        if (source / name).is_dir():
            shutil.copytree(source / name, staging / name)
    # The components that are not exported are removed from the index so that loaders do not look for them.
    dropped = ("safety_checker", "feature_extractor", "image_encoder")
    if "depth_estimator" in index and (source / "feature_extractor").is_dir():
        # Depth-to-image keeps its DPT feature extractor: the numpy pipeline reads its preprocessor_config.json.
        shutil.copytree(source / "feature_extractor", staging / "feature_extractor")
        dropped = ("safety_checker", "image_encoder")
    index = {k: v for k, v in index.items() if k not in dropped}
    (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _replace(staging: Path, output: Path) -> None:
    if output.exists():
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        output.rename(old)
        staging.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(output)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for name in ("diffship", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "openvino"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions
