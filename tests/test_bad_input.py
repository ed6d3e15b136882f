"""Bad input gets a one-line error naming the flag, argument or file, before any work starts; never a traceback.

The command line is driven with a table of bad values for every flag of generate, bench, inspect and tiny-model.
The checks that need no model must win over a model directory that does not exist (and the loader is made to fail
should it be reached). The pipelines' own checks (Python API) raise ValueError naming diffusers' argument before
any graph runs; malformed files are named; the 66x66 image runs at diffusers' size; a prompt past the tokenizer's
77 tokens is cut with a warning naming the part cut.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from diffship.cli import main
from diffship.errors import BackendError, DiffshipError
from diffship.pipelines import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from diffship.pipelines.base import DiffusionPipeline, read_config


def run_cli(argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of `diffship ARGV`; argparse's own errors exit through SystemExit."""
    capsys.readouterr()  # what fixtures printed while they were built
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *expected: str) -> None:
    assert code != 0, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"


@pytest.fixture
def files(tmp_path):
    """Paths the table refers to as {name}: a text file, an image, an over-large image, a directory, outputs."""
    paths = {"tmp": tmp_path, "text": tmp_path / "notes.txt", "image": tmp_path / "in.png",
             "wide": tmp_path / "wide.png", "dir": tmp_path / "a-dir", "out": tmp_path / "out" / "image.png",
             "missing": tmp_path / "missing.png", "model": tmp_path / "no-model"}
    paths["text"].write_text("not an image")
    Image.new("RGB", (72, 72), (200, 30, 30)).save(paths["image"])
    Image.new("RGB", (4104, 8)).save(paths["wide"])
    paths["dir"].mkdir()
    return paths


def expand(argv: list[str], files: dict) -> list[str]:
    return [a.format(**files) for a in argv]


# (flag named in the error, arguments after `generate {model} --prompt cat --out {out}`)
GENERATE = [
    ("--steps", ["--steps", "-1"]),
    ("--steps", ["--steps", "0", "--scheduler", "dpm++2m"]),
    ("--steps", ["--steps", "0", "--scheduler", "pndm"]),
    ("--steps", ["--steps", "abc"]),
    ("--guidance", ["--guidance", "nan"]),
    ("--guidance", ["--guidance", "inf"]),
    ("--guidance", ["--guidance", "x"]),
    ("--seed", ["--seed", "-1"]),
    ("--seed", ["--seed", str(2**64)]),
    ("--height", ["--height", "0"]),
    ("--height", ["--height", "-8"]),
    ("--height", ["--height", "60"]),
    ("--height", ["--height", "100000"]),
    ("--width", ["--width", "0"]),
    ("--width", ["--width", "70"]),
    ("--width", ["--width", "4104"]),
    ("--num-images", ["--num-images", "0"]),
    ("--num-images", ["--num-images", "1.5"]),
    ("--scheduler", ["--scheduler", "no-such-scheduler"]),
    ("--eta", ["--eta", "nan"]),
    ("--eta", ["--eta", "-0.1"]),
    ("--eta", ["--eta", "1.5"]),
    ("--clip-skip", ["--clip-skip", "-1"]),
    ("--backend", ["--backend", "tensorflow"]),
    ("--provider", ["--backend", "openvino", "--provider", "CPUExecutionProvider"]),
    ("--device", ["--backend", "onnxruntime", "--device", "GPU"]),
    ("--static", ["--backend", "ort", "--static"]),
    ("--static", ["--backend", "openvino", "--static", "--image", "{image}"]),
    ("--negative-prompt", ["--negative-prompt", "blurry", "--negative-prompt", "dark"]),
    ("--negative-prompt", ["--prompt", "dog", "--prompt", "cow", "--negative-prompt", "a", "--negative-prompt", "b"]),
    ("--out", ["--out", "{dir}"]),
    ("--out", ["--out", "{tmp}/image.psd"]),
    ("--out", ["--out", "{tmp}/image"]),
    ("--out", ["--out", "{tmp}/image.xbm"]),
    ("--out", ["--out", "{text}/image.png"]),
    ("--json", ["--json", "{dir}"]),
    ("--json", ["--json", "{text}/timings.json"]),
    ("--json", ["--json", "{out}"]),
    ("--out", ["--out", "{image}"]),  # a picture diffship did not write: replaced only with --overwrite
    ("--json", ["--json", "{text}"]),
    ("--image", ["--image", "{missing}"]),
    ("--image", ["--image", "{text}"]),
    ("--image", ["--image", "{dir}"]),
    ("--image", ["--image", "{wide}"]),
    ("--mask", ["--mask", "{image}"]),
    ("--mask", ["--image", "{image}", "--mask", "{missing}"]),
    ("--depth-map", ["--depth-map", "{image}"]),
    ("--depth-map", ["--image", "{image}", "--mask", "{image}", "--depth-map", "{image}"]),
    ("--depth-map", ["--image", "{image}", "--depth-map", "{text}"]),
    ("--strength", ["--strength", "0.5"]),
    ("--strength", ["--image", "{image}", "--strength", "1.5"]),
    ("--strength", ["--image", "{image}", "--strength", "nan"]),
    ("--strength", ["--image", "{image}", "--strength", "0.1", "--steps", "5"]),
    ("--height", ["--image", "{image}", "--height", "64"]),
    ("--show", ["--show=yes"]),
    ("--no-progress", ["--no-progress=1"]),
    ("--no-such-flag", ["--no-such-flag"]),
]


