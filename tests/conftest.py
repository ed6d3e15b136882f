"""Session fixtures: tiny diffusers pipelines and their exports, built once per test run (no network)."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
    """The runtimes' compile cache (runtimes/cache.py) for this run: a fresh folder, not the user's ~/.cache."""
    path = tmp_path_factory.mktemp("compile-cache")
    previous = os.environ.get("DIFFSHIP_CACHE_DIR")
    os.environ["DIFFSHIP_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("DIFFSHIP_CACHE_DIR", None)
    else:
        os.environ["DIFFSHIP_CACHE_DIR"] = previous


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
    already checks; the openvino backend then runs model.onnx (a shorter suite). `deepcache=True`: exported with
    DeepCache's graphs (a separate export: the plain one stays as users get it); other export() options likewise
    (`skip_layer_guidance=True`, `height=64`): one export per kind, formats and options, shared by every test."""
    from diffship.exporters import export

    root = tmp_path_factory.mktemp("exports")
    cache = {}

    def get(kind: str, formats: tuple[str, ...] = ("onnx", "openvino"), **options):
        options = {name: value for name, value in sorted(options.items()) if value is not False}
        key = (kind, tuple(formats), *options.items())
        if key not in cache:
            name = "-".join((kind, *formats, *(f"{k}={v}" if v is not True else k for k, v in options.items())))
            cache[key] = export(tiny_model_dirs(kind), root / name, list(formats), progress=False, **options)
        return cache[key]

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


@pytest.fixture
def no_network(monkeypatch):
    """For hub tests (tests/hub_cache.py lays out their cache): every socket connection refused, and
    huggingface_hub told it is offline (HF_HUB_OFFLINE=1, which it reads at import: its constant is set too)."""
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise OSError("network blocked in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


BLOCKED = ("torch", "diffusers", "transformers")


@pytest.fixture
def torch_blocked_env(tmp_path):
    """PYTHONPATH shadows torch, diffusers and transformers with packages whose import raises ImportError."""
    shadow = tmp_path / "shadow"
    for name in BLOCKED:
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shadow), env.get("PYTHONPATH", "")])
    return env
