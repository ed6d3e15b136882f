"""Hub ids are resolved with huggingface_hub. No network in tests: the hub client is replaced by a stand-in that
serves a local directory, so the real resolution logic (repo check, which files to fetch) runs."""

from __future__ import annotations

import huggingface_hub
import pytest

from diffship.errors import DiffshipError, NotAPipelineError
from diffship.exporters.loading import resolve_model_dir


class FakeApi:
    files: list[str] = []

    def list_repo_files(self, repo_id, revision=None):
        if repo_id == "org/unreachable":
            raise OSError("connection refused")
        return self.files


@pytest.fixture
def fake_hub(monkeypatch, tiny_model_dirs):
    calls = {}

    def snapshot_download(repo_id, revision=None, cache_dir=None, ignore_patterns=None):
        calls.update(repo_id=repo_id, revision=revision, ignore_patterns=ignore_patterns)
        return str(tiny_model_dirs("sd1"))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hub_id_downloads_safetensors_only(fake_hub, tiny_model_dirs):
    FakeApi.files = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                     "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.safetensors"]
    path = resolve_model_dir("org/model", revision="main")
    assert path == tiny_model_dirs("sd1")
    assert fake_hub["repo_id"] == "org/model" and fake_hub["revision"] == "main"
    assert "*.bin" in fake_hub["ignore_patterns"]  # safetensors are there: skip the pickled duplicates
    assert "*fp16*" in fake_hub["ignore_patterns"] and "*.ckpt" in fake_hub["ignore_patterns"]


def test_hub_id_keeps_bin_weights_when_no_safetensors(fake_hub):
    FakeApi.files = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin"]
    resolve_model_dir("org/old-model")
    assert "*.bin" not in fake_hub["ignore_patterns"]


def test_hub_repo_that_is_not_a_pipeline(fake_hub):
    FakeApi.files = ["config.json", "model.safetensors"]
    with pytest.raises(NotAPipelineError, match="'org/a-text-model' is not a diffusers pipeline"):
        resolve_model_dir("org/a-text-model")


def test_unreachable_hub_says_what_to_do(fake_hub):
    with pytest.raises(DiffshipError, match="could not reach hub repo 'org/unreachable'.*pass the directory"):
        resolve_model_dir("org/unreachable")
