"""Compact displays of stages and derivations for Jupyter notebooks.

A stage is a plain SymPy ImmutableMatrix, and its own ``_repr_latex_`` prints every entry in
full. A symbolic softmax entry runs to thousands of characters, so ``show`` returns a
``StageView`` whose LaTeX abbreviates long entries with a marker that states what was left out:

- a sum of more than ``max_terms`` terms keeps its first SHOWN_TERMS and ends with
  ``+ \\cdots`` and the count, as in ``a + b + \\cdots \\text{(412 terms)}``;
- an entry whose LaTeX is still longer than ``max_entry_chars`` keeps its outer structure down
  to the deepest level that fits, with every deeper part written ``\\cdots``, and ends with
  ``\\text{[N operations]}``, N being SymPy's ``count_ops`` of the whole entry;
- a matrix with more than 8 rows or columns shows the first 6 and the last one
  (``notation.matrix_latex``), with its shape beside it.

``summary`` describes a whole Derivation in a few lines: sizes, scale, masks, symbols, the
stage names and the output, as text and as an HTML table. A Derivation shows itself in Jupyter
with it. Nothing here changes a stage: ``derivation[name]`` stays the exact matrix.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sympy as sp
from sympy.printing.latex import LatexPrinter

from .errors import InvalidInputError
from .export.notation import (
    ABBREVIATED_HEAD,
    MAX_SHOWN_COLS,
    MAX_SHOWN_ROWS,
    matrix_latex,
    stage_symbol,
    symbol_names,
)

if TYPE_CHECKING:
    from .derive import Derivation

DEFAULT_MAX_TERMS = 8
SHOWN_TERMS = 2
DEFAULT_MAX_ENTRY_CHARS = 240
SUMMARY_DIGITS = 6
# The summary prints at most this many output rows.
SUMMARY_ROWS = 4


@dataclass(frozen=True)
class StageView:
    """One matrix typeset for a notebook, with long entries abbreviated.

    ``latex``: the math, without delimiters; ``abbreviated``: how many entries were shortened.
    """

    latex: str
    abbreviated: int

    def _repr_latex_(self) -> str:
        return f"$\\displaystyle {self.latex}$"

    def __str__(self) -> str:
        return self.latex


def show(
    matrix: sp.MatrixBase,
    name: str | None = None,
    *,
    max_terms: int = DEFAULT_MAX_TERMS,
    max_entry_chars: int = DEFAULT_MAX_ENTRY_CHARS,
) -> StageView:
    """Typeset ``matrix`` for a notebook, abbreviating long entries (see the module docstring).

    ``name`` is a stage or input name such as ``"A_0"`` or ``"W_Q"``, shown as its symbol
    (``A_{0} = …``); another name is shown as plain text.

    >>> view = show(sp.Matrix([[sp.Add(*sp.symbols("a:z"))]]), "Z_0", max_entry_chars=40)
    >>> print(view.latex)
    Z_{0} = \\begin{bmatrix}
    a + b + \\cdots \\text{(26 terms)}
    \\end{bmatrix}
    """
    if max_terms < SHOWN_TERMS + 1:
        raise InvalidInputError(f"max_terms is {max_terms}; expected at least {SHOWN_TERMS + 1}")
    if max_entry_chars < 1:
        raise InvalidInputError(f"max_entry_chars is {max_entry_chars}; expected a positive number")
    names = _names(matrix)
    rows, cols = _shown(matrix.rows, MAX_SHOWN_ROWS), _shown(matrix.cols, MAX_SHOWN_COLS)
    entries = []
    abbreviated = 0
    for i in range(matrix.rows):
        row = []
        for j in range(matrix.cols):
            if i in rows and j in cols:
                text, shortened = entry_latex(matrix[i, j], names, max_terms, max_entry_chars)
                abbreviated += shortened
            else:
                text = ""  # matrix_latex leaves this entry out
            row.append(text)
        entries.append(row)

    latex = matrix_latex(entries)
    if matrix.rows > MAX_SHOWN_ROWS or matrix.cols > MAX_SHOWN_COLS:
        latex += f" \\quad \\text{{({matrix.rows} × {matrix.cols})}}"
    if name is not None:
        latex = f"{_name_latex(name)} = {latex}"
    return StageView(latex, abbreviated)


def _shown(size: int, limit: int) -> set[int]:
    """Return the indices that notation.matrix_latex shows of ``size`` rows or columns."""
    if size <= limit:
        return set(range(size))
    return set(range(ABBREVIATED_HEAD)) | {size - 1}


def entry_latex(
    expr: sp.Expr,
    names: dict[sp.Symbol, str] | None = None,
    max_terms: int = DEFAULT_MAX_TERMS,
    max_entry_chars: int = DEFAULT_MAX_ENTRY_CHARS,
) -> tuple[str, bool]:
    """Typeset one entry, abbreviated when long, and tell whether it was.

    >>> entry_latex(sp.exp(sp.Symbol("w")) / 2)
    ('\\\\frac{e^{w}}{2}', False)
    """
    settings = {"symbol_names": names or {}}
    full = _AbbreviatingPrinter(settings, max_terms=None, max_depth=None).doprint(expr)
    if len(full) <= max_entry_chars:
        return full, False

    printer = _AbbreviatingPrinter(settings, max_terms=max_terms, max_depth=None)
    text = printer.doprint(expr)
    if len(text) <= max_entry_chars:
        return text, True

    # Keep the outer structure: the deepest level whose skeleton fits.
    operations = sp.count_ops(expr)
    marker = f" \\;\\text{{[{operations} operations]}}"
    best = r"\cdots"
    for depth in range(1, _depth(expr) + 1):
        skeleton = _AbbreviatingPrinter(settings, max_terms=max_terms, max_depth=depth).doprint(expr)
        if len(skeleton) > max_entry_chars:
            break
        best = skeleton
    return best + marker, True


class _AbbreviatingPrinter(LatexPrinter):
    """SymPy's LaTeX printer, with long sums cut to SHOWN_TERMS and parts below ``max_depth`` elided."""

    def __init__(self, settings: dict, max_terms: int | None, max_depth: int | None) -> None:
        super().__init__(settings)
        self.max_terms = max_terms
        self.max_depth = max_depth
        self.depth = 0

    def _print(self, expr: Any, **kwargs: Any) -> str:
        if self.max_depth is not None and isinstance(expr, sp.Basic) and expr.args and self.depth >= self.max_depth:
            return r"\cdots"
        self.depth += 1
        try:
            return super()._print(expr, **kwargs)
        finally:
            self.depth -= 1

    def _print_Add(self, expr: sp.Add, order: Any = None) -> str:
        terms = self._as_ordered_terms(expr, order=order)
        if self.max_terms is None or len(terms) <= self.max_terms:
            return super()._print_Add(expr, order)
        shown = super()._print_Add(sp.Add(*terms[:SHOWN_TERMS], evaluate=False), order="none")
        return f"{shown} + \\cdots \\text{{({len(terms)} terms)}}"


