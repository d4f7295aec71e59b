"""Correct rounding of exact rationals to IEEE binary formats, round to nearest, ties to even.

A certified value is an interval [lo, hi] with rational endpoints. Rounding is monotone, so when
both endpoints round to the same float every value in the interval does, and that float is the
correctly rounded value. When they differ, the interval straddles a rounding boundary (the
midpoint between two neighbouring floats) and the caller must narrow it first.

Each format is given by its precision p (significand bits, implicit bit included) and its
exponent range: normal numbers are m · 2^(E − p + 1) with 2^(p−1) ≤ m < 2^p and
E_min ≤ E ≤ E_max; below 2^E_min the spacing stays 2^(E_min − p + 1) (subnormals). A value at
or beyond the largest finite number plus half its spacing rounds to infinity, so for float16
(largest finite 65504, spacing 32) every value from 65520 on becomes inf.

>>> round_rational(1, 3, FORMATS["bfloat16"])
0.333984375
>>> round_rational(65520, 1, FORMATS["float16"])
inf
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BinaryFormat:
    """An IEEE-style binary floating-point format.

    ``precision``: significand bits including the implicit leading bit.
    ``min_exponent``, ``max_exponent``: the exponent range E_min … E_max of normal numbers.
    ``storage``: the NumPy dtype that represents the format's values exactly (float32 for bfloat16).
    """

    name: str
    precision: int
    min_exponent: int
    max_exponent: int
    storage: str

    @property
    def max_finite(self) -> float:
        return math.ldexp(2 ** self.precision - 1, self.max_exponent - self.precision + 1)

    @property
    def smallest_subnormal(self) -> float:
        return math.ldexp(1, self.min_exponent - self.precision + 1)


FORMATS: dict[str, BinaryFormat] = {
    "float64": BinaryFormat("float64", 53, -1022, 1023, "float64"),
    "float32": BinaryFormat("float32", 24, -126, 127, "float32"),
    "float16": BinaryFormat("float16", 11, -14, 15, "float16"),
    "bfloat16": BinaryFormat("bfloat16", 8, -126, 127, "float32"),
}


def binary_format(dtype: str) -> BinaryFormat:
    """Return the format for a dtype name, raising InvalidInputError for other names."""
    from ..errors import InvalidInputError

    name = str(getattr(dtype, "name", dtype))
    try:
        return FORMATS[name]
    except KeyError:
        raise InvalidInputError(
            f"dtype {dtype!r} is not supported; expected one of {', '.join(FORMATS)}"
        ) from None


def round_rational(numerator: int, denominator: int, fmt: BinaryFormat) -> float:
    """Round numerator/denominator (denominator > 0) to ``fmt``, ties to even, as a Python float.

    The result is exact in float64 for every supported format. Overflow gives ±inf and a value
    that rounds to zero keeps its sign (−0.0 for a negative value).
    """
    if numerator == 0:
        return 0.0
    negative = numerator < 0
    n = -numerator if negative else numerator
    d = denominator

    # Exponent E with 2^E <= n/d < 2^(E+1): start from the bit lengths and correct by one.
    exponent = n.bit_length() - d.bit_length()
    if (n << max(0, -exponent)) < (d << max(0, exponent)):
        exponent -= 1

    # The spacing of floats around the value is 2^quantum; subnormals keep E_min's spacing.
    quantum = max(exponent, fmt.min_exponent) - fmt.precision + 1

    # Integer significand q = n / (d · 2^quantum), rounded to nearest with ties to even.
    if quantum >= 0:
        q, remainder = divmod(n, d << quantum)
        twice_remainder, divisor = 2 * remainder, d << quantum
    else:
        q, remainder = divmod(n << -quantum, d)
        twice_remainder, divisor = 2 * remainder, d
    if twice_remainder > divisor or (twice_remainder == divisor and q & 1):
        q += 1

    # Rounding up may carry to 2^precision, which is still exact: q · 2^quantum.
    if q.bit_length() + quantum > fmt.max_exponent + 1:
        value = math.inf
    else:
        value = math.ldexp(q, quantum)
        if value > fmt.max_finite:
            value = math.inf
    return -value if negative else value


def round_interval(lo: int, hi: int, denominator: int, fmt: BinaryFormat) -> float | None:
    """Return the float that every value in [lo/den, hi/den] rounds to, or None if they differ."""
    low = round_rational(lo, denominator, fmt)
    if lo == hi:
        return low
    high = round_rational(hi, denominator, fmt)
    if low != high:
        return None
    if low == 0.0 and math.copysign(1.0, low) != math.copysign(1.0, high):
        return math.copysign(0.0, lo + hi)  # both ends round to zero: take the midpoint's sign
    return low


def to_storage(values: np.ndarray, fmt: BinaryFormat) -> np.ndarray:
    """Cast float64 values that are already representable in ``fmt`` to its storage dtype (exactly)."""
    return values.astype(fmt.storage)
