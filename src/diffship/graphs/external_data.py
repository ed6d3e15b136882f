"""Saving ONNX models, with weights in one `model.onnx_data` file once a graph passes the protobuf limit.

The weights are written tensor by tensor (`save_model`): a graph whose weights are still in the tracer's files is
copied from them in chunks, never loaded, and a graph in memory gives up each tensor's bytes as they are written
when its caller drops it afterwards. onnx's own writer (onnx.save_model with external data) holds the graph's
weights and then reads them all back; for a full-size UNet that was a second 3.4 GB (SD 1.5) to 10 GB (SDXL) at the
export's peak. The files are laid out as onnx's writer lays them out: tensors in initializer order, back to back.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import onnx
from onnx.external_data_helper import load_external_data_for_model, load_external_data_for_tensor

# Protobuf cannot serialise a message over 2 GiB; graphs past it keep their weights beside them.
TWO_GB = 2**31 - 1
EXTERNAL_DATA_FILE = "model.onnx_data"
_CHUNK = 64 * 2**20  # bytes copied at a time from a tracer's weight file


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _external_length(tensor: onnx.TensorProto, base_dir: Path | None) -> int:
    """Bytes of an external tensor: its `length`, or (as torch.onnx's tracer writes one file per tensor without
    one) its file's size past its offset."""
    info = _external_info(tensor)
    if "length" in info:
        return int(info["length"])
    if base_dir is None:
        return 0
    try:
        return os.path.getsize(base_dir / info["location"]) - int(info.get("offset", 0))
    except OSError:
        return 0


def graphs(model: onnx.ModelProto):
    """The graph and its subgraphs (If / Loop bodies), depth first, each before the subgraphs of its nodes: the
    order onnx's writer visits them in."""
    def walk(graph):
        yield graph
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    for subgraph in attribute.graphs:
                        yield from walk(subgraph)

    yield from walk(model.graph)


def initializers(model: onnx.ModelProto):
    """Every initializer of the graph and of its subgraphs, as onnx's writer visits them."""
    for graph in graphs(model):
        yield from graph.initializer


def attribute_tensors(model: onnx.ModelProto):
    """Every tensor held by a node attribute (Constant values), of the graph and its subgraphs."""
    for graph in graphs(model):
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    yield attribute.t
                elif attribute.type == onnx.AttributeProto.TENSORS:
                    yield from attribute.tensors


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def weights_as_inputs(model: onnx.ModelProto, base_dir: str | Path | None = None,
                      max_elements: int = 1024) -> onnx.ModelProto:
    """A copy of `model` for shape or type inference, which needs the weights' types and shapes only: every
    initializer past `max_elements` becomes a graph input of its type and shape; the small ones (Reshape targets
    and the like, whose values inference reads) stay, those in external data read from `base_dir` (without it,
    they become inputs too). `model` is left as it is, its weights never loaded."""
    from onnx import helper

    small, weights = [], []
    for tensor in model.graph.initializer:
        if math.prod(tensor.dims) > max_elements or (is_external(tensor) and base_dir is None):
            weights.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        if is_external(copy):
            load_external_data_for_tensor(copy, str(base_dir))
            copy.data_location = onnx.TensorProto.DEFAULT  # the data is in the proto now
            del copy.external_data[:]
        small.append(copy)
    graph = helper.make_graph(model.graph.node, model.graph.name, [*model.graph.input, *weights],
                              model.graph.output, small, value_info=model.graph.value_info)
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version,
                             functions=model.functions)


def tensor_bytes(model: onnx.ModelProto, base_dir: str | Path | None = None) -> int:
    """Bytes held by initializers, counting those already stored as external data (beside the graph in
    `base_dir`, for files that do not state their length)."""
    base_dir = Path(base_dir) if base_dir is not None else None
    total = 0
    for tensor in model.graph.initializer:
        if is_external(tensor):
            total += _external_length(tensor, base_dir)
        else:
            total += len(tensor.raw_data) or tensor.ByteSize()
    return total


