"""One component, start to finish: trace, run the graph passes per format, write, validate each result."""

from __future__ import annotations

import logging
from pathlib import Path

from diffship.exporters.components import ComponentSpec
from diffship.exporters.onnx import trace_onnx
from diffship.exporters.optimize import ExportOptions, onnx_passes, openvino_converts_traced_graph, openvino_source
from diffship.exporters.validate import DEFAULT_ATOL, DEFAULT_RTOL, Reference
from diffship.graphs.external_data import save_model
from diffship.graphs.model_io import on_disk

logger = logging.getLogger(__name__)


def tolerance(component: str, precision: str, atols: dict[str, float] | None) -> dict:
    """The bound a component is judged by: the user's atol if given, else the precision's default."""
    if atols and component in atols:
        return {"atol": atols[component]}
    if precision == "fp32":
        return {"atol": DEFAULT_ATOL[component]}
    return {"rtol": DEFAULT_RTOL[precision]}


def _measure_onnx(model, reference: Reference) -> dict:
    from diffship.runtimes.onnxruntime import OnnxRuntimeSession

    with on_disk(model) as path:
        figures = reference.measure(OnnxRuntimeSession(path), "onnxruntime", traced_only=True)
    return {"max_abs": figures["max_abs"], "max_rel": figures["max_rel"], "nan": figures["nan"]}


def export_component(spec: ComponentSpec, folder: Path, formats: list[str], options: ExportOptions, opset: int,
                     external_data_threshold: int, atols: dict[str, float] | None = None,
                     calibration: list | None = None, status=None) -> dict:
    """Write `spec`'s graph(s) into `folder`; return its export_report.json entry. `status(text)`, when given, is
    told each stage as it starts (a full-size UNet spends minutes in some)."""
    from diffship.runtimes.onnxruntime import OnnxRuntimeSession
    from diffship.runtimes.openvino import OpenVINOSession

    status = status or (lambda text: None)
    status("PyTorch reference")
    reference = Reference(spec)
    status("tracing")
    fp32 = trace_onnx(spec, opset)
    entry = {"files": [], "inputs": list(spec.example_inputs), "outputs": spec.output_names, "precision": {},
             "passes": [], "validation": {}}

    traced_file = None  # the traced graph as written for ONNX Runtime, when OpenVINO can convert that file
    if "onnx" in formats:
        model = fp32
        for name, apply in onnx_passes(options, spec.name, reference.feeds):
            status(f"{name} pass")
            model = apply(model)
            record = {"format": "onnx", "pass": name}
            if name != "ort_fusions_cuda":  # CUDA-only fused ops cannot run on the CPU provider
                record.update(_measure_onnx(model, reference))
            entry["passes"].append(record)
        status("writing ONNX")
        files = save_model(model, folder / "model.onnx", external_data_threshold)
        precision = options.precision(spec.name, "onnx")
        entry["precision"]["onnxruntime"] = precision
        if not (options.optimize and options.target == "cuda"):
            status("validating on onnxruntime")
            entry["validation"]["onnxruntime"] = reference.check(
                OnnxRuntimeSession(folder), "onnxruntime", precision=precision,
                **tolerance(spec.name, precision, atols))
        entry["files"] += [f.name for f in files]
        if model is fp32 and openvino_converts_traced_graph(options):
            # The file just written is the graph OpenVINO converts: it reads it from there, and the 3.4 GB of a
            # full-size UNet's weights need not stay in memory meanwhile.
            traced_file, fp32 = folder / "model.onnx", None
        model = None

    if "openvino" in formats:
        from diffship.exporters import openvino as ov_export

        status("converting to OpenVINO")
        if traced_file is not None:
            ov_model, source_passes = ov_export.convert_file(traced_file), []
        else:
            source, source_passes = openvino_source(options, spec.name, fp32, reference.feeds)
            ov_model = ov_export.convert(source)
        fp32 = source = None  # OpenVINO holds its own copy of the weights now
        precision = options.precision(spec.name, "openvino")
        applied = list(source_passes)
        if precision == "hybrid":
            if not calibration:
                raise ValueError("hybrid quantization needs calibration feeds for the unet")
            ov_model = ov_export.hybrid_quantize(ov_model, calibration)
            applied.append("nncf_hybrid_int8")
        elif precision in ("int8", "int4"):
            ov_model = ov_export.compress_weights(ov_model, precision)
            applied.append(f"nncf_{precision}_weights")
        status("writing OpenVINO IR")
        files = ov_export.save(ov_model, folder, compress_to_fp16=precision == "fp16")
        ov_model = None  # validation compiles the saved IR: not two copies of the weights at once
        if precision == "fp16":
            applied.append("fp16_ir")
        entry["passes"] += [{"format": "openvino", "pass": p} for p in applied]
        entry["precision"]["openvino"] = precision
        status("validating on openvino")
        entry["validation"]["openvino"] = reference.check(
            OpenVINOSession(files[0]), "openvino", precision=precision, **tolerance(spec.name, precision, atols))
        entry["files"] += [f.name for f in files]

    logger.info("exported %s: %s", spec.name, {b: v["max_abs"] for b, v in entry["validation"].items()})
    return entry
