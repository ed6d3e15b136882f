"""OpenVINO GenAI's C++ pipelines (`openvino_genai.Text2ImagePipeline`, `Image2ImagePipeline`,
`InpaintingPipeline`) run diffship's OpenVINO exports (SD 1.x, SD 2.x, SDXL) as they are, and draw what they draw on Optimum Intel's export
of the same model.

The yardstick is GenAI itself, not diffusers: GenAI's own schedulers and image processing depart from diffusers
(measured on Optimum Intel's export of a small model: 5/255 in text-to-image, about 100/255 in image-to-image), so
GenAI on diffship's export is compared with GenAI on Optimum Intel's export of the same tiny model (committed under
tests/fixtures/optimum{,-sd2}/openvino, made in Optimum's venv by benchmarks/peers/make_optimum_fixtures.sh), with
the same noise: a Python subclass of `openvino_genai.Generator` drawing from numpy.

Tolerance: 2/255 on GenAI's uint8 images. The two exports hold the same weights and the same maths, traced and
converted by different tools, so their float outputs differ by float-operation order (about 1e-6 per graph, the
exports' own validation figures); a difference that small flips a uint8 rounding here and there (1/255), and
four steps of the sampler can carry one more. Measured: 1/255 at most, in every task, on the three models. GenAI runs
with INFERENCE_PRECISION_HINT f32: its default on a CPU with bf16 is bf16, in which two graphs of one model round
differently (measured 4/255).

What makes diffship's export loadable by GenAI, checked here too: each tokenizer folder holds openvino-tokenizers'
tokenizer and detokenizer models, and the UNet takes GenAI's timestep form (int64 [1]), while diffship's own runtime
still feeds that UNet fractional timesteps unrounded (the float input beneath the export's Convert).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

openvino_genai = pytest.importorskip("openvino_genai", reason="openvino-genai is a test dependency: "
                                                              "pip install 'diffship[test]'")
import openvino as ov  # noqa: E402

from diffship.layout import OPENVINO_DETOKENIZER, OPENVINO_MODEL, OPENVINO_TOKENIZER, TOKENIZER, UNET  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
OPTIMUM = {"sd1": FIXTURES / "optimum", "sd2": FIXTURES / "optimum-sd2", "sdxl": FIXTURES / "optimum-sdxl"}
SOURCE = {kind: OPTIMUM[kind] / f"tiny-{kind}" for kind in OPTIMUM}
TOLERANCE = 2  # of 255: see the module docstring
PROMPT = "a red circle on the left"
SIZE = 64
STEPS = 4
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


class NumpyGenerator(openvino_genai.Generator):
    """GenAI's noise, drawn from numpy: the same seed gives both exports the same latents and noise."""

    def __init__(self, seed: int):
        super().__init__()
        self.rng = np.random.default_rng(seed)

    def next(self) -> float:
        return float(self.rng.standard_normal())

    def randn_tensor(self, shape):
        return ov.Tensor(self.rng.standard_normal(list(shape)).astype(np.float32))


def _weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    tensors = {}
    for file in sorted(folder.rglob("*.safetensors")):
        part = file.parent.name
        tensors.update({f"{part}/{k.removeprefix('text_model.')}": v for k, v in load_file(file).items()})
    return tensors


@pytest.fixture(scope="module")
def diffship_exports(exported_dirs, tiny_model_dirs, tmp_path_factory):
    """kind -> diffship's OpenVINO export of the model Optimum's fixture was exported from. SD 2.x and SDXL: the
    suite's shared export, once its source is shown to hold the fixture's weights; SD 1.x: the fixture's source
    predates the current tiny model, so it is exported here (OpenVINO only)."""
    from diffship.exporters import export

    made = {}

    def get(kind: str) -> Path:
        if kind not in made:
            if kind != "sd1":
                ours, theirs = _weights(tiny_model_dirs(kind)), _weights(SOURCE[kind])
                assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours), (
                    f"the tiny {kind} model no longer matches {OPTIMUM[kind]}: remake the fixture with "
                    f"benchmarks/peers/make_optimum_fixtures.sh --kind {kind} --force")
                made[kind] = exported_dirs(kind)
            else:
                made[kind] = export(SOURCE[kind], tmp_path_factory.mktemp("genai") / kind, ["openvino"],
                                    progress=False)
        return made[kind]

    return get