def _depth(expr: sp.Basic) -> int:
    if not expr.args:
        return 0
    return 1 + max(_depth(arg) for arg in expr.args)


def _names(matrix: sp.MatrixBase) -> dict[sp.Symbol, str]:
    """Map symbols to symattn's LaTeX names; a symbol made outside symattn keeps SymPy's."""
    try:
        return symbol_names(matrix)
    except InvalidInputError:
        return {}


def _name_latex(name: str) -> str:
    try:
        return stage_symbol(name)
    except KeyError:
        return f"\\text{{{_escape_math_text(name)}}}"


def _escape_math_text(text: str) -> str:
    return "".join(f"\\{c}" if c in "_{}$&#%" else c for c in text if c.isprintable() and c not in "\\^~")


# The summary of a derivation.


@dataclass(frozen=True)
class DerivationSummary:
    """A few lines that describe a Derivation: its sizes, options, symbols, stages and output.

    ``lines`` pairs a label with its text; ``output`` contains the first SUMMARY_ROWS output rows
    to SUMMARY_DIGITS digits, or is empty when the output has free symbols.
    """

    title: str
    lines: tuple[tuple[str, str], ...]
    output: tuple[tuple[str, ...], ...]
    output_note: str

    def __str__(self) -> str:
        text = [self.title]
        text += [f"  {label}: {value}" for label, value in self.lines]
        text.append(f"  output: {self.output_note}")
        text += ["    [" + ", ".join(row) + "]" for row in self.output]
        return "\n".join(text)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style=\"text-align:left\">{html.escape(label)}</th>"
            f"<td style=\"text-align:left\">{html.escape(value)}</td></tr>"
            for label, value in self.lines
        )
        output = "".join(
            "<tr>" + "".join(f"<td>{html.escape(value)}</td>" for value in row) + "</tr>" for row in self.output
        )
        table = f"<table>{output}</table>" if output else ""
        return (
            f"<div><strong>{html.escape(self.title)}</strong><table>{rows}"
            f"<tr><th style=\"text-align:left\">output</th><td style=\"text-align:left\">"
            f"{html.escape(self.output_note)}{table}</td></tr></table></div>"
        )


