"""Certified decimals of exact SymPy expressions, by ball arithmetic (python-flint's arb).

Each entry is evaluated as a ball [m ± r] that provably contains its exact value. The digits are
accepted when both ends of the ball, m − r and m + r, round to the same N significant digits.
Otherwise the working precision doubles. The entries of a gradient share large subexpressions
(the softmax weights of every row), so each distinct subexpression is evaluated once per
precision.

Without python-flint the entries go through ``matrix_to_decimals`` (SymPy's evalf, Ziv's
strategy), whose digits are strong evidence but not a proof; a SymattnWarning says so.
"""

from __future__ import annotations

import decimal
import math
import warnings
from dataclasses import dataclass

import sympy as sp

from ..errors import EvaluationError, SymattnWarning, UnsupportedError
from .decimals import check_digits, format_decimal, matrix_to_decimals, mpf_to_decimal, round_decimal

try:
    import flint
except ImportError:  # python-flint is an optional extra ("fast")
    flint = None

GUARD_BITS = 32
# Doublings of the working precision before an entry is given up: 2**6 times the first precision.
MAX_DOUBLINGS = 6


@dataclass(frozen=True)
class CertifiedDecimals:
    """The entries of an exact matrix rounded to ``digits`` significant digits.

    ``decimals``: correctly rounded strings, "0" for an exact zero and "nan" for NaN.
    ``radii``: the absolute radius of each entry's final ball, rounded up to a float (0.0 for
    exact values); None when ``engine`` is "sympy".
    ``engine``: "flint" when ball arithmetic proves every digit (and proves each entry of
    ``bounded_zeros`` to lie within its radius of 0), "sympy" when SymPy's evalf agreed at two
    precisions.
    ``precision_bits``: the highest working precision used (0 for "sympy").
    ``bounded_zeros``: entries shown as "0" whose balls contain 0 within their radius but that
    were not proven to be 0 (the value lies in [−radius, radius]).
    """

    decimals: list[list[str]]
    radii: list[list[float]] | None
    digits: int
    engine: str
    precision_bits: int
    bounded_zeros: tuple[tuple[int, int], ...] = ()

    @property
    def certified(self) -> bool:
        return self.engine == "flint"


def certified_decimals(matrix: sp.MatrixBase, digits: int, engine: str = "auto") -> CertifiedDecimals:
    """Evaluate every entry of an exact matrix to ``digits`` correctly rounded significant digits.

    ``engine`` is "auto" (ball arithmetic when python-flint is installed), "flint" or "sympy".

    >>> certified_decimals(sp.Matrix([[sp.exp(sp.Rational(1, 2)), 0]]), 12).decimals
    [['1.64872127070', '0']]
    """
    check_digits(digits)
    if matrix.free_symbols:
        names = ", ".join(sorted(str(s) for s in matrix.free_symbols))
        raise EvaluationError(
            f"the matrix contains the symbols {names}, so it has no decimal value; substitute "
            f"numbers first with derivation.subs({{...}})"
        )
    if engine not in ("auto", "flint", "sympy"):
        raise UnsupportedError(f"engine {engine!r} is unknown; expected 'auto', 'flint' or 'sympy'")
    if engine == "flint" and flint is None:
        raise UnsupportedError("engine 'flint' needs python-flint; install it with pip install python-flint")
    if engine == "auto" and flint is None:
        warnings.warn(
            "python-flint is not installed, so gradient digits come from SymPy's evalf and are "
            "not proven; install python-flint for certified digits",
            SymattnWarning,
            stacklevel=2,
        )
    if engine == "sympy" or flint is None:
        return CertifiedDecimals(matrix_to_decimals(matrix, digits), None, digits, "sympy", 0)
    return _ball_decimals(matrix, digits)


def _ball_decimals(matrix: sp.MatrixBase, digits: int) -> CertifiedDecimals:
    rows, cols = matrix.shape
    decimals: list[list[str | None]] = [[None] * cols for _ in range(rows)]
    radii = [[0.0] * cols for _ in range(rows)]
    pending = []
    for i in range(rows):
        for j in range(cols):
            if isinstance(matrix[i, j], sp.Rational):  # exact already: format as the forward stages do
                decimals[i][j] = matrix_to_decimals(sp.Matrix([[matrix[i, j]]]), digits)[0][0]
            else:
                pending.append((i, j))
    first_precision = precision = int(digits * math.log2(10)) + GUARD_BITS
    bounded: list[tuple[int, int]] = []

    for _ in range(MAX_DOUBLINGS + 1):
        with flint.ctx.workprec(precision):
            evaluator = BallEvaluator()
            still_pending = []
            for i, j in pending:
                ball = evaluator.evaluate(matrix[i, j])
                text, radius = _rounded_text(ball, digits), _radius_upper(ball)
                # NOTE: a zero reached only through cancellation is bounded here, not proven.
                # SymPy's Expr.equals(0) could prove it, but on gradient entries of a few
                # hundred operations it ran for over ten minutes, and with python-flint as
                # SymPy's ground types it killed the process with SIGFPE (SymPy 1.14,
                # python-flint 0.9).
                if text is None and ball.contains(0) and ball.abs_upper() < _zero_bound(first_precision):
                    text = "0"  # no precision rounds a true zero, so report the bound
                    bounded.append((i, j))
                if text is None:
                    still_pending.append((i, j))
                    continue
                decimals[i][j] = text
                radii[i][j] = 0.0 if text == "nan" else radius
        pending = still_pending
        if not pending:
            return CertifiedDecimals(decimals, radii, digits, "flint", precision, tuple(bounded))
        precision *= 2

    i, j = pending[0]
    raise EvaluationError(
        f"entry ({i}, {j}) could not be rounded to {digits} digits at {precision // 2} bits; "
        f"its value may lie exactly on a rounding boundary"
    )


