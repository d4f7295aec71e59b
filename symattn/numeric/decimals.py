"""Evaluation of exact stages to N correctly rounded significant digits.

Rational entries are rounded exactly with the ``decimal`` module. Other entries go through
SymPy's ``evalf`` at N + guard digits and again with twice the guard. The digits are accepted
only when both round to the same N-digit string. Otherwise the guard doubles (Ziv's strategy). A
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


def check_digits(digits: int, name: str = "digits") -> int:
    """Raise InvalidInputError unless 1 ≤ digits ≤ MAX_DIGITS. The message calls the value ``name``."""
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= MAX_DIGITS:
        raise InvalidInputError(
            f"{name} is {digits!r}; expected an integer from 1 to {MAX_DIGITS}"
        )
    return digits


def round_decimal(value: decimal.Decimal, digits: int) -> decimal.Decimal:
    """Round an exact Decimal to ``digits`` significant digits, ties to even."""
    context = decimal.Context(prec=digits, rounding=decimal.ROUND_HALF_EVEN, Emax=10**9, Emin=-(10**9))
    return context.plus(value)


def format_decimal(value: decimal.Decimal, digits: int | None = None) -> str:
    """Format a Decimal in plain notation for moderate exponents and scientific notation otherwise.

    With ``digits``, the string shows exactly that many significant digits, trailing zeros
    included. Without it, the string shows the Decimal's own digits with trailing zeros
    removed, which suits exact values.
    """
    if value.is_infinite():
        return "-inf" if value < 0 else "inf"
    if value.is_zero():
        return "0"
    sign, digit_tuple, _ = value.as_tuple()
    digit_text = "".join(map(str, digit_tuple)).lstrip("0")
    exponent = value.adjusted()
    if digits is None:
        digit_text = digit_text.rstrip("0")
    else:
        digit_text = (digit_text + "0" * digits)[:digits]
    prefix = "-" if sign else ""
    if -7 <= exponent < 0:
        return f"{prefix}0.{'0' * (-exponent - 1)}{digit_text}"
    if 0 <= exponent <= 21:
        whole, fraction = digit_text[: exponent + 1], digit_text[exponent + 1 :]
        whole = whole + "0" * (exponent + 1 - len(whole))
        return f"{prefix}{whole}.{fraction}" if fraction else f"{prefix}{whole}"
    mantissa = digit_text[0] + ("." + digit_text[1:] if len(digit_text) > 1 else "")
    return f"{prefix}{mantissa}e{exponent:+d}"


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
        # m / 2^k = m · 5^k / 10^k, which the decimal module represents exactly.
        magnitude = exact.scaleb(decimal.Decimal(mantissa * 5**-exponent), exponent)
    # copy_negate is exact; unary minus would round to the default context's 28 digits.
    return magnitude.copy_negate() if sign else magnitude


def entry_to_decimal(expr: sp.Expr, digits: int) -> decimal.Decimal | None:
    """Return the entry correctly rounded to ``digits`` significant digits, or None for NaN.

    Infinite entries (the masked logits of hidden keys) come back as infinite Decimals."""
    if expr is sp.nan:
        return None
    if expr in (sp.oo, -sp.oo):  # a hidden key's masked logit
        return decimal.Decimal("Infinity") if expr is sp.oo else decimal.Decimal("-Infinity")
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


def _terminates_within(value: sp.Rational, digits: int) -> bool:
    """Return whether the rational's decimal expansion ends within ``digits`` significant digits."""
    q = int(value.q)
    for prime in (2, 5):
        while q % prime == 0:
            q //= prime
    if q != 1:
        return False
    context = decimal.Context(prec=MAX_DIGITS)
    exact = context.divide(decimal.Decimal(int(value.p)), decimal.Decimal(int(value.q)))
    # normalize() without a context would round to the default 28 digits first.
    return len(exact.normalize(context).as_tuple().digits) <= digits


def matrix_to_decimals(matrix: sp.MatrixBase, digits: int = DEFAULT_DIGITS) -> list[list[str]]:
    """Evaluate every entry of a matrix to ``digits`` correctly rounded significant digits.

    Entries with a terminating decimal expansion that fits are shown exactly ("3", "0.25");
    every other entry shows exactly ``digits`` significant digits, trailing zeros included.

    >>> matrix_to_decimals(sp.Matrix([[sp.Rational(1, 3), sp.E]]), 10)
    [['0.3333333333', '2.718281828']]
    """
    check_digits(digits)
    rows = []
    for i in range(matrix.shape[0]):
        row = []
        for j in range(matrix.shape[1]):
            entry = matrix[i, j]
            value = entry_to_decimal(entry, digits)
            if value is None:
                row.append("nan")
            elif isinstance(entry, sp.Rational) and _terminates_within(entry, digits):
                row.append(format_decimal(value))  # the exact value, so no trailing zeros
            else:
                row.append(format_decimal(value, digits))
        rows.append(row)
    return rows
