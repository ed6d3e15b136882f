"""NVIDIA paths: TensorRT engines (profiles, the engine cache, the build's inputs) and the errors where CUDA, a GPU,
TensorRT or onnxruntime-gpu is missing, on any machine; and, marked `gpu`, the tiny SD 1.x, SD 2.x and SDXL
pipelines on TensorRT and on ONNX Runtime's CUDA provider against diffusers, which skip only where no CUDA GPU is
present (the skip reason says what was probed).

The CPU tests use real objects: DeviceInfo records for GPUs this machine does not have, small files standing in
for ONNX graphs (the cache hashes bytes, whatever they are), and the build itself replaced by a function that
returns a few bytes, so that what is checked is the cache's decision to build or reuse.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from diffship.cli import main
from diffship.errors import DiffshipError, GPUUnavailableError
from diffship.layout import (
    TENSORRT_ENGINE,
    TENSORRT_ENGINE_INFO,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
)
from diffship.runtimes import engines
from diffship.runtimes.cuda import DeviceInfo
from diffship.runtimes.engines import (
    BuildOptions,
    ComponentContext,
    ShapeRange,
    component_profile,
    engine_for,
    engine_key,
    find_engine,
    key_difference,
    onnx_sha256,
)

A100 = DeviceInfo("NVIDIA A100-SXM4-80GB", (8, 0), "10.8.0.43")
L4 = DeviceInfo("NVIDIA L4", (8, 9), "10.8.0.43")
A100_TRT11 = DeviceInfo("NVIDIA A100-SXM4-80GB", (8, 0), "11.4.0.106")
H100_SAME_CC = DeviceInfo("NVIDIA H100 80GB HBM3", (8, 0), "10.8.0.43")  # a different name alone rebuilds too

SD_UNET = [("sample", (None, 4, None, None)), ("timestep", ()), ("encoder_hidden_states", (None, None, 768))]
SDXL_UNET = [("sample", (None, 4, None, None)), ("timestep", ()), ("encoder_hidden_states", (None, None, 2048)),
             ("text_embeds", (None, 1280)), ("time_ids", (None, 6))]


# ---- profiles ------------------------------------------------------------------------------------------------


def test_sd_unet_dynamic_profile_doubles_the_batch_and_reaches_guidance_off():
    shapes = ShapeRange.dynamic(1, 512, 512)
    assert shapes.batch == (1, 1, 4) and shapes.height == (256, 512, 1024)
    profile = component_profile(ComponentContext(UNET), SD_UNET, shapes)
    assert set(profile) == {"sample", "encoder_hidden_states"}  # the rank-0 timestep has nothing to choose
    # min: one image, guidance off (guidance_scale <= 1); opt and max: classifier-free guidance's doubled batch.
    assert profile["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))
    assert profile["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (8, 77, 768))


def test_static_profiles_are_exactly_the_request():
    guided = component_profile(ComponentContext(UNET), SD_UNET, ShapeRange.static(2, 768, 512))
    assert guided["sample"] == ((4, 4, 96, 64),) * 3
    unguided = component_profile(ComponentContext(UNET), SD_UNET, ShapeRange.static(2, 768, 512, guidance=False))
    assert unguided["sample"] == ((2, 4, 96, 64),) * 3
    assert ShapeRange.static(1, 512, 512).is_static and not ShapeRange.dynamic(1, 512, 512).is_static


def test_lcm_unet_runs_no_guidance_batch():
    lcm = SD_UNET + [("timestep_cond", (None, 256))]
    profile = component_profile(ComponentContext(UNET, guided=False), lcm, ShapeRange.dynamic(2, 512, 512))
    assert profile["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (4, 4, 128, 128))
    assert profile["timestep_cond"] == ((1, 256), (2, 256), (4, 256))


def test_sdxl_unet_added_conditions_take_the_batch_only():
    profile = component_profile(ComponentContext(UNET), SDXL_UNET, ShapeRange.static(1, 1024, 1024))
    assert profile["sample"] == ((2, 4, 128, 128),) * 3
    assert profile["text_embeds"] == ((2, 1280),) * 3
    assert profile["time_ids"] == ((2, 6),) * 3
    assert profile["encoder_hidden_states"] == ((2, 77, 2048),) * 3


def test_vae_and_text_encoder_profiles():
    shapes = ShapeRange.dynamic(1, 512, 768)
    encoder = component_profile(ComponentContext(VAE_ENCODER), [("sample", (None, 3, None, None))], shapes)
    assert encoder["sample"] == ((1, 3, 256, 384), (1, 3, 512, 768), (4, 3, 1024, 1536))
    decoder = component_profile(ComponentContext(VAE_DECODER), [("latent_sample", (None, 4, None, None))], shapes)
    assert decoder["latent_sample"] == ((1, 4, 32, 48), (1, 4, 64, 96), (4, 4, 128, 192))
    for name in (TEXT_ENCODER, TEXT_ENCODER_2):  # prompts, not images; padded to 77 tokens; never doubled
        text = component_profile(ComponentContext(name), [("input_ids", ("batch_size", "sequence_length"))], shapes)
        assert text["input_ids"] == ((1, 77), (1, 77), (4, 77))


def test_latent_ranges_stay_inside_the_image_range():
    # A VAE that scales by 16: a 264-pixel minimum needs latents of at least 17 (rounded up), a 1000 maximum at
    # most 62 (rounded down), so every latent the engine runs comes from an image side the range allows.
    shapes = ShapeRange((1, 1, 1), (264, 512, 1000), (512, 512, 512))
    profile = component_profile(ComponentContext(VAE_DECODER, vae_scale_factor=16),
                                [("latent_sample", (None, 4, None, None))], shapes)
    assert profile["latent_sample"][0][2] == 17 and profile["latent_sample"][2][2] == 62


def test_static_graph_axes_keep_their_size_and_unknown_axes_are_refused():
    static = component_profile(ComponentContext(UNET), [("sample", (2, 4, 64, 64))], ShapeRange.dynamic(1, 512, 512))
    assert static["sample"] == ((2, 4, 64, 64),) * 3
    with pytest.raises(DiffshipError, match="no rule gives a TensorRT profile for axis 2 of input odd"):
        component_profile(ComponentContext(UNET), [("odd", (None, 3, None))], ShapeRange.dynamic(1, 512, 512))


def test_shape_range_checks_and_round_trips():
    with pytest.raises(DiffshipError, match="min <= opt <= max"):
        ShapeRange((2, 1, 4), 512, 512)
    with pytest.raises(DiffshipError, match="multiples of 8"):
        ShapeRange(1, 500, 512)
    shapes = ShapeRange.dynamic(2, 1024, 768, guidance=False, max_batch=8)
    assert shapes.batch == (1, 2, 8) and shapes.width == (384, 768, 1536)
    assert ShapeRange.from_dict(json.loads(json.dumps(shapes.to_dict()))) == shapes
    assert ShapeRange.dynamic(1, 1536, 1536).height == (768, 1536, 2048)  # capped at 2048


def test_component_context_of_an_exported_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"time_cond_proj_dim": 256}))
    (tmp_path / "vae_decoder").mkdir()
    (tmp_path / "vae_decoder" / "config.json").write_text(json.dumps({"block_out_channels": [1, 2, 3, 4, 5]}))
    assert ComponentContext.of_folder(tmp_path / "unet") == ComponentContext("unet", False, 16)
    assert ComponentContext.of_folder(tmp_path / "text_encoder") == ComponentContext("text_encoder", True, 16)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl", "sd1-lcm"])
@pytest.mark.parametrize("static", [False, True])
def test_profiles_of_each_family_export(kind, static, tiny_model_dirs):
    """Every component the family exports gets a profile from its traced inputs and dynamic axes, and the shapes
    the engine is tuned for (validated at export) are what the pipelines feed at that request."""
    from diffusers import DiffusionPipeline as TorchPipeline

    from diffship.exporters.components import ExportShapes
    from diffship.exporters.optimize import ExportOptions
    from diffship.exporters.tensorrt import component_context, settings, shape_range, spec_inputs, validation_shapes
    from diffship.families import family_for

    pipe = TorchPipeline.from_pretrained(tiny_model_dirs(kind))
    family = family_for(type(pipe).__name__, tiny_model_dirs(kind))
    specs = family.specs(pipe, ExportShapes(batch_size=1, height=64, width=64, static=static))
    options = ExportOptions(tensorrt=settings(shape_range(1, 64, 64, static), 8))
    lcm = kind.endswith("lcm")
    for spec in specs:
        profile = component_profile(component_context(spec, 8), spec_inputs(spec), ShapeRange.from_dict(
            options.tensorrt["shapes"]))
        (opt,) = validation_shapes(spec, options)
        if spec.name == UNET:
            assert opt["sample"] == (1 if lcm else 2, 4, 8, 8)
            assert all(shape[0] == opt["sample"][0] for shape in opt.values())
            if kind == "sdxl":
                assert {"text_embeds", "time_ids"} <= set(profile)
        elif spec.name == VAE_DECODER:
            assert opt["latent_sample"] == (1, 4, 8, 8)
        elif spec.name == VAE_ENCODER:
            assert opt["sample"] == (1, 3, 64, 64)
        else:
            assert opt["input_ids"] == (1, 77)
        if static:
            assert all(low == high for low, _, high in profile.values())


# ---- engine cache ------------------------------------------------------------------------------------------------


@pytest.fixture
def component(tmp_path):
    """An export's unet folder: a small file standing in for model.onnx (+ external data), a config, a VAE."""
    model = tmp_path / "export"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "model.onnx").write_bytes(b"graph v1")
    (model / "unet" / "model.onnx_data").write_bytes(b"weights v1")
    (model / "unet" / "config.json").write_text("{}")
    (model / "vae_decoder").mkdir()
    (model / "vae_decoder" / "config.json").write_text(json.dumps({"block_out_channels": [1, 2, 3, 4]}))
    return model / "unet"


