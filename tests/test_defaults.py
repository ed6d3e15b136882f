"""Fast and safe defaults: OpenVINO's inference precision chosen per component from what the export measured,
static shapes compiled per request shape, and the on-disk compile cache of both runtimes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffship.errors import DiffshipError
from diffship.layout import ORT_CPU_MODEL, REPORT_FILE, UNET
from diffship.pipelines import StableDiffusionPipeline
from diffship.runtimes.openvino import OpenVINOSession, has_bf16

CALL = dict(prompt="a red circle", num_inference_steps=3, generator=0, output_type="np", height=64, width=64)


def _report(model_dir) -> dict:
    return json.loads((model_dir / REPORT_FILE).read_text())


def test_export_records_the_bf16_choice(exported_dirs):
    """Every OpenVINO graph has its bf16 error measured against PyTorch and a choice within BF16_RTOL."""
    from diffship.exporters.validate import BF16_RTOL

    for name, entry in _report(exported_dirs("sd1"))["components"].items():
        record = entry["inference_precision"]["openvino"]
        if not has_bf16():
            assert record == {"choice": "f32", "bf16": None, "reason": record["reason"]} and "bf16" in record["reason"]
            continue
        bf16 = record["bf16"]
        assert bf16["rtol"] == BF16_RTOL and bf16["nan"] == 0
        # bf16 rounds (8 significant bits): never exact, never broken on these graphs.
        assert 1e-4 < bf16["max_rel"] < 1, (name, bf16)
        assert record["choice"] == ("bf16" if bf16["max_rel"] <= BF16_RTOL else "f32")


def test_bf16_choice_beyond_bound_keeps_f32(exported_dirs, monkeypatch):
    """A component whose bf16 error exceeds the bound runs f32; without bf16 on the CPU nothing is measured."""
    import diffship.exporters.formats as formats
    import diffship.runtimes.openvino as ov
    from diffship.exporters.components import ComponentSpec  # noqa: F401 - the Reference below needs torch

    class Reference:
        def measure(self, session, backend, traced_only=False):
            return {"max_abs": 0.5, "max_rel": 0.2, "nan": 0}

    path = exported_dirs("sd1") / UNET / "openvino_model.xml"
    monkeypatch.setattr(ov, "has_bf16", lambda core=None: True)
    assert formats._bf16_choice(Reference(), path, "fp32")["choice"] == "f32"
    # A hybrid-int8 graph is judged by its own, wider bound (3e-1).
    assert formats._bf16_choice(Reference(), path, "hybrid")["choice"] == "bf16"
    monkeypatch.setattr(ov, "has_bf16", lambda core=None: False)
    assert formats._bf16_choice(Reference(), path, "fp32")["choice"] == "f32"


@pytest.fixture(scope="module")
def openvino_pipes(exported_dirs):
    return {precision: StableDiffusionPipeline.from_pretrained(exported_dirs("sd1"), backend="openvino",
                                                               inference_precision=precision)
            for precision in ("auto", "f32")}


def test_auto_precision_follows_the_report(openvino_pipes, exported_dirs):
    measured = {name: entry["inference_precision"]["openvino"]["choice"]
                for name, entry in _report(exported_dirs("sd1"))["components"].items()}
    auto = openvino_pipes["auto"].inference_precisions
    assert auto == {name: measured[name] if has_bf16() else "f32" for name in auto}
    assert set(openvino_pipes["f32"].inference_precisions.values()) == {"f32"}
    mixed = StableDiffusionPipeline.from_pretrained(exported_dirs("sd1"), backend="openvino", compile=False,
                                                    inference_precision={"vae_decoder": "f32", "unet": "bf16"})
    assert mixed.inference_precisions["vae_decoder"] == "f32" and mixed.inference_precisions["unet"] == "bf16"


def test_auto_precision_images_stay_close_to_exact(openvino_pipes):
    """bf16 where measured within bound keeps the picture: PSNR against the f32 images. Bound: the tiny models
    measured 47-53 dB with every component in bf16 (README, precision table); 35 dB leaves room for other CPUs."""
    exact = openvino_pipes["f32"](**CALL).images
    auto = openvino_pipes["auto"](**CALL).images
    mse = float(np.mean((exact.astype(np.float64) - auto) ** 2))
    psnr = 10 * np.log10(1.0 / mse) if mse else float("inf")
    assert psnr > 35, psnr
    if not has_bf16() or set(openvino_pipes["auto"].inference_precisions.values()) == {"f32"}:
        assert psnr == float("inf")


@pytest.mark.parametrize("kwargs, message", [
    ({"inference_precision": "bf16"}, "onnxruntime computes fp32 graphs in fp32"),
    ({"inference_precision": "int3"}, "inference_precision must be one of"),
    ({"inference_precision": {"unet2": "f32"}}, "unknown components ['unet2']"),
    ({"static_shapes": True}, "static_shapes: onnxruntime takes every shape as it comes"),
])
def test_precision_and_shape_arguments_are_checked(exported_dirs, kwargs, message):
    with pytest.raises(DiffshipError) as e:
        StableDiffusionPipeline.from_pretrained(exported_dirs("sd1"), **kwargs)
    assert message in str(e.value)


def test_static_shapes_compile_for_repeated_requests(exported_dirs):
    """Loading compiles the graphs as declared (dynamic); a request that repeats gets its own static compile,
    and compile(request) makes one static up front, as a server would. The images are the same either way
    (fp32: 1e-5)."""
    pipe = StableDiffusionPipeline.from_pretrained(exported_dirs("sd1"), backend="openvino",
                                                   inference_precision="f32")
    unet = pipe.unet
    assert unet.static_shapes == "auto" and unet._static is None and unet._dynamic is not None
    first = pipe(**CALL).images
    assert unet._static is None
    again = pipe(**CALL).images
    assert unet._static[0]["sample"] == (2, 4, 8, 8)  # 64x64 with guidance
    np.testing.assert_allclose(first, again, atol=1e-5)
    other = dict(CALL, height=72, width=56)
    pipe(**other)
    assert unet._static[0]["sample"] == (2, 4, 8, 8)
    pipe.compile(1, 72, 56)
    assert unet._static[0]["sample"] == (2, 4, 9, 7) and pipe.vae_decoder._static[0]["latent_sample"] == (1, 4, 9, 7)
    dynamic = StableDiffusionPipeline.from_pretrained(pipe.model_dir, backend="openvino", inference_precision="f32",
                                                      static_shapes=False)
    np.testing.assert_allclose(dynamic(**CALL).images, first, atol=1e-5)
    dynamic(**CALL)
    assert dynamic.unet._static is None


def test_second_load_reads_the_compile_cache(exported_dirs, tmp_path):
    """ONNX Runtime's optimized graph and OpenVINO's compiled blob are cached; the cached graph gives the same
    outputs, a damaged entry is rebuilt, and cache_dir=False writes nothing."""
    from diffship.runtimes.onnxruntime import OnnxRuntimeSession

    folder = exported_dirs("sd1") / UNET
    feeds = {"sample": np.ones((2, 4, 8, 8), np.float32), "timestep": np.array(10.0, np.float32),
             "encoder_hidden_states": np.ones((2, 77, 32), np.float32)}
    first = OnnxRuntimeSession(folder, cache_dir=tmp_path)
    entries = list((tmp_path / "onnxruntime").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.onnx").is_file() and not entries[0].name.count(".tmp-")
    second = OnnxRuntimeSession(folder, cache_dir=tmp_path)
    assert second._session._model_path.startswith(str(entries[0]))
    np.testing.assert_array_equal(first.run(feeds)["out_sample"], second.run(feeds)["out_sample"])
    (entries[0] / "model.onnx").write_bytes(b"not a graph")
    rebuilt = OnnxRuntimeSession(folder, cache_dir=tmp_path)
    assert rebuilt._session._model_path == str(folder / ORT_CPU_MODEL)  # the graph the folder's CPU session runs
    assert OnnxRuntimeSession(folder, cache_dir=tmp_path)._session._model_path.startswith(str(entries[0]))

    OpenVINOSession(folder, cache_dir=tmp_path / "ov").compile()
    assert any((tmp_path / "ov" / "openvino").iterdir())
    OnnxRuntimeSession(folder, cache_dir=False)
    OpenVINOSession(folder, cache_dir=False).compile()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnxruntime", "ov"]


def test_generate_prints_the_precisions(exported_dirs, tmp_path, capsys):
    from diffship.cli import main

    assert main(["generate", str(exported_dirs("sd1")), "--prompt", "a red circle", "--steps", "2",
                 "--backend", "openvino", "--out", str(tmp_path / "a.png"), "--no-progress"]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("inference precision:")]
    assert line and "unet " in line[0]
    assert main(["generate", str(exported_dirs("sd1")), "--prompt", "x", "--inference-precision", "bf16",
                 "--backend", "onnxruntime", "--out", str(tmp_path / "b.png")]) != 0
    assert "--inference-precision bf16 is OpenVINO's" in capsys.readouterr().err


def test_a_cache_that_cannot_be_written_does_not_stop_a_load(exported_dirs, tmp_path, monkeypatch):
    """Writing the optimized graph fails (here its weights file is a folder; in life, a full disk): the session
    loads the export's graph without the cache, and leaves no staging folder behind."""
    import diffship.runtimes.onnxruntime as ort_runtime

    staging = tmp_path / "stage"
    (staging / "model.onnx_data").mkdir(parents=True)
    monkeypatch.setattr(ort_runtime, "_staging", lambda cached: staging)
    session = ort_runtime.OnnxRuntimeSession(exported_dirs("sd1") / UNET, cache_dir=tmp_path / "cache")
    assert session._session._model_path == str(exported_dirs("sd1") / UNET / ORT_CPU_MODEL)
    assert not staging.exists()


