"""The worked-example document: its steps and values, page width, safety, and the pdflatex build."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import mpmath
import pytest
import sympy as sp

from symattn import Mask, derive, derive_direct
from symattn.errors import InvalidInputError, OutputError
from symattn.examples import example_derivation
from symattn.export.latex import (
    build_pdf,
    compile_pdf,
    display_matrix,
    is_wide,
    run_pdflatex,
    worked_example,
)
from symattn.export.notation import (
    decimal_latex,
    escape_text,
    expression_latex,
    matrix_latex,
    stage_symbol,
    symbol_latex,
)
from symattn.loaders import DerivationMeta, load_derivation_file

REPOSITORY = Path(__file__).resolve().parent.parent
SECTIONS = [
    "Setting",
    "Inputs",
    "Learnable parameters",
    "Queries, keys and values",
    "Split into heads",
    "Scores",
    "Scaling",
    "Attention weights",
    "Head outputs",
    "Concatenation",
    "Output projection",
]


@pytest.fixture(scope="module")
def example_tex() -> str:
    derivation, meta = example_derivation()
    return worked_example(derivation, meta)


def load_case(name: str):
    return load_derivation_file(REPOSITORY / "derivations" / name / f"{name}.toml")


def wide_derivation():
    """Direct attention with 10 queries, 12 keys and width 12: every stage needs abbreviating."""
    Q = [[(i + j) % 3 for j in range(12)] for i in range(10)]
    K = [[(i * j) % 2 for j in range(12)] for i in range(12)]
    V = [[i - j for j in range(12)] for i in range(12)]
    return derive_direct(Q, K, V, scale="none")


def test_document_steps_in_pipeline_order(example_tex):
    positions = [example_tex.index(f"\\section{{{title}}}") for title in SECTIONS]
    assert positions == sorted(positions)
    assert "\\section{Mask}" not in example_tex
    assert example_tex.startswith(r"\ifdefined\pdfinfoomitdate")
    assert example_tex.endswith("\\end{document}\n")


def test_document_shows_every_stage(example_tex):
    derivation, _ = example_derivation()
    for name in list(derivation.inputs) + list(derivation.stages):
        if name.startswith("Z_masked"):
            continue  # without a mask the document states that the masked scores are the scaled ones
        if name in ("key_source", "value_source"):
            name = "kv_source"
        symbol = stage_symbol(name)
        assert re.search(re.escape(symbol) + r" (=|\\approx) ", example_tex), name


def test_document_exact_values_of_example(example_tex):
    # By hand: Q = X_q W_Q, and head 0 scores Z_0 = Q_0 K_0^T with Q_0 = [[2, 1], [1, 3], [1, 1]]
    # and K_0 = [[1, 2], [2, 0]].
    assert "Q = \\begin{bmatrix}\n2 & 1 & 1 & 0 \\\\\n1 & 3 & 0 & 2 \\\\\n1 & 1 & 1 & 1\n\\end{bmatrix}" in example_tex
    assert "Z_{0} = \\begin{bmatrix}\n4 & 4 \\\\\n7 & 2 \\\\\n3 & 2\n\\end{bmatrix}" in example_tex
    assert "Z_{1} = \\begin{bmatrix}\n2 & 0 \\\\\n2 & 4 \\\\\n3 & 2\n\\end{bmatrix}" in example_tex


def exact_matrix(tex: str, symbol: str) -> str:
    """Return the body of the exact bmatrix ``symbol = ...`` in a document."""
    match = re.search(re.escape(symbol) + r" = \\begin\{bmatrix\}\n(.*?)\\end\{bmatrix\}", tex, re.DOTALL)
    assert match, f"no exact matrix {symbol} in the document"
    return match.group(1)


def test_expanded_row_has_unequal_logits(example_tex):
    # Row 1 of head 0 has equal scores 4 and 4, so the document expands row 2 instead: scores 7
    # and 2, scaled by 1/sqrt(2) to 7 sqrt(2)/2 and sqrt(2).
    assert "Row 2 of head 0 written out entry by entry (its logits differ" in example_tex
    with mpmath.workdps(30):
        first = mpmath.e ** (7 * mpmath.sqrt(2) / 2)
        second = mpmath.e ** mpmath.sqrt(2)
        weights = [mpmath.nstr(value / (first + second), 6, strip_zeros=False) for value in (first, second)]
    assert weights == ["0.971682", "0.0283179"]
    denominator = r"e^{7 \sqrt{2} / 2} + e^{\sqrt{2}}"
    assert rf"a^{{(0)}}_{{2,1}} = \frac{{e^{{7 \sqrt{{2}} / 2}}}}{{{denominator}}} \approx {weights[0]}" in example_tex
    assert rf"a^{{(0)}}_{{2,2}} = \frac{{e^{{\sqrt{{2}}}}}}{{{denominator}}} \approx {weights[1]}" in example_tex
    assert "a^{(0)}_{1,1} =" not in example_tex


def test_expanded_row_fallback_equal_logits():
    # Every score is 0, so no row has logits that differ and row 1 of head 0 is expanded.
    derivation = derive_direct([[0, 0], [0, 0]], [[0, 0], [0, 0]], [[1, 2], [3, 4]], scale="none")
    tex = worked_example(derivation)
    assert "Row 1 of head 0 written out entry by entry (no row has visible logits that differ)" in tex
    assert r"a_{1,1} = \frac{e^{0}}{e^{0} + e^{0}} = \frac{1}{2} \approx 0.5" in tex


def test_expanded_row_in_later_head():
    # Head 0 has the scores [1, 1] and [0, 0]; head 1 has [0, 1] in row 1, so its weights are
    # 1/(1 + e) = 0.268941 and e/(1 + e) = 0.731059.
    derivation = derive_direct([[1, 1], [0, 0]], [[1, 0], [1, 1]], [[1, 2], [3, 4]], heads=2, scale="none")
    tex = worked_example(derivation)
    assert "Row 1 of head 1 written out entry by entry (its logits differ" in tex
    assert r"a^{(1)}_{1,1} = \frac{e^{0}}{e^{0} + e^{1}} \approx 0.268941" in tex
    assert r"a^{(1)}_{1,2} = \frac{e^{1}}{e^{0} + e^{1}} \approx 0.731059" in tex


def test_example_weights_printed_exactly(example_tex):
    # A_0 row 2 is e^{7 sqrt(2)/2} / (e^{sqrt(2)} + e^{7 sqrt(2)/2}) and its complement; the
    # fractions in the exponents are written on one line, so no entry of A_0 is elided.
    weights = exact_matrix(example_tex, "A_{0}")
    assert r"\elided" not in weights
    assert r"\frac{e^{7 \sqrt{2} / 2}}{e^{\sqrt{2}} + e^{7 \sqrt{2} / 2}}" in weights
    assert r"\frac{e^{\sqrt{2}}}{e^{\sqrt{2}} + e^{7 \sqrt{2} / 2}}" in weights
    assert r"\frac{e^{3 \sqrt{2} / 2}}{e^{\sqrt{2}} + e^{3 \sqrt{2} / 2}}" in weights
    assert r"\frac{1}{2}" in weights


@pytest.mark.parametrize("symbol", ["A_{1}", "O_{0}", "O_{1}", "C"])
def test_example_stage_has_no_elided_entry(example_tex, symbol):
    assert r"\elided" not in exact_matrix(example_tex, symbol)


def test_document_decimals_are_correctly_rounded(example_tex):
    # Head 1, query 1: scores [2, 0] scaled to [sqrt(2), 0], so the first weight is
    # e^sqrt(2) / (1 + e^sqrt(2)).
    with mpmath.workdps(30):
        weight = mpmath.e ** mpmath.sqrt(2) / (1 + mpmath.e ** mpmath.sqrt(2))
        shown = mpmath.nstr(weight, 6, strip_zeros=False)
        complement = mpmath.nstr(1 - weight, 6, strip_zeros=False)
    assert shown == "0.804430"
    assert f"{shown} & {complement}" in example_tex


def test_document_states_precision():
    derivation, meta = example_derivation()
    tex = worked_example(derivation, meta, digits=4)
    assert "it has 4 correctly rounded significant digits" in tex
    assert "to 4 significant digits" in tex
    assert "0.8044 & 0.1956" in tex
    assert "to 50 significant digits" in worked_example(derivation, meta)


def test_document_is_deterministic():
    derivation, meta = example_derivation()
    assert worked_example(derivation, meta) == worked_example(derivation, meta)


def test_long_exact_entries_are_elided_with_decimals(example_tex):
    assert "\\section*{Elided entries}" in example_tex
    # Entry (2, 1) of the output is a sum of three fractions, too wide to print; its decimal
    # 1.41946 is shown below the exact matrix.
    output = exact_matrix(example_tex, "Y")
    rows = re.split(r" \\\\(?: \\noalign\{\\vskip [^}]*\})?\n", output)
    assert len(rows) == 3
    assert rows[1].startswith("\\elided &")
    assert output.count("\\elided") == 1
    assert re.search(r"Y \\approx \\begin\{bmatrix\}\n3\.10886 & 1 & 3\.39114 & 1\.60886 \\\\\n1\.41946 & ", example_tex)


def test_mostly_elided_matrix_shows_only_decimals():
    derivation, meta = load_case("pytorch-compatible")
    tex = worked_example(derivation, meta)
    assert "Most of the exact entries of $O_{0}$ are too wide to print" in tex
    assert "O_{0} = \\begin{bmatrix}" not in tex
    assert "O_{0} \\approx \\begin{bmatrix}\n1.28611 & 0.184126" in tex


def test_mask_section_for_causal_case():
    derivation, meta = load_case("causal")
    tex = worked_example(derivation, meta)
    assert "\\section{Mask}" in tex
    assert "causal, aligned top left: query $i$ sees the keys $j \\le i$." in tex
    assert tex.index("\\section{Mask}") < tex.index("\\section{Attention weights}")
    # Query 1 sees only key 1, so its weights are exactly [1, 0, 0].
    assert "A_{0} = \\begin{bmatrix}\n1 & 0 & 0 \\\\" in tex
    assert "\\hidden" in tex


def test_mask_rules_name_each_kind():
    derivation = derive_direct(
        [[1, 0], [0, 1]],
        [[1, 0], [0, 1], [1, 1]],
        [[1], [2], [3]],
        mask=[Mask.keep([True, True, False]), Mask.additive([[0, "1/2", 0], [0, 0, 0]])],
        key_length=2,
    )
    tex = worked_example(derivation)
    assert "valid key length 2: the keys after key 2 are padding" in tex
    assert "mask 1, a keep mask: true means the query may attend to the key (one entry per key, for every query)" in tex
    assert "mask 2, an additive mask" in tex
    assert "\\mathsf{T} & \\mathsf{T} & \\mathsf{F}" in tex
    assert "0 & \\frac{1}{2} & 0" in tex


def test_masked_rows_policy_is_stated():
    derivation = derive_direct(
        [[1], [1]], [[1], [2]], [[1], [2]],
        mask=Mask.block([[False, False], [True, True]]), masked_rows="zeros",
    )
    tex = worked_example(derivation)
    assert "Some query rows have no visible key (head 0, query 2)" in tex
    assert "their weights are a row of zeros" in tex


def test_direct_mode_document():
    tex = worked_example(derive_direct([[1, 0]], [[1, 0], [0, 1]], [[2], [4]]))
    assert "starts from the projections themselves" in tex
    assert "\\section{Learnable parameters}" not in tex
    assert "\\section{Queries, keys and values}" not in tex
    assert "\\section{Output projection}" not in tex


def test_single_head_skips_split_matrices():
    derivation, meta = load_case("causal")
    tex = worked_example(derivation, meta)
    assert "With one head, the head takes every column" in tex
    assert "Q_{0} = \\begin{bmatrix}" not in tex


def test_symbolic_entries_in_terms_of_previous_stage():
    derivation, meta = load_case("symbolic-one-head")
    tex = worked_example(derivation, meta)
    assert "in terms of the entries of $Q_{0}$ and $K_{0}$ they are" in tex
    assert "q_{1,1} k_{1,1} + q_{1,2} k_{1,2}" in tex
    assert "a_{1,1} v_{1,1} + a_{1,2} v_{2,1}" in tex
    assert "\\approx" not in tex


def test_wide_matrices_are_abbreviated():
    tex = worked_example(wide_derivation())
    assert r"\cdots" in tex
    assert r"\vdots" in tex
    assert r"\ddots" in tex
    # Every matrix sits in a box that shrinks it to the line width.
    assert tex.count("\\begin{bmatrix}") == sum(
        block.count("\\begin{bmatrix}") for block in re.findall(r"\\adjustbox\{max width=\\linewidth\}\{.*?\n\\end\{center\}", tex, re.DOTALL)
    )


def test_matrix_latex_abbreviates_rows_and_columns():
    entries = [[f"{i}{j}" for j in range(10)] for i in range(9)]
    rows = matrix_latex(entries).split(" \\\\\n")
    assert len(rows) == 8
    assert rows[0] == "\\begin{bmatrix}\n00 & 01 & 02 & 03 & 04 & 05 & \\cdots & 09"
    assert rows[6] == "\\vdots & \\vdots & \\vdots & \\vdots & \\vdots & \\vdots & \\ddots & \\vdots"
    assert rows[7] == "80 & 81 & 82 & 83 & 84 & 85 & \\cdots & 89\n\\end{bmatrix}"


def test_matrix_latex_small_matrix_unchanged():
    assert matrix_latex([["1", "2"], ["3", "4"]]) == "\\begin{bmatrix}\n1 & 2 \\\\\n3 & 4\n\\end{bmatrix}"


@pytest.mark.parametrize(
    ("latex", "wide"),
    [
        ("3", False),
        (r"\frac{e^{\sqrt{2}}}{1 + e^{\sqrt{2}}}", False),
        (r"\frac{e^{\frac{3 \sqrt{2}}{2}}}{e^{\sqrt{2}} + e^{\frac{3 \sqrt{2}}{2}}}", True),
        (r"\frac{e^{3 \sqrt{2} / 2}}{e^{\sqrt{2}} + e^{3 \sqrt{2} / 2}}", False),
        ("x_{1,1} w_{1,1} + x_{1,2} w_{2,1} + x_{1,3} w_{3,1} + x_{1,4} w_{4,1} + x_{1,5} w_{5,1}", True),
    ],
)
def test_is_wide_cases(latex, wide):
    assert is_wide(latex) is wide


W = sp.Symbol("w", real=True)


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (sp.exp(-sp.sqrt(2) / 16), r"e^{- \sqrt{2} / 16}"),
        (sp.exp(7 * sp.sqrt(2) / 2) / (1 + sp.exp(sp.sqrt(2))), r"\frac{e^{7 \sqrt{2} / 2}}{1 + e^{\sqrt{2}}}"),
        (sp.exp(sp.sqrt(2) * (W + 2) / 2), r"e^{\sqrt{2} \left(w + 2\right) / 2}"),
        (2 ** (W / 3), r"2^{w / 3}"),
        # Fractions outside exponents stay stacked, and so does a long fraction in an exponent.
        (sp.sqrt(2) / 2, r"\frac{\sqrt{2}}{2}"),
        (sp.exp(W / (W + 1)), r"e^{\frac{w}{w + 1}}"),
    ],
)
def test_expression_latex_exponent_fractions(expr, expected):
    assert expression_latex(expr, {W: "w"}) == expected


def test_display_matrix_symbolic_without_structure_elides():
    x = sp.Symbol("x", real=True)
    long_entry = sum(x**k for k in range(1, 12))
    display = display_matrix("M", sp.Matrix([[long_entry, 1]]), {x: "x"})
    assert display.elided
    assert "M = \\begin{bmatrix}\n\\elided & 1\n\\end{bmatrix}" in display.latex


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain title", "plain title"),
        ("50% & $5 #1", r"50\% \& \$5 \#1"),
        (r"\input{x}", r"\textbackslash{}input\{x\}"),
        ("^^5cinput", r"\textasciicircum{}\textasciicircum{}5cinput"),
        ("a_b ~ <c> |d|", r"a\_b \textasciitilde{} \textless{}c\textgreater{} \textbar{}d\textbar{}"),
        ("line\nbreak\ttab", "line break tab"),
        ("Café Ærø", "Café Ærø"),
    ],
)
def test_escape_text_cases(text, expected):
    assert escape_text(text) == expected


@pytest.mark.parametrize("text", ["a → b", "thorn þ", "emoji 🙂", "bell \x07"])
def test_escape_text_rejects_untypesettable(text):
    with pytest.raises(InvalidInputError, match="cannot typeset"):
        escape_text(text, "meta.title")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("w", "w"),
        ("alpha", r"\alpha"),
        ("Sigma_2", r"\Sigma_{2}"),
        ("b_1", "b_{1}"),
        ("w_a_b", "w_{a,b}"),
        ("x_{1,2}", "x_{1,2}"),
        ("Wq", "Wq"),
        ("xhat", "xhat"),
        ("mathscr", "mathscr"),
    ],
)
def test_symbol_latex_cases(name, expected):
    assert symbol_latex(name) == expected


@pytest.mark.parametrize("name", [r"\input{/etc/passwd}", "x}{", "a b", "_x", "x__y", "x_{1,2}}"])
def test_symbol_latex_rejects_unvalidated_names(name):
    with pytest.raises(InvalidInputError, match="cannot be typeset"):
        symbol_latex(name)


def test_hostile_symbol_name_rejected_by_document():
    hostile = sp.Symbol(r"\input{/etc/passwd}", real=True)
    derivation = derive_direct([[hostile]], [[1]], [[1]])
    with pytest.raises(InvalidInputError, match="cannot be typeset"):
        worked_example(derivation)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.25", "0.25"), ("-1.5e-12", r"-1.5 \times 10^{-12}"), ("3e+30", r"3 \times 10^{30}"), ("nan", r"\text{NaN}"), ("-inf", r"\hidden")],
)
def test_decimal_latex_cases(text, expected):
    assert decimal_latex(text) == expected


@pytest.mark.requires_pdflatex
def test_documents_compile_and_stay_on_page():
    derivations = [example_derivation()]
    derivations += [load_case(name) for name in ("causal", "symbolic-one-head", "mixed-symbolic-weight")]
    derivations.append((wide_derivation(), DerivationMeta("Wide matrices")))
    for derivation, meta in derivations:
        build = run_pdflatex(worked_example(derivation, meta))
        assert build.pdf.startswith(b"%PDF")
        assert "Overfull \\hbox" not in build.log, meta.title
        assert "LaTeX Warning" not in build.log, meta.title


@pytest.mark.requires_pdflatex
def test_pdf_is_reproducible(example_tex):
    assert compile_pdf(example_tex) == compile_pdf(example_tex)


@pytest.mark.requires_pdflatex
@pytest.mark.requires_pdftotext
def test_hostile_title_cannot_inject(tmp_path):
    marker = tmp_path / "PWNED"
    title = (
        rf"\input{{/etc/passwd}} \write18{{touch {marker}}} \immediate\write18{{touch {marker}}} "
        r"\catcode`\^=12 ^^5cinput{/etc/passwd} \include{/etc/passwd} %"
    )
    derivation = derive_direct([[1]], [[1]], [[1]])
    pdf_path = build_pdf(worked_example(derivation, DerivationMeta(title, title)), tmp_path / "hostile.pdf")
    text = subprocess.run(
        ["pdftotext", "-layout", str(pdf_path), "-"], capture_output=True, text=True, check=True
    ).stdout
    passwd_first_line = Path("/etc/passwd").read_text().splitlines()[0]
    assert passwd_first_line not in text
    assert not marker.exists()
    # The title prints as written, backslashes and all.
    assert "\\input{/etc/passwd}" in text
    assert "\\write18{touch" in text
    # OT1 fonts print the circumflex as a raised accent, which pdftotext reads as U+02C6.
    assert "\u02c6\u02c65cinput" in text


@pytest.mark.requires_pdflatex
def test_build_failure_quotes_first_error(tmp_path):
    out = tmp_path / "broken.pdf"
    tex = "\\documentclass{article}\n\\begin{document}\n\\undefinedcommand\n\\end{document}\n"
    with pytest.raises(OutputError) as caught:
        build_pdf(tex, out)
    assert "pdflatex failed (exit status 1); no PDF was written" in str(caught.value)
    assert "./document.tex:3: Undefined control sequence." in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.requires_pdflatex
def test_build_timeout_stops_pdflatex():
    tex = "\\documentclass{article}\n\\begin{document}\n\\def\\spin{\\spin}\\spin\n\\end{document}\n"
    with pytest.raises(OutputError, match="did not finish within 2 s"):
        compile_pdf(tex, timeout=2)


@pytest.mark.requires_pdflatex
def test_build_pdf_needs_force_to_replace(tmp_path, example_tex):
    out = tmp_path / "example.pdf"
    out.write_bytes(b"other content")
    with pytest.raises(OutputError, match="already exists with other content"):
        build_pdf(example_tex, out)
    assert out.read_bytes() == b"other content"
    build_pdf(example_tex, out, force=True)
    assert out.read_bytes().startswith(b"%PDF")