@pytest.fixture
def builds(monkeypatch):
    """The TensorRT build replaced by one that records what it was asked and returns a few bytes."""
    calls = []

    def build(onnx_path, context, shapes, options, timing_cache=None):
        calls.append((shapes, options))
        return f"engine {len(calls)}".encode(), {"sample": ((1, 4, 8, 8),) * 3}, 0.5

    monkeypatch.setattr(engines, "build_engine", build)
    return calls


def _key(folder, device=A100, shapes=ShapeRange.dynamic(1, 512, 512), options=BuildOptions()):
    return engine_key(device, onnx_sha256(folder / "model.onnx"), ComponentContext.of_folder(folder), shapes, options)


def test_engine_keys_change_with_everything_an_engine_depends_on(component):
    base = _key(component)
    assert base.digest == _key(component).digest
    changed = {
        "gpu": _key(component, L4),
        "gpu name": _key(component, H100_SAME_CC),
        "tensorrt": _key(component, A100_TRT11),
        "profile": _key(component, shapes=ShapeRange.static(1, 512, 512)),
        "options": _key(component, options=BuildOptions("strongly_typed")),
    }
    (component / "model.onnx_data").write_bytes(b"weights v2")  # a re-export: other weights, same graph file
    changed["onnx"] = _key(component)
    digests = {name: key.digest for name, key in changed.items()}
    assert base.digest not in digests.values() and len(set(digests.values())) == len(digests)
    assert "built for NVIDIA A100-SXM4-80GB (compute capability 8.0), this is NVIDIA L4 (8.9)" in key_difference(
        base, changed["gpu"])
    assert "built with TensorRT 10.8.0.43, this is TensorRT 11.4.0.106" in key_difference(base, changed["tensorrt"])
    assert "the ONNX graph changed" in key_difference(base, changed["onnx"])
    assert "1-4 images of 256-1024x256-1024 with guidance" in key_difference(base, changed["profile"])
    assert "strongly_typed" in key_difference(base, changed["options"])


