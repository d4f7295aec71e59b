"""Numeric JSON export: every stage exactly and to N correctly rounded digits.

The document's keys come in a fixed order and floats never appear (numbers are strings), so two
runs on the same derivation give identical bytes.
"""

from __future__ import annotations

import json

import sympy as sp

from .. import __version__
from ..derive import Derivation
from ..numeric.decimals import DEFAULT_DIGITS, check_digits, matrix_to_decimals

FORMAT = "symattn-derivation/1"


def exact_strings(matrix: sp.MatrixBase) -> list[list[str]]:
    """Return every entry of a matrix as SymPy's plain string form."""
    return [[sp.sstr(matrix[i, j]) for j in range(matrix.shape[1])] for i in range(matrix.shape[0])]


def _decimals_or_none(matrix: sp.MatrixBase, digits: int) -> list[list[str]] | None:
    if matrix.free_symbols:
        return None
    return matrix_to_decimals(matrix, digits)


def matrix_record(matrix: sp.MatrixBase, digits: int) -> dict:
    """Describe one matrix: its shape, exact entries and decimal entries (None when symbolic)."""
    return {
        "shape": list(matrix.shape),
        "exact": exact_strings(matrix),
        "decimal": _decimals_or_none(matrix, digits),
    }


def derivation_to_dict(derivation: Derivation, digits: int = DEFAULT_DIGITS) -> dict:
    """Return the JSON-ready description of a derivation: spec, inputs, stages and precision."""
    check_digits(digits)
    return {
        "format": FORMAT,
        "symattn_version": __version__,
        "precision": {
            "significant_digits": digits,
            "rounding": "round half to even, every printed digit correct",
        },
        "mode": "direct" if derivation.direct else "projections",
        "spec": derivation.spec.describe(),
        "scale": sp.sstr(derivation.scale),
        "symbols": sorted(str(s) for s in derivation.free_symbols),
        "inputs": {name: matrix_record(m, digits) for name, m in derivation.inputs.items()},
        "stages": {name: matrix_record(m, digits) for name, m in derivation.stages.items()},
    }


def derivation_to_json(derivation: Derivation, digits: int = DEFAULT_DIGITS) -> str:
    """Serialise a derivation as JSON text with stable key order and a final newline."""
    return json.dumps(derivation_to_dict(derivation, digits), indent=1, ensure_ascii=True) + "\n"
