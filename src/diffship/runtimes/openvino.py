"""OpenVINO sessions: read IR (or ONNX), optionally reshape to static shapes, compile once."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffship.errors import BackendError
from diffship.layout import ONNX_MODEL, OPENVINO_MODEL, TIMESTEP
from diffship.runtimes.cache import cache_root, graph_key, remove_entry
from diffship.runtimes.base import TensorInfo, check_feeds, run_error


def _ov():
    try:
        import openvino
    except ImportError as e:
        raise BackendError("the openvino backend needs `pip install diffship[openvino]`") from e
    return openvino


def read_model(core, path: Path):
    """core.read_model(path), failing with a BackendError that names the file. A file that is not XML is refused
    before OpenVINO sees it: OpenVINO would offer it to each of its frontends in turn, and TensorFlow's prints
    its parse errors to stderr."""
    if path.suffix == ".xml":
        with open(path, "rb") as f:
            head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
        if not head.startswith(b"<"):
            raise BackendError(f"OpenVINO could not read {path}: it is not XML, as an OpenVINO IR is; export it again")
    try:
        return core.read_model(str(path))
    except Exception as e:  # OpenVINO raises RuntimeError with its own (multi-line) message for corrupt files
        raise BackendError(f"OpenVINO could not read {path}: {' '.join(str(e).split())}") from e


def float_timestep(model) -> bool:
    """Re-expose the float timestep beneath GenAI's form (exporters/openvino.genai_timestep: int64 [1], converted
    to float first thing), so that fractional timesteps reach the graph unrounded. True if the model was changed;
    other forms (Optimum's int64 [batch], broadcast before its Convert; float inputs) are left as they are."""
    import openvino.opset13 as ops

    for index, param in enumerate(model.get_parameters()):
        if TIMESTEP not in param.output(0).get_names():
            continue
        targets = list(param.output(0).get_target_inputs())
        convert = targets[0].get_node() if len(targets) == 1 else None
        if (param.get_element_type().is_real() or convert is None or convert.get_type_name() != "Convert"
                or not convert.get_output_element_type(0).is_real()):
            return False
        new = ops.parameter(param.get_partial_shape(), convert.get_output_element_type(0), name=TIMESTEP)
        for target in list(convert.output(0).get_target_inputs()):
            target.replace_source_output(new.output(0))
        param.output(0).set_names(set())
        new.output(0).set_names({TIMESTEP})
        model.replace_parameter(index, new)
        model.validate_nodes_and_infer_types()
        return True
    return False


def float_timestep_ir(path: Path, folder: Path) -> Path | None:
    """The IR at `path` with its timestep taken back to float as a file OpenVINO compiles from: its XML (a few MB)
    rewritten into `folder` (the compile cache) beside a link to the export's weights, so that OpenVINO's compile
    cache keys on that file rather than hashing every weight of the model in memory (full-size SD 1.5 UNet, second
    load: 1.7 s instead of 3.2 s). The Parameter becomes float32 and the Convert after it converts float32 to
    float32, which compiles to nothing. None when the XML is not in the form genai_timestep writes, or the cache
    cannot be written: the session then compiles from memory."""
    import tempfile
    import xml.etree.ElementTree as ET

    weights = path.with_suffix(".bin")
    try:
        # Keyed as every cache entry is (the files' paths, sizes and modification times): a re-export rewrites it.
        target = folder / graph_key(path, "float-timestep") / OPENVINO_MODEL
        if target.is_file():
            return target
        tree = ET.parse(path)
        layers = {layer.get("id"): layer for layer in tree.iter("layer")}
        param = next((layer for layer in layers.values()
                      if layer.get("type") == "Parameter" and layer.get("name") == TIMESTEP), None)
        edges = [e for e in tree.iter("edge") if param is not None and e.get("from-layer") == param.get("id")]
        if param is None or param.find("data").get("element_type") != "i64" or len(edges) != 1:
            return None
        convert = layers[edges[0].get("to-layer")]
        if convert.get("type") != "Convert" or convert.find("data").get("destination_type") != "f32":
            return None
        param.find("data").set("element_type", "f32")
        param.find("output/port").set("precision", "FP32")
        for port in convert.find("input").iter("port"):
            if port.get("id") == edges[0].get("to-port"):
                port.set("precision", "FP32")
        # Written whole into a temporary folder and renamed: a reader never sees half a file.
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=".partial-"))
        tree.write(staging / OPENVINO_MODEL, encoding="utf-8", xml_declaration=True)
        (staging / OPENVINO_MODEL).with_suffix(".bin").symlink_to(weights.resolve())
        try:
            staging.rename(target.parent)
        except OSError:  # another process wrote it first
            remove_entry(staging)
        return target if target.is_file() else None
    except (OSError, ET.ParseError, AttributeError, KeyError):
        return None


def _info(port, name: str) -> TensorInfo:
    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    return TensorInfo(name, np.dtype(port.get_element_type().to_dtype()), shape)


def _port_name(port, index: int) -> str:
    names = port.get_names()
    # A port can carry several names; the graph's original name is the one the pipelines use.
    return port.get_any_name() if names else f"output_{index}"


