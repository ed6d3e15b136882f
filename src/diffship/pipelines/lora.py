"""LoRA at run time, without re-exporting: diffusers' LoRA methods on the numpy pipelines.

An export made with `swappable_lora=True` writes, beside each graph LoRA adapts (the UNet and the text encoders),
`lora_weights.json`: for every Linear, Conv2d and Embedding layer (diffusers' module path), the graph weight that
holds it, where its bytes lie in the weights file, and whether it is stored transposed (graphs/weight_map.py). A
LoRA file read here (safetensors; diffusers/PEFT and kohya formats) gives, per layer, a low-rank update
`delta = up @ down * alpha / rank`; the pipeline's adapters, their weights and what is fused give each layer's
weight `base + sum(weight_a * delta_a)`, and the component's session is rebuilt with those graph weights in place
of the file's (`Session.swap_weights`: ONNX Runtime's external initializers, OpenVINO constants replaced before
compiling). With no adapter left, the sessions load the export's own weights again: the base model's images, bit
for bit.

diffusers' semantics are kept: `load_lora_weights` adds an adapter and makes it the only active one;
`set_adapters(names, adapter_weights)` chooses the active ones and their weights; `fuse_lora(lora_scale)` merges
the active adapters into the base weights (they stay merged through `unload_lora_weights`, until `unfuse_lora`);
`disable_lora` / `enable_lora`; `delete_adapters`. Fusing is bookkeeping here (the graph weights are merged either
way), kept so that a script written for diffusers gives the same images.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffship.errors import DiffshipError
from diffship.layout import LORA_COMPONENTS, LORA_WEIGHTS

# Prefixes of kohya / Automatic1111 keys, per component (`lora_te_` is SD 1.x/2.x's text encoder, `lora_te1_`
# and `lora_te2_` SDXL's two).
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
# A kohya key: <prefix><module with '_' for '.'>.<lora_down|lora_up>.weight or .alpha
_KOHYA_KEY = re.compile(r"^(lora_unet_|lora_te1_|lora_te2_|lora_te_)(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
# A diffusers / PEFT key: <component>.<module>.lora_A.weight or lora_B.weight
_PEFT_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora_(A|B)\.weight$")
# Adapter kinds LoRA files may hold that are not plain low-rank updates.
_NOT_LORA = ("hada_", "lokr_", "dora_scale", "lora_magnitude_vector", ".diff", "lora_mid")


def parse_lora_flag(text: str) -> tuple[str, float]:
    """`--lora FILE[:SCALE]` (export and generate) -> (FILE, SCALE); a last ':' part that is not a number belongs
    to the file name."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


@dataclass
class _Layer:
    down: np.ndarray  # [rank, in, (kh, kw)]
    up: np.ndarray  # [out, rank, (1, 1)]
    alpha: float | None = None

    def delta(self, shape) -> np.ndarray:
        """The layer's weight update, in the PyTorch weight's layout, at scale 1."""
        rank = self.down.shape[0]
        scale = (self.alpha / rank) if self.alpha is not None else 1.0
        update = self.up.reshape(self.up.shape[0], rank).astype(np.float32) @ \
            self.down.reshape(rank, -1).astype(np.float32)
        return (update * np.float32(scale)).reshape(shape)


@dataclass
class _Adapter:
    file: str
    layers: dict[str, dict[str, _Layer]]  # component -> module path -> layer


@dataclass
class LoraState:
    adapters: dict[str, _Adapter] = field(default_factory=dict)
    active: dict[str, float] = field(default_factory=dict)  # adapter -> weight, in set_adapters' order
    fused: dict[str, float] = field(default_factory=dict)  # adapter -> weight it was fused at
    fused_layers: dict[str, dict[str, _Layer]] = field(default_factory=dict)  # fused adapters' layers, kept
    enabled: bool = True
    # Textual inversion (pipelines/textual_inversion.py): component -> {row of the token table: its vector}.
    rows: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    # (session id, component) -> the signature of what its weights hold (see _apply_adapters)
    applied: dict[tuple[int, str], tuple] = field(default_factory=dict)