@pytest.mark.parametrize("flag,argv", GENERATE, ids=[f"{f}:{' '.join(a)}" for f, a in GENERATE])
def test_generate_refuses_bad_flags_before_loading(flag, argv, files, capsys, monkeypatch):
    """A model directory that does not exist, and a loader that fails: only a check made before loading can
    produce the flag's error."""
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(no_loading))
    code, err = run_cli(expand(["generate", "{model}", "--prompt", "cat", "--out", "{out}", *argv], files), capsys)
    assert_one_line_error(code, err, flag)
    assert not files["out"].parent.exists()


def test_generate_requires_prompt(files, capsys):
    code, err = run_cli(["generate", files["model"]], capsys)
    assert_one_line_error(code, err, "--prompt")


@pytest.fixture
def graph_runs(exported_dirs, monkeypatch):
    """The components the ONNX Runtime sessions run, in order (from here: the export's validation is done)."""
    exported_dirs("sd1")
    from diffship.runtimes.onnxruntime import OnnxRuntimeSession

    ran = []
    original = OnnxRuntimeSession.run

    def run(self, feeds):
        ran.append(self.path.split("/")[-2])
        return original(self, feeds)

    monkeypatch.setattr(OnnxRuntimeSession, "run", run)
    return ran


# Checks that need the model (its scheduler, text encoder, task): made after loading, before the UNet runs.
GENERATE_WITH_MODEL = [
    ("--steps", ["--steps", "1001"], "from 1 to 1000"),
    ("--clip-skip", ["--clip-skip", "6"], "from 0 to 5"),
    ("--depth-map", ["--image", "{image}", "--depth-map", "{image}"], "depth-to-image model"),
]


@pytest.mark.parametrize("flag,argv,expected", GENERATE_WITH_MODEL, ids=[r[0] for r in GENERATE_WITH_MODEL])
def test_generate_refuses_bad_flags_before_denoising(flag, argv, expected, exported_dirs, files, capsys, graph_runs):
    code, err = run_cli(expand(["generate", str(exported_dirs("sd1")), "--prompt", "cat", "--out", "{out}",
                                "--no-progress", *argv], files), capsys)
    assert_one_line_error(code, err, flag, expected)
    assert "unet" not in graph_runs
    assert not files["out"].parent.exists()