def test_second_load_builds_nothing_and_another_gpu_or_tensorrt_rebuilds(component, builds, tmp_path, caplog):
    cache = tmp_path / "cache"
    shapes, options = ShapeRange.dynamic(1, 64, 64), BuildOptions()
    context = ComponentContext.of_folder(component)

    first = engine_for(component, component / "model.onnx", A100, context, shapes, options, cache)
    assert first.source == "built" and len(builds) == 1 and first.path.read_bytes() == b"engine 1"
    assert first.path.parent.parent == cache / "tensorrt"  # the export folder stays read-only at run time
    again = engine_for(component, component / "model.onnx", A100, context, shapes, options, cache)
    assert again.source == "cache" and again.path == first.path and len(builds) == 1

    for device in (L4, A100_TRT11):
        other = engine_for(component, component / "model.onnx", device, context, shapes, options, cache)
        assert other.source == "built" and other.path != first.path
    assert len(builds) == 3
    other_profile = engine_for(component, component / "model.onnx", A100, context, ShapeRange.static(1, 64, 64),
                               options, cache)
    assert other_profile.source == "built" and len(builds) == 4

    (component / "model.onnx").write_bytes(b"graph v2")  # re-exported
    rebuilt = engine_for(component, component / "model.onnx", A100, context, shapes, options, cache)
    assert rebuilt.source == "built" and len(builds) == 5
    # The engine of the graph's earlier version is gone (gigabytes at full size); the other GPUs', TensorRT's
    # and profile's are kept: they may be used again.
    assert not first.path.exists() and rebuilt.path.exists() and len(list((cache / "tensorrt").glob("*/model.plan"))) == 4


def test_the_exported_engine_is_used_on_its_gpu_and_rebuilt_with_a_message_elsewhere(component, builds, tmp_path,
                                                                                     caplog):
    shapes, options = ShapeRange.dynamic(1, 64, 64), BuildOptions()
    context = ComponentContext.of_folder(component)
    exported = engine_for(component, component / "model.onnx", A100, context, shapes, options, cache_dir=False,
                          target=component)
    assert exported.path == component / TENSORRT_ENGINE and (component / TENSORRT_ENGINE_INFO).is_file()
    info = json.loads((component / TENSORRT_ENGINE_INFO).read_text())
    assert info["key"]["gpu"] == A100.name and info["profile"]["sample"] == [[1, 4, 8, 8]] * 3

    cache = tmp_path / "cache"
    same = engine_for(component, component / "model.onnx", A100, context, shapes, options, cache)
    assert same.source == "export" and len(builds) == 1
    with caplog.at_level(logging.WARNING, logger="diffship.runtimes.engines"):
        moved = engine_for(component, component / "model.onnx", A100_TRT11, context, shapes, options, cache)
    assert moved.source == "built" and len(builds) == 2
    message = caplog.text
    assert "the exported TensorRT engine does not fit" in message
    assert "built with TensorRT 10.8.0.43, this is TensorRT 11.4.0.106" in message
    assert "cached in" in message
    found, why = find_engine(component, _key(component, A100_TRT11, shapes), cache)
    assert found.source == "cache" and "TensorRT 10.8.0.43" in why


def test_onnx_hash_is_remembered_by_size_and_time(component, tmp_path, monkeypatch):
    memo = tmp_path / "memo"
    first = onnx_sha256(component / "model.onnx", memo)
    assert (memo / engines.HASH_MEMO).is_file()
    real_open = open

    def no_reading(path, *args, **kwargs):
        if str(path).startswith(str(component)):
            raise AssertionError(f"{path} was read again")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_reading)
    assert onnx_sha256(component / "model.onnx", memo) == first
    monkeypatch.undo()
    (component / "model.onnx_data").write_bytes(b"weights v2")
    assert onnx_sha256(component / "model.onnx", memo) != first


def test_build_options():
    assert BuildOptions().precision == "fp32"
    with pytest.raises(DiffshipError, match="precision must be one of"):
        BuildOptions("int3")
    with pytest.raises(DiffshipError, match="optimization level must be 0 to 5"):
        BuildOptions(optimization_level=9)
    BuildOptions("fp16").check_version("10.8.0")
    with pytest.raises(DiffshipError, match="TensorRT 11.4.0 has no fp16 builder flag"):
        BuildOptions("fp16").check_version("11.4.0")
    assert engines.default_precision({"float16"}) == "strongly_typed"
    assert engines.default_precision({"float32"}) == "fp32"


# ---- missing CUDA, GPU, TensorRT, onnxruntime-gpu ------------------------------------------------------------------


