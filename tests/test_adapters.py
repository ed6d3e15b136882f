"""Adapters baked in at export, against diffusers with the same adapters loaded: LoRA (`loras=`,
`--lora FILE[:SCALE]`) and textual inversion (`textual_inversions=`, `--textual-inversion FILE[:TOKEN]`).

Each tiny pipeline (SD 1.x and SDXL) is exported once with all its adapters, as users stack them: two LoRAs at
different scales, one in the diffusers/PEFT format with convolution layers (the UNet's resnet convolutions) beside
the attention projections, one in the kohya format, both adapting the text encoders too; and textual inversion
embeddings in every format (SD 1.x: a 3-vector diffusers one, Automatic1111's .safetensors named by its file and
.pt; SDXL: a 2-vector clip_l/clip_g pair), whose tokens the prompts and negative prompts use. diffusers' reference
loads the same files with load_lora_weights + set_adapters (unfused) and load_textual_inversion.

Tolerance: 1e-3 max abs on output_type="np" images in [0, 1] (image_tasks.ATOL, as every parity test): fusing
the adapters into the weights changes float rounding only (about 1e-6 here); an adapter missed, applied twice or at
the wrong scale, or a multi-vector token not expanded, changes the images by 1e-2 or more.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from diffship.cli import main
from diffship.errors import DiffshipError
from diffship.exporters import export
from diffship.pipelines import AutoPipelineForText2Image
from diffship.pipelines.lora import parse_lora_flag
from diffship.pipelines.textual_inversion import parse_textual_inversion_flag
from diffship.pipelines.tokenizer import CLIPTokenizer
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

SCALES = {"locon": 0.8, "kohya": 0.5}
# kind -> {name: (format, token given at load or None, vectors)}; the A1111 safetensors' token is its file name.
EMBEDDINGS = {
    "sd1": {"<tiny-cat>": ("diffusers", None, 3), "tiny-style": ("a1111-safetensors", None, 1),
            "<tiny-pt>": ("a1111-pt", None, 2)},
    "sdxl": {"<tiny-xl>": ("sdxl", "<tiny-xl>", 2)},
}
PROMPTS = {
    "sd1": ["a red circle on the left, <tiny-cat>", "an oil painting of a castle at sunset in tiny-style by <tiny-pt>"],
    "sdxl": ["a red circle <tiny-xl> on the left", "an oil painting of a castle at sunset"],
}
NEGATIVE = {"sd1": "<tiny-cat> blurry", "sdxl": "<tiny-xl> blurry"}
STEPS = 3
# SDXL's adapter export is ONNX only (OpenVINO runs model.onnx): adapters are applied in PyTorch before either
# conversion, and SD 1.x's export checks the OpenVINO side; the suite stays within its time.
FORMATS = {"sd1": ["onnx", "openvino"], "sdxl": ["onnx"]}


@pytest.fixture(scope="module")
def adapter_files(tiny_model_dirs, tmp_path_factory):
    """kind -> ({LoRA name: file}, {token: embedding file}) for that tiny pipeline."""
    root, cache = tmp_path_factory.mktemp("adapters"), {}

    def get(kind):
        if kind not in cache:
            model, folder = tiny_model_dirs(kind), root / kind
            loras = {"locon": save_tiny_lora(model, folder / "locon.safetensors", convolutions=True, seed=1),
                     "kohya": save_tiny_lora(model, folder / "kohya.safetensors", kohya=True, seed=2)}
            suffix = {"a1111-pt": ".pt"}
            embeddings = {token: save_tiny_embedding(model, folder / f"{token.strip('<>')}{suffix.get(fmt, '.safetensors')}",
                                                     token, vectors=vectors, fmt=fmt, seed=10 + i)
                          for i, (token, (fmt, _, vectors)) in enumerate(EMBEDDINGS[kind].items())}
            cache[kind] = loras, embeddings
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def adapter_exports(tiny_model_dirs, adapter_files, tmp_path_factory):
    """kind -> the tiny pipeline exported with all its adapters (LoRAs fused at SCALES, every embedding)."""
    root, cache = tmp_path_factory.mktemp("adapter-exports"), {}

    def get(kind):
        if kind not in cache:
            loras, embeddings = adapter_files(kind)
            cache[kind] = export(tiny_model_dirs(kind), root / kind, FORMATS[kind], progress=False, allow_pickle=True,
                                 loras=[(loras[name], scale) for name, scale in SCALES.items()],
                                 textual_inversions=[(file, EMBEDDINGS[kind][token][1]) if EMBEDDINGS[kind][token][1]
                                                     else file for token, file in embeddings.items()])
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def references(tiny_model_dirs, adapter_files):
    """kind -> diffusers' images with every adapter loaded (LoRAs unfused, at SCALES)."""
    import diffusers
    import torch

    cache = {}

    def get(kind):
        if kind not in cache:
            pipe = diffusers.AutoPipelineForText2Image.from_pretrained(tiny_model_dirs(kind))
            pipe.set_progress_bar_config(disable=True)
            loras, embeddings = adapter_files(kind)
            for name, file in loras.items():
                pipe.load_lora_weights(str(file), adapter_name=name)
            pipe.set_adapters(list(SCALES), adapter_weights=list(SCALES.values()))
            for token, file in embeddings.items():
                load_embedding_in_diffusers(pipe, token, file, EMBEDDINGS[kind][token][0])
            with one_torch_thread():
                cache[kind] = pipe(PROMPTS[kind], negative_prompt=[NEGATIVE[kind]] * 2, num_inference_steps=STEPS,
                                   latents=torch.from_numpy(latents()), generator=torch.Generator().manual_seed(0),
                                   output_type="np").images
        return cache[kind]

    return get


