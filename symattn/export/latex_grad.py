"""The gradient worked example: a LaTeX document that follows one gradient entry back through the stages.

``gradient_example(derivation, objective, wrt, entry)`` returns the source, for example the
chain of ∂L/∂W_Q[0, 0] with L the sum of the output. Writing X̄ for ∂L/∂X (a matrix shaped
like X), the document shows, with values, the upstream gradient Ȳ, then C̄ = Ȳ W_Oᵀ, each head's
Ō_h, Ā_h = Ō_h V_hᵀ, the softmax backward with one row written out, the mask and the scale,
Q̄_h = Z̄_h K_h (or K̄_h, V̄_h), the assembled Q̄ and finally the requested entry as a sum of
products. Only the heads that reach the entry are shown.

Symbols come from the same notation table as the forward worked example (``notation``), and
the document uses the same preamble, so the two read alike and build with the same ``build_pdf``.
Gradient values are shown to DOCUMENT_DIGITS digits, certified by ball arithmetic where
python-flint is installed; the JSON file written beside the document contains them exactly and to
the requested digits.
"""

from __future__ import annotations

from typing import Any

import sympy as sp

from ..derive import Derivation
from ..errors import InvalidInputError, UnsupportedError
from ..gradients import backward, objective_seeds
from ..numeric.balls import certified_decimals
from ..numeric.decimals import DEFAULT_DIGITS, check_digits
from .latex import DOCUMENT_DIGITS, assemble_document, display_matrix, exact_entries, is_wide, title_block
from .notation import (
    ENTRY_SYMBOLS,
    decimal_latex,
    entry_symbol,
    expression_latex,
    fit_to_width,
    matrix_latex,
    stage_symbol,
    symbol_names,
)

DEFAULT_TITLE = "Worked example: a gradient of multi-head attention"

# The stage whose gradient each input's gradient is formed from, and the source it multiplies.
_PROJECTION_OF = {
    "W_Q": ("Q", "query_source"), "b_Q": ("Q", "query_source"), "query_source": ("Q", "W_Q"),
    "W_K": ("K", "key_source"), "b_K": ("K", "key_source"), "key_source": ("K", "W_K"),
    "W_V": ("V", "value_source"), "b_V": ("V", "value_source"), "value_source": ("V", "W_V"),
}


def gradient_example(
    derivation: Derivation,
    objective: Any = "sum",
    wrt: str = "W_Q",
    entry: tuple[int, int] = (0, 0),
    meta: object = None,
    digits: int = DEFAULT_DIGITS,
) -> str:
    """Return the LaTeX source of the worked example of ∂L/∂wrt[entry].

    ``objective`` is "sum", an output entry such as ``("output", 0, 1)``, or an upstream
    gradient G shaped like the output (see ``gradients.objective_seeds``). An objective that
    reads other stages raises UnsupportedError. ``wrt`` names an input and ``entry`` (row, column,
    from 0) one of its entries. ``meta`` supplies ``title`` and ``description`` (plain text).
    ``digits`` is the precision of the companion JSON file, which the document states.
    """
    check_digits(digits)
    return _GradientExample(derivation, objective, wrt, entry, meta, digits).document()


