"""LoRA and textual inversion at run time on a `swappable_lora` export (pipelines/lora.py,
pipelines/textual_inversion.py), against diffusers in the same adapter state.

Each tiny pipeline (SD 1.x and SDXL) is exported once with `swappable_lora=True`, to both formats, and goes through
the states a user's script goes through: a LoRA loaded (diffusers/PEFT format with convolution layers), a second
one loaded (kohya format) and both set at different weights, a switch to the second alone at another weight, and
both fused at a `lora_scale` and unloaded (the fused weights stay, as in diffusers). diffusers runs the same calls
on the same files; each state's images are compared. Then `unfuse_lora` and `unload_lora_weights` take the
pipeline back to the base export's weights, and its images must be those of the base export bit for bit.

Tolerance: 1e-3 max abs on output_type="np" images in [0, 1] (image_tasks.ATOL, as every parity test): the
adapters are merged into the weights here and applied beside them in diffusers, which changes float rounding only
(about 1e-6); an adapter missed, at the wrong weight, or a state not followed moves the images by 1e-2 or more
(asserted: each state differs from the base by more).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from diffship.errors import DiffshipError
from diffship.exporters import export
from diffship.layout import LORA_WEIGHTS
from diffship.pipelines import AutoPipelineForText2Image
from diffship.testing.tiny_adapters import save_tiny_embedding, save_tiny_lora
from image_tasks import (
    ATOL,
    BACKENDS,
    TorchNoise,
    latents,
    load_embedding_in_diffusers,
    max_abs,
    one_torch_thread,
    report,
)

PROMPTS = ["a red circle on the left", "an oil painting of a castle at sunset"]
# SDXL's export is ONNX only: OpenVINO then runs model.onnx, and its constants are swapped by the ONNX
# initializers' names (the path an ONNX-only export takes on OpenVINO); SD 1.x's checks the OpenVINO IR's.
FORMATS = {"sd1": ["onnx", "openvino"], "sdxl": ["onnx"]}
STEPS = 3
# (label, calls made on both pipelines): each state is reached from the previous one.
STATES = [
    ("load-locon", [("load_lora_weights", ("locon",), {"adapter_name": "locon"})]),
    ("load-kohya-and-set-both", [("load_lora_weights", ("kohya",), {"adapter_name": "kohya"}),
                                 ("set_adapters", (["locon", "kohya"],), {"adapter_weights": [0.8, 0.5]})]),
    ("switch-to-kohya", [("set_adapters", ("kohya",), {"adapter_weights": 1.5})]),
    ("fuse-and-unload", [("set_adapters", (["locon", "kohya"],), {"adapter_weights": [0.8, 0.5]}),
                         ("fuse_lora", (), {"lora_scale": 0.7}), ("unload_lora_weights", (), {})]),
]


@pytest.fixture(scope="module")
def lora_files(tiny_model_dirs, tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("runtime-lora"), {}

    def get(kind):
        if kind not in cache:
            model = tiny_model_dirs(kind)
            cache[kind] = {"locon": save_tiny_lora(model, root / kind / "locon.safetensors", convolutions=True, seed=3),
                           "kohya": save_tiny_lora(model, root / kind / "kohya.safetensors", kohya=True, seed=4)}
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def swappable_exports(tiny_model_dirs, tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("swappable"), {}

    def get(kind):
        if kind not in cache:
            cache[kind] = export(tiny_model_dirs(kind), root / kind, FORMATS[kind], progress=False,
                                 swappable_lora=True)
        return cache[kind]

    return get


def _call(pipe, calls, files):
    for method, args, kwargs in calls:
        args = tuple(str(files[a]) if method == "load_lora_weights" else a for a in args)
        getattr(pipe, method)(*args, **kwargs)


@pytest.fixture(scope="module")
def references(tiny_model_dirs, lora_files):
    """kind -> {state: diffusers' images in that state}, "base" included."""
    import diffusers
    import torch

    cache = {}

    def get(kind):
        if kind not in cache:
            pipe = diffusers.AutoPipelineForText2Image.from_pretrained(tiny_model_dirs(kind))
            pipe.set_progress_bar_config(disable=True)

            def images():
                with one_torch_thread():
                    return pipe(PROMPTS, num_inference_steps=STEPS, latents=torch.from_numpy(latents()),
                                generator=torch.Generator().manual_seed(0), output_type="np").images

            cache[kind] = {"base": images()}
            for label, calls in STATES:
                _call(pipe, calls, lora_files(kind))
                cache[kind][label] = images()
        return cache[kind]

    return get


def _pipeline(folder, backend):
    pipe = AutoPipelineForText2Image.from_pretrained(folder, backend=backend, inference_precision="f32")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe):
    return pipe(PROMPTS, num_inference_steps=STEPS, latents=latents(), generator=TorchNoise(0),
                output_type="np").images


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_runtime_lora_follows_diffusers_state_by_state(kind, backend, swappable_exports, references, lora_files):
    expected = references(kind)
    pipe = _pipeline(swappable_exports(kind), backend)
    assert max_abs(expected["base"], _images(pipe)) < ATOL
    # A request that repeats runs compiled for its shapes on OpenVINO (float rounding of another kernel): the base
    # images to compare with are those of a repeat, as every later call here is.
    base = _images(pipe)
    for label, calls in STATES:
        _call(pipe, calls, lora_files(kind))
        got = _images(pipe)
        diff = max_abs(expected[label], got)
        report(f"runtime-lora-{kind}-{backend}-{label}", diff)
        assert diff < ATOL, f"{kind} on {backend}, {label}: max abs {diff:.2e} >= {ATOL}"
        assert max_abs(base, got) > 10 * ATOL, f"{label}: the adapters did not change the images"
    # Back to the base: the fused adapters out, nothing loaded: the export's own weights, bit for bit.
    pipe.unfuse_lora()
    assert pipe.get_list_adapters() == {}
    assert np.array_equal(_images(pipe), base)