def _images(folder, backend, kind):
    pipe = AutoPipelineForText2Image.from_pretrained(folder, backend=backend, inference_precision="f32")
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS[kind], negative_prompt=[NEGATIVE[kind]] * 2, num_inference_steps=STEPS, latents=latents(),
                generator=TorchNoise(0), output_type="np").images


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_adapter_export_matches_diffusers_with_the_adapters_loaded(kind, backend, adapter_exports, references):
    got = _images(adapter_exports(kind), backend, kind)
    diff = max_abs(references(kind), got)
    report(f"adapters-{kind}-{backend}", diff)
    assert diff < ATOL, f"{kind} on {backend}: max abs {diff:.2e} >= {ATOL}"


def test_the_adapters_change_the_images(adapter_exports, exported_dirs, tiny_model_dirs):
    """The base export draws far from the adapted one on the same inputs (the tokens are unknown to its tokenizer
    and come out as pieces): the adapters did reach the graphs."""
    assert max_abs(_images(exported_dirs("sd1"), "onnxruntime", "sd1"),
                   _images(adapter_exports("sd1"), "onnxruntime", "sd1")) > 20 * ATOL


def test_the_report_records_each_adapter(adapter_exports, adapter_files):
    report_ = json.loads((adapter_exports("sd1") / "export_report.json").read_text())
    loras, embeddings = adapter_files("sd1")
    sha256 = lambda file: hashlib.sha256(file.read_bytes()).hexdigest()  # noqa: E731
    assert report_["loras"] == [{"file": str(loras[name].resolve()), "sha256": sha256(loras[name]), "scale": scale}
                                for name, scale in SCALES.items()]
    assert report_["textual_inversions"] == [
        {"file": str(file.resolve()), "sha256": sha256(file),
         "tokens": sorted([token] + [f"{token}_{i}" for i in range(1, EMBEDDINGS["sd1"][token][2])])}
        for token, file in embeddings.items()]


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_the_exported_tokenizers_know_the_tokens(kind, adapter_exports, adapter_files, tiny_model_dirs):
    """Each exported tokenizer folder tokenizes a prompt with a multi-vector token as diffusers' pipeline does
    (the token written out as its vectors' tokens, then tokenized)."""
    import diffusers

    reference = diffusers.AutoPipelineForText2Image.from_pretrained(tiny_model_dirs(kind))
    _, embeddings = adapter_files(kind)
    for token, file in embeddings.items():
        load_embedding_in_diffusers(reference, token, file, EMBEDDINGS[kind][token][0])
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(reference, name, None) is None:
            continue
        ours, theirs = CLIPTokenizer.from_pretrained(adapter_exports(kind) / name), getattr(reference, name)
        for prompt in PROMPTS[kind] + [NEGATIVE[kind]]:
            converted = reference.maybe_convert_prompt(prompt, theirs)
            assert ours.maybe_convert_prompt(prompt) == converted
            expected = theirs(converted, padding="max_length", max_length=theirs.model_max_length,
                              truncation=True).input_ids
            assert ours([prompt]).tolist() == [expected], (name, prompt)


@pytest.mark.parametrize("text, expected", [
    ("style.safetensors", ("style.safetensors", 1.0)),
    ("style.safetensors:0.7", ("style.safetensors", 0.7)),
    ("dir:with:colons/style.safetensors", ("dir:with:colons/style.safetensors", 1.0)),
    ("/loras/style.safetensors:-1.5", ("/loras/style.safetensors", -1.5)),
])
def test_lora_flag(text, expected):
    assert parse_lora_flag(text) == expected