BENCH = [
    ("--backend", ["--backend", "tensorflow"]),
    ("--static", ["--backend", "onnxruntime", "--static"]),
    ("--static", ["--static", "--task", "image-to-image"]),
    ("--inference-precision", ["--backend", "onnxruntime", "--inference-precision", "f16"]),
    ("--inference-precision", ["--inference-precision", "f64"]),
    ("--height", ["--height", "0"]),
    ("--height", ["--height", "12"]),
    ("--width", ["--width", "100000"]),
    ("--steps", ["--steps", "0"]),
    ("--batch-size", ["--batch-size", "0"]),
    ("--runs", ["--runs", "0"]),
    ("--runs", ["--runs", "abc"]),
    ("--warmup", ["--warmup", "-1"]),
    ("--guidance", ["--guidance", "nan"]),
    ("--scheduler", ["--scheduler", "no-such-scheduler"]),
    ("--task", ["--task", "video"]),
    ("--strength", ["--strength", "0.5"]),
    ("--strength", ["--task", "image-to-image", "--strength", "2"]),
    ("--strength", ["--task", "image-to-image", "--strength", "0.1", "--steps", "2"]),
    ("--seed", ["--seed", "-1"]),
    ("--json", ["--json", "{dir}"]),
    ("--markdown", ["--markdown", "{text}/table.md"]),
    ("--plot", ["--plot", "{tmp}/plot.txt"]),
    ("--markdown", ["--markdown", "{text}"]),
    ("--plot", ["--plot", "{image}"]),
    ("--roofline", ["--roofline=no"]),
    ("--quiet", ["--quiet=1"]),
]


@pytest.mark.parametrize("flag,argv", BENCH, ids=[f"{f}:{' '.join(a)}" for f, a in BENCH])
def test_bench_refuses_bad_flags_before_starting(flag, argv, files, capsys):
    code, err = run_cli(expand(["bench", "{model}", *argv], files), capsys)
    assert_one_line_error(code, err, flag)


def test_bench_names_a_missing_model(files, capsys):
    code, err = run_cli(["bench", files["model"]], capsys)
    assert_one_line_error(code, err, str(files["model"]), "no such directory")


# (what the error names, arguments after `export {model} {tmp}/exported`)
EXPORT = [
    ("--height", ["--height", "0"]),
    ("--height", ["--height", "-8"]),
    ("--height", ["--height", "60"]),
    ("--height", ["--height", "100000"]),
    ("--width", ["--width", "70"]),
    ("--batch-size", ["--batch-size", "0"]),
    ("--batch-size", ["--batch-size", "1000"]),
    ("--batch-size", ["--batch-size", "abc"]),
    ("--opset", ["--opset", "7"]),
    ("--opset", ["--opset", "99"]),
    ("--atol", ["--atol", "-1"]),
    ("--atol", ["--atol", "nan"]),
    ("--atol", ["--atol", "abc"]),
    ("--atol", ["--atol", "unet=x"]),
    ("--atol", ["--atol", "unet=1e-3,vae"]),
    ("--atol", ["--atol", "no_such_component=1e-3"]),
    ("--backend", ["--backend", "tensorflow"]),
    ("--backend", ["--backend", ","]),
    ("--dtype", ["--dtype", "fp64"]),
    ("--dtype", ["--dtype", "unet=bf16"]),
    ("--dtype", ["--dtype", "transfomer=fp16"]),
    ("--dtype", ["--dtype", "vae_decoder=fp16"]),
    ("--vae-fp16", ["--vae-fp16", "half"]),
    ("--target", ["--target", "tpu"]),
    ("--weight-format", ["--weight-format", "int2"]),
    ("--weight-format", ["--weight-format", "int8", "--dtype", "fp16"]),
    ("--quantize", ["--quantize", "hybrid"]),
    ("--quantize", ["--quantize", "full", "--backend", "openvino"]),
    ("--overwrite", ["--overwrite=yes"]),
]


@pytest.mark.parametrize("flag,argv", EXPORT, ids=[f"{f}:{' '.join(a)}" for f, a in EXPORT])
def test_export_refuses_bad_flags_before_loading(flag, argv, files, capsys, monkeypatch):
    import diffship.exporters.export_pipeline as export_pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(export_pipeline, "load_reference_pipeline", no_loading)
    code, err = run_cli(expand(["export", "{model}", "{tmp}/exported", *argv], files), capsys)
    assert_one_line_error(code, err, flag)
    assert not (files["tmp"] / "exported").exists()