def _inputs():
    """An image with structure (a gradient and a square) and a mask over its middle, as GenAI takes them: uint8
    NHWC tensors."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    image = np.stack([x * 4, y * 4, np.full_like(x, 96)], axis=-1).astype(np.uint8)
    image[20:44, 20:44] = (230, 40, 40)
    mask = np.zeros((SIZE, SIZE, 3), np.uint8)
    mask[16:48, 16:48] = 255
    return ov.Tensor(image[None]), ov.Tensor(mask[None])


@functools.cache
def _pipelines(folder: Path) -> dict:
    """GenAI's three pipelines on `folder`, compiled once: the inpainting pipeline's models are shared by the
    other two (GenAI's constructors from another pipeline)."""
    inpainting = openvino_genai.InpaintingPipeline(folder, "CPU", **F32)
    return {"text2image": openvino_genai.Text2ImagePipeline(inpainting),
            "image2image": openvino_genai.Image2ImagePipeline(inpainting), "inpainting": inpainting}


def _draw(folder: Path, task: str) -> np.ndarray:
    image, mask = _inputs()
    pipe, generator = _pipelines(folder)[task], NumpyGenerator(0)
    if task == "text2image":
        result = pipe.generate(PROMPT, width=SIZE, height=SIZE, num_inference_steps=STEPS, generator=generator)
    elif task == "image2image":
        result = pipe.generate(PROMPT, image, strength=0.75, num_inference_steps=STEPS, generator=generator)
    else:
        result = pipe.generate(PROMPT, image, mask, num_inference_steps=STEPS, generator=generator)
    return np.asarray(result.data).astype(np.int16)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("task", ["text2image", "image2image", "inpainting"])
def test_genai_draws_on_diffship_export_what_it_draws_on_optimums(diffship_exports, kind, task):
    ours = _draw(diffship_exports(kind), task)
    theirs = _draw(OPTIMUM[kind] / "openvino", task)
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    assert theirs.std() > 5, "GenAI drew a flat image on Optimum's export: the comparison would show nothing"
    worst = int(np.abs(ours - theirs).max())
    assert worst <= TOLERANCE, f"GenAI's {task} image on diffship's {kind} export is {worst}/255 from Optimum's"


def test_export_carries_what_genai_reads(diffship_exports):
    folder = diffship_exports("sd1")
    for name in (OPENVINO_TOKENIZER, OPENVINO_DETOKENIZER):
        assert (folder / TOKENIZER / name).is_file() and (folder / TOKENIZER / name).with_suffix(".bin").is_file()
    unet = ov.Core().read_model(folder / UNET / OPENVINO_MODEL)
    timestep = unet.input("timestep")
    assert timestep.get_element_type() == ov.Type.i64 and timestep.get_partial_shape() == ov.PartialShape([1])
    import json

    report = json.loads((folder / "export_report.json").read_text())
    assert report["tokenizers"][TOKENIZER]["mismatches"] == []
    assert report["tokenizers"][TOKENIZER]["checked_prompts"] >= 5


def test_sd2_tokenizer_divergence_is_reported_not_hidden(diffship_exports):
    """SD 2.x's pad token is "!": the tokenizer splits it out as a special token, openvino-tokenizers reads it as
    punctuation. The export says so (report and CLI) rather than failing the export or hiding it."""
    import json

    report = json.loads((diffship_exports("sd2") / "export_report.json").read_text())
    assert [p for p in report["tokenizers"][TOKENIZER]["mismatches"] if "!" not in p] == []


def test_diffship_runtime_feeds_the_genai_form_unet_unrounded(exported_dirs):
    """diffship's OpenVINO session takes the float timestep back from beneath GenAI's int64 form: a fractional
    timestep (Karras sigmas, Heun, linspace spacing) gives the ONNX graph's output, not its rounding's."""
    from diffship.runtimes.onnxruntime import OnnxRuntimeSession
    from diffship.runtimes.openvino import OpenVINOSession

    folder = exported_dirs("sd1") / UNET
    assert ov.Core().read_model(folder / OPENVINO_MODEL).input("timestep").get_element_type() == ov.Type.i64
    session = OpenVINOSession(folder / OPENVINO_MODEL, cache_dir=False)
    info = next(i for i in session.inputs if i.name == "timestep")
    assert info.dtype == np.float32 and info.shape == (1,)
    onnx = OnnxRuntimeSession(folder / "model.onnx", cache_dir=False)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    hidden = rng.standard_normal((2, 77, onnx.inputs[2].shape[2])).astype(np.float32)

    def ov_run(t):
        return session.run({"sample": sample, "timestep": np.array([t], np.float32),
                            "encoder_hidden_states": hidden})["out_sample"]

    reference = onnx.run({"sample": sample, "timestep": np.asarray(500.4, np.float32),
                          "encoder_hidden_states": hidden})["out_sample"]
    assert np.abs(ov_run(500.4) - reference).max() < 1e-4
    assert np.abs(ov_run(500.0) - reference).max() > 10 * np.abs(ov_run(500.4) - reference).max()


def test_the_float_form_is_compiled_from_a_file_in_the_compile_cache(exported_dirs, tmp_path):
    """With a compile cache, the float-timestep graph is a file there (XML rewritten, weights linked), so that a
    second load does not hash the weights; it computes what the rewrite in memory computes. Without a cache, or
    one that cannot be written, the session compiles the rewrite in memory."""
    from diffship.runtimes.openvino import OpenVINOSession

    folder = exported_dirs("sd1") / UNET
    cached = OpenVINOSession(folder, cache_dir=tmp_path / "cache")
    rewritten = Path(cached._path)
    assert rewritten.is_relative_to(tmp_path / "cache") and rewritten.with_suffix(".bin").resolve() == (
        folder / "openvino_model.bin").resolve()
    assert OpenVINOSession(folder, cache_dir=tmp_path / "cache")._path == cached._path  # written once
    in_memory = OpenVINOSession(folder, cache_dir=False)
    unwritable = tmp_path / "a-file"  # a cache "folder" that is a file: nothing can be written under it, even as root
    unwritable.write_text("")
    fallback = OpenVINOSession(folder, cache_dir=unwritable)
    assert Path(in_memory._path) == Path(fallback._path) == folder / OPENVINO_MODEL
    rng = np.random.default_rng(1)
    feeds = {"sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
             "timestep": np.array([321.7], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 77, in_memory.inputs[2].shape[2])).astype(np.float32)}
    expected = in_memory.run(feeds)["out_sample"]
    assert np.array_equal(cached.run(feeds)["out_sample"], expected)
    assert np.array_equal(fallback.run(feeds)["out_sample"], expected)
