"""The worked example: a standalone LaTeX document that walks every stage of a derivation.

``worked_example(derivation)`` returns the LaTeX source, and ``build_pdf`` compiles it. The
document follows the pipeline: the input sources, the learnable parameters, Q, K and V, the
split into heads, the scores Z, the scaling, the mask (when there is one), the softmax with one
row written out entry by entry, the head outputs, the concatenation and the output projection.
Each step has a sentence of prose and its formula, typeset by ``formulas``.

How a matrix is shown:

- Each matrix is typeset exactly in a bmatrix, abbreviated when it has many rows or columns
  (``notation.matrix_latex``), and every display shrinks to the line width when it is wider.
- An exact entry wider than LONG_ENTRY_WIDTH, judged as typeset with the short fractions of
  its exponents on one line, is shown as ``\\elided``. A numeric matrix with elided or
  irrational entries is also shown to DOCUMENT_DIGITS correctly rounded significant digits,
  and only so when more than MAX_ELIDED_SHARE of its entries are elided. A symbolic matrix
  with elided entries is shown instead in terms of the entries of the stage before it, where
  it has one.
- The JSON file written next to the document contains every exact form and the decimals to the
  requested precision; the document states that precision.

The source is deterministic: the same derivation gives the same bytes. Symbol names are
typeset from their validated form (``notation.symbol_latex``) and the title and description
are escaped (``notation.escape_text``), so no input can reach a LaTeX command.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import sympy as sp

from ..derive import Derivation, softmax_rows
from ..errors import OutputError
from ..numeric.decimals import DEFAULT_DIGITS, check_digits, matrix_to_decimals
from ..progress import Progress, Stopwatch
from ..spec import Mask
from . import formulas
from .files import write_files
from .notation import (
    MACROS,
    MAX_SHOWN_COLS,
    decimal_latex,
    entry_symbol,
    escape_text,
    expression_latex,
    fit_to_width,
    matrix_latex,
    stage_symbol,
    symbol_names,
)

DOCUMENT_DIGITS = 6
# Estimated widths, in characters as typeset (see _measure): an exact entry wider than
# LONG_ENTRY_WIDTH is elided, exact and decimal forms share a line up to SHARED_LINE_WIDTH, and
# matrices stand side by side up to SIDE_BY_SIDE_WIDTH.
LONG_ENTRY_WIDTH = 24.0
SHARED_LINE_WIDTH = 60.0
SIDE_BY_SIDE_WIDTH = 70.0
# A numeric matrix with more than this share of its exact entries elided shows only decimals,
# since a matrix of mostly \elided is of little use.
MAX_ELIDED_SHARE = 0.5
FRACTION_ROW_GAP = "1.5ex"
MAX_PLAIN_DENOMINATOR = 1000
DEFAULT_TITLE = "Worked example: multi-head attention"
PDFLATEX_TIMEOUT_SECONDS = 120

PREAMBLE = (
    # pdfTeX writes no dates, no trailer id and no build paths, so builds are byte-identical.
    r"\ifdefined\pdfinfoomitdate \pdfinfoomitdate=1 \fi" "\n"
    r"\ifdefined\pdftrailerid \pdftrailerid{} \fi" "\n"
    r"\ifdefined\pdfsuppressptexinfo \pdfsuppressptexinfo=-1 \fi" "\n"
    r"\documentclass[11pt]{article}" "\n"
    r"\usepackage[a4paper,margin=2cm]{geometry}" "\n"
    r"\usepackage{amsmath,amssymb}" "\n"
    r"\usepackage{adjustbox}" "\n"
    r"\setlength{\parindent}{0pt}" "\n"
    r"\setlength{\parskip}{0.6em}" "\n"
    r"\allowdisplaybreaks" "\n"
) + MACROS


def worked_example(derivation: Derivation, meta: object = None, digits: int = DEFAULT_DIGITS) -> str:
    """Return the LaTeX source of the worked example of ``derivation``.

    ``meta`` is anything with ``title`` and ``description`` attributes (plain text, such as a
    loaders.DerivationMeta) or None. ``digits`` is the precision of the companion JSON file,
    which the document states; the document itself shows min(digits, DOCUMENT_DIGITS) digits.

    Raises InvalidInputError when a symbol name or the title cannot be typeset safely.
    """
    check_digits(digits)
    return _WorkedExample(derivation, meta, digits).document()


def title_block(meta: Any, default_title: str) -> str:
    """Typeset the document title and the description's paragraphs, escaped as plain text."""
    title = getattr(meta, "title", None) or default_title
    parts = [f"{{\\LARGE\\bfseries {escape_text(title, 'meta.title')}\\par}}\n"]
    description = getattr(meta, "description", None)
    if description:
        for paragraph in re.split(r"\n\s*\n", description.strip()):
            parts.append(escape_text(paragraph, "meta.description") + "\n")
    return "\n".join(parts)


