"""Calibration inputs for activation quantization: what the UNet really sees while denoising real prompts.

Captured from the PyTorch reference pipeline during export (torch is there anyway), so the ranges NNCF measures
are those of actual generations, not of random tensors.
"""

from __future__ import annotations

import numpy as np

DEFAULT_PROMPTS = (
    "a photo of an astronaut riding a horse on the moon",
    "an oil painting of a castle on a hill at sunset",
    "a red circle on the left",
    "a close up portrait of an old man, highly detailed",
    "a bowl of fruit on a wooden table, soft light",
    "a city street at night in the rain, cinematic",
    "a blue square in the center",
    "a watercolor drawing of a forest and a lake",
)


def unet_calibration_feeds(pipe, height: int, width: int, prompts=DEFAULT_PROMPTS, num_inference_steps: int = 10,
                           guidance_scale: float = 7.5, seed: int = 0,
                           progress: bool = False) -> list[dict[str, np.ndarray]]:
    """One feed dict (sample, timestep, encoder_hidden_states) per UNet call of the generations. `progress`: a bar
    per prompt (a full-size UNet at 512x512 spends minutes here, in PyTorch)."""
    import torch
    from tqdm.auto import tqdm

    feeds = []

    def record(module, args, kwargs):
        sample, timestep = args[0], args[1]
        hidden = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        feeds.append({
            "sample": sample.detach().float().numpy().copy(),
            "timestep": np.asarray(float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else timestep,
                                   dtype=np.float32),
            "encoder_hidden_states": hidden.detach().float().numpy().copy(),
        })

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for prompt in tqdm(prompts, desc="calibrating the UNet (hybrid int8)", unit="prompt",
                               disable=not progress):
                pipe(prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                     guidance_scale=guidance_scale, generator=generator, output_type="latent")
    finally:
        handle.remove()
    return feeds
