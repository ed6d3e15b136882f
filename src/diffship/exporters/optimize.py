"""What an export does to each component's graph between tracing and writing: the precision and
optimisation choices, as an ordered list of named passes per format.

ONNX:      cleanup -> fp16 -> onnxruntime fusions -> int8 (dynamic) / int4 (MatMulNBits)
OpenVINO:  converted from the cleaned fp32 (or fp16) ONNX graph -> fp16 IR / NNCF int8 / int4 weights
           -> hybrid quantization of the UNet (activations too, calibrated on real prompts)

Fusions produce onnxruntime-only ops, so OpenVINO always converts from the graph before fusion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx

from diffship.errors import DiffshipError
from diffship.layout import EXPORT_DTYPES, GRAPH_COMPONENTS, UNET, VAE_DECODER, VAE_ENCODER

WEIGHT_FORMATS = (None, "int8", "int4")
QUANTIZE = (None, "hybrid")
VAE_FP16 = ("fp32", "mixed", "none")
VAE_COMPONENTS = (VAE_ENCODER, VAE_DECODER)


def check_component_names(names, flag: str) -> None:
    """Per-component settings (--atol, --dtype) name graph components only."""
    unknown = sorted(set(names) - set(GRAPH_COMPONENTS))
    if unknown:
        raise DiffshipError(f"{flag} given for unknown components {unknown}; components: {', '.join(GRAPH_COMPONENTS)}")


def component_dtypes(dtype, flag: str = "dtype") -> tuple[str, tuple[tuple[str, str], ...]]:
    """export()'s `dtype` -> (every component's, per-component exceptions). `dtype` is "fp32" / "fp16", or a dict
    {component: dtype} (those components; the others fp32, or the dict's "default" entry): an SD3 or Flux
    transformer and T5 in fp16, the rest fp32. A VAE's fp16 is --vae-fp16's choice (overflow protection), so the
    VAE is not named here."""
    if isinstance(dtype, str) or dtype is None:
        return dtype, ()
    if not isinstance(dtype, dict) or not dtype:
        raise DiffshipError(f"{flag} must be one of {EXPORT_DTYPES} or a dict of component -> dtype, got {dtype!r}")
    default = dtype.get("default", "fp32")
    overrides = {k: v for k, v in dtype.items() if k != "default"}
    check_component_names(overrides, flag)
    vae = sorted(set(overrides) & set(VAE_COMPONENTS))
    if vae:
        raise DiffshipError(f"{flag} for {', '.join(vae)}: the VAE's fp16 is chosen by vae_fp16 (--vae-fp16 mixed or "
                            "none) with dtype fp16, as its decoder overflows fp16 on SD2/SDXL-style models")
    for value in (default, *overrides.values()):
        if value not in EXPORT_DTYPES:
            raise DiffshipError(f"{flag} values must be one of {EXPORT_DTYPES}, got {value!r}")
    return default, tuple(sorted(overrides.items()))


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "fp32"  # fp32 | fp16: every component's, but those in component_dtype
    component_dtype: tuple[tuple[str, str], ...] = ()  # (component, dtype) exceptions to `dtype`
    optimize: bool = False  # cleanup and onnxruntime fusions
    target: str = "cpu"  # what the onnxruntime fusions are for: cpu | cuda
    weight_format: str | None = None  # int8 | int4 weights
    quantize: str | None = None  # hybrid: UNet activations too (OpenVINO, calibrated)
    vae_fp16: str = "fp32"  # how fp16 protects the VAE: keep it fp32, mixed (overflowing nodes fp32), none
    calibration_prompts: tuple[str, ...] | None = None
    # LoRA weights kept swappable at run time (graphs/weight_map.py): the weights must stay in the graphs as they
    # are, which fusions (packed attention weights) and quantization do not keep.
    swappable_lora: bool = False
    # The tensorrt format's settings (exporters/tensorrt.settings: the ShapeRange its engines serve, the VAE's
    # scale factor, precision), set by export() once the shapes are known; None without that format.
    tensorrt: dict | None = None

    def check(self, formats: list[str]) -> None:
        if self.dtype not in EXPORT_DTYPES:
            raise DiffshipError(f"dtype must be one of {EXPORT_DTYPES}, got {self.dtype!r}")
        if self.weight_format not in WEIGHT_FORMATS:
            raise DiffshipError(f"weight_format must be int8 or int4, got {self.weight_format!r}")
        if self.quantize not in QUANTIZE:
            raise DiffshipError(f"quantize must be 'hybrid', got {self.quantize!r}")
        if self.vae_fp16 not in VAE_FP16:
            raise DiffshipError(f"vae_fp16 must be one of {VAE_FP16}, got {self.vae_fp16!r}")
        if self.target not in ("cpu", "cuda"):
            raise DiffshipError(f"target must be cpu or cuda, got {self.target!r}")
        if self.weight_format and "fp16" in (self.dtype, *dict(self.component_dtype).values()) and "onnx" in formats:
            raise DiffshipError("onnxruntime's int8/int4 quantization takes fp32 graphs: use --dtype fp32 with "
                                "--weight-format")
        if self.swappable_lora and (self.optimize or self.weight_format or self.quantize):
            raise DiffshipError("swappable_lora keeps each adapted layer's weight as it is in the graphs: export it "
                                "without optimize, weight_format and quantize (they fuse or quantize those weights)")
        if "tensorrt" in formats and (self.optimize or self.weight_format):
            raise DiffshipError("TensorRT engines are built from the ONNX graph, and --optimize (onnxruntime's fused "
                                "ops) and --weight-format (its quantized ops) write ops TensorRT's parser does not "
                                "read: export for tensorrt without them (--dtype fp16 for fp16 engines)")
        if self.quantize == "hybrid" and formats != ["openvino"]:
            raise DiffshipError("--quantize hybrid is an OpenVINO (NNCF) mode: export with --backend openvino alone")

    def dtype_of(self, component: str) -> str:
        """The dtype asked for this component (its own entry, else the export's)."""
        return dict(self.component_dtype).get(component, self.dtype)

    def precision(self, component: str, fmt: str) -> str:
        """The precision the component ends up in, which picks its validation tolerance."""
        if self.quantize == "hybrid" and component == UNET:
            return "hybrid"
        if self.weight_format and component not in VAE_COMPONENTS:
            if self.weight_format == "int4" and component != UNET:
                return "int8"  # int4 is for the UNet's large matmuls; the others get int8
            return self.weight_format
        if self.dtype_of(component) == "fp16" and not (component in VAE_COMPONENTS and self.vae_fp16 == "fp32"):
            return "fp16"
        return "fp32"

    def to_dict(self) -> dict:
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        out["component_dtype"] = dict(self.component_dtype)
        return out


def onnx_passes(options: ExportOptions, component: str, validation_feeds: dict[str, np.ndarray]):
    """[(name, function(model) -> model)] for the onnxruntime graph, in order."""
    from diffship.graphs.cleanup import cleanup
    from diffship.graphs.float16 import overflowing_nodes, to_float16
    from diffship.graphs.fusion import fuse_for_onnxruntime
    from diffship.graphs.quantize import quantize_int4_matmul, quantize_int8_dynamic

    passes = []
    if options.optimize or options.dtype_of(component) == "fp16":
        passes.append(("cleanup", cleanup))
    if options.precision(component, "onnx") == "fp16":
        if component in VAE_COMPONENTS and options.vae_fp16 == "mixed":
            def fp16_mixed(model):
                blocked = overflowing_nodes(model, validation_feeds)
                return to_float16(model, node_block_list=blocked)

            passes.append(("fp16_mixed", fp16_mixed))
        else:
            passes.append(("fp16", to_float16))
    if options.optimize:
        passes.append((f"ort_fusions_{options.target}",
                       lambda model: fuse_for_onnxruntime(model, component, options.target)))
    precision = options.precision(component, "onnx")
    if precision == "int8":
        passes.append(("int8_dynamic", quantize_int8_dynamic))
    elif precision == "int4":
        passes.append(("int4_matmul", quantize_int4_matmul))
    return passes


def openvino_converts_traced_graph(options: ExportOptions) -> bool:
    """Whether OpenVINO converts the traced fp32 graph as it is (no pass before conversion)."""
    return not options.optimize


def openvino_source(options: ExportOptions, component: str, fp32: onnx.ModelProto, validation_feeds) -> tuple:
    """The ONNX graph OpenVINO converts from, and the passes that made it: cleaned, never fused."""
    from diffship.graphs.cleanup import cleanup

    if openvino_converts_traced_graph(options):
        return fp32, []
    return cleanup(fp32), ["cleanup"]
