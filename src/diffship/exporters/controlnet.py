"""ControlNets exported beside their base model (`export(..., controlnet=...)`, `--controlnet MODEL`).

Each ControlNet is a diffusers ControlNetModel folder (config.json + weights) or a hub repo id. It is checked before
any model is loaded: the folder and its config are read (a hub repo's config.json and weights are fetched first),
it must be a ControlNetModel, and its architecture must be its base UNet's (the down path it mirrors, the
conditioning width, SDXL's added embedding): a ControlNet of another family (SDXL's with an SD 1.x model) is named
with what does not fit. The export then writes one graph per ControlNet (controlnet/, controlnet_1/, ...) and a UNet
that takes their residuals as inputs; that UNet runs with any ControlNet of its family, exported with the same base
or another fine-tune of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from diffship.checks import read_json_object
from diffship.errors import DiffshipError
from diffship.hub import HubOptions, check_hub_id, not_found
from diffship.layout import CONFIG, controlnet_folder

CONTROLNET_CLASS = "ControlNetModel"
# The config keys a ControlNet shares with its UNet: the down path (whose skips it hands over), the width of what
# it attends to, the added embedding (SDXL's text_time).
_MATCHING = ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
             "addition_embed_type", "projection_class_embeddings_input_dim", "transformer_layers_per_block")


@dataclass(frozen=True)
class ControlNetSource:
    """A ControlNet the export reads: as the user named it, its local folder, and its config."""

    name: str
    path: Path
    config: dict

    def to_report(self) -> dict:
        return {"source": self.name, "path": str(self.path)}


def check_controlnets(controlnet, options: HubOptions = HubOptions(), allow_pickle: bool = False,
                      flag: str = "controlnet") -> list[ControlNetSource]:
    """The ControlNets to export (`controlnet`: a folder or hub id, or a list of them), each readable and a
    ControlNetModel; a hub id is fetched (config and weights) into the hub cache. Before any model is loaded."""
    if controlnet is None:
        return []
    items = [controlnet] if isinstance(controlnet, (str, os.PathLike)) else list(controlnet)
    sources = []
    for item in items:
        if isinstance(item, ControlNetSource):
            sources.append(item)
            continue
        if not isinstance(item, (str, os.PathLike)):
            raise ValueError(f"{flag}: each ControlNet is a folder or a hub repo id, got {item!r}")
        path = Path(item).expanduser()
        if path.exists():
            if not path.is_dir():
                raise DiffshipError(f"{flag} {path} is a file; give the ControlNet's folder (config.json and its "
                                    "weights, as ControlNetModel.save_pretrained writes it)")
        else:
            path = _download(item, options, allow_pickle, flag)
        if not (path / CONFIG).is_file():
            raise DiffshipError(f"{flag} {path} has no config.json: not a diffusers ControlNet folder")
        config = read_json_object(path / CONFIG, {"_class_name": str})
        if config.get("_class_name") != CONTROLNET_CLASS:
            raise DiffshipError(f"{flag} {path} holds a {config.get('_class_name')}, not a {CONTROLNET_CLASS}")
        weights = [p.name for p in path.iterdir() if p.suffix == ".safetensors"
                   or (allow_pickle and p.suffix == ".bin")]
        if not weights:
            raise DiffshipError(f"{flag} {path} has no .safetensors weights" +
                                ("" if allow_pickle else " (pickled .bin weights need --allow-pickle)"))
        sources.append(ControlNetSource(str(item), path.resolve(), config))
    return sources


def _download(repo_id, options: HubOptions, allow_pickle: bool, flag: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        repo_id = check_hub_id(repo_id)
    except DiffshipError as e:
        raise DiffshipError(f"{flag} {e}") from None
    patterns = ["config.json", "*.safetensors"] + (["*.bin"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=options.offline,
                                      **options.download_kwargs()))
    except Exception as e:  # huggingface_hub's errors: not found, offline, gated, network
        raise DiffshipError(f"{flag} {not_found(repo_id, e)}") from None


def check_fits(sources: list[ControlNetSource], unet_config: dict, family_name: str, flag: str = "controlnet") -> None:
    """Each ControlNet must mirror the base UNet: the same down path, conditioning width and added embedding."""
    for source in sources:
        differences = [f"its {key} is {source.config[key]!r}, the UNet's {unet_config[key]!r}"
                       for key in _MATCHING if key in source.config and key in unet_config
                       and _normal(source.config[key]) != _normal(unet_config[key])]
        if differences:
            kind = ("an SDXL ControlNet" if source.config.get("addition_embed_type") == "text_time"
                    else "a Stable Diffusion 1.x/2.x ControlNet")
            raise DiffshipError(f"{flag} {source.path} does not fit this {family_name} model ({kind}?): "
                                f"{'; '.join(differences)}")


def _normal(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def load_controlnets(sources: list[ControlNetSource], allow_pickle: bool = False) -> list:
    """The ControlNetModels, float32 on CPU, in eval mode."""
    import torch
    from diffusers import ControlNetModel

    models = []
    for source in sources:
        try:
            model = ControlNetModel.from_pretrained(str(source.path), torch_dtype=torch.float32,
                                                    use_safetensors=None if allow_pickle else True)
        except Exception as e:
            raise DiffshipError(f"controlnet {source.path}: diffusers could not load it: {e}") from e
        models.append(model.eval())
    return models


def controlnet_index_entry(count: int) -> list[str]:
    """model_index.json's `controlnet` entry, as diffusers saves a ControlNet pipeline."""
    return ["diffusers", CONTROLNET_CLASS if count == 1 else "MultiControlNetModel"]


__all__ = ["ControlNetSource", "check_controlnets", "check_fits", "controlnet_folder", "controlnet_index_entry",
           "load_controlnets"]