@pytest.fixture
def no_tensorrt(monkeypatch):
    """`import tensorrt` fails, as where it is not installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def no_cuda_binding(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)


class _CudaError(int):
    """A cudaError_t as cuda-bindings returns it: an int with a name."""

    def __new__(cls, value, name):
        error = super().__new__(cls, value)
        error.name = name
        return error


def _fake_cudart(error_name: str | None, count: int = 0):
    code = 0 if error_name is None else 100
    return types.SimpleNamespace(cudaGetDeviceCount=lambda: (_CudaError(code, error_name or "cudaSuccess"), count))


def test_missing_tensorrt_is_named_with_the_pip_command(no_tensorrt, component):
    with pytest.raises(GPUUnavailableError, match=r"needs NVIDIA TensorRT, which is not installed: "
                                                  r"pip install 'diffship\[tensorrt\]'"):
        engines.check_tensorrt()
    from diffship.runtimes.tensorrt import TensorRTSession

    with pytest.raises(GPUUnavailableError, match="TensorRT"):
        TensorRTSession(component)


def test_missing_cuda_binding_is_named(no_cuda_binding):
    from diffship.runtimes import cuda

    with pytest.raises(GPUUnavailableError, match=r"CUDA's Python binding \(cuda-bindings\).*diffship\[tensorrt\]"):
        cuda.device_count()


@pytest.mark.parametrize("error,driver,expected", [
    ("cudaErrorNoDevice", True, "no NVIDIA GPU is usable here (cudaErrorNoDevice)"),
    (None, True, "no NVIDIA GPU is usable here (no device)"),
    # CUDA answers cudaErrorInsufficientDriver both without a driver (what cuda-bindings says on this machine) and
    # with one older than the binding's CUDA.
    ("cudaErrorInsufficientDriver", False, "no NVIDIA driver here (libcuda.so.1 is not found)"),
    ("cudaErrorInsufficientDriver", True, "pip install 'cuda-bindings==12.*'"),
])
def test_missing_gpu_or_driver_is_named(monkeypatch, error, driver, expected):
    from diffship.runtimes import cuda

    monkeypatch.setattr(cuda, "cudart", lambda: _fake_cudart(error, 0))
    monkeypatch.setattr(cuda, "has_driver", lambda: driver)
    with pytest.raises(GPUUnavailableError) as raised:
        cuda.device_count()
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def test_runtime_modules_import_without_tensorrt_or_cuda():
    code = ("import sys; import diffship.runtimes.tensorrt, diffship.runtimes.engines, diffship.runtimes.cuda, "
            "diffship.exporters.tensorrt\n"
            "loaded = [m for m in ('tensorrt', 'cuda', 'cupy', 'polygraphy') if m in sys.modules]\n"
            "print(loaded); sys.exit(1 if loaded else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- CLI refusals ------------------------------------------------------------------------------------------------


def test_export_tensorrt_refused_before_loading_without_tensorrt(no_tensorrt, tiny_model_dirs, tmp_path, capsys):
    out, model = tmp_path / "out", str(tiny_model_dirs("sd1"))
    capsys.readouterr()  # what building the tiny model printed
    assert main(["export", model, str(out), "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT, which is not installed" in err and "pip install 'diffship[tensorrt]'" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_export_tensorrt_flags_need_the_format(tiny_model_dirs, tmp_path, capsys):
    model, out = str(tiny_model_dirs("sd1")), str(tmp_path / "out")
    for flags, message in ((["--trt-static"], "--trt-static is for TensorRT engines: add tensorrt to --backend"),
                           (["--trt-precision", "fp16"], "--trt-precision is for TensorRT engines"),
                           (["--trt-max-batch", "8"], "--trt-max-batch is for TensorRT engines")):
        assert main(["export", model, out, *flags]) == 2
        assert message in capsys.readouterr().err


def test_export_formats_registry_adds_the_onnx_tensorrt_builds_from():
    from diffship.exporters.export_pipeline import _formats

    assert _formats(["tensorrt"], "--backend") == ["onnx", "tensorrt"]
    assert _formats("trt,openvino", "--backend") == ["onnx", "openvino", "tensorrt"]


def test_generate_and_bench_refuse_tensorrt_without_it(no_tensorrt, tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x", "--backend", "tensorrt",
                 "--out", str(tmp_path / "i.png")]) == 2
    assert "pip install 'diffship[tensorrt]'" in capsys.readouterr().err
    assert main(["bench", str(tmp_path), "--backend", "trt"]) == 2
    assert "pip install 'diffship[tensorrt]'" in capsys.readouterr().err


def test_generate_and_bench_refuse_gpu_providers_without_onnxruntime_gpu(monkeypatch, tmp_path, capsys):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert main(["generate", str(tmp_path), "--prompt", "x", "--provider", "cuda",
                 "--out", str(tmp_path / "i.png")]) == 2
    err = capsys.readouterr().err
    assert "CUDAExecutionProvider is not available here" in err and "onnxruntime-gpu" in err
    assert "pip uninstall -y onnxruntime && pip install 'diffship[gpu]'" in err
    assert main(["bench", str(tmp_path), "--provider", "tensorrt"]) == 2
    assert "TensorrtExecutionProvider and CUDAExecutionProvider are not available" in capsys.readouterr().err
    assert main(["bench", str(tmp_path), "--backend", "openvino", "--provider", "cuda"]) == 2
    assert "--provider is onnxruntime's" in capsys.readouterr().err


# ---- GPU: the tiny pipelines against diffusers ---------------------------------------------------------------------


def cuda_absent() -> str | None:
    """Why there is no CUDA GPU here (the skip reason), or None when there is one. Probed with CUDA's binding when
    installed, else nvidia-smi: a GPU machine without TensorRT or onnxruntime-gpu runs the tests, which then fail
    naming the pip command, rather than skipping."""
    try:
        from diffship.runtimes.cuda import device_count

        device_count()
        return None
    except GPUUnavailableError as e:
        if "cuda-bindings" not in str(e):
            return f"no CUDA GPU: {e}"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no CUDA GPU: neither CUDA's Python binding nor nvidia-smi finds one"
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True)
    return None if listed.returncode == 0 and "GPU" in listed.stdout else f"no CUDA GPU: nvidia-smi -L says {listed.stdout or listed.stderr!r}"


NO_CUDA = cuda_absent()

# fp32 engines (TF32 off) and ORT CUDA in fp32 are held to the CPU backends' bound: 1e-3 on images in [0, 1].
# fp16 (an fp16 export: UNet and text encoder in fp16, the VAE fp32 as the export keeps it): each component is
# validated within 2e-2 of its largest output (validate.DEFAULT_RTOL); over 4 denoising steps the UNet's relative
# error reaches the latents once per step without growing (the scheduler mixes a small part of each prediction
# in), and the fp32 VAE decodes them: measured end to end on fp16 Stable Diffusion pipelines this stays near 1e-2;
# 4e-2 (10/255) is the bound, with the mean error below 4e-3, which a wrong graph (NaN, a dropped input) exceeds.
FP16_ATOL, FP16_MEAN = 4e-2, 4e-3
_GPU_EXPORTS: dict = {}
_PROMPTS = ["a red circle on the left", "an oil painting"]


def _gpu_cases():
    """name -> (tiny model kind, pipeline class (diffusers' and diffship's name), call arguments): the families and
    tasks the CPU backends run, each on both GPU paths. Sizes: 64x64 (the export's, where dynamic engines are
    tuned) and 40x64 (a latent the UNet's up factor does not divide, inside the engines' range)."""
    from image_tasks import latents, mask_image, rgb_image

    guided = dict(prompt=_PROMPTS, negative_prompt=["blurry", "dark"], num_inference_steps=4, guidance_scale=6.0)
    return {
        "sd1": ("sd1", "StableDiffusionPipeline", {**guided, "height": 64, "width": 64, "latents": latents(2)}),
        "sd1 40x64": ("sd1", "StableDiffusionPipeline",
                      {**guided, "height": 40, "width": 64, "latents": latents(2, 40, 64)}),
        "sd2": ("sd2", "StableDiffusionPipeline", {**guided, "height": 64, "width": 64, "latents": latents(2)}),
        "sdxl": ("sdxl", "StableDiffusionXLPipeline", {**guided, "height": 64, "width": 64, "latents": latents(2)}),
        "sdxl image-to-image": ("sdxl", "StableDiffusionXLImg2ImgPipeline",
                                dict(prompt=_PROMPTS[0], image=rgb_image(64, 64), strength=0.6,
                                     num_inference_steps=5, guidance_scale=5.0)),
        "sd1 inpainting": ("sd1-inpaint", "StableDiffusionInpaintPipeline",
                           dict(prompt=_PROMPTS[1], image=rgb_image(64, 64), mask_image=mask_image(64, 64),
                                height=64, width=64, strength=0.8, num_inference_steps=4, guidance_scale=6.0)),
        "sd1 lcm": ("sd1-lcm", "LatentConsistencyModelPipeline",
                    dict(prompt=_PROMPTS, num_inference_steps=4, guidance_scale=8.5, height=64, width=64,
                         latents=latents(2))),
        "sd-turbo": ("sd-turbo", "StableDiffusionPipeline",
                     dict(prompt=_PROMPTS, num_inference_steps=1, guidance_scale=0.0, latents=latents(2))),
    }


FP16_CASES = ["sd1", "sd2", "sdxl"]


def _gpu_export(tiny_model_dirs, tmp_path_factory, kind: str, dtype: str):
    from diffship.exporters import export

    if (kind, dtype) not in _GPU_EXPORTS:
        out = tmp_path_factory.mktemp("gpu-exports") / f"{kind}-{dtype}"
        _GPU_EXPORTS[kind, dtype] = export(tiny_model_dirs(kind), out, ["onnx", "tensorrt"], dtype=dtype,
                                           progress=False)
    return _GPU_EXPORTS[kind, dtype]


def _diffusers_and_diffship(case, tiny_model_dirs, tmp_path_factory, dtype, backend, **options):
    """(diffusers' images, diffship's images, diffship's pipeline) for one case of _gpu_cases(), on the same
    latents and noise (torch's generator and diffship's replay of its draws)."""
    import diffusers
    import torch

    import diffship.pipelines
    from image_tasks import TorchNoise

    kind, cls, kwargs = _gpu_cases()[case]
    export = _gpu_export(tiny_model_dirs, tmp_path_factory, kind, dtype)
    extra = {"add_watermarker": False} if "XL" in cls else {"safety_checker": None}
    reference = getattr(diffusers, cls).from_pretrained(tiny_model_dirs(kind), **extra)
    reference.set_progress_bar_config(disable=True)
    torch_kwargs = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    expected = reference(generator=torch.Generator().manual_seed(0), output_type="np", **torch_kwargs).images
    pipe = getattr(diffship.pipelines, cls).from_pretrained(export, backend=backend, **options)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(generator=TorchNoise(0), output_type="np", **kwargs).images
    return np.asarray(expected), np.asarray(got), pipe


GPU_PATHS = {"tensorrt": ("tensorrt", {}), "onnxruntime-cuda": ("onnxruntime", {"provider": "cuda"})}


@pytest.mark.parametrize("case,dtype", [(c, "fp32") for c in _gpu_cases()] + [(c, "fp16") for c in FP16_CASES])
@pytest.mark.parametrize("path", list(GPU_PATHS))
@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA is not None, reason=NO_CUDA or "")
def test_gpu_pipelines_match_diffusers(case, dtype, path, tiny_model_dirs, tmp_path_factory):
    backend, options = GPU_PATHS[path]
    expected, got, pipe = _diffusers_and_diffship(case, tiny_model_dirs, tmp_path_factory, dtype, backend, **options)
    diff = np.abs(expected - got)
    print(f"{case} {path} {dtype}: max abs {diff.max():.2e}, mean {diff.mean():.2e}")
    assert got.shape == expected.shape and not np.isnan(got).any()
    if dtype == "fp32":
        assert diff.max() < 1e-3
    else:
        assert diff.max() < FP16_ATOL and diff.mean() < FP16_MEAN
    if path == "tensorrt":
        settings = pipe.unet.settings()
        assert settings["source"] == "export", settings  # the export's engine, built on this GPU: nothing rebuilt


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA is not None, reason=NO_CUDA or "")
def test_gpu_static_engine_with_cuda_graph_and_ort_cuda_graph(tiny_model_dirs, tmp_path_factory, tmp_path):
    """A static engine replayed as a CUDA graph gives what the dynamic engine gives; ORT's CUDA graph likewise."""
    from diffship.runtimes.onnxruntime import OnnxRuntimeSession
    from diffship.runtimes.tensorrt import TensorRTSession

    export = _gpu_export(tiny_model_dirs, tmp_path_factory, "sd1", "fp32")
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
             "timestep": np.asarray(500.0, dtype=np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    cpu = OnnxRuntimeSession(export / UNET, cache_dir=False).run(feeds)["out_sample"]
    graph = TensorRTSession(export / UNET, shapes=ShapeRange.static(1, 64, 64), cuda_graph=True, cache_dir=tmp_path)
    for _ in range(3):  # captured at the second call, replayed after
        assert np.abs(graph.run(feeds)["out_sample"] - cpu).max() < 1e-3
    ort_graph = OnnxRuntimeSession(export / UNET, provider="cuda", cuda_graph=True, cache_dir=False)
    for _ in range(3):
        assert np.abs(ort_graph.run(feeds)["out_sample"] - cpu).max() < 1e-3
    with pytest.raises(DiffshipError, match="was not built for sample"):
        graph.run({**feeds, "sample": feeds["sample"][:1], "encoder_hidden_states": feeds["encoder_hidden_states"][:1]})


# ---- the build's use of TensorRT's API, on a stand-in -------------------------------------------------------------


class _Recorder:
    """A stand-in for the parts of the tensorrt module the build calls, recording what it was told: what the
    build asks of TensorRT (flags, profile shapes, timing cache) is checked here; what TensorRT then does only a GPU
    shows (the `gpu` tests)."""

    def __init__(self, version: str, inputs, parses: bool = True, builds: bool = True):
        self.__version__ = version
        self.calls: dict = {"flags": set(), "cleared": set(), "shapes": {}}
        recorder = self

        class ILogger:
            Severity = types.SimpleNamespace(ERROR=1, WARNING=2)

            def __init__(self):
                pass

        class Flag:
            def __init__(self, name):
                self.name = name

            def __int__(self):
                return {"STRONGLY_TYPED": 5}.get(self.name, 0)

        class Network:
            num_inputs = len(inputs)

            def __init__(self, flags):
                recorder.calls["network_flags"] = flags

            def get_input(self, i):
                return types.SimpleNamespace(name=inputs[i][0], shape=inputs[i][1])

        class Parser:
            num_errors = 0 if parses else 1

            def __init__(self, network, log):
                pass

            def parse_from_file(self, path):
                recorder.calls["parsed"] = path
                return parses

            def get_error(self, i):
                return "unsupported op FancyAttention"

        class TimingCache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return self.data + b"+timed"

        class Profile:
            def set_shape(self, name, low, opt, high):
                recorder.calls["shapes"][name] = (tuple(low), tuple(opt), tuple(high))

        class Config:
            builder_optimization_level = None

            def set_flag(self, flag):
                recorder.calls["flags"].add(flag.name)

            def clear_flag(self, flag):
                recorder.calls["cleared"].add(flag.name)

            def add_optimization_profile(self, profile):
                recorder.calls["level"] = self.builder_optimization_level

            def create_timing_cache(self, data):
                recorder.calls["timing_read"] = data
                self._cache = TimingCache(data)
                return self._cache

            def set_timing_cache(self, cache, ignore_mismatch):
                pass

            def get_timing_cache(self):
                return self._cache

        class Builder:
            def __init__(self, log):
                pass

            def create_network(self, flags):
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"plan" if builds else None

        self.ILogger = ILogger
        self.Builder = Builder
        self.OnnxParser = Parser
        self.BuilderFlag = types.SimpleNamespace(TF32=Flag("TF32"), FP16=Flag("FP16"), BF16=Flag("BF16"))
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=Flag("STRONGLY_TYPED"))


def _build_with(monkeypatch, tmp_path, version="10.8.0", precision="fp32", **kwargs):
    fake = _Recorder(version, [("sample", (-1, 4, -1, -1)), ("timestep", ()),
                               ("encoder_hidden_states", (-1, -1, 768))], **kwargs)
    monkeypatch.setattr(engines, "tensorrt", lambda: fake)
    plan, profile, _ = engines.build_engine(tmp_path / "model.onnx", ComponentContext(UNET),
                                            ShapeRange.static(1, 512, 512), BuildOptions(precision, 4),
                                            tmp_path / "timing.cache")
    return fake.calls, plan, profile


def test_build_sets_the_profile_precision_and_timing_cache(monkeypatch, tmp_path):
    calls, plan, profile = _build_with(monkeypatch, tmp_path)
    assert plan == b"plan" and calls["parsed"] == str(tmp_path / "model.onnx")
    assert calls["shapes"] == {"sample": ((2, 4, 64, 64),) * 3, "encoder_hidden_states": ((2, 77, 768),) * 3}
    assert profile == calls["shapes"] and calls["level"] == 4
    assert calls["cleared"] == {"TF32"} and not calls["flags"] and calls["network_flags"] == 0  # fp32: as PyTorch
    assert calls["timing_read"] == b"" and (tmp_path / "timing.cache").read_bytes() == b"+timed"
    calls, _, _ = _build_with(monkeypatch, tmp_path)  # the second build starts from the first's timings
    assert calls["timing_read"] == b"+timed"


def test_build_precisions_on_tensorrt_10_and_11(monkeypatch, tmp_path):
    assert _build_with(monkeypatch, tmp_path, precision="fp16")[0]["flags"] == {"FP16"}
    assert _build_with(monkeypatch, tmp_path, precision="tf32")[0]["cleared"] == set()
    assert _build_with(monkeypatch, tmp_path, precision="strongly_typed")[0]["network_flags"] == 1 << 5
    # TensorRT 11: always strongly typed (the flag is deprecated there), and no fp16 builder flag.
    assert _build_with(monkeypatch, tmp_path, "11.4.0", precision="strongly_typed")[0]["network_flags"] == 0
    with pytest.raises(DiffshipError, match="TensorRT 11.4.0 has no fp16 builder flag"):
        _build_with(monkeypatch, tmp_path, "11.4.0", precision="fp16")


def test_build_failures_are_named(monkeypatch, tmp_path):
    with pytest.raises(DiffshipError, match="TensorRT could not parse .*model.onnx: unsupported op FancyAttention"):
        _build_with(monkeypatch, tmp_path, parses=False)
    with pytest.raises(DiffshipError, match="TensorRT could not build an engine from .* for 1 images of 512x512"):
        _build_with(monkeypatch, tmp_path, builds=False)


def test_session_request_follows_the_export(component, tmp_path):
    """What a TensorRT session asks for when not told: the export's engine's request (so that its engine serves),
    else a dynamic range around the model's native size, strongly typed for an fp16 export."""
    from diffship.runtimes.tensorrt import TensorRTSession

    (component.parent / "unet" / "config.json").write_text(json.dumps({"sample_size": 96}))
    shapes, options = TensorRTSession._request(component, None, None, None)
    assert shapes == ShapeRange.dynamic(1, 768, 768) and options == BuildOptions("fp32", 3)
    (component.parent / "export_report.json").write_text(json.dumps(
        {"components": {"unet": {"precision": {"onnxruntime": "fp16"}}}}))
    assert TensorRTSession._request(component, None, None, None)[1].precision == "strongly_typed"

    exported = ShapeRange.static(2, 512, 768)
    key = engine_key(A100, "0" * 64, ComponentContext.of_folder(component), exported, BuildOptions("tf32", 5))
    engines.write_engine(component, b"plan", key, {}, 1.0)
    assert TensorRTSession._request(component, None, None, None) == (exported, BuildOptions("tf32", 5))
    asked = ShapeRange.dynamic(1, 512, 512)
    assert TensorRTSession._request(component, asked.to_dict(), "fp32", 2) == (asked, BuildOptions("fp32", 2))


# ---- the session's run, on a simulated GPU ------------------------------------------------------------------------


class _SimulatedCuda:
    """cuda-bindings' runtime calls the session makes, on host memory: device pointers are ctypes buffers, copies
    are memmoves, a stream runs its work at once except while capturing, when the work is recorded for the graph to
    replay (what a CUDA graph does)."""

    OK = _CudaError(0, "cudaSuccess")
    cudaStreamNonBlocking = 1
    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)

    def __init__(self):
        import ctypes

        self.ctypes = ctypes
        self.memory: dict[int, object] = {}
        self.capturing: list | None = None
        self.launches = 0

    def cudaGetDeviceCount(self):
        return self.OK, 1

    def cudaGetDeviceProperties(self, device):
        return self.OK, types.SimpleNamespace(name=b"Simulated GPU", major=9, minor=0)

    def cudaSetDevice(self, device):
        return (self.OK,)

    def cudaMalloc(self, size):
        buffer = self.ctypes.create_string_buffer(size)
        self.memory[self.ctypes.addressof(buffer)] = buffer
        return self.OK, self.ctypes.addressof(buffer)

    def cudaFree(self, ptr):
        self.memory.pop(ptr, None)
        return (self.OK,)

    def cudaStreamCreateWithFlags(self, flags):
        return self.OK, 7

    def cudaStreamDestroy(self, stream):
        return (self.OK,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        self.ctypes.memmove(dst, src, count)
        return (self.OK,)

    def cudaStreamSynchronize(self, stream):
        return (self.OK,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing = []
        return (self.OK,)

    def cudaStreamEndCapture(self, stream):
        graph, self.capturing = self.capturing, None
        return self.OK, graph

    def cudaGraphInstantiate(self, graph, flags):
        return self.OK, graph

    def cudaGraphLaunch(self, graph, stream):
        self.launches += 1
        for work in graph:
            work()
        return (self.OK,)

    def cudaGraphExecDestroy(self, graph):
        return (self.OK,)

    def cudaGraphDestroy(self, graph):
        return (self.OK,)


def _simulated_tensorrt(cuda, profile_max: int):
    """An engine that computes y = relu(x) + bias for x [batch, 3] (batch 1 to profile_max) and a rank-0 bias."""
    import ctypes

    DataType = types.SimpleNamespace(FLOAT="float32")

    class Engine:
        num_io_tensors = 3
        names = ["x", "bias", "y"]

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return "in" if name != "y" else "out"

        def get_tensor_dtype(self, name):
            return DataType.FLOAT

        def get_tensor_shape(self, name):
            return () if name == "bias" else (-1, 3)

        def get_tensor_profile_shape(self, name, profile):
            return [(1, 3), (1, 3), (profile_max, 3)]

        def create_execution_context(self):
            return Context()

    class Context:
        def __init__(self):
            self.shapes, self.addresses = {}, {}
            self.runs = 0

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)

        def get_tensor_shape(self, name):
            return self.shapes["x"] if name == "y" else self.shapes[name]

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def execute_async_v3(self, stream):
            shape, addresses = self.shapes["x"], dict(self.addresses)

            def work():
                n = int(np.prod(shape))
                x = np.ctypeslib.as_array((ctypes.c_float * n).from_address(addresses["x"]))
                bias = ctypes.c_float.from_address(addresses["bias"]).value
                y = np.ctypeslib.as_array((ctypes.c_float * n).from_address(addresses["y"]))
                y[:] = np.maximum(x, 0) + bias
                self.runs += 1

            if cuda.capturing is not None:
                cuda.capturing.append(work)
            else:
                work()
            return True

    class Runtime:
        def __init__(self, log):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine()

    class Logger:
        ERROR = 1

        def __init__(self, level):
            pass

    return types.SimpleNamespace(__version__="10.8.0", Logger=Logger, Runtime=Runtime,
                                 TensorIOMode=types.SimpleNamespace(INPUT="in"),
                                 nptype=lambda dtype: np.float32)


@pytest.fixture
def simulated_session(monkeypatch, component):
    from diffship.runtimes import cuda as cuda_module
    from diffship.runtimes import tensorrt as trt_module

    cuda = _SimulatedCuda()
    monkeypatch.setattr(cuda_module, "cudart", lambda: cuda)
    fake = _simulated_tensorrt(cuda, profile_max=4)
    monkeypatch.setattr(engines, "tensorrt", lambda: fake)
    monkeypatch.setattr(trt_module, "tensorrt", lambda: fake)
    (component / "model.plan").write_bytes(b"plan")

    def make(**options):
        return trt_module.TensorRTSession(component, engine=component / "model.plan", **options), cuda

    return make


def test_session_runs_numpy_in_and_out_with_buffers_kept_and_grown(simulated_session):
    session, cuda = simulated_session()
    assert [i.name for i in session.inputs] == ["x", "bias"] and session.outputs[0].shape == (None, 3)
    assert session.profile == {"x": ((1, 3), (1, 3), (4, 3))}  # the rank-0 bias has no range
    x = np.array([[-1.0, 0.5, 2.0]])  # float64: fed as the engine's float32
    out = session.run({"x": x, "bias": np.float64(1.0)})["y"]
    assert out.dtype == np.float32 and out.tolist() == [[1.0, 1.5, 3.0]]
    first = dict((name, buffer.ptr) for name, buffer in session._buffers.items())
    session.run({"x": x[:, ::-1], "bias": np.float32(0.0)})  # a non-contiguous view is copied first
    assert {name: buffer.ptr for name, buffer in session._buffers.items()} == first  # same shapes, same buffers
    big = np.arange(12, dtype=np.float32).reshape(4, 3) - 5
    assert np.array_equal(session.run({"x": big, "bias": np.float32(0)})["y"], np.maximum(big, 0))
    assert session._buffers["x"].nbytes == 48 and len(cuda.memory) == 3  # grown, the smaller ones freed
    assert session.covers({"x": (2, 3)}) and not session.covers({"x": (5, 3)})


def test_session_names_shapes_outside_the_profile_before_running(simulated_session):
    session, _ = simulated_session()
    with pytest.raises(DiffshipError, match=r"was not built for x \[5, 3\] \(engine: \[1, 3\] to \[4, 3\]\)"):
        session.run({"x": np.zeros((5, 3), np.float32), "bias": np.float32(0)})
    with pytest.raises(DiffshipError, match="missing \\['bias'\\]"):
        session.run({"x": np.zeros((1, 3), np.float32)})


def test_session_cuda_graph_replays_static_engines(monkeypatch, simulated_session, component):
    from diffship.runtimes import tensorrt as trt_module

    session, cuda = simulated_session(cuda_graph=True)
    assert not session._static  # a dynamic profile: run launch by launch
    session.run({"x": np.ones((1, 3), np.float32), "bias": np.float32(0)})
    assert cuda.launches == 0

    static = _simulated_tensorrt(cuda, profile_max=1)
    monkeypatch.setattr(trt_module, "tensorrt", lambda: static)
    session, cuda = trt_module.TensorRTSession(component, engine=component / "model.plan", cuda_graph=True), cuda
    outputs = [session.run({"x": np.full((1, 3), v, np.float32), "bias": np.float32(1)})["y"] for v in (-1, 2, 3)]
    assert [o.tolist() for o in outputs] == [[[1.0] * 3], [[3.0] * 3], [[4.0] * 3]]
    assert cuda.launches == 3  # captured once (after a plain first run), replayed at every call
    assert session._context.runs == 4


def test_bench_runs_tensorrt_where_the_export_built_engines(monkeypatch, tmp_path):
    import diffship.benchmarking as benchmarking

    monkeypatch.setattr(benchmarking, "installed_backends", lambda: ["onnxruntime", "tensorrt"])
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "model.onnx").write_bytes(b"graph")
    assert benchmarking.runnable_backends(tmp_path) == ["onnxruntime"]  # would build engines first: not by default
    (tmp_path / "unet" / TENSORRT_ENGINE).write_bytes(b"plan")
    assert benchmarking.runnable_backends(tmp_path) == ["onnxruntime", "tensorrt"]
    static = benchmarking.tensorrt_options(1, 512, 512, True, static=True)
    assert static == {"shapes": ShapeRange.static(1, 512, 512).to_dict(), "cuda_graph": True}
    assert ShapeRange.from_dict(benchmarking.tensorrt_options(2, 512, 768, False, static=False)["shapes"]) == \
        ShapeRange.dynamic(2, 512, 768, guidance=False)


