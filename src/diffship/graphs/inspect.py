"""What is in a graph or an exported directory: tensors, ops, parameters, size, precision, passes, validation.

Used by `diffship inspect`. Reads ONNX with `onnx` (weights not loaded) and OpenVINO IR with openvino; no torch.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from diffship.checks import check_fields, read_json_object
from diffship.errors import DiffshipError, NotAPipelineError
from diffship.layout import GRAPH_FILES, REPORT_FILE



def _size_on_disk(path: Path) -> int:
    """The graph file plus its weights (model.onnx_data / .bin)."""
    total = path.stat().st_size
    for sibling in (path.with_suffix(".onnx_data"), path.with_suffix(".bin"), path.parent / "model.onnx_data"):
        if sibling.is_file() and sibling != path:
            total += sibling.stat().st_size
            break
    return total


# export_report.json's sections that `format_inspection` reads, with their JSON types.
REPORT_FIELDS = {"components": dict, "options": dict, "passes": list, "formats": list}


def inspect_onnx(path: Path) -> dict:
    try:
        import onnx
    except ImportError as e:
        raise DiffshipError("inspecting ONNX files needs the onnx package: pip install onnx") from e
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and onnx's own errors for a truncated or foreign file
        raise DiffshipError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e}); export it again") from e
    names = {v: k for k, v in onnx.TensorProto.DataType.items()}

    def shape(value):
        dims = value.type.tensor_type.shape.dim
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]

    def io(values):
        return [{"name": v.name, "dtype": names.get(v.type.tensor_type.elem_type, "?").lower(), "shape": shape(v)}
                for v in values]

    params, dtypes = 0, Counter()
    for tensor in model.graph.initializer:
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        params += count
        dtypes[names.get(tensor.data_type, "?").lower()] += count
    ops = Counter(node.op_type for node in model.graph.node)
    return {
        "format": "onnx", "path": str(path), "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "inputs": io(model.graph.input), "outputs": io(model.graph.output),
        "ops": dict(ops.most_common()), "nodes": sum(ops.values()), "parameters": params,
        "weight_dtypes": dict(dtypes.most_common()), "size_bytes": _size_on_disk(path),
    }


def inspect_openvino(path: Path) -> dict:
    from diffship.runtimes.openvino import _ov, read_model

    model = read_model(_ov().Core(), path)

    def io(ports):
        return [{"name": p.get_any_name(), "dtype": p.get_element_type().get_type_name(),
                 "shape": [d.get_length() if d.is_static else "?" for d in p.get_partial_shape()]} for p in ports]

    ops, params, dtypes = Counter(), 0, Counter()
    for op in model.get_ops():
        ops[op.get_type_name()] += 1
        if op.get_type_name() == "Constant":
            shape = op.get_output_partial_shape(0)
            count = int(np.prod([d.get_length() for d in shape])) if shape.is_static and len(shape) else 1
            if count > 1:
                params += count
                dtypes[op.get_element_type().get_type_name()] += count
    return {
        "format": "openvino", "path": str(path), "inputs": io(model.inputs), "outputs": io(model.outputs),
        "ops": dict(ops.most_common()), "nodes": sum(ops.values()), "parameters": params,
        "weight_dtypes": dict(dtypes.most_common()), "size_bytes": _size_on_disk(path),
    }


def inspect_file(path: str | Path) -> dict:
    path = Path(path)
    if path.suffix == ".onnx":
        return inspect_onnx(path)
    if path.suffix == ".xml":
        return inspect_openvino(path)
    raise ValueError(f"{path}: give a model.onnx, an openvino_model.xml or an exported directory")


def inspect_path(path: str | Path) -> dict:
    """A model file, or an exported directory: every component's graphs plus export_report.json's figures."""
    path = Path(path)
    if not path.exists():
        raise NotAPipelineError(f"{path} does not exist")
    if path.is_file():
        return {"graphs": [inspect_file(path)]}
    report_path = path / REPORT_FILE
    report = read_report(report_path) if report_path.is_file() else {}
    graphs = [inspect_file(f) for folder in sorted(p for p in path.iterdir() if p.is_dir())
              for f in (folder / name for name in GRAPH_FILES) if f.is_file()]
    if not graphs:
        raise NotAPipelineError(f"{path} holds no model.onnx or openvino_model.xml in its component folders")
    return {"graphs": graphs, "report": report}


def read_report(path: Path) -> dict:
    """export_report.json, with the sections `format_inspection` reads type-checked (each component an object)."""
    report = read_json_object(path, REPORT_FIELDS)
    for name, entry in report.get("components", {}).items():
        if not isinstance(entry, dict):
            raise DiffshipError(f"{path}: components.{name} must be an object; fix or re-export the file")
        check_fields(entry, {"validation": dict, "passes": list}, f"{path} (components.{name})")
    return report


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def format_inspection(result: dict, max_ops: int = 8) -> str:
    lines = []
    report = result.get("report") or {}
    if report:
        options = report.get("options", {})
        lines.append(f"export of {report.get('source')} | formats {', '.join(report.get('formats', []))} | "
                     f"opset {report.get('opset')} | shapes {report.get('shapes')}")
        if options:
            lines.append("options: " + ", ".join(f"{k}={v}" for k, v in options.items() if v not in (None, False)))
        lines.append("passes: " + (", ".join(report.get("passes") or []) or "none"))
    for graph in result["graphs"]:
        component = Path(graph["path"]).parent.name
        lines.append("")
        lines.append(f"{component} [{graph['format']}] {graph['path']}")
        lines.append(f"  size {_mb(graph['size_bytes'])}, {graph['parameters']:,} parameters, {graph['nodes']} nodes"
                     + (f", opset {graph['opset']}" if graph.get("opset") else ""))
        lines.append("  weights: " + ", ".join(f"{k} {v:,}" for k, v in graph["weight_dtypes"].items()))
        for kind in ("inputs", "outputs"):
            for t in graph[kind]:
                lines.append(f"  {kind[:-1]:<6} {t['name']:<24} {t['dtype']:<8} {t['shape']}")
        top = list(graph["ops"].items())[:max_ops]
        lines.append("  ops: " + ", ".join(f"{k} {v}" for k, v in top) + (" ..." if len(graph["ops"]) > max_ops else ""))
        entry = report.get("components", {}).get(component)
        if entry:
            backend = "onnxruntime" if graph["format"] == "onnx" else "openvino"
            v = entry.get("validation", {}).get(backend)
            if v:
                lines.append(f"  validation {_figures(v)}")
            cpu = entry.get("onnxruntime_cpu")
            if graph["format"] == "onnx" and isinstance(cpu, dict) and cpu.get("validation"):
                lines.append(f"  cpu graph {cpu.get('file')} beside it ({cpu.get('multihead_attention')} attentions "
                             f"on MultiHeadAttention; what onnxruntime runs on the CPU): validation "
                             f"{_figures(cpu['validation'])}")
            engine, v = entry.get("tensorrt"), entry.get("validation", {}).get("tensorrt")
            if graph["format"] == "onnx" and isinstance(engine, dict) and v:  # built from this graph, beside it
                lines.append(f"  tensorrt engine {engine.get('engine')} for {engine.get('device')}, "
                             f"{engine.get('precision')}: validation {_figures(v)}")
            for p in entry.get("passes", []):
                if p["format"] == graph["format"]:
                    figures = f" max abs {p['max_abs']:.2e}" if "max_abs" in p else ""
                    lines.append(f"  pass {p['pass']}{figures}")
    return "\n".join(lines)


def _figures(v: dict) -> str:
    """A validation entry: `(fp32): max abs 1.2e-06, max rel 3.4e-07 (atol 0.001)`."""
    bound = f"atol {v['atol']:g}" if "atol" in v else f"rtol {v['rtol']:g}"
    return (f"({v.get('precision', 'fp32')}): max abs {v['max_abs']:.2e}, "
            f"max rel {v.get('max_rel', float('nan')):.2e} ({bound})")
