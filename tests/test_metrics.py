"""Error metrics: ULPs in each format, exact rounding, and per-stage comparisons.

Expected values are powers of two and small rationals worked out by hand from the formats'
precisions (float16: 11 bits, emin −14; bfloat16: 8 bits, emin −126; float32: 24 bits, emin −126).
"""

import math
from fractions import Fraction

import numpy as np
import pytest

from symattn.errors import InvalidInputError, ShapeError
from symattn.verify.floats import FORMATS, dtype_name, eps, round_fraction, ulp
from symattn.verify.metrics import Tolerance, compare_stage


@pytest.mark.parametrize(
    "dtype, value, expected",
    [
        ("float16", 1.0, 2.0**-10),
        ("float16", 0.0, 2.0**-24),  # the smallest subnormal
        ("float16", 65504.0, 32.0),
        ("float16", 1e-6, 2.0**-24),  # subnormal: the spacing of the smallest binade
        ("float16", -3.0, 2.0**-9),
        ("bfloat16", 1.0, 2.0**-7),
        ("bfloat16", 0.0, 2.0**-133),
        ("float32", 1.0, 2.0**-23),
        ("float32", 1e-40, 2.0**-149),
        ("float64", 1.0, 2.0**-52),
        ("float64", 0.0, 2.0**-1074),
    ],
)
def test_ulp_per_format(dtype, value, expected):
    assert ulp(np.array([value]), dtype)[0] == expected


def test_ulp_of_infinity_is_nan():
    assert math.isnan(ulp(np.array([np.inf]), "float32")[0])


@pytest.mark.parametrize(
    "value, dtype, expected",
    [
        (Fraction(1, 3), "float16", 1365 / 4096),
        (Fraction(1, 3), "bfloat16", 171 / 512),
        (Fraction(1, 3), "float64", 1 / 3),
        (1 + Fraction(1, 2**11), "float16", 1.0),  # a tie goes to the even neighbour 1
        (1 + Fraction(3, 2**11), "float16", 1 + 2.0**-9),  # a tie goes to the even neighbour up
        (Fraction(65519), "float16", 65504.0),
        (Fraction(65520), "float16", math.inf),  # the overflow threshold 65504 + 32/2
        (Fraction(-65520), "float16", -math.inf),
        (Fraction(1, 2**25), "float16", 0.0),  # half the smallest subnormal ties to 0
        (Fraction(3, 2**26), "float16", 2.0**-24),
        (Fraction(1, 10), "float32", float(np.float32(0.1))),
    ],
)
def test_round_fraction_nearest_even(value, dtype, expected):
    assert round_fraction(value, dtype) == expected


def test_dtype_name_accepts_torch_and_numpy():
    torch = pytest.importorskip("torch")
    assert dtype_name(torch.bfloat16) == "bfloat16"
    assert dtype_name(np.float32) == "float32"
    assert dtype_name(np.dtype("float16")) == "float16"


def test_dtype_name_rejects_integers():
    with pytest.raises(InvalidInputError, match="int32"):
        dtype_name("int32")


def test_format_limits():
    assert FORMATS["float16"].max_finite == 65504.0
    assert eps("float32") == 2.0**-23
    assert eps("bfloat16") == 2.0**-7


def test_compare_one_ulp_off_in_float32():
    reference = np.array([1 / 3, 0.5])
    rounded = np.array([float(np.float32(1 / 3)), 0.5])
    actual = np.array([np.nextafter(np.float32(1 / 3), np.float32(1)), np.float32(0.5)], dtype=np.float32)
    result = compare_stage(actual, reference, rounded=rounded, dtype="float32",
                           tolerance=Tolerance(ulps=0.5), axes=("feature",))
    assert result.max_ulp_error == 1.0
    assert result.failing_count == 1
    assert result.worst.index == (0,)
    assert result.worst.location() == "feature 0"
    assert not result.passed


