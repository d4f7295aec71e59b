"""The generated files in derivations/ are reproducible byte for byte from their .toml files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from symattn.cli import main

DERIVATIONS = Path(__file__).resolve().parent.parent / "derivations"
CASES = sorted(path.name for path in DERIVATIONS.iterdir() if path.is_dir())


def test_expected_cases_present():
    assert {"example", "symbolic-one-head", "causal", "mixed-symbolic-weight"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_case_folder_holds_source_and_outputs(case):
    names = sorted(path.name for path in (DERIVATIONS / case).iterdir())
    assert names == sorted(f"{case}.{extension}" for extension in ("json", "pdf", "tex", "toml"))


@pytest.mark.parametrize("case", CASES)
def test_tex_and_json_regenerate_identically(case, tmp_path, capsys):
    source = DERIVATIONS / case / f"{case}.toml"
    assert main(["derive", str(source), "--out", str(tmp_path), "--no-pdf"]) == 0
    for extension in ("tex", "json"):
        generated = (tmp_path / f"{case}.{extension}").read_bytes()
        committed = (DERIVATIONS / case / f"{case}.{extension}").read_bytes()
        assert generated == committed, f"{case}.{extension} differs; run scripts/regenerate_derivations.py"


def pdftex_version() -> str:
    """Return the pdfTeX version of the installed pdflatex, such as "1.40.24"."""
    banner = subprocess.run(["pdflatex", "--version"], capture_output=True, text=True, check=True).stdout
    return re.search(r"-(\d+\.\d+\.\d+)", banner.splitlines()[0])[1]


@pytest.mark.requires_pdflatex
@pytest.mark.parametrize("case", CASES)
def test_pdf_regenerates_identically(case, tmp_path, capsys):
    committed = (DERIVATIONS / case / f"{case}.pdf").read_bytes()
    producer = re.search(rb"/Producer \(pdfTeX-([\d.]+)\)", committed)[1].decode()
    if producer != pdftex_version():
        # The PDF bytes depend on the pdfTeX build; the .tex comparison above still holds.
        pytest.skip(f"{case}.pdf was built by pdfTeX {producer}, but pdflatex here is pdfTeX {pdftex_version()}")
    source = DERIVATIONS / case / f"{case}.toml"
    assert main(["derive", str(source), "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"{case}.pdf").read_bytes() == committed, (
        f"{case}.pdf differs; run scripts/regenerate_derivations.py"
    )


def test_regeneration_script_names_missing_case():
    script = DERIVATIONS.parent / "scripts" / "regenerate_derivations.py"
    result = subprocess.run([sys.executable, str(script), "no-such-case"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "no-such-case.toml not found" in result.stderr
