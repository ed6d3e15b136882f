"""Stable Diffusion 3 vs diffusers, on both backends: same prompts, latents and noise.

Tolerance: 1e-3 max abs on output_type="np" images in [0, 1] (image_tasks.ATOL, the issue's bound); correct runs
show about 1e-6 to 1e-5. A wrong hidden-state layer, padding, token order, shift or unscaling shows 1e-2 or more.

Sizes: 64x64 (the transformer's default: an 8x8 latent, 4x4 patches) and 48x80 (6x10: 3x5 patches, a position
embedding cropped off-centre on both axes); SD3's sizes are multiples of 16 (VAE 8 x patch 2).
Schedules: the model's own (FlowMatchEuler, shift 3.0) and dynamic shifting (mu from the patch count).

One export of the tiny SD3 model, to both formats, for the module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffship.families.stable_diffusion_3 import StableDiffusion3Pipeline
from diffship.pipelines import AutoPipelineForText2Image
from image_tasks import ATOL, BACKENDS, check_parity, diffship_images, diffusers_images, max_abs, report

SIZES = [(64, 64), (48, 80)]
PROMPTS = ["a red circle on the left", "an oil painting of a castle at sunset"]
LATENT_CHANNELS = 16

_PIPES: dict = {}  # diffusers pipelines per scheduler setting


def sd3_latents(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    shape = (batch, LATENT_CHANNELS, height // 8, width // 8)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _reference(tiny_model_dirs, scheduler_overrides: dict):
    import diffusers

    key = repr(sorted(scheduler_overrides.items()))
    if key not in _PIPES:
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(tiny_model_dirs("sd3"))
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **scheduler_overrides)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[key] = pipe
    return _PIPES[key]


@pytest.fixture(scope="module")
def sd3_export(exported_dirs):
    return exported_dirs("sd3")


def _load(sd3_export, backend, scheduler_overrides=None):
    import diffship.schedulers

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_export, backend=backend, inference_precision="f32")
    if scheduler_overrides:
        pipe.scheduler = diffship.schedulers.FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config, **scheduler_overrides)
    return pipe


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sd3_text_to_image(backend, height, width, tiny_model_dirs, sd3_export):
    """Guidance with negative prompts (all three encoders' negative path), the model's shift 3.0."""
    reference = _reference(tiny_model_dirs, {})
    kwargs = dict(prompt=PROMPTS, negative_prompt=["blurry", "low quality"], num_inference_steps=3,
                  guidance_scale=5.0, height=height, width=width, latents=sd3_latents(2, height, width))
    expected = diffusers_images(reference, **kwargs)
    pipe = _load(sd3_export, backend)
    check_parity(f"sd3 text-to-image {backend} {height}x{width}", expected, diffship_images(pipe, **kwargs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sd3_dynamic_shifting(backend, tiny_model_dirs, sd3_export):
    """use_dynamic_shifting: mu from the patch count (calculate_shift, SD3's max_shift 1.16), at the non-square
    size; prompt_2 / prompt_3 given apart, a shorter max_sequence_length, noise drawn from the generator."""
    overrides = {"use_dynamic_shifting": True}
    reference = _reference(tiny_model_dirs, overrides)
    kwargs = dict(prompt="a blue square", prompt_2="on the top", prompt_3="a photo of a cat", num_inference_steps=4,
                  guidance_scale=4.0, height=48, width=80, max_sequence_length=32)
    expected = diffusers_images(reference, seed=3, **kwargs)
    pipe = _load(sd3_export, backend, overrides)
    check_parity(f"sd3 dynamic shifting {backend} 48x80", expected, diffship_images(pipe, seed=3, **kwargs))


def test_sd3_unguided_and_auto_pipeline(tiny_model_dirs, sd3_export):
    """guidance_scale 1 runs no unconditional batch; AutoPipelineForText2Image picks the SD3 pipeline from
    model_index.json, with its default size (the transformer's sample_size x 8) and a T5 prompt past
    max_sequence_length (truncated as transformers does)."""
    reference = _reference(tiny_model_dirs, {})
    long_prompt = " ".join(["a red cat on a wooden table"] * 10)
    kwargs = dict(prompt=long_prompt, num_inference_steps=2, guidance_scale=1.0, max_sequence_length=16,
                  latents=sd3_latents(1, 64, 64, seed=1))
    expected = diffusers_images(reference, **kwargs)
    pipe = AutoPipelineForText2Image.from_pretrained(sd3_export, backend="onnxruntime", inference_precision="f32")
    assert isinstance(pipe, StableDiffusion3Pipeline)
    batches = []
    real_run = pipe.transformer.run
    pipe.transformer.run = lambda feeds: batches.append(feeds["hidden_states"].shape[0]) or real_run(feeds)
    check_parity("sd3 unguided, auto pipeline", expected, diffship_images(pipe, **kwargs))
    assert batches == [1, 1]


def test_sd3_export_layout_is_optimums(sd3_export):
    """Optimum's folders and tensor names (transformer/, text_encoder_3/, tokenizer_3/; hidden_states,
    encoder_hidden_states, pooled_projections, timestep -> out_hidden_states), every component validated on both
    runtimes within its bound, at the traced shapes and at another batch, size and text length."""
    report_file = json.loads((sd3_export / "export_report.json").read_text())
    assert report_file["family"] == "stable-diffusion-3"
    components = report_file["components"]
    assert set(components) == {"text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_encoder",
                               "vae_decoder"}
    assert components["transformer"]["inputs"] == ["hidden_states", "encoder_hidden_states", "pooled_projections",
                                                   "timestep"]
    assert components["transformer"]["outputs"] == ["out_hidden_states"]
    assert components["text_encoder_3"]["inputs"] == ["input_ids"]
    assert components["text_encoder_3"]["outputs"] == ["last_hidden_state"]
    assert components["text_encoder_2"]["outputs"][:2] == ["text_embeds", "last_hidden_state"]
    for name, entry in components.items():
        for backend in ("onnxruntime", "openvino"):
            assert entry["validation"][backend]["max_abs"] <= entry["validation"][backend]["atol"], (name, backend)
    # The transformer at the traced shapes and at another batch, latent size and text length (nothing baked in).
    cases = components["transformer"]["validation"]["onnxruntime"]["cases"]
    assert [case["inputs"]["hidden_states"] for case in cases] == [[2, 16, 8, 8], [1, 16, 10, 12]]
    assert [case["inputs"]["encoder_hidden_states"][1] for case in cases] == [77 + 256, 77 + 77]
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler", "transformer", "text_encoder_3"):
        assert (sd3_export / name).is_dir()
    # T5's tokenizer as OpenVINO models too (what OpenVINO GenAI tokenizes with), checked like the CLIP ones.
    assert (sd3_export / "tokenizer_3" / "openvino_tokenizer.xml").is_file()
    assert report_file["tokenizers"]["tokenizer_3"]["checked_prompts"] > 0
    index = json.loads((sd3_export / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and "image_encoder" not in index


def test_t5_tokenizer_matches_transformers(tiny_model_dirs):
    """The numpy-side T5 tokenizer (tokenizers library only) gives transformers' ids: padded, truncated keeping
    </s>, odd white space and characters outside the vocabulary."""
    from transformers import AutoTokenizer

    from diffship.pipelines.tokenizer import T5Tokenizer

    folder = tiny_model_dirs("sd3") / "tokenizer_3"
    ours, theirs = T5Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    prompts = ["a photo of an astronaut riding a horse on mars", "An Oil Painting, trending!!", "café naïve",
               "", "\U0001F431 cat   with\ttabs\nand newlines", " ".join(["a very long prompt"] * 40)]
    for length in (16, 256):
        expected = theirs(prompts, padding="max_length", max_length=length, truncation=True).input_ids
        np.testing.assert_array_equal(ours(prompts, length), np.asarray(expected))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sd3_image_to_image(backend, tiny_model_dirs, sd3_export):
    """The image resized to a non-square size, encoded (the VAE's shift and scale), taken along the flow by
    scale_noise to where strength 0.5 of 5 steps starts (diffusers keeps 3 steps there, not int(2.5)); guidance;
    AutoPipelineForImage2Image picks the pipeline."""
    import diffusers

    from diffship.pipelines import AutoPipelineForImage2Image, StableDiffusion3Img2ImgPipeline
    from image_tasks import rgb_image

    if "img2img" not in _PIPES:
        _PIPES["img2img"] = diffusers.StableDiffusion3Img2ImgPipeline.from_pretrained(tiny_model_dirs("sd3"))
        _PIPES["img2img"].set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPTS, negative_prompt=["blurry", "dark"], image=rgb_image(40, 64), strength=0.5,
                  num_inference_steps=5, guidance_scale=5.0, height=48, width=80)
    expected = diffusers_images(_PIPES["img2img"], **kwargs)
    pipe = AutoPipelineForImage2Image.from_pretrained(sd3_export, backend=backend, inference_precision="f32")
    assert isinstance(pipe, StableDiffusion3Img2ImgPipeline)
    steps = []
    real_run = pipe.transformer.run
    pipe.transformer.run = lambda feeds: steps.append(1) or real_run(feeds)
    check_parity(f"sd3 image-to-image {backend} 48x80", expected, diffship_images(pipe, **kwargs))
    assert len(steps) == 3


def test_sd3_generate_command(sd3_export, tmp_path, capsys):
    """`diffship generate` on an SD3 export (no eta / step-cache options passed to a pipeline without them; SD3's
    clip_skip rule, which needs no final layer norm file), --eta refused for it rather than ignored, and --clip-skip
    past the CLIP encoders' layers refused under the flag's name."""
    from diffship.cli import main

    out = tmp_path / "sd3.png"
    assert main(["generate", str(sd3_export), "--prompt", "a red cat", "--steps", "2", "--seed", "0", "--height",
                 "48", "--width", "80", "--clip-skip", "0", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "StableDiffusion3Pipeline" in printed and "transformer (2 steps)" in printed
    assert main(["generate", str(sd3_export), "--prompt", "a red cat", "--steps", "2", "--eta", "0.5", "--out",
                 str(tmp_path / "x.png"), "--no-progress"]) != 0
    assert "--eta" in capsys.readouterr().err
    assert main(["generate", str(sd3_export), "--prompt", "a red cat", "--steps", "2", "--clip-skip", "9", "--out",
                 str(tmp_path / "x.png"), "--no-progress"]) != 0
    assert "--clip-skip" in capsys.readouterr().err


@pytest.mark.parametrize("height,width,strength", [(64, 64, 1.0), (48, 80, 0.7)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sd3_inpainting(backend, height, width, strength, tiny_model_dirs, sd3_export):
    """The 16-channel transformer: the original kept outside the mask, moved along the flow to each next sigma;
    from pure noise (strength 1) and from the image at strength 0.7; AutoPipelineForInpainting picks the pipeline."""
    import diffusers

    from diffship.pipelines import AutoPipelineForInpainting, StableDiffusion3InpaintPipeline
    from image_tasks import mask_image, rgb_image

    if "inpaint" not in _PIPES:
        _PIPES["inpaint"] = diffusers.StableDiffusion3InpaintPipeline.from_pretrained(tiny_model_dirs("sd3"))
        _PIPES["inpaint"].set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPTS, image=rgb_image(height, width), mask_image=mask_image(height, width),
                  strength=strength, num_inference_steps=4, guidance_scale=5.0, height=height, width=width)
    expected = diffusers_images(_PIPES["inpaint"], **kwargs)
    pipe = AutoPipelineForInpainting.from_pretrained(sd3_export, backend=backend, inference_precision="f32")
    assert isinstance(pipe, StableDiffusion3InpaintPipeline)
    check_parity(f"sd3 inpainting {backend} {height}x{width} strength {strength}", expected, diffship_images(pipe, **kwargs))


def test_sd3_static_shapes_on_openvino(tiny_model_dirs, sd3_export):
    """A request that repeats is compiled with static shapes on OpenVINO (T5 at the request's max_sequence_length,
    the transformer at the guided batch and joint text length), and draws what the dynamic graphs drew."""
    pipe = _load(sd3_export, "openvino")
    kwargs = dict(prompt=PROMPTS[0], num_inference_steps=2, guidance_scale=5.0, height=48, width=80,
                  max_sequence_length=32, latents=sd3_latents(1, 48, 80))
    first = diffship_images(pipe, **kwargs)
    shapes = pipe.request_shapes(1, 48, 80)  # the request's: its max_sequence_length
    assert shapes["transformer"]["encoder_hidden_states"][:2] == (2, 77 + 32)
    assert shapes["text_encoder_3"]["input_ids"] == (1, 32)
    second = diffship_images(pipe, **kwargs)  # the repeat runs static graphs
    assert pipe.transformer._static is not None and pipe.transformer._static[0]["hidden_states"] == (2, 16, 6, 10)
    check_parity("sd3 static shapes openvino 48x80", first, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sd3_inpainting_33_channels(backend, tiny_model_dirs, exported_dirs):
    """A dedicated inpainting transformer (latents + mask + masked-image latents, 33 channels), exported to ONNX
    only (OpenVINO runs model.onnx): its transformer differs from sd3's by its input width alone."""
    import diffusers

    from diffship.pipelines import AutoPipelineForInpainting, StableDiffusion3InpaintPipeline
    from image_tasks import mask_image, rgb_image

    if "inpaint-33" not in _PIPES:
        _PIPES["inpaint-33"] = diffusers.StableDiffusion3InpaintPipeline.from_pretrained(tiny_model_dirs("sd3-inpaint"))
        _PIPES["inpaint-33"].set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPTS[0], image=rgb_image(48, 80), mask_image=mask_image(48, 80), strength=0.8,
                  num_inference_steps=3, guidance_scale=5.0, height=48, width=80)
    expected = diffusers_images(_PIPES["inpaint-33"], **kwargs)
    pipe = AutoPipelineForInpainting.from_pretrained(exported_dirs("sd3-inpaint", ("onnx",)), backend=backend,
                                                     inference_precision="f32")
    assert isinstance(pipe, StableDiffusion3InpaintPipeline) and pipe.denoiser_config["in_channels"] == 33
    check_parity(f"sd3 inpainting 33-channel {backend} 48x80", expected, diffship_images(pipe, **kwargs))


def test_openvino_genai_runs_the_sd3_export(sd3_export):
    """OpenVINO GenAI's Text2ImagePipeline runs diffship's OpenVINO SD3 export as it is (tokenizer_3's OpenVINO
    models, the transformer's float [B] timestep) and, from the same latents, draws what diffship draws (which is
    diffusers' image within 1e-5): within 2/255 on its uint8 image (measured 1/255, mean 0.5/255: float order and
    uint8 rounding; GenAI runs f32 here, see test_openvino_genai.py)."""
    openvino_genai = pytest.importorskip("openvino_genai")
    import openvino as ov

    class NumpyGenerator(openvino_genai.Generator):
        def __init__(self, seed: int):
            super().__init__()
            self.rng, self.drawn = np.random.default_rng(seed), []

        def next(self) -> float:
            return float(self.rng.standard_normal())

        def randn_tensor(self, shape):
            self.drawn.append(self.rng.standard_normal(list(shape)).astype(np.float32))
            return ov.Tensor(self.drawn[-1])

    generator = NumpyGenerator(0)
    genai = openvino_genai.Text2ImagePipeline(str(sd3_export), "CPU", INFERENCE_PRECISION_HINT="f32")
    drawn = np.asarray(genai.generate(PROMPTS[0], width=64, height=64, num_inference_steps=4, guidance_scale=5.0,
                                      generator=generator).data)[0]
    assert [d.shape for d in generator.drawn] == [(1, LATENT_CHANNELS, 8, 8)]
    ours = diffship_images(_load(sd3_export, "openvino"), prompt=PROMPTS[0], num_inference_steps=4, guidance_scale=5.0,
                latents=generator.drawn[0])[0]
    diff = int(np.abs(drawn.astype(np.int32) - np.round(ours * 255).astype(np.int32)).max())
    report("sd3 OpenVINO GenAI vs diffship (of 255)", diff)
    assert diff <= 2


OPTIMUM_SD3 = Path(__file__).parent / "fixtures" / "optimum-sd3" / "onnx"


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimums_sd3_export_runs_in_diffship(backend, tiny_model_dirs):
    """Optimum's own ONNX export of the tiny SD3 model (committed: tests/fixtures/optimum-sd3, MANIFEST.json says how
    it was made) loads with AutoPipelineForText2Image and matches diffusers on the same weights (the seeded tiny
    model), on ONNX Runtime and on OpenVINO (which reads model.onnx): same layout and tensor names as diffship's."""
    reference = _reference(tiny_model_dirs, {})
    kwargs = dict(prompt=PROMPTS, negative_prompt=["blurry", "dark"], num_inference_steps=3, guidance_scale=5.0,
                  height=48, width=80, latents=sd3_latents(2, 48, 80))
    expected = diffusers_images(reference, **kwargs)
    pipe = AutoPipelineForText2Image.from_pretrained(OPTIMUM_SD3, backend=backend, inference_precision="f32")
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert [i.name for i in pipe.transformer.inputs] == ["hidden_states", "encoder_hidden_states",
                                                         "pooled_projections", "timestep"]
    check_parity(f"optimum's sd3 export {backend} 48x80", expected, diffship_images(pipe, **kwargs))


def test_sd3_save_pretrained_and_reload(sd3_export, tmp_path):
    """save_pretrained copies the transformer, the three encoders and tokenizer_3, writes the current scheduler, and
    the saved directory loads again as an SD3 pipeline that draws the same image."""
    import diffship.schedulers

    pipe = _load(sd3_export, "onnxruntime")
    pipe.scheduler = diffship.schedulers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                                     use_dynamic_shifting=True)
    saved = pipe.save_pretrained(tmp_path / "saved")
    for name in ("transformer", "text_encoder_3", "tokenizer_3"):
        assert (saved / name).is_dir()
    again = AutoPipelineForText2Image.from_pretrained(saved, backend="onnxruntime", inference_precision="f32")
    assert isinstance(again, StableDiffusion3Pipeline) and again.scheduler.config.use_dynamic_shifting
    kwargs = dict(prompt=PROMPTS[0], num_inference_steps=2, guidance_scale=4.0, latents=sd3_latents(1, 64, 64))
    np.testing.assert_array_equal(diffship_images(pipe, **kwargs), diffship_images(again, **kwargs))


@pytest.fixture(scope="module")
def sd35_export(exported_dirs):
    """The tiny SD 3.5 exported with --skip-layer-guidance, as an SD3.5-medium user who wants
    skip_guidance_layers exports it: the plain runs below feed it no skipped layer."""
    return exported_dirs("sd3.5", skip_layer_guidance=True)


def _sd35_reference(tiny_model_dirs):
    import diffusers

    if "sd3.5" not in _PIPES:
        _PIPES["sd3.5"] = diffusers.StableDiffusion3Pipeline.from_pretrained(tiny_model_dirs("sd3.5"))
        _PIPES["sd3.5"].set_progress_bar_config(disable=True)
    return _PIPES["sd3.5"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sd35_text_to_image(backend, tiny_model_dirs, sd35_export):
    """SD 3.5's transformer (qk_norm RMS norms, and 3.5 Medium's dual attention in its first block) at the
    non-square size, on the skip-layer export with no layer skipped (the graph's Where keeps each block's output)."""
    reference = _sd35_reference(tiny_model_dirs)
    assert reference.transformer.config.qk_norm == "rms_norm"
    kwargs = dict(prompt=PROMPTS, num_inference_steps=3, guidance_scale=5.0, height=48, width=80,
                  latents=sd3_latents(2, 48, 80))
    expected = diffusers_images(reference, **kwargs)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd35_export, backend=backend, inference_precision="f32")
    check_parity(f"sd3.5 text-to-image {backend} 48x80", expected, diffship_images(pipe, **kwargs))


# Skip-layer guidance: the first block (3.5's dual attention), the last (context_pre_only: no text tokens out) and
# both. The window (start 0, stop 0.7 of 5 steps: steps 1 to 3) is wider than diffusers' default (0.01 to 0.2,
# which covers no step below 6 steps), so that most steps take the extra pass.
@pytest.mark.parametrize("backend,layers", [("onnxruntime", [0]), ("openvino", [1]), ("onnxruntime", [0, 1])])
def test_sd35_skip_layer_guidance(backend, layers, tiny_model_dirs, sd35_export):
    reference = _sd35_reference(tiny_model_dirs)
    kwargs = dict(prompt=PROMPTS, negative_prompt=["blurry", "dark"], num_inference_steps=5, guidance_scale=5.0,
                  height=64, width=64, latents=sd3_latents(2, 64, 64, seed=5))
    guidance = dict(skip_guidance_layers=layers, skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.0,
                    skip_layer_guidance_stop=0.7)
    expected = diffusers_images(reference, **kwargs, **guidance)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd35_export, backend=backend, inference_precision="f32")
    check_parity(f"sd3.5 skip-layer guidance {layers} {backend}", expected, diffship_images(pipe, **kwargs, **guidance))
    # The extra pass changes the image: diffusers' image without it is far from this one.
    assert max_abs(diffusers_images(reference, **kwargs), expected) > 10 * ATOL


