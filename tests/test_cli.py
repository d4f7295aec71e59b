"""The ``symattn example`` and ``symattn derive`` commands, run end to end in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
EXAMPLE_FOLDER = REPOSITORY / "derivations" / "example"
HAS_PDFLATEX = shutil.which("pdflatex") is not None


def run_symattn(*arguments: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "symattn", *arguments],
        capture_output=True,
        text=True,
        cwd=cwd or REPOSITORY,
        env=env,
        timeout=300,
    )


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def write_bad_toml(folder: Path) -> Path:
    path = folder / "bad.toml"
    path.write_text(
        '[inputs]\nquery_source = [[1, 0]]\n[weights]\nW_Q = [["x!"], [0]]\nW_K = [[1], [0]]\nW_V = [[1], [0]]\n',
        encoding="utf-8",
    )
    return path


def test_example_writes_outputs(tmp_path):
    out = tmp_path / "example-output"
    result = run_symattn("example", "--out", str(out), "--no-pdf")
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in out.iterdir()) == ["example.json", "example.tex"]
    assert f"wrote {out / 'example.tex'} (" in result.stdout
    assert f"wrote {out / 'example.json'} (" in result.stdout
    assert "done in " in result.stdout
    document = json.loads((out / "example.json").read_text())
    assert document["precision"]["significant_digits"] == 50
    assert document["stages"]["A_0"]["exact"][0] == ["1/2", "1/2"]
    # The built-in example and derivations/example/example.toml give the same bytes.
    assert (out / "example.tex").read_bytes() == (EXAMPLE_FOLDER / "example.tex").read_bytes()
    assert (out / "example.json").read_bytes() == (EXAMPLE_FOLDER / "example.json").read_bytes()


@pytest.mark.requires_pdflatex
def test_example_writes_pdf(tmp_path):
    result = run_symattn("example", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["example.json", "example.pdf", "example.tex"]
    assert (tmp_path / "example.pdf").read_bytes().startswith(b"%PDF")
    assert f"wrote {tmp_path / 'example.pdf'} (" in result.stdout


def test_example_without_pdflatex_explains_build(tmp_path):
    empty_path = tmp_path / "no-tools"
    empty_path.mkdir()
    out = tmp_path / "out"
    result = run_symattn("example", "--out", str(out), env={**os.environ, "PATH": str(empty_path)})
    assert result.returncode == 0, result.stderr
    assert "pdflatex was not found, so no PDF was built" in result.stdout
    assert f"cd {out} && pdflatex -no-shell-escape example.tex" in result.stdout
    assert sorted(path.name for path in out.iterdir()) == ["example.json", "example.tex"]


def test_repeated_run_with_same_bytes_succeeds(tmp_path):
    first = run_symattn("example", "--out", str(tmp_path), "--no-pdf")
    before = folder_contents(tmp_path)
    second = run_symattn("example", "--out", str(tmp_path), "--no-pdf")
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert folder_contents(tmp_path) == before


def test_conflict_without_force_writes_nothing(tmp_path):
    assert run_symattn("example", "--out", str(tmp_path), "--no-pdf").returncode == 0
    (tmp_path / "example.json").write_text("edited by hand\n")
    before = folder_contents(tmp_path)
    result = run_symattn("example", "--out", str(tmp_path), "--no-pdf", "--digits", "30")
    assert result.returncode == 3
    assert result.stderr.startswith("symattn: error: output files ")
    assert "already exist with other content; pass --force" in result.stderr
    assert "Traceback" not in result.stderr
    # Neither the .tex (which would change with --digits 30) nor the .json was touched.
    assert folder_contents(tmp_path) == before


def test_force_overwrites(tmp_path):
    assert run_symattn("example", "--out", str(tmp_path), "--no-pdf").returncode == 0
    (tmp_path / "example.json").write_text("edited by hand\n")
    result = run_symattn("example", "--out", str(tmp_path), "--no-pdf", "--digits", "30", "--force")
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "example.json").read_text())
    assert document["precision"]["significant_digits"] == 30
    assert "to 30 significant digits" in (tmp_path / "example.tex").read_text()


def test_derive_writes_outputs_named_after_file(tmp_path):
    source = REPOSITORY / "derivations" / "causal" / "causal.toml"
    result = run_symattn("derive", str(source), "--out", str(tmp_path), "--no-pdf")
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["causal.json", "causal.tex"]
    assert f"derived {source} in " in result.stdout


def test_derive_invalid_file_exits_2_without_output(tmp_path):
    bad = write_bad_toml(tmp_path)
    out = tmp_path / "out"
    result = run_symattn("derive", str(bad), "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.startswith("symattn: error: bad.toml: weights.W_Q[0][0] 'x!' is neither a number nor a name")
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_derive_missing_file_exits_2(tmp_path):
    result = run_symattn("derive", str(tmp_path / "absent.toml"), "--out", str(tmp_path))
    assert result.returncode == 2
    assert "absent.toml' does not exist; check the path" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("digits", ["0", "10001"])
def test_invalid_digits_exit_2(tmp_path, digits):
    result = run_symattn("example", "--out", str(tmp_path), "--digits", digits)
    assert result.returncode == 2
    assert f"symattn: error: --digits is {digits}; expected an integer from 1 to 10000" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_usage_error_exits_2(tmp_path):
    result = run_symattn("example", "--digits", "many")
    assert result.returncode == 2
    assert "invalid int value: 'many'" in result.stderr


def test_debug_shows_traceback(tmp_path):
    bad = write_bad_toml(tmp_path)
    result = run_symattn("--debug", "derive", str(bad), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" in result.stderr


def test_failed_build_removes_created_folder(tmp_path, monkeypatch, capsys):
    import symattn.cli.derive as derive_command
    from symattn.cli import main
    from symattn.errors import OutputError

    def failing_compile(*args, **kwargs):
        raise OutputError("pdflatex failed: ! Undefined control sequence.")

    monkeypatch.setattr(derive_command, "compile_pdf", failing_compile)
    monkeypatch.setattr(derive_command, "pdflatex_path", lambda: "/usr/bin/pdflatex")
    out = tmp_path / "new-folder"
    assert main(["example", "--out", str(out)]) == 3
    assert not out.exists()
    assert "Undefined control sequence" in capsys.readouterr().err


def test_out_pointing_at_file_rejected(tmp_path, capsys):
    from symattn.cli import main

    target = tmp_path / "a-file"
    target.write_text("keep me")
    assert main(["example", "--out", str(target), "--no-pdf"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep me"
