"""A hub cache laid out from local files exactly as huggingface_hub lays out a download, for tests without the
network. huggingface_hub has no API that writes its cache from local files, so this writes what snapshot_download
writes (huggingface_hub 2.x, docs "Understand caching"):

    <cache>/models--<org>--<name>/
        blobs/<git sha1 of a regular file | sha256 of an LFS file>
        refs/<branch>                       the commit hash, no newline
        snapshots/<commit>/<path>           a relative symlink to ../../blobs/<hash>
        trees/<commit>.json                 the repo's file listing at that commit (huggingface_hub >= 2.3)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# Files git stores with LFS in a model repo (the Hub's default .gitattributes): the weights and graphs.
LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".onnx_data", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".npz")


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_commit(cache_dir: Path, repo_id: str, source: Path, branch: str | None = "main",
               skip=lambda path: False) -> str:
    """Store `source`'s files (but those `skip(relative path)` says) as one commit of `repo_id` in the hub cache at
    `cache_dir`; point refs/`branch` at it. Returns the commit hash."""
    storage = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    files = {p.relative_to(source).as_posix(): p for p in sorted(Path(source).rglob("*"))
             if p.is_file() and not skip(p.relative_to(source).as_posix())}
    listing = {}
    for relative, path in files.items():
        data = path.read_bytes()
        entry = {"size": len(data), "blob_id": _git_blob_sha1(data)}
        if relative.endswith(LFS_SUFFIXES):
            entry.update(lfs_sha256=hashlib.sha256(data).hexdigest(), lfs_size=len(data))
        listing[relative] = entry
    commit = hashlib.sha1(json.dumps([repo_id, branch, listing], sort_keys=True).encode()).hexdigest()
    for relative, path in files.items():
        entry = listing[relative]
        blob = storage / "blobs" / entry.get("lfs_sha256", entry["blob_id"])
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(path.read_bytes())
        link = storage / "snapshots" / commit / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    trees = storage / "trees"
    trees.mkdir(parents=True, exist_ok=True)
    (trees / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}, indent=1))
    if branch is not None:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / branch).write_text(commit)
    return commit
