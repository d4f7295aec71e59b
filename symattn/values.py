"""Exact coercion of user values into SymPy numbers, symbols and matrices.

Every value that enters symattn passes through here, so that one place decides what is exact:

- ``int``, ``fractions.Fraction`` and SymPy numbers are taken as they are.
- Decimal strings (``"0.25"``, ``"-1.5e-3"``) and ``"p/q"`` strings become exact rationals, so
  ``"2.1"`` is 21/10.
- Python floats, NumPy floats and ``decimal.Decimal`` values are taken at their exact value, so
  ``0.1`` (a float) is 3602879701896397/36028797018963968, the binary number it stores.
- Strings that are names (``"w"``, ``"alpha"``, ``"b_1"``) become real SymPy symbols.
- NaN and infinities are rejected, because they have no exact value.

Strings are parsed by the regular expressions below and never by ``eval`` or ``sympify``, so a
string from a file or a command line cannot run code.
"""

from __future__ import annotations

import decimal
import fractions
import numbers
import re
from typing import Any

import sympy as sp

from .errors import InvalidInputError, ShapeError

# Decimal exponents beyond this bound would build integers with millions of digits.
MAX_DECIMAL_EXPONENT = 4000
MAX_NAME_LENGTH = 64
MAX_NUMBER_LENGTH = 2000

# re.ASCII keeps \d to 0-9, so look-alike digits such as "１" or "٣" are not numbers.
_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_RATIO = re.compile(r"[+-]?\d+/\d+", re.ASCII)
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*|[A-Za-z][A-Za-z0-9]*_\{[0-9]+,[0-9]+\}", re.ASCII)
_BASE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*")
# Entries spelled like these mean a non-finite float, never a symbol of that name.
_NON_FINITE_NAMES = frozenset({"nan", "inf", "infinity"})


def parse_number(text: str, where: str = "value") -> sp.Rational:
    """Parse a decimal string such as ``"-1.5e-3"`` or a ratio such as ``"3/4"`` exactly.

    >>> parse_number("2.1")
    21/10
    >>> parse_number("-1.5e-3")
    -3/2000
    >>> parse_number("1/0")
    Traceback (most recent call last):
    ...
    symattn.errors.InvalidInputError: value '1/0' has a zero denominator; give a ratio p/q with q > 0
    """
    stripped = text.strip()
    if len(stripped) > MAX_NUMBER_LENGTH:
        raise InvalidInputError(
            f"{where} is a string of {len(stripped)} characters; numbers longer than "
            f"{MAX_NUMBER_LENGTH} characters are not accepted"
        )
    if _RATIO.fullmatch(stripped):
        numerator, denominator = stripped.split("/")
        if int(denominator) == 0:
            raise InvalidInputError(
                f"{where} {text!r} has a zero denominator; give a ratio p/q with q > 0"
            )
        return sp.Rational(int(numerator), int(denominator))
    if _DECIMAL.fullmatch(stripped):
        return _parse_decimal(stripped, text, where)
    raise InvalidInputError(
        f"{where} {text!r} is not a number; expected a decimal such as '0.25' or '-1.5e-3', "
        f"or a ratio such as '3/4'"
    )


def _parse_decimal(stripped: str, text: str, where: str) -> sp.Rational:
    mantissa, _, exponent_text = stripped.lower().partition("e")
    exponent = int(exponent_text) if exponent_text else 0
    sign = -1 if mantissa.startswith("-") else 1
    mantissa = mantissa.lstrip("+-")
    whole, _, fraction_digits = mantissa.partition(".")
    exponent -= len(fraction_digits)
    if abs(exponent) > MAX_DECIMAL_EXPONENT:
        raise InvalidInputError(
            f"{where} {text!r} has a decimal exponent beyond ±{MAX_DECIMAL_EXPONENT}; "
            f"rescale the inputs"
        )
    digits = int((whole or "0") + fraction_digits)
    if exponent >= 0:
        return sp.Integer(sign * digits * 10**exponent)
    return sp.Rational(sign * digits, 10**-exponent)


def parse_name(text: str, where: str = "name") -> str:
    """Check that ``text`` is a plain identifier such as ``w``, ``alpha`` or ``b_1`` and return it.

    Names contain ASCII letters, digits and single underscores between parts, and start with a
    letter, so they cannot reach Python attributes or LaTeX commands. The entry names that
    symbol matrices generate, such as ``x_{1,2}``, are names too.
    """
    if len(text) > MAX_NAME_LENGTH or not _NAME.fullmatch(text):
        raise InvalidInputError(
            f"{where} {text!r} is not a valid name; expected letters and digits, starting with "
            f"a letter, with single underscores between parts (for example 'w', 'b_1', or "
            f"'x_{{1,2}}' for an entry of a symbol matrix), at most {MAX_NAME_LENGTH} characters"
        )
    return text


