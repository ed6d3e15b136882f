"""The flow-matching schedulers' parts the trajectory tests do not reach, vs diffusers: `mu` from the image size
(the SD3 / Flux pipelines' calculate_shift), Flux's default sigmas, set_shift, per-token timesteps, dtypes and
what they refuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusers
import diffship.schedulers as ds
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_calculate_shift
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift as sd3_calculate_shift

from .parity import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

FLUX_CONFIG = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
               "max_image_seq_len": 4096, "shift": 3.0}


@pytest.mark.parametrize("image_seq_len", [64, 256, 1024, 4096, 4096 + 1536])
@pytest.mark.parametrize("reference", [flux_calculate_shift, sd3_calculate_shift])
def test_calculate_shift_matches_the_pipelines(reference, image_seq_len):
    assert ds.calculate_shift(image_seq_len) == reference(image_seq_len)
    values = (image_seq_len, 128, 8192, 0.3, 1.5)
    assert ds.calculate_shift(*values) == reference(*values)


def test_calculate_shift_for_reads_the_config_as_the_pipelines_do():
    config = ds.FlowMatchEulerDiscreteScheduler(**{**FLUX_CONFIG, "max_shift": 1.3}).config
    assert ds.calculate_shift_for(config, 1024) == flux_calculate_shift(1024, 256, 4096, 0.5, 1.3)
    # SD3's pipeline reads max_shift with a default of 1.16 when the config lacks it
    assert ds.calculate_shift_for({}, 1024, max_shift_default=1.16) == sd3_calculate_shift(1024, 256, 4096, 0.5, 1.16)


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_flux_default_sigmas_give_flux_schedule(steps):
    sigmas = ds.flux_default_sigmas(steps)
    np.testing.assert_array_equal(sigmas, np.linspace(1.0, 1 / steps, steps))  # FluxPipeline.__call__'s line
    mu = ds.calculate_shift(1024)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)
    ours = ds.FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)
    ref.set_timesteps(sigmas=sigmas, mu=mu)
    ours.set_timesteps(sigmas=sigmas, mu=mu)
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())


def test_set_shift_changes_the_next_schedule_like_diffusers():
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = ds.FlowMatchEulerDiscreteScheduler(shift=3.0)
    for scheduler in (ref, ours):
        scheduler.set_shift(5.0)
        scheduler.set_timesteps(10)
    assert ours.shift == ref.shift == 5.0
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    assert ours.sigma_min == ref.sigma_min and ours.sigma_max == ref.sigma_max


def test_per_token_timesteps_match_diffusers():
    """A sigma per token ([B, N] timesteps for a [B, N, C] sample), each token stepping to the next lower sigma of
    the schedule (LTX-Video's conditioning frames)."""
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = ds.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(8)
    ours.set_timesteps(8)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 6, 4)).astype(np.float32)
    velocity = rng.standard_normal((2, 6, 4)).astype(np.float32)
    per_token = np.tile(ours.timesteps[[1, 3, 3, 5, 7, 7]], (2, 1))
    per_token[1, :2] = ours.timesteps[0]
    expected = ref.step(torch.from_numpy(velocity), ref.timesteps[1], torch.from_numpy(sample),
                        per_token_timesteps=torch.from_numpy(per_token)).prev_sample.numpy()
    got = ours.step(velocity, ours.timesteps[1], sample, per_token_timesteps=per_token).prev_sample
    assert_close(got, expected, "per-token step")


@pytest.mark.parametrize("class_name", ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"])
def test_half_precision_model_output_steps_in_float32_and_returns_its_dtype(class_name):
    ref = getattr(diffusers, class_name)(shift=3.0)
    ours = ds.SCHEDULERS[class_name](shift=3.0)
    ref.set_timesteps(4)
    ours.set_timesteps(4)
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((1, 4, 4, 4)).astype(np.float16)
    velocity = rng.standard_normal((1, 4, 4, 4)).astype(np.float16)
    for i in range(2):
        expected = ref.step(torch.from_numpy(velocity), ref.timesteps[i], torch.from_numpy(sample)).prev_sample
        got = ours.step(velocity, ours.timesteps[i], sample).prev_sample
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, expected.numpy())
        sample = got


@pytest.mark.parametrize("class_name", ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"])
def test_integer_timesteps_are_refused_as_in_diffusers(class_name):
    scheduler = ds.SCHEDULERS[class_name]()
    scheduler.set_timesteps(4)
    sample = np.zeros((1, 4, 2, 2), dtype=np.float32)
    for timestep in (0, np.int64(999), np.array([999])):
        with pytest.raises(ValueError, match="integer indices"):
            scheduler.step(sample, timestep, sample)


def test_step_returns_diffusers_output_forms():
    scheduler = ds.FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    sample = np.ones((1, 4, 2, 2), dtype=np.float32)
    out = scheduler.step(sample, scheduler.timesteps[0], sample)
    assert isinstance(out, ds.FlowMatchEulerDiscreteSchedulerOutput) and out[0] is out.prev_sample
    (prev,) = scheduler.step(sample, scheduler.timesteps[1], sample, return_dict=False)
    assert prev.shape == sample.shape


def test_dynamic_shifting_needs_mu_and_a_known_time_shift_type():
    with pytest.raises(ValueError, match="mu"):
        ds.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).set_timesteps(4)
    with pytest.raises(ValueError, match="time_shift_type"):
        ds.FlowMatchEulerDiscreteScheduler(time_shift_type="cosine")
    with pytest.raises(ValueError, match="Only one of"):
        ds.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True, use_exponential_sigmas=True)
    with pytest.raises(ValueError, match="same length"):
        ds.FlowMatchEulerDiscreteScheduler().set_timesteps(3, sigmas=[1.0, 0.5])


def test_save_and_load_round_trip_with_diffusers(tmp_path):
    ours = ds.FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)
    ours.save_pretrained(tmp_path)
    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    assert dict(ref.config) | {"_use_default_values": None} == dict(ours.config) | {"_use_default_values": None} | {
        "_diffusers_version": ref.config["_diffusers_version"]}
    ref.save_pretrained(tmp_path / "back")
    assert isinstance(ds.scheduler_from_config(ds.Scheduler.load_config(tmp_path / "back")), ds.FlowMatchEulerDiscreteScheduler)
