"""ControlNet (`export(..., controlnet=...)`, `--controlnet MODEL`) against diffusers' ControlNet pipelines with the
same ControlNets, on both backends: text-to-image, image-to-image and inpainting on SD 1.x and SDXL, a
MultiControlNet of two, guess_mode, control_guidance_start/end; and the bad inputs.

Exports: the tiny SD 1.x pipeline once with two tiny ControlNets (controlnet/, controlnet_1/), the tiny SDXL
pipeline once with one, both to ONNX and OpenVINO. A single-ControlNet SD 1.x pipeline is built from the first
export's components (`controlnet=pipe.controlnets[0]`), as a user picks nets out of an export.

Tolerance: 1e-3 max abs on output_type="np" images in [0, 1] (image_tasks.ATOL, as every parity test); correct runs
show about 1e-6. The tiny ControlNets' zero convolutions are drawn at random (testing/tiny_controlnets.py), so each
changes the images by about 0.1 to 0.2: a residual dropped, added at the wrong level, scaled wrongly, or run on the
wrong half of the guidance batch shows far above the bound.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffship.cli import main
from diffship.errors import DiffshipError
from diffship.exporters import export
from diffship.pipelines import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
)
from diffship.testing.tiny_controlnets import save_tiny_controlnet
from image_tasks import (
    ATOL,
    BACKENDS,
    TorchNoise,
    check_parity,
    latents,
    mask_image,
    max_abs,
    one_torch_thread,
    rgb_image,
)

PROMPTS = ["a red circle on the left", "an oil painting of a castle at sunset"]
STEPS = 3
FORMATS = ["onnx", "openvino"]


@pytest.fixture(scope="module")
def controlnet_dirs(tiny_model_dirs, tmp_path_factory):
    """kind -> the tiny ControlNets of that tiny pipeline (SD 1.x: two, SDXL: one)."""
    root, cache = tmp_path_factory.mktemp("controlnets"), {}

    def get(kind):
        if kind not in cache:
            count = 2 if kind == "sd1" else 1
            cache[kind] = [save_tiny_controlnet(tiny_model_dirs(kind), root / f"{kind}-{i}", seed=5 + i)
                           for i in range(count)]
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def controlnet_exports(tiny_model_dirs, controlnet_dirs, tmp_path_factory):
    """kind -> the tiny pipeline exported with its ControlNets (one export per family)."""
    root, cache = tmp_path_factory.mktemp("controlnet-exports"), {}

    def get(kind):
        if kind not in cache:
            cache[kind] = export(tiny_model_dirs(kind), root / kind, FORMATS, progress=False,
                                 controlnet=controlnet_dirs(kind))
        return cache[kind]

    return get


_REFERENCES: dict = {}
_PIPES: dict = {}


def _reference(tiny_model_dirs, controlnet_dirs, kind, class_name, nets, **kwargs):
    """diffusers' images for `class_name` with the ControlNets `nets` (indices), computed once for both backends."""
    import diffusers
    import torch

    key = (kind, class_name, tuple(nets), repr(sorted((k, repr(v)) for k, v in kwargs.items())))
    if key not in _REFERENCES:
        if (kind, class_name, tuple(nets)) not in _PIPES:
            models = [diffusers.ControlNetModel.from_pretrained(controlnet_dirs(kind)[i]) for i in nets]
            extra = {"add_watermarker": False} if kind == "sdxl" else {"safety_checker": None}
            pipe = getattr(diffusers, class_name).from_pretrained(
                tiny_model_dirs(kind), controlnet=models[0] if len(models) == 1 else models, **extra)
            pipe.set_progress_bar_config(disable=True)
            _PIPES[kind, class_name, tuple(nets)] = pipe
        pipe = _PIPES[kind, class_name, tuple(nets)]
        kwargs = dict(kwargs)
        if kwargs.get("latents") is not None:
            kwargs["latents"] = torch.from_numpy(kwargs["latents"])
        with one_torch_thread():
            _REFERENCES[key] = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    return _REFERENCES[key]