def make_symbol(name: str, where: str = "name") -> sp.Symbol:
    """Return the real SymPy symbol that symattn uses for ``name``."""
    return sp.Symbol(parse_name(name, where), real=True)


def parse_entry(text: str, where: str = "entry") -> sp.Expr:
    """Parse one matrix entry given as a string: a number, a name, or a negated name."""
    stripped = text.strip()
    if _RATIO.fullmatch(stripped) or _DECIMAL.fullmatch(stripped):
        return parse_number(stripped, where)
    negate = stripped.startswith("-")
    name = stripped[1:] if negate else stripped
    if name.lower() in _NON_FINITE_NAMES:
        raise InvalidInputError(
            f"{where} {text!r} is not a finite number, so it has no exact value; give a finite "
            f"number, or hide the key with a mask (an additive mask accepts '-inf')"
        )
    if len(name) <= MAX_NAME_LENGTH and _NAME.fullmatch(name):
        symbol = make_symbol(name, where)
        return -symbol if negate else symbol
    raise InvalidInputError(
        f"{where} {text!r} is neither a number nor a name; expected a decimal ('0.25'), "
        f"a ratio ('3/4') or a name ('w', '-b_1', 'x_{{1,2}}')"
    )


def to_exact(value: Any, where: str = "value") -> sp.Expr:
    """Convert one scalar to an exact SymPy expression, following the rules in the module docstring."""
    if isinstance(value, bool) or _is_numpy_bool(value):
        raise InvalidInputError(
            f"{where} is the boolean {value!r}; matrices of values take numbers or names. "
            f"Give a mask as Mask.keep(...) or Mask.block(...)"
        )
    if isinstance(value, sp.Basic):
        return _checked_sympy(value, where)
    if isinstance(value, str):
        return parse_entry(value, where)
    if isinstance(value, numbers.Integral):
        return sp.Integer(int(value))
    if isinstance(value, fractions.Fraction):
        return sp.Rational(value.numerator, value.denominator)
    if isinstance(value, (float, decimal.Decimal)) or _is_numpy_float(value):
        return _exact_binary_or_decimal(value, where)
    raise InvalidInputError(
        f"{where} is {value!r} of type {type(value).__name__}; expected an int, Fraction, "
        f"float, decimal string, 'p/q' string, name, or SymPy expression"
    )


def _exact_binary_or_decimal(value: Any, where: str) -> sp.Rational:
    if isinstance(value, decimal.Decimal):
        finite = value.is_finite()
    else:
        value = float(value)
        finite = value == value and value not in (float("inf"), float("-inf"))
    if not finite:
        raise InvalidInputError(
            f"{where} is {value}, which has no exact value; replace NaN and infinities with "
            f"finite numbers (use a mask to hide a key)"
        )
    if isinstance(value, decimal.Decimal):
        # The same bounds as for decimal strings: Decimal("1e999999999") would otherwise
        # become an integer of a billion digits.
        _, digit_tuple, exponent = value.as_tuple()
        if len(digit_tuple) > MAX_NUMBER_LENGTH or abs(exponent) > MAX_DECIMAL_EXPONENT:
            raise InvalidInputError(
                f"{where} is a decimal with {len(digit_tuple)} digits and exponent {exponent}; "
                f"numbers take at most {MAX_NUMBER_LENGTH} digits and a decimal exponent within "
                f"±{MAX_DECIMAL_EXPONENT}, so rescale the inputs"
            )
    numerator, denominator = value.as_integer_ratio()
    return sp.Rational(numerator, denominator)


def _checked_sympy(value: sp.Basic, where: str) -> sp.Expr:
    if not isinstance(value, sp.Expr) or isinstance(value, sp.MatrixBase):
        raise InvalidInputError(
            f"{where} is the SymPy object {value!r}; expected a scalar expression"
        )
    if value.has(sp.nan, sp.zoo, sp.oo, -sp.oo):
        raise InvalidInputError(
            f"{where} is {value}, which is not a finite value; use a mask to hide a key"
        )
    if isinstance(value, sp.Float):
        return sp.Rational(value)  # the exact binary value of the Float
    return value


def _is_numpy_bool(value: Any) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ == "bool"


def _is_numpy_float(value: Any) -> bool:
    return type(value).__module__ == "numpy" and isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)


def symbol_matrix(base: str, rows: int, cols: int) -> sp.ImmutableMatrix:
    """Return a rows × cols matrix of real symbols ``base_{i,j}``, indexed from 1 as in textbooks.

    >>> symbol_matrix("x", 1, 2)
    Matrix([[x_{1,1}, x_{1,2}]])
    """
    if not _BASE_NAME.fullmatch(base) or len(base) > MAX_NAME_LENGTH:
        raise InvalidInputError(
            f"symbol base {base!r} is not valid; expected letters and digits starting with a "
            f"letter, without underscores (for example 'x', 'w', 'Wq')"
        )
    _check_shape_numbers(rows, cols, f"symbol matrix {base!r}")
    return sp.ImmutableMatrix(
        rows, cols, lambda i, j: sp.Symbol(f"{base}_{{{i + 1},{j + 1}}}", real=True)
    )


