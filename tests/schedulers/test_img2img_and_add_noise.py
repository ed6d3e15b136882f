"""Part-way starts (img2img: `timesteps[t_start * order:]` + `set_begin_index`) and `add_noise`, vs diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusers
import diffship.schedulers as ds

from .options import SD
from .parity import SHAPE, Case, assert_close, check_case

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# One or two representative configs per scheduler: its defaults, and the Stable Diffusion schedule with the
# option a pipeline would most likely pair it with.
IMG2IMG_CONFIGS = {
    "DDPMScheduler": [{}, {**SD, "clip_sample": False}],
    "DDIMScheduler": [{}, {**SD, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}],
    "PNDMScheduler": [{}, {**SD, "skip_prk_steps": True, "steps_offset": 1}],
    "LMSDiscreteScheduler": [{}, {**SD, "use_karras_sigmas": True}],
    "EulerDiscreteScheduler": [{}, {**SD, "use_karras_sigmas": True}, {**SD, "timestep_spacing": "leading", "steps_offset": 1}],
    "EulerAncestralDiscreteScheduler": [{}, {**SD, "timestep_spacing": "leading", "steps_offset": 1}],
    "HeunDiscreteScheduler": [{}, {**SD, "use_karras_sigmas": True}],
    "KDPM2DiscreteScheduler": [{}, {**SD, "use_karras_sigmas": True}],
    "KDPM2AncestralDiscreteScheduler": [{}, {**SD, "use_karras_sigmas": True}],
    "DPMSolverMultistepScheduler": [{}, {**SD, "use_karras_sigmas": True}, {**SD, "algorithm_type": "sde-dpmsolver++"}],
    "DPMSolverSinglestepScheduler": [{}, {**SD, "solver_order": 3}],
    "UniPCMultistepScheduler": [{}, {**SD, "solver_order": 3}],
    "DEISMultistepScheduler": [{}, {**SD, "solver_order": 3}],
    "LCMScheduler": [{}],
    "TCDScheduler": [{}],
}


def test_every_scheduler_has_an_img2img_case():
    assert sorted(IMG2IMG_CONFIGS) == sorted(ds.SCHEDULERS)


@pytest.mark.parametrize("steps", [4, 25, 50])
@pytest.mark.parametrize(
    "class_name, variant",
    [(name, i) for name, configs in IMG2IMG_CONFIGS.items() for i in range(len(configs))],
)
def test_img2img_partway_start_matches_diffusers(class_name, variant, steps):
    case = Case(class_name, IMG2IMG_CONFIGS[class_name][variant], steps, strength=0.6)
    assert check_case(case) == "ok"  # ill-conditioned steps (DEIS order 3 at 25+ steps) get computed bounds


@pytest.mark.parametrize("class_name", sorted(IMG2IMG_CONFIGS))
def test_add_noise_matches_diffusers_per_batch_timesteps(class_name):
    """Different timesteps per batch item, looked up in the schedule (no begin_index set)."""
    config = IMG2IMG_CONFIGS[class_name][-1]
    ref = getattr(diffusers, class_name)(**config)
    ours = ds.SCHEDULERS[class_name](**config)
    ref.set_timesteps(25)
    ours.set_timesteps(25)
    rng = np.random.default_rng(3)
    original = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    picks = [3, 11]
    ref_t = ref.timesteps[picks]
    our_t = ours.timesteps[picks]
    np.testing.assert_allclose(our_t, ref_t.numpy(), rtol=1e-6)
    expected = ref.add_noise(torch.from_numpy(original), torch.from_numpy(noise), ref_t).numpy()
    got = ours.add_noise(original, noise, our_t)
    assert got.dtype == np.float32
    assert_close(got, expected, f"{class_name}.add_noise")
