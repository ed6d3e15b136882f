"""Giving memory back to the system when an export drops a copy of the weights.

An export holds a full-size UNet's weights several times over its life (PyTorch's, the traced graph's, each
runtime's while it validates), but it need hold only one or two at a time. Dropping the Python object is not
enough: the weights are freed as thousands of 1-30 MB buffers, and glibc keeps freed buffers of that size in its
heap (past the first free of a large block it raises its mmap threshold to 32 MB), so the process's resident size
does not come down and the next copy comes on top. `release()` collects and asks glibc to return its free heap
pages (malloc_trim), where the C library is glibc; elsewhere it only collects. `mapped_weights_handed_back` does the
same for weight files a runtime maps: the pages it has read leave the process (read from the file again if needed).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import threading
from pathlib import Path


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_TRIM = _malloc_trim()


def release() -> None:
    """Collect garbage and return the freed heap to the system."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)


@contextlib.contextmanager
def collect_only_new_objects():
    """Within the block, `release()` collects only the objects made inside it: those alive before (the modules
    torch, diffusers and transformers import, the caller's own) are set aside (gc.freeze) and given back to the
    collector after. A collection over all of them takes 0.2 s, and an export releases about 30 times."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# madvise(2)'s MADV_PAGEOUT (Linux 5.4+): reclaim the range's pages; a clean file page leaves the process and comes
# back from the file on the next access, unchanged. Not MADV_DONTNEED: the mappings are read from /proc/self/maps
# and advised a moment later, and should OpenVINO unmap a file in between and an allocation reuse the addresses,
# DONTNEED would zero that anonymous memory, where PAGEOUT can only swap it out (or, without swap, leave it). On an
# older kernel the call fails (EINVAL) and nothing is handed back.
_MADV_PAGEOUT = 21


def _madvise():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


_MADVISE = _madvise()


def read_only_mappings(path) -> list[tuple[int, int]]:
    """(start, end) of this process's read-only mappings of `path` (Linux's /proc/self/maps; [] elsewhere)."""
    target = str(Path(path).resolve())
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == target and "w" not in fields[1]:
                    start, end = fields[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        pass
    return ranges


def hand_back_pages(path) -> bool:
    """Drop this process's pages of its read-only mappings of `path` (reclaimed; the next access reads the file
    again). Read-only mappings only: a page that was never writable holds the file's bytes, so the next read finds
    them again. False where the kernel refused (no MADV_PAGEOUT before Linux 5.4) or there is no madvise."""
    if _MADVISE is None:
        return False
    return all([_MADVISE(start, end - start, _MADV_PAGEOUT) == 0 for start, end in read_only_mappings(path)])


@contextlib.contextmanager
def mapped_weights_handed_back(*paths, interval: float = 0.2):
    """While the block runs, the pages of `paths` (weight files a runtime maps read-only: OpenVINO's
    openvino_model.bin, its ONNX frontend's model.onnx_data) are handed back every `interval` seconds.

    OpenVINO's CPU plugin repacks every weight of an fp32 graph into its own layout while compiling and at the first
    inference, and keeps the file mapped: the pages it has read stay in the process's resident memory beside the
    copies, so validating a full-size UNet held its weights twice (3.4 GB mapped + 3.4 GB repacked). Handed back, a
    page it reads again is read from the file, unchanged: the graph computes the same, from the same bytes."""
    if _MADVISE is None or not Path("/proc/self/maps").exists():
        yield
        return
    stop = threading.Event()

    def hand_back():
        while not stop.wait(interval):
            for path in paths:
                hand_back_pages(path)

    thread = threading.Thread(target=hand_back, name="diffship-hand-back-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for path in paths:
            hand_back_pages(path)
