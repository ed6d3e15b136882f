"""Which graph weight holds which PyTorch layer's weight: the map that makes an export's LoRA weights swappable at
run time (`export(..., swappable_lora=True)`; the runtime side is pipelines/lora.py).

The graphs do not keep PyTorch's names: the TorchScript exporter folds a Linear's weight into a transposed MatMul
initializer named `onnx::MatMul_1234`, OpenVINO names its constants `Constant_5678`. So layers are found by value:
each Linear, Conv2d and Embedding weight of the PyTorch component (as it is and transposed, in the export's
dtype) is hashed before tracing, and each weight of the written graph file is hashed where it lies in its weights
file. The map records, per layer path (diffusers' module names, which LoRA files name), the graph weight's name
and where its bytes are (file, offset, dtype, shape, transposed or not), so that the torch-free runtime reads the
base weight from the file and hands the runtime a replacement by name.

Layers whose weights are not in the graph as they are (packed by a fusion, quantized) cannot be swapped: the export
refuses the combination up front, and a layer still not found is an error, never a silent gap.
"""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffship.errors import DiffshipError
from diffship.layout import LORA_WEIGHTS, ONNX_MODEL, OPENVINO_MODEL, OPENVINO_WEIGHTS

# The layer kinds LoRA adapts (PEFT's and kohya's targets), and the map's name for each.
KINDS = {"Linear": "linear", "Conv2d": "conv", "Embedding": "embedding"}
# OpenVINO IR element types of the weights that can be swapped.
_IR_DTYPES = {"f32": "float32", "f16": "float16"}


def _digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    return f"{hashlib.sha1(array.tobytes()).hexdigest()}:{array.dtype}:{array.shape}"


def layer_digests(model, dtype: str = "fp32") -> dict[str, dict]:
    """path -> {kind, shape, digests: {digest: transposed}} for every layer of `model` a LoRA can adapt, in the
    export's dtype ("fp32" or "fp16"), taken before the model is traced (and freed)."""
    dtype = np.float16 if dtype == "fp16" else np.float32
    layers = {}
    for path, module in model.named_modules():
        kind = KINDS.get(type(module).__name__)
        if kind is None or getattr(module, "weight", None) is None:
            continue
        weight = module.weight.detach().float().cpu().numpy()
        digests = {_digest(weight.astype(dtype)): False}
        if kind == "linear":  # the TorchScript exporter stores a Linear's weight transposed, for MatMul
            digests[_digest(weight.T.astype(dtype))] = True
        layers[path] = {"kind": kind, "shape": list(weight.shape), "digests": digests}
    return layers


@dataclass(frozen=True)
class GraphWeight:
    name: str
    file: str  # in the component folder
    offset: int
    dtype: str
    shape: tuple[int, ...]

    def read(self, folder: Path) -> np.ndarray:
        count = int(np.prod(self.shape))
        return np.fromfile(folder / self.file, self.dtype, count, offset=self.offset).reshape(self.shape)

    def to_map(self, transposed: bool) -> dict:
        return {"name": self.name, "file": self.file, "offset": self.offset, "dtype": self.dtype,
                "shape": list(self.shape), "transposed": transposed}


def onnx_weights(folder: Path) -> list[GraphWeight]:
    """The float weights of model.onnx that lie in its external data file (swappable exports write them all
    there)."""
    import onnx

    model = onnx.load(str(folder / ONNX_MODEL), load_external_data=False)
    found = []
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        if dtype not in (np.float32, np.float16):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        found.append(GraphWeight(tensor.name, info["location"], int(info.get("offset", 0)), dtype.name,
                                 tuple(tensor.dims)))
    return found


def openvino_weights(folder: Path) -> list[GraphWeight]:
    """The float constants of openvino_model.xml, from the IR's own record of where each lies in the .bin."""
    found = []
    for layer in ElementTree.parse(folder / OPENVINO_MODEL).getroot().iter("layer"):
        data = layer.find("data")
        if layer.get("type") != "Const" or data is None or data.get("element_type") not in _IR_DTYPES:
            continue
        shape = tuple(int(d) for d in data.get("shape", "").replace(" ", "").split(",") if d)
        found.append(GraphWeight(layer.get("name"), OPENVINO_WEIGHTS, int(data.get("offset")),
                                 _IR_DTYPES[data.get("element_type")], shape))
    return found


GRAPH_WEIGHTS = {"onnx": (ONNX_MODEL, onnx_weights), "openvino": (OPENVINO_MODEL, openvino_weights)}


def write_weight_map(folder: Path, component: str, layers: dict[str, dict]) -> dict:
    """Find each layer's weight in every graph file of `folder` and write lora_weights.json; return a summary for
    the report. A layer found in no weight, or in two, is an error: the map must be complete and unambiguous."""
    out = {"component": component, "layers": {}}
    for fmt, (graph_file, read) in GRAPH_WEIGHTS.items():
        if not (folder / graph_file).is_file():
            continue
        by_digest: dict[str, list[GraphWeight]] = {}
        for weight in read(folder):
            by_digest.setdefault(_digest(weight.read(folder)), []).append(weight)
        missing, shared = [], []
        for path, layer in layers.items():
            hits = [(weight, transposed) for digest, transposed in layer["digests"].items()
                    for weight in by_digest.get(digest, [])]
            if not hits:
                missing.append(path)
            elif len({w.name for w, _ in hits}) > 1:
                shared.append(path)
            else:
                entry = out["layers"].setdefault(path, {"kind": layer["kind"], "shape": layer["shape"]})
                entry[fmt] = hits[0][0].to_map(hits[0][1])
        if missing or shared:
            raise DiffshipError(
                f"swappable_lora: the {component} {fmt} graph does not hold "
                + (f"{len(missing)} layer weight(s) as they are (e.g. {missing[0]}): a graph pass changed them"
                   if missing else "")
                + (f"; {len(shared)} layer(s) have the same weights as another (e.g. {shared[0]})" if shared else "")
                + ". Export without the options that fuse or quantize weights."
            )
    (folder / LORA_WEIGHTS).write_text(json.dumps(out, indent=1) + "\n")
    return {"layers": len(out["layers"])}
