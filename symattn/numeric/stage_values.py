"""Stage values of the vectorised engine: exact limb arrays and balls with float64 radii.

Both kinds convert to ``Intervals`` (exact rational endpoints per entry) only when a caller reads
the values, because that conversion runs entry by entry in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .limbs import approximate, to_ints
from .reference import Intervals


@dataclass
class ExactValues:
    """Exact entries: value = int(limbs) · 2^exponent · factor (+ added), or −inf where hidden.

    ``limbs`` has shape (L, rows · cols). ``added`` is None or an object array of Fractions per
    entry (an additive mask), and ``hidden`` is None or a bool array marking −inf entries.
    """

    shape: tuple[int, int]
    limbs: np.ndarray
    exponent: int
    factor: Fraction = Fraction(1)
    added: np.ndarray | None = None
    hidden: np.ndarray | None = None

    def is_narrow(self, bits: int) -> bool:
        return True

    def to_intervals(self) -> Intervals:
        integers = to_ints(self.limbs)
        scale = Fraction(2) ** self.exponent * self.factor
        special = {}
        lo, den = [], []
        for k, integer in enumerate(integers):
            if self.hidden is not None and self.hidden[k]:
                special[k] = -math.inf
                lo.append(0)
                den.append(1)
                continue
            value = integer * scale
            if self.added is not None:
                value += self.added[k]
            lo.append(value.numerator)
            den.append(value.denominator)
        return Intervals(self.shape, lo, lo, den, special)


@dataclass
class BallValues:
    """Balls: |x − int(limbs) · 2^exponent| ≤ radius · 2^radius_exponent, or NaN / −inf where marked.

    ``radius`` is a float64 array of upper bounds (0 for exact entries); ``nan`` and ``hidden`` are
    None or bool arrays over the flat entries.
    """

    shape: tuple[int, int]
    limbs: np.ndarray
    exponent: int
    radius: np.ndarray
    radius_exponent: int
    nan: np.ndarray | None = None
    hidden: np.ndarray | None = None

    def _special(self) -> np.ndarray:
        special = np.zeros(self.radius.shape, dtype=bool)
        for mask in (self.nan, self.hidden):
            if mask is not None:
                special |= mask
        return special

    def is_narrow(self, bits: int) -> bool:
        """Return whether every ball is exact or has relative radius at most 2^-bits (see Intervals.is_narrow)."""
        ordinary = ~self._special() & (self.radius > 0)
        if not ordinary.any():
            return True
        middle = np.abs(approximate(self.limbs[:, ordinary]))
        # log2 of the middle (with a 2^-40 safety margin for the approximation) and of the radius.
        with np.errstate(divide="ignore"):
            middle_bits = np.log2(middle * (1 - 2.0**-40)) + self.exponent
            radius_bits = np.log2(self.radius[ordinary]) + self.radius_exponent
        straddling = middle_bits <= radius_bits
        if np.any(~straddling & (radius_bits > middle_bits - bits)):
            return False
        if straddling.any():
            largest = np.max(middle_bits) if np.isfinite(middle_bits).any() else -np.inf
            return bool(np.all(radius_bits[straddling] + 1 <= largest - bits - 64))
        return True

    def to_intervals(self) -> Intervals:
        integers = to_ints(self.limbs)
        special = {}
        lo, hi, den = [], [], []
        for k, integer in enumerate(integers):
            if self.nan is not None and self.nan[k]:
                special[k] = math.nan
            elif self.hidden is not None and self.hidden[k]:
                special[k] = -math.inf
            if k in special:
                lo.append(0), hi.append(0), den.append(1)
                continue
            low, high, denominator = _ball_endpoints(integer, self.exponent, float(self.radius[k]),
                                                     self.radius_exponent)
            lo.append(low), hi.append(high), den.append(denominator)
        return Intervals(self.shape, lo, hi, den, special)


def _ball_endpoints(middle: int, exponent: int, radius: float, radius_exponent: int) -> tuple[int, int, int]:
    """Return (lo, hi, den) for the ball middle · 2^exponent ± radius · 2^radius_exponent."""
    numerator, denominator = radius.as_integer_ratio()  # denominator is a power of two
    return dyadic_ball_endpoints(middle, exponent, numerator, radius_exponent - (denominator.bit_length() - 1))


def dyadic_ball_endpoints(middle: int, exponent: int, radius: int, radius_exponent: int) -> tuple[int, int, int]:
    """Return (lo, hi, den) with lo/den = m·2^e − r·2^f and hi/den = m·2^e + r·2^f exactly."""
    if radius == 0:
        radius_exponent = exponent
    base = min(exponent, radius_exponent)
    centre = middle << (exponent - base)
    spread = radius << (radius_exponent - base)
    if base >= 0:
        return (centre - spread) << base, (centre + spread) << base, 1
    return centre - spread, centre + spread, 1 << -base
