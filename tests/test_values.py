"""Exact coercion of user values: numbers, strings, floats, arrays, symbols."""

from fractions import Fraction

import numpy as np
import pytest
import sympy as sp

from symattn import InvalidInputError, ShapeError
from symattn.values import parse_entry, parse_name, parse_number, symbol_matrix, to_exact, to_matrix


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2.1", sp.Rational(21, 10)),  # a decimal string is the decimal, not the nearest float
        ("0.25", sp.Rational(1, 4)),
        ("-1.5e-3", sp.Rational(-3, 2000)),
        ("1E3", sp.Integer(1000)),
        (".5", sp.Rational(1, 2)),
        ("+7", sp.Integer(7)),
        ("3/4", sp.Rational(3, 4)),
        ("-6/4", sp.Rational(-3, 2)),
        (" 12 ", sp.Integer(12)),
    ],
)
def test_parse_number_exact(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("text", ["", "1/0", "1.2.3", "e5", "0x10", "1_000", "nan", "inf", "2**8", "1e99999"])
def test_parse_number_rejects(text):
    with pytest.raises(InvalidInputError):
        parse_number(text)


def test_float_taken_at_exact_binary_value():
    assert to_exact(0.1) == sp.Rational(3602879701896397, 36028797018963968)
    assert to_exact(0.1) != sp.Rational(1, 10)


def test_decimal_string_differs_from_float():
    assert to_exact("0.1") == sp.Rational(1, 10)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), np.float32("nan"), sp.oo, sp.nan])
def test_non_finite_values_rejected(value):
    with pytest.raises(InvalidInputError, match="finite"):
        to_exact(value, "W_Q[0][1]")


def test_non_finite_message_names_position():
    with pytest.raises(InvalidInputError, match=r"W_Q\[0\]\[1\]"):
        to_matrix([[1, float("nan")]], "W_Q")


def test_bool_is_not_a_number():
    with pytest.raises(InvalidInputError, match="Mask"):
        to_exact(True)


def test_scalar_kinds_mixed_in_one_matrix():
    matrix = to_matrix([[1, Fraction(1, 3), "2.5", 0.5, "w", sp.sqrt(2)]], "X")
    assert list(matrix) == [1, sp.Rational(1, 3), sp.Rational(5, 2), sp.Rational(1, 2), sp.Symbol("w", real=True), sp.sqrt(2)]


def test_numpy_float_array_exact():
    matrix = to_matrix(np.array([[0.1, -2.0], [1e-300, 3.25]], dtype=np.float64), "X")
    assert matrix[0, 0] == sp.Rational(3602879701896397, 36028797018963968)
    assert matrix[0, 1] == -2
    assert matrix[1, 0] == sp.Rational(Fraction(1e-300).numerator, Fraction(1e-300).denominator)
    assert matrix[1, 1] == sp.Rational(13, 4)


def test_numpy_float32_array_exact():
    matrix = to_matrix(np.array([[0.1]], dtype=np.float32), "X")
    assert matrix[0, 0] == sp.Rational(13421773, 134217728)  # float32(0.1) = 13421773 / 2^27


def test_numpy_integer_array():
    assert to_matrix(np.arange(6).reshape(2, 3), "X") == sp.Matrix([[0, 1, 2], [3, 4, 5]])


def test_numpy_array_with_nan_rejected():
    with pytest.raises(InvalidInputError, match=r"\(0, 1\)"):
        to_matrix(np.array([[1.0, np.nan]]), "X")


def test_symbol_matrix_names_and_latex():
    matrix = symbol_matrix("x", 2, 3)
    assert matrix.shape == (2, 3)
    assert sp.latex(matrix[0, 1]) == "x_{1,2}"
    assert matrix[1, 2].is_real


def test_symbol_spec_forms_agree():
    assert to_matrix(("w", (2, 2)), "W") == to_matrix({"symbol": "w", "shape": [2, 2]}, "W")


def test_ragged_rows_rejected():
    with pytest.raises(ShapeError, match="row 1 has 1 entries"):
        to_matrix([[1, 2], [3]], "X")


def test_one_dimensional_list_rejected():
    with pytest.raises(ShapeError, match=r"\[\[\.\.\.\]\]"):
        to_matrix([1, 2, 3], "X")


@pytest.mark.parametrize("text", ["w", "alpha", "b_1", "W_Q", "x2", "x_{1,2}", "W_{10,3}"])
def test_parse_name_accepts(text):
    assert parse_name(text) == text


@pytest.mark.parametrize("text", ["_x", "__import__", "a.b", "x y", "x__y", "\\input", "x{1}", "1x", "a" * 65,
                                  "x_{1}", "x_{1,2", "x_{a,1}", "x_{1,2}}", "x_{1,\\input}", "x_{1,2}_3"])
def test_parse_name_rejects(text):
    with pytest.raises(InvalidInputError):
        parse_name(text)


def test_parse_entry_negated_name():
    assert parse_entry("-b_1") == -sp.Symbol("b_1", real=True)


def test_parse_entry_symbol_matrix_name():
    # A single entry can name an entry of a generated symbol matrix, which is the same symbol.
    assert parse_entry("-x_{2,1}") == -symbol_matrix("x", 2, 2)[1, 0]


@pytest.mark.parametrize("text", ["__import__('os').system('true')", "x.__class__", "sqrt(2)", "1+1", "lambda: 0"])
def test_parse_entry_rejects_code(text):
    with pytest.raises(InvalidInputError, match="neither a number nor a name"):
        parse_entry(text)
