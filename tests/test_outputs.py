"""Output files: written whole through a rename, never over other content without force, and
left as they were when a write fails or the run is interrupted."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from symattn import OutputError
from symattn.cli import main
from symattn.export.files import write_atomic, write_files

NAMES = ("example.tex", "example.pdf", "example.json")


def previous_outputs(folder):
    """Fill ``folder`` with recognisable previous outputs and return their bytes by name."""
    folder.mkdir(parents=True, exist_ok=True)
    previous = {name: f"previous {name}\n".encode() for name in NAMES}
    for name, data in previous.items():
        (folder / name).write_bytes(data)
    return previous


def assert_unchanged(folder, previous):
    for name, data in previous.items():
        assert (folder / name).read_bytes() == data, f"{name} changed"
    assert sorted(path.name for path in folder.iterdir()) == sorted(previous)


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


class FailAfter:
    """Call ``real``, except that call number ``count + 1`` raises ``error`` instead.

    Only that one call fails, so the writer's own clean-up, which calls the same function,
    runs normally.
    """

    def __init__(self, real, count, error):
        self.real, self.count, self.error, self.calls = real, count, error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.count + 1:
            raise self.error
        return self.real(*args, **kwargs)


# Writing a group of files.

def test_write_files_writes_whole_group(tmp_path):
    files = {tmp_path / "a.txt": "alpha\n", tmp_path / "sub" / "b.bin": b"\x00\x01"}
    write_files(files)
    assert (tmp_path / "a.txt").read_text() == "alpha\n"
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.txt", "sub"]


def test_new_file_gets_default_permissions(tmp_path):
    # tempfile creates files with mode 0o600; outputs get what open() would give them.
    write_files({tmp_path / "a.txt": "alpha\n"})
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~current_umask()


def test_replaced_file_keeps_permissions(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old\n")
    path.chmod(0o640)
    write_files({path: "new\n"}, force=True)
    assert path.read_text() == "new\n"
    assert path.stat().st_mode & 0o777 == 0o640


def test_existing_file_needs_force(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old\n")
    with pytest.raises(OutputError, match=r"a.txt already exists with other content; pass --force"):
        write_files({path: "new\n", tmp_path / "b.txt": "other\n"})
    assert path.read_text() == "old\n"
    assert not (tmp_path / "b.txt").exists()


def test_identical_file_is_no_conflict(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("same\n")
    write_files({path: "same\n", tmp_path / "b.txt": "new\n"})
    assert path.read_text() == "same\n"
    assert (tmp_path / "b.txt").read_text() == "new\n"


def test_force_overwrites(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old\n")
    write_files({path: "new\n"}, force=True)
    assert path.read_text() == "new\n"


def test_failed_rename_restores_group(tmp_path, monkeypatch):
    previous = previous_outputs(tmp_path)
    new = {tmp_path / name: f"new {name}\n" for name in NAMES}
    new[tmp_path / "extra.txt"] = "a file that did not exist before\n"
    # The first two renames succeed, the third fails as on a full disk.
    monkeypatch.setattr(os, "replace", FailAfter(os.replace, 2, OSError(28, "No space left on device")))
    with pytest.raises(OutputError, match="No space left on device; the previous outputs are unchanged"):
        write_files(new, force=True)
    monkeypatch.undo()
    assert_unchanged(tmp_path, previous)


def test_failed_write_leaves_old_files(tmp_path, monkeypatch):
    previous = previous_outputs(tmp_path)
    new = {tmp_path / name: f"new {name}\n" for name in NAMES}
    # The first temporary file is written and flushed, the second flush fails.
    monkeypatch.setattr(os, "fsync", FailAfter(os.fsync, 1, OSError(5, "Input/output error")))
    with pytest.raises(OutputError, match="Input/output error"):
        write_files(new, force=True)
    monkeypatch.undo()
    assert_unchanged(tmp_path, previous)


def test_interrupt_between_renames_restores_group(tmp_path, monkeypatch):
    previous = previous_outputs(tmp_path)
    new = {tmp_path / name: f"new {name}\n" for name in NAMES}
    monkeypatch.setattr(os, "replace", FailAfter(os.replace, 1, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_files(new, force=True)
    monkeypatch.undo()
    assert_unchanged(tmp_path, previous)


def test_write_atomic_reports_os_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder\n")
    with pytest.raises(OutputError, match="writing .*file/sub failed: Not a directory"):
        write_atomic(blocker / "sub" / "a.txt", "data")


# The command line.

def test_cli_existing_output_needs_force(tmp_path, capsys):
    previous = previous_outputs(tmp_path)
    status = main(["example", "--out", str(tmp_path), "--no-pdf"])
    error = capsys.readouterr().err
    assert status == 3
    assert "example.tex" in error
    assert "already exist with other content; pass --force" in error
    assert_unchanged(tmp_path, previous)


def test_cli_rerun_with_same_bytes_succeeds(tmp_path):
    assert main(["example", "--out", str(tmp_path), "--no-pdf"]) == 0
    written = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert main(["example", "--out", str(tmp_path), "--no-pdf"]) == 0
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == written


def test_cli_failing_writer_keeps_outputs(tmp_path, monkeypatch, capsys):
    previous = previous_outputs(tmp_path)
    del previous["example.pdf"]
    (tmp_path / "example.pdf").unlink()
    monkeypatch.setattr(os, "replace", FailAfter(os.replace, 1, OSError(28, "No space left on device")))
    status = main(["example", "--out", str(tmp_path), "--no-pdf", "--force"])
    monkeypatch.undo()
    assert status == 3
    assert "No space left on device" in capsys.readouterr().err
    assert_unchanged(tmp_path, previous)


# SIGINT while pdflatex runs.

def child_processes(parent_pid):
    """Return the ids of the processes whose parent is ``parent_pid``, read from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name in /proc/PID/stat is in parentheses and may contain spaces.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent_pid:
            children.append(int(entry.name))
    return children


def command_line(pid):
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_for_pdflatex(process, timeout):
    """Return (pid, build folder) of the pdflatex child of ``process`` once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in child_processes(process.pid):
            if "pdflatex" in command_line(pid):
                try:
                    return pid, Path(os.readlink(f"/proc/{pid}/cwd"))
                except OSError:
                    continue  # it ended between the two reads
        if process.poll() is not None:
            pytest.fail(f"symattn ended (status {process.returncode}) before pdflatex was seen running")
        time.sleep(0.002)
    pytest.fail(f"pdflatex did not start within {timeout} s")


@pytest.mark.requires_pdflatex
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finding the pdflatex child reads /proc (Linux)")
def test_sigint_during_latex_keeps_outputs(tmp_path):
    out = tmp_path / "out"
    previous = previous_outputs(out)
    process = subprocess.Popen(
        [sys.executable, "-m", "symattn", "example", "--out", str(out), "--force"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pdflatex_pid, build_folder = wait_for_pdflatex(process, timeout=120)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 130
    assert "interrupted" in stderr
    assert "Traceback" not in stderr
    assert_unchanged(out, previous)
    assert build_folder.parent == out  # pdflatex ran inside the output folder
    assert not build_folder.exists()
    assert "pdflatex" not in command_line(pdflatex_pid)