def _ours(pipe_class, folder, backend, nets, **kwargs):
    pipe = pipe_class.from_pretrained(folder, backend=backend, inference_precision="f32")
    if len(nets) != len(pipe.controlnets):  # a subset of the export's ControlNets, from its components
        chosen = [pipe.controlnets[i] for i in nets]
        pipe = pipe_class(**{**pipe.components, "controlnet": chosen[0] if len(chosen) == 1 else chosen},
                          model_index=pipe.configs["model_index"])
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=TorchNoise(0), output_type="np", **kwargs).images


# case -> (kind, diffusers/diffship class name, ControlNets used, arguments). Control images at 40x64 (a 5x8 latent,
# which the tiny UNets' up factor 4 does not divide) and 64x64.
CASES = {
    "sd1 text-to-image": ("sd1", "StableDiffusionControlNetPipeline", [0], dict(
        prompt=PROMPTS, negative_prompt=["blurry", "dark"], image=rgb_image(40, 64, seed=3),
        num_inference_steps=STEPS, latents=latents(2, 40, 64), controlnet_conditioning_scale=0.8)),
    "sd1 multicontrolnet": ("sd1", "StableDiffusionControlNetPipeline", [0, 1], dict(
        prompt=PROMPTS, image=[rgb_image(64, 64, seed=3), rgb_image(64, 64, seed=4)], num_inference_steps=STEPS,
        latents=latents(2), controlnet_conditioning_scale=[0.7, 1.2])),
    "sd1 guess_mode": ("sd1", "StableDiffusionControlNetPipeline", [0], dict(
        prompt=PROMPTS[0], image=rgb_image(64, 64, seed=3), num_inference_steps=STEPS, latents=latents(1),
        guess_mode=True, guidance_scale=3.0)),
    "sd1 control_guidance_start/end": ("sd1", "StableDiffusionControlNetPipeline", [0, 1], dict(
        prompt=PROMPTS[1], image=[rgb_image(64, 64, seed=3), rgb_image(64, 64, seed=4)], num_inference_steps=4,
        latents=latents(1), control_guidance_start=[0.0, 0.3], control_guidance_end=[0.6, 1.0])),
    "sd1 image-to-image": ("sd1", "StableDiffusionControlNetImg2ImgPipeline", [0], dict(
        prompt=PROMPTS, image=rgb_image(40, 64, seed=1), control_image=rgb_image(40, 64, seed=3), strength=0.7,
        num_inference_steps=5)),
    "sd1 inpainting": ("sd1", "StableDiffusionControlNetInpaintPipeline", [0, 1], dict(
        prompt=PROMPTS[0], image=rgb_image(64, 64, seed=1), mask_image=mask_image(64, 64),
        control_image=[rgb_image(64, 64, seed=3), rgb_image(64, 64, seed=4)], num_inference_steps=STEPS,
        latents=latents(1))),
    "sdxl text-to-image": ("sdxl", "StableDiffusionXLControlNetPipeline", [0], dict(
        prompt=PROMPTS, negative_prompt=["blurry", "dark"], image=rgb_image(40, 64, seed=3),
        num_inference_steps=STEPS, latents=latents(2, 40, 64))),
    "sdxl guess_mode": ("sdxl", "StableDiffusionXLControlNetPipeline", [0], dict(
        prompt=PROMPTS[0], image=rgb_image(64, 64, seed=3), num_inference_steps=STEPS, latents=latents(1),
        guess_mode=True, controlnet_conditioning_scale=0.6, control_guidance_end=0.7)),
    "sdxl image-to-image": ("sdxl", "StableDiffusionXLControlNetImg2ImgPipeline", [0], dict(
        prompt=PROMPTS[1], image=rgb_image(64, 64, seed=1), control_image=rgb_image(64, 64, seed=3), strength=0.6,
        num_inference_steps=5)),
    "sdxl inpainting": ("sdxl", "StableDiffusionXLControlNetInpaintPipeline", [0], dict(
        prompt=PROMPTS[0], image=rgb_image(64, 64, seed=1), mask_image=mask_image(64, 64),
        control_image=rgb_image(64, 64, seed=3), num_inference_steps=STEPS, latents=latents(1))),
}
CLASSES = {cls.__name__: cls for cls in (
    StableDiffusionControlNetPipeline, StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline, StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetInpaintPipeline)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_controlnet_matches_diffusers(case, backend, tiny_model_dirs, controlnet_dirs, controlnet_exports):
    kind, class_name, nets, kwargs = CASES[case]
    expected = _reference(tiny_model_dirs, controlnet_dirs, kind, class_name, nets, **kwargs)
    got = _ours(CLASSES[class_name], controlnet_exports(kind), backend, nets, **kwargs)
    check_parity(f"controlnet {case} {backend}", expected, got)


def test_the_controlnets_change_the_images(tiny_model_dirs, controlnet_dirs, controlnet_exports):
    """Without ControlNet (a plain pipeline on the export: zero residuals) the images are diffusers' base model's,
    and far from the guided ones: the residuals reach the UNet."""
    import diffusers
    import torch

    kwargs = dict(prompt=PROMPTS, num_inference_steps=STEPS, latents=latents(2))
    base = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model_dirs("sd1"), safety_checker=None)
    base.set_progress_bar_config(disable=True)
    with one_torch_thread():
        expected = base(generator=torch.Generator().manual_seed(0), output_type="np",
                        **{**kwargs, "latents": torch.from_numpy(kwargs["latents"])}).images
    plain = StableDiffusionPipeline.from_pretrained(controlnet_exports("sd1"), inference_precision="f32")
    plain.set_progress_bar_config(disable=True)
    got = plain(generator=TorchNoise(0), output_type="np", **kwargs).images
    check_parity("controlnet export, plain pipeline (zero residuals)", expected, got)
    guided = _ours(StableDiffusionControlNetPipeline, controlnet_exports("sd1"), "onnxruntime", [0],
                   image=rgb_image(64, 64, seed=3), **kwargs)
    assert max_abs(got, guided) > 20 * ATOL


