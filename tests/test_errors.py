"""Bad input gets a clear error naming the path or argument."""

from __future__ import annotations

import shutil

import pytest

from diffship.errors import BackendError, MissingComponentError, NotAPipelineError
from diffship.pipelines import StableDiffusionPipeline


@pytest.fixture(scope="module")
def pipe(exported_dirs):
    pipe = StableDiffusionPipeline.from_pretrained(exported_dirs("sd1"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_missing_component(exported_dirs, tmp_path):
    broken = shutil.copytree(exported_dirs("sd1"), tmp_path / "broken")
    shutil.rmtree(broken / "unet")
    with pytest.raises(MissingComponentError, match=r"broken/unet is missing.*needs the unet component"):
        StableDiffusionPipeline.from_pretrained(broken)


def test_unknown_backend(exported_dirs):
    with pytest.raises(BackendError, match="unknown backend 'tensorflow'; choose one of onnxruntime, openvino"):
        StableDiffusionPipeline.from_pretrained(exported_dirs("sd1"), backend="tensorflow")


@pytest.mark.parametrize("backend,file", [("onnxruntime", "model.onnx"), ("openvino", "openvino_model.xml")])
def test_corrupt_model_file(backend, file, exported_dirs, tmp_path):
    broken = shutil.copytree(exported_dirs("sd1"), tmp_path / "broken")
    (broken / "vae_decoder" / file).write_bytes(b"this is not a model")
    with pytest.raises(BackendError, match=rf"could not (load|read) .*broken/vae_decoder/{file}"):
        StableDiffusionPipeline.from_pretrained(broken, backend=backend, inference_precision="f32")


def test_not_a_pipeline(tmp_path):
    with pytest.raises(NotAPipelineError, match=rf"{tmp_path} is not an exported pipeline: it has no model_index"):
        StableDiffusionPipeline.from_pretrained(tmp_path)
    with pytest.raises(NotAPipelineError, match="nowhere: no such directory"):
        StableDiffusionPipeline.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "file.onnx").write_text("x")
    with pytest.raises(NotAPipelineError, match="is a file"):
        StableDiffusionPipeline.from_pretrained(tmp_path / "file.onnx")


@pytest.mark.parametrize("height,width", [(60, 64), (64, 70)])
def test_size_not_multiple_of_8(pipe, height, width):
    with pytest.raises(ValueError, match="(height|width) must be a multiple of 8 from 8 to 4096 pixels"):
        pipe("a cat", height=height, width=width, num_inference_steps=1)


def test_empty_prompt_list(pipe):
    with pytest.raises(ValueError, match="prompt must be a non-empty list"):
        pipe([], num_inference_steps=1)


def test_other_argument_errors(pipe):
    with pytest.raises(ValueError, match="output_type must be one of"):
        pipe("a cat", num_inference_steps=1, output_type="pt")
    with pytest.raises(ValueError, match="negative_prompt has 1 entries but prompt has 2"):
        pipe(["a", "b"], negative_prompt=["x"], num_inference_steps=1)
    with pytest.raises(ValueError, match="latents have shape"):
        import numpy as np

        pipe("a cat", latents=np.zeros((1, 4, 7, 9), np.float32), num_inference_steps=1)
    with pytest.raises(ValueError, match="pass either prompt or prompt_embeds"):
        pipe(num_inference_steps=1)
