"""ONNX -> TensorRT engines, one per component, built from the validated model.onnx the export just wrote and
written beside it (model.plan, its key and profile in model.plan.json), then validated on TensorRT against PyTorch.

What is built (the build itself is runtimes/engines.py's, which loading uses as well when an engine does not fit
the GPU or TensorRT it meets):
- the optimization profile: static from the export's batch size, height and width (`tensorrt_static`, or a
  `--static` export), or dynamic min/opt/max ranges around them (images 1 to max(batch, 4), sides from half to
  twice), turned into each input's shapes by the component's contract (engines.component_profile: latent = image
  / the VAE's scale factor, guidance doubles the UNet's batch, SDXL's text_embeds and time_ids, LCM's
  timestep_cond);
- the precision: strongly typed for an fp16 export (the graph's types, the VAE kept fp32 as the ONNX keeps it),
  fp32 with TF32 off otherwise (the parity path), or as asked (tf32; fp16 / bf16 on TensorRT 10);
- a timing cache shared by every build on the same GPU and TensorRT.

Refit for LoRA (swapping adapter weights into a built engine, BuilderFlag.REFIT) is a documented follow-up: run-time
LoRA has its own design in progress, and refit must return to the base weights cleanly, which needs that design.
"""

from __future__ import annotations

import copy
from pathlib import Path

from diffship.errors import DiffshipError
from diffship.layout import TENSORRT_ENGINE, TENSORRT_ENGINE_INFO
from diffship.runtimes.engines import (
    PRECISIONS,
    BuildOptions,
    ComponentContext,
    ShapeRange,
    component_profile,
    opt_shapes,
)


def shape_range(batch_size: int, height: int, width: int, static: bool, max_batch: int | None = None,
                guidance: bool = True) -> ShapeRange:
    """The requests the export's engines serve: exactly its batch and size (static), or a range around them."""
    if static:
        return ShapeRange.static(batch_size, height, width, guidance)
    return ShapeRange.dynamic(batch_size, height, width, guidance, max_batch)


def settings(shapes: ShapeRange, vae_scale_factor: int, precision: str | None = None,
             optimization_level: int = 3) -> dict:
    """What ExportOptions carries for the tensorrt format (plain data: it goes into export_report.json)."""
    if precision is not None and precision not in PRECISIONS:
        raise DiffshipError(f"tensorrt precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return {"shapes": shapes.to_dict(), "vae_scale_factor": vae_scale_factor, "precision": precision,
            "optimization_level": optimization_level}


def component_context(spec, vae_scale_factor: int) -> ComponentContext:
    """The spec's role, as the runtime reads it from the folder later (ComponentContext.of_folder): an LCM UNet
    (time_cond_proj_dim in its config) sees no guidance batch."""
    config = spec.config_source
    config = dict(config) if config is not None and not hasattr(config, "to_json_string") else {}
    return ComponentContext(spec.name, config.get("time_cond_proj_dim") is None, vae_scale_factor)


def spec_inputs(spec) -> list[tuple[str, tuple]]:
    """(name, shape) of the spec's inputs as its graph declares them: dynamic axes as None."""
    return [(name, tuple(None if axis in spec.dynamic_axes.get(name, {}) else int(d)
                         for axis, d in enumerate(tensor.shape)))
            for name, tensor in spec.example_inputs.items()]


def validation_shapes(spec, options) -> list[dict[str, tuple[int, ...]]]:
    """The shapes the engine is tuned for (the profile's opt): validated like the traced ones, so that the engine
    is checked where it runs best."""
    trt = options.tensorrt
    if not trt:
        return []
    context = component_context(spec, trt["vae_scale_factor"])
    return [opt_shapes(component_profile(context, spec_inputs(spec), ShapeRange.from_dict(trt["shapes"])))]


def build_options(trt: dict, onnx_precision: str) -> BuildOptions:
    precision = trt.get("precision") or ("strongly_typed" if onnx_precision == "fp16" else "fp32")
    return BuildOptions(precision, trt.get("optimization_level", 3))


def validation_precision(build: BuildOptions, onnx_precision: str) -> str:
    """The precision the engine's error is judged as: TF32 rounds products to fp16's 10-bit mantissa (fp32's range,
    so no overflow), judged by fp16's bound; bf16 by its own (validate.BF16_RTOL)."""
    if build.precision in ("fp16", "tf32"):
        return "fp16"
    if build.precision == "bf16":
        return "bf16"
    return onnx_precision


def export_tensorrt(traced, folder: Path, bounds, entry: dict) -> None:
    """model.plan beside model.onnx, built for this GPU with the export's profile, validated on TensorRT at the
    shapes it covers (the traced ones inside its profile, and its opt shapes)."""
    from diffship.exporters.memory import release
    from diffship.exporters.validate import BF16_RTOL
    from diffship.layout import ONNX_MODEL
    from diffship.runtimes.engines import check_tensorrt, engine_for
    from diffship.runtimes.tensorrt import TensorRTSession

    spec, options, status = traced.spec, traced.options, traced.status
    trt = options.tensorrt
    onnx_precision = options.precision(spec.name, "onnx")
    build = build_options(trt, onnx_precision)
    shapes = ShapeRange.from_dict(trt["shapes"])
    context = component_context(spec, trt["vae_scale_factor"])
    status("building TensorRT engine")
    device = check_tensorrt()
    # The engine goes beside the ONNX; the timing cache (and the ONNX hash's memo) to the user's cache folder.
    built = engine_for(folder, folder / ONNX_MODEL, device, context, shapes, build, target=folder)
    status("validating on tensorrt")
    session = TensorRTSession(folder, engine=built.path)
    reference = copy.copy(traced.reference)
    reference.cases = [case for case in traced.reference.cases
                       if session.covers({name: value.shape for name, value in case[0].items()})]
    if not reference.cases:
        raise DiffshipError(f"{spec.name}: the TensorRT profile covers none of the shapes the export validates at")
    precision = validation_precision(build, onnx_precision)
    bound = {"rtol": BF16_RTOL} if precision == "bf16" else bounds(precision)
    entry["precision"]["tensorrt"] = precision
    entry["validation"]["tensorrt"] = reference.check(session, "tensorrt", precision=precision, **bound)
    entry["tensorrt"] = {"engine": TENSORRT_ENGINE, "device": device.describe(), "precision": build.precision,
                         "shapes": shapes.to_dict(), "profile": {n: [list(s) for s in v]
                                                                 for n, v in session.profile.items()},
                         "build_seconds": round(built.build_seconds or 0.0, 3)}
    session = None
    release()
    entry["files"] += [TENSORRT_ENGINE, TENSORRT_ENGINE_INFO]
