"""Formulas of the worked example: Python definitions typeset by latexify-py, SymPy as fallback.

Each formula has a Python reference definition and an equivalent SymPy expression. The
definition is typeset by latexify-py where that gives the right formula, and the SymPy form is
typeset otherwise. latexify-py 0.4.4 has three habits that this module works around:

- It escapes underscores in names, so ``d_k`` prints as ``\\mathrm{d\\_k}``. Its output is
  rewritten so that ``d_k`` reads ``d_{k}`` and ``W_Q`` reads ``W_{Q}``.
- It drops keyword arguments, so ``np.sum(x, axis=-1, keepdims=True)`` prints as a bare
  ``\\sum`` that names neither its index nor its axis.
- It cannot print slices (it raises ``LatexifyNotSupportedError``) and prints ``K.T`` as is.

A definition that uses keyword arguments, slices or ``.T`` is therefore typeset from its
SymPy form without asking latexify-py, and so is one for which latexify-py raises.

The definitions count rows and columns from 1, as the document does, so they run on any
object whose ``[i][t]`` counts from 1, such as a dict of dicts.
"""

from __future__ import annotations

import ast
import inspect
import math
import re
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Literal

import latexify
import sympy as sp

try:  # NumPy is optional: softmax_rows is typeset, and only runs when NumPy is installed.
    import numpy as np
except ImportError:  # pragma: no cover - exercised only without NumPy
    np = None

# latexify-py prints a name with underscores as \mathrm{base\_sub}; an optional accent suffix
# ("Zhat_h") becomes a LaTeX accent, as in SymPy's naming.
_ESCAPED_NAME = re.compile(
    r"\\mathrm\{(?P<base>[A-Za-z]+?)(?P<accent>hat|tilde)?\\_(?P<sub>[A-Za-z0-9]+)\}"
)


def query_projection(X_q, W_Q, b_Q):
    """Queries: the query source times W_Q, plus the bias b_Q in every row."""
    return X_q @ W_Q + b_Q


def dot_product(Q_h, K_h, d_k, i, j):
    """Score of query i and key j in head h: the dot product of row i of Q_h and row j of K_h."""
    return sum(Q_h[i][t] * K_h[j][t] for t in range(1, d_k + 1))


def scaled_dot_product(Q_h, K_h, d_k, i, j):
    """Score of query i and key j in head h, scaled by 1/√d_k."""
    return sum(Q_h[i][t] * K_h[j][t] for t in range(1, d_k + 1)) / math.sqrt(d_k)


def softmax(Zhat_h, i, k, n_kv):
    """Weight of key k for query i: the softmax of row i of the masked scores, over the keys j."""
    return math.exp(Zhat_h[i][k]) / sum(math.exp(Zhat_h[i][j]) for j in range(1, n_kv + 1))


def softmax_rows(Zhat_h):
    """Row softmax as NumPy code writes it; latexify-py would drop its axis."""
    return np.exp(Zhat_h) / np.sum(np.exp(Zhat_h), axis=-1, keepdims=True)


def head_block(Q, h, d_k):
    """Columns of head h (counted from 0) as NumPy code slices them; latexify-py cannot print slices."""
    return Q[:, h * d_k : (h + 1) * d_k]


# Index and size symbols of the SymPy forms; their names print as i, d_{k}, n_{kv}.
_i, _j, _k, _t, _h = sp.symbols("i j k t h", integer=True)
_d_k = sp.Symbol("d_k", integer=True, positive=True)
_n_kv = sp.Symbol("n_kv", integer=True, positive=True)


def _query_projection_form() -> sp.Expr:
    X_q, W_Q, b_Q = sp.symbols("X_q W_Q b_Q", commutative=False)
    return sp.Add(X_q * W_Q, b_Q, evaluate=False)


def _dot_product_form() -> sp.Expr:
    Q_h, K_h = sp.IndexedBase("(Q_{h})"), sp.IndexedBase("(K_{h})")
    return sp.Sum(sp.Mul(Q_h[_i, _t], K_h[_j, _t], evaluate=False), (_t, 1, _d_k))


def _scaled_dot_product_form() -> sp.Expr:
    return sp.Mul(_dot_product_form(), 1 / sp.sqrt(_d_k), evaluate=False)


def _softmax_form() -> sp.Expr:
    Zhat_h = sp.IndexedBase(r"(\hat{Z}_{h})")
    return sp.exp(Zhat_h[_i, _k]) / sp.Sum(sp.exp(Zhat_h[_i, _j]), (_j, 1, _n_kv))


