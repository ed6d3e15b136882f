"""The inference precision each component runs in, and whether OpenVINO compiles it for each request's shapes.

OpenVINO's CPU plugin can run an fp32 graph in bf16 (AVX512-BF16, AMX): about twice as fast, and less exact. The
export measured each component's bf16 error against PyTorch and recorded whether it is within the bound
(export_report.json, "inference_precision"; exporters/formats.py). `inference_precision="auto"`, the default, runs
bf16 where that says so and the CPU has bf16, f32 elsewhere; "f32" is the exact path (parity with PyTorch); "bf16"
or "f16" ask for that precision everywhere; "default" (or None) leaves the plugin's own choice, as Optimum Intel
does. A dict sets components one by one ({"vae_decoder": "f32"}), the others "auto". ONNX Runtime's CPU provider
computes fp32 graphs in fp32: only "auto" and "f32" mean anything there.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffship.errors import DiffshipError
from diffship.layout import GRAPH_COMPONENTS, REPORT_FILE

INFERENCE_PRECISIONS = ("auto", "f32", "bf16", "f16", "default")
EXACT = "f32"


def check_inference_precision(value, backend: str) -> dict | str:
    """The argument as given, checked: a name of INFERENCE_PRECISIONS (None: "default") or {component: name}."""
    if value is None:
        value = "default"
    values = value.values() if isinstance(value, dict) else [value]
    for v in values:
        if v not in INFERENCE_PRECISIONS and v is not None:
            raise DiffshipError(f"inference_precision must be one of {', '.join(INFERENCE_PRECISIONS)} (or a dict "
                                f"of them per component), got {v!r}")
    if isinstance(value, dict):
        unknown = set(value) - set(GRAPH_COMPONENTS)
        if unknown:
            raise DiffshipError(f"inference_precision given for unknown components {sorted(unknown)}; components: "
                                f"{', '.join(GRAPH_COMPONENTS)}")
    if backend != "openvino" and any(v not in ("auto", EXACT) for v in values):
        raise DiffshipError(f"inference_precision {value!r}: {backend} computes fp32 graphs in fp32; bf16 and f16 "
                            "inference are OpenVINO's (--backend openvino), or export with --dtype fp16")
    return value


def measured_choices(model_dir: Path | None) -> dict[str, str]:
    """{component: "bf16" | "f32"} as the export measured them on OpenVINO; empty for exports without the
    measurement (older diffship exports, Optimum's)."""
    path = Path(model_dir) / REPORT_FILE if model_dir is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        components = json.loads(path.read_text()).get("components", {})
    except (OSError, ValueError, AttributeError):
        return {}  # the report is a record, not an input: an unreadable one only loses the measured choice
    choices = {}
    for name, entry in components.items() if isinstance(components, dict) else ():
        choice = ((entry or {}).get("inference_precision") or {}).get("openvino", {}).get("choice")
        if choice in ("bf16", EXACT):
            choices[name] = choice
    return choices


def resolve(value, names, model_dir: Path | None) -> dict[str, str | None]:
    """{component: the OpenVINO INFERENCE_PRECISION_HINT to compile with (None: the plugin's choice)}."""
    from diffship.runtimes.openvino import has_bf16

    per_component = value if isinstance(value, dict) else {}
    default = "auto" if isinstance(value, dict) else value
    measured = measured_choices(model_dir)
    bf16_here = has_bf16()
    out = {}
    for name in names:
        wanted = per_component.get(name, default)
        if wanted == "auto":
            wanted = measured.get(name, EXACT) if bf16_here else EXACT
        out[name] = None if wanted in ("default", None) else wanted
    return out


def session_options(names, model_dir: Path | None, backend: str, inference_precision, static_shapes) -> dict:
    """{component: the session options these two arguments give} for `backend`; errors name the argument."""
    value = check_inference_precision(inference_precision, backend)
    if static_shapes not in (None, True, False):
        raise DiffshipError(f"static_shapes must be True, False or None (the backend's default), got {static_shapes!r}")
    if backend != "openvino":
        if static_shapes:
            raise DiffshipError(f"static_shapes: {backend} takes every shape as it comes; static shapes are "
                                "OpenVINO's (--backend openvino)")
        return {name: {} for name in names}
    static = "auto" if static_shapes is None else static_shapes
    precisions = resolve(value, names, model_dir)
    return {name: {"inference_precision": precisions[name], "static_shapes": static} for name in names}