def test_export_tensorrt_settings(monkeypatch):
    from diffship.exporters import export_pipeline
    from diffship.exporters.tensorrt import build_options, validation_precision

    assert build_options({}, "fp16") == BuildOptions("strongly_typed")  # an fp16 export: the graph's types
    assert build_options({}, "fp32") == BuildOptions("fp32")
    assert build_options({"precision": "tf32", "optimization_level": 5}, "fp32") == BuildOptions("tf32", 5)
    # How each engine's error is judged: fp32 engines by the fp32 bound, TF32's 10-bit products by fp16's.
    assert validation_precision(BuildOptions("fp32"), "fp32") == "fp32"
    assert validation_precision(BuildOptions("tf32"), "fp32") == "fp16"
    assert validation_precision(BuildOptions("strongly_typed"), "fp16") == "fp16"
    assert validation_precision(BuildOptions("bf16"), "fp32") == "bf16"

    monkeypatch.setattr(engines, "check_tensorrt", lambda: A100_TRT11)
    assert export_pipeline.check_tensorrt_export(["onnx", "tensorrt"], True, None, 8) == A100_TRT11
    with pytest.raises(DiffshipError, match="TensorRT 11.4.0.106 has no bf16 builder flag"):
        export_pipeline.check_tensorrt_export(["onnx", "tensorrt"], False, "bf16", None)
    with pytest.raises(ValueError, match="tensorrt_precision must be one of"):
        export_pipeline.check_tensorrt_export(["onnx", "tensorrt"], False, "int8", None)
    assert export_pipeline.check_tensorrt_export(["onnx"], False, None, None) is None


