"""Exact, vectorised conversion of floating-point arrays.

A binary float is m · 2^e with an integer mantissa m, so a whole array converts through two
integer arrays instead of one Python ``Fraction`` per entry. The SymPy path still needs one
Rational per entry at the end, but the certified engine works on (m, e) directly.
"""

from __future__ import annotations

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


def float_array_to_rationals(array: np.ndarray) -> list[list[sp.Rational]]:
    """Convert a finite 2-D float array to nested lists of exact SymPy rationals."""
    mantissa, exponent = mantissas_and_exponents(array)
    rows = []
    for m_row, e_row in zip(mantissa.tolist(), exponent.tolist()):
        rows.append(
            [sp.Integer(m) * sp.Integer(2) ** e if e >= 0 else sp.Rational(m, 1 << -e) for m, e in zip(m_row, e_row)]
        )
    return rows