class LoraLoaderMixin:
    """diffusers' LoRA methods for pipelines whose export was made with `swappable_lora=True`."""

    def _lora_state(self) -> LoraState:
        if getattr(self, "_lora", None) is None:
            self._lora = LoraState()
        return self._lora

    def _lora_maps(self) -> dict[str, dict]:
        """component -> its lora_weights.json, for the components this pipeline holds; an error naming what to
        do when the export was not made swappable."""
        maps = {}
        for name in LORA_COMPONENTS:
            session = getattr(self, name, None)
            if session is None:
                continue
            path = Path(session.path).parent / LORA_WEIGHTS
            if not path.is_file():
                raise DiffshipError(
                    f"run-time LoRA needs an export made with --swappable-lora (swappable_lora=True): {path} "
                    f"does not exist. Export again with it, or bake the LoRA in with --lora FILE[:SCALE]")
            if not session.can_swap_weights:
                raise DiffshipError(f"the {session.backend} backend cannot swap weights at run time: load the "
                                    "pipeline with backend='onnxruntime' or 'openvino' for run-time LoRA")
            maps[name] = json.loads(path.read_text())
        return maps

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          **kwargs) -> None:
        """Load a LoRA (a .safetensors file, a folder holding `weight_name` or pytorch_lora_weights.safetensors,
        or a state dict of numpy arrays) as adapter `adapter_name` (default "default_N"), which becomes the
        active adapter at weight 1, as in diffusers."""
        unknown = set(kwargs) - {"weight_name"}
        if unknown:
            raise TypeError(f"load_lora_weights got unexpected arguments {sorted(unknown)}")
        state = self._lora_state()
        maps = self._lora_maps()
        if adapter_name is None:
            adapter_name = f"default_{len(state.adapters) + len(set(state.fused) - set(state.adapters))}"
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
        if adapter_name in state.adapters or adapter_name in state.fused:
            raise ValueError(f"Adapter name {adapter_name} already in use in the pipeline: choose another "
                             "adapter_name, or delete_adapters it first")
        tensors, file = _read_lora(pretrained_model_name_or_path_or_dict, kwargs.get("weight_name"))
        layers = _layers(tensors, file, maps)
        state.adapters[adapter_name] = _Adapter(file, layers)
        state.active = {adapter_name: 1.0}
        self._apply_adapters()

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Make these adapters (a name or a list) the active ones, at `adapter_weights` (a number for all, or
        one per adapter; default 1)."""
        state = self._lora_state()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [n for n in names if n not in state.adapters]
        if missing:
            raise ValueError(f"Adapter name(s) {missing} not in the list of present adapters: "
                             f"{sorted(state.adapters)}")
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (int, float)):
            weights = [float(adapter_weights)] * len(names)
        else:
            weights = list(adapter_weights)
            if len(weights) != len(names):
                raise ValueError(f"Length of adapter names {len(names)} is not equal to the length of their "
                                 f"weights {len(weights)}")
        for weight in weights:
            if isinstance(weight, dict):
                raise DiffshipError("per-block adapter weights (dicts) are not supported at run time: give one "
                                    "number per adapter")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight):
                raise ValueError(f"adapter_weights must be finite numbers, got {weight!r}")
        state.active = {name: float(w) for name, w in zip(names, weights)}
        self._apply_adapters()

    def get_active_adapters(self) -> list[str]:
        return list(self._lora_state().active) if self._lora_state().enabled else []

    def get_list_adapters(self) -> dict[str, list[str]]:
        """component -> the adapters that adapt it, as diffusers lists them."""
        out: dict[str, list[str]] = {}
        for name, adapter in self._lora_state().adapters.items():
            for component in adapter.layers:
                out.setdefault(component, []).append(name)
        return out

    def delete_adapters(self, adapter_names) -> None:
        state = self._lora_state()
        for name in [adapter_names] if isinstance(adapter_names, str) else list(adapter_names):
            if name not in state.adapters:
                raise ValueError(f"Adapter {name} is not loaded: present adapters are {sorted(state.adapters)}")
            del state.adapters[name]
            state.active.pop(name, None)
        self._apply_adapters()

    def disable_lora(self) -> None:
        self._lora_state().enabled = False
        self._apply_adapters()

    def enable_lora(self) -> None:
        self._lora_state().enabled = True
        self._apply_adapters()

    def fuse_lora(self, components=None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names=None) -> None:
        """Merge the active adapters (or `adapter_names`), at their weights times `lora_scale`, into the base
        weights. `components` and `safe_fusing` are accepted as diffusers has them (every component is fused;
        NaNs are checked in any case)."""
        state = self._lora_state()
        names = list(state.active) if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
        for name in names:
            if name not in state.adapters:
                raise ValueError(f"Adapter {name} is not loaded: present adapters are {sorted(state.adapters)}")
            state.fused[name] = state.fused.get(name, 0.0) + state.active.get(name, 1.0) * float(lora_scale)
            state.fused_layers[name] = state.adapters[name].layers
        self._apply_adapters()

    def unfuse_lora(self, components=None) -> None:
        """Take the fused adapters out of the base weights again."""
        state = self._lora_state()
        state.fused.clear()
        state.fused_layers.clear()
        self._apply_adapters()

    def unload_lora_weights(self) -> None:
        """Remove every adapter. What was fused stays in the weights, as in diffusers; with nothing fused, the
        sessions run the export's own weights again (the base model's images, bit for bit)."""
        state = self._lora_state()
        state.adapters.clear()
        state.active.clear()
        self._apply_adapters()

    def _apply_adapters(self) -> None:
        """Give each LoRA-adapted session the weights the adapters, their weights, what is fused and the textual
        inversion rows make."""
        state = self._lora_state()
        maps = self._lora_maps()
        contributions = [(("fused", name), weight, state.fused_layers[name]) for name, weight in state.fused.items()]
        if state.enabled:
            contributions += [(("active", name), weight, state.adapters[name].layers)
                              for name, weight in state.active.items() if name not in state.fused]
        for component, weight_map in maps.items():
            session = getattr(self, component)
            ours = [(label, weight, layers[component]) for label, weight, layers in contributions
                    if component in layers]
            rows = state.rows.get(component, {})
            # What the session holds now: a component whose adapters did not change is not rebuilt.
            signature = (tuple((label, weight) for label, weight, _ in ours), tuple(sorted(rows)))
            if state.applied.get((id(session), component)) == signature:
                continue
            updates: dict[str, np.ndarray] = {}
            for _, weight, layers in ours:
                for path, layer in layers.items():
                    delta = layer.delta(weight_map["layers"][path]["shape"]) * np.float32(weight)
                    updates[path] = updates[path] + delta if path in updates else delta
            if rows:
                table = token_table(weight_map)
                updates.setdefault(table, np.zeros(weight_map["layers"][table]["shape"], np.float32))
            session.swap_weights(_graph_values(session, weight_map, updates, rows))
            state.applied[(id(session), component)] = signature


def token_table(weight_map: dict) -> str:
    """The layer path of a text encoder's token embedding table in its map."""
    return next(path for path, entry in weight_map["layers"].items()
                if entry["kind"] == "embedding" and path.endswith("token_embedding"))


