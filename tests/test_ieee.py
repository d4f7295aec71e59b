"""Correct rounding to IEEE formats, checked against hand-worked values and NumPy's casts."""

import math
from fractions import Fraction

import numpy as np
import pytest

from symattn import EvaluationError, InvalidInputError
from symattn.numeric.ieee import FORMATS, binary_format, round_interval, round_rational
from symattn.numeric.reference import CertifiedMatrix, Intervals

F64, F32, F16, BF16 = (FORMATS[name] for name in ("float64", "float32", "float16", "bfloat16"))


def rnd(value: Fraction, fmt) -> float:
    value = Fraction(value)
    return round_rational(value.numerator, value.denominator, fmt)


# (value, format, expected): ties go to the even significand, values beside a tie go to the nearest.
HAND_CASES = [
    (Fraction(1) + Fraction(1, 2**53), F64, 1.0),  # tie between 1 and 1 + 2^-52: 1 is even
    (Fraction(1) + Fraction(3, 2**53), F64, 1 + 2.0**-51),  # tie between 1 + 2^-52 (odd) and 1 + 2^-51
    (Fraction(1) + Fraction(1, 2**53) + Fraction(1, 2**100), F64, 1 + 2.0**-52),  # just above the tie
    (Fraction(1) + Fraction(1, 2**53) - Fraction(1, 2**100), F64, 1.0),  # just below the tie
    (Fraction(1, 2**1074), F64, 2.0**-1074),  # the smallest subnormal, exact
    (Fraction(1, 2**1075), F64, 0.0),  # half the smallest subnormal: tie to even 0
    (Fraction(3, 2**1076), F64, 2.0**-1074),  # three quarters of it: up
    (Fraction(3, 2**1075), F64, 2.0**-1073),  # 1.5 subnormal units: tie, to the even 2 units
    (Fraction(2**1024 - 2**970), F64, math.inf),  # max + half an ulp: tie, rounds up to 2^1024
    (Fraction(2**1024 - 2**970 - 1), F64, 1.7976931348623157e308),  # just below: the max
    (Fraction(65504), F16, 65504.0),  # float16 max, exact
    (Fraction(65519), F16, 65504.0),  # below the overflow threshold
    (Fraction(65520), F16, math.inf),  # the threshold: a tie whose even neighbour is 2^16
    (Fraction(1, 2**24), F16, 2.0**-24),  # float16's smallest subnormal
    (Fraction(1, 2**25), F16, 0.0),  # half of it: tie to even 0
    (Fraction(3, 2**26), F16, 2.0**-24),  # three quarters of it
    (Fraction(2049), F16, 2048.0),  # tie between 2048 (even) and 2050
    (Fraction(2051), F16, 2052.0),  # tie between 2050 (odd) and 2052
    (Fraction(1, 3), BF16, 0.333984375),  # 1.0101010|1010… × 2^-2 rounds up to 171/512
    (Fraction(1, 3), F32, 0.3333333432674408),  # 11184811 / 2^25
    (Fraction(1, 10), F32, 13421773 / 2**27),
    (Fraction(257), BF16, 256.0),  # tie between 256 (even) and 258
    (Fraction(-1, 3), BF16, -0.333984375),
    (Fraction(-1, 2**30), F16, -0.0),
]


@pytest.mark.parametrize("value, fmt, expected", HAND_CASES)
def test_round_rational_hand_worked_values(value, fmt, expected):
    result = rnd(value, fmt)
    assert result == expected
    assert math.copysign(1.0, result) == math.copysign(1.0, expected)


def test_round_rational_negative_zero_sign():
    assert math.copysign(1.0, rnd(Fraction(-1, 2**2000), F64)) == -1.0


def test_round_rational_matches_numpy_casts():
    rng = np.random.default_rng(7)
    values = np.concatenate([
        rng.standard_normal(2000) * 10.0 ** rng.integers(-12, 12, 2000),
        rng.standard_normal(200) * 1e-40,  # float32 subnormals
        rng.standard_normal(200) * 1e-6,  # float16 subnormals
        rng.standard_normal(200) * 7e4,  # float16 overflow
    ])
    for value in values.tolist():
        exact = Fraction(value)
        assert rnd(exact, F32) == float(np.float32(value))
        with np.errstate(over="ignore"):
            assert rnd(exact, F16) == float(np.float16(value))


