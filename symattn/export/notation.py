"""LaTeX notation for typeset stages: one table of symbols, environments and macros.

Every exporter that typesets stages takes its symbols from here, so a stage has the same
name in every document. The table maps stage names of ``symattn.derive`` to LaTeX:

=============== ==================== ==================================================
stage name       symbol               meaning
=============== ==================== ==================================================
query_source     ``X_{q}``            query source, one row per query token
key_source       ``X_{k}``            key source, one row per key token
value_source     ``X_{v}``            value source, one row per key token
kv_source        ``X_{kv}``           key source and value source when they are one matrix
W_Q … b_O        ``W_{Q}`` … ``b_{O}`` learnable parameters
Q, K, V          ``Q``, ``K``, ``V``  projections
Z_i              ``Z_{i}``            scores Q_i K_iᵀ of head i
Z_scaled_i       ``\\tilde{Z}_{i}``    scaled scores
Z_masked_i       ``\\hat{Z}_{i}``      scaled scores after the mask (−∞ where hidden)
A_i              ``A_{i}``            attention weights (row softmax)
O_i              ``O_{i}``            head output A_i V_i
concat           ``C``                heads concatenated along features
output           ``Y``                C W_O + b_O
=============== ==================== ==================================================

Entries use the lower-case letter with the head as a superscript, so entry (1, 2) of A_0 is
``a^{(0)}_{1,2}``. An accented letter is followed by ``{}``, because TeX unwraps a group that
contains only an accent, so ``{\\hat{z}^{(0)}_{1,2}}^{2}`` would be a double superscript. Rows
and columns count from 1, as in textbooks, while heads count from 0, as in the stage names.

Symbols inside expressions are typeset by ``symbol_latex`` from their validated names, never
by SymPy's name heuristics, so a name cannot produce a LaTeX command outside the short list of
Greek letters below.
"""

from __future__ import annotations

import re
import unicodedata

import sympy as sp
from sympy.printing.latex import LatexPrinter
from sympy.printing.precedence import PRECEDENCE

from ..errors import InvalidInputError
from ..values import parse_name

STAGE_SYMBOLS: dict[str, str] = {
    "query_source": "X_{q}",
    "key_source": "X_{k}",
    "value_source": "X_{v}",
    "kv_source": "X_{kv}",
    "W_Q": "W_{Q}",
    "W_K": "W_{K}",
    "W_V": "W_{V}",
    "b_Q": "b_{Q}",
    "b_K": "b_{K}",
    "b_V": "b_{V}",
    "W_O": "W_{O}",
    "b_O": "b_{O}",
    "Q": "Q",
    "K": "K",
    "V": "V",
    "Z": "Z",
    "Z_scaled": r"\tilde{Z}",
    "Z_masked": r"\hat{Z}",
    "A": "A",
    "O": "O",
    "concat": "C",
    "output": "Y",
}

ENTRY_SYMBOLS: dict[str, str] = {
    "Q": "q",
    "K": "k",
    "V": "v",
    "Z": "z",
    "Z_scaled": r"\tilde{z}{}",
    "Z_masked": r"\hat{z}{}",
    "A": "a",
    "O": "o",
    "concat": "c",
    "output": "y",
}

# Greek letter names that become LaTeX commands; every other name is typeset as its letters.
GREEK_LETTERS: frozenset[str] = frozenset(
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu "
    "xi pi varpi rho varrho sigma varsigma tau upsilon phi varphi chi psi omega "
    "Gamma Delta Theta Lambda Xi Pi Sigma Upsilon Phi Psi Omega".split()
)

MATRIX_ENVIRONMENT = "bmatrix"

# A matrix with more rows or columns than these is abbreviated with \cdots and \vdots: the
# first ABBREVIATED_HEAD rows (columns) and the last one stay.
MAX_SHOWN_ROWS = 8
MAX_SHOWN_COLS = 8
ABBREVIATED_HEAD = 6

# Macros every document defines in its preamble.
MACROS = (
    r"\newcommand{\elided}{\star}" "\n"
    r"\newcommand{\hidden}{-\infty}" "\n"
    r"\newcommand{\softmax}{\operatorname{softmax}}" "\n"
    r"\newcommand{\concat}{\operatorname{concat}}" "\n"
)

_HEAD_STAGE = re.compile(r"(?P<base>[A-Za-z_]+?)_(?P<head>\d+)")
_MATRIX_SYMBOL = re.compile(r"(?P<base>[A-Za-z][A-Za-z0-9]*)_\{(?P<row>\d+),(?P<col>\d+)\}")

# Characters with a meaning in LaTeX text, and their typeset replacements.
_TEXT_ESCAPES = {
    "\\": r"\textbackslash{}",
    "{": r"\{",
    "}": r"\}",
    "$": r"\$",
    "&": r"\&",
    "#": r"\#",
    "%": r"\%",
    "_": r"\_",
    "^": r"\textasciicircum{}",
    "~": r"\textasciitilde{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
}
# Latin-1 letters that pdflatex typesets with its default OT1 fonts; eth and thorn are missing there.
_TEXT_LETTERS = frozenset(
    chr(code) for code in range(0xC0, 0x100) if chr(code).isalpha() and chr(code) not in "ÐðÞþ"
)