def assemble_document(body: list[str]) -> str:
    """Join the non-empty sections into a standalone document with the shared preamble."""
    text = "\n".join(part for part in body if part)
    return f"{PREAMBLE}\\begin{{document}}\n{text}\n\\end{{document}}\n"


class _WorkedExample:
    """Builds the document one section at a time, in pipeline order."""

    def __init__(self, derivation: Derivation, meta: object, digits: int) -> None:
        self.d = derivation
        self.meta = meta
        self.digits = digits
        self.shown_digits = min(digits, DOCUMENT_DIGITS)
        # User symbols first: symbol_names raises for a name that did not pass symattn.values.
        self.names = symbol_names(*derivation.inputs.values())
        self.visible, self.bias = derivation.spec.visibility(derivation.heads, derivation.n_q, derivation.n_kv)
        self.elided = False

    def document(self) -> str:
        body = [
            self.title(),
            self.setting(),
            self.inputs(),
            self.parameters(),
            self.projections(),
            self.heads_split(),
            self.scores(),
            self.scaling(),
            self.masking(),
            self.attention_weights(),
            self.head_outputs(),
            self.concatenation(),
            self.output_projection(),
        ]
        if self.elided:
            body.append(
                "\\section*{Elided entries}\n"
                "An entry shown as $\\elided$ has an exact form too wide to print here. "
                "The JSON file written with this document contains every exact form.\n"
            )
        return assemble_document(body)

    # Sections, in pipeline order.

    def title(self) -> str:
        return title_block(self.meta, DEFAULT_TITLE)

    def setting(self) -> str:
        d = self.d
        lines = [
            "\\section{Setting}",
            f"There {'is' if d.n_q == 1 else 'are'} $n_{{q}} = {d.n_q}$ "
            f"{'query' if d.n_q == 1 else 'queries'} and $n_{{kv}} = {d.n_kv}$ key{'' if d.n_kv == 1 else 's'}. "
            f"The model width $d_{{\\mathrm{{model}}}} = {d['Q'].shape[1]}$ is split into "
            f"$h = {d.heads}$ head{'s' if d.heads > 1 else ''} of width $d_{{k}} = {d.d_k}$; "
            f"the values have head width $d_{{v}} = {d.d_v}$.",
            "Rows are tokens, so a projection multiplies on the right. Head $h$ owns the "
            "contiguous column block $h\\,d_{k}+1, \\dots, (h+1)\\,d_{k}$ of $Q$ and $K$ and the "
            "block of width $d_{v}$ of $V$; heads count from 0, rows and columns from 1.",
            f"Exact numbers stay exact: rationals, square roots and exponentials are never "
            f"rounded. Where a decimal is shown, it has {self.shown_digits} correctly rounded "
            f"significant digits; the JSON file written with this document contains every stage "
            f"exactly and to {self.digits} significant digits.",
        ]
        return "\n\n".join(lines) + "\n"

    def inputs(self) -> str:
        d = self.d
        if d.direct:
            text = (
                "\\section{Inputs}\n"
                "This derivation starts from the projections themselves, as attention kernels do, "
                "so there are no input projections.\n"
            )
            return text + self.show_row([(name, d.inputs[name]) for name in ("Q", "K", "V")])
        text = (
            "\\section{Inputs}\n"
            "Each row of the query source is one query token; each row of the key and value "
            "sources is one key token.\n"
        )
        if d.inputs["key_source"] == d.inputs["value_source"]:
            sources = ("query_source", "kv_source")
        else:
            sources = ("query_source", "key_source", "value_source")
        inputs = dict(d.inputs, kv_source=d.inputs["key_source"])
        return text + self.show_row([(stage_symbol(name), inputs[name]) for name in sources])

    def parameters(self) -> str:
        groups = [("W_Q", "W_K", "W_V"), ("b_Q", "b_K", "b_V"), ("W_O", "b_O")]
        groups = [[name for name in group if name in self.d.inputs] for group in groups]
        if not any(groups):
            return ""
        text = (
            "\\section{Learnable parameters}\n"
            "Weights have shape (input width, output width), so they multiply rows from the "
            "right. A bias is added to every row.\n"
        )
        for group in groups:
            if group:
                text += self.show_row([(stage_symbol(name), self.d.inputs[name]) for name in group])
        return text

    def projections(self) -> str:
        if self.d.direct:
            return ""
        formula = formulas.render_formula(formulas.QUERY_PROJECTION)
        key, value = self._projection_latex("K"), self._projection_latex("V")
        text = (
            "\\section{Queries, keys and values}\n"
            "The query source is projected to the queries, and the key and value sources to "
            "the keys and values. A missing bias counts as zero.\n"
            f"\\[ {formula.latex}, \\qquad {key}, \\qquad {value} \\]\n"
        )
        return text + self.show_row([(name, self.d[name]) for name in ("Q", "K", "V")])

    def _projection_latex(self, stage: str) -> str:
        if self.d.inputs["key_source"] == self.d.inputs["value_source"]:
            source = "kv_source"
        else:
            source = {"K": "key_source", "V": "value_source"}[stage]
        return f"{stage} = {stage_symbol(source)} \\cdot {stage_symbol('W_' + stage)} + {stage_symbol('b_' + stage)}"

    def heads_split(self) -> str:
        if self.d.heads == 1:
            return (
                "\\section{Split into heads}\n"
                "With one head, the head takes every column: $Q_{0} = Q$, $K_{0} = K$ and $V_{0} = V$.\n"
            )
        formula = formulas.render_formula(formulas.HEAD_BLOCK)
        text = (
            "\\section{Split into heads}\n"
            f"Head $h$ takes its own block of $d_{{k}} = {self.d.d_k}$ columns of $Q$ and $K$ "
            f"and $d_{{v}} = {self.d.d_v}$ columns of $V$; for the queries, with $t$ from 1 "
            "to $d_{k}$:\n"
            f"\\[ {formula.latex} \\]\n"
        )
        for head in range(self.d.heads):
            text += f"Head {head}:\n" + self.show_row(
                [(stage_symbol(f"{name}_{head}"), self.d[f"{name}_{head}"]) for name in ("Q", "K", "V")]
            )
        return text

    def scores(self) -> str:
        formula = formulas.render_formula(formulas.DOT_PRODUCT)
        text = (
            "\\section{Scores}\n"
            "Each head compares every query with every key by a dot product, "
            "$Z_{h} = Q_{h} K_{h}^{T}$, with one row per query and one column per key:\n"
            f"\\[ {formula.latex} \\]\n"
        )
        for head in range(self.d.heads):
            queries = self._placeholders("Q", head, self.d[f"Q_{head}"].shape, operand=0)
            keys = self._placeholders("K", head, self.d[f"K_{head}"].shape, operand=1)
            structure = queries * keys.T
            text += self.show(stage_symbol(f"Z_{head}"), self.d[f"Z_{head}"], structure, f"Q_{{{head}}}$ and $K_{{{head}}}")
        return text

    def scaling(self) -> str:
        d = self.d
        scale = expression_latex(d.scale, self.names)
        rule = d.spec.scale
        if rule == "sqrt_dk":
            formula = formulas.render_formula(formulas.SCALED_DOT_PRODUCT)
            reason = (
                f"The scores are scaled by $1/\\sqrt{{d_{{k}}}} = {scale}$, which keeps their "
                "spread independent of the head width:\n"
                f"\\[ {formula.latex} \\]\n"
            )
        elif rule == "sqrt_seq":
            reason = (
                f"The scores are scaled by $1/\\sqrt{{n_{{kv}}}} = {scale}$, the convention of some "
                "hand-worked tutorials (the usual scale is $1/\\sqrt{d_{k}}$):\n"
                f"\\[ \\tilde{{Z}}_{{h}} = \\frac{{1}}{{\\sqrt{{n_{{kv}}}}}} Z_{{h}} \\]\n"
            )
        elif rule == "none":
            reason = "The scores are not scaled, so $\\tilde{Z}_{h} = Z_{h}$.\n"
        else:
            reason = f"The scores are scaled by the given factor $s = {scale}$:\n\\[ \\tilde{{Z}}_{{h}} = s\\, Z_{{h}} \\]\n"
        text = "\\section{Scaling}\n" + reason
        for head in range(d.heads):
            structure = self._placeholders("Z", head, d[f"Z_{head}"].shape) * d.scale
            text += self.show(stage_symbol(f"Z_scaled_{head}"), d[f"Z_scaled_{head}"], structure, f"Z_{{{head}}}")
        return text

    def masking(self) -> str:
        d = self.d
        spec = d.spec
        if not spec.has_mask:
            return ""

        # One item per rule that hides keys.
        rules = []
        if spec.causal == "top_left":
            rules.append("causal, aligned top left: query $i$ sees the keys $j \\le i$.")
        elif spec.causal == "bottom_right":
            rules.append(
                "causal, aligned bottom right: query $i$ sees the keys $j \\le i + n_{kv} - n_{q}$, "
                "as when the queries are the last $n_{q}$ positions."
            )
        if spec.key_length is not None:
            rules.append(
                f"valid key length {spec.key_length}: the keys after key {spec.key_length} are padding "
                "and hidden from every query."
            )
        for index, mask in enumerate(spec.masks):
            rules.append(self._mask_rule(index, mask))
        text = (
            "\\section{Mask}\n"
            "A hidden key gets the logit $-\\infty$, so its weight is exactly 0.\n\n"
            "The mask combines these rules; a key is hidden when any of them hides it.\n"
            "\\begin{itemize}\n" + "".join(f"\\item {rule}\n" for rule in rules) + "\\end{itemize}\n"
        )

        for head in range(d.heads):
            structure = self._masked_structure(head)
            text += self.show(stage_symbol(f"Z_masked_{head}"), d[f"Z_masked_{head}"], structure, f"\\tilde{{Z}}_{{{head}}}")

        empty_rows = self._empty_rows()
        if empty_rows:
            policy = {"zeros": "a row of zeros", "nan": "a row of NaN"}[spec.masked_rows]
            text += (
                f"Some query rows have no visible key ({empty_rows}); as requested "
                f"(masked rows: ``{spec.masked_rows}''), their weights are {policy}.\n"
            )
        return text

    def _mask_rule(self, index: int, mask: Mask) -> str:
        meaning = {
            "keep": "a keep mask: true means the query may attend to the key",
            "block": "a block mask: true means the key is hidden from the query",
            "additive": "an additive mask: each value is added to the scaled score, and $-\\infty$ hides the key",
        }[mask.kind]
        shape = mask.shape
        if mask.kind == "additive":
            flat = [expression_latex(value, self.names) for value in mask.values]
        else:
            flat = ["\\mathsf{T}" if value else "\\mathsf{F}" for value in mask.values]
        if len(shape) == 1:
            blocks = [[flat]]
            layout = "one entry per key, for every query"
        elif len(shape) == 2:
            blocks = [[flat[i * shape[1] : (i + 1) * shape[1]] for i in range(shape[0])]]
            layout = "one row per query, one column per key"
        else:
            size = shape[1] * shape[2]
            blocks = [
                [flat[h * size + i * shape[2] : h * size + (i + 1) * shape[2]] for i in range(shape[1])]
                for h in range(shape[0])
            ]
            layout = "one matrix per head, with one row per query and one column per key"
        matrices = ",\\quad ".join(matrix_latex(block) for block in blocks)
        return f"mask {index + 1}, {meaning} ({layout}):" + fit_to_width(matrices)

    def _empty_rows(self) -> str:
        empty = [
            f"head {h}, query {i + 1}"
            for h, rows in enumerate(self.visible)
            for i, row in enumerate(rows)
            if not any(row)
        ]
        return "; ".join(empty)

    def attention_weights(self) -> str:
        d = self.d
        formula = formulas.render_formula(formulas.SOFTMAX)
        source = "\\hat{Z}_{h}" if d.spec.has_mask else "\\hat{Z}_{h} = \\tilde{Z}_{h}"
        text = (
            "\\section{Attention weights}\n"
            f"The softmax runs along each row of ${source}$, over the keys $j$, so every row of "
            "weights is positive where a key is visible and sums to exactly 1:\n"
            f"\\[ {formula.latex} \\]\n"
        )
        text += self._expanded_row()
        for head in range(d.heads):
            structure = softmax_rows(self._masked_placeholders(head), d.spec.masked_rows)
            text += self.show(stage_symbol(f"A_{head}"), d[f"A_{head}"], structure, f"\\hat{{Z}}_{{{head}}}")
        return text

    def _expanded_row(self) -> str:
        """Write out one row of weights entry by entry.

        Rows are preferred in this order: visible logits that are not all equal, because equal
        logits only give equal weights, then more visible keys, then the lowest head and row.
        """
        d = self.d
        candidates = [(h, i) for h in range(d.heads) for i in range(d.n_q) if any(self.visible[h][i])]
        if not candidates:
            return ""
        head, row = max(
            candidates,
            key=lambda pair: (self._has_unequal_logits(*pair), sum(self.visible[pair[0]][pair[1]]), -pair[0], -pair[1]),
        )
        visible = self.visible[head][row]
        exponentials = self._exponential_terms(head, row, visible)
        denominator = " + ".join(term for term in exponentials if term is not None)
        logits = d[f"Z_masked_{head}"][row, :]
        partition = [sp.exp(logit) for logit, shown in zip(logits, visible) if shown]
        if self._has_unequal_logits(head, row):
            reason = "its logits differ, so its weights do too"
        else:
            reason = "no row has visible logits that differ"
        text = f"Row {row + 1} of head {head} written out entry by entry ({reason}):\n"
        for key in range(min(d.n_kv, MAX_SHOWN_COLS)):
            symbol = entry_symbol("A", row + 1, key + 1, self._head_label(head))
            if not visible[key]:
                text += fit_to_width(f"{symbol} = 0 \\quad \\text{{(key {key + 1} is hidden)}}")
                continue
            weight = d[f"A_{head}"][row, key]
            steps = [symbol, f"\\frac{{{exponentials[key]}}}{{{denominator}}}"]
            exact = expression_latex(weight, self.names)
            if not self._repeats_quotient(weight, logits[key], partition) and not is_wide(exact):
                steps.append(exact)
            line = " = ".join(steps)
            if not weight.free_symbols and not weight.is_Integer:
                value = matrix_to_decimals(sp.Matrix([[weight]]), self.shown_digits)[0][0]
                line += f" \\approx {decimal_latex(value)}"
            text += fit_to_width(line)
        if d.n_kv > MAX_SHOWN_COLS:
            text += f"The remaining {d.n_kv - MAX_SHOWN_COLS} keys of this row follow the same pattern.\n"
        return text

    @staticmethod
    def _repeats_quotient(weight: sp.Expr, logit: sp.Expr, partition: list[sp.Expr]) -> bool:
        """Tell whether an exact weight is the written quotient e^logit / sum(partition) again.

        It is when it has the same numerator and the same terms in its denominator, in any
        order, so printing it would only reorder the quotient just written.
        """
        numerator, denominator = weight.as_numer_denom()
        terms = sorted(sp.Add.make_args(denominator), key=sp.default_sort_key)
        return numerator == sp.exp(logit) and terms == sorted(partition, key=sp.default_sort_key)

    def _has_unequal_logits(self, head: int, row: int) -> bool:
        """Tell whether the visible masked scores of a row differ.

        Entries are compared as SymPy expressions, so two forms of one value count as unequal.
        """
        logits = [
            logit for logit, visible in zip(self.d[f"Z_masked_{head}"][row, :], self.visible[head][row]) if visible
        ]
        return any(logit != logits[0] for logit in logits[1:])

    def _exponential_terms(self, head: int, row: int, visible: tuple) -> list[str | None]:
        """Typeset e^{logit} for each visible key of a row, or None for a hidden key.

        Exponents fold their fractions onto one line; an exponent still too wide is written as
        the entry symbol of the masked scores.
        """
        terms: list[str | None] = []
        for key, logit in enumerate(self.d[f"Z_masked_{head}"][row, :]):
            if not visible[key]:
                terms.append(None)
                continue
            exponent = expression_latex(logit, self.names, fold_fractions=True)
            if is_wide(exponent):
                exponent = entry_symbol("Z_masked", row + 1, key + 1, self._head_label(head))
            terms.append(f"e^{{{exponent}}}")
        return terms

    def head_outputs(self) -> str:
        d = self.d
        text = (
            "\\section{Head outputs}\n"
            "Each head averages the value rows with its weights, $O_{h} = A_{h} V_{h}$, "
            "with one row per query.\n"
        )
        for head in range(d.heads):
            weights = self._placeholders("A", head, d[f"A_{head}"].shape, operand=0)
            values = self._placeholders("V", head, d[f"V_{head}"].shape, operand=1)
            structure = weights * values
            text += self.show(stage_symbol(f"O_{head}"), d[f"O_{head}"], structure, f"A_{{{head}}}$ and $V_{{{head}}}")
        return text

    def concatenation(self) -> str:
        d = self.d
        if d.heads == 1:
            return (
                "\\section{Concatenation}\nWith one head the concatenation is the head output "
                "itself, $C = O_{0}$.\n"
            )
        heads = ", ".join(f"O_{{{head}}}" for head in range(d.heads))
        structure = sp.Matrix.hstack(*(self._placeholders("O", head, d[f"O_{head}"].shape) for head in range(d.heads)))
        text = (
            "\\section{Concatenation}\n"
            "The head outputs are placed side by side, head 0 first: "
            f"$C = \\concat({heads})$.\n"
        )
        return text + self.show(stage_symbol("concat"), d["concat"], structure, heads)

    def output_projection(self) -> str:
        d = self.d
        if "W_O" not in d.inputs:
            return ""
        bias = " + b_{O}" if "b_O" in d.inputs else ""
        structure = self._placeholders("concat", None, d["concat"].shape, operand=0) * d.inputs["W_O"]
        if "b_O" in d.inputs:
            structure = structure + sp.ones(d.n_q, 1) * d.inputs["b_O"]
        text = (
            "\\section{Output projection}\n"
            "The concatenation is projected by $W_{O}$:\n"
            f"\\[ Y = C\\, W_{{O}}{bias} \\]\n"
        )
        return text + self.show(stage_symbol("output"), d["output"], structure, "C")

    # Placeholder matrices: a stage written in terms of the entries of the stage before it.

    def _placeholders(self, stage: str, head: int | None, shape: tuple[int, int], operand: int = 0) -> sp.Matrix:
        """Return a matrix of symbols that typeset as the entries of ``stage``.

        The names start with "#", which no validated symbol name can, so they never meet a
        user symbol. SymPy orders the factors of a product by name, so the name starts with
        ``operand`` to keep the left operand of a product first, and zero-padded indices keep
        the terms of a sum in index order.
        """
        rows, cols = shape
        head = self._head_label(head)
        entries = []
        for i in range(rows):
            row = []
            for j in range(cols):
                symbol = sp.Symbol(f"#{operand}{stage}{head}_{i + 1:05d}_{j + 1:05d}", real=True)
                self.names[symbol] = entry_symbol(stage, i + 1, j + 1, head)
                row.append(symbol)
            entries.append(row)
        return sp.Matrix(entries)

    def _head_label(self, head: int | None) -> int | None:
        """Label entries by head only when there is more than one."""
        return head if self.d.heads > 1 else None

    def _masked_structure(self, head: int) -> sp.Matrix:
        scaled = self._placeholders("Z_scaled", head, self.d[f"Z_scaled_{head}"].shape)
        return sp.Matrix(
            scaled.rows,
            scaled.cols,
            lambda i, j: scaled[i, j] + self.bias[head][i][j] if self.visible[head][i][j] else -sp.oo,
        )

    def _masked_placeholders(self, head: int) -> sp.Matrix:
        masked = self._placeholders("Z_masked", head, self.d[f"Z_masked_{head}"].shape)
        return sp.Matrix(
            masked.rows, masked.cols, lambda i, j: masked[i, j] if self.visible[head][i][j] else -sp.oo
        )

    def show(self, lhs: str, matrix: sp.MatrixBase, structure: sp.MatrixBase | None = None, structure_of: str = "") -> str:
        display = display_matrix(lhs, matrix, self.names, self.shown_digits, structure, structure_of)
        self.elided = self.elided or display.elided
        return display.latex

    def show_row(self, items: list[tuple[str, sp.MatrixBase]]) -> str:
        display = display_side_by_side(items, self.names, self.shown_digits)
        self.elided = self.elided or display.elided
        return display.latex