def test_disable_enable_and_delete(swappable_exports, lora_files):
    pipe = _pipeline(swappable_exports("sd1"), "onnxruntime")
    base = _images(pipe)
    pipe.load_lora_weights(str(lora_files("sd1")["locon"]))
    assert pipe.get_active_adapters() == ["default_0"]
    adapted = _images(pipe)
    pipe.disable_lora()
    assert pipe.get_active_adapters() == [] and np.array_equal(_images(pipe), base)
    pipe.enable_lora()
    assert np.array_equal(_images(pipe), adapted)
    pipe.delete_adapters("default_0")
    assert pipe.get_list_adapters() == {} and np.array_equal(_images(pipe), base)


def test_the_map_covers_every_lora_layer_in_both_formats(swappable_exports):
    for component in ("unet", "text_encoder"):
        weight_map = json.loads((swappable_exports("sd1") / component / LORA_WEIGHTS).read_text())
        kinds = {entry["kind"] for entry in weight_map["layers"].values()}
        assert kinds == ({"linear", "conv"} if component == "unet" else {"linear", "embedding"})
        assert all("onnx" in entry and "openvino" in entry for entry in weight_map["layers"].values())
    report_ = json.loads((swappable_exports("sd1") / "export_report.json").read_text())
    assert report_["components"]["unet"]["lora_weights"]["layers"] > 0



def test_the_cpu_graph_reads_the_swappable_weights_where_they_lie(swappable_exports):
    """onnxruntime on the CPU runs the unet's CPU graph (layout.ORT_CPU_MODEL; the state-by-state test above runs
    LoRA swaps on it): it holds no weight of its own, every initializer points at model.onnx's weight file, which
    is what a swap replaces by name."""
    import onnx

    from diffship.layout import ONNX_DATA, ONNX_MODEL, ORT_CPU_MODEL
    from diffship.runtimes.onnxruntime import OnnxRuntimeSession

    folder = swappable_exports("sd1") / "unet"
    assert OnnxRuntimeSession(folder, cache_dir=False).path.endswith(ORT_CPU_MODEL)
    cpu = onnx.load(str(folder / ORT_CPU_MODEL), load_external_data=False)
    portable = onnx.load(str(folder / ONNX_MODEL), load_external_data=False)
    external = {t.name: {e.key: e.value for e in t.external_data} for t in cpu.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}
    assert external and all(entry["location"] == ONNX_DATA for entry in external.values())
    assert external == {t.name: {e.key: e.value for e in t.external_data} for t in portable.graph.initializer
                        if t.name in external}
    assert (folder / ORT_CPU_MODEL).stat().st_size < 2 * (folder / ONNX_MODEL).stat().st_size


