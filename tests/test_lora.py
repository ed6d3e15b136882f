"""LoRA baked in at export (`loras=`, `--lora FILE[:SCALE]`) vs diffusers with the same adapters loaded unfused.

Each tiny pipeline (SD 1.x and SDXL) is exported once with two adapters at different scales: one in the
diffusers/PEFT format with convolution layers (the UNet's resnet convolutions) beside the attention projections,
one in the kohya format; both adapt the text encoders too. diffusers' reference loads the same files with
load_lora_weights and set_adapters at the same scales, unfused.

Tolerance: 1e-3 max abs on output_type="np" images in [0, 1] (image_tasks.ATOL, as every parity test): fusing
the adapters into the weights changes float rounding only (about 1e-6 here); an adapter missed, applied twice or at
the wrong scale changes the images by 1e-2 or more (the adapters move these images by about 0.1-0.2).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from diffship.cli import main
from diffship.errors import DiffshipError
from diffship.exporters import export
from diffship.exporters.lora import parse_lora_flag
from diffship.pipelines import AutoPipelineForText2Image
from diffship.testing.tiny_loras import save_tiny_lora
from image_tasks import ATOL, BACKENDS, TorchNoise, latents, max_abs, one_torch_thread, report

SCALES = {"locon": 0.8, "kohya": 0.5}
PROMPTS = ["a red circle on the left", "an oil painting of a castle at sunset"]
STEPS = 3
# SDXL's LoRA export is ONNX only (OpenVINO runs model.onnx): fusing is done in PyTorch before either conversion,
# and SD 1.x's export checks the OpenVINO conversion of fused weights; the suite stays within its time.
FORMATS = {"sd1": ["onnx", "openvino"], "sdxl": ["onnx"]}


@pytest.fixture(scope="module")
def loras(tiny_model_dirs, tmp_path_factory):
    """kind -> {name: LoRA file} for that tiny pipeline."""
    root, cache = tmp_path_factory.mktemp("loras"), {}

    def get(kind):
        if kind not in cache:
            model = tiny_model_dirs(kind)
            cache[kind] = {
                "locon": save_tiny_lora(model, root / kind / "locon.safetensors", convolutions=True, seed=1),
                "kohya": save_tiny_lora(model, root / kind / "kohya.safetensors", kohya=True, seed=2),
            }
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def lora_exports(tiny_model_dirs, loras, tmp_path_factory):
    """kind -> the tiny pipeline exported to both formats with both adapters fused at SCALES."""
    root, cache = tmp_path_factory.mktemp("lora-exports"), {}

    def get(kind):
        if kind not in cache:
            files = loras(kind)
            cache[kind] = export(tiny_model_dirs(kind), root / kind, FORMATS[kind], progress=False,
                                 loras=[(files[name], scale) for name, scale in SCALES.items()])
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def references(tiny_model_dirs, loras):
    """kind -> diffusers' images with both adapters loaded (unfused) at SCALES."""
    import diffusers
    import torch

    cache = {}

    def get(kind):
        if kind not in cache:
            pipe = diffusers.AutoPipelineForText2Image.from_pretrained(tiny_model_dirs(kind))
            pipe.set_progress_bar_config(disable=True)
            for name, file in loras(kind).items():
                pipe.load_lora_weights(str(file), adapter_name=name)
            pipe.set_adapters(list(SCALES), adapter_weights=list(SCALES.values()))
            with one_torch_thread():
                cache[kind] = pipe(PROMPTS, num_inference_steps=STEPS, latents=torch.from_numpy(latents()),
                                   generator=torch.Generator().manual_seed(0), output_type="np").images
        return cache[kind]

    return get


def _images(folder, backend):
    pipe = AutoPipelineForText2Image.from_pretrained(folder, backend=backend, inference_precision="f32")
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, num_inference_steps=STEPS, latents=latents(), generator=TorchNoise(0),
                output_type="np").images


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_lora_export_matches_diffusers_with_the_adapters_loaded(kind, backend, lora_exports, references,
                                                                exported_dirs):
    got = _images(lora_exports(kind), backend)
    diff = max_abs(references(kind), got)
    report(f"lora-{kind}-{backend}", diff)
    assert diff < ATOL, f"{kind} on {backend}: max abs {diff:.2e} >= {ATOL}"
    # The adapters did change the model: the base export's images are far from these.
    assert max_abs(_images(exported_dirs(kind), backend), got) > 20 * ATOL


def test_the_report_records_each_adapter(lora_exports, loras):
    report_ = json.loads((lora_exports("sd1") / "export_report.json").read_text())
    assert report_["loras"] == [
        {"file": str(loras("sd1")[name].resolve()),
         "sha256": hashlib.sha256(loras("sd1")[name].read_bytes()).hexdigest(), "scale": scale}
        for name, scale in SCALES.items()
    ]


@pytest.mark.parametrize("text, expected", [
    ("style.safetensors", ("style.safetensors", 1.0)),
    ("style.safetensors:0.7", ("style.safetensors", 0.7)),
    ("dir:with:colons/style.safetensors", ("dir:with:colons/style.safetensors", 1.0)),
    ("/loras/style.safetensors:-1.5", ("/loras/style.safetensors", -1.5)),
])
def test_lora_flag(text, expected):
    assert parse_lora_flag(text) == expected


def test_bad_lora_files_are_refused_before_any_work(tiny_model_dirs, tmp_path, capsys):
    """Each gets one line naming --lora and the file, exit 2, and nothing written."""
    not_safetensors = tmp_path / "broken.safetensors"
    not_safetensors.write_bytes(b"this is not a safetensors file")
    weights = tmp_path / "weights.safetensors"
    from safetensors.numpy import save_file

    save_file({"conv_in.weight": np.zeros((4, 4), np.float32)}, str(weights))
    cases = {
        str(tmp_path / "missing.safetensors"): "no such file",
        str(tmp_path): "not a file",
        str(not_safetensors): "is not a safetensors file that can be read",
        str(weights): "holds no LoRA weights",
        f"{weights}:nan": "the scale must be a finite number",
        str(tmp_path / "old.ckpt"): "no such file",
    }
    (tmp_path / "pickled.bin").write_bytes(b"x")
    cases[str(tmp_path / "pickled.bin")] = "is a pickled file"
    for flag, message in cases.items():
        code = main(["export", str(tiny_model_dirs("sd1")), str(tmp_path / "out"), "--lora", flag])
        err = capsys.readouterr().err
        line = err.strip().splitlines()[-1]  # after what the first import of transformers may warn in this process
        assert code == 2 and line.startswith("diffship export: error: --lora ") and message in line, (flag, err)
        assert "Traceback" not in err
        assert not (tmp_path / "out").exists()


def test_a_lora_for_another_architecture_is_refused(tiny_model_dirs, loras, tmp_path):
    """SDXL's LoRA on SD 1.x: its second text encoder's layers have no home, its UNet's do not fit; the export
    stops with the file named and leaves nothing."""
    with pytest.raises(DiffshipError, match=r"loras .*sdxl.*kohya\.safetensors does not fit this StableDiffusion"
                                             r"Pipeline: .*(size mismatch|no such component|match no layer)"):
        export(tiny_model_dirs("sd1"), tmp_path / "out", "onnx", progress=False, loras=[loras("sdxl")["kohya"]])
    assert list(tmp_path.iterdir()) == []