# Matrix displays.


@dataclass(frozen=True)
class MatrixDisplay:
    """LaTeX that displays one or more matrices, and whether an exact entry was elided."""

    latex: str
    elided: bool


def display_matrix(
    lhs: str,
    matrix: sp.MatrixBase,
    names: dict[sp.Symbol, str],
    digits: int = DOCUMENT_DIGITS,
    structure: sp.MatrixBase | None = None,
    structure_of: str = "",
) -> MatrixDisplay:
    """Display ``lhs = matrix`` exactly, adding decimals or a structure where entries are wide.

    ``names`` maps every free symbol to its LaTeX (notation.symbol_names). A numeric matrix
    with irrational or elided entries also shows its decimals to ``digits`` significant
    digits, and only its decimals when more than MAX_ELIDED_SHARE of its entries are elided.
    A symbolic matrix with wide entries is shown as ``structure`` instead, the same
    stage written in the entries of ``structure_of``, when one is given.
    """
    exact = exact_entries(matrix, names)
    wide = [[is_wide(entry) for entry in row] for row in exact]
    any_wide = any(any(row) for row in wide)
    symbolic = bool(matrix.free_symbols)

    if symbolic and any_wide and structure is not None:
        structure_latex = _matrix(exact_entries(structure, names))
        return MatrixDisplay(
            f"Written out, the entries of ${lhs}$ are too wide to print; in terms of the entries "
            f"of ${structure_of}$ they are\n" + fit_to_width(f"{lhs} = {structure_latex}"),
            False,
        )
    wide_count = sum(sum(row) for row in wide)
    if not symbolic and wide_count > MAX_ELIDED_SHARE * matrix.rows * matrix.cols:
        decimals = matrix_latex(decimal_entries(matrix, digits))
        quantity = "The" if wide_count == matrix.rows * matrix.cols else "Most of the"
        return MatrixDisplay(
            f"{quantity} exact entries of ${lhs}$ are too wide to print; to {digits} significant "
            "digits they are\n" + fit_to_width(f"{lhs} \\approx {decimals}"),
            True,
        )

    if any_wide:
        exact = [[r"\elided" if flag else entry for entry, flag in zip(row, flags)] for row, flags in zip(exact, wide)]
    exact_latex = _matrix(exact)
    if symbolic or not (any_wide or _needs_decimals(matrix)):
        return MatrixDisplay(fit_to_width(f"{lhs} = {exact_latex}"), any_wide)

    decimals = decimal_entries(matrix, digits)
    decimals_latex = matrix_latex(decimals)
    if _matrix_width(exact) + _matrix_width(decimals) <= SHARED_LINE_WIDTH:
        return MatrixDisplay(fit_to_width(f"{lhs} = {exact_latex} \\approx {decimals_latex}"), any_wide)
    return MatrixDisplay(
        fit_to_width(f"{lhs} = {exact_latex}") + fit_to_width(f"{lhs} \\approx {decimals_latex}"), any_wide
    )


