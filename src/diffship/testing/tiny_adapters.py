"""Tiny adapters for the tiny pipelines, made in code (seeded, offline). LoRA files in the two formats users have:
diffusers/PEFT (`save_lora_weights`' keys: `unet.<module>.lora_A.weight`) and kohya / Automatic1111
(`lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`; text encoders `lora_te_`,
or `lora_te1_` / `lora_te2_` for SDXL's two).

The adapters are random (PEFT's `init_lora_weights=False`, then the up matrices scaled by `strength`): a trained
LoRA's effect is a small change of each layer, and so is this one's, large enough to show in the images.
"""

from __future__ import annotations

from pathlib import Path

# PEFT target modules: the attention projections of the UNet's transformer blocks and of the CLIP text encoders
# (what LoRA trainers adapt), and the resnets' convolutions for a LoRA "with convolution layers" (LoCon).
UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_CONVOLUTIONS = ["conv1", "conv2"]
TEXT_ENCODER_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
KOHYA_PREFIXES_SDXL = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def save_tiny_lora(model_dir: str | Path, path: str | Path, *, rank: int = 4, convolutions: bool = False,
                   text_encoders: bool = True, kohya: bool = False, strength: float = 0.5, seed: int = 0) -> Path:
    """Write a LoRA for the diffusers pipeline in `model_dir` to `path` (a .safetensors file) and return it."""
    import torch
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    torch.manual_seed(seed)
    layers = {}
    targets = {"unet": UNET_ATTENTION + (UNET_CONVOLUTIONS if convolutions else [])}
    if text_encoders:
        targets.update({name: TEXT_ENCODER_ATTENTION for name in ("text_encoder", "text_encoder_2")
                        if getattr(pipe, name, None) is not None})
    for name, modules in targets.items():
        model = getattr(pipe, name)
        # PEFT itself, not the models' add_adapter: transformers' asks for a newer PEFT than diffusers needs.
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, init_lora_weights=False),
                                model)
        state = get_peft_model_state_dict(model)
        layers[name] = {key: (value * strength if ".lora_B." in key else value).contiguous()
                        for key, value in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kohya:
        prefixes = KOHYA_PREFIXES_SDXL if "text_encoder_2" in targets else KOHYA_PREFIXES
        save_file(_kohya(layers, prefixes, rank), str(path))
    else:
        # Text encoders' keys as trainers write them: under transformers 4's `text_model.` (diffusers strips it).
        save_file({f"{name}.{key if name == 'unet' or key.startswith('text_model.') else 'text_model.' + key}": value
                   for name, state in layers.items() for key, value in state.items()}, str(path))
    return path


def _kohya(layers: dict, prefixes: dict, rank: int) -> dict:
    """PEFT's keys -> kohya's: module path with '_' for '.', lora_down/lora_up, and each layer's alpha."""
    import torch

    out = {}
    for name, state in layers.items():
        for key, value in state.items():
            module, _, matrix = key.rpartition(".lora_")
            module = module if name == "unet" or module.startswith("text_model.") else f"text_model.{module}"
            stem = f"{prefixes[name]}_{module.replace('.', '_')}"
            out[f"{stem}.lora_{'down' if matrix.startswith('A') else 'up'}.weight"] = value
            out[f"{stem}.alpha"] = torch.tensor(float(rank))
    return out


# Textual inversion files: diffusers' {token: vectors}, Automatic1111's .pt ({"string_to_param": {"*": vectors},
# "name": token}) and .safetensors ({"emb_params": vectors}, the file name is the token), SDXL's {"clip_l", "clip_g"}.
EMBEDDING_FORMATS = ("diffusers", "a1111-pt", "a1111-safetensors", "sdxl")


def save_tiny_embedding(model_dir: str | Path, path: str | Path, token: str, *, vectors: int = 1,
                        fmt: str = "diffusers", seed: int = 0, std: float = 0.05) -> Path:
    """Write a textual inversion embedding of `vectors` vectors for the text encoder(s) of the pipeline in
    `model_dir` to `path`, in format `fmt` (EMBEDDING_FORMATS), and return it."""
    import json

    import torch
    from safetensors.torch import save_file

    if fmt not in EMBEDDING_FORMATS:
        raise ValueError(f"fmt must be one of {EMBEDDING_FORMATS}, got {fmt!r}")
    generator = torch.Generator().manual_seed(seed)

    def vectors_for(encoder: str) -> torch.Tensor:
        width = json.loads((Path(model_dir) / encoder / "config.json").read_text())["hidden_size"]
        return torch.randn(vectors, width, generator=generator) * std

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "sdxl":
        save_file({"clip_l": vectors_for("text_encoder"), "clip_g": vectors_for("text_encoder_2")}, str(path))
    elif fmt == "diffusers":
        save_file({token: vectors_for("text_encoder")}, str(path))
    elif fmt == "a1111-safetensors":
        save_file({"emb_params": vectors_for("text_encoder")}, str(path))
    else:
        torch.save({"string_to_param": {"*": vectors_for("text_encoder")}, "name": token}, str(path))
    return path
