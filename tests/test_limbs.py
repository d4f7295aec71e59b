"""Exact limb arithmetic of the vectorised certified engine, checked against Python integers."""

import random
from fractions import Fraction

import numpy as np
import pytest

from symattn.exact_arrays import lowest_bit_exponent, odd_mantissas_and_exponents
from symattn.numeric.fixedpoint import multiply_truncated, product_error
from symattn.numeric.limbs import (
    LIMB_BITS, approximate, float_limbs, from_ints, limb_count, normalize, primes_for, signed_chunks, to_ints,
)


def random_integers(seed: int, count: int, largest_bits: int) -> list[int]:
    rng = random.Random(seed)
    values = [rng.choice((-1, 1)) * rng.getrandbits(rng.randint(0, largest_bits)) for _ in range(count)]
    # Values next to limb boundaries, where a negative top limb cancels the limbs below it.
    values += [0, 1, -1, -(1 << 48), (1 << 48) - 1, -(1 << (largest_bits - 1)) + 1, (1 << (largest_bits - 1)) - 1]
    return values


@pytest.mark.parametrize("recombining", [False, True])
def test_to_limbs_matches_python_integers(recombining):
    bits = 150
    values = random_integers(1, 500, bits)
    primes = primes_for(bits, 1)
    limbs = normalize(from_ints(values, limb_count(bits)))
    residues = primes.residues_of_limbs(limbs, primes.recombination_factors() if recombining else None)
    count = limb_count(bits)
    recombined = primes.to_limbs(residues, count, recombining=recombining)
    assert recombined.shape[0] == count
    assert to_ints(recombined) == values
    assert np.all((recombined[:-1] >= 0) & (recombined[:-1] < 2**LIMB_BITS))


def test_to_limbs_power_of_two_factor():
    # recombination_factors(e) multiplies the recombined integer by 2^e.
    values = random_integers(2, 200, 100)
    primes = primes_for(140, 1)
    residues = primes.residues_of_limbs(normalize(from_ints(values, limb_count(100))), primes.recombination_factors(37))
    assert to_ints(primes.to_limbs(residues, limb_count(140), recombining=True)) == [v << 37 for v in values]


def test_approximate_relative_error():
    values = random_integers(3, 2000, 300)
    approximations = approximate(normalize(from_ints(values, limb_count(300))), -120)
    for value, approximation in zip(values, approximations.tolist()):
        exact = Fraction(value, 1 << 120)
        if value == 0:
            assert approximation == 0
        else:
            assert abs(Fraction(approximation) - exact) <= abs(exact) * Fraction(1, 1 << 47)


@pytest.mark.parametrize("drop", [0, 2, 4, 5])
def test_multiply_truncated_signed_factor(drop):
    # A signed top limb (as to_limbs returns) keeps the error within product_error on either side.
    a_values = random_integers(4, 300, 90)
    b_values = [random.Random(5 + k).getrandbits(70) for k in range(len(a_values))]
    a = normalize(from_ints(a_values, limb_count(90)))
    b = from_ints(b_values, limb_count(70))
    product = to_ints(multiply_truncated(a, b, drop))
    bound = product_error(a.shape[0], b.shape[0])
    for x, y, result in zip(a_values, b_values, product):
        exact = Fraction(x * y, 1 << (LIMB_BITS * drop))
        assert abs(result - exact) < bound


@pytest.mark.parametrize("drop", [0, 1, 3])
def test_multiply_truncated_unnormalized_same_value(drop):
    a_values = [abs(v) for v in random_integers(6, 300, 100)]
    b_values = [random.Random(7 + k).getrandbits(80) for k in range(len(a_values))]
    a = from_ints(a_values, limb_count(100))
    b = from_ints(b_values, limb_count(80))
    normalized = to_ints(multiply_truncated(a, b, drop))
    unnormalized = multiply_truncated(a, b, drop, normalized=False)
    assert np.all(np.abs(unnormalized) < 2.0**53)
    assert to_ints(unnormalized) == normalized


@pytest.mark.parametrize("scale", ["-1/2", "-3"])
def test_vectorised_negative_scale_matches_entrywise(scale):
    # Negative scales flip the sign of the signed fixed-point logits after the product.
    from symattn import AttentionSpec
    from symattn.numeric import certified
    from symattn.numeric.reference import CertifiedMatrix
    from symattn.problem import Problem

    rng = np.random.default_rng(11)
    problem = Problem.from_arrays(spec=AttentionSpec(heads=2, scale=scale), direct=True,
                                  Q=rng.standard_normal((5, 8)), K=rng.standard_normal((6, 8)),
                                  V=rng.standard_normal((6, 8)))
    names = {"Z_scaled_0", "Z_scaled_1", "output"}
    fast = certified.VectorisedPipeline(problem, 120, names).run()
    plain = certified.evaluate_entrywise(problem, 120, names)
    for name in sorted(names):
        ours = CertifiedMatrix(name, fast[name].shape, fast[name], 120, 25,
                               lambda bits, name=name: certified.VectorisedPipeline(problem, bits, {name}).run()[name])
        theirs = CertifiedMatrix(name, plain[name].shape, plain[name], 120, 25)
        assert np.array_equal(ours.rounded("float64"), theirs.rounded("float64")), name
        assert ours.decimals() == theirs.decimals(), name