def test_bfloat16_matches_bit_rounding_of_float32():
    rng = np.random.default_rng(3)
    values = rng.standard_normal(3000).astype(np.float32) * np.float32(3.0) ** rng.integers(-20, 20, 3000).astype(np.float32)
    bits = values.view(np.uint32).astype(np.uint64)
    # Round to nearest even on the top 16 bits: add 0x7FFF plus the lowest kept bit.
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    expected = rounded.astype(np.uint32).view(np.float32)
    for value, want in zip(values.tolist(), expected.tolist()):
        assert rnd(Fraction(value), BF16) == want


def test_round_interval_straddling_midpoint_is_undecided():
    tie = Fraction(1) + Fraction(1, 2**53)
    low, high = tie - Fraction(1, 2**80), tie + Fraction(1, 2**80)
    den = 2**80
    assert round_interval(int(low * den), int(high * den), den, F64) is None


def test_round_interval_narrow_is_decided():
    den = 2**80
    value = Fraction(1) + Fraction(1, 2**53) + Fraction(1, 2**70)
    assert round_interval(int(value * den) - 1, int(value * den) + 1, den, F64) == 1 + 2.0**-52


def test_binary_format_rejects_unknown_dtype():
    with pytest.raises(InvalidInputError, match="float8"):
        binary_format("float8")


def test_certified_matrix_refines_straddling_interval():
    # The first interval straddles the float64 tie 1 + 2^-53; the refined one lies above it.
    den = 2**120
    value = Fraction(1) + Fraction(1, 2**53) + Fraction(1, 2**110)
    wide = Intervals((1, 1), [int((value - Fraction(1, 2**100)) * den)], [int((value + Fraction(1, 2**100)) * den)], [den], {})
    narrow = Intervals((1, 1), [int(value * den) - 1], [int(value * den) + 1], [den], {})
    calls = []

    def refine(bits):
        calls.append(bits)
        return narrow

    matrix = CertifiedMatrix("x", (1, 1), wide, 100, 20, refine)
    assert matrix.rounded("float64")[0, 0] == 1 + 2.0**-52
    assert calls == [200]


def test_certified_matrix_exact_tie_rounds_to_even():
    den = 2**53
    matrix = CertifiedMatrix("x", (1, 1), Intervals.exact((1, 1), [den + 1], den), 100, 20)
    assert matrix.rounded("float64")[0, 0] == 1.0


def test_certified_matrix_unresolvable_tie_raises():
    den = 2**60
    tie = (1 << 60) + (1 << 7)  # 1 + 2^-53 over 2^60
    always_wide = Intervals((1, 1), [tie - 1], [tie + 1], [den], {})
    matrix = CertifiedMatrix("x", (1, 1), always_wide, 100, 20, lambda bits: always_wide)
    with pytest.raises(EvaluationError, match="entry \\(0, 0\\) of stage x"):
        matrix.rounded("float64")


def test_certified_matrix_bfloat16_storage_is_float32():
    matrix = CertifiedMatrix("x", (1, 2), Intervals.exact((1, 2), [1, -1], 3), 100, 20)
    values = matrix.rounded("bfloat16")
    assert values.dtype == np.float32
    assert values.tolist() == [[0.333984375, -0.333984375]]
    assert (values.view(np.uint32) & 0xFFFF).tolist() == [[0, 0]]


def test_certified_matrix_special_values():
    matrix = CertifiedMatrix("x", (1, 3), Intervals((1, 3), [0, 0, 5], [0, 0, 5], [1, 1, 1],
                                                  {0: math.nan, 1: -math.inf}), 100, 20)
    values = matrix.rounded("float16")
    assert math.isnan(values[0, 0])
    assert values[0, 1] == -math.inf
    assert values[0, 2] == 5.0
    assert matrix.decimals(5) == [["nan", "-inf", "5"]]
