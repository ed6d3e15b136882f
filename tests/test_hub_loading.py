"""Hub repo ids, resolved with huggingface_hub on a real hub cache laid out from local files (tests/hub_cache.py),
with the network blocked: the exported pipelines load from it (the backend chosen from the repo's files, only its
files asked for), at a revision, offline; an export reads a variant-only repo from the cache and records the commit;
pickled weights need allow_pickle; the token reaches huggingface_hub; a name that is neither a directory nor a repo
says both."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import numpy as np
import pytest

from diffship import AutoPipelineForText2Image, DiffusionPipeline, StableDiffusionPipeline
from diffship.cli import main
from diffship.errors import BackendError, DiffshipError, HubError
from diffship.exporters.loading import resolve_source
from diffship.hub import HubOptions
from diffship.layout import GRAPH_FILES, ONNX_DATA, ONNX_MODEL, OPENVINO_MODEL, OPENVINO_WEIGHTS, REPORT_FILE
from hub_cache import add_commit

OPENVINO_FILES = (OPENVINO_MODEL, OPENVINO_WEIGHTS)
ONNX_FILES = (ONNX_MODEL, ONNX_DATA)
pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def cached_repos(exported_dirs, tmp_path_factory):
    """A hub cache holding the tiny sd1 export as three repos: org/sd1-both (ONNX and OpenVINO graphs) whose branch
    `openvino` is a second commit with the OpenVINO graphs only; org/sd1-openvino (OpenVINO only)."""
    cache = tmp_path_factory.mktemp("hub-cache")
    export = exported_dirs("sd1")
    commits = {
        "both": add_commit(cache, "org/sd1-both", export),
        "both@openvino": add_commit(cache, "org/sd1-both", export, branch="openvino",
                                    skip=lambda f: f.endswith(ONNX_FILES)),
        "openvino": add_commit(cache, "org/sd1-openvino", export, skip=lambda f: f.endswith(ONNX_FILES)),
    }
    return cache, commits


@pytest.fixture
def downloads(monkeypatch):
    """huggingface_hub.snapshot_download, recorded: each call's arguments, then the real call."""
    calls = []
    real = huggingface_hub.snapshot_download

    def snapshot_download(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def _generate(pipe):
    return pipe("a red circle", num_inference_steps=2, generator=0, output_type="np").images


def test_exported_repo_loads_on_the_backend_its_graphs_are_for(cached_repos, downloads):
    cache, commits = cached_repos
    pipe = StableDiffusionPipeline.from_pretrained("org/sd1-both", cache_dir=cache, compile=False)
    assert pipe.backend == "onnxruntime"  # both formats: onnxruntime, as for a directory
    assert pipe.model_dir.name == commits["both"] and pipe.model_dir.parent.name == "snapshots"
    asked = downloads[-1]["allow_patterns"]
    assert "unet/model.onnx" in asked and "model_index.json" in asked and "tokenizer/vocab.json" in asked
    assert not [f for f in asked if f.endswith(OPENVINO_FILES)]  # only the files onnxruntime reads
    assert all(d["cache_dir"] == cache for d in downloads)
    assert np.isfinite(_generate(pipe)).all()


def test_openvino_only_repo_and_revision(cached_repos, downloads):
    cache, commits = cached_repos
    pipe = AutoPipelineForText2Image.from_pretrained("org/sd1-openvino", cache_dir=cache, local_files_only=True,
                                                     compile=False)
    assert pipe.backend == "openvino" and pipe.model_dir.name == commits["openvino"]
    asked = downloads[-1]["allow_patterns"]
    assert "unet/openvino_model.bin" in asked and not [f for f in asked if f.endswith(ONNX_FILES)]
    assert np.isfinite(_generate(pipe)).all()
    # A branch, and a commit, of the repo holding both: that commit's files choose the backend.
    for revision in ("openvino", commits["both@openvino"]):
        pipe = DiffusionPipeline.from_pretrained("org/sd1-both", revision=revision, cache_dir=cache, compile=False)
        assert (type(pipe).__name__, pipe.backend) == ("StableDiffusionPipeline", "openvino")
        assert pipe.model_dir.name == commits["both@openvino"]
        assert downloads[-1]["revision"] == revision
    # bench downloads for the backends it runs, then benches the snapshot folder.
    from diffship.cli import _bench_model_dir, build_parser

    args = build_parser().parse_args(["bench", "org/sd1-both", "--revision", "openvino", "--cache-dir", str(cache)])
    assert _bench_model_dir(args, None).name == commits["both@openvino"]


def test_backend_the_repo_cannot_serve_and_missing_revision(cached_repos):
    cache, _ = cached_repos
    with pytest.raises(BackendError, match=r"org/sd1-openvino/\w+: the onnxruntime backend runs model.onnx, and "
                                           r"this component holds openvino_model.xml only; load it with "
                                           r"backend='openvino'"):
        StableDiffusionPipeline.from_pretrained("org/sd1-openvino", backend="onnxruntime", cache_dir=cache)
    with pytest.raises(HubError, match="org/sd1-both: no such directory, and the Hugging Face Hub answered"):
        StableDiffusionPipeline.from_pretrained("org/sd1-both", revision="v9", cache_dir=cache)


def test_a_name_that_is_neither_a_directory_nor_a_repo(tmp_path):
    with pytest.raises(HubError, match=r"^org/nothing: no such directory, and the Hugging Face Hub answered for "
                                       r"repo 'org/nothing': .+ \(give an existing directory"):
        StableDiffusionPipeline.from_pretrained("org/nothing", cache_dir=tmp_path)
    with pytest.raises(HubError, match="no such directory, and not a hub repo id like 'org/name'"):
        AutoPipelineForText2Image.from_pretrained(str(tmp_path / "exports" / "typo"))
    with pytest.raises(HubError, match="no such directory, and the Hugging Face Hub answered"):
        resolve_source("org/nothing", HubOptions(cache_dir=tmp_path))


def test_unreachable_hub_falls_back_to_the_cache(cached_repos, monkeypatch):
    """Online (HF_HUB_OFFLINE unset) but no connection: the listing and the files come from the cache, as
    huggingface_hub's snapshot_download does. (Its retries wait 1+2+4+8+8 s first; not in a test.)"""
    import time

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    cache, commits = cached_repos
    pipe = StableDiffusionPipeline.from_pretrained("org/sd1-openvino", cache_dir=cache, compile=False)
    assert pipe.model_dir.name == commits["openvino"]


def test_token_and_cache_dir_reach_huggingface_hub(cached_repos, downloads, tmp_path, capsys):
    cache, _ = cached_repos
    code = main(["generate", "org/sd1-openvino", "--cache-dir", str(cache), "--token", "hf_secret",
                 "--local-files-only", "--prompt", "a red circle", "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "image.png")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "image.png").is_file()
    assert downloads and all(d["token"] == "hf_secret" and d["cache_dir"] == str(cache) and d["local_files_only"]
                             for d in downloads)


def test_cli_says_both_answers_on_one_line(tmp_path, capsys):
    code = main(["generate", "org/nothing", "--cache-dir", str(tmp_path), "--prompt", "x",
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "org/nothing: no such directory, and the Hugging Face Hub answered" in err


# ---- export from the hub cache ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp16_variant_dir(tiny_model_dirs, tmp_path_factory):
    """The tiny sd1 pipeline saved as diffusers saves `variant="fp16"` in half precision: every weight file is
    *.fp16.safetensors, none without the variant."""
    import torch
    from diffusers import StableDiffusionPipeline as TorchPipeline

    path = tmp_path_factory.mktemp("variant") / "sd1-fp16"
    pipe = TorchPipeline.from_pretrained(tiny_model_dirs("sd1"), safety_checker=None, torch_dtype=torch.float16)
    pipe.save_pretrained(path, variant="fp16")
    weights = sorted(p.relative_to(path).as_posix() for p in path.rglob("*.safetensors"))
    assert weights and all(w.endswith(".fp16.safetensors") for w in weights), weights
    return path


def test_export_variant_offline_from_cache_records_the_commit(fp16_variant_dir, tmp_path):
    from diffship import export

    cache = tmp_path / "hub"
    commit = add_commit(cache, "org/tiny-fp16", fp16_variant_dir)
    with pytest.raises(DiffshipError, match=r"its safetensors weights are saved as variant fp16: export with "
                                            r"--variant fp16"):
        resolve_source("org/tiny-fp16", HubOptions(cache_dir=cache))
    out = export("org/tiny-fp16", tmp_path / "out", "onnx", variant="fp16", revision="main", cache_dir=cache,
                 progress=False)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["hub"] == {"repo_id": "org/tiny-fp16", "revision": "main", "commit": commit}
    assert report["variant"] == "fp16" and report["source"] == "org/tiny-fp16"
    assert all(c["validation"] for c in report["components"].values())
    assert (out / "unet" / ONNX_MODEL).is_file()


def test_export_token_and_options_go_to_the_download(monkeypatch, tmp_path):
    """diffusers' DiffusionPipeline.download (which hands them to huggingface_hub) gets the hub arguments."""
    from diffusers import DiffusionPipeline as TorchDiffusionPipeline

    from diffship import export

    received = {}

    def download(repo_id, **kwargs):
        received.update(repo_id=repo_id, **kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(TorchDiffusionPipeline, "download", download)
    with pytest.raises(HubError, match="org/private: no such directory, and the Hugging Face Hub answered .*stop here"):
        export("org/private", tmp_path / "out", token="hf_secret", revision="v1", variant="fp16", cache_dir=tmp_path,
               local_files_only=True)
    assert received["token"] == "hf_secret" and received["revision"] == "v1" and received["variant"] == "fp16"
    assert received["cache_dir"] == tmp_path and received["local_files_only"] is True
    assert received["use_safetensors"] is True and received["safety_checker"] is None


@pytest.fixture(scope="module")
def pickled_dir(tiny_model_dirs, tmp_path_factory):
    """The tiny sd1 pipeline with its UNet's weights pickled (diffusion_pytorch_model.bin, no safetensors)."""
    import torch
    from safetensors.torch import load_file

    path = tmp_path_factory.mktemp("pickled") / "sd1-bin"
    shutil.copytree(tiny_model_dirs("sd1"), path)
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), path / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    return path


def test_pickled_weights_need_allow_pickle(pickled_dir, tmp_path, capsys):
    cache = tmp_path / "hub"
    add_commit(cache, "org/pickled", pickled_dir)
    with pytest.raises(DiffshipError, match=r"unet holds diffusion_pytorch_model.bin and no .safetensors weights; "
                                            r"pickled weights run code when loaded: export with --allow-pickle"):
        resolve_source(pickled_dir)
    assert resolve_source(pickled_dir, allow_pickle=True).path == pickled_dir
    with pytest.raises(DiffshipError, match=r"hub repo 'org/pickled': .*safetensors.*--allow-pickle"):
        resolve_source("org/pickled", HubOptions(cache_dir=cache))
    source = resolve_source("org/pickled", HubOptions(cache_dir=cache, local_files_only=True), allow_pickle=True)
    assert (source.path / "unet" / "diffusion_pytorch_model.bin").is_file() and source.snapshot is not None
    code = main(["export", "org/pickled", str(tmp_path / "out"), "--cache-dir", str(cache), "--local-files-only"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--allow-pickle" in err
    assert not (tmp_path / "out").exists()


def test_graph_files_are_the_formats_known_to_the_hub_selection():
    from diffship.hub import FORMAT_FILES

    assert set(FORMAT_FILES) == set(GRAPH_FILES)