def _check_shape_numbers(rows: Any, cols: Any, where: str) -> None:
    for size in (rows, cols):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ShapeError(f"{where} has shape ({rows}, {cols}); sizes must be positive integers")


def to_matrix(value: Any, name: str) -> sp.ImmutableMatrix:
    """Convert a 2-D value (nested lists, NumPy array, SymPy matrix) to an exact immutable matrix.

    ``name`` appears in error messages. A ``("x", (rows, cols))`` pair, or a dict
    ``{"symbol": "x", "shape": [rows, cols]}``, creates a matrix of symbols ``x_{i,j}``.
    """
    symbol_spec = _symbol_spec(value)
    if symbol_spec is not None:
        base, (rows, cols) = symbol_spec
        try:
            return symbol_matrix(base, rows, cols)
        except InvalidInputError as error:
            raise type(error)(f"{name}: {error}") from None
    if isinstance(value, sp.MatrixBase):
        rows_list = value.tolist()
    elif type(value).__module__ == "numpy":
        rows_list = _numpy_rows(value, name)
    elif isinstance(value, (list, tuple)):
        rows_list = list(value)
    else:
        raise InvalidInputError(
            f"{name} is {type(value).__name__}; expected a 2-D matrix as nested lists, a NumPy "
            f"array, a SymPy matrix, or a symbol spec such as ('x', (2, 3))"
        )
    return _rows_to_matrix(rows_list, name)


def _symbol_spec(value: Any) -> tuple[str, tuple[int, int]] | None:
    if isinstance(value, dict) and set(value) == {"symbol", "shape"}:
        shape = value["shape"]
        if not isinstance(value["symbol"], str) or not isinstance(shape, (list, tuple)) or len(shape) != 2:
            raise InvalidInputError(
                f"symbol spec {value!r} is invalid; expected {{'symbol': 'x', 'shape': [rows, cols]}}"
            )
        return value["symbol"], (shape[0], shape[1])
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], (tuple, list))
        and len(value[1]) == 2
    ):
        return value[0], (value[1][0], value[1][1])
    return None


def _numpy_rows(array: Any, name: str) -> list:
    import numpy as np

    if array.ndim != 2:
        raise ShapeError(
            f"{name} has {array.ndim} dimensions (shape {array.shape}); expected a 2-D matrix "
            f"whose rows are tokens"
        )
    if array.dtype == np.bool_:
        raise InvalidInputError(
            f"{name} is a boolean array; value matrices take numbers. Give masks as Mask.keep or Mask.block"
        )
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
            raise InvalidInputError(
                f"{name} contains {array[bad]} at {bad}, which has no exact value; "
                f"replace NaN and infinities with finite numbers"
            )
        from .exact_arrays import float_array_to_rationals

        return float_array_to_rationals(array)
    return array.tolist()


def _rows_to_matrix(rows_list: list, name: str) -> sp.ImmutableMatrix:
    if len(rows_list) == 0:
        raise ShapeError(f"{name} is empty; expected at least one row")
    if not all(isinstance(row, (list, tuple)) for row in rows_list):
        raise ShapeError(
            f"{name} is not 2-D; expected a list of rows (rows are tokens). Wrap a single row "
            f"as [[...]]"
        )
    width = len(rows_list[0])
    for i, row in enumerate(rows_list):
        if len(row) != width:
            raise ShapeError(
                f"{name} row {i} has {len(row)} entries but row 0 has {width}; rows must have equal length"
            )
    if width == 0:
        raise ShapeError(f"{name} has rows of width 0; expected at least one column")
    entries = [
        [to_exact(entry, f"{name}[{i}][{j}]") for j, entry in enumerate(row)]
        for i, row in enumerate(rows_list)
    ]
    return sp.ImmutableMatrix(entries)


def to_row_vector(value: Any, name: str, width: int) -> sp.ImmutableMatrix:
    """Convert a bias given as a flat list or a 1 × width matrix to a 1 × width matrix."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", 2) == 1:
        value = value.reshape(1, -1)
    if isinstance(value, (list, tuple)) and value and not isinstance(value[0], (list, tuple)):
        value = [list(value)]
    matrix = to_matrix(value, name)
    if matrix.shape != (1, width):
        raise ShapeError(
            f"{name} has shape {matrix.shape}; expected a vector of {width} entries, "
            f"one per output column"
        )
    return matrix
