"""End to end with the wider scheduler family: diffusers' StableDiffusionPipeline and diffship's on ONNX Runtime,
tiny SD1 and SD2, the same prompts, latents and step noise -> images within 1e-3 max abs (output_type np).

Stochastic schedulers draw noise inside `step`; diffusers' draws are recorded by wrapping the `randn_tensor`
its scheduler module calls and replayed to diffship through the noise hook (a generator object with
`randn(shape, dtype)`, see diffship/schedulers/noise.py).
"""

from __future__ import annotations

import contextlib
import importlib
import json

import numpy as np
import pytest
import torch

import diffship.schedulers as ds

ATOL = 1e-3
PROMPTS = ["a red circle on the left", "an oil painting of a castle at sunset"]
STEPS = 4

# name: (class name in both libraries, config overrides, diffusers scheduler module drawing step noise or None)
SCHEDULERS = {
    "dpm++2m-karras": ("DPMSolverMultistepScheduler",
                       {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}, None),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}, "scheduling_euler_ancestral_discrete"),
    "unipc": ("UniPCMultistepScheduler", {}, None),
    "lcm": ("LCMScheduler", {}, "scheduling_lcm"),
    "ddpm": ("DDPMScheduler", {}, "scheduling_ddpm"),
}


class Replay:
    """diffship's noise hook: hands out the recorded tensors in order."""

    def __init__(self, tensors):
        self.tensors = list(tensors)

    def randn(self, shape, dtype):
        noise = self.tensors.pop(0)
        assert noise.shape == tuple(shape)
        return noise.astype(dtype)


@contextlib.contextmanager
def recording_noise(module_name):
    """Record every tensor the diffusers scheduler module draws with randn_tensor."""
    drawn = []
    if module_name is None:
        yield drawn
        return
    module = importlib.import_module(f"diffusers.schedulers.{module_name}")
    original = module.randn_tensor

    def record(*args, **kwargs):
        tensor = original(*args, **kwargs)
        drawn.append(tensor.detach().float().numpy().copy())
        return tensor

    module.randn_tensor = record
    try:
        yield drawn
    finally:
        module.randn_tensor = original


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["guided", "unguided"])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_scheduler_family_matches_diffusers(kind, scheduler, guidance_scale, reference_pipelines, exported_dirs,
                                           tiny_model_dirs):
    import diffusers

    from diffship.pipelines import StableDiffusionPipeline

    class_name, overrides, noise_module = SCHEDULERS[scheduler]
    ref = reference_pipelines(kind)
    # The model's own scheduler config: the shared reference pipeline's current scheduler may carry another
    # test's overrides (karras sigmas, ...), which from_config would pass on.
    base_config = json.loads((tiny_model_dirs(kind) / "scheduler" / "scheduler_config.json").read_text())
    ref.scheduler = getattr(diffusers, class_name).from_config(base_config, **overrides)
    latents = np.random.default_rng(11).standard_normal((2, 4, 8, 8)).astype(np.float32)
    with recording_noise(noise_module) as drawn:
        expected = ref(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale, output_type="np",
                       latents=torch.from_numpy(latents), generator=torch.Generator().manual_seed(0)).images
    if noise_module is not None:
        assert drawn, "the stochastic scheduler drew no noise: the replay would test nothing"

    pipe = StableDiffusionPipeline.from_pretrained(exported_dirs(kind))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(ds, class_name).from_config(pipe.scheduler.config, **overrides)
    images = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale, output_type="np",
                  latents=latents, generator=Replay(drawn)).images
    np.testing.assert_allclose(images, expected, atol=ATOL, rtol=0)