def test_the_export_layout_and_report(controlnet_exports, controlnet_dirs):
    folder = controlnet_exports("sd1")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionControlNetPipeline"
    assert index["controlnet"] == ["diffusers", "MultiControlNetModel"]
    report_ = json.loads((folder / "export_report.json").read_text())
    assert [c["path"] for c in report_["controlnets"]] == [str(p.resolve()) for p in controlnet_dirs("sd1")]
    net = report_["components"]["controlnet_1"]
    assert net["inputs"] == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale"]
    assert net["outputs"] == [f"down_block_res_samples.{i}" for i in range(6)] + ["mid_block_res_sample"]
    unet = report_["components"]["unet"]["inputs"]
    assert unet[3:] == [f"down_block_additional_residuals.{i}" for i in range(6)] + ["mid_block_additional_residual"]
    sdxl = json.loads((controlnet_exports("sdxl") / "export_report.json").read_text())["components"]["controlnet"]
    assert sdxl["inputs"] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids",
                              "controlnet_cond", "conditioning_scale"]
    for name in ("controlnet", "controlnet_1", "unet"):  # validated at the traced shapes and at others
        assert all(v["max_abs"] < 1e-3 for v in report_["components"][name]["validation"].values())


def test_autopipelines_choose_the_controlnet_pipelines(controlnet_exports):
    sd1, sdxl = controlnet_exports("sd1"), controlnet_exports("sdxl")
    assert AutoPipelineForText2Image.pipeline_class(sd1) is StableDiffusionControlNetPipeline
    assert AutoPipelineForImage2Image.pipeline_class(sd1) is StableDiffusionControlNetImg2ImgPipeline
    assert AutoPipelineForInpainting.pipeline_class(sd1) is StableDiffusionControlNetInpaintPipeline
    assert AutoPipelineForText2Image.pipeline_class(sdxl) is StableDiffusionXLControlNetPipeline
    assert AutoPipelineForImage2Image.pipeline_class(sdxl) is StableDiffusionXLControlNetImg2ImgPipeline
    assert AutoPipelineForInpainting.pipeline_class(sdxl) is StableDiffusionXLControlNetInpaintPipeline
    pipe = AutoPipelineForText2Image.from_pretrained(sd1)
    assert len(pipe.controlnets) == 2 and isinstance(pipe.controlnet, list)
    inpaint = AutoPipelineForInpainting.from_pipe(pipe)
    assert isinstance(inpaint, StableDiffusionControlNetInpaintPipeline) and inpaint.controlnets == pipe.controlnets


