"""DeepCache step caching: the export's two UNet graphs, the pipelines' `cache=` options, and images against the
DeepCache package's own implementation on diffusers (DeepCacheSDHelper, which replays each block's cached output at
the steps it skips), on both backends.

Oracle: diffusers + DeepCache 0.1.1 (`DeepCache` on PyPI; its helper wraps module forwards, which diffusers 0.42
still calls as it did). Its branch id 0..2 is the last up block's layer, as diffship's branch; its uniform schedule
is cache_start=0. Tolerance: 1e-3 max abs on images in [0, 1] (image_tasks.ATOL); correct runs show about 1e-6.
A shallow step fed the wrong skip or a stale time embedding shows 1e-2 or more.

Exports: the tiny SD 1.x model with DeepCache in both formats, SDXL's in ONNX only (OpenVINO runs it as well; its
conversion of the shallow graph is the one SD's checks), one each, shared through the `exported_dirs` fixture.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffship.errors import DiffshipError
from diffship.pipelines import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffship.pipelines.step_cache import DeepCache
from image_tasks import (
    ATOL,
    BACKENDS,
    ReferenceCache,
    TorchNoise,
    latents,
    mask_image,
    max_abs,
    one_torch_thread,
    report,
    rgb_image,
)

STEPS = 7  # interval 3: full steps 0, 3, 6; shallow 1, 2, 4, 5
PROMPT = "a red circle on the left"
FORMATS = {"sd1": ("onnx", "openvino"), "sdxl": ("onnx",)}
PIPELINES = {"sd1": ("StableDiffusionPipeline", StableDiffusionPipeline),
             "sdxl": ("StableDiffusionXLPipeline", StableDiffusionXLPipeline)}
_REFERENCES = ReferenceCache()


def _export(exported_dirs, kind):
    return exported_dirs(kind, FORMATS[kind], deepcache=True)


def _load(cls, exported_dirs, kind, backend):
    from diffship.schedulers import DDIMScheduler

    pipe = cls.from_pretrained(_export(exported_dirs, kind), backend=backend, inference_precision="f32")
    # DDIM: one timestep per step (DeepCache finds a step by its timestep; PNDM repeats one).
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_deepcache(tiny_model_dirs, kind, cls_name, interval, **kwargs):
    """diffusers' images with DeepCache's helper at branch 0 (interval 1: every step full, DeepCache off)."""
    import diffusers
    from DeepCache import DeepCacheSDHelper

    def run():
        pipe = getattr(diffusers, cls_name).from_pretrained(tiny_model_dirs(kind))
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=0)
        helper.enable()
        args = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
        with one_torch_thread():
            images = pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                          output_type="np", **args).images
        helper.disable()
        return images

    return _REFERENCES.get((kind, cls_name, interval, repr(sorted(kwargs))), run)


# ---- the export ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl-lcm"])
def test_shallow_unet_is_diffusers_unet_on_the_cached_feature(kind, tiny_model_dirs):
    """The shallow module, at every branch, against diffusers' own forward with the deep feature put in place of
    the one it computes (a pre-hook on the layer that takes it): exactly what a cached step must give. sd1's outer
    blocks have no attention, sd2's do; SDXL-LCM adds text_embeds, time_ids and timestep_cond."""
    from diffusers import UNet2DConditionModel

    from diffship.exporters.components import _UNetShallow, _UNetWithDeepFeatures, deepcache_branches

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dirs(kind) / "unet").eval()
    config = unet.config
    g = torch.Generator().manual_seed(0)

    def inputs(t):  # latent 9x9: not a multiple of the up factor
        feeds = {"sample": torch.randn(2, config.in_channels, 9, 9, generator=g), "timestep": torch.tensor(t),
                 "encoder_hidden_states": torch.randn(2, 7, config.cross_attention_dim, generator=g)}
        if config.addition_embed_type == "text_time":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            feeds.update(text_embeds=torch.randn(2, pooled, generator=g), time_ids=torch.randn(2, 6, generator=g))
        if config.time_cond_proj_dim:
            feeds["timestep_cond"] = torch.randn(2, config.time_cond_proj_dim, generator=g)
        return feeds

    full_step, cached_step = inputs(700.0), inputs(600.0)
    conditioning = list(full_step)[2:]
    assert deepcache_branches(unet) == 2  # layers_per_block 1: the last up block's two layers
    for branch in range(deepcache_branches(unet)):
        with torch.no_grad():
            out_sample, deep = _UNetWithDeepFeatures(unet, conditioning, branch)(*full_step.values())
            assert torch.equal(out_sample, unet(**_unet_kwargs(full_step)).sample)
            shallow = _UNetShallow(unet, conditioning, branch)(*cached_step.values(), deep)

            def put_cached(module, args):
                return (torch.cat([deep, args[0][:, deep.shape[1]:]], dim=1), *args[1:])

            hook = unet.up_blocks[-1].resnets[-1 - branch].register_forward_pre_hook(put_cached)
            expected = unet(**_unet_kwargs(cached_step)).sample
            hook.remove()
        assert max_abs(shallow, expected) < 1e-5, (kind, branch)