def _graph_values(session, weight_map: dict, updates: dict[str, np.ndarray],
                  rows: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """graph weight name -> value, for the layers `updates` changes: the base weight read from the export's file,
    plus the update, in the graph's layout and dtype; `rows`: rows of the token table set to these vectors."""
    fmt = "onnx" if session.backend == "onnxruntime" or Path(session.path).suffix == ".onnx" else "openvino"
    folder = Path(session.path).parent
    table = token_table(weight_map) if rows else None
    values = {}
    for path, update in updates.items():
        entry = weight_map["layers"][path][fmt]
        count = int(np.prod(entry["shape"]))
        base = np.fromfile(folder / entry["file"], entry["dtype"], count, offset=entry["offset"])
        base = base.reshape(entry["shape"]).astype(np.float32)
        value = base + (update.T if entry["transposed"] else update).reshape(base.shape)
        if path == table:
            for row, vector in rows.items():
                value[row] = vector
        if not np.isfinite(value).all():
            raise DiffshipError(f"the LoRA adapters make the {path} weight of the {Path(session.path).parent.name} "
                                "non-finite (NaN or inf): lower the adapter weights")
        values[entry["name"]] = value.astype(entry["dtype"])
    return values


def _read_lora(source, weight_name: str | None) -> tuple[dict[str, np.ndarray], str]:
    """The LoRA's tensors (numpy) and a name for messages."""
    if isinstance(source, dict):
        return {k: np.asarray(v) for k, v in source.items()}, "the state dict given"
    return read_safetensors(
        source, weight_name or "pytorch_lora_weights.safetensors",
        missing="LoRA file {path} does not exist: give a .safetensors file (or a folder holding one, with weight_name)",
        pickled="run-time LoRA reads .safetensors files (pickled files run code when loaded); convert it, or bake it "
                "in at export with --lora and --allow-pickle")


def read_safetensors(source, file_name: str, missing: str, pickled: str) -> tuple[dict[str, np.ndarray], str]:
    """A run-time adapter file's tensors (numpy) and its path for messages: `source` is the file, or a folder
    holding `file_name`. `missing` (with {path}) and `pickled` are the errors for a file that is not there or not
    safetensors; a damaged one names safetensors' own error."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / file_name
    if not path.is_file():
        raise DiffshipError(missing.format(path=path))
    if path.suffix != ".safetensors":
        raise DiffshipError(f"{path}: {pickled}")
    from safetensors.numpy import load_file

    try:
        return load_file(str(path)), str(path)
    except Exception as error:  # safetensors raises its own SafetensorError on a damaged header
        raise DiffshipError(f"{path} is not a readable safetensors file: {' '.join(str(error).split())}") from None


def _layers(tensors: dict[str, np.ndarray], file: str, maps: dict[str, dict]) -> dict[str, dict[str, _Layer]]:
    """component -> module path -> layer, every key of the file accounted for; an error naming the file and what
    does not fit (another architecture, a layer the model lacks, an adapter kind that is not LoRA)."""
    odd = sorted(k for k in tensors if any(marker in k for marker in _NOT_LORA))
    if odd:
        raise DiffshipError(f"{file}: holds {odd[0]} ({len(odd)} such keys): LyCORIS (LoHa, LoKr) and DoRA adapters "
                            "are not supported at run time; bake them in at export with --lora")
    parts: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unknown = []
    kohya_names = {component: _kohya_index(weight_map) for component, weight_map in maps.items()}
    for key, value in tensors.items():
        match = _PEFT_KEY.match(key)
        if match:
            component, module, matrix = match.groups()
            parts.setdefault((component, _module_path(module, maps.get(component))), {})[
                "down" if matrix == "A" else "up"] = value
            continue
        match = _KOHYA_KEY.match(key)
        if match:
            prefix, name, what = match.groups()
            component = KOHYA_PREFIXES[prefix]
            module = kohya_names.get(component, {}).get(name, name)
            slot = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[what]
            parts.setdefault((component, module), {})[slot] = value
            continue
        unknown.append(key)
    if unknown:
        raise DiffshipError(f"{file}: {len(unknown)} key(s) are not LoRA layers of a diffusers/PEFT or kohya file "
                            f"(e.g. {unknown[0]})")
    layers: dict[str, dict[str, _Layer]] = {}
    for (component, module), slots in parts.items():
        weight_map = maps.get(component)
        if weight_map is None:
            raise DiffshipError(f"{file}: adapts the {component}, which this pipeline does not have")
        entry = weight_map["layers"].get(module)
        if entry is None:
            raise DiffshipError(f"{file}: the layer {module} is not in this pipeline's {component} (a LoRA for "
                                "another architecture?)")
        if "down" not in slots or "up" not in slots:
            raise DiffshipError(f"{file}: the {component} layer {module} lacks its "
                                f"{'down (lora_A)' if 'down' not in slots else 'up (lora_B)'} matrix")
        down, up = slots["down"], slots["up"]
        rank = down.shape[0]
        fits = up.ndim >= 2 and up.shape[1] == rank and up.shape[0] == entry["shape"][0] and \
            int(np.prod(down.shape[1:])) * up.shape[0] == int(np.prod(entry["shape"]))
        if not fits:
            raise DiffshipError(f"{file}: the {component} layer {module} has LoRA matrices {list(down.shape)} and "
                                f"{list(up.shape)}, which do not fit its weight {entry['shape']} (a LoRA for "
                                "another architecture?)")
        alpha = float(np.asarray(slots["alpha"]).reshape(-1)[0]) if "alpha" in slots else None
        layers.setdefault(component, {})[module] = _Layer(down, up, alpha)
    return layers


def _module_path(module: str, weight_map: dict | None) -> str:
    """A diffusers/PEFT key's module as the export names it: text encoder keys written under transformers 4's
    `text_model.` prefix match a model without it, and the other way round."""
    if weight_map is None or module in weight_map["layers"]:
        return module
    stripped = module.removeprefix("text_model.")
    if stripped in weight_map["layers"]:
        return stripped
    if f"text_model.{module}" in weight_map["layers"]:
        return f"text_model.{module}"
    return module


def _kohya_index(weight_map: dict) -> dict[str, str]:
    """kohya's name for each module path of the map ('.' -> '_'; text encoders with and without `text_model_`)."""
    index = {}
    for path in weight_map["layers"]:
        index[path.replace(".", "_")] = path
        if not path.startswith("text_model."):
            index[f"text_model_{path.replace('.', '_')}"] = path
    return index