def display_side_by_side(
    items: list[tuple[str, sp.MatrixBase]], names: dict[sp.Symbol, str], digits: int = DOCUMENT_DIGITS
) -> MatrixDisplay:
    """Display several matrices on one line when all are exact, narrow and rational or symbolic.

    Otherwise each gets its own display_matrix.
    """
    exact = [exact_entries(matrix, names) for _, matrix in items]
    plain = all(
        not _needs_decimals(matrix) or matrix.free_symbols for _, matrix in items
    ) and not any(is_wide(entry) for entries in exact for row in entries for entry in row)
    if plain and sum(_matrix_width(entries) + 4 for entries in exact) <= SIDE_BY_SIDE_WIDTH:
        parts = [f"{lhs} = {_matrix(entries)}" for (lhs, _), entries in zip(items, exact)]
        return MatrixDisplay(fit_to_width(",\\qquad ".join(parts)), False)
    displays = [display_matrix(lhs, matrix, names, digits) for lhs, matrix in items]
    return MatrixDisplay("".join(d.latex for d in displays), any(d.elided for d in displays))


def exact_entries(matrix: sp.MatrixBase, names: dict[sp.Symbol, str]) -> list[list[str]]:
    """Typeset every entry of a matrix exactly."""
    return [[expression_latex(matrix[i, j], names) for j in range(matrix.cols)] for i in range(matrix.rows)]


