"""Optimum's exports load in diffship and give diffusers' images.

The fixtures under tests/fixtures/optimum/ are committed, made by benchmarks/peers/make_optimum_fixtures.sh (Optimum
pins transformers 4.x, so it runs in its own venv; this test needs no Optimum):

    tiny-sd1/   the source: `diffship tiny-model --kind sd1`, a diffusers directory (the oracle runs on it)
    onnx/       `optimum-cli export onnx --task text-to-image` of it (optimum-onnx 0.1.0)
    openvino/   `optimum-cli export openvino --task text-to-image --weight-format fp32` of it (optimum-intel 1.27.0)

diffship runs Optimum's ONNX graphs on ONNX Runtime and on OpenVINO (which reads model.onnx), and its OpenVINO IR on
OpenVINO, against diffusers' StableDiffusionPipeline (torch, CPU) with the same prompts (a batch of 2), latents and
scheduler (PNDM, DDIM, Euler), with and without guidance. Tolerance: 1e-3 max abs on output_type="np" images in
[0, 1] (the issue's bound); measured 1.4e-6 (ONNX on ORT), 2.6e-6 (ONNX on OpenVINO), 2.2e-6 (IR on OpenVINO).

What differs from diffship's own exports, and is checked here so that the test notices if the fixture were replaced
by a diffship export: the OpenVINO UNet takes timestep int64 [batch] (ONNX: float32 rank 0, as diffship's); the
text encoder has no hidden_states.N outputs and there is no final_layer_norm.npz (so clip_skip is refused with a
clear error); the tokenizer has vocab.json + merges.txt and no tokenizer.json; no export_report.json; and every
file's sha256 is the one MANIFEST.json records.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from diffship.errors import DiffshipError
from diffship.pipelines import StableDiffusionPipeline

FIXTURES = Path(__file__).parent / "fixtures" / "optimum"
SOURCE, ONNX_DIR, OPENVINO_DIR = FIXTURES / "tiny-sd1", FIXTURES / "onnx", FIXTURES / "openvino"
COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")

ATOL = 1e-3
PROMPTS = ["a red circle on the left", "an oil painting of a castle at sunset"]
STEPS = 4
SCHEDULERS = ("PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler")
# (fixture folder, diffship backend): Optimum's ONNX on both runtimes, its OpenVINO IR on OpenVINO.
LOADS = {"onnx-onnxruntime": (ONNX_DIR, "onnxruntime"), "onnx-openvino": (ONNX_DIR, "openvino"),
         "openvino-openvino": (OPENVINO_DIR, "openvino")}


def _latents(batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 4, 32, 32)).astype(np.float32)


# ---- the fixtures are Optimum's, unchanged ---------------------------------------------------------------------


def test_fixture_files_match_manifest():
    """Every file is the one make_optimum_fixtures.sh wrote (sizes and sha256 in MANIFEST.json), and no more."""
    manifest = json.loads((FIXTURES / "MANIFEST.json").read_text())
    for folder, entry in manifest["folders"].items():
        root = FIXTURES / folder
        on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        assert on_disk == [f["path"] for f in entry["files"]], f"{folder}: files added or removed"
        for f in entry["files"]:
            digest = hashlib.sha256((root / f["path"]).read_bytes()).hexdigest()
            assert digest == f["sha256"], f"{folder}/{f['path']} changed; remake with make_optimum_fixtures.sh"
    assert manifest["optimum_venv_versions"]["transformers"].startswith("4.")


def test_onnx_fixture_is_optimums():
    onnx = pytest.importorskip("onnx")

    def io(name):
        graph = onnx.load(str(ONNX_DIR / name / "model.onnx"), load_external_data=False).graph
        inputs = {i.name: (i.type.tensor_type.elem_type, len(i.type.tensor_type.shape.dim)) for i in graph.input}
        return inputs, [o.name for o in graph.output]

    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    assert io("text_encoder") == ({"input_ids": (i64, 2)}, ["last_hidden_state", "pooler_output"])
    assert io("unet") == ({"sample": (f32, 4), "timestep": (f32, 0), "encoder_hidden_states": (f32, 3)},
                          ["out_sample"])
    assert io("vae_encoder") == ({"sample": (f32, 4)}, ["latent_parameters"])
    assert io("vae_decoder") == ({"latent_sample": (f32, 4)}, ["sample"])
    _check_optimum_layout(ONNX_DIR)


def test_openvino_fixture_is_optimums():
    ov = pytest.importorskip("openvino")
    core = ov.Core()

    def io(name):
        model = core.read_model(str(OPENVINO_DIR / name / "openvino_model.xml"))
        inputs = {p.get_any_name(): (p.get_element_type().get_type_name(), str(p.get_partial_shape()))
                  for p in model.inputs}
        return inputs, [p.get_any_name() for p in model.outputs], model

    inputs, outputs, model = io("unet")
    assert inputs == {"sample": ("f32", "[?,4,?,?]"), "timestep": ("i64", "[?]"),
                      "encoder_hidden_states": ("f32", "[?,77,32]")}
    assert outputs == ["out_sample"]
    assert model.has_rt_info(["optimum", "optimum_intel_version"])
    inputs, outputs, _ = io("text_encoder")
    assert inputs == {"input_ids": ("i64", "[?,?]")} and outputs == ["last_hidden_state", "pooler_output"]
    assert io("vae_encoder")[1] == ["latent_parameters"] and io("vae_decoder")[1] == ["sample"]
    # optimum-intel converts the tokenizer too (openvino_tokenizers); diffship reads vocab.json + merges.txt.
    assert (OPENVINO_DIR / "tokenizer" / "openvino_tokenizer.xml").is_file()
    _check_optimum_layout(OPENVINO_DIR)


def _check_optimum_layout(root: Path):
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["_name_or_path"] == "tiny-sd1"
    assert index["vae"] == ["diffusers", "AutoencoderKL"]  # diffship writes vae_encoder/vae_decoder entries
    assert json.loads((root / "text_encoder" / "config.json").read_text())["transformers_version"].startswith("4.")
    assert {p.name for p in (root / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt", "tokenizer_config.json"}
    assert not (root / "tokenizer" / "tokenizer.json").exists()
    assert not (root / "export_report.json").exists()
    assert not (root / "text_encoder" / "final_layer_norm.npz").exists()
    for name in COMPONENTS:
        assert (root / name / "config.json").is_file()


# ---- diffship on Optimum's exports == diffusers on the source --------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    """diffusers' images on the source model, once per (scheduler, guidance) and shared by the three loads."""
    import torch
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(SOURCE, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    cache = {}

    def get(scheduler: str, guidance_scale: float):
        if (scheduler, guidance_scale) not in cache:
            pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
            cache[scheduler, guidance_scale] = pipe(
                PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale, output_type="np",
                latents=torch.from_numpy(_latents()),
            ).images
        return cache[scheduler, guidance_scale]

    return get


@pytest.fixture(scope="module")
def optimum_pipelines():
    cache = {}

    def get(load: str) -> StableDiffusionPipeline:
        if load not in cache:
            folder, backend = LOADS[load]
            pipe = StableDiffusionPipeline.from_pretrained(folder, backend=backend, inference_precision="f32")
            pipe.set_progress_bar_config(disable=True)
            cache[load] = pipe
        return cache[load]

    return get


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["guided", "unguided"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("load", list(LOADS))
def test_optimum_export_matches_diffusers(load, scheduler, guidance_scale, reference, optimum_pipelines):
    import diffship.schedulers

    expected = reference(scheduler, guidance_scale)
    pipe = optimum_pipelines(load)
    pipe.scheduler = getattr(diffship.schedulers, scheduler).from_config(pipe.scheduler.config)
    images = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale, output_type="np",
                  latents=_latents()).images
    assert images.shape == expected.shape == (2, 64, 64, 3)
    assert np.abs(expected[0] - expected[1]).max() > 1e-2  # the prompts matter, so the text path is exercised
    np.testing.assert_allclose(images, expected, atol=ATOL, rtol=0)


def test_clip_skip_is_refused_clearly(optimum_pipelines):
    """Optimum's text encoder has no hidden_states.N outputs: clip_skip cannot be honoured, and says so."""
    with pytest.raises(DiffshipError, match="hidden_states"):
        optimum_pipelines("onnx-onnxruntime")(PROMPTS[0], num_inference_steps=1, clip_skip=1, output_type="np")


def test_openvino_unet_with_static_timestep_shape_1(reference):
    """optimum-intel's Python export (`OVStableDiffusionPipeline.from_pretrained(export=True).save_pretrained`)
    writes the UNet's timestep as i64 of static shape [1], the CLI as [?]; the graph broadcasts it over the batch.
    The fixed form is emulated on the CLI fixture, so one fixture covers both."""
    from diffship.schedulers import PNDMScheduler

    pipe = StableDiffusionPipeline.from_pretrained(OPENVINO_DIR, backend="openvino", inference_precision="f32")
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.reshape({"timestep": (1,)})
    assert next(i for i in pipe.unet.inputs if i.name == "timestep").shape == (1,)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    images = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, output_type="np", latents=_latents()).images
    np.testing.assert_allclose(images, reference("PNDMScheduler", 7.5), atol=ATOL, rtol=0)