def summary(derivation: "Derivation") -> DerivationSummary:
    """Describe ``derivation`` in a few lines, as Derivation's display in Jupyter shows it.

    >>> from symattn import derive_direct
    >>> print(summary(derive_direct([[1, 0]], [[1, 0], [0, 1]], [[2], [4]])))
    Derivation: 1 head, 1 query, 2 keys (direct mode: Q, K and V given)
      sizes: d_model 2 (d_k 2 per head), d_v 1 per head, output 1 × 1
      inputs: Q 1 × 2, K 2 × 2, V 2 × 1
      scale: sqrt(2)/2 (sqrt_dk)
      masks: none; fully masked rows: error
      symbols: none
      stages: Q, K, V; per head i = 0: Q_i, K_i, V_i, Z_i, Z_scaled_i, Z_masked_i, A_i, O_i; concat, output
      output: to 6 significant digits
        [2.66048]
    """
    from .derive import HEAD_STAGES
    from .numeric.decimals import matrix_to_decimals

    d = derivation
    mode = "direct mode: Q, K and V given" if d.direct else "projections from the input sources"
    title = (
        f"Derivation: {_count(d.heads, 'head')}, {_count(d.n_q, 'query', 'queries')}, "
        f"{_count(d.n_kv, 'key')} ({mode})"
    )
    output = d.output
    heads = ", ".join(str(i) for i in range(d.heads))
    lines = [
        ("sizes", f"d_model {d.stages['Q'].cols} (d_k {d.d_k} per head), d_v {d.d_v} per head, "
                  f"output {output.rows} × {output.cols}"),
        ("inputs", ", ".join(f"{name} {m.rows} × {m.cols}" for name, m in d.inputs.items())),
        ("scale", f"{sp.sstr(d.scale)} ({d.spec.scale if isinstance(d.spec.scale, str) else 'given'})"),
        ("masks", f"{_masks(d)}; fully masked rows: {d.spec.masked_rows}"),
        ("symbols", ", ".join(sorted(s.name for s in d.free_symbols)) or "none"),
        ("stages", f"Q, K, V; per head i = {heads}: "
                   f"{', '.join(f'{stage}_i' for stage in HEAD_STAGES)}; concat, output"),
    ]

    if output.free_symbols:
        return DerivationSummary(title, tuple(lines), (), "symbolic; show it with derivation.show('output')")
    shown = output[: min(SUMMARY_ROWS, output.rows), :]
    decimals = matrix_to_decimals(shown, SUMMARY_DIGITS)
    note = f"to {SUMMARY_DIGITS} significant digits"
    if output.rows > SUMMARY_ROWS:
        note += f", the first {SUMMARY_ROWS} of {output.rows} rows"
    return DerivationSummary(title, tuple(lines), tuple(tuple(row) for row in decimals), note)


def _count(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number} {singular if number == 1 else (plural or singular + 's')}"


def _masks(d: "Derivation") -> str:
    spec = d.spec
    parts = [f"{mask.kind} mask {'×'.join(map(str, mask.shape))}" for mask in spec.masks]
    if spec.causal is not None:
        parts.append(f"causal ({spec.causal})")
    if spec.key_length is not None:
        parts.append(f"key length {spec.key_length}")
    return ", ".join(parts) or "none"
