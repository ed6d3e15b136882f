"""Configs: switching classes with from_config (as diffusers does), the registry, short names, load / save."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

import diffusers
import diffship.schedulers as ds
from diffship.errors import DiffshipError
from diffship.schedulers.config import init_keys

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CLASS_NAMES = sorted(ds.SCHEDULERS)
# Classes switch into one another within a kind: noise prediction (the UNet families) or flow matching (SD3, Flux).
NOISE_CLASSES = sorted(ds.schedulers_for(ds.NOISE))
FLOW_MATCHING_CLASSES = sorted(ds.registry.FLOW_MATCHING)

# What a real pipeline's scheduler_config.json looks like (SD 1.5's PNDM), plus a few class-specific keys set away
# from their defaults so that carrying them across classes is exercised.
SOURCE_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "v_prediction",
    "solver_order": 3,
}


# SD3's scheduler_config.json, with one key set away from its default that only FlowMatchEuler takes.
FLOW_SOURCE_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_exponential_sigmas": True}


def _source(lib, class_name, source_config=None):
    source_config = SOURCE_CONFIG if source_config is None else source_config
    cls = getattr(lib, class_name) if lib is diffusers else ds.SCHEDULERS[class_name]
    keys = init_keys(cls)
    return cls.from_config({k: v for k, v in source_config.items() if k in keys})


SWITCHES = [
    *[(source, target) for source in NOISE_CLASSES for target in NOISE_CLASSES],
    *[(source, target) for source in FLOW_MATCHING_CLASSES for target in FLOW_MATCHING_CLASSES],
]


@pytest.mark.parametrize("source, target", SWITCHES)
def test_from_config_switches_class_like_diffusers(source, target):
    """`Target.from_config(source_scheduler.config)` takes the same values in diffship as in diffusers, including
    which keys fall back to the target's own defaults (`_use_default_values`). Within a kind: a flow-matching
    scheduler is no replacement for a noise-prediction one (test_switching_kinds_*)."""
    _check_switch(source, target, FLOW_SOURCE_CONFIG if source in FLOW_MATCHING_CLASSES else SOURCE_CONFIG)


def _check_switch(source, target, source_config, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(diffusers, target).from_config(_source(diffusers, source, source_config).config, **overrides)
    ours = ds.SCHEDULERS[target].from_config(_source(ds, source, source_config).config, **overrides)
    assert type(ours).__name__ == target
    for key in init_keys(type(ours)) - {"trained_betas", "solver_p"}:
        assert ours.config[key] == ref.config[key], f"{source} -> {target}: {key}"
    assert ours.config["_class_name"] == target
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    # atol near t = 0 as in parity.assert_schedules_equal: KDPM2 ancestral's last interpolated timestep is
    # sigma_to_t of a sigma within rounding of the smallest training sigma, so t is 0 or a few 1e-6 above it
    np.testing.assert_allclose(
        np.asarray(ours.timesteps, dtype=np.float64), ref.timesteps.numpy().astype(np.float64), rtol=1e-6, atol=1e-4
    )
    return ours


FLOW_SOLVER_SETTINGS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}


@pytest.mark.parametrize("target", sorted(set(ds.schedulers_for(ds.FLOW)) - set(FLOW_MATCHING_CLASSES)))
@pytest.mark.parametrize("source", FLOW_MATCHING_CLASSES)
def test_flow_model_switches_to_a_solver_configured_for_flow(source, target):
    """What SD3 / Flux users do in diffusers: `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
    use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)`; the result drives a flow model."""
    ours = _check_switch(source, target, FLOW_SOURCE_CONFIG, **FLOW_SOLVER_SETTINGS)
    assert ds.scheduler_kind(ours) == ds.FLOW
    assert ds.scheduler_kind(ds.SCHEDULERS[target].from_config(ours.config, prediction_type="epsilon")) == ds.NOISE


@pytest.mark.parametrize("source, target", [("PNDMScheduler", "FlowMatchEulerDiscreteScheduler"),
                                            ("FlowMatchEulerDiscreteScheduler", "EulerDiscreteScheduler")])
def test_switching_kinds_builds_what_diffusers_builds_and_the_kind_tells_them_apart(source, target):
    """from_config across kinds is diffusers' (it ignores the other kind's keys), but the result is of the other
    kind, which the pipelines refuse (DiffusionPipeline.scheduler, registry.check_scheduler_kind)."""
    source_config = FLOW_SOURCE_CONFIG if source in FLOW_MATCHING_CLASSES else SOURCE_CONFIG
    ours = _check_switch(source, target, source_config)
    assert ds.scheduler_kind(ours) != ds.scheduler_kind(_source(ds, source, source_config))


def test_scheduler_kinds():
    assert {name: ds.scheduler_kind(cls()) for name, cls in ds.SCHEDULERS.items()} == {
        name: ds.FLOW if name.startswith("FlowMatch") else ds.NOISE for name in ds.SCHEDULERS
    }
    assert ds.scheduler_kind({"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction"}) == ds.FLOW
    # a class without flow sigmas is no flow scheduler whatever its prediction_type says
    assert ds.scheduler_kind({"_class_name": "EulerDiscreteScheduler", "prediction_type": "flow_prediction"}) == ds.NOISE
    # a prediction_type carried along unused by a class that does not take it says nothing
    assert ds.scheduler_kind({"_class_name": "FlowMatchHeunDiscreteScheduler", "prediction_type": "epsilon"}) == ds.FLOW
    assert sorted(ds.schedulers_for(ds.FLOW)) == sorted([
        "DEISMultistepScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler", *FLOW_MATCHING_CLASSES,
    ])
    assert set(ds.schedulers_for(ds.NOISE)) == set(ds.SCHEDULERS) - set(FLOW_MATCHING_CLASSES)
    assert ds.FlowMatchEulerDiscreteScheduler().compatibles == [ds.SCHEDULERS[n] for n in ds.schedulers_for(ds.FLOW)]
    assert ds.FlowMatchEulerDiscreteScheduler not in ds.EulerDiscreteScheduler().compatibles


def test_flow_short_names_on_a_flow_model_config_match_diffusers_switch():
    """flow-dpm++2m on SD3's config is what SD3 users build in diffusers with use_flow_sigmas, flow_prediction and
    flow_shift = the model's shift."""
    ours = ds.scheduler_by_name("flow-dpm++2m", ds.FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(
        diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config, **FLOW_SOLVER_SETTINGS)
    for key in init_keys(type(ours)) - {"trained_betas"}:
        assert ours.config[key] == ref.config[key], key
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    # on a noise model's config they are flow schedulers all the same: the UNet pipelines refuse them
    assert ds.scheduler_kind(ds.scheduler_by_name("flow-unipc", SOURCE_CONFIG)) == ds.FLOW


def test_check_scheduler_kind_names_what_fits():
    with pytest.raises(DiffshipError, match="flow-matching scheduler.*EulerDiscreteScheduler"):
        ds.check_scheduler_kind(ds.FlowMatchEulerDiscreteScheduler(), ds.NOISE, "StableDiffusionPipeline")
    with pytest.raises(DiffshipError, match="configured for flow matching"):
        ds.check_scheduler_kind(ds.UniPCMultistepScheduler(**FLOW_SOLVER_SETTINGS), ds.NOISE, "StableDiffusionPipeline")
    with pytest.raises(DiffshipError, match="flow-euler.*use_flow_sigmas=True"):
        ds.check_scheduler_kind(ds.EulerDiscreteScheduler(), ds.FLOW, "FluxPipeline")
    ds.check_scheduler_kind(ds.DPMSolverMultistepScheduler(**FLOW_SOLVER_SETTINGS), ds.FLOW, "FluxPipeline")
    ds.check_scheduler_kind(ds.DDIMScheduler(), ds.NOISE, "StableDiffusionPipeline")


def test_unet_pipelines_refuse_a_flow_matching_scheduler():
    """The check runs wherever a pipeline's scheduler is set: the constructor, from_pretrained, `pipe.scheduler =`."""
    from diffship.pipelines.base import DiffusionPipeline
    from diffship import StableDiffusionPipeline

    assert DiffusionPipeline.denoiser_kind == ds.NOISE
    pipe = StableDiffusionPipeline.__new__(StableDiffusionPipeline)  # no model needed for the check
    pipe.scheduler = ds.scheduler_by_name("dpm++2m-karras", SOURCE_CONFIG)
    with pytest.raises(DiffshipError, match="StableDiffusionPipeline runs a noise-prediction model"):
        pipe.scheduler = ds.scheduler_by_name("flow-euler", SOURCE_CONFIG)
    assert isinstance(pipe.scheduler, ds.DPMSolverMultistepScheduler)  # the refused one was not set


def test_config_of_one_class_round_trips_through_another():
    """Keys another class does not take are carried along, so switching back restores them (diffusers' rule)."""
    pndm = ds.PNDMScheduler.from_config(SOURCE_CONFIG | {"solver_order": 2})
    euler = ds.EulerDiscreteScheduler.from_config(pndm.config)
    back = ds.PNDMScheduler.from_config(euler.config)
    assert back.config.skip_prk_steps is True and back.config.set_alpha_to_one is False
    assert euler.config.skip_prk_steps is True  # carried, unused


def test_frozen_config_reads_like_diffusers():
    scheduler = ds.DDIMScheduler(beta_schedule="scaled_linear")
    config = scheduler.config
    assert config.beta_schedule == config["beta_schedule"] == "scaled_linear"
    with pytest.raises(TypeError):
        config["beta_schedule"] = "linear"
    with pytest.raises(TypeError):
        config.beta_schedule = "linear"
    with pytest.raises(AttributeError):
        config.no_such_key
    json.dumps(dict(config))


def test_scheduler_from_config_picks_class_from_class_name():
    config = {"_class_name": "EulerAncestralDiscreteScheduler", "_diffusers_version": "0.21.0", **SOURCE_CONFIG}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # keys of other schedulers are not worth a warning
        scheduler = ds.scheduler_from_config(config)
    assert isinstance(scheduler, ds.EulerAncestralDiscreteScheduler)
    assert scheduler.config.prediction_type == "v_prediction"
    assert isinstance(ds.scheduler_from_config(config, class_name="DDIMScheduler"), ds.DDIMScheduler)


def test_unknown_class_name_is_a_diffship_error_listing_supported_names():
    with pytest.raises(DiffshipError) as error:
        ds.scheduler_from_config({"_class_name": "FancyScheduler"})
    message = str(error.value)
    assert "FancyScheduler" in message
    for name in CLASS_NAMES:
        assert name in message
    with pytest.raises(DiffshipError, match="_class_name"):
        ds.scheduler_from_config({"beta_schedule": "linear"})


def test_dpmsolver_sde_is_refused_with_the_reason():
    with pytest.raises(DiffshipError, match="torchsde"):
        ds.scheduler_from_config({"_class_name": "DPMSolverSDEScheduler"})
    with pytest.raises(DiffshipError, match="dpm\\+\\+2m-sde"):
        ds.scheduler_by_name("DPMSolverSDEScheduler")


def test_unknown_keys_give_one_warning_listing_them_all():
    with pytest.warns(UserWarning) as record:
        scheduler = ds.EulerDiscreteScheduler.from_config({"beta_schedule": "scaled_linear", "foo": 1, "bar_baz": 2})
    ignored = [w for w in record if "ignoring config keys" in str(w.message)]
    assert len(ignored) == 1
    assert "foo" in str(ignored[0].message) and "bar_baz" in str(ignored[0].message)
    assert scheduler.config.beta_schedule == "scaled_linear"


def test_from_config_kwargs_override_config_values():
    scheduler = ds.DPMSolverMultistepScheduler.from_config(SOURCE_CONFIG, use_karras_sigmas=True)
    assert scheduler.config.use_karras_sigmas is True
    assert scheduler.config.solver_order == 3


def test_save_and_load_round_trip(tmp_path):
    scheduler = ds.DPMSolverMultistepScheduler.from_config(SOURCE_CONFIG, use_karras_sigmas=True)
    scheduler.save_pretrained(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DPMSolverMultistepScheduler"
    assert "_use_default_values" not in saved
    for loaded in (
        ds.DPMSolverMultistepScheduler.from_pretrained(tmp_path / "scheduler"),
        ds.DPMSolverMultistepScheduler.from_pretrained(tmp_path),  # a pipeline dir with scheduler/
        ds.DPMSolverMultistepScheduler.from_pretrained(tmp_path, subfolder="scheduler"),
    ):
        assert {k: loaded.config[k] for k in init_keys(type(loaded))} == {
            k: scheduler.config[k] for k in init_keys(type(scheduler))
        }
    # diffusers reads what diffship writes, and the other way round
    ref = diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path / "scheduler")
    assert ref.config.use_karras_sigmas is True and ref.config.solver_order == 3
    ref.save_pretrained(tmp_path / "from_diffusers")
    ours = ds.scheduler_from_config(ds.Scheduler.load_config(tmp_path / "from_diffusers"))
    assert isinstance(ours, ds.DPMSolverMultistepScheduler) and ours.config.use_karras_sigmas is True


def test_from_pretrained_without_a_config_is_a_diffship_error(tmp_path):
    with pytest.raises(DiffshipError, match="scheduler_config.json"):
        ds.EulerDiscreteScheduler.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", sorted(ds.SHORT_NAMES))
def test_scheduler_by_name(name):
    class_name, overrides = ds.SHORT_NAMES[name]
    flow = ds.scheduler_kind({"_class_name": class_name, **overrides}) == ds.FLOW
    scheduler = ds.scheduler_by_name(name, FLOW_SOURCE_CONFIG if flow else SOURCE_CONFIG)
    assert type(scheduler).__name__ == class_name
    for key, value in overrides.items():
        assert scheduler.config[key] == value
    if flow:  # the model's shift is kept (a solver's flow_shift)
        assert scheduler.config.get("flow_shift", scheduler.config.shift) == 3.0
        if "use_exponential_sigmas" in init_keys(type(scheduler)):  # a short name's own spacing, not the base's
            assert scheduler.config.use_exponential_sigmas is False
    else:
        assert scheduler.config.beta_schedule == "scaled_linear"  # the model's schedule is kept
    assert ds.scheduler_kind(scheduler) == (ds.FLOW if flow else ds.NOISE)
    scheduler.set_timesteps(4)


def test_scheduler_by_name_spellings_and_flags():
    assert isinstance(ds.scheduler_by_name("Euler_A", {}), ds.EulerAncestralDiscreteScheduler)
    assert isinstance(ds.scheduler_by_name("DPM++ 2M Karras", {}), ds.DPMSolverMultistepScheduler)
    assert ds.scheduler_by_name("dpm++2m_karras", {}).config.use_karras_sigmas is True
    # a plain name turns off the base config's Karras spacing
    assert ds.scheduler_by_name("euler", {"use_karras_sigmas": True}).config.use_karras_sigmas is False
    assert isinstance(ds.scheduler_by_name("UniPCMultistepScheduler", {}), ds.UniPCMultistepScheduler)
    with pytest.raises(DiffshipError, match="euler-a"):
        ds.scheduler_by_name("euler-b", {})


def test_schedulers_import_no_torch():
    code = (
        "import sys, diffship.schedulers as s; s.scheduler_by_name('dpm++2m-karras', {}).set_timesteps(5); "
        "[s.scheduler_by_name(n, {}).set_timesteps(5) for n in ('flow-euler', 'flow-heun')]; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