def test_tensorrt_export_refuses_onnxruntime_only_graph_passes():
    from diffship.exporters.optimize import ExportOptions

    for options in (ExportOptions(optimize=True, target="cuda"), ExportOptions(weight_format="int8")):
        with pytest.raises(DiffshipError, match="ops TensorRT's parser does not read"):
            options.check(["onnx", "tensorrt"])
    ExportOptions(dtype="fp16").check(["onnx", "tensorrt"])


def test_serving_threads_bind_no_tensorrt_option(tmp_path):
    from diffship.serving.model import ServedModel

    assert ServedModel.thread_options(tmp_path, "tensorrt", 2) == {}
    assert ServedModel.thread_options(tmp_path, "onnxruntime", 2) == {"intra_op_num_threads": 2}


def test_inspect_names_the_engine_built_beside_the_graph():
    from diffship.graphs.inspect import format_inspection

    graph = {"path": "/x/unet/model.onnx", "format": "onnx", "size_bytes": 10, "parameters": 1, "nodes": 1,
             "opset": 17, "weight_dtypes": {"float32": 1}, "inputs": [], "outputs": [], "ops": {"Conv": 1}}
    validation = {"precision": "fp32", "max_abs": 2e-6, "max_rel": 1e-6, "atol": 1e-3}
    report = {"components": {"unet": {"validation": {"onnxruntime": validation, "tensorrt": validation},
                                      "passes": [], "tensorrt": {"engine": TENSORRT_ENGINE, "device": A100.describe(),
                                                                 "precision": "fp32"}}}}
    text = format_inspection({"graphs": [graph], "report": report})
    assert "  validation (fp32): max abs 2.00e-06, max rel 1.00e-06 (atol 0.001)" in text
    assert (f"  tensorrt engine model.plan for {A100.describe()}, fp32: validation (fp32): max abs 2.00e-06"
            in text)


def test_hub_downloads_engines_for_the_tensorrt_backend_only():
    from diffship.hub import _needed

    folders = {"unet": {"model.onnx"}}
    for name in (TENSORRT_ENGINE, TENSORRT_ENGINE_INFO):
        assert _needed(f"unet/{name}", folders, "tensorrt")
        assert not _needed(f"unet/{name}", folders, "onnxruntime") and not _needed(f"unet/{name}", folders, "openvino")
    assert _needed("unet/model.onnx", folders, "tensorrt") and _needed("unet/config.json", folders, "tensorrt")