def stage_symbol(name: str) -> str:
    """Return the LaTeX symbol of a stage or input name.

    >>> stage_symbol("A_1")
    'A_{1}'
    >>> stage_symbol("Z_scaled_0")
    '\\\\tilde{Z}_{0}'
    >>> stage_symbol("W_Q")
    'W_{Q}'
    """
    if name in STAGE_SYMBOLS:
        return STAGE_SYMBOLS[name]
    match = _HEAD_STAGE.fullmatch(name)
    if match and match["base"] in STAGE_SYMBOLS:
        return f"{STAGE_SYMBOLS[match['base']]}_{{{match['head']}}}"
    raise KeyError(f"no LaTeX symbol for stage {name!r}; known stages are {', '.join(STAGE_SYMBOLS)}")


def entry_symbol(stage: str, row: int, col: int, head: int | None = None) -> str:
    """Return the LaTeX symbol of one entry, with ``row`` and ``col`` counted from 1.

    >>> entry_symbol("Z_masked", 1, 2, head=0)
    '\\\\hat{z}{}^{(0)}_{1,2}'
    >>> entry_symbol("Q", 2, 1)
    'q_{2,1}'
    """
    letter = ENTRY_SYMBOLS[stage]
    superscript = "" if head is None else f"^{{({head})}}"
    return f"{letter}{superscript}_{{{row},{col}}}"


def symbol_latex(name: str) -> str:
    """Typeset a symbol name that symattn.values accepts.

    Names are either plain (``w``, ``alpha``, ``b_1``) or matrix entries made by
    ``symbol_matrix`` (``x_{1,2}``). Any other name raises InvalidInputError, because it did
    not pass through symattn.values and could carry LaTeX commands.

    >>> symbol_latex("x_{1,2}"), symbol_latex("alpha_2"), symbol_latex("w_a_b")
    ('x_{1,2}', '\\\\alpha_{2}', 'w_{a,b}')
    """
    match = _MATRIX_SYMBOL.fullmatch(name)
    if match:
        return f"{_letters_latex(match['base'])}_{{{match['row']},{match['col']}}}"
    try:
        parse_name(name, "symbol name")
    except InvalidInputError:
        raise InvalidInputError(
            f"symbol name {name!r} cannot be typeset; expected a name such as 'w' or 'b_1', or "
            f"a matrix entry such as 'x_{{1,2}}' as made by symbol_matrix"
        ) from None
    base, *subscripts = name.split("_")
    if not subscripts:
        return _letters_latex(base)
    return f"{_letters_latex(base)}_{{{','.join(subscripts)}}}"


def _letters_latex(base: str) -> str:
    return f"\\{base}" if base in GREEK_LETTERS else base


def symbol_names(*exprs: sp.Basic) -> dict[sp.Symbol, str]:
    """Map every free symbol of the given expressions or matrices to its LaTeX, for ``sp.latex``."""
    symbols: set[sp.Symbol] = set()
    for expr in exprs:
        symbols |= expr.free_symbols
    return {symbol: symbol_latex(symbol.name) for symbol in sorted(symbols, key=lambda s: s.name)}


def expression_latex(expr: sp.Basic, names: dict[sp.Symbol, str] | None = None, fold_fractions: bool = False) -> str:
    """Typeset an expression with symattn's symbol names; −∞ prints as ``\\hidden``.

    A short fraction in an exponent is written on one line (``e^{7 \\sqrt{2} / 2}``), because
    a stacked fraction there prints at the smallest size. ``fold_fractions`` folds the short
    fractions outside exponents too, for an expression that is itself typeset as an exponent.

    >>> expression_latex(sp.exp(sp.sqrt(2)) / 2)
    '\\\\frac{e^{\\\\sqrt{2}}}{2}'
    >>> expression_latex(sp.exp(7 * sp.sqrt(2) / 2) / 2)
    '\\\\frac{e^{7 \\\\sqrt{2} / 2}}{2}'
    """
    if expr == -sp.oo:
        return r"\hidden"
    if names is None:
        names = symbol_names(expr)
    return _ExponentFoldingPrinter({"symbol_names": names, "fold_short_frac": fold_fractions}).doprint(expr)