class _GradientExample:
    """Builds the document one step of the chain at a time, from the output back to the input."""

    def __init__(self, derivation: Derivation, objective: Any, wrt: str, entry: tuple[int, int],
                 meta: object, digits: int) -> None:
        self.d = derivation
        self.objective = objective
        self.wrt = wrt
        self.entry = _checked_entry(derivation, wrt, entry)
        self.meta = meta
        self.digits = digits
        self.shown_digits = min(digits, DOCUMENT_DIGITS)

        seeds = objective_seeds(derivation, objective)
        if set(seeds) != {"output"}:
            raise UnsupportedError(
                f"the gradient worked example follows objectives of the output only, but this "
                f"one reads {', '.join(sorted(seeds))}; use Derivation.grad for it"
            )
        self.upstream = seeds["output"]
        self.grads = backward(derivation, seeds)
        self.names = symbol_names(*derivation.inputs.values(), self.upstream)
        self.heads = self._heads_reached()
        self.elided = False

    def document(self) -> str:
        body = [self.title(), self.setting(), self.output_projection()]
        if self.wrt not in ("W_O", "b_O"):
            for head in self.heads:
                body.append(self.head_chain(head))
            body.append(self.assembled())
        body.append(self.result())
        if self.elided:
            body.append(
                "\\section*{Elided entries}\n"
                "An entry shown as $\\elided$ has an exact form too wide to print here, and a long "
                "symbolic factor is written as the entry it stands for. The JSON file written with "
                "this document holds every exact form.\n"
            )
        return assemble_document(body)

    # Sections, from the output back to the input.

    def title(self) -> str:
        return title_block(self.meta, DEFAULT_TITLE)

    def setting(self) -> str:
        row, col = self.entry
        target = f"\\frac{{\\partial L}}{{\\partial ({stage_symbol(self.wrt)})_{{{row + 1},{col + 1}}}}}"
        return (
            "\\section{The objective}\n"
            f"The objective is {self._objective_words()}. This document computes ${target}$, "
            "entry $(" f"{row + 1}, {col + 1}" ")$ of the gradient with respect to "
            f"${stage_symbol(self.wrt)}$, in reverse mode: each stage hands the gradient it "
            "receives back to the stages it was built from.\n\n"
            "For any stage or input $X$, $\\overline{X}$ stands for $\\partial L / \\partial X$, "
            "a matrix shaped like $X$. Rows and columns count from 1 and heads from 0, as in "
            "the forward worked example. Decimals have "
            f"{self.shown_digits} correctly rounded significant digits; the JSON file written "
            f"with this document holds every gradient exactly and to {self.digits} digits.\n"
            f"\\[ \\overline{{Y}} = \\frac{{\\partial L}}{{\\partial Y}} \\]\n"
            + self.show(_bar("output"), self.upstream)
        )

    def _objective_words(self) -> str:
        if self.objective == "sum":
            return "the sum of the output entries, $L = \\sum_{i,j} y_{i,j}$, so every entry of $\\overline{Y}$ is 1"
        if isinstance(self.objective, (tuple, str)):
            row, col = next((i, j) for i in range(self.upstream.rows) for j in range(self.upstream.cols)
                            if self.upstream[i, j] != 0)
            return (
                f"one output entry, $L = {entry_symbol('output', row + 1, col + 1)}$, so "
                "$\\overline{Y}$ is 1 at that entry and 0 elsewhere"
            )
        return (
            "the weighted sum $L = \\langle G, Y \\rangle = \\sum_{i,j} g_{i,j}\\, y_{i,j}$ with "
            "the upstream gradient $G$, so $\\overline{Y} = G$"
        )

    def output_projection(self) -> str:
        d = self.d
        if "W_O" not in d.inputs:
            return (
                "\\section{Output}\n"
                "There is no output projection, so the output is the concatenation of the heads "
                "and $\\overline{C} = \\overline{Y}$.\n"
            )
        text = (
            "\\section{Output projection}\n"
            "The output is $Y = C\\, W_{O} + b_{O}$. A product $Y = C W$ hands back "
            "$\\overline{C} = \\overline{Y} W^{T}$ and $\\overline{W} = C^{T} \\overline{Y}$, "
            "and a bias added to every row gets the column sums of $\\overline{Y}$.\n"
            "\\[ \\overline{C} = \\overline{Y}\\, W_{O}^{T} \\]\n"
        )
        if self.wrt in ("W_O", "b_O"):
            return text
        return text + self.show(_bar("concat"), self.grads["concat"])

    def head_chain(self, head: int) -> str:
        d = self.d
        text = [
            f"\\section{{Head {head}}}",
            f"Head {head} owns the columns {head * d.d_v + 1} to {(head + 1) * d.d_v} of $C$, so "
            f"$\\overline{{O}}_{{{head}}}$ is that block of $\\overline{{C}}$.",
            self.show(_bar(f"O_{head}"), self.grads[f"O_{head}"]),
        ]
        path = self._path()
        if path == "V":
            text.append(
                f"From $O_{{{head}}} = A_{{{head}}} V_{{{head}}}$, the values get "
                f"$\\overline{{V}}_{{{head}}} = A_{{{head}}}^{{T}}\\, \\overline{{O}}_{{{head}}}$, "
                "with the attention weights"
            )
            text.append(self.show_forward(f"A_{head}"))
            text.append(self.show(_bar(f"V_{head}"), self.grads[f"V_{head}"]))
            return "\n\n".join(text) + "\n"

        text.append(
            f"From $O_{{{head}}} = A_{{{head}}} V_{{{head}}}$, the weights get "
            f"$\\overline{{A}}_{{{head}}} = \\overline{{O}}_{{{head}}}\\, V_{{{head}}}^{{T}}$, with the values"
        )
        text.append(self.show_forward(f"V_{head}"))
        text.append(self.show(_bar(f"A_{head}"), self.grads[f"A_{head}"]))
        text.append(self.softmax_backward(head))
        text.append(self.mask_and_scale(head))
        if path == "Q":
            text.append(
                f"From $Z_{{{head}}} = Q_{{{head}}} K_{{{head}}}^{{T}}$, the queries get "
                f"$\\overline{{Q}}_{{{head}}} = \\overline{{Z}}_{{{head}}}\\, K_{{{head}}}$, with the keys"
            )
            text.append(self.show_forward(f"K_{head}"))
            text.append(self.show(_bar(f"Q_{head}"), self.grads[f"Q_{head}"]))
        else:
            text.append(
                f"From $Z_{{{head}}} = Q_{{{head}}} K_{{{head}}}^{{T}}$, the keys get "
                f"$\\overline{{K}}_{{{head}}} = \\overline{{Z}}_{{{head}}}^{{T}}\\, Q_{{{head}}}$, with the queries"
            )
            text.append(self.show_forward(f"Q_{head}"))
            text.append(self.show(_bar(f"K_{head}"), self.grads[f"K_{head}"]))
        return "\n\n".join(text) + "\n"

    def softmax_backward(self, head: int) -> str:
        A, G_A = self.d[f"A_{head}"], self.grads[f"A_{head}"]
        row = self._written_row(G_A)
        weights = [self._number(A[row, k], entry_symbol("A", row + 1, k + 1, head)) for k in range(A.cols)]
        upstream = [self._number(G_A[row, k], _bar_entry("A", row + 1, k + 1, head)) for k in range(A.cols)]
        weighted = sp.Add(*(G_A[row, k] * A[row, k] for k in range(A.cols)))
        a, g = entry_symbol("A", row + 1, "k", head), _bar_entry("A", row + 1, "k", head)
        terms = " + ".join(f"({u})({w})" for u, w in zip(upstream, weights))
        if not weighted.free_symbols:
            relation = "=" if isinstance(weighted, sp.Rational) else "\\approx"
            terms += f" {relation} {self._number(weighted, '')}"
        return (
            "Each row of weights is the softmax of its row of masked scores, whose Jacobian is "
            "$\\operatorname{diag}(a) - a a^{T}$. Applied to the row of $\\overline{A}$ it gives\n"
            f"\\[ \\overline{{\\hat{{Z}}}}_{{{head}}} = A_{{{head}}} \\circ \\left(\\overline{{A}}_{{{head}}} "
            f"- \\operatorname{{rowsum}}(\\overline{{A}}_{{{head}}} \\circ A_{{{head}}})\\, \\mathbf{{1}}^{{T}}\\right),"
            f" \\qquad \\overline{{\\hat{{z}}}}{{}}^{{({head})}}_{{{row + 1},k}} = {a} \\Big( {g} "
            f"- \\sum_{{j}} \\overline{{a}}{{}}^{{({head})}}_{{{row + 1},j}}\\, a^{{({head})}}_{{{row + 1},j}} \\Big) \\]\n"
            f"For row {row + 1} the weights are $({', '.join(weights)})$, so the sum is\n"
            + fit_to_width(f"\\sum_{{j}} \\overline{{a}}{{}}^{{({head})}}_{{{row + 1},j}}\\, a^{{({head})}}_{{{row + 1},j}} = {terms}")
            + self.show(_bar(f"Z_masked_{head}"), self.grads[f"Z_masked_{head}"])
        )

    def mask_and_scale(self, head: int) -> str:
        d = self.d
        scale = expression_latex(d.scale, self.names)
        if d.spec.has_mask:
            mask = (
                "A hidden score is the constant $-\\infty$, so no gradient passes through it: "
                f"$\\overline{{\\tilde{{Z}}}}_{{{head}}}$ equals $\\overline{{\\hat{{Z}}}}_{{{head}}}$ on "
                "visible entries and is 0 on hidden ones; an additive mask value is a constant "
                "and passes the gradient unchanged. "
            )
        else:
            mask = (
                "There is no mask, so the masked scores equal the scaled scores, and the gradient "
                "with respect to the scaled scores is the one just found. "
            )
        return (
            mask + f"The scaled scores are $\\tilde{{Z}}_{{{head}}} = s\\, Z_{{{head}}}$ with $s = {scale}$, so\n"
            f"\\[ \\overline{{Z}}_{{{head}}} = s\\, \\overline{{\\tilde{{Z}}}}_{{{head}}} \\]\n"
            + self.show(_bar(f"Z_{head}"), self.grads[f"Z_{head}"])
        )

    def assembled(self) -> str:
        path = self._path()
        heads = ", ".join(str(h) for h in self.heads)
        others = "" if len(self.heads) == self.d.heads else " The other heads' blocks do not reach this entry."
        return (
            f"\\section{{Assembling $\\overline{{{path}}}$}}\n"
            f"Head $h$ owns a block of columns of ${path}$, so $\\overline{{{path}}}$ places each "
            f"head's gradient in its block (heads shown: {heads}).{others}\n"
            + self.show(_bar(path), self.grads[path])
        )

    def result(self) -> str:
        row, col = self.entry
        gradient = self.grads[self.wrt]
        value = gradient[row, col]
        lhs = f"({_bar(self.wrt)})_{{{row + 1},{col + 1}}}"
        text = [f"\\section{{The gradient of ${stage_symbol(self.wrt)}$}}", self._last_step()]
        written = self._entry_as_sum()
        if written:
            text.append(fit_to_width(f"{lhs} = {written}"))
        exact = expression_latex(value, self.names)
        if not is_wide(exact):
            approximation = "" if value.free_symbols or isinstance(value, sp.Rational) else f" \\approx {self._decimal(value)}"
            text.append(fit_to_width(f"{lhs} = {exact}{approximation}"))
        elif not value.free_symbols:
            text.append(fit_to_width(f"{lhs} \\approx {self._decimal(value)}"))
        else:
            self.elided = True
        text.append("The whole gradient is")
        text.append(self.show(_bar(self.wrt), gradient))
        return "\n\n".join(text) + "\n"

    def _last_step(self) -> str:
        wrt = self.wrt
        if wrt == "W_O":
            return "A weight that multiplies from the right gets $\\overline{W}_{O} = C^{T}\\, \\overline{Y}$."
        if wrt == "b_O":
            return "The bias is added to every row, so $\\overline{b}_{O}$ holds the column sums of $\\overline{Y}$."
        if self.d.direct:
            return f"${wrt}$ is an input of this derivation, so its gradient is $\\overline{{{wrt}}}$ itself."
        stage, other = _PROJECTION_OF[wrt]
        if wrt.startswith("W_"):
            return (
                f"From ${stage} = {stage_symbol(other)}\\, {stage_symbol(wrt)} + {stage_symbol('b_' + stage)}$, "
                f"the weight gets $\\overline{{W}}_{{{stage}}} = {stage_symbol(other)}^{{T}}\\, \\overline{{{stage}}}$, "
                f"so entry $({self.entry[0] + 1}, {self.entry[1] + 1})$ sums over the tokens:"
            )
        if wrt.startswith("b_"):
            zero = (
                " This gradient is exactly 0 for every objective of the output: the bias adds the "
                "same $q \\cdot b_{K}$ to every score of a row, which the softmax ignores."
                if wrt == "b_K" else ""
            )
            return f"The bias is added to every row of ${stage}$, so $\\overline{{b}}_{{{stage}}}$ holds the column sums of $\\overline{{{stage}}}$.{zero}"
        return (
            f"From ${stage} = {stage_symbol(wrt)}\\, {stage_symbol(other)} + {stage_symbol('b_' + stage)}$, "
            f"the source gets $\\overline{{{stage_symbol(wrt)}}} = \\overline{{{stage}}}\\, {stage_symbol(other)}^{{T}}$:"
        )

    def _entry_as_sum(self) -> str | None:
        """Write the requested entry as the sum of products that forms it, with decimals."""
        row, col = self.entry
        wrt = self.wrt
        if wrt in _PROJECTION_OF and wrt.startswith("W_"):
            stage, source = _PROJECTION_OF[wrt]
            X, G = self.d.inputs[source], self.grads[stage]
            pairs = [
                (self._number(X[r, row], "x"), self._number(G[r, col], _bar_entry(stage, r + 1, col + 1)))
                for r in range(X.rows)
            ]
        elif wrt in _PROJECTION_OF and not wrt.startswith("b_"):
            stage, weight = _PROJECTION_OF[wrt]
            W, G = self.d.inputs[weight], self.grads[stage]
            pairs = [
                (self._number(G[row, k], _bar_entry(stage, row + 1, k + 1)), self._number(W[col, k], "w"))
                for k in range(W.cols)
            ]
        elif wrt == "W_O":
            C, G = self.d["concat"], self.grads["output"]
            pairs = [
                (self._number(C[r, row], entry_symbol("concat", r + 1, row + 1)),
                 self._number(G[r, col], _bar_entry("output", r + 1, col + 1)))
                for r in range(C.rows)
            ]
        else:
            return None
        return " + ".join(f"({a})({b})" for a, b in pairs)

    # Helpers.

    def _heads_reached(self) -> list[int]:
        """Return the heads whose gradient reaches the requested entry."""
        d, wrt = self.d, self.wrt
        if wrt in ("query_source", "key_source", "value_source", "W_O", "b_O"):
            return list(range(d.heads))  # a source feature reaches every head through its weights
        stage = _PROJECTION_OF[wrt][0] if wrt in _PROJECTION_OF else wrt
        width = d.d_v if stage == "V" else d.d_k
        return [self.entry[1] // width]

    def _path(self) -> str:
        """Return the projection, Q, K or V, through which the gradient reaches ``wrt``."""
        return _PROJECTION_OF[self.wrt][0] if self.wrt in _PROJECTION_OF else self.wrt

    def _written_row(self, G_A: sp.MatrixBase) -> int:
        """Return the row of the softmax written out: the first with a nonzero upstream gradient."""
        for row in range(G_A.rows):
            if any(entry != 0 for entry in G_A.row(row)):
                return row
        return 0

    def show(self, lhs: str, matrix: sp.MatrixBase) -> str:
        """Display a gradient: exactly when its entries are short rationals or symbols, else as
        certified decimals."""
        if matrix.free_symbols:
            entries = [[r"\elided" if is_wide(e) else e for e in row] for row in exact_entries(matrix, self.names)]
            self.elided = self.elided or any(r"\elided" in row for row in entries)
            return fit_to_width(f"{lhs} = {matrix_latex(entries)}")
        if all(isinstance(e, sp.Rational) for e in matrix):
            exact = exact_entries(matrix, self.names)
            if not any(is_wide(e) for row in exact for e in row):
                return fit_to_width(f"{lhs} = {matrix_latex(exact)}")
        decimals = certified_decimals(sp.Matrix(matrix), self.shown_digits).decimals
        return fit_to_width(f"{lhs} \\approx {matrix_latex([[decimal_latex(t) for t in row] for row in decimals])}")

    def show_forward(self, stage: str) -> str:
        return display_matrix(stage_symbol(stage), self.d[stage], self.names, self.shown_digits).latex

    def _decimal(self, value: sp.Expr) -> str:
        if value.free_symbols:
            return expression_latex(value, self.names)
        return decimal_latex(certified_decimals(sp.Matrix([[value]]), self.shown_digits).decimals[0][0])

    def _number(self, value: sp.Expr, symbol: str) -> str:
        """Typeset a value exactly when it is short, else as its decimal, or as ``symbol`` when
        it is a long symbolic expression."""
        exact = expression_latex(value, self.names)
        if not is_wide(exact) and (value.free_symbols or isinstance(value, sp.Rational)):
            return exact
        if value.free_symbols:
            return symbol
        return self._decimal(value)


def _checked_entry(derivation: Derivation, wrt: str, entry: tuple[int, int]) -> tuple[int, int]:
    if wrt not in derivation.inputs:
        raise InvalidInputError(
            f"wrt is {wrt!r}; the gradient worked example takes an input of this derivation: "
            f"{', '.join(derivation.inputs)}"
        )
    rows, cols = derivation.inputs[wrt].shape
    row, col = entry
    if not (0 <= row < rows and 0 <= col < cols):
        raise InvalidInputError(
            f"entry {entry} is outside {wrt}, which has shape ({rows}, {cols}); indices count from 0"
        )
    return row, col


def _bar_entry(stage: str, row: int | str, col: int | str, head: int | None = None) -> str:
    """Return the LaTeX of ∂L/∂(one entry of a stage), such as ``\\overline{q}{}_{1,2}``."""
    letter = ENTRY_SYMBOLS[stage].removesuffix("{}")
    superscript = "" if head is None else f"^{{({head})}}"
    return f"\\overline{{{letter}}}{{}}{superscript}_{{{row},{col}}}"


def _bar(name: str) -> str:
    """Return the LaTeX of ∂L/∂(stage): the stage's symbol under a bar, subscript outside."""
    symbol = stage_symbol(name)
    if "_{" not in symbol:
        return f"\\overline{{{symbol}}}"
    base, subscript = symbol.split("_{", 1)
    return f"\\overline{{{base}}}_{{{subscript}"
