"""Finding and loading the PyTorch reference pipeline: a local diffusers directory or a hub id (hub.py)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from diffship.adapter_files import ALLOW_PICKLE_ADVICE, PICKLE_SUFFIXES
from diffship.errors import DiffshipError, NotAPipelineError
from diffship.hub import HubOptions, Snapshot, check_hub_id, not_found, repo_files
from diffship.layout import MODEL_INDEX, TEXT_ENCODER, TEXT_ENCODER_2

# Components the export does not load (the safety checker needs its own weights): not downloaded either.
SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
# diffusers' variant weight names: model.fp16.safetensors, diffusion_pytorch_model.fp16-00001-of-00002.safetensors.
_VARIANT_WEIGHTS = re.compile(r"\.(\w+)(?:-\d{5}-of-\d{5})?\.safetensors$")


@dataclass(frozen=True)
class Source:
    """The diffusers pipeline an export reads: its local folder, and for a hub id the snapshot it resolved to."""

    path: Path
    snapshot: Snapshot | None = None

    def to_report(self) -> dict | None:
        """What export_report.json records of a hub source: the repo, the revision asked for, the commit used."""
        if self.snapshot is None:
            return None
        return {"repo_id": self.snapshot.repo_id, "revision": self.snapshot.revision, "commit": self.snapshot.commit}


def resolve_source(model: str | Path, options: HubOptions = HubOptions(), variant: str | None = None,
                   allow_pickle: bool = False) -> Source:
    """A local diffusers directory as it is, or a hub id downloaded into the hub cache with diffusers' own
    DiffusionPipeline.download (the files of `variant` where a component has them, safetensors only unless
    `allow_pickle`, the cached snapshot when offline). A name that is neither is refused with both answers."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotAPipelineError(f"{path} is a file; give a diffusers pipeline directory (with model_index.json)")
        if not (path / MODEL_INDEX).is_file():
            raise NotAPipelineError(
                f"{path} is not a diffusers pipeline: it has no model_index.json. Give the pipeline's root folder."
            )
        if not allow_pickle:
            check_no_pickle(path)
        return Source(path)
    return Source(*_download(check_hub_id(model), options, variant, allow_pickle))


def check_no_pickle(model_dir: Path) -> None:
    """Refuse a component folder whose only weights are pickled (before torch is imported)."""
    for folder in sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name not in SKIPPED_COMPONENTS):
        names = [f.name for f in folder.iterdir() if f.is_file()]
        pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES) and not n.startswith("openvino_")]
        if pickled and not any(n.endswith(".safetensors") for n in names):
            raise DiffshipError(f"{folder} holds {pickled[0]} and no .safetensors weights; {ALLOW_PICKLE_ADVICE}")


def weights_advice(files, variant: str | None) -> str:
    """What to do when diffusers finds no weights to load among `files` (a repo's or directory's file names): give
    the variant the safetensors weights are saved as, or allow the pickled ones."""
    variants = sorted({m.group(1) for f in files if (m := _VARIANT_WEIGHTS.search(PurePosixPath(f).name))})
    if variants and variant not in variants:
        return (f"its safetensors weights are saved as variant {' and '.join(variants)}: export with --variant "
                f"{variants[0]} (variant={variants[0]!r})")
    if any(PurePosixPath(f).name.endswith(PICKLE_SUFFIXES) for f in files):
        return ALLOW_PICKLE_ADVICE
    return f"export with --variant (the weights' variant) or, for pickled weights, {ALLOW_PICKLE_ADVICE}"


def _download(repo_id: str, options: HubOptions, variant: str | None, allow_pickle: bool) -> tuple[Path, Snapshot]:
    from diffusers import DiffusionPipeline

    try:
        folder = DiffusionPipeline.download(
            repo_id, **options.download_kwargs(), local_files_only=options.local_files_only, variant=variant,
            use_safetensors=None if allow_pickle else True, **{name: None for name in SKIPPED_COMPONENTS})
    except Exception as e:
        message = " ".join(str(e).split())
        if "safetensors" in message or "variant" in message:
            try:
                files, _ = repo_files(repo_id, options)
            except DiffshipError:
                files = []
            raise DiffshipError(f"hub repo {repo_id!r}: {message}; {weights_advice(files, variant)}") from None
        raise not_found(repo_id, e) from None
    folder = Path(folder)
    return folder, Snapshot(folder, repo_id, options.revision, folder.name)


def read_model_index(model_dir: Path) -> dict:
    return json.loads((model_dir / MODEL_INDEX).read_text())


def load_reference_pipeline(model_dir: Path, variant: str | None = None, allow_pickle: bool = False):
    """The diffusers pipeline in float32 on CPU, eval mode, ready to trace: `variant`'s weights where a component
    has them (e.g. fp16, upcast to float32), safetensors only unless `allow_pickle`."""
    import torch
    from diffusers import DiffusionPipeline

    index = read_model_index(model_dir)
    # Components diffship does not export are not loaded (the safety checker needs its own weights).
    skipped = {k: None for k in SKIPPED_COMPONENTS if k in index}
    try:
        pipe = DiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, variant=variant,
                                                 use_safetensors=None if allow_pickle else True, **skipped)
    except Exception as e:
        files = [p.relative_to(model_dir).as_posix() for p in Path(model_dir).rglob("*") if p.is_file()]
        advice = f"; {weights_advice(files, variant)}" if "safetensors" in str(e) or "variant" in str(e) else ""
        raise NotAPipelineError(f"diffusers could not load the pipeline in {model_dir}: {e}{advice}") from e
    for name in (TEXT_ENCODER, TEXT_ENCODER_2):
        encoder = getattr(pipe, name, None)
        if encoder is not None and hasattr(encoder, "set_attn_implementation"):
            # The eager attention path traces to plain ONNX ops; sdpa's mask helpers do not trace cleanly.
            encoder.set_attn_implementation("eager")
    for module in pipe.components.values():
        if hasattr(module, "eval"):
            module.eval()
    return pipe