def decimal_entries(matrix: sp.MatrixBase, digits: int) -> list[list[str]]:
    """Typeset every entry of a numeric matrix to ``digits`` correctly rounded significant digits."""
    return [[decimal_latex(value) for value in row] for row in matrix_to_decimals(matrix, digits)]


def is_wide(latex: str) -> bool:
    """Tell whether an entry is too wide to print legibly in a matrix.

    It is when its estimated width exceeds LONG_ENTRY_WIDTH, or when it has a fraction inside
    a superscript or subscript, whose digits would print at the smallest size.
    """
    width, script_fraction = _measure(latex)
    return script_fraction or width > LONG_ENTRY_WIDTH


def _matrix(entries: list[list[str]]) -> str:
    """Typeset a matrix whose fractions print at full size, with rows spaced to fit them.

    A bmatrix sets its entries in text style, where a fraction shrinks to half height.
    """
    if not any(r"\frac" in entry for row in entries for entry in row):
        return matrix_latex(entries)
    styled = [[f"\\displaystyle {entry}" if r"\frac" in entry else entry for entry in row] for row in entries]
    return matrix_latex(styled, row_gap=FRACTION_ROW_GAP)


def _needs_decimals(matrix: sp.MatrixBase) -> bool:
    """Tell whether a numeric matrix reads better with decimals.

    It does when an entry is irrational, or a fraction whose denominator exceeds
    MAX_PLAIN_DENOMINATOR, such as the exact value of a float.
    """
    for entry in matrix:
        if entry is sp.nan or entry == -sp.oo:
            continue
        if not isinstance(entry, sp.Rational) or entry.q > MAX_PLAIN_DENOMINATOR:
            return True
    return False