def test_skip_layer_guidance_errors(sd3_export, sd35_export, tiny_model_dirs, tmp_path):
    """An export without skip_layers, layers the transformer lacks, a bad window, an export flag for a family
    without it: one line each, before any graph runs."""
    from diffship.errors import DiffshipError
    from diffship.exporters import export

    plain = StableDiffusion3Pipeline.from_pretrained(sd3_export, backend="onnxruntime")
    with pytest.raises(DiffshipError, match="export the model with --skip-layer-guidance"):
        plain("a cat", num_inference_steps=2, skip_guidance_layers=[0])
    pipe = StableDiffusion3Pipeline.from_pretrained(sd35_export, backend="onnxruntime")
    for layers in ([2], [-1], [], "7,8,9", [0.5]):
        with pytest.raises(ValueError, match="skip_guidance_layers"):
            pipe("a cat", num_inference_steps=2, skip_guidance_layers=layers)
    with pytest.raises(ValueError, match="skip_layer_guidance_stop"):
        pipe("a cat", num_inference_steps=2, skip_guidance_layers=[0], skip_layer_guidance_stop=1.5)
    with pytest.raises(DiffshipError, match="skip-layer guidance is Stable Diffusion 3's"):
        export(tiny_model_dirs("sd1"), tmp_path / "out", "onnx", skip_layer_guidance=True, progress=False)
    assert not (tmp_path / "out").exists()
    report = json.loads((Path(sd35_export) / "export_report.json").read_text())
    assert report["skip_layer_guidance"] == {"component": "transformer", "input": "skip_layers"}


