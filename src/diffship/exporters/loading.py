"""Finding and loading the PyTorch reference pipeline: a local diffusers directory or a hub id."""

from __future__ import annotations

import json
import re
from pathlib import Path

from diffship.errors import DiffshipError, NotAPipelineError
from diffship.layout import MODEL_INDEX, TEXT_ENCODER, TEXT_ENCODER_2

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# Weights diffship does not read: other frameworks' files, fp16 variants, single-file checkpoints.
_IGNORE = ["*.ckpt", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.pb", "*.xml", "*.bin.index.json.bak",
           "*.fp16.*", "*fp16*", "*.pt", "*.pth"]


def resolve_model_dir(model: str | Path, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """A local diffusers directory as it is, or a hub id downloaded with huggingface_hub."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotAPipelineError(f"{path} is a file; give a diffusers pipeline directory (with model_index.json)")
        if not (path / MODEL_INDEX).is_file():
            raise NotAPipelineError(
                f"{path} is not a diffusers pipeline: it has no model_index.json. Give the pipeline's root folder."
            )
        return path
    if not _HUB_ID.match(str(model)):
        raise NotAPipelineError(f"{model!r} is neither an existing directory nor a hub id like 'org/name'")
    return _download(str(model), revision, cache_dir)


def _download(repo_id: str, revision: str | None, cache_dir: str | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
    except Exception as e:
        raise DiffshipError(f"could not reach hub repo {repo_id!r}: {e}. Download it and pass the directory.") from e
    if MODEL_INDEX not in files:
        raise NotAPipelineError(f"hub repo {repo_id!r} is not a diffusers pipeline (no model_index.json)")
    ignore = list(_IGNORE)
    if any(f.endswith(".safetensors") for f in files):
        ignore.append("*.bin")  # safetensors weights are there; skip the pickled duplicates
    return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, ignore_patterns=ignore))


def read_model_index(model_dir: Path) -> dict:
    return json.loads((model_dir / MODEL_INDEX).read_text())


def load_reference_pipeline(model_dir: Path):
    """The diffusers pipeline in float32 on CPU, eval mode, ready to trace."""
    import torch
    from diffusers import DiffusionPipeline

    index = read_model_index(model_dir)
    # Components diffship does not export are not loaded (the safety checker needs its own weights).
    skipped = {k: None for k in ("safety_checker", "feature_extractor", "image_encoder") if k in index}
    try:
        pipe = DiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, **skipped)
    except Exception as e:
        raise NotAPipelineError(f"diffusers could not load the pipeline in {model_dir}: {e}") from e
    for name in (TEXT_ENCODER, TEXT_ENCODER_2):
        encoder = getattr(pipe, name, None)
        if encoder is not None and hasattr(encoder, "set_attn_implementation"):
            # The eager attention path traces to plain ONNX ops; sdpa's mask helpers do not trace cleanly.
            encoder.set_attn_implementation("eager")
    for module in pipe.components.values():
        if hasattr(module, "eval"):
            module.eval()
    return pipe
