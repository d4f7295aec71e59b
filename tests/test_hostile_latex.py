"""LaTeX injection: hostile titles, descriptions and symbol names in a derivation file.

The payloads try to read /etc/passwd (\\input, \\include, ^^5c for a backslash, a catcode
change) and to run a shell command (\\write18). Each is either escaped, so the PDF shows it as
text, or rejected with an error that names the key. The documents are compiled with the real
pdflatex, and pdftotext reads the PDF back.
"""

import importlib
import json
import subprocess
from pathlib import Path

import pytest
import sympy as sp

from symattn import InvalidInputError, OutputError, derive_direct
from symattn.cli import main
from symattn.export.latex import compile_pdf, worked_example
from symattn.loaders import load_derivation_file

PASSWD = Path("/etc/passwd")


def passwd_first_line():
    """Return the first line of /etc/passwd, the text a successful \\input would print."""
    if not PASSWD.exists():
        pytest.skip("/etc/passwd does not exist, so the check that it was not read has no target")
    return PASSWD.read_text(errors="replace").splitlines()[0]


def title_payloads(marker):
    return [
        r"\input{/etc/passwd}",
        rf"\immediate\write18{{touch {marker}}}",
        r"\include{/etc/passwd}",
        r"\catcode`\^^@=13",
        r"^^5cinput{/etc/passwd}",
        r"\def\x{\input{/etc/passwd}}\x",
        r"\makeatletter\@@input /etc/passwd",
        r"100% & #1 ~ $x$ _ {braces}",
        r"\end{document}",
    ]


def derivation_file(tmp_path, title, description):
    text = "\n".join([
        "[meta]",
        f"title = {json.dumps(title)}",
        f"description = {json.dumps(description)}",
        "",
        "[spec]",
        'scale = "none"',
        "",
        "[inputs]",
        "Q = [[1, 0]]",
        "K = [[1, 0], [0, 1]]",
        "V = [[1], [2]]",
    ])
    path = tmp_path / "hostile.toml"
    path.write_text(text + "\n")
    return path


def pdf_text(pdf_path):
    result = subprocess.run(["pdftotext", str(pdf_path), "-"], capture_output=True, text=True, check=True)
    return result.stdout


def test_title_escaped_in_source(tmp_path):
    marker = tmp_path / "PWNED"
    payloads = title_payloads(marker)
    derivation, meta = load_derivation_file(derivation_file(tmp_path, payloads[0], "\n\n".join(payloads)))
    tex = worked_example(derivation, meta)
    assert r"\textbackslash{}input\{/etc/passwd\}" in tex
    assert r"\input{/etc/passwd}" not in tex
    assert r"\write18" not in tex
    assert r"\include{" not in tex
    assert r"\catcode" not in tex
    assert "^^" not in tex
    assert r"\@@input" not in tex
    assert tex.count(r"\end{document}") == 1


@pytest.mark.requires_pdflatex
@pytest.mark.requires_pdftotext
def test_title_payload_neither_runs_nor_reads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    payloads = title_payloads(marker)
    path = derivation_file(tmp_path, " ".join(payloads[:5]), "\n\n".join(payloads))

    status = main(["derive", str(path), "--out", str(tmp_path / "out")])
    text = pdf_text(tmp_path / "out" / "hostile.pdf")

    assert status == 0
    assert not marker.exists()
    assert passwd_first_line() not in text
    # The payloads are printed as text.
    assert r"\input{/etc/passwd}" in text
    assert r"\immediate\write18{touch " in text  # pdftotext drops the path's "-" and "_"
    assert r"\include{/etc/passwd}" in text
    assert r"\end{document}" in text
    assert "100% & #1" in text


@pytest.mark.parametrize(
    "character", ["\x00", "\x1b", "\u202e", "\u0445"], ids=["NUL", "escape", "right-to-left override", "Cyrillic x"]
)
def test_untypesettable_title_rejected(tmp_path, character):
    path = derivation_file(tmp_path, f"title {character} end", "plain")
    with pytest.raises(InvalidInputError, match=r"meta.title contains the character .* at position 6"):
        load_derivation_file(path)


