"""Stage values of the vectorised engine: exact limb arrays and balls with float64 radii.

Both kinds convert to ``Intervals`` (exact rational endpoints per entry) only when a caller reads
the values, because that conversion runs entry by entry in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .ieee import BinaryFormat
from .limbs import approximate, float_limbs, magnitudes, normalize, to_ints
from .reference import TINY_BITS, Intervals

# Entries whose scaled distance to a rounding boundary is below this are left to the exact path.
BOUNDARY_MARGIN = 2.0**-40


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

    def round_fast(self, fmt: BinaryFormat) -> tuple[np.ndarray, np.ndarray]:
        """Return (values, decided) as round_balls does; only plain scaled integers are handled."""
        if self.factor != 1 or self.added is not None:
            return np.zeros(self.limbs.shape[1]), np.zeros(self.limbs.shape[1], dtype=bool)
        values, decided = round_balls(self.limbs, self.exponent, np.zeros(self.limbs.shape[1]), 0, fmt)
        if self.hidden is not None:
            values = np.where(self.hidden, -np.inf, values)
            decided = decided | self.hidden
        return values, decided

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

    def round_fast(self, fmt: BinaryFormat) -> tuple[np.ndarray, np.ndarray]:
        """Return (values, decided) as round_balls does, with NaN and −inf entries decided."""
        values, decided = round_balls(self.limbs, self.exponent, self.radius, self.radius_exponent, fmt)
        for mask, fill in ((self.hidden, -np.inf), (self.nan, np.nan)):
            if mask is not None:
                values = np.where(mask, fill, values)
                decided = decided | mask
        return values, decided

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


def round_balls(limbs: np.ndarray, exponent: int, radius: np.ndarray, radius_exponent: int,
                fmt: BinaryFormat) -> tuple[np.ndarray, np.ndarray]:
    """Round balls int(limbs)·2^exponent ± radius·2^radius_exponent to ``fmt`` where that is certain.

    Returns (values, decided): ``values`` contains the correctly rounded float for every entry where
    ``decided`` is True. The middle is split into hi, its float64 approximation, and lo, the exact
    remainder rounded to float64, so hi + lo is within about 2^-100 of it. An entry is decided when
    the whole ball, widened by that error, lies inside one rounding cell; entries within
    BOUNDARY_MARGIN of a cell boundary, zero middles with a radius, and values beyond float64's
    exponent range are left undecided for the exact path.
    """
    negative, magnitude = magnitudes(limbs)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        hi = approximate(magnitude, exponent)

        # The remainder lo = |middle| − hi, exactly in limbs, then as a float64.
        scaled_hi = np.ldexp(hi, -exponent)  # an integer whenever |middle| ≥ 2^53
        usable = np.isfinite(scaled_hi) & (hi > 0) & np.isfinite(hi)
        scaled_hi = np.where(usable, scaled_hi, 0.0)
        remainder = normalize(magnitude - float_limbs(scaled_hi, magnitude.shape[0]))
        exact = ~remainder.any(axis=0)
        lo = approximate(remainder, exponent)

        # Quantum 2^q of the format at hi's binade, subnormals included; t = hi / 2^q.
        binade = np.frexp(hi)[1] - 1
        q = np.maximum(binade, fmt.min_exponent) - fmt.precision + 1
        t = np.ldexp(hi, -q)
        whole = np.floor(t)
        fraction = (t - whole) + np.ldexp(lo, -q)  # position of |middle| inside the cell, in quanta
        spread = np.ldexp(radius, radius_exponent - q) * (1 + 2.0**-30) + BOUNDARY_MARGIN

        down = fraction + spread < 0.5
        up = (fraction - spread > 0.5) & (fraction + spread < 1.5)
        tie = (fraction == 0.5) & exact & (radius == 0)
        stays = down & (fraction - spread > -0.5)
        magnitude_rounded = np.where(up | (tie & (whole % 2 == 1)), whole + 1, whole)
        rounded = np.ldexp(magnitude_rounded, q)
        rounded = np.where(rounded > fmt.max_finite, np.inf, rounded)

    decided = usable & (stays | up | tie)
    zero = ~magnitude.any(axis=0) & (radius == 0)
    values = np.where(zero, 0.0, np.where(negative, -rounded, rounded))
    return np.where(decided | zero, values, 0.0), decided | zero


def _ball_endpoints(middle: int, exponent: int, radius: float, radius_exponent: int) -> tuple[int, int, int]:
    """Return (lo, hi, den) for the ball middle · 2^exponent ± radius · 2^radius_exponent."""
    numerator, denominator = radius.as_integer_ratio()  # denominator is a power of two
    return dyadic_ball_endpoints(middle, exponent, numerator, radius_exponent - (denominator.bit_length() - 1))


def dyadic_ball_endpoints(middle: int, exponent: int, radius: int, radius_exponent: int) -> tuple[int, int, int]:
    """Return (lo, hi, den) with lo/den = m·2^e − r·2^f and hi/den = m·2^e + r·2^f exactly.

    A ball below 2^-TINY_BITS in magnitude gets the enclosure described at TINY_BITS instead.
    """
    if radius == 0:
        radius_exponent = exponent
    base = min(exponent, radius_exponent)
    centre = middle << (exponent - base)
    spread = radius << (radius_exponent - base)
    lo, hi = centre - spread, centre + spread
    if base >= 0:
        return lo << base, hi << base, 1
    if -base > TINY_BITS and max(abs(lo), abs(hi)).bit_length() <= -base - TINY_BITS:
        return -int(lo < 0), int(hi > 0), 1 << TINY_BITS
    return lo, hi, 1 << -base

