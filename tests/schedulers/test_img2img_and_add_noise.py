"""Part-way starts (img2img: `timesteps[t_start * order:]` + `set_begin_index`) and `add_noise` (`scale_noise`, the
flow-matching forward process, for the FlowMatch classes), vs diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusers
import diffship.schedulers as ds

from .options import SD
from .parity import SHAPE, Case, assert_close, check_case, is_flow_matching

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
    # SD3's / Flux's img2img: scale_noise, and t_start = int(n - n * strength) (parity._timesteps_for)
    "FlowMatchEulerDiscreteScheduler": [{}, {"shift": 3.0}],
    "FlowMatchHeunDiscreteScheduler": [{}, {"shift": 3.0}],
}
FLOW_MATCHING = [name for name in IMG2IMG_CONFIGS if is_flow_matching(name)]


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


@pytest.mark.parametrize("class_name", sorted(set(IMG2IMG_CONFIGS) - set(FLOW_MATCHING)))
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


def _scale_noise_pair(class_name, config, steps=25):
    ref = getattr(diffusers, class_name)(**config)
    ours = ds.SCHEDULERS[class_name](**config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    rng = np.random.default_rng(3)
    return ref, ours, rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)


@pytest.mark.parametrize("config", [{}, {"shift": 3.0}, {"shift": 3.0, "invert_sigmas": True}])
def test_flow_match_euler_scale_noise_matches_diffusers(config):
    """Per batch item timesteps looked up in the schedule; then with begin_index set (img2img), before and after a
    step (inpainting re-noises the image latents at the current step)."""
    ref, ours, original, noise = _scale_noise_pair("FlowMatchEulerDiscreteScheduler", config)
    assert not hasattr(ours, "add_noise") and not hasattr(ours, "scale_model_input")  # as diffusers'
    picks = [3, 11]
    ref_t, our_t = ref.timesteps[picks], ours.timesteps[picks]
    np.testing.assert_array_equal(our_t, ref_t.numpy())
    expected = ref.scale_noise(torch.from_numpy(original), ref_t, torch.from_numpy(noise)).numpy()
    got = ours.scale_noise(original, our_t, noise)
    assert got.dtype == np.float32
    assert_close(got, expected, "scale_noise, timesteps looked up")
    for scheduler in (ref, ours):
        scheduler.set_begin_index(7)
    expected = ref.scale_noise(torch.from_numpy(original), ref.timesteps[:1].repeat(2), torch.from_numpy(noise)).numpy()
    assert_close(ours.scale_noise(original, np.repeat(ours.timesteps[:1], 2), noise), expected, "scale_noise at begin_index")
    velocity = np.full(SHAPE, 0.1, dtype=np.float32)
    ref.step(torch.from_numpy(velocity), ref.timesteps[7], torch.from_numpy(original))
    ours.step(velocity, ours.timesteps[7], original)
    expected = ref.scale_noise(torch.from_numpy(original), ref.timesteps[8:9].repeat(2), torch.from_numpy(noise)).numpy()
    assert_close(ours.scale_noise(original, np.repeat(ours.timesteps[8:9], 2), noise), expected, "scale_noise at step_index")


def test_flow_match_heun_scale_noise_matches_diffusers():
    """Heun's scale_noise uses (and sets) the step index, from the timestep when no begin_index is set."""
    ref, ours, original, noise = _scale_noise_pair("FlowMatchHeunDiscreteScheduler", {"shift": 3.0})
    expected = ref.scale_noise(torch.from_numpy(original), ref.timesteps[5:6], torch.from_numpy(noise)).numpy()
    assert_close(ours.scale_noise(original, ours.timesteps[5:6], noise), expected, "scale_noise")
    assert ours.step_index == ref.step_index