class OpenVINOSession:
    """An OpenVINO model behind the Session protocol. Compiled on first run, after any `reshape`."""

    backend = "openvino"
    can_reshape = True
    can_swap_weights = True

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "CPU",
        cache_dir=None,
        config: dict | None = None,
        inference_precision: str | None = "f32",
        static_shapes: bool = False,
        core=None,
    ):
        ov = _ov()
        path = Path(path)
        if path.is_dir():
            candidates = [path / OPENVINO_MODEL, path / ONNX_MODEL]
            path = next((c for c in candidates if c.is_file()), candidates[0])
        if not path.is_file():
            raise BackendError(f"no OpenVINO model at {path}: export with --backend openvino (or give model.onnx)")
        if path.suffix == ".xml" and not path.with_suffix(".bin").is_file():
            raise BackendError(f"{path} has no weights file {path.with_suffix('.bin').name} beside it")
        self.path = str(path)
        self.config: dict = {}  # the component's config.json, set by the pipeline (OpenVINO's properties: _config)
        self.device = device
        self._core = core or ov.Core()
        self._config = dict(config or {})
        # OpenVINO's CPU plugin runs fp32 graphs in bf16 on CPUs that have it; images then drift from PyTorch.
        # A session alone is exact (f32); the pipelines choose per component from what the export measured
        # (pipelines/precision.py). None leaves the plugin's choice.
        if inference_precision is not None:
            self._config.setdefault("INFERENCE_PRECISION_HINT", inference_precision)
        self.inference_precision = str(self._config.get("INFERENCE_PRECISION_HINT", "default"))
        # Compiled graphs are cached on disk (runtimes/cache.py): a second load of the same graph skips compiling.
        root = cache_root(cache_dir)
        if root is not None and "CACHE_DIR" not in self._config:
            # One folder per inference precision: the full suite once read a blob compiled in bf16 for a session
            # asking f32 (images 2e-3 off, and NaN the other way round); separate folders cannot mix them.
            folder = "".join(c for c in self.inference_precision if c.isalnum())
            self._config["CACHE_DIR"] = str(root / "openvino" / folder)
        # Static shapes compile to faster code on CPU. static_shapes=True: each run compiles for its input shapes;
        # "auto" (the pipelines' default): only for the shapes `fit` was given (the pipelines fit a request when it
        # repeats, or when pipe.compile is given one), other shapes run dynamic. The graph's declared inputs
        # stay dynamic, so any shape it allows can come next; one static model is kept, compiles cached on disk.
        if static_shapes not in (False, True, "auto"):
            raise BackendError(f"static_shapes must be False, True or 'auto', got {static_shapes!r}")
        self.static_shapes = static_shapes
        self._model = read_model(self._core, path)
        self._path = path  # the file compiled from; self.path stays the export's
        # The graph compiled differs from the file: reshape() fixed shapes it does not have, or its timestep was
        # taken back to float (float_timestep), unless the compile cache holds that graph as a file too.
        self._reshaped = float_timestep(self._model)
        if self._reshaped and root is not None and path.suffix == ".xml":
            rewritten = float_timestep_ir(path, root / "openvino" / "graphs")
            if rewritten is not None:
                self._path, self._reshaped = rewritten, False
        self._declared = {p.get_any_name(): p.get_partial_shape() for p in self._model.inputs}
        self._weights: dict[str, np.ndarray] = {}  # constants swap_weights replaced, by friendly name
        self._dynamic = None  # (compiled model, infer request) at the declared shapes
        self._static = None  # (shapes, compiled model, infer request)
        self._describe()

    def _describe(self) -> None:
        self.inputs = [_info(p, p.get_any_name()) for p in self._model.inputs]
        self.outputs = [_info(p, _port_name(p, i)) for i, p in enumerate(self._model.outputs)]

    def reshape(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Fix input shapes (static shapes compile to faster code on CPU). Triggers a recompile."""
        known = {i.name for i in self.inputs}
        unknown = set(shapes) - known
        if unknown:
            raise BackendError(f"{self.path}: cannot reshape unknown inputs {sorted(unknown)}; inputs are {sorted(known)}")
        self._graph().reshape({name: list(shape) for name, shape in shapes.items()})
        self._declared = {p.get_any_name(): p.get_partial_shape() for p in self._model.inputs}
        self._reshaped = True
        self._dynamic = self._static = None
        self._describe()

    def fit(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Compile for these input shapes, without changing the inputs the session declares: the compiled model
        for the last shapes fitted is kept (static_shapes)."""
        shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        if self._static is None or self._static[0] != shapes:
            self._static = None  # one static model at a time: its weights are not held twice
            try:
                self._static = (shapes, *self._compile(shapes))
            finally:
                self.release_graph()

    def compile(self) -> None:
        """Compile now (the graph's declared shapes) unless a model is compiled already."""
        if self._static is None:
            self._compiled_dynamic()

    def swap_weights(self, values: dict[str, np.ndarray]) -> None:
        """Compile with these constants (by friendly name) in place of the file's, from then on; `{}`: the
        file's own again. The next run compiles."""
        if not values and not self._weights:
            return
        self._weights = dict(values)
        self._dynamic = self._static = None
        self.release_graph()
        if values:
            self._graph()  # an unknown name or a wrong shape fails here, not at the next run

    def _compiled_dynamic(self):
        """(compiled model, request) at the declared shapes, compiled on first use."""
        if self._dynamic is None:
            self._dynamic = self._compile()
            self.release_graph()
        return self._dynamic

    def _compile(self, shapes: dict | None = None):
        """Compile the graph at its declared shapes, or reshaped to `shapes`. At the declared shapes of the file
        itself, OpenVINO is given the path: its compile cache then keys on the file rather than hashing every
        weight of a model in memory (a second load of a full-size UNet: 3 s instead of 5)."""
        if shapes is None and not self._reshaped and not self._weights:
            self.release_graph()
            model = str(self._path)
        else:
            model = self._graph()
            if shapes is not None:
                model.reshape({name: list(shape) for name, shape in shapes.items()})
        # Swapped weights are not cached: each adapter state would leave a compiled blob of the model behind.
        config = {k: v for k, v in self._config.items() if not (self._weights and k == "CACHE_DIR")}
        try:
            compiled = self._core.compile_model(model, self.device, config)
        except Exception as e:
            if "CACHE_DIR" not in config:
                raise BackendError(f"OpenVINO could not compile {self.path} for {self.device}: {e}") from e
            # Writing the compile cache may be what failed (a full disk): compile without it.
            self._config.pop("CACHE_DIR")
            return self._compile(shapes)
        return compiled, compiled.create_infer_request()

    def _graph(self):
        """The model to reshape or compile, read again (weights memory-mapped, so it costs little) if it was
        dropped: once compiled, the compiled model holds what it needs, and the read model would keep a second
        copy of the weights mapped (a full-size UNet: 3.4 GB)."""
        if self._model is None:
            self._model = read_model(self._core, self._path)
            float_timestep(self._model)
            self._model.reshape(self._declared)
            if self._weights:
                _replace_constants(self._model, self._weights, self.path)
        return self._model

    def release_graph(self) -> None:
        """Drop the read model (see _graph); the next reshape or compile reads it again."""
        self._model = None

    def _compiled_for(self, shapes: dict[str, tuple[int, ...]]):
        """(compiled model, request) to run `shapes` on: with static_shapes True, compiled for these shapes; with
        "auto", the static model when they are the shapes fitted (the pipelines fit the requests that repeat), the
        graph's declared (dynamic) shapes otherwise."""
        if self.static_shapes is True or (self.static_shapes and self._static and self._static[0] == shapes):
            self.fit(shapes)
            return self._static[1:]
        return self._compiled_dynamic()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self, feeds)
        compiled, request = self._compiled_for({name: tuple(np.shape(value)) for name, value in feeds.items()})
        try:
            results = request.infer(feeds, share_inputs=False, share_outputs=False)
        except Exception as e:  # OpenVINO raises RuntimeError (or its own types) with the plugin's message
            raise run_error(self, feeds, e) from e
        return {info.name: np.asarray(results[port]) for info, port in zip(self.outputs, compiled.outputs)}

    def settings(self) -> dict:
        """The compiled model's precision, performance hint, streams and threads (compiles it if need be)."""
        self.compile()
        compiled = (self._static or self._dynamic)[-2]
        out = {"static_shapes": self.static_shapes}
        for key in ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS"):
            try:
                out[key] = str(compiled.get_property(key))
            except Exception:  # a property this device does not report
                pass
        return out

    def __repr__(self) -> str:
        return f"OpenVINOSession({self.path!r}, device={self.device!r})"