def _unet_kwargs(feeds):
    kwargs = dict(feeds)
    added = {k: kwargs.pop(k) for k in ("text_embeds", "time_ids") if k in kwargs}
    return {**kwargs, "added_cond_kwargs": added or None}


def test_export_report_and_graphs(exported_dirs):
    """The UNet outputs out_sample then deep_features; unet_shallow takes the UNet's inputs (those its layers do
    not read too: SDXL's shallow path has no cross-attention) and deep_features; both validated on each format at
    every shape, the latent the up factor does not divide among them; the report says which branch."""
    from diffship.runtimes.onnxruntime import OnnxRuntimeSession

    for kind in FORMATS:
        out = _export(exported_dirs, kind)
        report_ = json.loads((out / "export_report.json").read_text())
        assert report_["deepcache"] == {"branch": 0, "output": "deep_features", "component": "unet_shallow"}
        unet, shallow = report_["components"]["unet"], report_["components"]["unet_shallow"]
        assert unet["outputs"] == ["out_sample", "deep_features"]
        assert shallow["inputs"] == unet["inputs"] + ["deep_features"] and shallow["outputs"] == ["out_sample"]
        for entry in (unet, shallow):
            assert set(entry["validation"]) == {"onnxruntime", "openvino"} & {
                {"onnx": "onnxruntime", "openvino": "openvino"}[f] for f in FORMATS[kind]}
            for figures in entry["validation"].values():
                assert figures["passed"] and figures["max_abs"] < 1e-4
                assert {tuple(case["inputs"]["sample"][2:]) for case in figures["cases"]} >= {(8, 8), (9, 9)}
        session = OnnxRuntimeSession(out / "unet_shallow")
        assert [i.name for i in session.inputs] == shallow["inputs"]
        assert json.loads((out / "unet_shallow" / "config.json").read_text())["deepcache_branch"] == 0


def test_plain_export_is_unchanged(exported_dirs):
    report_ = json.loads((exported_dirs("sd1") / "export_report.json").read_text())
    assert "deepcache" not in report_ and "unet_shallow" not in report_["components"]
    assert report_["components"]["unet"]["outputs"] == ["out_sample"]


def test_export_argument_errors(tiny_model_dirs, tmp_path):
    from diffship.cli import build_parser
    from diffship.exporters import export

    with pytest.raises(ValueError, match=r"deepcache_branch must be from 0 to 1 for this UNet .*got 2"):
        export(tiny_model_dirs("sd1"), tmp_path / "out", deepcache=True, deepcache_branch=2)
    with pytest.raises(ValueError, match=r"^deepcache_branch is DeepCache's: give deepcache too"):
        export(tiny_model_dirs("sd1"), tmp_path / "out", deepcache_branch=1)
    with pytest.raises(ValueError, match=r"^deepcache must be True or False"):
        export(tiny_model_dirs("sd1"), tmp_path / "out", deepcache="yes")
    assert not (tmp_path / "out").exists()
    args = build_parser().parse_args(["export", "model", "out", "--deepcache", "--deepcache-branch", "1"])
    assert args.deepcache and args.deepcache_branch == 1


# ---- the pipelines ---------------------------------------------------------------------------------------------

