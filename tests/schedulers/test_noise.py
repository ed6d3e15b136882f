"""The noise hook: numpy Generators, per-batch generator lists, and stand-in generators with `randn`."""

from __future__ import annotations

import numpy as np
import pytest

import diffship.schedulers as ds
from diffship.schedulers.noise import randn


def test_numpy_generator_draws_float32_standard_normal():
    noise = randn((2, 4, 8, 8), np.random.default_rng(0))
    assert noise.dtype == np.float32 and noise.shape == (2, 4, 8, 8)
    np.testing.assert_array_equal(noise, randn((2, 4, 8, 8), np.random.default_rng(0)))  # same seed, same noise
    assert randn((3,), np.random.default_rng(0), np.float16).dtype == np.float16
    assert randn((7,), np.random.default_rng(0)).shape == (7,)  # odd sizes


def test_box_muller_noise_is_standard_normal():
    noise = randn((1_000_000,), np.random.default_rng(1)).astype(np.float64)
    assert np.all(np.isfinite(noise))
    assert abs(noise.mean()) < 5e-3 and abs(noise.std() - 1) < 5e-3
    # quantiles of N(0, 1): 2.5%, 16%, 50%, 84%, 97.5%
    np.testing.assert_allclose(np.quantile(noise, [0.025, 0.16, 0.5, 0.84, 0.975]), [-1.96, -0.994, 0, 0.994, 1.96], atol=0.01)
    # the two halves of each Box-Muller pair are uncorrelated
    assert abs(np.corrcoef(noise[:500_000], noise[500_000:])[0, 1]) < 5e-3


def test_stand_in_with_standard_normal_is_used_as_is():
    class StandIn:
        def standard_normal(self, size, dtype):
            return np.arange(np.prod(size), dtype=dtype).reshape(size)

    np.testing.assert_array_equal(randn((2, 3), StandIn()), np.arange(6, dtype=np.float32).reshape(2, 3))


def test_generator_list_draws_one_batch_item_each():
    noise = randn((2, 3), [np.random.default_rng(1), np.random.default_rng(2)])
    np.testing.assert_array_equal(noise[1:], randn((1, 3), np.random.default_rng(2)))
    with pytest.raises(ValueError, match="one per batch item"):
        randn((3, 3), [np.random.default_rng(1), np.random.default_rng(2)])
    # a list of one is the generator itself (diffusers' rule)
    np.testing.assert_array_equal(randn((2, 3), [np.random.default_rng(5)]), randn((2, 3), np.random.default_rng(5)))


def test_hook_object_supplies_the_noise():
    class Fixed:
        calls = 0

        def randn(self, shape, dtype):
            Fixed.calls += 1
            return np.full(shape, 0.5, dtype=dtype)

    noise = randn((2, 2), Fixed())
    assert Fixed.calls == 1 and np.all(noise == 0.5)

    class WrongShape:
        def randn(self, shape, dtype):
            return np.zeros((1,), dtype)

    with pytest.raises(ValueError, match="shape"):
        randn((2, 2), WrongShape())


@pytest.mark.parametrize(
    "class_name, step_kwargs",
    [
        ("DDPMScheduler", {}),
        ("DDIMScheduler", {"eta": 1.0}),
        ("EulerAncestralDiscreteScheduler", {}),
        ("KDPM2AncestralDiscreteScheduler", {}),
        ("LCMScheduler", {}),
        ("TCDScheduler", {}),
    ],
)
def test_stochastic_schedulers_are_reproducible_with_a_seeded_generator(class_name, step_kwargs):
    def run(seed):
        scheduler = ds.SCHEDULERS[class_name]()
        scheduler.set_timesteps(4)
        generator = np.random.default_rng(seed)
        sample = np.ones((1, 4, 4, 4), np.float32) * np.float32(scheduler.init_noise_sigma)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(sample, t)
            sample = scheduler.step(0.1 * model_input, t, sample, generator=generator, **step_kwargs).prev_sample
        return sample

    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))


def test_sde_dpmsolver_uses_the_generator():
    scheduler = ds.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    scheduler.set_timesteps(3)
    outs = []
    for seed in (0, 0, 1):
        scheduler.set_timesteps(3)
        t = scheduler.timesteps[0]
        outs.append(scheduler.step(np.zeros((1, 4, 2, 2), np.float32), t, np.ones((1, 4, 2, 2), np.float32),
                                   generator=np.random.default_rng(seed)).prev_sample)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])