def _replace_constants(model, values: dict[str, np.ndarray], path: str) -> None:
    """Replace the model's constants named in `values` (friendly names) by new ones holding those arrays."""
    ov = _ov()
    constants = {op.get_friendly_name(): op for op in model.get_ops()
                 if op.get_type_name() == "Constant" and op.get_friendly_name() in values}
    for name, value in values.items():
        old = constants.get(name)
        if old is None:
            raise BackendError(f"{path} has no constant {name} to replace")
        value = np.ascontiguousarray(value)
        shape, dtype = tuple(int(d) for d in old.get_output_shape(0)), old.get_element_type().to_dtype()
        if shape != value.shape or dtype != value.dtype:
            raise BackendError(f"{path}: constant {name} is {old.get_element_type()} {old.get_output_shape(0)}, "
                               f"the replacement {value.dtype} {list(value.shape)}")
        new = ov.op.Constant(value, shared_memory=False)
        new.set_friendly_name(name)
        old.output(0).replace(new.output(0))


def has_bf16(core=None) -> bool:
    """Whether OpenVINO's CPU plugin computes bf16 on this CPU (AVX512-BF16 or AMX): where it does not, a bf16
    inference precision falls back to f32."""
    ov = _ov()
    try:
        return "BF16" in (core or ov.Core()).get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - no CPU plugin: nothing runs bf16
        return False
