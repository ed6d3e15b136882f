"""The shapes world and the trained model shipped with diffship: renders, the pixel scorer, the shipped weights
(they load in diffusers and in diffship, and draw the right colour in 5 steps), the CLI and the training script."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffship.cli import main
from diffship.testing import shapes

MAX_SHIPPED_MB = 30
# 5-step generations check one prompt per colour, each at a different shape and position.
COLOUR_PROMPTS = ["a red circle on the left", "a green square on the top", "a blue triangle on the center",
                  "a yellow circle on the bottom"]


def test_prompts_cover_the_world():
    assert len(shapes.PROMPTS) == len(set(shapes.PROMPTS)) == 60
    assert shapes.parse_prompt("A Red circle on the left ") == ("red", "circle", "left")
    with pytest.raises(ValueError, match="not a shapes prompt"):
        shapes.parse_prompt("a purple circle on the left")


def test_scorer_reads_every_render_right():
    """Renders (other seed than training's) are read back 100 % right: the scorer agrees with the renderer."""
    images, prompts = shapes.render_dataset(4, seed=123)
    results = shapes.score(images, prompts)
    assert shapes.accuracy(results) == {"colour": 100.0, "shape": 100.0, "position": 100.0, "all": 100.0}


def test_scorer_catches_each_wrong_attribute():
    image = shapes.render("a red circle on the left", np.random.default_rng(0))
    wrong = shapes.score([image] * 3, ["a blue circle on the left", "a red triangle on the left",
                                       "a red circle on the right"])
    assert [(r["colour"], r["shape"], r["position"]) for r in wrong] == [
        (False, True, True), (True, False, True), (True, True, False)]


def test_scorer_takes_floats_and_finds_nothing_on_a_blank_image():
    image = shapes.render("a yellow square on the bottom", np.random.default_rng(1))
    assert shapes.score(image.astype(np.float32) / 255, ["a yellow square on the bottom"])[0]["shape"]
    blank = shapes.score(np.full((64, 64, 3), 0.9, np.float32), ["a yellow square on the bottom"])[0]
    assert blank["seen"] == {"colour": None, "shape": None, "position": None}
    assert not (blank["colour"] or blank["shape"] or blank["position"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        shapes.score([image, image], ["a yellow square on the bottom"])


def test_shipped_model_is_small_and_was_trained_within_the_hour():
    files = [p for p in shapes.TRAINED_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_SHIPPED_MB * 2**20
    assert {p.parent.name for p in files if p.suffix == ".safetensors"} == {"unet", "vae", "text_encoder"}
    log = json.loads((shapes.TRAINED_MODEL / "training_log.json").read_text())
    assert log["total_seconds"] <= 3600 and log["threads"] == 2


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory):
    from diffship.exporters import export

    root = tmp_path_factory.mktemp("shapes")
    assert main(["tiny-model", "--trained", str(root / "model")]) == 0
    return root / "model", export(root / "model", root / "exported", ["onnx", "openvino"], progress=False)


def test_shipped_weights_load_in_diffusers_and_draw_the_right_colour(trained_export):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(trained_export[0], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipe(COLOUR_PROMPTS, num_inference_steps=5, guidance_scale=6.0, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (4, 64, 64, 3)
    results = shapes.score(images, COLOUR_PROMPTS)
    assert [r["seen"]["colour"] for r in results] == ["red", "green", "blue", "yellow"]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_shipped_model_draws_the_right_colour_in_5_steps(trained_export, backend):
    from diffship.pipelines import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(trained_export[1], backend=backend, inference_precision="f32")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(COLOUR_PROMPTS, num_inference_steps=5, guidance_scale=6.0, output_type="np",
                  generator=np.random.default_rng(0)).images
    results = shapes.score(images, COLOUR_PROMPTS)
    assert [r["seen"]["colour"] for r in results] == ["red", "green", "blue", "yellow"]
    # something was drawn on a light background, not noise: most pixels are light and nearly grey
    light = (images.min(axis=-1) > 0.7) & (np.ptp(images, axis=-1) < 0.1)
    assert light.mean() > 0.6


def test_cli_trained_errors(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["tiny-model", "--trained", str(tmp_path / "full")]) != 0
    assert "is not empty" in capsys.readouterr().err
    assert main(["tiny-model", "--trained", "--kind", "sd2", str(tmp_path / "m")]) != 0
    assert "cannot be combined" in capsys.readouterr().err


def test_training_is_deterministic_and_writes_a_pipeline(tmp_path):
    """Two short runs with one seed give identical weights (the full run repeats the same way), and the result
    is a diffusers pipeline with the scaling factor measured on its latents."""
    from safetensors.numpy import load_file

    from diffship.testing.shapes_training import CONFIG, train

    config = json.loads(json.dumps(CONFIG))
    config["vae"]["steps"], config["train"]["steps"], config["train"]["renders_per_prompt"] = 2, 3, 1
    config["train"]["batch"] = config["vae"]["batch"] = 4
    first = train(tmp_path / "a", config, show_progress=False)
    second = train(tmp_path / "b", config, show_progress=False)
    for component in ("unet", "vae", "text_encoder"):
        name = f"{component}/diffusion_pytorch_model.safetensors" if component != "text_encoder" else \
            "text_encoder/model.safetensors"
        a, b = load_file(first / name), load_file(second / name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    vae_config = json.loads((first / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.18215  # measured, not SD's default
    assert (first / "model_index.json").is_file() and not (tmp_path / "a.partial").exists()
    with pytest.raises(FileExistsError, match="already exists"):
        train(first, config, show_progress=False)


def test_terminal_image_draws_two_pixel_rows_per_line():
    from diffship.terminal_image import terminal_image

    image = shapes.render("a blue square on the center", np.random.default_rng(2))
    text = terminal_image(image)
    lines = text.split("\n")
    assert len(lines) == 32 and all(line.count("▀") == 64 for line in lines)
    centre = lines[16].split("▀")[32]  # the cell in the middle of the square: the square's own colour
    r, g, b = (int(v) for v in centre.split("38;2;")[1].split("m")[0].split(";"))
    assert b > 150 and r < 100
    assert len(terminal_image(np.zeros((300, 200, 3), np.uint8)).split("\n")) == 48  # shrunk to 64 columns