def test_skip_guidance_layers_flag(sd35_export, tmp_path, capsys):
    """`generate --skip-guidance-layers 0,1` gives the Python API's image bit for bit (10 steps: diffusers' default
    window, 0.01 to 0.2 of the steps, then covers step 1); a value that is not a list of indices is refused."""
    from PIL import Image

    from diffship.cli import main

    out = tmp_path / "slg.png"
    assert main(["generate", str(sd35_export), "--prompt", "a red cat", "--steps", "10", "--seed", "0",
                 "--skip-guidance-layers", "0,1", "--out", str(out), "--no-progress"]) == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(sd35_export, backend="onnxruntime")
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=10, generator=0)
    image = pipe("a red cat", skip_guidance_layers=[0, 1], **kwargs).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(image))
    assert not np.array_equal(np.asarray(image), np.asarray(pipe("a red cat", **kwargs).images[0]))
    with pytest.raises(SystemExit):
        main(["generate", str(sd35_export), "--prompt", "a cat", "--skip-guidance-layers", "7;8",
              "--out", str(tmp_path / "x.png")])
    assert "not a list of block indices" in capsys.readouterr().err


def test_dtype_per_component(tiny_model_dirs, sd3_export, tmp_path):
    """dtype={"transformer": "fp16", "text_encoder_3": "fp16"} (--dtype transformer=fp16 --dtype
    text_encoder_3=fp16): those two graphs in fp16 (validated at fp16's bound), the CLIP encoders and the VAE fp32,
    and the images within 35 dB PSNR of the fp32 export's on both backends (fp16 rounding of a transformer's
    activations; a wrong cast or a NaN gives < 10 dB). A VAE named there is refused before anything loads."""
    from diffship.cli import main
    from diffship.errors import DiffshipError
    from diffship.exporters import export

    out = tmp_path / "mixed"
    assert main(["export", str(tiny_model_dirs("sd3")), str(out), "--backend", "onnx", "--dtype", "transformer=fp16",
                 "--dtype", "text_encoder_3=fp16", "--no-progress"]) == 0
    report = json.loads((out / "export_report.json").read_text())
    precision = {name: entry["precision"]["onnxruntime"] for name, entry in report["components"].items()}
    assert precision == {"text_encoder": "fp32", "text_encoder_2": "fp32", "text_encoder_3": "fp16",
                         "transformer": "fp16", "vae_encoder": "fp32", "vae_decoder": "fp32"}
    assert report["options"]["component_dtype"] == {"text_encoder_3": "fp16", "transformer": "fp16"}
    kwargs = dict(prompt=PROMPTS, num_inference_steps=3, guidance_scale=5.0, latents=sd3_latents(2, 64, 64))
    for backend in BACKENDS:
        got = diffship_images(StableDiffusion3Pipeline.from_pretrained(out, backend=backend, inference_precision="f32"),
                   **kwargs)
        expected = diffship_images(_load(sd3_export, backend), **kwargs)
        mse = float(np.mean((np.asarray(got, np.float64) - expected) ** 2))
        assert np.isfinite(got).all() and 10 * np.log10(1 / max(mse, 1e-20)) >= 35, (backend, mse)
    with pytest.raises(DiffshipError, match="vae_fp16"):
        export(tiny_model_dirs("sd3"), tmp_path / "vae", "onnx", dtype={"vae_decoder": "fp16"}, progress=False)
    assert not (tmp_path / "vae").exists()
