"""Progress reports: the callback protocol, the terminal bar, and what each command prints at the end."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from symattn import AttentionSpec
from symattn.cli import COMMAND_MODULES
from symattn.cli.terminal import ERASE_LINE, ProgressBar, progress_bar
from symattn.problem import Problem
from symattn.progress import Stopwatch, report, track
from symattn.verify import verify

REPOSITORY = Path(__file__).resolve().parent.parent
GRADIENT_CASE = REPOSITORY / "derivations" / "gradient" / "gradient.toml"
CAUSAL_CASE = REPOSITORY / "derivations" / "causal" / "causal.toml"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, task: str, done: int, total: int) -> None:
        self.calls.append((task, done, total))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def small_problem() -> Problem:
    return Problem.from_arrays(spec=AttentionSpec(), direct=True, Q=[[1, 0]], K=[[1, 0], [0, 1]], V=[[2], [4]])


# The protocol.


def test_report_skips_none():
    report(None, "task", 1, 2)  # no callback, nothing to call
    recorder = Recorder()
    report(recorder, "task", 1, 2)
    assert recorder.calls == [("task", 1, 2)]


def test_track_reports_each_item():
    recorder = Recorder()
    assert list(track(recorder, "items", "abc")) == ["a", "b", "c"]
    assert recorder.calls == [("items", 0, 3), ("items", 1, 3), ("items", 2, 3), ("items", 3, 3)]


def test_track_empty_reports_nothing():
    recorder = Recorder()
    assert list(track(recorder, "items", [])) == []
    assert recorder.calls == []


def test_stopwatch_reports_no_finish_on_error():
    recorder = Recorder()
    with pytest.raises(ValueError):
        with Stopwatch(recorder, "pdflatex"):
            raise ValueError("failed")
    assert recorder.calls == [("pdflatex", 0, 0)]


def test_verify_batch_reports_references():
    recorder = Recorder()
    problems = [small_problem()] * 3
    outputs = np.full((3, 1, 1), 2.6604769013466862)
    assert verify(problems, outputs, progress=recorder).passed
    assert recorder.calls == [("certified references", done, 3) for done in range(4)]


# The terminal bar.


def test_bar_line_known_total():
    clock = Clock()
    bar = ProgressBar(io.StringIO(), clock=clock, refresh_seconds=60)
    bar("references", 1, 4)
    clock.now += 2.0
    assert bar.line() == "references [######------------------] 1/4 2.0 s"
    bar.close()


def test_bar_line_unknown_total_moves():
    clock = Clock()
    bar = ProgressBar(io.StringIO(), clock=clock, refresh_seconds=60)
    bar("pdflatex", 0, 0)
    first = bar.line()
    bar.frame += 3
    assert first == "pdflatex [====                    ] 0.0 s"
    assert bar.line() == "pdflatex [   ====                 ] 0.0 s"
    bar.close()


def test_bar_erases_line_when_task_finishes():
    stream = io.StringIO()
    bar = ProgressBar(stream, clock=Clock(), refresh_seconds=60)
    bar("references", 0, 2)
    bar("references", 2, 2)
    bar.close()
    assert stream.getvalue() == ERASE_LINE + "references [------------------------] 0/2 0.0 s" + ERASE_LINE


def test_bar_redraws_while_task_runs():
    stream = FakeTerminal()
    bar = ProgressBar(stream, refresh_seconds=0.01)
    bar("pdflatex", 0, 0)
    deadline = time.monotonic() + 5
    while stream.getvalue().count(ERASE_LINE) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    bar.close()
    assert stream.getvalue().count("pdflatex [") >= 3


def test_progress_bar_none_without_terminal():
    with progress_bar(io.StringIO()) as progress:
        assert progress is None


def test_progress_bar_on_terminal():
    stream = FakeTerminal()
    with progress_bar(stream) as progress:
        progress("task", 0, 1)
    assert "task [" in stream.getvalue()
    assert stream.getvalue().endswith(ERASE_LINE)


# The command line on a terminal and on a pipe.


def write_case(folder: Path) -> Path:
    path = folder / "case.npz"
    np.savez(path, spec=json.dumps({"heads": 1}), Q=np.array([[1.0, 0.0]]), K=np.array([[1.0, 0.0], [0.0, 1.0]]),
             V=np.array([[2.0], [4.0]]), output=np.array([[2.6604769013466862]]))
    return path


def run_with_terminal_stderr(arguments: list[str], cwd: Path) -> tuple[int, str, str]:
    """Run symattn with stderr on a pseudo-terminal; return the exit status, stdout and the terminal's text."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "symattn", *arguments],
        cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal,
    )
    os.close(terminal)
    seen = bytearray()
    while True:
        ready, _, _ = select.select([controller], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif process.poll() is not None:
            break
    os.close(controller)
    output = process.stdout.read().decode()
    process.stdout.close()
    return process.wait(timeout=60), output, seen.decode(errors="replace")


def test_verify_draws_bar_on_terminal(tmp_path):
    case = write_case(tmp_path)
    status, output, terminal = run_with_terminal_stderr(["verify", str(case)], tmp_path)
    assert status == 0
    assert "verdict: PASS" in output
    assert "certified references [" in terminal
    assert "\x1b[K" in terminal


def test_verify_draws_nothing_on_pipe(tmp_path):
    case = write_case(tmp_path)
    result = subprocess.run([sys.executable, "-m", "symattn", "verify", str(case)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "certified references [" not in result.stderr
    assert "\r" not in result.stderr
    assert "\x1b" not in result.stderr


def test_reference_draws_bar_on_terminal(tmp_path):
    case = write_case(tmp_path)
    arguments = ["reference", str(case), "--out", str(tmp_path / "reference.npz")]
    status, _, terminal = run_with_terminal_stderr(arguments, tmp_path)
    assert status == 0
    assert (tmp_path / "reference.npz").exists()
    assert "certified reference [" in terminal


@pytest.mark.requires_pdflatex
def test_derive_draws_pdflatex_bar_on_terminal(tmp_path):
    arguments = ["derive", str(CAUSAL_CASE), "--out", str(tmp_path)]
    status, output, terminal = run_with_terminal_stderr(arguments, tmp_path)
    assert status == 0
    assert f"wrote {tmp_path / 'causal.pdf'}" in output
    assert "pdflatex [" in terminal


@pytest.mark.requires_pdflatex
def test_derive_draws_nothing_on_pipe(tmp_path):
    result = subprocess.run([sys.executable, "-m", "symattn", "derive", str(CAUSAL_CASE), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    assert result.stderr == ""


# Every command ends by saying what it wrote, where, and how long it took.

FINAL_LINES = {
    "example": (["example", "--out", "{out}", "--no-pdf"], "stdout", r"done in \d+\.\d s"),
    "derive": (["derive", str(CAUSAL_CASE), "--out", "{out}", "--no-pdf"], "stdout", r"done in \d+\.\d s"),
    "grad": (["grad", str(GRADIENT_CASE), "--wrt", "W_Q", "--out", "{out}", "--no-pdf"], "stdout", r"done in \d+\.\d s"),
    "verify": (["verify", "{case}"], "stderr",
               r"symattn: verified .*case\.npz in \d+\.\d\d s; wrote the report as a table to stdout and no files"),
    "reference": (["reference", "{case}", "--out", "{out}/reference.npz"], "stderr",
                  r"symattn: wrote .*reference\.npz \(.*\) in \d+\.\d\d s"),
}


def test_final_lines_cover_every_command():
    assert set(FINAL_LINES) == set(COMMAND_MODULES)


def test_verify_grad_ends_with_outputs_and_time(tmp_path):
    case = write_case(tmp_path)
    result = subprocess.run([sys.executable, "-m", "symattn", "verify", str(case), "--grad"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    pattern = r"symattn: verified the gradients of .*case\.npz in \d+\.\d\d s; wrote the report as a table to stdout and no files"
    assert re.fullmatch(pattern, result.stderr.rstrip("\n").splitlines()[-1]), result.stderr


@pytest.mark.parametrize("command", sorted(FINAL_LINES))
def test_command_ends_with_outputs_and_time(command, tmp_path):
    arguments, stream, pattern = FINAL_LINES[command]
    case = write_case(tmp_path)
    out = tmp_path / "out"
    arguments = [argument.format(out=out, case=case) for argument in arguments]
    result = subprocess.run([sys.executable, "-m", "symattn", *arguments], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    text = result.stdout if stream == "stdout" else result.stderr
    assert re.fullmatch(pattern, text.rstrip("\n").splitlines()[-1]), text
    if stream == "stdout":
        written = [line for line in result.stdout.splitlines() if line.startswith("wrote ")]
        assert written, result.stdout
        for line in written:
            path = Path(line.split(" ")[1])
            assert path.parent == out
            assert path.exists()