def _matrix_width(entries: list[list[str]]) -> float:
    """Estimate a matrix's typeset width in characters: its widest entry per column, plus gaps."""
    return sum(max(_measure(entry)[0] for entry in column) + 2 for column in zip(*entries))


_TOKEN = re.compile(r"\\[A-Za-z]+|\\.|.", re.DOTALL)
# Commands that print nothing themselves.
_SILENT_COMMANDS = frozenset({r"\left", r"\right", r"\mathopen", r"\mathclose", r"\displaystyle", r"\,", r"\;"})


def _measure(latex: str) -> tuple[float, bool]:
    """Estimate the typeset width of math LaTeX in characters, and find fractions in scripts.

    A fraction is as wide as its wider part, a superscript or subscript counts 0.7 of its
    width, and any other command or character counts 1. The estimate only decides what to
    elide and what fits on one line.
    """
    measure = _Measure(_TOKEN.findall(latex))
    return measure.group(closing=None, in_script=False), measure.script_fraction


class _Measure:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.position = 0
        self.script_fraction = False

    def group(self, closing: str | None, in_script: bool) -> float:
        width = 0.0
        while self.position < len(self.tokens):
            token = self.tokens[self.position]
            self.position += 1
            if token == closing:
                break
            if token == "{":
                width += self.group("}", in_script)
            elif token == r"\frac":
                self.script_fraction = self.script_fraction or in_script
                width += max(self.argument(in_script), self.argument(in_script))
            elif token in ("^", "_"):
                width += 0.7 * self.argument(in_script=True)
            elif token not in _SILENT_COMMANDS and not token.isspace():
                width += 1.0
        return width

    def argument(self, in_script: bool) -> float:
        while self.position < len(self.tokens) and self.tokens[self.position].isspace():
            self.position += 1
        if self.position >= len(self.tokens):
            return 0.0
        token = self.tokens[self.position]
        self.position += 1
        if token == "{":
            return self.group("}", in_script)
        return 0.0 if token in _SILENT_COMMANDS else 1.0