def _zero_bound(first_precision: int):
    return flint.arb(2) ** (-4 * first_precision)


def _rounded_text(ball, digits: int) -> str | None:
    """Return the ball's value rounded to ``digits`` digits if both of its ends agree, else None."""
    if ball.is_nan():
        return "nan"
    if not ball.is_finite():
        return None
    if ball.is_zero():
        return "0"
    lower, upper = _dyadic_decimal(ball.lower()), _dyadic_decimal(ball.upper())
    if lower.is_zero() or upper.is_zero() or (lower < 0) != (upper < 0):
        return None
    rounded_lower, rounded_upper = round_decimal(lower, digits), round_decimal(upper, digits)
    if rounded_lower != rounded_upper:
        return None
    return format_decimal(rounded_lower, digits)


def _radius_upper(ball) -> float:
    """Return the ball's radius as a float no smaller than the radius itself."""
    mantissa, exponent = (int(part) for part in ball.rad().mid().man_exp())
    if mantissa == 0:
        return 0.0
    radius = math.ldexp(float(mantissa), exponent)  # exact: arb radii carry at most 30 bits
    return radius if radius > 0 else math.nextafter(0.0, 1.0)


def _dyadic_decimal(value) -> decimal.Decimal:
    """Return the exact decimal value of an exact arb (a dyadic number m · 2^e)."""
    mantissa, exponent = (int(part) for part in value.mid().man_exp())
    return mpf_to_decimal((int(mantissa < 0), abs(mantissa), exponent, abs(mantissa).bit_length()))


class BallEvaluator:
    """Evaluate SymPy expressions as arb balls at the current flint precision, each distinct
    subexpression once.

    Supported: integers, rationals, E, pi, NaN, sums, products, powers (integer, half-integer
    or any rational exponent of a positive base), exp and log. Anything else raises
    UnsupportedError, which names the expression.
    """

    def __init__(self) -> None:
        self._cache: dict[sp.Expr, object] = {}

    def evaluate(self, expr: sp.Expr):
        cached = self._cache.get(expr)
        if cached is None:
            cached = self._evaluate(expr)
            self._cache[expr] = cached
        return cached

    def _evaluate(self, expr: sp.Expr):
        # Numbers and constants.
        if expr.is_Integer:
            return flint.arb(int(expr))
        if expr.is_Rational:
            return flint.arb(flint.fmpq(int(expr.p), int(expr.q)))
        if expr is sp.nan:
            return flint.arb("nan")
        if expr is sp.E:
            return flint.arb.const_e()
        if expr is sp.pi:
            return flint.arb.pi()

        # Operations, each argument evaluated once through the cache.
        if expr.is_Add:
            total = flint.arb(0)
            for term in expr.args:
                total += self.evaluate(term)
            return total
        if expr.is_Mul:
            product = flint.arb(1)
            for factor in expr.args:
                product *= self.evaluate(factor)
            return product
        if expr.is_Pow:
            return self._power(expr)
        if isinstance(expr, sp.exp):
            return self.evaluate(expr.args[0]).exp()
        if isinstance(expr, sp.log):
            return self.evaluate(expr.args[0]).log()

        if expr.is_Symbol:
            raise EvaluationError(f"the expression contains the symbol {expr}; substitute a number first")
        raise UnsupportedError(
            f"ball evaluation does not support {type(expr).__name__} (in {sp.sstr(expr)[:80]}); "
            f"use engine='sympy'"
        )

    def _power(self, expr: sp.Pow):
        base, exponent = self.evaluate(expr.base), expr.exp
        if exponent.is_Integer:
            return base ** int(exponent)
        if exponent == sp.Rational(1, 2):
            return base.sqrt()
        if exponent == sp.Rational(-1, 2):
            return base.rsqrt()
        return base ** self.evaluate(exponent)
