"""Notebook displays: stages typeset with long entries abbreviated, and the derivation summary."""

from __future__ import annotations

import mpmath
import pytest
import sympy as sp

from symattn import InvalidInputError, derive, derive_direct, symbol_matrix
from symattn.display import DEFAULT_MAX_ENTRY_CHARS, DerivationSummary, StageView, entry_latex, show, summary

# E1: two queries, three keys, one head of width 2, scale 1/√2.
E1 = dict(Q=[[1, 0], [0, 1]], K=[[1, 0], [0, 1], [1, 1]], V=[[1, 2], [3, 4], [5, 6]])


def symbolic_one_head():
    return derive(
        symbol_matrix("x", 1, 2),
        symbol_matrix("y", 2, 2),
        W_Q=symbol_matrix("a", 2, 2),
        W_K=symbol_matrix("b", 2, 2),
        W_V=symbol_matrix("c", 2, 2),
    )


def test_show_short_matrix_in_full():
    view = show(sp.Matrix([[1, sp.Rational(1, 2)]]), "A_0")
    assert view.latex == "A_{0} = \\begin{bmatrix}\n1 & \\frac{1}{2}\n\\end{bmatrix}"
    assert view.abbreviated == 0


def test_show_repr_latex_is_display_math():
    view = show(sp.Matrix([[1]]), "output")
    assert view._repr_latex_() == "$\\displaystyle Y = \\begin{bmatrix}\n1\n\\end{bmatrix}$"


def test_show_long_sum_keeps_first_terms():
    symbols = sp.symbols("t0:100")
    view = show(sp.Matrix([[sp.Add(*symbols)]]), "Z_0")
    assert "t0 + t1 + \\cdots \\text{(100 terms)}" in view.latex
    assert "t10" not in view.latex
    assert view.abbreviated == 1


def test_show_deep_entry_keeps_structure():
    derivation = symbolic_one_head()
    entry = derivation["output"][0, 0]
    text, shortened = entry_latex(entry)
    assert shortened
    assert text.endswith(f"\\;\\text{{[{sp.count_ops(entry)} operations]}}")
    assert len(text) < len(sp.latex(entry))
    assert text.startswith("\\frac{")
    assert "\\cdots" in text


def test_show_short_entries_of_deep_stage_in_full():
    view = symbolic_one_head().show("Q")
    assert "\\cdots" not in view.latex
    assert "x_{1,1} a_{1,1}" in view.latex or "a_{1,1} x_{1,1}" in view.latex


def test_show_hidden_logit_is_minus_infinity():
    derivation = derive_direct(**E1, causal="top_left", masked_rows="zeros")
    view = derivation.show("Z_masked_0")
    assert view.latex.count("-\\infty") == 3  # (0, 1), (0, 2) and (1, 2) are in the future


def test_show_large_matrix_states_shape():
    view = show(sp.ones(10, 12))
    assert "\\vdots" in view.latex
    assert "\\cdots" in view.latex
    assert view.latex.endswith("\\quad \\text{(10 × 12)}")


def test_show_other_name_as_text():
    assert show(sp.Matrix([[1]]), "my_grad").latex.startswith("\\text{my\\_grad} = ")


def test_show_rejects_small_limits():
    with pytest.raises(InvalidInputError, match="max_terms is 2"):
        show(sp.Matrix([[1]]), max_terms=2)
    with pytest.raises(InvalidInputError, match="max_entry_chars is 0"):
        show(sp.Matrix([[1]]), max_entry_chars=0)


def test_derivation_show_keeps_stage_matrix():
    derivation = derive_direct(**E1)
    view = derivation.show("A_0")
    assert isinstance(view, StageView)
    assert isinstance(derivation["A_0"], sp.ImmutableMatrix)
    assert view.abbreviated == 0
    assert len(view.latex) < 6 * DEFAULT_MAX_ENTRY_CHARS


def test_summary_lines_of_e1():
    lines = str(summary(derive_direct(**E1))).splitlines()
    assert lines[0] == "Derivation: 1 head, 2 queries, 3 keys (direct mode: Q, K and V given)"
    assert lines[1] == "  sizes: d_model 2 (d_k 2 per head), d_v 2 per head, output 2 × 2"
    assert lines[3] == "  scale: sqrt(2)/2 (sqrt_dk)"
    assert lines[4] == "  masks: none; fully masked rows: error"


def test_summary_output_decimals_of_e1():
    with mpmath.workdps(30):
        c = mpmath.exp(1 / mpmath.sqrt(2))
        second = [mpmath.nstr((1 + 8 * c) / (1 + 2 * c), 6), mpmath.nstr((2 + 10 * c) / (1 + 2 * c), 6)]
    result = summary(derive_direct(**E1))
    assert result.output[0] == ("3.00000", "4.00000")
    assert list(result.output[1]) == second
    assert result.output_note == "to 6 significant digits"


def test_summary_names_masks_and_symbols():
    derivation = derive([[1, 0], [0, 1]], W_Q=[[1, 0], ["w", 1]], W_K=[[1, 0], [0, 1]], W_V=[[1, 0], [0, 1]],
                        causal="top_left", key_length=2)
    text = str(summary(derivation))
    assert "  masks: causal (top_left), key length 2; fully masked rows: error" in text
    assert "  symbols: w" in text
    assert "output: symbolic; show it with derivation.show('output')" in text


def test_summary_cuts_long_output():
    rows = [[i, 0] for i in range(6)]
    result = summary(derive_direct(rows, rows, rows))
    assert len(result.output) == 4
    assert result.output_note == "to 6 significant digits, the first 4 of 6 rows"


def test_summary_html_table():
    html = summary(derive_direct(**E1))._repr_html_()
    assert html.startswith("<div><strong>Derivation: 1 head")
    assert "<td>3.40667</td>" in html
    assert html.endswith("</table></td></tr></table></div>")


def test_summary_html_escapes_text():
    html = DerivationSummary("a < b", (("x", "1 < 2"),), (("<",),), "note & more")._repr_html_()
    assert "<strong>a &lt; b</strong>" in html
    assert "1 &lt; 2" in html
    assert "<td>&lt;</td>" in html
    assert "note &amp; more" in html


def test_derivation_pretty_print_is_summary():
    pretty = pytest.importorskip("IPython.lib.pretty")
    derivation = derive_direct(**E1)
    assert pretty.pretty(derivation) == str(summary(derivation))
    assert derivation._repr_html_() == summary(derivation)._repr_html_()