# ---- bad input -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd1_pipe(controlnet_exports):
    return StableDiffusionControlNetPipeline.from_pretrained(controlnet_exports("sd1"))


@pytest.mark.parametrize("arguments, message", [
    (dict(image=[rgb_image(64, 64)]), r"image: 1 conditioning images for 2 ControlNets"),
    (dict(image=[rgb_image(64, 64), rgb_image(40, 64)]),
     r"image: the conditioning images come out at different sizes \(40x64, 64x64\)"),
    (dict(image=[[rgb_image(64, 64)] * 3, rgb_image(64, 64)]), r"image\[0\] holds 3 images for 2 prompts"),
    (dict(image=[np.zeros((64, 64, 1), np.float32), rgb_image(64, 64)]),
     r"image\[0\] has 1 channels; the ControlNet takes 3"),
    (dict(image=[rgb_image(4, 64), rgb_image(4, 64)]), r"image\[0\] is 4x64 pixels"),
    (dict(controlnet_conditioning_scale=[1.0, 1.0, 1.0]), r"controlnet_conditioning_scale has 3 values for 2"),
    (dict(control_guidance_start=0.5, control_guidance_end=0.2), r"control_guidance_start \(0.5\) must be below"),
])
def test_bad_control_images_are_refused_before_any_work(sd1_pipe, arguments, message):
    kwargs = {"prompt": PROMPTS, "image": [rgb_image(64, 64)] * 2, "num_inference_steps": 2, **arguments}
    calls = []
    for session in sd1_pipe.sessions.values():
        session.run = lambda feeds, calls=calls: calls.append(feeds)  # any graph run would be recorded
    try:
        with pytest.raises(ValueError, match=message):
            sd1_pipe(**kwargs)
    finally:
        for session in sd1_pipe.sessions.values():
            del session.run
    assert calls == []


def test_a_control_image_of_another_size_than_the_image(controlnet_exports):
    pipe = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(controlnet_exports("sd1"))
    with pytest.raises(ValueError, match=r"control_image is 64x64 but image is 40x64; give them one size, or "
                                         r"height and width"):
        pipe(PROMPTS[0], image=rgb_image(40, 64), control_image=[rgb_image(64, 64)] * 2, num_inference_steps=2)


def test_a_controlnet_of_another_family_is_refused(tiny_model_dirs, controlnet_dirs, controlnet_exports, tmp_path):
    """At export (SDXL's ControlNet with SD 1.x: named with what does not fit, nothing written) and at run time (an
    SDXL ControlNet graph handed to an SD 1.x pipeline)."""
    with pytest.raises(DiffshipError, match=rf"controlnet {controlnet_dirs('sdxl')[0]} does not fit this "
                                            r"stable-diffusion model \(an SDXL ControlNet\?\): .*cross_attention_dim"):
        export(tiny_model_dirs("sd1"), tmp_path / "out", "onnx", progress=False, controlnet=controlnet_dirs("sdxl"))
    assert list(tmp_path.iterdir()) == []
    sd1 = StableDiffusionControlNetPipeline.from_pretrained(controlnet_exports("sd1"))
    sdxl = StableDiffusionXLControlNetPipeline.from_pretrained(controlnet_exports("sdxl"))
    with pytest.raises(DiffshipError, match=r"controlnet of this pipeline takes encoder_hidden_states of shape "
                                            r"\[.*, 64\], the UNet \[.*, 32\]: a ControlNet of another model family"):
        StableDiffusionControlNetPipeline(**{**sd1.components, "controlnet": sdxl.controlnet})


