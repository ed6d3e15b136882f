"""LoRA adapters baked into an export (`export(..., loras=[...])`, `diffship export --lora FILE[:SCALE]`).

Each file is read by diffusers' own loader (`load_lora_weights`: the diffusers/PEFT format and the kohya /
Automatic1111 one, linear and convolution layers, UNet and text encoders), every adapter is set to its scale
(`set_adapters`), fused into the base weights (`fuse_lora`) and the LoRA layers removed (`unload_lora_weights`):
the graphs traced afterwards are the base architecture with new weights, validated against this fused PyTorch
model as any export is. diffusers' documented way to merge LoRAs for saving; the images are diffusers' with the
adapters loaded unfused at those scales (tests/test_lora.py).

Nothing is dropped silently: diffusers only warns when a LoRA layer matches nothing in the model (a LoRA made for
another architecture, a component the pipeline lacks), so each component's LoRA layers are counted in the file and
in the model after loading, and any shortfall is an error naming the file, the component and what does not fit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from diffship.adapter_files import check_adapter_file, first_line, safetensors_keys
from diffship.checks import check_number
from diffship.errors import DiffshipError

# One LoRA layer in a state dict as diffusers' lora_state_dict returns it (PEFT's `lora_A`, the older
# `to_q_lora.down` / `lora_linear_layer.down` it converts kohya files to, kohya's `lora_down`): its first matrix,
# counted once per layer.
_LORA_DOWN = re.compile(r"lora(_A|[._]down|_linear_layer\.down)(\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class Lora:
    """One adapter to bake in: its file, the scale it is fused at, and the file's sha256 (for the report)."""

    path: Path
    scale: float
    sha256: str

    def to_report(self) -> dict:
        return {"file": str(self.path), "sha256": self.sha256, "scale": self.scale}


def check_loras(loras, allow_pickle: bool = False, flag: str = "loras") -> list[Lora]:
    """The adapters to bake in, each checked before any model is loaded: a readable file holding LoRA weights
    (safetensors; pickled files only with `allow_pickle`), a finite scale. `loras`: paths (scale 1.0) or
    (path, scale) pairs."""
    if loras is None:
        return []
    if isinstance(loras, (str, os.PathLike)) or (isinstance(loras, tuple) and len(loras) == 2
                                                  and not isinstance(loras[1], (str, os.PathLike))):
        loras = [loras]
    checked = []
    for item in loras:
        if isinstance(item, Lora):  # checked already (the command line checks under its flag's name)
            checked.append(item)
            continue
        path, scale = (item if isinstance(item, (tuple, list)) and len(item) == 2 else (item, 1.0))
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"{flag}: each LoRA is a file path or a (path, scale) pair, got {item!r}")
        check_number(scale, f"{flag} {path}: the scale")
        path = check_adapter_file(Path(path).expanduser(), allow_pickle, flag)
        if path.suffix == ".safetensors" and not any("lora" in key for key in safetensors_keys(path, flag, "LoRA")):
            raise DiffshipError(f"{flag} {path} holds no LoRA weights (no 'lora' key among its tensors); give a "
                                "LoRA file, not a model's weights")
        checked.append(Lora(path, float(scale), file_sha256(path)))
    return checked


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def apply_loras(pipe, loras: list[Lora], flag: str = "loras") -> None:
    """Load every adapter into the PyTorch pipeline `pipe`, fuse them at their scales, and remove the LoRA layers."""
    if not loras:
        return
    if not hasattr(pipe, "load_lora_weights"):
        raise DiffshipError(f"{flag}: diffusers' {type(pipe).__name__} takes no LoRA")
    names = []
    for number, lora in enumerate(loras):
        name = f"lora{number}"
        expected = _layers_in_file(pipe, lora, flag)
        with _diffusers_warnings() as warnings:
            try:
                pipe.load_lora_weights(str(lora.path), adapter_name=name)
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise DiffshipError(f"{flag} {lora.path} does not fit this {type(pipe).__name__}: "
                                    f"{first_line(e)}") from None
        for component, count in expected.items():
            found = _layers_in_model(getattr(pipe, component, None), name)
            if found < count:
                detail = f"; diffusers: {warnings[0]}" if warnings else ""
                where = (f"its {component} has no such component" if getattr(pipe, component, None) is None
                         else f"{count - found} of its {count} {component} LoRA layers match no layer of the model")
                raise DiffshipError(f"{flag} {lora.path} does not fit this {type(pipe).__name__}: {where} (a LoRA "
                                    f"for another architecture?){detail[:300]}")
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()  # the LoRA layers go; the fused weights stay (diffusers' merge-and-save recipe)
    left = [c for c in ("unet", "text_encoder", "text_encoder_2") if _layers_in_model(getattr(pipe, c, None), None)]
    if left:
        raise DiffshipError(f"{flag}: LoRA layers were left in the {', '.join(left)} after fusing; report this")


def _layers_in_file(pipe, lora: Lora, flag: str) -> Counter:
    """Component -> LoRA layers the file holds for it, as diffusers converts the file (any format)."""
    try:
        state_dict = pipe.lora_state_dict(str(lora.path))[0]
    except (RuntimeError, ValueError, KeyError, TypeError, OSError) as e:
        raise DiffshipError(f"{flag} {lora.path}: diffusers cannot read it as a LoRA ({first_line(e)})") from None
    counts = Counter(key.split(".", 1)[0] for key in state_dict if _LORA_DOWN.search(key))
    if not counts:
        raise DiffshipError(f"{flag} {lora.path} holds no LoRA layer diffusers recognises")
    return counts


def _layers_in_model(model, adapter: str | None) -> int:
    """LoRA layers of `adapter` (of any adapter if None) injected into `model`: PEFT's layers keep each adapter's
    first matrix in a ModuleDict `lora_A`."""
    import torch

    if model is None:
        return 0
    return sum(1 for module in model.modules()
               if isinstance(adapters := getattr(module, "lora_A", None), torch.nn.ModuleDict)
               and (adapter in adapters if adapter is not None else len(adapters) > 0))


class _diffusers_warnings:
    """Collects what diffusers and PEFT log and warn during a load (the detail of a LoRA that does not fit),
    instead of printing it: transformers' load report lists every base weight of a text encoder as "missing" when
    an adapter is loaded into it, which is expected and would only alarm."""

    def __enter__(self) -> list[str]:
        self.messages: list[str] = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.messages.append(first_line(record.getMessage()))
        self.loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
        for logger in self.loggers:
            logger.addHandler(self.handler)
        self.caught = warnings.catch_warnings(record=True)
        self.records = self.caught.__enter__()
        warnings.simplefilter("always")
        return self.messages

    def __exit__(self, *exc) -> None:
        self.caught.__exit__(*exc)
        self.messages.extend(first_line(record.message) for record in self.records)
        for logger in self.loggers:
            logger.removeHandler(self.handler)