def test_schedule():
    assert [DeepCache(3, 0).is_full_step(i) for i in range(7)] == [1, 0, 0, 1, 0, 0, 1]
    assert [DeepCache(2, 3).is_full_step(i) for i in range(8)] == [1, 1, 1, 1, 0, 1, 0, 1]
    assert all(DeepCache(1, 0).is_full_step(i) for i in range(5))


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_deepcache_matches_diffusers_with_deepcache(backend, kind, tiny_model_dirs, exported_dirs):
    """Images with cache="deepcache" against diffusers with DeepCache's helper; cache_interval=1 is the uncached
    generation exactly; shallow steps are timed apart from the full ones."""
    cls_name, cls = PIPELINES[kind]
    pipe = _load(cls, exported_dirs, kind, backend)
    start = latents(batch=1)
    run = lambda **kw: pipe(PROMPT, num_inference_steps=STEPS, latents=start, generator=TorchNoise(0),  # noqa: E731
                            output_type="np", **kw)
    cached = run(cache="deepcache", cache_interval=3)
    expected = _diffusers_deepcache(tiny_model_dirs, kind, cls_name, 3, latents=start)
    diff = max_abs(expected, cached.images)
    report(f"deepcache {kind} {backend}", diff)
    assert diff < ATOL
    assert (cached.timings["unet_steps"], cached.timings["unet_shallow_steps"]) == (3, 4)
    assert cached.timings["unet_shallow"] > 0

    uncached = run()
    assert np.array_equal(run(cache="deepcache", cache_interval=1).images, uncached.images)
    assert "unet_shallow" not in uncached.timings
    assert max_abs(uncached.images, cached.images) > 1e-3  # the cached steps did change the images


def test_deepcache_image_to_image_and_inpainting(tiny_model_dirs, exported_dirs):
    """Image-to-image against diffusers with DeepCache (the first step of the strength's tail runs in full); a
    4-channel inpainting UNet keeps the original outside the mask after the shallow steps too; cache_start keeps
    the first steps full."""
    pipe = _load(StableDiffusionImg2ImgPipeline, exported_dirs, "sd1", "onnxruntime")
    image = rgb_image()
    result = pipe(PROMPT, image=image, strength=0.8, num_inference_steps=STEPS, generator=TorchNoise(0),
                  output_type="np", cache="deepcache", cache_interval=2)
    expected = _diffusers_deepcache(tiny_model_dirs, "sd1", "StableDiffusionImg2ImgPipeline", 2, image=image,
                                    strength=0.8)
    diff = max_abs(expected, result.images)
    report("deepcache sd1 img2img onnxruntime", diff)
    assert diff < ATOL
    assert (result.timings["unet_steps"], result.timings["unet_shallow_steps"]) == (3, 2)  # 5 steps: 0, 2, 4 full

    inpaint = StableDiffusionInpaintPipeline.from_pipe(pipe)
    kwargs = dict(image=image, mask_image=mask_image(), num_inference_steps=STEPS, generator=0, output_type="np")
    cached = inpaint(PROMPT, cache="deepcache", cache_interval=3, cache_start=2, **kwargs)
    assert (cached.timings["unet_steps"], cached.timings["unet_shallow_steps"]) == (4, 3)  # 0, 1, 2, 5 full
    assert np.array_equal(inpaint(PROMPT, cache="deepcache", cache_interval=1, **kwargs).images,
                          inpaint(PROMPT, **kwargs).images)


def test_deepcache_static_shapes(exported_dirs):
    """OpenVINO with the graphs reshaped static: the shallow graph gets the UNet's batch and latent size."""
    pipe = _load(StableDiffusionPipeline, exported_dirs, "sd1", "openvino")
    kwargs = dict(num_inference_steps=STEPS, latents=latents(batch=1), generator=TorchNoise(0), output_type="np",
                  cache="deepcache")
    dynamic = pipe(PROMPT, **kwargs).images
    pipe.reshape(1, 64, 64)
    assert max_abs(pipe(PROMPT, **kwargs).images, dynamic) < ATOL


def test_cache_errors(exported_dirs):
    """One-line errors naming the argument, before any graph runs."""
    plain = StableDiffusionPipeline.from_pretrained(exported_dirs("sd1"))
    with pytest.raises(DiffshipError, match=r"^cache='deepcache' needs the unet_shallow graph, which .* does not "
                                            r"have: export the model with --deepcache$"):
        plain(PROMPT, num_inference_steps=2, cache="deepcache")
    pipe = StableDiffusionPipeline.from_pretrained(_export(exported_dirs, "sd1"))
    for kwargs, message in [
        ({"cache": "fast"}, r"^cache must be None, a StepCache or one of 'deepcache', 'taylorseer', got 'fast'$"),
        ({"cache": "deepcache", "cache_interval": 0}, r"^cache_interval must be an integer of at least 1, got 0$"),
        ({"cache": "deepcache", "cache_interval": 2.5}, r"^cache_interval must be an integer"),
        ({"cache": "deepcache", "cache_start": -1}, r"^cache_start must be an integer of at least 0, got -1$"),
    ]:
        with pytest.raises(ValueError, match=message):
            pipe(PROMPT, num_inference_steps=2, **kwargs)