def _head_block_form() -> sp.Expr:
    return sp.IndexedBase("Q")[_i, sp.Add(sp.Mul(_h, _d_k, evaluate=False), _t, evaluate=False)]


@dataclass(frozen=True)
class Formula:
    """One formula: its left-hand side, its Python definition and the same formula in SymPy.

    ``lhs`` is LaTeX. ``definition`` is typeset by latexify-py when it can be. ``sympy_form``
    builds the SymPy expression that is typeset otherwise.
    """

    name: str
    lhs: str
    definition: Callable[..., Any]
    sympy_form: Callable[[], sp.Expr]


@dataclass(frozen=True)
class RenderedFormula:
    """A typeset formula ``lhs = rhs``, which tool typeset it, and why latexify-py was not used."""

    latex: str
    source: Literal["latexify", "sympy"]
    reason: str | None = None


QUERY_PROJECTION = Formula("query projection", "Q", query_projection, _query_projection_form)
DOT_PRODUCT = Formula("dot product", r"z^{(h)}_{i,j}", dot_product, _dot_product_form)
SCALED_DOT_PRODUCT = Formula(
    "scaled dot product", r"\tilde{z}^{(h)}_{i,j}", scaled_dot_product, _scaled_dot_product_form
)
SOFTMAX = Formula("softmax", r"a^{(h)}_{i,k}", softmax, _softmax_form)
SOFTMAX_ROWS = Formula("row softmax", r"a^{(h)}_{i,k}", softmax_rows, _softmax_form)
HEAD_BLOCK = Formula("head block", r"(Q_{h})_{i,t}", head_block, _head_block_form)


def render_formula(formula: Formula) -> RenderedFormula:
    """Typeset a formula with latexify-py, or from its SymPy form where latexify-py would be wrong.

    >>> render_formula(SOFTMAX).latex.count(r"\\sum_{j = 1}^{{n_{kv}}}")
    1
    >>> rendered = render_formula(SOFTMAX_ROWS)
    >>> rendered.source, rendered.reason
    ('sympy', 'latexify-py drops the keyword arguments axis, keepdims')
    """
    reason = unsupported_construct(formula.definition)
    if reason is None:
        try:
            rhs = latexify.get_latex(formula.definition, use_signature=False)
        except latexify.exceptions.LatexifyError as error:
            reason = f"latexify-py raised {type(error).__name__}: {error}"
        else:
            return RenderedFormula(f"{formula.lhs} = {unescape_names(rhs)}", "latexify")
    rhs = sp.latex(formula.sympy_form(), order="none")
    return RenderedFormula(f"{formula.lhs} = {rhs}", "sympy", reason)


def unsupported_construct(definition: Callable[..., Any]) -> str | None:
    """Describe the first construct in ``definition`` that latexify-py would print wrongly, or None."""
    source = textwrap.dedent(inspect.getsource(definition))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and node.keywords:
            names = ", ".join(keyword.arg or "**" for keyword in node.keywords)
            return f"latexify-py drops the keyword arguments {names}"
        if isinstance(node, ast.Slice):
            return "latexify-py cannot print slices"
        if isinstance(node, ast.Attribute) and node.attr == "T":
            return "latexify-py prints the transpose .T as text"
    return None


def unescape_names(latex: str) -> str:
    """Rewrite latexify-py's escaped names as subscripts: ``\\mathrm{d\\_k}`` becomes ``{d_{k}}``.

    A name followed by an index is put in parentheses, so ``\\mathrm{Q\\_h}_{i, t}`` becomes
    ``(Q_{h})_{i, t}``, the entry (i, t) of Q_h, and no subscript doubles up.

    >>> unescape_names(r"\\sqrt{ \\mathrm{d\\_k} } + \\mathrm{Zhat\\_h}_{i, k}")
    '\\\\sqrt{ {d_{k}} } + (\\\\hat{Z}_{h})_{i, k}'
    """

    def replace(match: re.Match) -> str:
        base = match["base"]
        if match["accent"]:
            base = f"\\{match['accent']}{{{base}}}"
        if latex.startswith("_{", match.end()):
            return f"({base}_{{{match['sub']}}})"
        # TeX unwraps a group that contains only an accent, and the empty {} prevents that.
        return f"{{{base}_{{{match['sub']}}}{{}}}}" if match["accent"] else f"{{{base}_{{{match['sub']}}}}}"

    return _ESCAPED_NAME.sub(replace, latex)
