"""The on-disk cache of compiled graphs, so that a second load of an export is a fraction of the first.

Loading a full-size UNet spends most of its time compiling, not reading: ONNX Runtime runs its graph optimizations
(fusions, the NCHWc layout for this CPU, constant folding), OpenVINO compiles for the CPU. Both results can be saved:
ONNX Runtime's optimized graph (written next to the cache key, loaded next time with optimizations off) and
OpenVINO's compiled blob (its own CACHE_DIR). Both are specific to the machine and the runtime version, which the
keys hold; the cache lives outside the export (`~/.cache/diffship`, or $DIFFSHIP_CACHE_DIR, or $XDG_CACHE_HOME),
so an export directory stays read-only at run time. `cache_dir=False` turns it off.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
from pathlib import Path

from diffship.layout import ONNX_DATA

CACHE_ENV = "DIFFSHIP_CACHE_DIR"


def cache_root(cache_dir=None) -> Path | None:
    """Where compiled graphs are cached: `cache_dir` if given, None if it is False (no cache), else the default."""
    if cache_dir is False:
        return None
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffship"


def _cpu_model() -> str:
    """The CPU's model name and ISA flags: a graph optimized for AMX is not one for AVX2."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line and line.split(":")[0].strip() in (
                "model name", "flags"))
        return "|".join(v.strip() for v in fields.values())
    except OSError:
        return platform.processor() or platform.machine()


def graph_key(model_file: Path, *parts: str) -> str:
    """A key for `model_file` as it is now: its path, and the size and modification time of it and its external
    data files (a re-export changes them; reading gigabytes of weights to hash them would cost what the cache
    saves), with `parts` (runtime version, options) and the CPU. The export's ONNX weight file counts for every
    graph beside it: the CPU graph (ORT_CPU_MODEL) reads model.onnx's."""
    model_file = Path(model_file).resolve()
    weights = (model_file.name + "_data", ONNX_DATA)
    files = [model_file] + sorted(p for p in model_file.parent.iterdir()
                                  if p.is_file() and p.name.startswith(weights)
                                  or p.suffix == ".bin" and p.stem == model_file.stem)
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    for part in (*parts, _cpu_model()):
        digest.update(f"{part}\0".encode())
    return digest.hexdigest()[:32]


def remove_entry(path: Path) -> None:
    """Delete one cache entry (diffship wrote it; a broken or partial one is rebuilt)."""
    shutil.rmtree(path, ignore_errors=True)