def test_bad_adapter_files_are_refused_before_any_work(tiny_model_dirs, tmp_path, capsys):
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
    for flag, message in {str(tmp_path / "missing.pt"): "no such file", str(not_safetensors): "is not a safetensors",
                          str(tmp_path / "pickled.bin"): "is a pickled file"}.items():
        code = main(["export", str(tiny_model_dirs("sd1")), str(tmp_path / "out"), "--textual-inversion", flag])
        err = capsys.readouterr().err
        line = err.strip().splitlines()[-1]  # after what the first import of transformers may warn in this process
        assert code == 2 and line.startswith("diffship export: error: --textual-inversion ") and message in line, err
        assert "Traceback" not in err
        assert not (tmp_path / "out").exists()


def test_a_lora_for_another_architecture_is_refused(tiny_model_dirs, adapter_files, tmp_path):
    """SDXL's LoRA on SD 1.x: its second text encoder's layers have no home, its UNet's do not fit; the export
    stops with the file named and leaves nothing."""
    with pytest.raises(DiffshipError, match=r"loras .*sdxl.*kohya\.safetensors does not fit this StableDiffusion"
                                             r"Pipeline: .*(size mismatch|no such component|match no layer)"):
        export(tiny_model_dirs("sd1"), tmp_path / "out", "onnx", progress=False, loras=[adapter_files("sdxl")[0]["kohya"]])
    assert list(tmp_path.iterdir()) == []


def test_embeddings_that_do_not_fit_are_refused(tiny_model_dirs, adapter_files, tmp_path):
    """An embedding of another width (SDXL's clip_g vectors into SD 1.x's text encoder), a token the vocabulary
    already has, SDXL's pair on SD 1.x: the export stops naming the file, and leaves nothing."""
    from safetensors.numpy import save_file

    wide = tmp_path / "inputs" / "wide.safetensors"
    wide.parent.mkdir()
    save_file({"<wide>": np.zeros((1, 4096), np.float32)}, str(wide))
    taken = tmp_path / "inputs" / "taken.safetensors"
    save_file({"<|endoftext|>": np.zeros((1, 32), np.float32)}, str(taken))
    sdxl_pair = adapter_files("sdxl")[1]["<tiny-xl>"]
    for file, message in [(wide, r"its vectors have shape \[1, 4096\], and the text_encoder's token embeddings are "
                                 r"32 wide"),
                          (taken, "already in tokenizer vocabulary"),
                          (sdxl_pair, "text_encoder_2, which this pipeline lacks")]:
        with pytest.raises(DiffshipError, match=rf"textual_inversions {file} does not fit .*{message}"):
            export(tiny_model_dirs("sd1"), tmp_path / "out", "onnx", progress=False, textual_inversions=[file])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


@pytest.mark.parametrize("text, expected", [
    ("cat.safetensors", ("cat.safetensors", None)),
    ("cat.safetensors:<my-cat>", ("cat.safetensors", "<my-cat>")),
    ("dir:x/cat.pt", ("dir:x/cat.pt", None)),
])
def test_textual_inversion_flag(text, expected):
    assert parse_textual_inversion_flag(text) == expected


def test_a_lora_with_a_layer_the_model_lacks_is_refused(tiny_model_dirs, adapter_files, tmp_path):
    """One layer of an otherwise fitting LoRA renamed to a module the UNet does not have: diffusers would load the
    rest and only warn; the export refuses the file instead of applying part of it."""
    from safetensors.numpy import load_file, save_file

    state = load_file(str(adapter_files("sd1")[0]["locon"]))
    layer = next(k for k in state if k.startswith("unet.") and k.endswith(".to_q.lora_A.weight")).removesuffix(
        ".to_q.lora_A.weight")
    renamed = {k.replace(f"{layer}.to_q.", f"{layer}.to_nowhere."): v for k, v in state.items()}
    broken = tmp_path / "inputs" / "broken.safetensors"
    broken.parent.mkdir()
    save_file(renamed, str(broken))
    with pytest.raises(DiffshipError, match=rf"loras {broken} does not fit this StableDiffusionPipeline: .*"
                                            r"(1 of its \d+ unet LoRA layers match no layer|to_nowhere)"):
        export(tiny_model_dirs("sd1"), tmp_path / "out", "onnx", progress=False, loras=[broken])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]