def test_compare_one_ulp_passes_with_one_ulp_tolerance():
    rounded = np.array([float(np.float32(1 / 3))])
    actual = np.array([np.nextafter(np.float32(1 / 3), np.float32(0))], dtype=np.float32)
    result = compare_stage(actual, np.array([1 / 3]), rounded=rounded, dtype="float32", tolerance=Tolerance(ulps=1))
    assert result.passed


def test_compare_absolute_relative_normwise():
    reference = np.array([[2.0, -4.0], [0.0, 1.0]])
    actual = np.array([[2.5, -4.0], [0.25, 1.0]])
    result = compare_stage(actual, reference, dtype="float64", tolerance=Tolerance(atol=0.3),
                           axes=("query", "feature"))
    assert result.max_abs_error == 0.5
    assert result.max_rel_error == 0.25  # 0.5 / 2; the zero reference is left out
    assert result.normwise_error == 0.5 / (2.0**-52 * 4.0)
    assert result.max_abs_reference == 4.0
    assert result.failing_count == 1
    assert result.worst.location() == "query 1, feature 0"  # 0.25 / ulp(0) is the largest ULP error


def test_compare_nan_where_reference_finite():
    actual = np.array([[1.0, np.nan], [np.nan, np.nan]])
    reference = np.array([[1.0, 2.0], [np.nan, np.nan]])
    result = compare_stage(actual, reference, dtype="float64", tolerance=Tolerance(ulps=4),
                           axes=("query", "feature"))
    assert result.nan_count == 3
    assert result.reference_nan_count == 2
    assert result.unexpected_nan_count == 1
    assert result.failing_count == 1
    assert result.nan_positions == ((0, 1), (1, 0), (1, 1))
    assert result.worst.index == (0, 1)
    assert math.isinf(result.worst.ulp_error)


def test_compare_same_infinity_matches():
    actual = np.array([np.inf, 1.0], dtype=np.float16)
    reference = np.array([70000.0, 1.0])
    rounded = np.array([np.inf, 1.0])
    result = compare_stage(actual, reference, rounded=rounded, dtype="float16", tolerance=Tolerance(ulps=0))
    assert result.passed
    assert result.inf_count == 1
    assert result.reference_inf_count == 1


def test_compare_infinity_where_reference_finite_fails():
    actual = np.array([np.inf], dtype=np.float16)
    result = compare_stage(actual, np.array([2.0]), dtype="float16", tolerance=Tolerance(rtol=1.0))
    assert result.failing_count == 1
    assert result.inf_positions == ((0,),)


def test_compare_shape_mismatch_names_both_shapes():
    with pytest.raises(ShapeError, match=r"\(2, 3\).*\(3, 2\)"):
        compare_stage(np.zeros((2, 3)), np.zeros((3, 2)), dtype="float64")


def test_tolerance_ulps_or_atol():
    # 1e-20 against a reference of 0 is about 2^1008 ULPs of float64, but within atol.
    result = compare_stage(np.array([1e-20]), np.array([0.0]), dtype="float64",
                           tolerance=Tolerance(ulps=4, atol=1e-15))
    assert result.passed
    assert result.max_ulp_error > 1e300


def test_tolerance_default_is_torch_testing_default():
    tolerance = Tolerance.default("float32")
    assert tolerance.rtol == 1.3e-6
    assert tolerance.atol == 1e-5
    assert tolerance.ulps is None


@pytest.mark.parametrize("options", [{}, {"ulps": -1}, {"rtol": math.nan}, {"atol": True}])
def test_tolerance_rejects_invalid(options):
    with pytest.raises(InvalidInputError):
        Tolerance(**options)


def test_tolerance_describe():
    assert Tolerance(ulps=4).describe() == "4 ULPs"
    assert Tolerance(rtol=1e-6, atol=1e-5).describe() == "|a − r| ≤ 1e-05 + 1e-06·|r|"
