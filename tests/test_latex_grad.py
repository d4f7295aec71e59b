"""The gradient worked example: its chain, its values and its PDF build."""

import mpmath
import pytest
import sympy as sp

from symattn import InvalidInputError, Mask, UnsupportedError, derive, derive_direct
from symattn.examples import example_derivation
from symattn.export.latex import compile_pdf
from symattn.export.latex_grad import gradient_example
from symattn.loaders import DerivationMeta

T, F = True, False
E1 = {"Q": [[1, 0], [0, 1]], "K": [[1, 0], [0, 1], [1, 1]], "V": [[1, 2], [3, 4], [5, 6]]}


def six_digits(value) -> str:
    return mpmath.nstr(value, 6, strip_zeros=False)


def test_gradient_example_direct_entry_value():
    # Row 0 of E1 weighs the keys (c, 1, c) / (1 + 2c) with c = e^{1/√2}, and the value sums
    # are (3, 7, 11) around their mean 7, so ∂(sum)/∂Q[0,1] = s · 4c / (1 + 2c), s = 1/√2.
    tex = gradient_example(derive_direct(**E1), "sum", "Q", (0, 1))
    with mpmath.workdps(30):
        c = mpmath.exp(1 / mpmath.sqrt(2))
        expected = 4 * c / (mpmath.sqrt(2) * (1 + 2 * c))
    assert f"(\\overline{{Q}})_{{1,2}} \\approx {six_digits(expected)}" in tex


def test_gradient_example_follows_the_chain():
    derivation, meta = example_derivation()
    tex = gradient_example(derivation, "sum", "W_Q", (0, 0), meta)
    order = [
        "\\section{The objective}",
        "\\section{Output projection}",
        "\\section{Head 0}",
        "\\overline{A}_{0} = \\overline{O}_{0}\\, V_{0}^{T}",
        "\\operatorname{diag}(a) - a a^{T}",
        "\\overline{Z}_{0} = s\\, \\overline{\\tilde{Z}}_{0}",
        "\\overline{Q}_{0} = \\overline{Z}_{0}\\, K_{0}",
        "\\section{Assembling $\\overline{Q}$}",
        "\\section{The gradient of $W_{Q}$}",
    ]
    positions = [tex.index(text) for text in order]
    assert positions == sorted(positions)
    assert "\\section{Head 1}" not in tex  # column 0 of W_Q belongs to head 0


def test_gradient_example_value_path_skips_softmax():
    derivation, _ = example_derivation()
    tex = gradient_example(derivation, "sum", "W_V", (0, 3))
    assert "\\section{Head 1}" in tex
    assert "\\overline{V}_{1} = A_{1}^{T}\\, \\overline{O}_{1}" in tex
    assert "diag" not in tex


def test_gradient_example_output_entry_objective():
    tex = gradient_example(derive_direct(**E1), ("output", 1, 0), "V", (2, 0))
    assert "$L = y_{2,1}$" in tex
    # ∂y_{2,1}/∂V[2,0] is the weight of key 2 for query 1: c / (1 + 2c).
    with mpmath.workdps(30):
        c = mpmath.exp(1 / mpmath.sqrt(2))
        assert f"\\approx {six_digits(c / (1 + 2 * c))}" in tex


def test_gradient_example_writes_softmax_row_exactly():
    # Both keys of the single query have the same score, so the weights are exactly 1/2.
    d = derive_direct([[1, 1]], [[1, 0], [0, 1]], [[3], [5]])
    tex = gradient_example(d, "sum", "Q", (0, 0))
    assert "the weights are $(\\frac{1}{2}, \\frac{1}{2})$" in tex
    assert "= (3)(\\frac{1}{2}) + (5)(\\frac{1}{2}) = 4" in tex


def test_gradient_example_mask_sentence():
    d = derive_direct(**E1, mask=Mask.block([[F, F, T], [F, F, F]]))
    assert "no gradient passes through it" in gradient_example(d, "sum", "K", (0, 0))
    assert "There is no mask" in gradient_example(derive_direct(**E1), "sum", "K", (0, 0))


def test_gradient_example_key_bias_is_zero():
    d = derive([[1, 0], [0, 1]], [[1, 1], [0, 2]], W_Q=[[1, 0], [0, 1]], W_K=[[1, 0], [0, 1]],
               W_V=[[1, 0], [0, 1]], b_K=[1, -1])
    tex = gradient_example(d, "sum", "b_K", (0, 1))
    assert "exactly 0 for every objective of the output" in tex
    assert "(\\overline{b}_{K})_{1,2} = 0" in tex


def test_gradient_example_symbolic_elides_long_entries():
    d = derive([["x"]], [["y"]], W_Q=[["a"]], W_K=[["b"]], W_V=[["c"]], scale="none")
    tex = gradient_example(d, "sum", "W_V", (0, 0))
    # One key: its weight is exactly 1, so ∂(sum)/∂c = y.
    assert "(\\overline{W}_{V})_{1,1} = y" in tex


def test_gradient_example_is_deterministic():
    derivation, meta = example_derivation()
    assert gradient_example(derivation, "sum", "W_K", (1, 1), meta) == gradient_example(
        derivation, "sum", "W_K", (1, 1), meta
    )


def test_gradient_example_escapes_title():
    meta = DerivationMeta(title="50% of \\input{x}")
    tex = gradient_example(derive_direct(**E1), "sum", "Q", (0, 0), meta)
    assert "50\\% of \\textbackslash{}input\\{x\\}" in tex
    assert "\\input{x}" not in tex


def test_gradient_example_rejects_stage_objective():
    with pytest.raises(UnsupportedError, match="objectives of the output only"):
        gradient_example(derive_direct(**E1), ("A_0", 0, 0), "Q", (0, 0))


def test_gradient_example_rejects_entry_outside():
    with pytest.raises(InvalidInputError, match=r"entry \(2, 0\) is outside Q"):
        gradient_example(derive_direct(**E1), "sum", "Q", (2, 0))


def test_gradient_example_rejects_stage_wrt():
    with pytest.raises(InvalidInputError, match="takes an input of this derivation"):
        gradient_example(derive_direct(**E1), "sum", "A_0", (0, 0))


@pytest.mark.requires_pdflatex
@pytest.mark.parametrize(
    "objective, wrt, entry",
    [("sum", "W_Q", (0, 0)), (("output", 1, 0), "W_K", (1, 2)), ("sum", "W_O", (1, 1)),
     (("output", 0, 1), "query_source", (1, 1))],
)
def test_gradient_example_compiles(objective, wrt, entry):
    derivation, meta = example_derivation()
    pdf = compile_pdf(gradient_example(derivation, objective, wrt, entry, meta))
    assert pdf.startswith(b"%PDF")


@pytest.mark.requires_pdflatex
def test_gradient_example_symbolic_and_masked_compile():
    symbolic = derive([["x", 0]], [["y", 1], [0, 1]], W_Q=[["a", 0], [0, 1]], W_K=[[1, 0], [0, 1]],
                      W_V=[[1, 0], [0, "c"]])
    masked = derive_direct(**E1, mask=Mask.additive([[0, sp.Rational(1, 2), float("-inf")], [0, 0, 0]]))
    assert compile_pdf(gradient_example(symbolic, "sum", "W_Q", (0, 0))).startswith(b"%PDF")
    assert compile_pdf(gradient_example(masked, [[1, -2], [0, 3]], "K", (1, 1))).startswith(b"%PDF")
