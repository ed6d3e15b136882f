"""A VAE that overflows fp16 the way the SD2 and SDXL VAE decoders do, for testing the protection.

Those decoders carry activations past fp16's 65504 in their residual stream; GroupNorm brings them back before
the output, so fp32 never notices, and an fp16 graph turns them into inf and then NaN (a black image). Scaling
the decoder's first convolution reproduces exactly that: every later block normalises before it computes, the
residual stream stays huge, and `conv_norm_out` normalises it away at the end.
"""

from __future__ import annotations

from pathlib import Path


def make_vae_overflow_fp16(model_dir: str | Path, factor: float = 1e6) -> Path:
    """Scale `vae.decoder.conv_in` of the diffusers pipeline in `model_dir` by `factor`, in place."""
    from safetensors.torch import load_file, save_file

    weights = Path(model_dir) / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    for name in ("decoder.conv_in.weight", "decoder.conv_in.bias"):
        state[name] = state[name] * factor
    save_file(state, str(weights))
    return Path(model_dir)