EXPORT_PATHS = [
    ("a missing model", ["export", "{model}", "{tmp}/exported"], "no such directory, and not a hub repo id"),
    ("a file as the model", ["export", "{text}", "{tmp}/exported"], "is a file"),
    ("a folder without model_index.json", ["export", "{dir}", "{tmp}/exported"], "no model_index.json"),
    ("a file as OUT", ["export", "{dir}", "{text}", "--overwrite"], "exists and is not a directory"),
    ("OUT under a file", ["export", "{dir}", "{text}/exported"], "is a file, so no directory can be made there"),
    ("OUT a user's folder", ["export", "{model}", "{tmp}", "--overwrite"], "is not one"),
    ("OUT the model", ["export", "{dir}", "{dir}", "--overwrite"], "is (or holds) the model being exported"),
]


@pytest.mark.parametrize("argv,expected", [r[1:] for r in EXPORT_PATHS], ids=[r[0] for r in EXPORT_PATHS])
def test_export_names_a_bad_model_or_output(argv, expected, files, capsys):
    before = sorted(p.name for p in files["tmp"].iterdir())
    code, err = run_cli(expand(argv, files), capsys)
    assert_one_line_error(code, err, expected)
    assert sorted(p.name for p in files["tmp"].iterdir()) == before


def test_export_names_a_malformed_model_index(tiny_model_dirs, files, capsys):
    model = shutil.copytree(tiny_model_dirs("sd1"), files["tmp"] / "model")
    (model / "model_index.json").write_text('["StableDiffusionPipeline"]')
    code, err = run_cli(["export", model, files["tmp"] / "exported"], capsys)
    assert_one_line_error(code, err, "model_index.json", "JSON object")


TINY_MODEL = [
    ("OUT", ["{text}"]),
    ("OUT", ["{tmp}"]),  # a folder with files in it
    ("OUT", ["{text}/model"]),
    ("--seed", ["{tmp}/m", "--seed", "-1"]),
    ("--seed", ["{tmp}/m", "--seed", str(2**64)]),
    ("--kind", ["{tmp}/m", "--kind", "sd9"]),
    ("--kind", ["{tmp}/m", "--trained", "--kind", "sd2"]),
    ("--full-size", ["{tmp}/m", "--trained", "--full-size"]),
    ("--seed", ["{tmp}/m", "--trained", "--seed", "3"]),
    ("--kind", ["{tmp}/m", "--full-size", "--kind", "sd2"]),
]


@pytest.mark.parametrize("flag,argv", TINY_MODEL, ids=[f"{f}:{' '.join(a)}" for f, a in TINY_MODEL])
def test_tiny_model_refuses_bad_flags(flag, argv, files, capsys):
    code, err = run_cli(expand(["tiny-model", *argv], files), capsys)
    assert_one_line_error(code, err, flag)
    assert not (files["tmp"] / "m").exists()


@pytest.fixture
def broken_export(exported_dirs, tmp_path):
    """A copy of the sd1 export to damage."""
    return shutil.copytree(exported_dirs("sd1"), tmp_path / "broken")


INSPECT = [
    ("model.onnx", lambda d: (d / "unet" / "model.onnx").write_bytes((d / "unet" / "model.onnx").read_bytes()[:999]),
     "unet/model.onnx"),
    ("openvino_model.xml garbage", lambda d: (d / "unet" / "openvino_model.xml").write_bytes(b"\x00garbage"),
     "unet/openvino_model.xml"),
    ("openvino_model.xml truncated", lambda d: (d / "unet" / "openvino_model.xml").write_text(
        (d / "unet" / "openvino_model.xml").read_text()[:500]), "unet/openvino_model.xml"),
    ("export_report.json not JSON", lambda d: (d / "export_report.json").write_text("{oops"), "export_report.json"),
    ("export_report.json a list", lambda d: (d / "export_report.json").write_text("[]"), "export_report.json"),
    ("export_report.json wrong shape", lambda d: (d / "export_report.json").write_text('{"components": {"unet": 1}}'),
     "export_report.json"),
]


