"""`pipe.save_pretrained(dir)`: a loaded pipeline -> an exported directory that loads again, with the scheduler
the pipeline has now (diffusers' save_pretrained, for exports).

Nothing is converted: each component's folder is copied as the export has it, from where its session was loaded
(graph, external data or OpenVINO weights, config.json, the text encoder's final layer norm), and each tokenizer's
folder from where it was read. Written from memory: the current scheduler's scheduler_config.json (as its
save_config writes it: diffusers' format), model_index.json naming this pipeline's class and that scheduler,
the depth feature extractor's settings, and export_report.json (the source's, with the list of files written:
what marks the directory as diffship's). The writing is the exporter's (diffship/output_directory.py): a staging
folder beside the target renamed at the end, so an interrupted save leaves nothing, and only an empty folder or
one diffship wrote is ever replaced. Torch-free, as all run-time code.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

from diffship.errors import DiffshipError
from diffship.layout import (
    CONTROLNET,
    DEPTH_ESTIMATOR,
    FEATURE_EXTRACTOR,
    MODEL_INDEX,
    PREPROCESSOR_CONFIG,
    REPORT_FILE,
    SCHEDULER,
    SOURCE_VAE,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TEXT_ENCODER_3,
    TOKENIZER,
    TOKENIZER_2,
    TOKENIZER_3,
    TRANSFORMER,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
)
from diffship.output_directory import EXPORTER, ExportDirectory, check_output, list_files
from diffship.schedulers.config import DIFFUSERS_REFERENCE_VERSION

ACTION = "save_pretrained"  # what replaces a previous export, in output_directory's messages
# model_index.json's [library, class] for each component a pipeline may hold, where the index it was loaded with
# lacks one (a pipeline built from components): what diffusers writes for these models.
_INDEX_ENTRIES = {
    UNET: ["diffusers", "UNet2DConditionModel"],
    SOURCE_VAE: ["diffusers", "AutoencoderKL"],
    TEXT_ENCODER: ["transformers", "CLIPTextModel"],
    TEXT_ENCODER_2: ["transformers", "CLIPTextModelWithProjection"],
    TOKENIZER: ["transformers", "CLIPTokenizer"],
    TOKENIZER_2: ["transformers", "CLIPTokenizer"],
    TRANSFORMER: ["diffusers", "SD3Transformer2DModel"],
    TEXT_ENCODER_3: ["transformers", "T5EncoderModel"],
    TOKENIZER_3: ["transformers", "T5TokenizerFast"],
    DEPTH_ESTIMATOR: ["transformers", "DPTForDepthEstimation"],
    FEATURE_EXTRACTOR: ["transformers", "DPTImageProcessor"],
}


def save_pipeline(pipe, save_directory) -> Path:
    """Write `pipe` to `save_directory` (see the module's docstring) and return its path."""
    output = Path(save_directory).expanduser().resolve()
    folders = {name: Path(session.path).resolve().parent for name, session in pipe.sessions.items()}
    folders.update({name: Path(tokenizer.name_or_path).resolve() for name, tokenizer in pipe.tokenizers.items()
                    if tokenizer.name_or_path is not None})
    missing = sorted(name for name in pipe.tokenizers if name not in folders)
    if missing:
        raise DiffshipError(f"{ACTION}: the {', '.join(missing)} was not read from a folder, so there are no "
                            "files to save; load the pipeline with from_pretrained")
    sources = {folder.parent for folder in folders.values()}
    for source in sources:
        if output == source or source in output.parents or output in source.parents:
            raise DiffshipError(f"{ACTION}: {output} is, holds or lies inside the directory the pipeline was loaded "
                                f"from ({source}); save to a folder outside it")
    for name, folder in folders.items():
        if not folder.is_dir():
            raise DiffshipError(f"{ACTION}: the {name} files are gone from {folder}; nothing was written")
    check_output(output, overwrite=True, action=ACTION)

    with ExportDirectory(output, overwrite=True, action=ACTION) as target:
        staging = target.path
        for name, folder in folders.items():
            shutil.copytree(folder, staging / name)
        pipe.scheduler.save_config(staging / SCHEDULER)
        if pipe.configs.get(FEATURE_EXTRACTOR) is not None:
            (staging / FEATURE_EXTRACTOR).mkdir()
            _write_json(staging / FEATURE_EXTRACTOR / PREPROCESSOR_CONFIG, pipe.configs[FEATURE_EXTRACTOR])
        _write_json(staging / MODEL_INDEX, _model_index(pipe, staging))
        _write_json(staging / REPORT_FILE, _report(pipe, sources, staging))
        return target.commit()


def _model_index(pipe, staging: Path) -> dict:
    """The index the pipeline was loaded with, naming this pipeline's class and its current scheduler (as
    diffusers' save_pretrained writes them), with an entry for every component saved."""
    index = dict(pipe.configs["model_index"])
    index["_class_name"] = type(pipe).__name__
    index.setdefault("_diffusers_version", DIFFUSERS_REFERENCE_VERSION)
    index[SCHEDULER] = ["diffusers", type(pipe.scheduler).__name__]
    saved = {SOURCE_VAE if p.name in (VAE_ENCODER, VAE_DECODER) else p.name for p in staging.iterdir() if p.is_dir()}
    # ControlNets: diffusers' entry for as many as were saved (controlnet, controlnet_1, ...), none without them.
    count = sum(1 for name in saved if name == CONTROLNET or name.startswith(CONTROLNET + "_"))
    index.pop(CONTROLNET, None)
    if count:
        index[CONTROLNET] = ["diffusers", "ControlNetModel" if count == 1 else "MultiControlNetModel"]
    for name in sorted(saved):
        if not isinstance(index.get(name), list) or not index[name] or index[name][0] is None:
            entry = _entry_from_files(staging / name) or _INDEX_ENTRIES.get(name)
            if entry is not None:
                index[name] = entry
    return index


def _entry_from_files(folder: Path) -> list[str] | None:
    """A component's [library, class] as its own files name it: a diffusers config's `_class_name`, a transformers
    config's architecture, a tokenizer's `tokenizer_class` (Flux's text_encoder_2 is T5 where SD3's is CLIP)."""
    config, tokenizer = _json_or_empty(folder / "config.json"), _json_or_empty(folder / "tokenizer_config.json")
    architectures = config.get("architectures")
    for library, value in (("diffusers", config.get("_class_name")),
                           ("transformers", architectures[0] if isinstance(architectures, list) and architectures
                            else None),
                           ("transformers", tokenizer.get("tokenizer_class"))):
        if isinstance(value, str) and value:
            return [library, value]
    return None


def _json_or_empty(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _report(pipe, sources: set[Path], staging: Path) -> dict:
    """The source export's report (its validation figures and measured precisions still hold: the graphs are the
    same files), the save recorded, and the list of every file written."""
    report = {}
    for source in sorted(sources):
        path = source / REPORT_FILE
        if path.is_file():
            try:
                report = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                report = {}
            break
    if not isinstance(report, dict):
        report = {}
    report["exporter"] = EXPORTER
    report["saved"] = {
        "from": sorted(str(source) for source in sources),
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    report["files"] = sorted(set(list_files(staging)) | {REPORT_FILE})
    return report


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
