"""Facts about the binary formats that implementations compute in, and exact rounding into them.

A format with p significand bits (the implicit bit included) and minimum normal exponent emin
spaces its numbers in [2^e, 2^(e+1)) by ulp = 2^(max(e, emin) − p + 1), so subnormals share the
spacing of the smallest normal binade and ulp(0) is the smallest subnormal.

NumPy has no bfloat16, so bfloat16 values travel as float32 arrays that hold bfloat16 values
(every bfloat16 value is a float32 value).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from ..errors import InvalidInputError
from ..numeric.ieee import FORMATS, BinaryFormat, round_rational


def binary_format(dtype: object) -> BinaryFormat:
    """Return the format of a dtype given as a name, a NumPy dtype or a torch dtype."""
    return FORMATS[dtype_name(dtype)]


def eps(dtype: object) -> float:
    """Return machine epsilon 2^(1−p) of ``dtype``, the distance from 1 to the next larger number."""
    return math.ldexp(1.0, 1 - binary_format(dtype).precision)


def dtype_name(dtype: object) -> str:
    """Normalise "float32", ``np.float32``, ``np.dtype("float32")`` or ``torch.float32`` to "float32"."""
    text = str(dtype)
    if text.startswith("torch."):
        text = text[len("torch.") :]
    if text not in FORMATS:
        try:
            text = np.dtype(dtype).name  # type: ignore[arg-type]
        except TypeError:
            pass
    if text not in FORMATS:
        raise InvalidInputError(
            f"dtype {dtype!r} is not supported; expected one of {', '.join(FORMATS)}"
        )
    return text


def ulp(values: np.ndarray, dtype: object) -> np.ndarray:
    """Return the ulp in ``dtype`` of each finite value, as float64 (NaN for NaN and infinities).

    >>> ulp(np.array([1.0, 0.0, 65504.0]), "float16").tolist()
    [0.0009765625, 5.960464477539063e-08, 32.0]
    """
    fmt = binary_format(dtype)
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    _, exponent = np.frexp(np.where(finite, values, 1.0))
    # frexp gives |x| = f · 2^E with 1/2 ≤ f < 1, so the binade of x starts at 2^(E−1).
    # Zero gets E = 0, and the maximum with emin gives it the subnormal spacing.
    binade = np.where(values == 0, fmt.min_exponent, np.maximum(exponent.astype(np.int64) - 1, fmt.min_exponent))
    spacing = np.ldexp(1.0, binade - fmt.precision + 1)
    return np.where(finite, spacing, np.nan)


def round_fraction(value: Fraction, dtype: object) -> float:
    """Round an exact rational to ``dtype`` with round-to-nearest-even, returned as a Python float.

    Values beyond the rounding threshold of the largest finite number become ±inf.

    >>> round_fraction(Fraction(1, 3), "float16")
    0.333251953125
    >>> round_fraction(Fraction(65520), "float16")
    inf
    """
    return round_rational(value.numerator, value.denominator, binary_format(dtype))


def round_array(values: np.ndarray, dtype: object) -> np.ndarray:
    """Round float64 values to ``dtype`` (bfloat16 through exact rationals), returned as float64.

    NOTE: this rounds values that are already rounded to float64, so it can differ from the
    correctly rounded value by one ulp of ``dtype`` where the float64 rounding moved a value onto
    a tie. Certified references round the exact value instead (CertifiedMatrix.rounded).
    """
    name = dtype_name(dtype)
    values = np.asarray(values, dtype=np.float64)
    if name != "bfloat16":
        with np.errstate(over="ignore"):
            return values.astype(name).astype(np.float64)
    flat = [
        value if not math.isfinite(value) else round_fraction(Fraction(value), "bfloat16")
        for value in values.reshape(-1).tolist()
    ]
    return np.array(flat, dtype=np.float64).reshape(values.shape)