def test_a_re_export_replaces_its_cache_entry(exported_dirs, tmp_path):
    """The cache keys on the graph file as it is; once the export is replaced, its older entry is removed."""
    import os
    import shutil

    from diffship.runtimes.onnxruntime import OnnxRuntimeSession

    folder = tmp_path / "unet"
    shutil.copytree(exported_dirs("sd1") / UNET, folder)
    OnnxRuntimeSession(folder, cache_dir=tmp_path / "cache")
    first = sorted((tmp_path / "cache" / "onnxruntime").iterdir())
    for path in folder.iterdir():  # as a re-export would
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    OnnxRuntimeSession(folder, cache_dir=tmp_path / "cache")
    second = sorted((tmp_path / "cache" / "onnxruntime").iterdir())
    assert len(first) == len(second) == 1 and first != second


def test_the_cache_key_follows_the_weights_a_graph_reads(tmp_path):
    """The CPU graph (ORT_CPU_MODEL) reads model.onnx's weight file: new weights there are a new key for both
    graphs; another graph's own data file is not."""
    from diffship.layout import ONNX_DATA, ONNX_MODEL
    from diffship.runtimes.cache import graph_key

    for name in (ONNX_MODEL, ORT_CPU_MODEL, ONNX_DATA, "other.onnx", "other.onnx_data"):
        (tmp_path / name).write_bytes(b"x")
    keys = {name: graph_key(tmp_path / name, "v") for name in (ONNX_MODEL, ORT_CPU_MODEL, "other.onnx")}
    (tmp_path / ONNX_DATA).write_bytes(b"new weights")
    assert graph_key(tmp_path / ONNX_MODEL, "v") != keys[ONNX_MODEL]
    assert graph_key(tmp_path / ORT_CPU_MODEL, "v") != keys[ORT_CPU_MODEL]
    before = graph_key(tmp_path / ORT_CPU_MODEL, "v")
    (tmp_path / "other.onnx_data").write_bytes(b"changed")
    assert graph_key(tmp_path / ORT_CPU_MODEL, "v") == before
    assert graph_key(tmp_path / "other.onnx", "v") != keys["other.onnx"]
