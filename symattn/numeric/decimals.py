"""Evaluation of exact stages to N correctly rounded significant digits.

Rational entries are rounded exactly with the ``decimal`` module. Other entries go through
SymPy's ``evalf`` at N + guard digits and again with twice the guard; the digits are accepted only
when both round to the same N-digit string, otherwise the guard doubles (Ziv's strategy). A
value that sits on a rounding boundary would loop, so the guard stops at MAX_GUARD_DIGITS and
the entry raises EvaluationError.

NOTE: the agreement of two evaluations is strong evidence but not a proof. The certified engine
(ball arithmetic) gives error bounds that are proofs.
"""

from __future__ import annotations

import decimal

import mpmath
import sympy as sp

from ..errors import EvaluationError, InvalidInputError

DEFAULT_DIGITS = 50
MAX_DIGITS = 10_000
GUARD_DIGITS = 15
MAX_GUARD_DIGITS = 2000


def check_digits(digits: int) -> int:
    """Raise InvalidInputError unless 1 ≤ digits ≤ MAX_DIGITS."""
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= MAX_DIGITS:
        raise InvalidInputError(
            f"digits is {digits!r}; expected an integer from 1 to {MAX_DIGITS}"
        )
    return digits


def round_decimal(value: decimal.Decimal, digits: int) -> decimal.Decimal:
    """Round an exact Decimal to ``digits`` significant digits, ties to even."""
    context = decimal.Context(prec=digits, rounding=decimal.ROUND_HALF_EVEN, Emax=10**9, Emin=-(10**9))
    return context.plus(value)


def format_decimal(value: decimal.Decimal) -> str:
    """Format a Decimal in plain notation for moderate exponents, scientific otherwise, without trailing zeros."""
    if value.is_zero():
        return "0"
    value = value.normalize(decimal.Context(prec=MAX_DIGITS + 10))
    exponent = value.adjusted()
    if -7 <= exponent <= 21:
        text = format(value, "f")
        return text
    sign, digit_tuple, _ = value.as_tuple()
    digit_text = "".join(map(str, digit_tuple))
    mantissa = digit_text[0] + ("." + digit_text[1:] if len(digit_text) > 1 else "")
    return f"{'-' if sign else ''}{mantissa}e{exponent:+d}"


def rational_to_decimal(value: sp.Rational, digits: int) -> decimal.Decimal:
    """Return the rational correctly rounded to ``digits`` significant digits."""
    context = decimal.Context(prec=digits, rounding=decimal.ROUND_HALF_EVEN, Emax=10**9, Emin=-(10**9))
    return context.divide(decimal.Decimal(int(value.p)), decimal.Decimal(int(value.q)))


def mpf_to_decimal(value: mpmath.mpf | tuple) -> decimal.Decimal:
    """Return the exact decimal value of a binary mpmath number or its raw ``_mpf_`` tuple."""
    sign, mantissa, exponent, _ = value if isinstance(value, tuple) else value._mpf_
    if mantissa == 0:
        return decimal.Decimal(0)
    exact = decimal.Context(prec=MAX_DIGITS * 4, Emax=10**9, Emin=-(10**9))
    if exponent >= 0:
        magnitude = decimal.Decimal(mantissa << exponent)
    else:
        # m / 2^k = m · 5^k / 10^k, which the decimal module holds exactly.
        magnitude = exact.scaleb(decimal.Decimal(mantissa * 5**-exponent), exponent)
    return -magnitude if sign else magnitude


def entry_to_decimal(expr: sp.Expr, digits: int) -> decimal.Decimal | None:
    """Return the entry correctly rounded to ``digits`` significant digits, or None for NaN."""
    if expr is sp.nan:
        return None
    if isinstance(expr, sp.Rational):
        return rational_to_decimal(expr, digits)
    if expr.free_symbols:
        names = ", ".join(sorted(str(s) for s in expr.free_symbols))
        raise EvaluationError(
            f"the entry {_short(expr)} contains the symbols {names}, so it has no decimal value; "
            f"substitute numbers first with derivation.subs({{...}})"
        )
    guard = GUARD_DIGITS
    while guard <= MAX_GUARD_DIGITS:
        first = _evalf_decimal(expr, digits + guard, digits)
        second = _evalf_decimal(expr, digits + 2 * guard, digits)
        if first == second:
            return first
        guard *= 2
    raise EvaluationError(
        f"the entry {_short(expr)} could not be rounded to {digits} digits with "
        f"{MAX_GUARD_DIGITS} guard digits; it may be exactly on a rounding boundary or zero"
    )


def _evalf_decimal(expr: sp.Expr, precision: int, digits: int) -> decimal.Decimal:
    value = expr.evalf(precision, maxn=precision * 4)
    if not value.is_number or not isinstance(value, (sp.Float, sp.Integer, sp.Rational)):
        raise EvaluationError(f"the entry {_short(expr)} did not evaluate to a real number (got {_short(value)})")
    if isinstance(value, sp.Rational):
        return rational_to_decimal(value, digits)
    # The raw tuple keeps every bit; mpmath.mpf(...) would round to the global precision.
    return round_decimal(mpf_to_decimal(value._mpf_), digits)


def _short(expr: sp.Basic, limit: int = 80) -> str:
    text = sp.sstr(expr)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def matrix_to_decimals(matrix: sp.MatrixBase, digits: int = DEFAULT_DIGITS) -> list[list[str]]:
    """Evaluate every entry of a matrix to ``digits`` correctly rounded significant digits.

    >>> matrix_to_decimals(sp.Matrix([[sp.Rational(1, 3), sp.E]]), 10)
    [['0.3333333333', '2.718281828']]
    """
    check_digits(digits)
    rows = []
    for i in range(matrix.shape[0]):
        row = []
        for j in range(matrix.shape[1]):
            value = entry_to_decimal(matrix[i, j], digits)
            row.append("nan" if value is None else format_decimal(value))
        rows.append(row)
    return rows