@pytest.mark.parametrize("damage,expected", [r[1:] for r in INSPECT], ids=[r[0] for r in INSPECT])
def test_inspect_names_the_corrupt_file(damage, expected, broken_export, capsys):
    damage(broken_export)
    target = broken_export if "export_report" in expected else broken_export / expected
    code, err = run_cli(["inspect", target], capsys)
    assert_one_line_error(code, err, expected)


def test_inspect_refuses_bad_paths(files, capsys):
    for path, expected in ((files["model"], "does not exist"), (files["text"], "give a model.onnx"),
                           (files["dir"], "holds no model.onnx")):
        code, err = run_cli(["inspect", path], capsys)
        assert_one_line_error(code, err, str(path), expected)
    code, err = run_cli(["inspect", files["dir"], "--json=yes"], capsys)
    assert_one_line_error(code, err, "--json")


def _set(file: str, key: str, value):
    def damage(d):
        path = d / file
        config = json.loads(path.read_text())
        config[key] = value
        path.write_text(json.dumps(config))
    return damage


def _write(file: str, text: str):
    return lambda d: (d / file).write_text(text)


MALFORMED = [
    ("model_index.json", _write("model_index.json", "[1, 2]")),
    ("model_index.json", _set("model_index.json", "_class_name", 5)),
    ("scheduler/scheduler_config.json", _write("scheduler/scheduler_config.json", '"PNDMScheduler"')),
    ("scheduler/scheduler_config.json", _set("scheduler/scheduler_config.json", "beta_start", "0.1")),
    ("scheduler/scheduler_config.json", _set("scheduler/scheduler_config.json", "num_train_timesteps", "1000")),
    ("scheduler/scheduler_config.json", _set("scheduler/scheduler_config.json", "beta_schedule", "cosine-ish")),
    ("scheduler/scheduler_config.json", _set("scheduler/scheduler_config.json", "_class_name", "NoScheduler")),
    ("unet/config.json", _write("unet/config.json", "[]")),
    ("unet/config.json", _set("unet/config.json", "in_channels", "4")),
    ("unet/config.json", _set("unet/config.json", "sample_size", [8, 8])),
    ("vae_decoder/config.json", _set("vae_decoder/config.json", "scaling_factor", "0.18")),
    ("vae_decoder/config.json", _set("vae_decoder/config.json", "block_out_channels", 4)),
    ("text_encoder/config.json", _write("text_encoder/config.json", "{not json")),
    ("tokenizer/tokenizer_config.json", _write("tokenizer/tokenizer_config.json", "[]")),
    ("tokenizer/tokenizer_config.json", _set("tokenizer/tokenizer_config.json", "model_max_length", "77")),
    ("tokenizer/tokenizer.json", _write("tokenizer/tokenizer.json", '{"version": 1')),
]


@pytest.mark.parametrize("file,damage", MALFORMED, ids=[f"{f}-{i}" for i, (f, _) in enumerate(MALFORMED)])
def test_malformed_files_are_named(file, damage, broken_export, files, capsys, monkeypatch):
    def no_graphs(*args, **kwargs):
        raise AssertionError("a graph was loaded before the settings files were read")

    monkeypatch.setattr("diffship.pipelines.base.load_session", no_graphs)
    damage(broken_export)
    code, err = run_cli(["generate", broken_export, "--prompt", "cat", "--steps", "1", "--out", files["out"]],
                        capsys)
    assert_one_line_error(code, err, f"broken/{file}")


def test_malformed_settings_of_the_depth_estimator_are_named(tmp_path):
    (tmp_path / "feature_extractor").mkdir()
    path = tmp_path / "feature_extractor" / "preprocessor_config.json"
    path.write_text(json.dumps({"size": "384", "image_mean": [0.5, 0.5, 0.5]}))
    with pytest.raises(DiffshipError, match=r"preprocessor_config.json: size must be an integer or an object"):
        read_config(tmp_path, "feature_extractor", "preprocessor_config.json")


