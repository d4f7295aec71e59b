"""The SymPy path as an engine: the exact derivation, evaluated entry by entry.

Rational entries are exact. Other entries are evaluated with ``evalf`` at the working precision
and again with about 32 more bits. The interval is the second value widened by four units in the
last place of the first, and it is accepted when it contains the first value (Ziv's strategy).
NOTE: this agreement is strong evidence, not a proof, unlike the intervals of the flint and
mpmath engines.
"""

from __future__ import annotations

import math

import sympy as sp

from ..errors import EvaluationError
from ..problem import Problem
from .reference import Intervals, stage_names


def evaluate(problem: Problem, precision: int, stages: set[str]) -> dict[str, Intervals]:
    """Evaluate the requested stages of the problem's SymPy derivation at ``precision`` bits."""
    derivation = problem.to_derivation()
    return {name: _intervals(derivation[name], precision) for name in stage_names(problem) if name in stages}


def _intervals(matrix: sp.MatrixBase, precision: int) -> Intervals:
    lo, hi, den, special = [], [], [], {}
    for k, entry in enumerate(matrix):
        if entry is sp.nan or entry in (sp.oo, -sp.oo):
            special[k] = float(entry)
            lo.append(0), hi.append(0), den.append(1)
        elif isinstance(entry, sp.Rational):
            lo.append(int(entry.p)), hi.append(int(entry.p)), den.append(int(entry.q))
        else:
            low, high, denominator = _enclose(entry, precision)
            lo.append(low), hi.append(high), den.append(denominator)
    return Intervals(tuple(matrix.shape), lo, hi, den, special)


def _enclose(entry: sp.Expr, precision: int) -> tuple[int, int, int]:
    digits = math.ceil(precision * math.log10(2)) + 2
    first = _dyadic(entry, digits)
    second = _dyadic(entry, digits + 10)
    (m1, e1), (m2, e2) = first, second
    # Four units in the last place of a precision-bit number of the first value's size.
    ulp_exponent = (e1 if m1 else e2) + max(m1.bit_length(), m2.bit_length()) - precision
    base = min(e1, e2, ulp_exponent)
    low = (m2 << (e2 - base)) - (4 << (ulp_exponent - base))
    high = (m2 << (e2 - base)) + (4 << (ulp_exponent - base))
    centre = m1 << (e1 - base)
    if not low <= centre <= high:
        raise EvaluationError(
            f"the entry {sp.sstr(entry)[:80]} did not settle at {precision} bits: two evaluations "
            f"disagree beyond their last bits"
        )
    return (low, high, 1 << -base) if base < 0 else (low << base, high << base, 1)


def _dyadic(entry: sp.Expr, digits: int) -> tuple[int, int]:
    value = entry.evalf(digits, maxn=digits * 4)
    if not isinstance(value, (sp.Float, sp.Rational)):
        raise EvaluationError(f"the entry {sp.sstr(entry)[:80]} did not evaluate to a real number")
    value = sp.Float(value, digits)
    sign, mantissa, exponent, _ = value._mpf_
    return (-mantissa if sign else mantissa), exponent
