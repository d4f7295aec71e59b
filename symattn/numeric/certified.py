"""The python-flint engine: exact projections and QKᵀ, then arb ball arithmetic.

TODO: this first version runs the entry-by-entry pipeline with arb balls; the vectorised path
for layer sizes (exact integer matrix products, arb matrices) replaces it for large problems.
"""

from __future__ import annotations

from fractions import Fraction

import flint

from ..problem import Problem
from .entrywise import Arithmetic, run_pipeline
from .reference import Intervals


def evaluate(problem: Problem, precision: int, stages: set[str]) -> dict[str, Intervals]:
    """Evaluate the requested stages with arb balls at ``precision`` bits plus guard bits."""
    guard = 2 * max(problem.n_kv, problem.d_vmodel).bit_length() + 16
    saved = flint.ctx.prec
    flint.ctx.prec = precision + guard
    try:
        return run_pipeline(problem, stages, BallArithmetic())
    finally:
        flint.ctx.prec = saved


class BallArithmetic(Arithmetic):
    """python-flint arb balls at the current ``flint.ctx.prec``."""

    def __init__(self) -> None:
        self.zero = flint.arb(0)

    def enclose(self, value: Fraction) -> flint.arb:
        return flint.arb(value.numerator) / value.denominator

    def sqrt(self, value: flint.arb) -> flint.arb:
        return value.sqrt()

    def exp(self, value: flint.arb) -> flint.arb:
        return value.exp()

    def approximate(self, value: flint.arb) -> float:
        return float(value)

    def endpoints(self, value: flint.arb) -> tuple[int, int, int]:
        return ball_endpoints(value)


def ball_endpoints(value: flint.arb) -> tuple[int, int, int]:
    """Return (lo, hi, den) with lo/den = mid − rad and hi/den = mid + rad exactly."""
    mantissa, exponent = value.mid().man_exp()
    radius_mantissa, radius_exponent = value.rad().man_exp()
    mantissa, exponent = int(mantissa), int(exponent)
    radius_mantissa, radius_exponent = int(radius_mantissa), int(radius_exponent)
    if radius_mantissa == 0:
        radius_exponent = exponent
    if mantissa == 0:
        exponent = radius_exponent
    base = min(exponent, radius_exponent)
    middle = mantissa << (exponent - base)
    radius = radius_mantissa << (radius_exponent - base)
    if base >= 0:
        return (middle - radius) << base, (middle + radius) << base, 1
    return middle - radius, middle + radius, 1 << -base
