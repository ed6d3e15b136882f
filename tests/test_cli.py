"""The command line: tiny-model, export and generate, with their errors."""

from __future__ import annotations

import json

import pytest

from diffship.cli import main


def test_help_lists_verbs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for verb in ("tiny-model", "export", "generate"):
        assert verb in out


def test_tiny_model_export_generate(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "tiny"), "--kind", "sd2"]) == 0
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    assert main(["export", str(tmp_path / "tiny"), str(tmp_path / "out"), "--backend", "onnx,openvino"]) == 0
    out = capsys.readouterr().out
    assert "unet" in out and "onnxruntime fp32 max abs" in out and "openvino fp32 max abs" in out
    unet_line = next(line for line in out.splitlines() if line.strip().startswith("unet "))
    assert "model_ort_cpu.onnx (" in unet_line and "attentions on MultiHeadAttention, for the CPU) max abs" in unet_line

    image = tmp_path / "img.png"
    assert main(["generate", str(tmp_path / "out"), "--prompt", "a red circle", "--prompt", "a blue square",
                 "--steps", "2", "--seed", "1", "--scheduler", "euler", "--out", str(image),
                 "--json", str(tmp_path / "t.json"), "--no-progress", "--backend", "openvino", "--static"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "img_0.png").is_file() and (tmp_path / "img_1.png").is_file()
    assert "EulerDiscreteScheduler" in out and "UNet per step" in out
    timings = json.loads((tmp_path / "t.json").read_text())
    assert timings["unet_steps"] == 2

    # a flow-matching scheduler (SD3 / Flux) on a UNet model: refused, naming what fits
    assert main(["generate", str(tmp_path / "out"), "--prompt", "x", "--steps", "1", "--scheduler", "flow-euler",
                 "--out", str(tmp_path / "flow.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--scheduler: StableDiffusionPipeline runs a noise-prediction model" in err and "dpm++2m-karras" in err
    assert not (tmp_path / "flow.png").exists()

    # The images are diffship's (their EXIF says so): a second run replaces them. A file diffship did not write is
    # replaced only with --overwrite.
    again = ["generate", str(tmp_path / "out"), "--prompt", "a red circle", "--steps", "1", "--out",
             str(tmp_path / "img_0.png"), "--no-progress"]
    assert main(again) == 0
    assert main(again + ["--json", str(tmp_path / "t.json")]) == 2
    assert "t.json exists and diffship did not write it; pass --overwrite" in capsys.readouterr().err
    assert main(again + ["--json", str(tmp_path / "t.json"), "--overwrite"]) == 0


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "no model_index.json" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "missing: no such directory, and not a hub repo id" in capsys.readouterr().err
