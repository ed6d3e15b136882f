"""TaylorSeer step caching on every family: the denoiser's output forecast between full steps, against diffusers'
own TaylorSeer (diffusers.hooks.taylorseer_cache) on the same inputs, on the suite's shared exports (no graph of
its own is needed).

Oracle: diffusers' TaylorSeerCacheConfig hooked on the denoiser's output layer (`cache_identifiers`: the UNet's
conv_out, the transformers' proj_out, which is what its "lite" mode caches: the output up to a reshape), its
factors in float32 (diffusers' default, bfloat16, rounds them; diffship keeps float32). The other layers still run
in diffusers, so its output at a forecast step is exactly the forecast of the denoiser's output. Tolerance: 1e-3
max abs on images in [0, 1] (image_tasks.ATOL); correct runs show about 1e-6. A forecast off by one step, or a
factor not divided by the steps between full steps, moves the images by more than 1e-2 here (each case is also
checked to differ from the uncached run by more than that).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffship.errors import DiffshipError
from diffship.pipelines import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
from diffship.pipelines.step_cache import DeepCache, TaylorSeer
from image_tasks import check_parity, diffship_images, max_abs, one_torch_thread
from test_flux import flux_export, flux_latents
from test_sd3 import sd3_latents

PROMPTS = ["a red circle on the left", "a photo of a cat"]
# family -> (tiny kind, diffusers class, the denoiser's attribute, its output layer, diffship class)
FAMILIES = {
    "sd1": ("sd1", "StableDiffusionPipeline", "unet", "conv_out", StableDiffusionPipeline),
    "sd3": ("sd3", "StableDiffusion3Pipeline", "transformer", "proj_out", StableDiffusion3Pipeline),
    "flux": ("flux", "FluxPipeline", "transformer", "proj_out", FluxPipeline),
}


def _export(exported_dirs, family):
    return flux_export(exported_dirs, "flux") if family == "flux" else exported_dirs(FAMILIES[family][0])


def _call_arguments(family: str, steps: int) -> dict:
    if family == "sd1":
        rng = np.random.default_rng(0)
        return dict(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=7.5,
                    latents=rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    if family == "sd3":
        return dict(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=5.0, latents=sd3_latents(2, 64, 64))
    return dict(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=3.5, height=64, width=64,
                max_sequence_length=48, latents=flux_latents(2, 64, 64))


def _diffusers_taylorseer(tiny_model_dirs, family, interval, start, order, end, **kwargs):
    """diffusers' images with its TaylorSeer hooked on a fresh pipeline (the hooks and their state stay on the
    module, so no other test shares it)."""
    import diffusers
    from diffusers.hooks.hooks import CacheContext, _set_cache_context
    from diffusers.hooks.taylorseer_cache import TaylorSeerCacheConfig, apply_taylorseer_cache

    kind, class_name, denoiser_name, output_layer, _ = FAMILIES[family]
    pipe = getattr(diffusers, class_name).from_pretrained(tiny_model_dirs(kind))
    if family == "sd1":  # one timestep per step (PNDM repeats one)
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(pipe, denoiser_name)
    config = TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=start, max_order=order,
                                   disable_cache_after_step=end, taylor_factors_dtype=torch.float32,
                                   cache_identifiers=[output_layer])
    apply_taylorseer_cache(denoiser, config)
    # FluxPipeline names each denoiser call's context itself; the others call the denoiser without one.
    _set_cache_context(denoiser, CacheContext("generation"))
    kwargs = dict(kwargs, latents=torch.from_numpy(kwargs["latents"]))
    with one_torch_thread():
        return pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def _diffship(exported_dirs, family, backend, calls=None, **kwargs):
    pipe = FAMILIES[family][4].from_pretrained(_export(exported_dirs, family), backend=backend,
                                               inference_precision="f32")
    if family == "sd1":
        from diffship.schedulers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if calls is not None:  # count the denoiser's runs
        session = pipe.sessions[pipe.denoiser]
        real_run = session.run
        session.run = lambda feeds: calls.append(1) or real_run(feeds)
    return diffship_images(pipe, **kwargs)


# family, backend, steps, (interval, start, order, end), full steps
CASES = [
    ("sd1", "onnxruntime", 9, (3, 2, 1, None), [0, 1, 3, 6]),
    ("sd1", "openvino", 9, (3, 2, 1, None), [0, 1, 3, 6]),
    ("sd1", "onnxruntime", 10, (2, 3, 2, 8), [0, 1, 2, 4, 6, 8, 9]),
    ("sd3", "onnxruntime", 10, (5, 3, 1, None), [0, 1, 2, 4, 9]),  # diffusers' defaults
    ("sd3", "openvino", 10, (5, 3, 1, None), [0, 1, 2, 4, 9]),
    ("flux", "onnxruntime", 8, (2, 2, 2, None), [0, 1, 3, 5, 7]),
]


@pytest.mark.parametrize("family,backend,steps,config,full_steps", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}steps-{'-'.join(map(str, c[3]))}" for c in CASES])
def test_taylorseer_matches_diffusers(family, backend, steps, config, full_steps, tiny_model_dirs, exported_dirs):
    interval, start, order, end = config
    kwargs = _call_arguments(family, steps)
    expected = _diffusers_taylorseer(tiny_model_dirs, family, interval, start, order, end, **kwargs)
    calls = []
    cache = "taylorseer" if order == 1 and end is None else TaylorSeer(interval, start, order=order, end=end)
    options = dict(cache_interval=interval, cache_start=start) if isinstance(cache, str) else {}
    got = _diffship(exported_dirs, family, backend, calls, cache=cache, **options, **kwargs)
    check_parity(f"taylorseer {family} {backend} {steps} steps {config}", expected, got)
    assert len(calls) == len(full_steps)  # the denoiser ran at the full steps only
    assert TaylorSeer(interval, start, order, end).is_full_step(full_steps[-1])
    assert [i for i in range(steps) if TaylorSeer(interval, start, order, end).is_full_step(i)] == full_steps
    uncached = _diffship(exported_dirs, family, backend, **kwargs)
    assert max_abs(uncached, got) > 1e-2  # the forecast steps changed the picture: the cache did something


def test_taylorseer_defaults_and_a_configured_instance(exported_dirs):
    """cache="taylorseer" takes diffusers' defaults (a full step every 5 from step 3 on); a TaylorSeer given as
    `cache` serves several calls, each from an empty cache; the same settings give the same images both ways."""
    kwargs = _call_arguments("sd1", 10)
    by_name = _diffship(exported_dirs, "sd1", "onnxruntime", cache="taylorseer", **kwargs)
    explicit = _diffship(exported_dirs, "sd1", "onnxruntime", cache="taylorseer", cache_interval=5, cache_start=3,
                         **kwargs)
    configured = TaylorSeer(5, 3)
    pipe = StableDiffusionPipeline.from_pretrained(_export(exported_dirs, "sd1"), backend="onnxruntime",
                                                   inference_precision="f32")
    from diffship.schedulers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    first, second = (diffship_images(pipe, cache=configured, **kwargs) for _ in range(2))
    assert np.array_equal(by_name, explicit) and np.array_equal(by_name, first) and np.array_equal(first, second)
    assert configured.last_full_step is None  # the instance itself was never run: each call ran a fresh copy


def test_taylorseer_errors(exported_dirs):
    sd3 = StableDiffusion3Pipeline.from_pretrained(exported_dirs("sd3"), backend="onnxruntime")
    with pytest.raises(ValueError, match="cache='deepcache' runs on UNets; StableDiffusion3Pipeline's denoiser is "
                                         "its transformer: use cache='taylorseer'"):
        sd3("a cat", num_inference_steps=2, cache="deepcache")
    with pytest.raises(ValueError, match="cache must be None, a StepCache or one of 'deepcache', 'taylorseer'"):
        sd3("a cat", num_inference_steps=2, cache="taylor")
    with pytest.raises(ValueError, match="pass cache_interval and cache_start to the StepCache given as cache"):
        sd3("a cat", num_inference_steps=2, cache=TaylorSeer(2, 1), cache_interval=2)
    with pytest.raises(ValueError, match="cache_interval"):
        sd3("a cat", num_inference_steps=2, cache="taylorseer", cache_interval=0)
    with pytest.raises(ValueError, match="order"):
        TaylorSeer(order=0)
    with pytest.raises(ValueError, match=r"^interval must be an integer of at least 1, got 0$"):
        TaylorSeer(interval=0)
    with pytest.raises(ValueError, match="cache must be None, a StepCache or one of"):
        sd3("a cat", num_inference_steps=2, cache=["taylorseer"])
    sd1 = StableDiffusionPipeline.from_pretrained(exported_dirs("sd1"), backend="onnxruntime")
    with pytest.raises(DiffshipError, match="needs the unet_shallow graph"):  # DeepCache still needs its export
        sd1("a cat", num_inference_steps=2, cache=DeepCache())


def test_taylorseer_from_the_command_line(exported_dirs, tmp_path, capsys):
    """`diffship generate --cache taylorseer` draws what the Python API draws with the same settings, and its
    timing table counts the full steps only."""
    from PIL import Image

    from diffship.cli import main

    export = _export(exported_dirs, "sd3")
    out = tmp_path / "cli.png"
    assert main(["generate", str(export), "--prompt", "a cat", "--steps", "6", "--seed", "4", "--cache",
                 "taylorseer", "--cache-interval", "2", "--cache-start", "2", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "transformer (4 steps)" in printed  # full steps 0, 1, 3, 5; steps 2 and 4 forecast
    pipe = StableDiffusion3Pipeline.from_pretrained(export)
    expected = pipe("a cat", num_inference_steps=6, generator=4, cache="taylorseer", cache_interval=2,
                    cache_start=2).images[0]
    with Image.open(out) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
    assert main(["generate", str(export), "--prompt", "a cat", "--cache-interval", "0", "--out",
                 str(tmp_path / "x.png")]) == 2
    assert "--cache-interval must be an integer of at least 1" in capsys.readouterr().err
