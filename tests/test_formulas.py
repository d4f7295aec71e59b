"""Formulas typeset by latexify-py, with SymPy where latexify-py would print them wrongly.

latexify-py 0.4.4 escapes underscores (d_k printed as \\mathrm{d\\_k}) and drops NumPy keyword
arguments such as axis=-1, so a row softmax loses its summation index. These tests guard the
rewrite and the fallback.
"""

from __future__ import annotations

import math

import latexify
import mpmath
import pytest
import sympy as sp

from symattn.export import formulas
from symattn.export.formulas import Formula, render_formula, unescape_names, unsupported_construct
from symattn.export.latex import compile_pdf


def test_softmax_names_summation_index_over_keys():
    rendered = render_formula(formulas.SOFTMAX)
    assert rendered.source == "latexify"
    assert r"\sum_{j = 1}^{{n_{kv}}}" in rendered.latex
    assert r"(\hat{Z}_{h})_{i, j}" in rendered.latex
    assert r"(\hat{Z}_{h})_{i, k}" in rendered.latex
    assert r"\_" not in rendered.latex


def test_scaled_dot_product_shows_d_k_as_subscript():
    rendered = render_formula(formulas.SCALED_DOT_PRODUCT)
    assert rendered.source == "latexify"
    assert r"\sqrt{ {d_{k}} }" in rendered.latex
    assert r"\sum_{t = 1}^{{d_{k}}}" in rendered.latex
    assert r"(Q_{h})_{i, t} \cdot (K_{h})_{j, t}" in rendered.latex
    assert r"\mathrm{d\_k}" not in rendered.latex


def test_query_projection_shows_W_Q_as_subscript():
    rendered = render_formula(formulas.QUERY_PROJECTION)
    assert rendered.source == "latexify"
    assert rendered.latex == r"Q = {X_{q}} \cdot {W_{Q}} + {b_{Q}}"


def test_latexify_alone_drops_the_softmax_axis():
    # The known problem the fallback exists for: without it the row softmax names no index.
    raw = latexify.get_latex(formulas.softmax_rows, use_signature=False)
    assert r"\sum_" not in raw
    assert "axis" not in raw


def test_axis_argument_falls_back_to_sympy():
    rendered = render_formula(formulas.SOFTMAX_ROWS)
    assert rendered.source == "sympy"
    assert "axis" in rendered.reason
    assert "keepdims" in rendered.reason
    assert rendered.latex == (
        r"a^{(h)}_{i,k} = \frac{e^{{(\hat{Z}_{h})}_{i,k}}}{\sum_{j=1}^{n_{kv}} e^{{(\hat{Z}_{h})}_{i,j}}}"
    )


def test_slice_falls_back_to_sympy():
    rendered = render_formula(formulas.HEAD_BLOCK)
    assert rendered.source == "sympy"
    assert rendered.reason == "latexify-py cannot print slices"
    assert rendered.latex == r"(Q_{h})_{i,t} = {Q}_{i,h d_{k} + t}"


def test_transpose_attribute_falls_back():
    def scores(Q_h, K_h):
        return Q_h @ K_h.T

    assert unsupported_construct(scores) == "latexify-py prints the transpose .T as text"


def test_latexify_error_falls_back_to_sympy():
    def countdown(x):
        while x:
            x = x - 1
        return x

    formula = Formula("countdown", "y", countdown, lambda: sp.Integer(0))
    rendered = render_formula(formula)
    assert rendered.source == "sympy"
    assert rendered.reason.startswith("latexify-py raised LatexifyNotSupportedError")
    assert rendered.latex == "y = 0"


@pytest.mark.parametrize(
    ("latexify_output", "expected"),
    [
        (r"\mathrm{d\_k}", "{d_{k}}"),
        (r"\mathrm{W\_Q}", "{W_{Q}}"),
        (r"\mathrm{n\_kv} + 1", "{n_{kv}} + 1"),
        (r"\mathrm{Q\_h}_{i, t}", "(Q_{h})_{i, t}"),
        (r"\mathrm{Zhat\_h}", r"{\hat{Z}_{h}{}}"),
        (r"\mathrm{Ztilde\_h}_{i, j}", r"(\tilde{Z}_{h})_{i, j}"),
        # A name with two underscores is left as latexify-py prints it.
        (r"\mathrm{a\_b\_c}", r"\mathrm{a\_b\_c}"),
        (r"\mathrm{softmax}", r"\mathrm{softmax}"),
    ],
)
def test_unescape_names_cases(latexify_output, expected):
    assert unescape_names(latexify_output) == expected


def _one_based(rows: list[list]) -> dict[int, dict[int, object]]:
    return {i + 1: {j + 1: value for j, value in enumerate(row)} for i, row in enumerate(rows)}


def test_definitions_compute_attention_weights():
    # Q = [[1, 0], [0, 1]], K = [[1, 0], [0, 1], [1, 1]], d_k = 2: the scaled scores of query 1
    # are [1, 0, 1]/sqrt(2), so its weights are [c, 1, c]/(2c + 1) with c = e^(1/sqrt(2)).
    Q_h = _one_based([[1, 0], [0, 1]])
    K_h = _one_based([[1, 0], [0, 1], [1, 1]])
    scores = {1: {j: formulas.scaled_dot_product(Q_h, K_h, 2, 1, j) for j in (1, 2, 3)}}
    c = mpmath.e ** (1 / mpmath.sqrt(2))
    expected = [c / (2 * c + 1), 1 / (2 * c + 1), c / (2 * c + 1)]
    assert formulas.dot_product(Q_h, K_h, 2, 1, 3) == 1
    assert scores[1][3] == pytest.approx(1 / math.sqrt(2), rel=1e-15)
    for k in (1, 2, 3):
        assert formulas.softmax(scores, 1, k, 3) == pytest.approx(float(expected[k - 1]), rel=1e-14)


@pytest.mark.requires_pdflatex
def test_rendered_formulas_compile():
    all_formulas = [
        formulas.QUERY_PROJECTION,
        formulas.DOT_PRODUCT,
        formulas.SCALED_DOT_PRODUCT,
        formulas.SOFTMAX,
        formulas.SOFTMAX_ROWS,
        formulas.HEAD_BLOCK,
    ]
    body = "\n".join(f"\\[ {render_formula(formula).latex} \\]" for formula in all_formulas)
    tex = f"\\documentclass{{article}}\n\\usepackage{{amsmath,amssymb}}\n\\begin{{document}}\n{body}\n\\end{{document}}\n"
    assert compile_pdf(tex).startswith(b"%PDF")
