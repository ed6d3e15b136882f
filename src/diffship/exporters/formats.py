"""The export format registry: each format writes a component's graph into its folder and validates it on the
runtime that will run it. Adding a format is a function here and its line in EXPORT_FORMATS; the component export
(component_export.py) runs whichever formats were asked for, in the registry's order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from onnx.external_data_helper import load_external_data_for_model

from diffship.errors import DiffshipError
from diffship.exporters.optimize import onnx_passes, openvino_converts_traced_graph, openvino_source
from diffship.exporters.memory import mapped_weights_handed_back, release
from diffship.exporters.validate import BF16_RTOL, DEFAULT_RTOL
from diffship.graphs.external_data import (
    EXTERNAL_DATA_FILE,
    attribute_tensors,
    initializers,
    is_external,
    save_model,
)
from diffship.graphs.model_io import on_disk
from diffship.layout import LORA_COMPONENTS, ONNX_MODEL, ORT_CPU_MODEL, TRANSFORMER


@dataclass
class Traced:
    """What the formats share for one component: its PyTorch reference and traced fp32 graph. `fp32` is dropped
    (None) once no later format needs it in memory; `traced_file` is the traced graph as a format wrote it, when
    a later format can read it from there. A graph past 2 GB keeps its weights in the tracer's files in
    `weights_dir` (external data) until a pass needs them in memory (`in_memory()`)."""

    spec: object
    reference: object
    fp32: object
    options: object
    opset: int
    external_data_threshold: int
    calibration: list | None
    status: Callable[[str], None]
    traced_file: Path | None = None
    weights_dir: Path | None = None

    def in_memory(self):
        """The traced graph with every weight loaded, for the graph passes (which work on the graph in memory)."""
        if self.fp32 is not None and self.weights_dir is not None and any(
                is_external(t) for t in (*initializers(self.fp32), *attribute_tensors(self.fp32))):
            load_external_data_for_model(self.fp32, str(self.weights_dir))
        return self.fp32


@dataclass(frozen=True)
class ExportFormat:
    name: str
    backend: str  # the runtime (diffship.runtimes) its graphs are validated and run on
    export: Callable  # (Traced, folder, bounds: (precision) -> dict, entry) -> None; fills the report entry
    # (spec, ExportOptions) -> more input-shape sets every format validates the component at (TensorRT: the shapes
    # its engine is tuned for); computed before the PyTorch reference is.
    validation_shapes: Callable | None = None
    # Formats whose file it is built from, added to the export when it is asked for (TensorRT builds from ONNX).
    needs: tuple[str, ...] = ()


def onnxruntime_validation_session(path):
    """An ONNX Runtime session to validate a graph on: the runtime's defaults (ORT_ENABLE_ALL), no compile cache,
    and no memory pattern. The pattern is a plan of every activation's place in one block, made and kept per set of
    input shapes; the export runs three, and the full-size UNet's at 512x512 held 1.2 GB more with it. The kernels,
    and so the outputs, are the same without it."""
    import onnxruntime as ort

    from diffship.runtimes.onnxruntime import OnnxRuntimeSession

    options = ort.SessionOptions()
    options.enable_mem_pattern = False
    return OnnxRuntimeSession(path, cache_dir=False, session_options=options)


def _measure_onnx(model, reference) -> dict:
    with on_disk(model) as path:
        figures = reference.measure(onnxruntime_validation_session(path), "onnxruntime", traced_only=True)
    return {"max_abs": figures["max_abs"], "max_rel": figures["max_rel"], "nan": figures["nan"]}


def export_onnx(traced: Traced, folder: Path, bounds, entry: dict) -> None:
    """The graph passes the options ask for, each measured, then model.onnx (+ external data), validated on ONNX
    Runtime."""
    spec, options, status = traced.spec, traced.options, traced.status
    model = traced.fp32
    passes = onnx_passes(options, spec.name, traced.reference.feeds)
    if passes:
        model = traced.in_memory()
    for name, apply in passes:
        status(f"{name} pass")
        model = apply(model)
        record = {"format": "onnx", "pass": name}
        if name != "ort_fusions_cuda":  # CUDA-only fused ops cannot run on the CPU provider
            record.update(_measure_onnx(model, traced.reference))
        entry["passes"].append(record)
    status("writing ONNX")
    # Swappable LoRA weights are read by the runtime where they lie: every weight goes to the external data file.
    swappable = options.swappable_lora and spec.name in LORA_COMPONENTS
    # The file about to be written is the graph OpenVINO converts when no pass comes before it: it reads it from
    # there, and the weights (10 GB for a full-size SDXL UNet) need not stay in memory while ONNX Runtime loads
    # its own copy. The graph written is kept in memory only where a later format still converts it from there.
    hand_off = model is traced.fp32 and openvino_converts_traced_graph(options)
    files = save_model(model, folder / ONNX_MODEL, 0 if swappable else traced.external_data_threshold,
                       size_threshold=0 if swappable else 1024, base_dir=traced.weights_dir,
                       keep=model is traced.fp32 and not hand_off)
    if hand_off:
        traced.traced_file, traced.fp32 = folder / ONNX_MODEL, None
    model = None
    release()
    precision = options.precision(spec.name, "onnx")
    entry["precision"]["onnxruntime"] = precision
    if not (options.optimize and options.target == "cuda"):
        status("validating on onnxruntime")
        entry["validation"]["onnxruntime"] = traced.reference.check(
            onnxruntime_validation_session(folder), "onnxruntime", precision=precision, **bounds(precision))
        release()  # the session's weights, before the next format loads its own
    entry["files"] += [f.name for f in files]
    if writes_ort_cpu_graph(options, spec.name):
        status("writing the CPU graph (attention on onnxruntime's kernel)")
        cpu = _write_ort_cpu_graph(folder, traced.reference, precision, bounds(precision))
        if cpu is not None:
            entry["onnxruntime_cpu"] = cpu
            entry["files"].append(ORT_CPU_MODEL)


def writes_ort_cpu_graph(options, component: str) -> bool:
    """Whether the ONNX export writes ORT_CPU_MODEL beside model.onnx for this component: fp32 UNet-type graphs
    as traced (an --optimize export's model.onnx is already fused for its target; fp16 and quantized graphs
    keep their own form)."""
    from diffship.graphs.fusion import MULTIHEAD_COMPONENTS

    return (component in MULTIHEAD_COMPONENTS and not options.optimize
            and options.precision(component, "onnx") == "fp32")


def _write_ort_cpu_graph(folder: Path, reference, precision: str, bound: dict) -> dict | None:
    """model.onnx with its attention on onnxruntime's MultiHeadAttention (graphs/fusion.attention_as_multihead),
    written as ORT_CPU_MODEL and validated against PyTorch at every shape set model.onnx was; None (nothing
    written) where no attention was found. Its weights are model.onnx's: the external data file is shared
    (read where it lies, never loaded here), weights held in the graph are copied with it."""
    import onnx

    from diffship.graphs.fusion import attention_as_multihead

    model = onnx.load(str(folder / ONNX_MODEL), load_external_data=False)
    count = attention_as_multihead(model)
    if not count:
        return None
    onnx.save_model(model, str(folder / ORT_CPU_MODEL))
    model = None
    validation = reference.check(onnxruntime_validation_session(folder / ORT_CPU_MODEL), "onnxruntime (CPU graph)",
                                 precision=precision, **bound)
    release()
    return {"file": ORT_CPU_MODEL, "multihead_attention": count, "validation": validation}


def export_openvino(traced: Traced, folder: Path, bounds, entry: dict) -> None:
    """OpenVINO IR converted from the traced graph (or the ONNX file holding it), weight compression or hybrid
    quantization as the options ask, validated on OpenVINO."""
    from diffship.runtimes.openvino import OpenVINOSession

    status = traced.status
    status("converting to OpenVINO")
    # OpenVINO maps the weight files it reads (the ONNX external data, then its own IR's .bin): the pages it has
    # read are handed back as it goes (exporters/memory.py), or they would stay resident beside its own copies.
    # convert_model holds the GIL while it converts, so there they go back only once it returns; compiling and
    # inferring (the validation below) release it, and there they go back all along.
    mapped = [traced.traced_file.with_name(EXTERNAL_DATA_FILE)] if traced.traced_file is not None else []
    with mapped_weights_handed_back(*mapped):
        files, applied, precision = _convert_openvino(traced, folder)
    release()
    if precision == "fp16":
        applied.append("fp16_ir")
    entry["passes"] += [{"format": "openvino", "pass": p} for p in applied]
    entry["precision"]["openvino"] = precision
    status("validating on openvino")
    with mapped_weights_handed_back(files[1]):
        entry["validation"]["openvino"] = traced.reference.check(
            OpenVINOSession(files[0], cache_dir=False), "openvino", precision=precision, **bounds(precision))
        release()
        status("measuring bf16 inference")
        entry["inference_precision"] = {"openvino": _bf16_choice(traced.reference, files[0], precision)}
    entry["files"] += [f.name for f in files]


def _convert_openvino(traced: Traced, folder: Path) -> tuple[list[Path], list[str], str]:
    """The IR written into `folder`: its files, the passes applied, its precision."""
    from diffship.exporters import openvino as ov_export

    spec, options = traced.spec, traced.options
    if traced.traced_file is not None:
        ov_model, source_passes = ov_export.convert_file(traced.traced_file), []
    else:
        fp32 = traced.fp32 if openvino_converts_traced_graph(options) else traced.in_memory()
        source, source_passes = openvino_source(options, spec.name, fp32, traced.reference.feeds)
        fp32 = None
        ov_model = ov_export.convert(source, base_dir=traced.weights_dir)
        source = None
    traced.fp32 = None  # OpenVINO holds its own copy of the weights now
    precision = options.precision(spec.name, "openvino")
    applied = list(source_passes)
    if precision == "hybrid":
        if not traced.calibration:
            raise ValueError(f"hybrid quantization needs calibration feeds for the {spec.name}")
        ov_model = ov_export.hybrid_quantize(ov_model, traced.calibration)
        applied.append("nncf_hybrid_int8")
    elif precision in ("int8", "int4"):
        ov_model = ov_export.compress_weights(ov_model, precision)
        applied.append(f"nncf_{precision}_weights")
    if spec.name != TRANSFORMER:
        # GenAI's UNet timestep form; diffship's runtime reads both. Its SD3 / Flux transformers take the float
        # [batch] timestep as exported (as Optimum Intel writes them).
        ov_model = ov_export.genai_timestep(ov_model)
    traced.status("writing OpenVINO IR")
    # Validation compiles the saved IR: the model goes with this function, not two copies of the weights at once.
    return ov_export.save(ov_model, folder, compress_to_fp16=precision == "fp16"), applied, precision


def _bf16_choice(reference, path: Path, precision: str) -> dict:
    """Whether OpenVINO may run this graph in bf16 by default: its error against PyTorch with bf16 inference,
    measured on this CPU, within BF16_RTOL (or, for a quantized graph, within the bound its precision is already
    judged by). The pipelines read the choice (pipelines/precision.py); without bf16 on the exporting CPU nothing
    is measured and the graph runs f32."""
    from diffship.runtimes.openvino import OpenVINOSession, has_bf16

    if not has_bf16():
        return {"choice": "f32", "bf16": None, "reason": "the exporting CPU has no bf16 (AVX512-BF16 or AMX)"}
    bound = max(BF16_RTOL, DEFAULT_RTOL.get(precision, 0.0))
    session = OpenVINOSession(path, inference_precision="bf16", cache_dir=False)
    figures = reference.measure(session, "openvino (bf16 inference)", traced_only=True)
    within = figures["nan"] == 0 and figures["max_rel"] <= bound
    return {"choice": "bf16" if within else "f32",
            "bf16": {"max_abs": figures["max_abs"], "max_rel": figures["max_rel"], "nan": figures["nan"],
                     "rtol": bound}}


def export_tensorrt(traced: Traced, folder: Path, bounds, entry: dict) -> None:
    """TensorRT engines beside the ONNX graph (exporters/tensorrt.py)."""
    from diffship.exporters import tensorrt

    tensorrt.export_tensorrt(traced, folder, bounds, entry)


def tensorrt_validation_shapes(spec, options) -> list:
    from diffship.exporters import tensorrt

    return tensorrt.validation_shapes(spec, options)


# The registry, in the order formats are written (OpenVINO can convert the ONNX file just written; TensorRT builds
# from it).
EXPORT_FORMATS = {
    "onnx": ExportFormat("onnx", "onnxruntime", export_onnx),
    "openvino": ExportFormat("openvino", "openvino", export_openvino),
    "tensorrt": ExportFormat("tensorrt", "tensorrt", export_tensorrt, tensorrt_validation_shapes, needs=("onnx",)),
}
# Other names users give a format: its runtime's name and the short forms.
FORMAT_ALIASES = {"onnxruntime": "onnx", "ort": "onnx", "ov": "openvino", "trt": "tensorrt"}


def format_name(name: str, flag: str = "backend") -> str:
    canonical = FORMAT_ALIASES.get(name.lower(), name.lower())
    if canonical not in EXPORT_FORMATS:
        raise DiffshipError(f"{flag}: unknown export backend {name!r}; choose from {', '.join(EXPORT_FORMATS)}")
    return canonical
