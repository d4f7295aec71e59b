"""Exact, vectorised conversion of floating-point arrays.

A binary float is m · 2^e with an integer mantissa m, so a whole array converts through two
integer arrays instead of one Python ``Fraction`` per entry. The SymPy path still needs one
Rational per entry at the end, but the certified engine works on (m, e) directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import sympy as sp

# Mantissa bits of each binary format (including the implicit bit).
_MANTISSA_BITS = {np.dtype(np.float16): 11, np.dtype(np.float32): 24, np.dtype(np.float64): 53}


def mantissas_and_exponents(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a finite float array into int64 mantissas m and exponents e with array == m · 2**e exactly."""
    array = np.asarray(array)
    bits = _MANTISSA_BITS.get(array.dtype)
    if bits is None:
        raise TypeError(f"expected a float16, float32 or float64 array, got dtype {array.dtype}")
    fraction, exponent = np.frexp(array.astype(np.float64))
    mantissa = np.ldexp(fraction, bits).astype(np.int64)  # exact: the fraction has at most `bits` bits
    return mantissa, exponent.astype(np.int64) - bits


def odd_mantissas_and_exponents(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Like mantissas_and_exponents, with the trailing zero bits of each mantissa moved into its exponent.

    The mantissas come out odd (or zero), so a matrix scaled to a common exponent has integers
    no wider than its values need: 0.5 becomes 1 · 2**-1 instead of 2**52 · 2**-53.
    """
    mantissa, exponent = mantissas_and_exponents(array)
    lowest_bit = np.where(mantissa != 0, mantissa & -mantissa, 1)
    trailing_zeros = (np.frexp(lowest_bit.astype(np.float64))[1] - 1).astype(np.int64)
    return mantissa >> trailing_zeros, exponent + trailing_zeros


def lowest_bit_exponent(array: np.ndarray) -> int | None:
    """Return the largest e such that every entry of a finite float array is a multiple of 2**e (None if all are 0).

    This is the smallest exponent of an entry's lowest set bit. It reads the float64 bit fields
    directly: a normal number is (2**52 + fraction) · 2**(biased − 1075), a subnormal one is
    fraction · 2**-1074. The lowest set bit of each entry is then a float64 power of two.
    """
    every_bit = np.ascontiguousarray(array, dtype=np.float64).reshape(-1).view(np.int64)
    none = 1 << 20  # above every exponent a float64 bit can have
    smallest = none
    # Blocks keep the temporary arrays small, so they are reused instead of newly mapped each time.
    for start in range(0, every_bit.size, 1 << 15):
        bits = every_bit[start:start + (1 << 15)]
        biased = (bits >> 52) & 0x7FF
        significand = bits & ((1 << 52) - 1)
        significand |= (biased != 0).astype(np.int64) << 52
        lowest = significand & -significand  # the lowest set bit, a power of two below 2**53
        # As a float64 that power of two is exact, and its biased exponent is 1023 + the bit's position.
        exponents = (lowest.astype(np.float64).view(np.int64) >> 52) + (np.maximum(biased, 1) - 1075 - 1023)
        exponents[significand == 0] = none  # zeros have no lowest bit
        smallest = min(smallest, int(exponents.min()))
    return None if smallest == none else smallest


def float_array_to_rationals(array: np.ndarray) -> list[list[sp.Rational]]:
    """Convert a finite 2-D float array to nested lists of exact SymPy rationals."""
    mantissa, exponent = mantissas_and_exponents(array)
    rows = []
    for m_row, e_row in zip(mantissa.tolist(), exponent.tolist()):
        rows.append(
            [sp.Integer(m) * sp.Integer(2) ** e if e >= 0 else sp.Rational(m, 1 << -e) for m, e in zip(m_row, e_row)]
        )
    return rows


@dataclass(frozen=True)
class ScaledIntegers:
    """An exact matrix stored as integers with one common scale: value = ints · 2**exponent / denominator.

    Float inputs are dyadic rationals, so a whole float matrix becomes one integer matrix and
    one exponent, and products and sums of such matrices stay exact integer arithmetic.
    ``ints`` is a 2-D object array of Python ints; ``denominator`` is a positive int (1 for
    float and integer inputs).
    """

    ints: np.ndarray
    exponent: int = 0
    denominator: int = 1

    @classmethod
    def from_array(cls, array: np.ndarray) -> "ScaledIntegers":
        """Convert a 1-D or 2-D array of floats, integers, ints or Fractions exactly (1-D becomes one row)."""
        array = np.asarray(array)
        if array.ndim == 1:
            array = array.reshape(1, -1)
        if array.dtype.kind == "f":
            mantissa, exponent = odd_mantissas_and_exponents(array)
            nonzero = mantissa != 0
            base = int(exponent[nonzero].min()) if nonzero.any() else 0
            shifts = np.where(nonzero, exponent - base, 0)
            ints = mantissa.astype(object) << shifts.astype(object)
            return cls(ints, base, 1)
        if array.dtype.kind in "iu":
            return cls(array.astype(object), 0, 1)
        entries = [Fraction(entry) for entry in array.reshape(-1).tolist()]
        denominator = math.lcm(*(entry.denominator for entry in entries)) if entries else 1
        ints = np.empty(len(entries), dtype=object)
        ints[:] = [entry.numerator * (denominator // entry.denominator) for entry in entries]
        return cls(ints.reshape(array.shape), 0, denominator)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.ints.shape)

    @property
    def T(self) -> "ScaledIntegers":
        return ScaledIntegers(self.ints.T, self.exponent, self.denominator)

    def columns(self, start: int, stop: int) -> "ScaledIntegers":
        return ScaledIntegers(self.ints[:, start:stop], self.exponent, self.denominator)

    def __matmul__(self, other: "ScaledIntegers") -> "ScaledIntegers":
        return ScaledIntegers(
            np.dot(self.ints, other.ints), self.exponent + other.exponent, self.denominator * other.denominator
        )

    def __add__(self, other: "ScaledIntegers") -> "ScaledIntegers":
        """Add exactly; a single-row ``other`` is added to every row (a bias)."""
        exponent = min(self.exponent, other.exponent)
        denominator = math.lcm(self.denominator, other.denominator)

        def aligned(term: "ScaledIntegers") -> np.ndarray:
            factor = (denominator // term.denominator) << (term.exponent - exponent)
            return term.ints * factor if factor != 1 else term.ints

        return ScaledIntegers(aligned(self) + aligned(other), exponent, denominator)

    def fractions(self) -> tuple[list[int], int]:
        """Return the flat row-major numerators and one common denominator."""
        flat = self.ints.reshape(-1).tolist()
        if self.exponent >= 0:
            return [int(n) << self.exponent for n in flat], self.denominator
        return [int(n) for n in flat], self.denominator << -self.exponent