def test_missing_controlnets_are_named(tiny_model_dirs, exported_dirs, tmp_path, capsys):
    """A ControlNet folder that does not exist (export and CLI: one line naming it, nothing written), and a
    ControlNet pipeline on an export without ControlNets."""
    missing = tmp_path / "no-such-controlnet"
    with pytest.raises(DiffshipError, match=rf"{missing}: no such directory"):
        export(tiny_model_dirs("sd1"), tmp_path / "out", "onnx", progress=False, controlnet=missing)
    code = main(["export", str(tiny_model_dirs("sd1")), str(tmp_path / "out"), "--controlnet", str(missing)])
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("diffship export: error: --controlnet") and str(missing) in line, err
    assert "Traceback" not in err
    not_controlnet = tmp_path / "unet"
    not_controlnet.mkdir()
    (not_controlnet / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    code = main(["export", str(tiny_model_dirs("sd1")), str(tmp_path / "out"), "--controlnet", str(not_controlnet)])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "holds a UNet2DConditionModel, not a ControlNetModel" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]
    with pytest.raises(DiffshipError, match=r"controlnet is missing: StableDiffusionControlNetPipeline needs the "
                                            r"controlnet component"):
        StableDiffusionControlNetPipeline.from_pretrained(exported_dirs("sd1"))


def test_controlnet_pipelines_run_without_torch(controlnet_exports, torch_blocked_env):
    """The ControlNet pipelines are runtime code: they run where torch, diffusers and transformers cannot be
    imported (conftest's torch_blocked_env)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from diffship import AutoPipelineForText2Image\n"
        "pipe = AutoPipelineForText2Image.from_pretrained(sys.argv[1], backend=sys.argv[2])\n"
        "image = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)\n"
        "out = pipe('a red circle', image=[image, image], num_inference_steps=2, output_type='np')\n"
        "print(type(pipe).__name__, out.images.shape, out.timings['controlnet_per_step'] > 0)"
    )
    for backend in BACKENDS:
        result = subprocess.run([sys.executable, "-c", code, str(controlnet_exports("sd1")), backend],
                                env=torch_blocked_env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "StableDiffusionControlNetPipeline (1, 64, 64, 3) True"


def test_generate_cli_with_control_images(controlnet_exports, exported_dirs, tmp_path, capsys):
    """`diffship generate EXPORT --control-image A --control-image B`: one per ControlNet; the timing table shows
    the ControlNets' share. Without control images on such an export, and with them on one without ControlNets, a
    one-line error naming the flag."""
    files = []
    for seed in (3, 4):
        files.append(tmp_path / f"control-{seed}.png")
        rgb_image(64, 64, seed=seed).save(files[-1])
    out = tmp_path / "image.png"
    base = ["generate", str(controlnet_exports("sd1")), "--prompt", "a red circle", "--steps", "2", "--seed", "0",
            "--no-progress", "--out", str(out)]
    code = main([*base, "--control-image", str(files[0]), "--control-image", str(files[1]),
                 "--controlnet-scale", "0.5", "--controlnet-scale", "1.0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert out.is_file() and "StableDiffusionControlNetPipeline" in captured.out
    assert "ControlNet per step" in captured.out
    code = main(base)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "has 2 ControlNet(s): give --control-image, one per ControlNet" in line
    code = main(["generate", str(exported_dirs("sd1")), "--prompt", "a red circle", "--steps", "2", "--no-progress",
                 "--out", str(tmp_path / "other.png"), "--control-image", str(files[0])])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "--control-image needs an export with ControlNets" in line
