"""The backend follows from what an export holds when none is given (from_pretrained, generate, bench), and a backend
the directory cannot serve is refused up front, with what it holds and what would run it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from diffship import AutoPipelineForText2Image, StableDiffusionPipeline
from diffship.benchmarking import bench, runnable_backends
from diffship.cli import main
from diffship.errors import BackendError
from diffship.layout import ONNX_MODEL, OPENVINO_MODEL


def _only(source, target, keep: str):
    """A copy of the export `source` holding one format's graphs: keep "onnx" or "openvino"."""
    shutil.copytree(source, target)
    for folder in target.iterdir():
        if (folder / ONNX_MODEL).is_file() and (folder / OPENVINO_MODEL).is_file():
            for f in folder.iterdir():
                onnx_file = f.name.startswith("model.onnx")
                if onnx_file != (keep == "onnx") and (onnx_file or f.name.startswith("openvino_model.")):
                    f.unlink()
    return target


@pytest.fixture(scope="module")
def single_format(exported_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("single-format")
    both = exported_dirs("sd1")
    return {"both": both, "onnx": _only(both, root / "onnx-only", "onnx"),
            "openvino": _only(both, root / "openvino-only", "openvino")}


def _image(pipe):
    pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    return pipe("a red circle", num_inference_steps=2, latents=latents, output_type="np").images


def test_layouts_of_the_copies(single_format):
    assert not list(single_format["openvino"].glob("*/model.onnx*"))
    assert list(single_format["openvino"].glob("*/openvino_model.xml"))
    assert not list(single_format["onnx"].glob("*/openvino_model.*"))


@pytest.mark.parametrize("held, chosen", [("both", "onnxruntime"), ("onnx", "onnxruntime"),
                                          ("openvino", "openvino")])
def test_from_pretrained_picks_the_backend_the_graphs_are_for(single_format, held, chosen):
    pipe = StableDiffusionPipeline.from_pretrained(single_format[held], inference_precision="f32")
    assert pipe.backend == chosen
    # The same graphs on the same backend, named or not: the same image.
    named = StableDiffusionPipeline.from_pretrained(single_format[held], backend=chosen, inference_precision="f32")
    np.testing.assert_array_equal(_image(pipe), _image(named))
    assert AutoPipelineForText2Image.from_pretrained(single_format[held]).backend == chosen


def test_openvino_still_runs_onnx_only_exports(single_format):
    assert StableDiffusionPipeline.from_pretrained(single_format["onnx"], backend="openvino").backend == "openvino"


def test_a_backend_the_export_cannot_serve_says_what_it_holds(single_format):
    with pytest.raises(BackendError, match=r"openvino-only/\w+: the onnxruntime backend runs model\.onnx, and this "
                                           r"component holds openvino_model\.xml only; load it with "
                                           r"backend='openvino'$"):
        StableDiffusionPipeline.from_pretrained(single_format["openvino"], backend="onnxruntime")


def test_generate_without_backend_on_an_openvino_only_export(single_format, tmp_path, capsys):
    image = tmp_path / "img.png"
    assert main(["generate", str(single_format["openvino"]), "--prompt", "a red circle", "--steps", "1",
                 "--out", str(image), "--no-progress"]) == 0
    assert image.is_file() and "openvino" in capsys.readouterr().out
    assert main(["generate", str(single_format["openvino"]), "--prompt", "a red circle", "--steps", "1",
                 "--out", str(image), "--no-progress", "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "holds openvino_model.xml only; load it with backend='openvino'" in err


def test_generate_flags_name_the_backend(single_format, tmp_path, capsys):
    """Without --backend, an OpenVINO-only flag (--static, --device, a bf16 precision) means OpenVINO, even on an
    export that holds both formats (which would otherwise load on onnxruntime)."""
    assert main(["generate", str(single_format["both"]), "--prompt", "a red circle", "--steps", "1", "--static",
                 "--out", str(tmp_path / "img.png"), "--no-progress"]) == 0
    assert "openvino" in capsys.readouterr().out


def test_bench_defaults_to_the_backends_that_run_the_export(single_format):
    assert runnable_backends(single_format["openvino"]) == ["openvino"]
    assert runnable_backends(single_format["onnx"]) == ["onnxruntime", "openvino"]  # OpenVINO reads ONNX too
    assert runnable_backends(single_format["both"]) == ["onnxruntime", "openvino"]
    with pytest.raises(BackendError, match="holds openvino_model.xml only"):  # before any worker starts
        bench(single_format["openvino"], ["onnxruntime"], runs=1, warmup=0, steps=1)