@pytest.mark.parametrize("name", [r"\input", "x}", "x^^5c", "a b", "x$"])
def test_hostile_symbol_name_rejected(tmp_path, name):
    path = tmp_path / "names.toml"
    path.write_text(
        "[inputs]\n"
        f"Q = {{symbol = {json.dumps(name)}, shape = [1, 2]}}\n"
        "K = [[1, 0], [0, 1]]\n"
        "V = [[1], [2]]\n"
    )
    with pytest.raises(InvalidInputError, match=r"inputs.Q: symbol base .* is not valid"):
        load_derivation_file(path)


@pytest.mark.parametrize("name", [r"\input{/etc/passwd}", r"x\write18{touch PWNED}", "x^^5c", "a%b"])
def test_api_symbol_name_rejected_in_document(name):
    # Through the Python API a SymPy symbol may have any name; the document rejects it.
    derivation = derive_direct([[sp.Symbol(name, real=True), 0]], [[1, 0], [0, 1]], [[1], [2]])
    with pytest.raises(InvalidInputError, match="symbol"):
        worked_example(derivation)


# pdflatex itself, as a second line of defence.

def raw_document(body):
    return "\\documentclass{article}\n\\newwrite\\out\n\\begin{document}\n" + body + "\nhello\n\\end{document}\n"


@pytest.mark.requires_pdflatex
def test_compile_without_shell_escape(tmp_path):
    marker = tmp_path / "PWNED"
    pdf = compile_pdf(raw_document(rf"\immediate\write18{{touch {marker}}}"))
    assert pdf.startswith(b"%PDF")
    assert not marker.exists()


@pytest.mark.requires_pdflatex
@pytest.mark.parametrize(
    "body",
    [
        r"\input{/etc/passwd}",
        r"\input{../../../../../../etc/passwd}",
        r"\makeatletter\@@input /etc/passwd ",
    ],
    ids=["absolute", "parent folders", "primitive input"],
)
def test_compile_cannot_read_outside(body):
    first_line = passwd_first_line()
    with pytest.raises(OutputError, match="pdflatex failed") as raised:
        compile_pdf(raw_document(body))
    assert first_line not in str(raised.value)


@pytest.mark.requires_pdflatex
def test_compile_cannot_write_outside(tmp_path):
    marker = tmp_path / "PWNED.tex"
    body = rf"\immediate\openout\out={marker}\immediate\write\out{{x}}\immediate\closeout\out"
    with pytest.raises(OutputError, match="can't write on file"):
        compile_pdf(raw_document(body))
    assert not marker.exists()


@pytest.mark.requires_pdflatex
def test_compile_command_is_restricted(monkeypatch, tmp_path):
    # A spy on subprocess.run records the call and runs the real pdflatex.
    latex = importlib.import_module("symattn.export.latex")
    calls = []
    real_run = subprocess.run

    def spy(command, **kwargs):
        calls.append((command, kwargs))
        return real_run(command, **kwargs)

    monkeypatch.setattr(latex.subprocess, "run", spy)
    out = tmp_path / "out"
    compile_pdf(raw_document(""), build_folder=out)

    (command, kwargs), = calls
    assert "-no-shell-escape" in command
    assert "-interaction=nonstopmode" in command
    assert "-halt-on-error" in command
    assert kwargs["env"]["openin_any"] == "p"
    assert kwargs["env"]["openout_any"] == "p"
    assert kwargs["env"]["shell_escape"] == "f"
    assert kwargs["stdin"] == subprocess.DEVNULL
    # pdflatex runs in a hidden folder inside the output folder, removed afterwards.
    assert Path(kwargs["cwd"]).parent == out
    assert Path(kwargs["cwd"]).name.startswith(".symattn-latex-")
    assert list(out.iterdir()) == []
