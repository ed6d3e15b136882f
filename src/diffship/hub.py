"""Hub repo ids: an exported pipeline (or, for export, a diffusers one) fetched into huggingface_hub's cache.

A model string names a local directory when one exists there; otherwise a hub repo id (`org/name`), resolved with
huggingface_hub: its documented `snapshot_download` downloads into the hub cache (`cache_dir`, `HF_HUB_CACHE`) and,
with `local_files_only=True` or `HF_HUB_OFFLINE=1`, returns what is cached without the network. An exported repo
is fetched for one backend only: the repo's file listing chooses it (runtimes.choose_backend_from, as a local
directory's files do) before any graph is downloaded. Imports no torch: the runtime pipelines load through here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from diffship.errors import HubError, NotAPipelineError
from diffship.layout import (
    GRAPH_FILES,
    MODEL_INDEX,
    ONNX_DATA,
    ONNX_MODEL,
    OPENVINO_MODEL,
    OPENVINO_WEIGHTS,
    REPORT_FILE,
    TENSORRT_ENGINE,
    TENSORRT_ENGINE_INFO,
)
from diffship.runtimes import BACKENDS, choose_backend_from

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# Each graph format's files: a backend's download takes its own format's and leaves the others'.
FORMAT_FILES = {ONNX_MODEL: (ONNX_MODEL, ONNX_DATA), OPENVINO_MODEL: (OPENVINO_MODEL, OPENVINO_WEIGHTS)}
# Weights no runtime pipeline reads (PyTorch, Flax, TensorFlow, other graph formats outside a graph's own folder).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".onnx_data", ".xml")


@dataclass(frozen=True)
class HubOptions:
    """Where and how a hub repo id is resolved; the same names as diffusers' from_pretrained and export's flags."""

    revision: str | None = None
    cache_dir: str | Path | None = None  # the hub cache (huggingface_hub's HF_HUB_CACHE when None)
    token: str | bool | None = None
    local_files_only: bool = False

    @property
    def offline(self) -> bool:
        from huggingface_hub import is_offline_mode

        return self.local_files_only or is_offline_mode()

    def download_kwargs(self) -> dict:
        return {"revision": self.revision, "cache_dir": self.cache_dir, "token": self.token}


@dataclass(frozen=True)
class Snapshot:
    """A resolved hub repo: its folder in the hub cache and the commit that folder holds."""

    path: Path
    repo_id: str
    revision: str | None
    commit: str


def is_local(model) -> bool:
    return Path(model).expanduser().exists()


def check_hub_id(model) -> str:
    """`model`, which names no existing path, as a hub repo id; a HubError when it cannot be one."""
    text = str(model)
    if not HUB_ID.match(text):
        raise HubError(f"{text}: no such directory, and not a hub repo id like 'org/name'; give an existing "
                       "directory or a repo id")
    return text


def not_found(model, error: Exception) -> HubError:
    """The one-line error for a model string that is neither an existing directory nor a repo the Hub (or its
    cache) serves: both answers, and what to do."""
    answer = " ".join(str(error).split()) or type(error).__name__
    return HubError(f"{model}: no such directory, and the Hugging Face Hub answered for repo {model!r}: {answer} "
                    "(give an existing directory, or check the repo id, revision, token and network; offline, "
                    "the repo must be in the hub cache)")


def exported_pipeline(model, backend: str | None = None, options: HubOptions = HubOptions()) -> tuple[Path, str | None]:
    """An exported pipeline's local directory, and the backend to run it on. A local path is returned as it is
    (and `backend` as given); a hub repo id is fetched into the hub cache with only the files `backend` reads
    (None: the backend the repo's graphs are for, chosen from its file listing; onnxruntime where it holds both)."""
    if is_local(model):
        return Path(model).expanduser(), backend
    repo_id = check_hub_id(model)
    files, options = repo_files(repo_id, options)
    if MODEL_INDEX not in files:
        raise NotAPipelineError(f"hub repo {repo_id!r} is not an exported pipeline: it has no {MODEL_INDEX}")
    held = {}
    for f in files:
        parts = PurePosixPath(f).parts
        if len(parts) == 2 and parts[1] in GRAPH_FILES:
            held.setdefault(f"{repo_id}/{parts[0]}", set()).add(parts[1])
    if not held:
        raise NotAPipelineError(f"hub repo {repo_id!r} holds no exported graph (model.onnx or openvino_model.xml in "
                                "component folders); export it with `diffship export` first")
    backend = choose_backend_from(held, backend)
    graph_folders = {folder.rsplit("/", 1)[1]: graphs for folder, graphs in held.items()}
    wanted = [f for f in files if _needed(f, graph_folders, backend)]
    return download(repo_id, wanted, options).path, backend


def _needed(file: str, graph_folders: dict[str, set[str]], backend: str) -> bool:
    """Whether `backend` reads `file` of an exported repo: model_index.json and the report at the top, each graph
    folder's graph for this backend (its own format where present, else the one it also runs) with the folder's
    other files, and the plain folders' (tokenizer, scheduler, ...) files other than weights."""
    parts = PurePosixPath(file).parts
    if len(parts) == 1:
        return file in (MODEL_INDEX, REPORT_FILE)
    folder, name = parts[0], parts[-1]
    if folder not in graph_folders:
        return not name.endswith(_WEIGHT_SUFFIXES)
    if name in (TENSORRT_ENGINE, TENSORRT_ENGINE_INFO):  # gigabytes for one GPU model: the tensorrt backend's only
        return backend == "tensorrt"
    graph = next(g for g in BACKENDS[backend].reads if g in graph_folders[folder])
    other_formats = {f for g, files in FORMAT_FILES.items() if g != graph for f in files}
    return len(parts) == 2 and name not in other_formats


def repo_files(repo_id: str, options: HubOptions) -> tuple[list[str], HubOptions]:
    """The repo's file listing at the revision: from the Hub, or offline (or when the Hub cannot be reached) the
    files of the cached snapshot, what can be loaded without the network; and the options to download with (local
    files only once the Hub did not answer)."""
    online_error = None
    if not options.offline:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RevisionNotFoundError

        try:
            return HfApi(token=options.token).list_repo_files(repo_id, revision=options.revision), options
        except RevisionNotFoundError as e:
            raise not_found(repo_id, e) from None
        except Exception as e:  # unreachable, not found, gated: the cache may still hold it, as in snapshot_download
            online_error = e
    try:
        folder = _snapshot_download(repo_id, options, local_files_only=True, allow_patterns=[MODEL_INDEX])
    except Exception as e:
        raise not_found(repo_id, online_error or e) from None
    files = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    return files, replace(options, local_files_only=True)


def download(repo_id: str, allow_patterns: list[str] | None, options: HubOptions,
             ignore_patterns: list[str] | None = None) -> Snapshot:
    """snapshot_download of the files `allow_patterns` names (offline: the cached snapshot, checked to hold them)."""
    try:
        folder = _snapshot_download(repo_id, options, local_files_only=options.local_files_only,
                                    allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
    except Exception as e:
        raise not_found(repo_id, e) from None
    return Snapshot(folder, repo_id, options.revision, folder.name)


def _snapshot_download(repo_id: str, options: HubOptions, **kwargs) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, **options.download_kwargs(), **kwargs))

