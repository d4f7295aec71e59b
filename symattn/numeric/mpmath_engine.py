"""The certified pipeline in plain mpmath, the fallback when python-flint is not installed.

Enclosures are ``mpmath.iv`` intervals, whose endpoints mpmath rounds outward. Projections and
QKᵀ stay exact integer arithmetic (see ``entrywise``).

NOTE: the bounds are as rigorous as mpmath's directed rounding of exp and sqrt in mpmath.iv.
python-flint's arb states error bounds for its functions, while mpmath.iv relies on its libmp
routines rounding in the requested direction.
"""

from __future__ import annotations

from fractions import Fraction

import mpmath
from mpmath import iv, libmp

from ..problem import Problem
from .entrywise import Arithmetic, run_pipeline
from .reference import Intervals


def evaluate(problem: Problem, precision: int, stages: set[str]) -> dict[str, Intervals]:
    """Evaluate the requested stages with intervals at ``precision`` bits plus guard bits."""
    guard = 2 * max(problem.n_kv, problem.d_vmodel).bit_length() + 16
    saved = iv.prec
    iv.prec = precision + guard
    try:
        return run_pipeline(problem, stages, IntervalArithmetic())
    finally:
        iv.prec = saved


class IntervalArithmetic(Arithmetic):
    """mpmath.iv intervals at the current ``iv.prec``."""

    def __init__(self) -> None:
        self.zero = iv.mpf(0)

    def enclose(self, value: Fraction) -> "iv.mpf":
        p, q = value.numerator, value.denominator
        low = libmp.from_rational(p, q, iv.prec, libmp.round_floor)
        high = libmp.from_rational(p, q, iv.prec, libmp.round_ceiling)
        return iv.make_mpf((low, high))

    def sqrt(self, value: "iv.mpf") -> "iv.mpf":
        return iv.sqrt(value)

    def exp(self, value: "iv.mpf") -> "iv.mpf":
        return iv.exp(value)

    def approximate(self, value: "iv.mpf") -> float:
        return float(mpmath.mp.make_mpf(value._mpi_[0]))

    def endpoints(self, value: "iv.mpf") -> tuple[int, int, int]:
        low, high = value._mpi_
        exponents = [mpf[2] for mpf in (low, high) if mpf[1] != 0]
        scale = -min(exponents + [0])
        numerators = []
        for sign, mantissa, exponent, _ in (low, high):
            number = mantissa << (exponent + scale) if mantissa else 0
            numerators.append(-number if sign else number)
        return numerators[0], numerators[1], 1 << scale
