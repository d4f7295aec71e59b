"""Gradient JSON export: one gradient exactly and to N certified digits, with what it is of.

The keys come in a fixed order and numbers are strings, so the same derivation, objective and
input give the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

import sympy as sp

from .. import __version__
from ..derive import Derivation
from ..gradients import grad, objective_seeds
from ..numeric.balls import certified_decimals
from ..numeric.decimals import DEFAULT_DIGITS, check_digits
from .numbers import exact_strings

FORMAT = "symattn-gradient/1"


def describe_objective(derivation: Derivation, objective: Any) -> dict:
    """Return a JSON-ready description of an objective: its kind and the upstream gradients it seeds."""
    seeds = objective_seeds(derivation, objective)
    if isinstance(objective, str) and objective == "sum":
        kind = "sum of the output"
    elif isinstance(objective, (tuple, str)):
        kind = "one stage entry"
    elif isinstance(objective, sp.Expr):
        kind = "expression of stage entries"
    else:
        kind = "weighted sum of the output"
    if isinstance(objective, str):
        text = objective
    elif isinstance(objective, tuple):
        text = f"{objective[0]}[{objective[1]},{objective[2]}]"
    elif isinstance(objective, sp.Expr):
        text = sp.sstr(objective)
    else:
        text = None  # an upstream gradient: its entries are under "upstream"
    return {
        "kind": kind,
        "text": text,
        "upstream": {stage: exact_strings(seed) for stage, seed in seeds.items()},
    }


def gradient_to_dict(derivation: Derivation, objective: Any, wrt: str, digits: int = DEFAULT_DIGITS) -> dict:
    """Return the JSON-ready record of ∂L/∂wrt: exact entries, certified decimals and their engine."""
    check_digits(digits)
    gradient = grad(derivation, objective, wrt)
    record: dict[str, Any] = {
        "format": FORMAT,
        "symattn_version": __version__,
        "mode": "direct" if derivation.direct else "projections",
        "spec": derivation.spec.describe(),
        "objective": describe_objective(derivation, objective),
        "wrt": wrt,
        "shape": list(gradient.shape),
        "exact": exact_strings(gradient),
        "decimal": None,
        "precision": None,
    }
    if not gradient.free_symbols:
        numbers = certified_decimals(gradient, digits)
        record["decimal"] = numbers.decimals
        record["precision"] = {
            "significant_digits": digits,
            "rounding": "round half to even, every printed digit correct",
            "engine": numbers.engine,
            "certified": numbers.certified,
            "bounded_zeros": [list(position) for position in numbers.bounded_zeros],
        }
    return record


def gradient_to_json(derivation: Derivation, objective: Any, wrt: str, digits: int = DEFAULT_DIGITS) -> str:
    """Serialise ``gradient_to_dict`` as JSON text with a final newline."""
    return json.dumps(gradient_to_dict(derivation, objective, wrt, digits), indent=1, ensure_ascii=True) + "\n"
