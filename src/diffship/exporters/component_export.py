"""One component, start to finish: trace, then each format's graph passes, write and validation (formats.py)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from diffship.exporters.components import ComponentSpec
from diffship.exporters.memory import release
from diffship.exporters.formats import EXPORT_FORMATS, Traced
from diffship.exporters.onnx import trace_onnx
from diffship.exporters.optimize import ExportOptions
from diffship.exporters.validate import DEFAULT_RTOL, Reference

logger = logging.getLogger(__name__)


def tolerance(spec: ComponentSpec, precision: str, atols: dict[str, float] | None) -> dict:
    """The bound a component is judged by: the user's atol if given, else its family's fp32 bound, or the
    precision's relative one."""
    if atols and spec.name in atols:
        return {"atol": atols[spec.name]}
    if precision == "fp32":
        return {"atol": spec.atol}
    return {"rtol": DEFAULT_RTOL[precision]}


def export_component(spec: ComponentSpec, folder: Path, formats: list[str], options: ExportOptions, opset: int,
                     external_data_threshold: int, atols: dict[str, float] | None = None,
                     calibration: list | None = None, status=None) -> dict:
    """Write `spec`'s graph(s) into `folder`; return its export_report.json entry. `status(text)`, when given, is
    told each stage as it starts (a full-size UNet spends minutes in some)."""
    status = status or (lambda text: None)
    for name in formats:  # shapes a format asks to be validated at, before the reference is computed
        more = EXPORT_FORMATS[name].validation_shapes
        for shapes in more(spec, options) if more is not None else []:
            if shapes not in spec.other_shapes:
                spec.other_shapes.append(shapes)
    status("PyTorch reference")
    reference = Reference(spec)
    entry = {"files": [], "inputs": list(spec.example_inputs), "outputs": spec.output_names, "precision": {},
             "passes": [], "validation": {}}
    # The tracer's weight files (a graph past 2 GB) stay in `scratch` until the formats have written theirs.
    with tempfile.TemporaryDirectory(prefix="diffship-trace-") as scratch:
        status("tracing")
        traced = Traced(spec, reference, trace_onnx(spec, opset, scratch), options, opset, external_data_threshold,
                        calibration, status, weights_dir=Path(scratch))
        if spec.release_after_trace:
            spec.module = None
            release()
        for name in formats:
            EXPORT_FORMATS[name].export(traced, folder, lambda precision: tolerance(spec, precision, atols), entry)
        traced = None
    logger.info("exported %s: %s", spec.name, {b: v["max_abs"] for b, v in entry["validation"].items()})
    return entry
