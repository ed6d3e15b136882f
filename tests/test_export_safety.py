"""The user's files are safe from `export`: only a previous diffship export is ever replaced; never a folder with
files diffship did not write, the model being exported, or the current directory; two exports to one folder
cannot both succeed; an interrupted export leaves nothing behind, and the next export removes what a kill -9 left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from diffship.errors import DiffshipError, ValidationError
from diffship.exporters import export
from diffship.output_directory import ExportDirectory, remove_stale


@pytest.fixture(scope="module")
def previous_export(tiny_model_dirs, tmp_path_factory):
    """A diffship export (ONNX only) to copy from, so that each test starts from a pristine one."""
    return export(tiny_model_dirs("sd1"), tmp_path_factory.mktemp("previous") / "export", "onnx", progress=False)


def _copy(export_dir: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(export_dir, to, symlinks=True)
    return to


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_report_lists_every_file_written(previous_export):
    report = json.loads((previous_export / "export_report.json").read_text())
    assert report["exporter"] == "diffship"
    written = sorted(str(p.relative_to(previous_export).as_posix()) for p in previous_export.rglob("*") if p.is_file())
    assert report["files"] == written


def test_overwrite_refuses_a_folder_diffship_did_not_write(tiny_model_dirs, tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "notes.txt").write_text("keep")
    with pytest.raises(DiffshipError, match="replaces only a previous diffship export, and .*proj is not one"):
        export(tiny_model_dirs("sd1"), project, "onnx", overwrite=True, progress=False)
    assert _tree(project) == {"notes.txt": b"keep"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]  # no lock, no staging left


def test_overwrite_refuses_a_previous_export_holding_user_files(previous_export, tiny_model_dirs, tmp_path):
    out = _copy(previous_export, tmp_path / "out")
    (out / "unet" / "my-notes.md").write_text("mine")
    before = _tree(out)
    with pytest.raises(DiffshipError, match=r"also holds files the export did not write \(unet/my-notes.md\)"):
        export(tiny_model_dirs("sd1"), out, "onnx", overwrite=True, progress=False)
    assert _tree(out) == before


def test_overwrite_replaces_a_previous_export(previous_export, tiny_model_dirs, tmp_path):
    out = _copy(previous_export, tmp_path / "out")
    export(tiny_model_dirs("sd1"), out, "openvino", overwrite=True, progress=False)
    report = json.loads((out / "export_report.json").read_text())
    assert report["formats"] == ["openvino"] and not (out / "unet" / "model.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_existing_folder_needs_overwrite_but_an_empty_one_does_not(previous_export, tiny_model_dirs, tmp_path):
    out = _copy(previous_export, tmp_path / "out")
    with pytest.raises(DiffshipError, match="exists; pass --overwrite"):
        export(tiny_model_dirs("sd1"), out, "onnx", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(tiny_model_dirs("sd1"), empty, "onnx", progress=False) == empty.resolve()
    assert (empty / "unet" / "model.onnx").is_file()


def test_never_the_source_its_parent_or_the_current_directory(tiny_model_dirs, tmp_path, monkeypatch):
    import shutil

    source = shutil.copytree(tiny_model_dirs("sd1"), tmp_path / "models" / "sd1")
    before = _tree(source)
    with pytest.raises(DiffshipError, match="is \\(or holds\\) the model being exported"):
        export(source, source, "onnx", overwrite=True, progress=False)
    with pytest.raises(DiffshipError, match="is \\(or holds\\) the model being exported"):
        export(source, source.parent, "onnx", overwrite=True, progress=False)
    monkeypatch.chdir(tmp_path / "models")
    with pytest.raises(DiffshipError, match="is the current directory or holds it"):
        export(source, ".", "onnx", overwrite=True, progress=False)
    with pytest.raises(DiffshipError, match="is the current directory or holds it"):
        export(source, "..", "onnx", overwrite=True, progress=False)
    assert _tree(source) == before
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["sd1"]


def test_a_file_is_never_an_output(tiny_model_dirs, tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"user bytes")
    with pytest.raises(DiffshipError, match="exists and is not a directory"):
        export(tiny_model_dirs("sd1"), target, "onnx", overwrite=True, progress=False)
    assert target.read_bytes() == b"user bytes"


def test_a_second_export_to_the_same_folder_is_refused_while_one_runs(tiny_model_dirs, tmp_path):
    out = tmp_path / "out"
    with ExportDirectory(out.resolve(), overwrite=False):  # what a running export holds
        with pytest.raises(DiffshipError, match="another diffship export is writing .*out \\(pid \\d+\\)"):
            export(tiny_model_dirs("sd1"), out, "onnx", progress=False)
    assert not out.exists()


def test_a_failed_export_leaves_nothing_and_restores_tempdir(tiny_model_dirs, tmp_path):
    import tempfile

    before = tempfile.gettempdir()
    with pytest.raises(DiffshipError):
        export(tiny_model_dirs("sd1"), tmp_path / "out", "onnx", atol={"vae_decoder": 1e-12}, progress=False)
    assert list(tmp_path.iterdir()) == [] and tempfile.gettempdir() == before


def _block_forever():
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()  # never released: only a signal ends this process


def test_a_child_forked_mid_export_dies_of_sigterm(tmp_path):
    """A library's child process forked during an export (OpenVINO's telemetry sends from one, and terminates it
    when the send hangs) dies of SIGTERM as outside an export: the export's handler, which only raises in Python
    code, is not inherited (otherwise a child stuck in C code lives on, holding the caller's stdout)."""
    import multiprocessing

    from diffship.output_directory import ExportDirectory

    with ExportDirectory(tmp_path / "out", overwrite=False):
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the export's own handler is installed
        child = multiprocessing.get_context("fork").Process(target=_block_forever, daemon=True)
        child.start()
        time.sleep(0.5)
        child.terminate()
        child.join(10)
        assert child.exitcode == -signal.SIGTERM, f"the child ended with {child.exitcode} (alive: {child.is_alive()})"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_graph_baked_at_one_latent_size_fails_validation_naming_component_and_size(tiny_model_dirs, tmp_path,
                                                                                       monkeypatch):
    """Trace the UNet at a latent its up factor divides (what diffship did before, and Optimum does): the graph
    cannot run the other sizes, and the export must refuse it."""
    import dataclasses

    import torch

    import diffship.exporters.component_export as component_export

    real_trace = component_export.trace_onnx

    def trace_at_a_multiple(spec, opset, *args):
        if spec.name == "unet":
            batch, channels = spec.example_inputs["sample"].shape[:2]
            spec = dataclasses.replace(spec, example_inputs={**spec.example_inputs,
                                                             "sample": torch.randn(batch, channels, 8, 8)})
        return real_trace(spec, opset, *args)

    monkeypatch.setattr(component_export, "trace_onnx", trace_at_a_multiple)
    with pytest.raises(ValidationError, match=r"^unet on onnxruntime cannot run at sample \[2, 4, 9, 9\].*baked in"):
        export(tiny_model_dirs("sd1"), tmp_path / "out", "onnx", progress=False)
    assert list(tmp_path.iterdir()) == []


# ---- other processes: concurrent exports, signals -----------------------------------------------------------------

def _start_export(model: Path, out: Path, tmpdir: Path, ignore_sigint: bool = False) -> subprocess.Popen:
    """`diffship export` in a child process. `ignore_sigint`: started with SIGINT ignored, as a non-interactive
    shell starts background jobs (`cmd &` in a script, CI runners): Python then installs no KeyboardInterrupt."""
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1"}
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen([sys.executable, "-m", "diffship", "export", str(model), str(out), "--backend",
                             "onnx,openvino"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ignore)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the export ended first (exit {proc.returncode}): {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "timed out waiting for the export to get going"
        time.sleep(0.05)


def _staging_dirs(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".diffship-partial-" in p.name]


def _mid_export(parent: Path):
    """True once a staging directory holds a traced graph: the export is well under way."""
    return lambda: any((s / "export" / "text_encoder").is_dir() for s in _staging_dirs(parent))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_export_leaves_nothing(tiny_model_dirs, tmp_path, signum):
    parent, tmpdir = tmp_path / "exports", tmp_path / "tmp"
    parent.mkdir()
    tmpdir.mkdir()
    # SIGINT with SIGINT ignored at start: the export must still honour it (see output_directory.py).
    proc = _start_export(tiny_model_dirs("sd1"), parent / "out", tmpdir, ignore_sigint=signum == signal.SIGINT)
    _wait_for(_mid_export(parent), proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert list(parent.iterdir()) == []  # no output, staging directory, scratch or lock file
    # Nothing under the temporary directory either, but for `.ses`: ONNX Runtime's native code keeps a 51-byte
    # session id there (a number and a uuid), shared by every process that loads it, whatever the export does.
    assert [p.name for p in tmpdir.iterdir() if p.name != ".ses"] == []


def test_concurrent_exports_to_one_folder_cannot_both_succeed(tiny_model_dirs, tmp_path):
    parent = tmp_path / "exports"
    parent.mkdir()
    first = _start_export(tiny_model_dirs("sd1"), parent / "out", tmp_path)
    _wait_for(lambda: bool(_staging_dirs(parent)), first)
    second = _start_export(tiny_model_dirs("sd1"), parent / "out", tmp_path)
    _, second_err = second.communicate(timeout=300)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode != 0 and "another diffship export is writing" in second_err
    assert sorted(p.name for p in parent.iterdir()) == ["out"]
    assert json.loads((parent / "out" / "export_report.json").read_text())["formats"] == ["onnx", "openvino"]


def test_the_next_export_removes_what_a_kill_9_left(tiny_model_dirs, tmp_path):
    parent = tmp_path / "exports"
    parent.mkdir()
    proc = _start_export(tiny_model_dirs("sd1"), parent / "out", tmp_path)
    _wait_for(_mid_export(parent), proc)
    proc.kill()
    proc.communicate(timeout=60)
    left = _staging_dirs(parent)
    assert left and (parent / ".out.diffship-lock").exists()  # nothing ran: the leftovers are there
    # A user folder that merely looks like a staging directory is not diffship's, and stays.
    lookalike = parent / ".out.diffship-partial-mine"
    lookalike.mkdir()
    (lookalike / "data.txt").write_text("mine")

    export(tiny_model_dirs("sd1"), parent / "out", "onnx", progress=False)
    assert sorted(p.name for p in parent.iterdir()) == [".out.diffship-partial-mine", "out"]
    assert (lookalike / "data.txt").read_text() == "mine"


def test_stale_staging_of_a_running_export_is_left_alone(tmp_path):
    """remove_stale removes another folder's leftovers only when no export holds that folder's lock."""
    with ExportDirectory((tmp_path / "running").resolve(), overwrite=False) as running:
        (running.path / "unet").mkdir()
        assert remove_stale(tmp_path) == []
        assert running.path.is_dir()
    assert list(tmp_path.iterdir()) == []
