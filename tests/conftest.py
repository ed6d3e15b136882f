"""Session fixtures: tiny diffusers pipelines and their exports, built once per test run (no network)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """kind -> a diffusers directory of the tiny sd1 / sd2 pipeline (built on first use)."""
    from diffship.testing.tiny_models import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-models")
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = save_tiny_pipeline(root / kind, kind)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def exported_dirs(tiny_model_dirs, tmp_path_factory):
    """kind -> an export of the tiny pipeline holding both ONNX and OpenVINO graphs (built on first use).
    `formats=("onnx",)`: ONNX only, for model variants whose OpenVINO conversion is the one another kind's export
    already checks; the openvino backend then runs model.onnx (a shorter suite)."""
    from diffship.exporters import export

    root = tmp_path_factory.mktemp("exports")
    cache = {}

    def get(kind: str, formats: tuple[str, ...] = ("onnx", "openvino")):
        if (kind, formats) not in cache:
            cache[kind, formats] = export(tiny_model_dirs(kind), root / "-".join((kind, *formats)), list(formats),
                                          progress=False)
        return cache[kind, formats]

    return get


@pytest.fixture(scope="session")
def reference_pipelines(tiny_model_dirs):
    """kind -> diffusers' StableDiffusionPipeline (torch, CPU) on the tiny model: the oracle."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dirs(kind), safety_checker=None)
            pipe.set_progress_bar_config(disable=True)
            cache[kind] = (pipe, pipe.scheduler)
        pipe, original_scheduler = cache[kind]
        # Tests swap schedulers; each starts from the model's own, so no test inherits another's overrides.
        pipe.scheduler = original_scheduler
        return pipe

    return get