def save_model(model: onnx.ModelProto, path: str | Path, external_data_threshold: int = TWO_GB,
               size_threshold: int = 1024, *, base_dir: str | Path | None = None, keep: bool = True) -> list[Path]:
    """Write `model` to `path`; weights go to one external file when the graph exceeds the threshold.

    Tensors under `size_threshold` bytes stay in the graph (0: every tensor goes to the file, as swappable LoRA
    weights must). `base_dir`: where the tensors `model` holds as external data lie (torch.onnx's tracer writes
    a graph past 2 GB as one file per tensor); they are copied from there chunk by chunk.

    `keep=True` (the default) leaves `model` as it was: the tensors it held in memory are read back from the
    written file (the page cache still holds them), and those it held as external data point at `base_dir`
    again, so that the next user of the same in-memory graph (the OpenVINO conversion of an export to both
    formats) does not find weights pointing at a file of another directory. `keep=False`, for a caller that drops
    `model` afterwards: each tensor is moved out as it is written and left pointing at the written file, so its
    weights are never held twice. Returns the files written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base_dir = Path(base_dir) if base_dir is not None else None
    # Constant values stay in the graph, as onnx's writer leaves them (torch.onnx's tracer writes large ones out too).
    for tensor in attribute_tensors(model):
        if is_external(tensor):
            if base_dir is None:
                raise ValueError("save_model: the graph has external data; give base_dir, where its files lie")
            load_external_data_for_tensor(tensor, str(base_dir))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    external = [t for t in initializers(model) if is_external(t)]
    if tensor_bytes(model, base_dir) <= external_data_threshold:
        if external:  # a tracer's external weights under the threshold: the graph holds them again
            if base_dir is None:
                raise ValueError("save_model: the graph has external data; give base_dir, where its files lie")
            saved = [(t, list(t.external_data)) for t in external]
            load_external_data_for_model(model, str(base_dir))
            onnx.save_model(model, str(path))
            if keep:
                for tensor, entries in saved:
                    tensor.ClearField("raw_data")
                    _point_at(tensor, entries)
        else:
            onnx.save_model(model, str(path))
        return [path]
    if external and base_dir is None:
        raise ValueError("save_model: the graph has external data; give base_dir, where its files lie")

    data_path = path.parent / EXTERNAL_DATA_FILE
    moved = []  # (tensor, its external entries before, or None where it held its bytes in memory)
    with open(data_path, "wb") as data:
        for tensor in initializers(model):
            offset = data.tell()
            if is_external(tensor):
                info = _external_info(tensor)
                _copy(base_dir / info["location"], int(info.get("offset", 0)), _external_length(tensor, base_dir),
                      data)
                moved.append((tensor, list(tensor.external_data)))
            elif tensor.HasField("raw_data"):
                raw = tensor.raw_data
                if sys.getsizeof(raw) < size_threshold:  # onnx's writer's rule for what stays in the graph
                    continue
                data.write(raw)
                raw = None
                tensor.ClearField("raw_data")
                moved.append((tensor, None))
            else:
                continue
            _point_at(tensor, [("location", EXTERNAL_DATA_FILE), ("offset", str(offset)),
                               ("length", str(data.tell() - offset))])
    onnx.save_model(model, str(path))
    if keep:
        for tensor, entries in moved:
            if entries is not None:
                _point_at(tensor, entries)
            else:  # a tensor it held in memory: read back from the file
                load_external_data_for_tensor(tensor, str(path.parent))
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
    return [path, data_path]


def _point_at(tensor: onnx.TensorProto, entries) -> None:
    """Make `tensor` external data at `entries` ((key, value) pairs or StringStringEntryProtos)."""
    entries = [(e.key, e.value) if hasattr(e, "key") else e for e in entries]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _copy(source: Path, offset: int, length: int, out) -> None:
    with open(source, "rb") as f:
        f.seek(offset)
        while length > 0:
            chunk = f.read(min(_CHUNK, length))
            if not chunk:
                raise OSError(f"{source} ends {length} bytes before the tensor it holds")
            out.write(chunk)
            length -= len(chunk)