@pytest.mark.parametrize("array", [
    np.random.default_rng(12).standard_normal((300, 200)),  # more entries than one block
    np.array([[1.0, 2.0, 3.0]]),
    np.array([[0.5, 0.0, -4.0]]),
    np.array([[5e-324, 1.0]]),  # the smallest subnormal
    np.array([[3e-310, -7e-320]]),
    np.array([[-3.0, 1e300, 2.0**-1022]]),
    np.array([[0.375, -1.5]], dtype=np.float32),
    np.array([[6.0, -12.0]], dtype=np.float16),
])
def test_lowest_bit_exponent_matches_odd_mantissas(array):
    mantissa, exponent = odd_mantissas_and_exponents(array)
    assert lowest_bit_exponent(array) == int(exponent[mantissa != 0].min())


def test_lowest_bit_exponent_all_zero():
    assert lowest_bit_exponent(np.array([[0.0, -0.0]])) is None


# Float64 integers whose integer form is wider than 72 bits: a negative value far below the top
# limb once made the split round (2^72 − (2^52 + 1) has 72 significant bits).
WIDE_FLOATS = [-(2.0**52 + 1), -(2.0**52 + 1) * 2.0**19, -(2.0**53 - 1) * 2.0**40, -1.0, -3.0, 0.0,
               (2.0**53 - 1) * 2.0**40, -(2.0**95), 2.0**95 - 2.0**43, -(2.0**60 + 2.0**8)]


def test_float_limbs_exact_for_wide_negative_values():
    values = np.array(WIDE_FLOATS)
    limbs = float_limbs(values, 5)
    assert to_ints(limbs) == [int(v) for v in WIDE_FLOATS]
    assert np.all((limbs[:-1] >= 0) & (limbs[:-1] < 2**LIMB_BITS))


@pytest.mark.parametrize("count, width", [(5, 24), (4, 25), (3, 32)])
def test_signed_chunks_exact_for_wide_values(count, width):
    values = np.array(WIDE_FLOATS)
    chunks = signed_chunks(values, count, width)
    assert np.all(np.abs(chunks) < 2.0**width)
    recombined = [sum(int(chunks[j, i]) << (width * j) for j in range(count)) for i in range(len(WIDE_FLOATS))]
    assert recombined == [int(v) for v in WIDE_FLOATS]


def test_residues_of_wide_negative_floats():
    values = np.array(WIDE_FLOATS)
    primes = primes_for(200, 768)
    residues = primes.residues_of_floats(signed_chunks(values, 4, 25), 25)
    for k, p in enumerate(primes.primes):
        assert [int(r) % p for r in residues[k]] == [int(v) % p for v in WIDE_FLOATS]
        assert np.all(np.abs(residues[k]) <= (p + 1) // 2)


def test_from_ints_and_to_ints_round_trip():
    values = random_integers(21, 200, 170)
    limbs = from_ints(values, limb_count(171))
    assert np.all((limbs[:-1] >= 0) & (limbs[:-1] < 2**LIMB_BITS))
    assert to_ints(limbs) == values


def test_to_ints_of_unnormalised_limbs():
    # Limbs straight out of a sum: a low limb at 2^24 + 5 and another at −3.
    limbs = np.array([[2.0**24 + 5, -3.0], [1.0, 2.0], [-1.0, 0.0]])
    assert to_ints(limbs) == [2**24 + 5 + 2**24 - 2**48, -3 + 2 * 2**24]


@pytest.mark.parametrize("width", [1, 7, 10_000, 40_001])  # 40_001: several column blocks, a short last one
def test_reduce_rows_symmetric(width):
    primes = primes_for(200, 768)
    rng = np.random.default_rng(width)
    rows = rng.integers(-(1 << 51), 1 << 51, (len(primes), width)).astype(np.float64)
    first = 2  # rows 0.. of the view belong to primes 2, 3, …
    view = rows[: len(primes) - first]
    untouched = rows[len(primes) - first:].copy()
    expected = [[int(v) % p for v in row.tolist()] for row, p in zip(view, primes.primes[first:])]
    primes.reduce_rows(view, first)
    for row, residues, p in zip(view.tolist(), expected, primes.primes[first:]):
        assert max(abs(r) for r in row) <= (p + 1) // 2
        assert [int(r) % p for r in row] == residues
    assert np.array_equal(rows[len(primes) - first:], untouched)  # rows outside the view stay as they were


@pytest.mark.parametrize("array", [
    np.array([[0.75, -3.0], [1e10, 2.0**-30]]),  # 2^-base is a normal float64: multiplied
    np.array([[2.0**-1070, -3 * 2.0**-900]]),  # 2^1070 overflows float64: ldexp scales instead
    np.array([[2.0**1000, 2.0**990 * 3]]),  # base above 1023
])
def test_integer_matrix_exact(array):
    from symattn.numeric.certified import IntegerMatrix

    matrix = IntegerMatrix.from_array(array)
    for value, integer in zip(array.reshape(-1).tolist(), matrix.values.reshape(-1).tolist()):
        assert Fraction(value) == Fraction(int(integer)) * Fraction(2) ** matrix.exponent
        assert integer == int(integer)
    assert max(abs(int(v)) for v in matrix.values.reshape(-1).tolist()).bit_length() == matrix.bits
