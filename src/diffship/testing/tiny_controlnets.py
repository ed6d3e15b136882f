"""Tiny ControlNets for the tiny pipelines, made in code (seeded, offline), and SD 1.5's full-size ControlNet
architecture with random weights for benchmarks.

A ControlNet is built from its base UNet's config (diffusers' `ControlNetModel.from_unet`, without the UNet's
weights), with a small conditioning embedding (8x down, as every ControlNet's: the control image is at the image's
size, its features at the latent's). diffusers initialises the layers that hand the residuals to the UNet (the
"zero convolutions") and the conditioning embedding's last convolution at zero, so that a fresh ControlNet changes
nothing; here they are drawn at random like every other layer, so that a test sees each residual's effect.
"""

from __future__ import annotations

from pathlib import Path

# The conditioning embedding's channels: four levels, three 2x downsamplings (image -> latent size).
TINY_CONDITIONING_CHANNELS = (8, 8, 16, 16)


def build_controlnet(unet, seed: int = 0, conditioning_channels=TINY_CONDITIONING_CHANNELS):
    """A ControlNetModel for `unet` (a UNet2DConditionModel) with every weight drawn from `seed`."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False,
                                           conditioning_embedding_out_channels=tuple(conditioning_channels))
    zero_initialised = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                        controlnet.controlnet_cond_embedding.conv_out]
    for module in zero_initialised:
        module.reset_parameters()
    return controlnet.eval()


def save_tiny_controlnet(model_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a ControlNet for the diffusers pipeline in `model_dir` (its UNet's architecture) to `out_dir` as a
    diffusers ControlNetModel folder (config.json, diffusion_pytorch_model.safetensors) and return it."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet")
    out_dir = Path(out_dir)
    build_controlnet(unet, seed).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def save_full_size_controlnet(model_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """SD 1.5's ControlNet architecture (lllyasviel's: conditioning channels 16, 32, 96, 256) with random weights,
    for the full-size pipeline in `model_dir` (testing.tiny_models' "full-size")."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet")
    out_dir = Path(out_dir)
    build_controlnet(unet, seed, conditioning_channels=(16, 32, 96, 256)).save_pretrained(out_dir,
                                                                                         safe_serialization=True)
    return out_dir