# Building the PDF.


def pdflatex_path() -> str | None:
    """Return the path of pdflatex on PATH, or None when it is not installed."""
    return shutil.which("pdflatex")


@dataclass(frozen=True)
class PdfBuild:
    """The PDF that pdflatex wrote, and its log (where overfull boxes are reported)."""

    pdf: bytes
    log: str


def compile_pdf(tex: str, timeout: float = PDFLATEX_TIMEOUT_SECONDS, progress: Progress | None = None,
                build_folder: str | Path | None = None) -> bytes:
    """Compile LaTeX source with pdflatex and return the PDF bytes; see run_pdflatex."""
    return run_pdflatex(tex, timeout, progress, build_folder).pdf


def run_pdflatex(tex: str, timeout: float = PDFLATEX_TIMEOUT_SECONDS, progress: Progress | None = None,
                 build_folder: str | Path | None = None) -> PdfBuild:
    """Compile LaTeX source with pdflatex in a temporary folder and return the PDF and the log.

    The temporary folder (``.symattn-latex-*``) is created inside ``build_folder`` when it is
    given, which the commands set to their output folder, else in the system's temporary
    folder. It is removed when pdflatex ends, also when it fails or the run is interrupted.

    pdflatex runs without shell escape, in nonstop mode, stopping at the first error, and
    with kpathsea's paranoid file access (openin_any=p, openout_any=p: no dot files, no parent
    folders, no absolute paths, since TEXMFOUTPUT is unset), so the source can neither run
    programs nor read or write files outside the build folder and the TeX installation. The dates and
    the trailer id are fixed, so the same source gives the same bytes.

    Raises OutputError when pdflatex is missing, fails (quoting the first LaTeX error lines)
    or runs past ``timeout`` seconds. ``progress`` hears ("pdflatex", 0, 0) when the build
    starts and ("pdflatex", 1, 1) when pdflatex has exited (see symattn.progress).
    """
    executable = pdflatex_path()
    if executable is None:
        raise OutputError(
            "pdflatex was not found on PATH; install TeX Live (Debian: texlive-latex-extra "
            "texlive-fonts-recommended) or skip the PDF"
        )
    environment = dict(os.environ)
    environment.update(
        SOURCE_DATE_EPOCH="0",
        FORCE_SOURCE_DATE="1",
        openin_any="p",
        openout_any="p",
        shell_escape="f",
    )
    environment.pop("TEXMFOUTPUT", None)
    if build_folder is not None:
        try:
            Path(build_folder).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(
                f"creating the output folder {str(build_folder)!r} failed: {error.strerror}; choose a folder "
                f"whose parent folders exist or can be created"
            ) from None
    with tempfile.TemporaryDirectory(prefix=".symattn-latex-", dir=build_folder) as folder:
        source = Path(folder) / "document.tex"
        source.write_text(tex, encoding="utf-8")
        command = [
            executable,
            "-no-shell-escape",
            "-interaction=nonstopmode",
            "-halt-on-error",
            "-file-line-error",
            source.name,
        ]
        try:
            with Stopwatch(progress, "pdflatex"):
                result = subprocess.run(
                    command,
                    cwd=folder,
                    env=environment,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=timeout,
                )
        except subprocess.TimeoutExpired:
            raise OutputError(
                f"pdflatex did not finish within {timeout:g} s and was stopped; no PDF was written"
            ) from None
        pdf = Path(folder) / "document.pdf"
        log = _read_log(Path(folder) / "document.log", result.stdout)
        if result.returncode != 0 or not pdf.exists():
            raise OutputError(
                f"pdflatex failed (exit status {result.returncode}); no PDF was written. "
                f"First LaTeX error lines:\n{_first_error(log)}"
            )
        return PdfBuild(pdf.read_bytes(), log)


def _read_log(log_path: Path, stdout: bytes) -> str:
    try:
        return log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return stdout.decode("utf-8", errors="replace")


def _first_error(log: str) -> str:
    """Quote the first error of a LaTeX log: its message and the few lines that locate it."""
    lines = log.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("!") or re.match(r"\./document\.tex:\d+: ", line):
            return "\n".join(f"  {text}" for text in lines[index : index + 4] if text.strip())
    return "\n".join(f"  {text}" for text in lines[-6:])


def build_pdf(tex: str, out_path: str | Path, force: bool = False, progress: Progress | None = None) -> Path:
    """Compile ``tex`` and write the PDF to ``out_path`` whole or not at all.

    An existing file with other content is replaced only when ``force`` is True
    (see export.files).
    """
    out_path = Path(out_path)
    pdf = compile_pdf(tex, progress=progress, build_folder=out_path.parent)
    write_files({out_path: pdf}, force)
    return out_path