@pytest.mark.parametrize("error,code,expected", [
    (PermissionError(13, "Permission denied", "/x/unet/model.onnx"), 1, "Permission denied: '/x/unet/model.onnx'"),
    (OSError(28, "No space left on device"), 1, "No space left on device"),
    (MemoryError("Unable to allocate 120. GiB"), 1, "out of memory"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_system_errors_are_one_line(error, code, expected, capsys, monkeypatch):
    import diffship.cli

    def fail(args):
        raise error

    monkeypatch.setitem(diffship.cli.COMMANDS, "inspect", fail)
    got, err = run_cli(["inspect", "anything"], capsys)
    assert got == code
    assert_one_line_error(got, err, expected)


# ---- the pipelines' own checks (Python API) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(exported_dirs):
    pipe = StableDiffusionPipeline.from_pretrained(exported_dirs("sd1"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def forbid_runs(pipe, monkeypatch, names=None) -> None:
    """The sessions `names` of `pipe` (all by default) fail if run: a check must come before they do."""
    for name, session in pipe.sessions.items():
        if names is None or name in names:
            def run(feeds, name=name):
                raise AssertionError(f"{name} ran before the arguments were checked")
            monkeypatch.setattr(session, "run", run)


@pytest.fixture
def no_graph_runs(pipe, monkeypatch):
    forbid_runs(pipe, monkeypatch)


PIPELINE = [
    ("num_inference_steps", dict(num_inference_steps=0)),
    ("num_inference_steps", dict(num_inference_steps=-1)),
    ("num_inference_steps", dict(num_inference_steps=2.0)),
    ("num_inference_steps", dict(num_inference_steps=1001)),
    ("timesteps", dict(timesteps=[])),
    ("sigmas", dict(sigmas=[])),
    ("guidance_scale", dict(guidance_scale=float("nan"))),
    ("guidance_scale", dict(guidance_scale=float("inf"))),
    ("eta", dict(eta=-0.5)),
    ("eta", dict(eta=float("nan"))),
    ("guidance_rescale", dict(guidance_rescale=2.0)),
    ("num_images_per_prompt", dict(num_images_per_prompt=0)),
    ("num_images_per_prompt", dict(num_images_per_prompt=True)),
    ("height", dict(height=0)),
    ("height", dict(height=-64)),
    ("height", dict(height=100_000)),
    ("height", dict(height=64.0)),
    ("width", dict(width=0)),
    ("width", dict(width=60)),
    ("clip_skip", dict(clip_skip=-1)),
    ("clip_skip", dict(clip_skip=6)),
    ("generator", dict(generator=-1)),
    ("negative_prompt", dict(negative_prompt=["a", "b"])),
    ("negative_prompt", dict(negative_prompt=3)),
]


@pytest.mark.parametrize("name,kwargs", PIPELINE, ids=[f"{n}={list(k.values())[0]!r}" for n, k in PIPELINE])
def test_text_to_image_checks_arguments_first(name, kwargs, pipe, no_graph_runs):
    with pytest.raises((ValueError, TypeError), match=rf"^{name}\b"):
        pipe("a cat", **kwargs)


def test_negative_prompt_counts(pipe, no_graph_runs):
    with pytest.raises(ValueError, match="negative_prompt has 3 entries but prompt has 2"):
        pipe(["a", "b"], negative_prompt=["x", "y", "z"])
    with pytest.raises(TypeError, match="negative_prompt should be the same type as prompt"):
        pipe(["a", "b"], negative_prompt="x")


IMAGE_PIPELINE = [
    ("strength", dict(strength=1.5)),
    ("strength", dict(strength=float("nan"))),
    ("strength", dict(strength=0.1, num_inference_steps=5)),
    ("num_inference_steps", dict(num_inference_steps=0)),
    ("eta", dict(eta=2.0)),
]


@pytest.mark.parametrize("name,kwargs", IMAGE_PIPELINE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(IMAGE_PIPELINE)])
def test_image_to_image_checks_arguments_first(name, kwargs, pipe, no_graph_runs):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        StableDiffusionImg2ImgPipeline.from_pipe(pipe)("a cat", image=Image.new("RGB", (64, 64)), **kwargs)


@pytest.mark.parametrize("image", [Image.new("RGB", (5, 5)), Image.new("RGB", (4104, 8)),
                                   np.zeros((4, 4, 3), np.float32)], ids=["5x5", "4104x8", "numpy-4x4"])
def test_image_size_is_checked_before_encoding_it(image, pipe, monkeypatch):
    """The size comes from the image, checked when it is preprocessed: after the prompt is encoded, as in
    diffusers, and before the VAE encoder and the UNet run."""
    forbid_runs(pipe, monkeypatch, ("vae_encoder", "unet"))
    with pytest.raises(ValueError, match=r"^image is \d+x\d+ pixels; its sides, rounded down to a multiple of 8"):
        StableDiffusionImg2ImgPipeline.from_pipe(pipe)("a cat", image=image)


@pytest.mark.parametrize("name,kwargs", [("padding_mask_crop", dict(padding_mask_crop=-4)),
                                         ("height", dict(height=0)), ("strength", dict(strength=-1.0))])
def test_inpainting_checks_arguments_first(name, kwargs, pipe, no_graph_runs):
    image, mask = Image.new("RGB", (64, 64)), Image.new("L", (64, 64), 255)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        StableDiffusionInpaintPipeline.from_pipe(pipe)("a cat", image=image, mask_image=mask, **kwargs)


def test_ignored_arguments_are_warned_of(pipe, caplog):
    """diffusers drops these silently: eta on a scheduler without it, a negative prompt without guidance."""
    import diffship.schedulers

    euler = StableDiffusionPipeline.from_pipe(pipe, diffship.schedulers.EulerDiscreteScheduler.from_config(
        pipe.scheduler.config))
    with caplog.at_level(logging.WARNING):
        euler("a cat", num_inference_steps=1, eta=0.5, output_type="latent")
        euler("a cat", negative_prompt="blurry", guidance_scale=1.0, num_inference_steps=1, output_type="latent")
    assert "eta=0.5 is ignored: EulerDiscreteScheduler takes no eta" in caplog.text
    assert "the negative prompt is ignored: guidance_scale 1 (<= 1)" in caplog.text


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_backend_failure_names_component_and_shapes(backend, exported_dirs):
    pipe = StableDiffusionPipeline.from_pretrained(exported_dirs("sd1"), backend=backend, inference_precision="f32")
    feeds = {"sample": np.zeros((1, 3, 8, 8), np.float32), "timestep": pipe.timestep_feed(500, 1),
             "encoder_hidden_states": np.zeros((1, 77, 32), np.float32)}
    with pytest.raises(BackendError, match=rf"^{backend} could not run the unet graph .*sample \[1, 3, 8, 8\]"):
        pipe.unet.run(feeds)


# ---- images diffusers takes: 66x66 rounds down to the VAE's multiple --------------------------------------------

def test_66x66_image_runs_at_the_size_diffusers_gives(exported_dirs, tmp_path, capsys):
    from diffusers.image_processor import VaeImageProcessor as DiffusersProcessor

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(exported_dirs("sd1"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (66, 66, 3), np.uint8))
    expected = DiffusersProcessor(vae_scale_factor=pipe.vae_scale_factor).preprocess(image).shape
    assert pipe.image_processor.preprocess(image).shape == tuple(expected)

    image.save(tmp_path / "66.png")
    out = tmp_path / "out.png"
    code, err = run_cli(["generate", exported_dirs("sd1"), "--prompt", "cat", "--image", tmp_path / "66.png",
                         "--steps", "2", "--no-progress", "--out", out], capsys)
    assert code == 0, err
    assert Image.open(out).size == (expected[3], expected[2])


# ---- silent truncation becomes a warning ------------------------------------------------------------------------

def test_prompt_past_77_tokens_is_cut_with_a_warning(pipe, caplog):
    prompt = " ".join(["a red circle"] * 30) + " on a purple background"
    with caplog.at_level(logging.WARNING, logger="diffship.pipelines.prompts"):
        pipe(prompt, negative_prompt="blurry", num_inference_steps=1, output_type="latent")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "prompt is longer than the 77 tokens" in warnings[0] and "on a purple background" in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffship.pipelines.prompts"):
        pipe(["a cat", prompt], negative_prompt=["ok", prompt], num_inference_steps=1, output_type="latent")
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "prompt 1 is longer" in messages and "negative_prompt 1 is longer" in messages
