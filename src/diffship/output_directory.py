"""Where an export (or a pipeline's save_pretrained) writes, and how it keeps the user's files safe. Torch-free:
the exporters and the run-time pipelines both write through it.

- The export is built in a staging directory beside OUT (`.OUT.diffship-partial-XXXX/export`) and renamed to OUT
  at the end, so OUT is either absent, the previous export, or the new one: never half-written.
- Scratch files (traced graphs, temporary ONNX copies for OpenVINO, anything a library puts in `tempfile`) go
  under the same staging directory, not under /tmp, so one removal cleans everything.
- One export per OUT at a time: an advisory lock (`.OUT.diffship-lock`, flock) held for the whole export. The
  kernel drops it when the process dies, however it dies.
- SIGINT, SIGTERM and SIGHUP (Ctrl-C; what `timeout`, CI cancellation and `docker stop` send) become an
  exception, so the cleanup runs. SIGINT too, because a process started in the background by a non-interactive
  shell (`cmd &` in a script, CI runners) inherits SIGINT ignored and Python then installs no KeyboardInterrupt
  for it: a `kill -INT` would be ignored, and the export finish. After a `kill -9` nothing runs: the next export
  beside OUT finds the staging directories whose lock nobody holds and removes them.
  A process forked while the handlers are installed gets the caller's handlers back at once (os.register_at_fork):
  the children libraries fork mid-export (OpenVINO's telemetry sends from one, and terminates it when the send
  hangs, as it does offline) must die of that SIGTERM, not set a flag for Python code they never get back to: such
  a child lived on, orphaned, holding the caller's stdout (`diffship export ... | tee log` never ended).
- `overwrite` replaces only a previous diffship export: a directory whose export_report.json lists every file in
  it (`files`). Never the current directory or one above it, never the model being exported or a folder
  holding it, never a file, never a directory with files diffship did not write.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import tempfile
import threading
import uuid
from pathlib import Path

from diffship.checks import check_writable
from diffship.errors import DiffshipError
from diffship.layout import REPORT_FILE

EXPORTER = "diffship"  # export_report.json's "exporter": what marks a directory as a diffship export
_PARTIAL = ".diffship-partial-"  # .OUT.diffship-partial-XXXX: a staging directory
_OLD = ".diffship-old-"  # .OUT.diffship-old-XXXX: the previous export, between the two renames of a replace
_LOCK = ".diffship-lock"
_STAGING_MARKER = "diffship-staging"  # inside each staging directory: written by diffship, holds the pid
_SHOWN = 5  # foreign files named in a refusal


class Interrupted(KeyboardInterrupt):
    """A termination signal arrived during an export; raised so that the cleanup runs. A KeyboardInterrupt, as
    SIGINT's, so that nothing that catches Exception swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def list_files(directory: Path) -> list[str]:
    """Every file under `directory`, as sorted POSIX paths relative to it (symlinks count as files)."""
    files = []
    for root, dirs, names in os.walk(directory):
        rel = Path(root).relative_to(directory)
        files += [(rel / n).as_posix() for n in names]
        files += [(rel / d).as_posix() for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(files)


def _contains(parent: Path, child: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(output: Path, overwrite: bool, source: Path | None = None, action: str = "--overwrite") -> None:
    """Refuse, before any work, an output that the export would have to replace and must not. `action` names
    what replaces a previous export, in messages (`--overwrite`, `save_pretrained`)."""
    if _contains(output, Path.cwd().resolve()):
        raise DiffshipError(f"output {output} is the current directory or holds it; export to a new folder "
                            "instead (e.g. OUT/exported)")
    if source is not None and _contains(output, source.resolve()):
        raise DiffshipError(f"output {output} is (or holds) the model being exported, {source}; choose another "
                            "output folder")
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise DiffshipError(f"output {output} exists and is not a directory; give the path of a new folder")
    if not output.exists():
        check_writable(output, "output")
        return
    if not any(output.iterdir()):
        return  # an empty folder, made for the export
    if not overwrite:
        raise DiffshipError(f"output {output} exists; pass --overwrite (overwrite=True) to replace a previous "
                            "diffship export, or choose a new folder")
    check_previous_export(output, action)


def check_previous_export(output: Path, action: str = "--overwrite") -> None:
    """`output` is a diffship export holding nothing but what the export wrote; raise DiffshipError otherwise."""
    report_path = output / REPORT_FILE
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        report = None
    if not isinstance(report, dict) or report.get("exporter") != EXPORTER or not isinstance(report.get("files"), list):
        raise DiffshipError(
            f"{action} replaces only a previous diffship export, and {output} is not one (no {REPORT_FILE} "
            "listing its files); nothing was changed. Choose a new folder, or move it away yourself.")
    foreign = sorted(set(list_files(output)) - set(report["files"]))
    if foreign:
        shown = ", ".join(foreign[:_SHOWN]) + (f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else "")
        raise DiffshipError(
            f"{output} is a diffship export but also holds files the export did not write ({shown}); {action} "
            "would delete them, so nothing was changed. Move them out, or choose a new folder.")


class _Lock:
    """An exclusive, non-blocking flock on `.OUT.diffship-lock`, removed on release."""

    def __init__(self, output: Path):
        self.path = output.parent / f".{output.name}{_LOCK}"
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # The holder before us may have removed the file after we opened it: then our lock is on a file
            # nobody else will find; take the lock on the new file instead.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return True
            os.close(fd)

    def holder(self) -> str:
        with contextlib.suppress(OSError):
            pid = self.path.read_text().strip()
            if pid:
                return f" (pid {pid})"
        return ""

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = None


def remove_stale(parent: Path, holding: str | None = None) -> list[Path]:
    """Remove what killed exports left in `parent`: staging directories (and previous exports half-way through a
    replace) of every OUT whose lock nobody holds. `holding` is the OUT name whose lock the caller holds."""
    removed = []
    if not parent.is_dir():
        return removed
    by_name: dict[str, list[Path]] = {}
    for entry in parent.iterdir():
        for infix in (_PARTIAL, _OLD):
            if entry.name.startswith(".") and infix in entry.name and entry.is_dir() and not entry.is_symlink():
                by_name.setdefault(entry.name[1:entry.name.rindex(infix)], []).append(entry)
    for name, entries in by_name.items():
        lock = None
        if name != holding:
            lock = _Lock(parent / name)
            if not lock.try_acquire():
                continue  # an export to that OUT is running: its staging directory is live
        try:
            for entry in entries:
                if _written_by_diffship(entry):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
        finally:
            if lock is not None:
                lock.release()
    return removed


def _written_by_diffship(entry: Path) -> bool:
    if _PARTIAL in entry.name:
        return (entry / _STAGING_MARKER).is_file()
    with contextlib.suppress(DiffshipError):
        check_previous_export(entry)
        return True
    return False


class ExportDirectory:
    """The staging area of one export to `output`: `with ExportDirectory(out, overwrite) as target:` locks OUT,
    removes stale leftovers, builds in `target.path`, and `target.commit()` puts it in place. Leaving the block
    without a commit (an error, a signal) removes everything the export wrote."""

    def __init__(self, output: Path, overwrite: bool, action: str = "--overwrite"):
        self.output = output
        self.overwrite = overwrite
        self.action = action  # what replaces a previous export, for messages
        self._lock = _Lock(output)
        self._staging: Path | None = None
        self._saved_tempdir: str | None = None
        self._tempdir_set = False
        self._saved_handlers: dict[int, object] = {}

    @property
    def path(self) -> Path:
        """Where the export is written: renamed to OUT on commit."""
        return self._staging / "export"

    def __enter__(self) -> "ExportDirectory":
        self.output.parent.mkdir(parents=True, exist_ok=True)
        if not self._lock.try_acquire():
            raise DiffshipError(f"another diffship export is writing {self.output}{self._lock.holder()}; wait for "
                                "it to finish, or export to another folder")
        try:
            remove_stale(self.output.parent, holding=self.output.name)
            self._install_signal_handlers()
            self._staging = Path(tempfile.mkdtemp(prefix=f".{self.output.name}{_PARTIAL}", dir=self.output.parent))
            (self._staging / _STAGING_MARKER).write_text(f"{os.getpid()}\n")
            self.path.mkdir()
            scratch = self._staging / "scratch"
            scratch.mkdir()
            # Every temporary file of this process (ours, onnx's, OpenVINO's, NNCF's) goes under the staging
            # directory for the duration, so that cleanup, or the next export after a kill -9, removes it.
            self._saved_tempdir, tempfile.tempdir, self._tempdir_set = tempfile.tempdir, str(scratch), True
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def commit(self) -> Path:
        """Put the finished export at OUT (replacing a previous export, checked again now) and return OUT."""
        check_output(self.output, self.overwrite, action=self.action)  # OUT may have changed during a long export
        if self.output.exists() and any(self.output.iterdir()):
            old = self.output.parent / f".{self.output.name}{_OLD}{uuid.uuid4().hex[:8]}"
            self.output.rename(old)
            try:
                self.path.rename(self.output)
            except BaseException:
                old.rename(self.output)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.path.rename(self.output)  # over an empty folder, or a new name
        return self.output

    def __exit__(self, *exc) -> None:
        if self._tempdir_set:
            tempfile.tempdir, self._tempdir_set = self._saved_tempdir, False
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        self._restore_signal_handlers()
        self._lock.release()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; there the caller's handlers stay

        def interrupt(signum, frame):
            raise Interrupted(signum)

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._saved_handlers[signum] = signal.signal(signum, interrupt)
        _HANDLERS_IN_FORKED_CHILDREN.append(self._saved_handlers)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._saved_handlers.items():
            signal.signal(signum, handler)
        _HANDLERS_IN_FORKED_CHILDREN[:] = [h for h in _HANDLERS_IN_FORKED_CHILDREN if h is not self._saved_handlers]
        self._saved_handlers = {}


# The caller's signal handlers, saved by each ExportDirectory whose own are installed (see the module docstring):
# what a child forked meanwhile gets back.
_HANDLERS_IN_FORKED_CHILDREN: list[dict] = []


def _caller_handlers_in_child() -> None:
    if _HANDLERS_IN_FORKED_CHILDREN:
        for signum, handler in _HANDLERS_IN_FORKED_CHILDREN[0].items():  # the outermost export's: the caller's
            with contextlib.suppress(ValueError, TypeError, OSError):
                signal.signal(signum, handler)
        _HANDLERS_IN_FORKED_CHILDREN.clear()


os.register_at_fork(after_in_child=_caller_handlers_in_child)