def test_bad_runtime_loras_are_refused(swappable_exports, lora_files, exported_dirs, tmp_path):
    pipe = _pipeline(swappable_exports("sd1"), "onnxruntime")
    with pytest.raises(DiffshipError, match="does not exist"):
        pipe.load_lora_weights(str(tmp_path / "missing.safetensors"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(DiffshipError, match="corrupt.safetensors is not a readable safetensors file"):
        pipe.load_lora_weights(str(corrupt))
    # SDXL's LoRA on SD 1.x: layers this UNet lacks, or of other widths.
    with pytest.raises(DiffshipError, match="kohya.safetensors.*(not in this pipeline|do not fit|does not have)"):
        pipe.load_lora_weights(str(lora_files("sdxl")["kohya"]))
    assert pipe.get_list_adapters() == {}
    # An export made without swappable_lora says how to get one.
    plain = _pipeline(exported_dirs("sd1"), "onnxruntime")
    with pytest.raises(DiffshipError, match="--swappable-lora"):
        plain.load_lora_weights(str(lora_files("sd1")["locon"]))
    with pytest.raises(ValueError, match="not in the list of present adapters"):
        pipe.set_adapters("nothing-loaded")


def test_generate_cli_applies_adapters_at_run_time(swappable_exports, lora_files, embedding_files, tmp_path,
                                                   capsys):
    """`diffship generate --lora FILE:SCALE --textual-inversion FILE` draws what the Python calls draw."""
    from PIL import Image

    from diffship.cli import main

    folder, lora, embedding = swappable_exports("sd1"), lora_files("sd1")["locon"], embedding_files("sd1")["<rt-cat>"]
    prompt = "a <rt-cat> on the left"
    code = main(["generate", str(folder), "--prompt", prompt, "--steps", "2", "--seed", "0", "--backend",
                 "onnxruntime", "--lora", f"{lora}:0.6", "--textual-inversion", str(embedding), "--no-progress",
                 "--out", str(tmp_path / "cli.png")])
    assert code == 0, capsys.readouterr().err
    pipe = _pipeline(folder, "onnxruntime")
    pipe.load_lora_weights(str(lora), adapter_name="style")
    pipe.set_adapters(["style"], [0.6])
    pipe.load_textual_inversion(str(embedding))
    expected = pipe(prompt, num_inference_steps=2, generator=0).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cli.png")), np.asarray(expected))
    # Bad flags: one line naming the flag and the file, before anything loads.
    (tmp_path / "old.pt").write_bytes(b"never unpickled")
    for flags, message in [(["--lora", str(tmp_path / "missing.safetensors")], "no such file"),
                           (["--lora", f"{lora}:inf"], "SCALE"),
                           (["--textual-inversion", str(tmp_path / "cli.png")], "not a safetensors file"),
                           (["--lora", str(tmp_path / "old.pt")], "bake it in at export")]:
        code = main(["generate", str(folder), "--prompt", "x", "--out", str(tmp_path / "bad.png"), *flags])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and flags[0] in line and message in line, line
        assert not (tmp_path / "bad.png").exists()


def test_runtime_adapters_without_torch(swappable_exports, lora_files, embedding_files, torch_blocked_env):
    """Run-time LoRA and textual inversion are runtime code: they work where torch cannot be imported."""
    code = ("import sys; from diffship.pipelines import AutoPipelineForText2Image\n"
            "pipe = AutoPipelineForText2Image.from_pretrained(sys.argv[1], backend='openvino')\n"
            "pipe.load_lora_weights(sys.argv[2]); pipe.load_textual_inversion(sys.argv[3])\n"
            "pipe('a <rt-cat>', num_inference_steps=2, output_type='np'); print(pipe.get_active_adapters())")
    result = subprocess.run([sys.executable, "-c", code, str(swappable_exports("sd1")),
                             str(lora_files("sd1")["kohya"]), str(embedding_files("sd1")["<rt-cat>"])],
                            env=torch_blocked_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("['default_0']")


def test_swappable_lora_refuses_weight_changing_options(tiny_model_dirs, tmp_path):
    with pytest.raises(DiffshipError, match="swappable_lora"):
        export(tiny_model_dirs("sd1"), tmp_path / "out", "onnx", swappable_lora=True, optimize=True, progress=False)
    assert not (tmp_path / "out").exists()


# Textual inversion at run time: kind -> {token: (format, vectors)}; the A1111 safetensors' token is its file name.
EMBEDDINGS = {"sd1": {"<rt-cat>": ("diffusers", 3), "rt-style": ("a1111-safetensors", 1)},
              "sdxl": {"<rt-xl>": ("sdxl", 2)}}
TI_PROMPTS = {"sd1": ["a red circle on the left, <rt-cat>", "an oil painting of a castle in rt-style"],
              "sdxl": ["a red circle <rt-xl> on the left", "an oil painting of a castle at sunset"]}


@pytest.fixture(scope="module")
def embedding_files(tiny_model_dirs, tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("runtime-embeddings"), {}

    def get(kind):
        if kind not in cache:
            cache[kind] = {token: save_tiny_embedding(tiny_model_dirs(kind), root / kind / f"{token.strip('<>')}"
                                                      ".safetensors", token, vectors=vectors, fmt=fmt, seed=20 + i)
                           for i, (token, (fmt, vectors)) in enumerate(EMBEDDINGS[kind].items())}
        return cache[kind]

    return get


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_runtime_textual_inversion_matches_diffusers(kind, backend, swappable_exports, embedding_files,
                                                     tiny_model_dirs):
    """load_textual_inversion on the export (both formats; a multi-vector token; SDXL's pair in one file) draws
    what diffusers draws with the same embeddings; unload_textual_inversion gives the images from before."""
    import diffusers
    import torch

    reference = diffusers.AutoPipelineForText2Image.from_pretrained(tiny_model_dirs(kind))
    reference.set_progress_bar_config(disable=True)
    files = embedding_files(kind)
    for token, file in files.items():
        load_embedding_in_diffusers(reference, token, file, EMBEDDINGS[kind][token][0])
    with one_torch_thread():
        expected = reference(TI_PROMPTS[kind], num_inference_steps=STEPS, latents=torch.from_numpy(latents()),
                             generator=torch.Generator().manual_seed(0), output_type="np").images

    pipe = _pipeline(swappable_exports(kind), backend)
    run = lambda: pipe(TI_PROMPTS[kind], num_inference_steps=STEPS, latents=latents(),  # noqa: E731
                       generator=TorchNoise(0), output_type="np").images
    run()
    before = run()  # a repeat, as every later call (see above)
    for token, file in files.items():
        pipe.load_textual_inversion(str(file), token=token if EMBEDDINGS[kind][token][0] != "diffusers" else None)
    got = run()
    diff = max_abs(expected, got)
    report(f"runtime-textual-inversion-{kind}-{backend}", diff)
    assert diff < ATOL, f"{kind} on {backend}: max abs {diff:.2e} >= {ATOL}"
    assert max_abs(before, got) > 10 * ATOL
    pipe.unload_textual_inversion()
    assert np.array_equal(run(), before)


def test_bad_runtime_embeddings_are_refused(swappable_exports, embedding_files, tiny_model_dirs, tmp_path):
    pipe = _pipeline(swappable_exports("sd1"), "onnxruntime")
    file = embedding_files("sd1")["<rt-cat>"]
    pipe.load_textual_inversion(str(file))
    with pytest.raises(ValueError, match="already in tokenizer vocabulary"):
        pipe.load_textual_inversion(str(file))
    with pytest.raises(DiffshipError, match=r"its vectors have shape \[1, 48\], and the text_encoder's token "
                                            "embeddings are 32 wide"):
        pipe.load_textual_inversion({"<wide>": np.zeros((1, 48), np.float32)})
    with pytest.raises(DiffshipError, match="spare rows left"):
        pipe.load_textual_inversion(np.zeros((200, 32), np.float32), token="<too-many>")
    pickled = tmp_path / "old.pt"
    pickled.write_bytes(b"not read")
    with pytest.raises(DiffshipError, match="--allow-pickle"):
        pipe.load_textual_inversion(str(pickled))