class _ExponentFoldingPrinter(LatexPrinter):
    """SymPy's LaTeX printer, with the short fractions of every exponent written on one line."""

    def _print_exponent(self, exponent: sp.Basic) -> str:
        folds = self._settings["fold_short_frac"]
        self._settings["fold_short_frac"] = True
        try:
            return self._print(exponent)
        finally:
            self._settings["fold_short_frac"] = folds

    def _print_ExpBase(self, expr: sp.Basic, exp: str | None = None) -> str:
        return self._do_exponent(f"e^{{{self._print_exponent(expr.args[0])}}}", exp)

    def _print_Pow(self, expr: sp.Pow) -> str:
        # A function raised to a power, such as exp(x)**y, takes the power as printed text.
        if expr.base.is_Function and not expr.exp.is_Rational:
            return self._print(expr.base, exp=self._print_exponent(expr.exp))
        return super()._print_Pow(expr)

    def _helper_print_standard_power(self, expr: sp.Pow, template: str) -> str:
        exponent = self._print_exponent(expr.exp)
        base = self.parenthesize(expr.base, PRECEDENCE["Pow"])
        if expr.base.is_Symbol:
            base = self.parenthesize_super(base)
        elif expr.base.is_Float:
            base = f"{{{base}}}"
        return template % (base, exponent)


def decimal_latex(text: str) -> str:
    """Typeset a decimal string from matrix_to_decimals, with ``e±n`` as a power of ten.

    >>> decimal_latex("-1.5e-12"), decimal_latex("nan"), decimal_latex("0.25")
    ('-1.5 \\\\times 10^{-12}', '\\\\text{NaN}', '0.25')
    """
    if text == "nan":
        return r"\text{NaN}"
    if text in ("-inf", "inf"):
        return r"\hidden" if text == "-inf" else r"\infty"
    mantissa, separator, exponent = text.partition("e")
    if not separator:
        return text
    return f"{mantissa} \\times 10^{{{int(exponent)}}}"


def matrix_latex(entries: list[list[str]], row_gap: str | None = None) -> str:
    """Typeset a matrix of LaTeX entries in a bmatrix, abbreviated when it is large.

    A matrix with more than MAX_SHOWN_ROWS rows keeps its first ABBREVIATED_HEAD rows and its
    last row, with a row of ``\\vdots`` between them; columns are abbreviated the same way with
    ``\\cdots``. ``row_gap`` (a TeX length such as ``"1ex"``) spaces the rows further apart, for
    entries with tall fractions.
    """
    rows = _abbreviate(entries, MAX_SHOWN_ROWS, None)
    abbreviated = [None if row is None else _abbreviate(row, MAX_SHOWN_COLS, r"\cdots") for row in rows]
    width = len(abbreviated[0])
    lines = []
    for row in abbreviated:
        if row is None:
            row = [r"\vdots"] * width
            if len(entries[0]) > MAX_SHOWN_COLS:
                row[ABBREVIATED_HEAD] = r"\ddots"
        lines.append(" & ".join(row))
    # \noalign adds real space; \\[gap] would only deepen the row's strut, which a tall
    # fraction already exceeds.
    separator = " \\\\\n" if row_gap is None else f" \\\\ \\noalign{{\\vskip {row_gap}}}\n"
    body = separator.join(lines)
    return f"\\begin{{{MATRIX_ENVIRONMENT}}}\n{body}\n\\end{{{MATRIX_ENVIRONMENT}}}"


def _abbreviate(items: list, limit: int, filler: object) -> list:
    if len(items) <= limit:
        return list(items)
    return list(items[:ABBREVIATED_HEAD]) + [filler] + [items[-1]]


def fit_to_width(math: str) -> str:
    """Wrap display math in a centred box that shrinks it to the line width when it is wider."""
    return (
        "\\begin{center}\n"
        f"\\adjustbox{{max width=\\linewidth}}{{$\\displaystyle {math}$}}\n"
        "\\end{center}\n"
    )


def escape_text(text: str, where: str = "text") -> str:
    """Escape plain text for LaTeX, so that it prints as written and runs no command.

    Every character with a meaning in LaTeX is replaced; each ``^`` becomes its own command,
    so no ``^^`` character code reaches TeX. Line breaks and tabs become spaces. Characters
    other than printable ASCII and Latin-1 letters raise InvalidInputError naming ``where``,
    because pdflatex cannot typeset them with the document's fonts.

    >>> escape_text(r"50% of \\input{x}")
    '50\\\\% of \\\\textbackslash{}input\\\\{x\\\\}'
    """
    pieces = []
    for position, character in enumerate(text):
        if character in _TEXT_ESCAPES:
            pieces.append(_TEXT_ESCAPES[character])
        elif character in "\n\r\t":
            pieces.append(" ")
        elif " " <= character <= "~" or character in _TEXT_LETTERS:
            pieces.append(character)
        else:
            raise InvalidInputError(
                f"{where} contains the character {character!r} "
                f"({_character_name(character)}) at position {position}, which the LaTeX "
                f"document cannot typeset; use ASCII or Latin-1 letters"
            )
    return "".join(pieces)


def _character_name(character: str) -> str:
    code = f"U+{ord(character):04X}"
    name = unicodedata.name(character, "")
    return f"{code} {name}" if name else code
