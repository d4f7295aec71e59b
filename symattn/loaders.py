"""Reading derivation files: TOML files that contain the inputs, weights and specification of one derivation.

A derivation file has four tables; every key is optional unless marked::

    [meta]                          # plain text, escaped before it reaches LaTeX
    title = "Image patches attend to words"
    description = "Two heads, three patches, two words."

    [spec]
    heads = 2                       # d_model must be divisible by it
    scale = "sqrt_dk"               # "sqrt_seq", "none", "1/8", "1/sqrt(2)" or a number
    masked_rows = "error"           # or "zeros", "nan"
    causal = "top_left"             # or "bottom_right"
    key_length = 3                  # keys from this index on are padding

    [[spec.mask]]                   # any number of masks, each stating its kind
    kind = "block"                  # "keep" (true = may attend), "block" (true = hidden), "additive"
    values = [[false, true], [false, false]]

    [inputs]
    query_source = [[1, 0], [0, 1]]                 # required, unless Q, K, V are given
    kv_source = {symbol = "y", shape = [2, 2]}      # or key_source and value_source
    # Q = ..., K = ..., V = ...                     # direct mode: no projections

    [weights]                       # W_Q, W_K, W_V required unless in direct mode
    W_Q = [[1, "w"], ["1/2", 2.5]]
    b_Q = [0, 1]                    # biases are flat lists
    # also W_K, W_V, b_K, b_V, W_O, b_O

Matrix entries are TOML integers, TOML decimals, strings that hold a number ("3/4",
"-1.5e-3") or a name ("w", "-b_1"), and a whole matrix may be a symbol table
``{symbol = "w", shape = [2, 3]}``. An additive mask may hold ``-inf`` to hide a key.

TOML decimals are read with ``tomllib``'s ``parse_float=decimal.Decimal``, so ``2.1`` is
exactly 21/10 and never the binary float nearest to it.

Every error names the file and the key path, for example ``example.toml: weights.W_Q[1][0]``.
A file larger than MAX_FILE_BYTES (10 MiB) is rejected before it is parsed.
"""

from __future__ import annotations

import contextlib
import decimal
import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import sympy as sp

from .derive import Derivation, derive, derive_direct
from .errors import InvalidInputError, SymattnError
from .export.notation import escape_text
from .limits import read_limited
from .spec import AttentionSpec, Mask, parse_scale
from .values import to_matrix

# Derivation files are small: the exact stages of anything larger would not derive in useful time.
MAX_FILE_BYTES = 10 * 1024 * 1024
# A symbol table creates one SymPy symbol per entry; a larger matrix would not derive in useful time.
MAX_SYMBOL_ENTRIES = 10_000

TOP_LEVEL_KEYS: tuple[str, ...] = ("meta", "spec", "inputs", "weights")
META_KEYS: tuple[str, ...] = ("title", "description")
SPEC_KEYS: tuple[str, ...] = ("heads", "scale", "masked_rows", "causal", "key_length", "mask")
MASK_KEYS: tuple[str, ...] = ("kind", "values")
SOURCE_KEYS: tuple[str, ...] = ("query_source", "kv_source", "key_source", "value_source")
DIRECT_KEYS: tuple[str, ...] = ("Q", "K", "V")
WEIGHT_KEYS: tuple[str, ...] = ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "b_O")
BIAS_KEYS: tuple[str, ...] = ("b_Q", "b_K", "b_V", "b_O")
SYMBOL_TABLE_KEYS: tuple[str, ...] = ("symbol", "shape")


@dataclass(frozen=True)
class DerivationMeta:
    """The optional plain-text ``[meta]`` table of a derivation file."""

    title: str | None = None
    description: str | None = None


def load_derivation_file(path: str | Path) -> tuple[Derivation, DerivationMeta]:
    """Read a TOML derivation file and derive it; see the module docstring for the format.

    Raises InvalidInputError, or a subclass, for a missing, oversized (ResourceLimitError),
    non-UTF-8 or invalid file, and for any invalid value in it. The message names the file.
    """
    path = Path(path)
    data = read_limited(path, "derivation file", MAX_FILE_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInputError(
            f"{path.name}: not UTF-8 text ({error.reason} at byte {error.start}); save the file as UTF-8"
        ) from None
    try:
        parsed = tomllib.loads(text, parse_float=decimal.Decimal)
    except ValueError as error:  # TOMLDecodeError, or an integer of more than 4300 digits
        raise InvalidInputError(f"{path.name}: invalid TOML: {error}") from None
    except RecursionError:
        raise InvalidInputError(f"{path.name}: invalid TOML: arrays or tables nested too deeply") from None
    return parse_derivation(parsed, path.name)


def parse_derivation(data: dict[str, Any], source: str = "derivation") -> tuple[Derivation, DerivationMeta]:
    """Derive from an already parsed derivation file; ``source`` starts every error message.

    >>> derivation, meta = parse_derivation({
    ...     "inputs": {"Q": [[1, 0]], "K": [[1, 0]], "V": [["2.1"]]},
    ...     "spec": {"scale": "none"},
    ... })
    >>> derivation["output"]
    Matrix([[21/10]])
    """
    try:
        return _parse(data)
    except SymattnError as error:
        raise type(error)(f"{source}: {error}") from None


def _parse(data: dict[str, Any]) -> tuple[Derivation, DerivationMeta]:
    _check_table(data, "the top level", TOP_LEVEL_KEYS)
    meta = _parse_meta(data.get("meta", {}))
    options = _parse_spec(data.get("spec", {}))
    inputs = data.get("inputs", {})
    weights = data.get("weights", {})
    _check_table(inputs, "inputs", SOURCE_KEYS + DIRECT_KEYS)
    _check_table(weights, "weights", WEIGHT_KEYS)

    if any(key in inputs for key in DIRECT_KEYS):
        return _parse_direct(inputs, weights, options), meta
    return _parse_projections(inputs, weights, options), meta


def _parse_projections(inputs: dict, weights: dict, options: dict) -> Derivation:
    if "query_source" not in inputs:
        raise InvalidInputError(
            "inputs.query_source is missing; give query_source (with kv_source, or key_source "
            "and value_source), or Q, K and V for direct mode"
        )
    for key in ("W_Q", "W_K", "W_V"):
        if key not in weights:
            raise InvalidInputError(f"weights.{key} is missing; projections need W_Q, W_K and W_V")
    sources = {key: _matrix(value, f"inputs.{key}") for key, value in inputs.items()}
    matrices = {key: _matrix(value, f"weights.{key}", key in BIAS_KEYS) for key, value in weights.items()}
    return derive(**sources, **matrices, **options)


def _parse_direct(inputs: dict, weights: dict, options: dict) -> Derivation:
    for key in DIRECT_KEYS:
        if key not in inputs:
            raise InvalidInputError(f"inputs.{key} is missing; direct mode needs Q, K and V")
    for key in SOURCE_KEYS:
        if key in inputs:
            raise InvalidInputError(
                f"inputs.{key} cannot be combined with Q, K and V; give either the sources "
                f"(projections mode) or Q, K and V (direct mode)"
            )
    for key in weights:
        if key not in ("W_O", "b_O"):
            raise InvalidInputError(
                f"weights.{key} has no use in direct mode, where Q, K and V are given; "
                f"remove it, or give query_source and kv_source instead of Q, K and V"
            )
    matrices = {key: _matrix(inputs[key], f"inputs.{key}") for key in DIRECT_KEYS}
    output = {key: _matrix(value, f"weights.{key}", key == "b_O") for key, value in weights.items()}
    return derive_direct(**matrices, **output, **options)


def _parse_meta(table: Any) -> DerivationMeta:
    _check_table(table, "meta", META_KEYS)
    for key, value in table.items():
        if not isinstance(value, str):
            raise InvalidInputError(f"meta.{key} is {value!r}; expected a string of plain text")
        escape_text(value, f"meta.{key}")  # rejects characters that the document cannot typeset
    return DerivationMeta(table.get("title"), table.get("description"))


def _parse_spec(table: Any) -> dict[str, Any]:
    """Check the [spec] table key by key and return keyword arguments for derive."""
    _check_table(table, "spec", SPEC_KEYS)
    options: dict[str, Any] = {}
    for key in ("heads", "masked_rows", "causal", "key_length"):
        if key in table:
            with _key_path(f"spec.{key}"):
                AttentionSpec(**{key: table[key]})
            options[key] = table[key]
    if "scale" in table:
        with _key_path("spec.scale"):
            options["scale"] = parse_scale(table["scale"])
    if "mask" in table:
        masks = table["mask"]
        if isinstance(masks, dict):
            masks = [masks]
        if not isinstance(masks, list):
            raise InvalidInputError(
                f"spec.mask is {masks!r}; expected tables [[spec.mask]] with kind and values"
            )
        options["mask"] = [_parse_mask(mask, f"spec.mask[{index}]") for index, mask in enumerate(masks)]
    return options


def _parse_mask(table: Any, where: str) -> Mask:
    _check_table(table, where, MASK_KEYS)
    for key in MASK_KEYS:
        if key not in table:
            raise InvalidInputError(
                f"{where}.{key} is missing; a mask needs kind (keep, block or additive) and values"
            )
    return Mask.create(table["kind"], _infinities_as_text(table["values"]), where)


def _infinities_as_text(values: Any) -> Any:
    """Turn TOML's -inf (a Decimal here) into the "-inf" that Mask.additive accepts."""
    if isinstance(values, list):
        return [_infinities_as_text(value) for value in values]
    if isinstance(values, decimal.Decimal) and values.is_infinite() and values < 0:
        return "-inf"
    return values


def _matrix(value: Any, where: str, flat_allowed: bool = False) -> sp.ImmutableMatrix:
    """Convert one matrix value, with errors that name its key path."""
    if isinstance(value, dict):
        _check_symbol_table(value, where)
    if flat_allowed and isinstance(value, list) and value and not isinstance(value[0], list):
        value = [value]
    return to_matrix(value, where)


def _check_symbol_table(table: dict, where: str) -> None:
    _check_table(table, where, SYMBOL_TABLE_KEYS)
    shape = table.get("shape")
    if (
        "symbol" not in table
        or not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(size, int) and not isinstance(size, bool) for size in shape)
    ):
        raise InvalidInputError(
            f"{where} is {table!r}; a symbol table needs symbol and shape, as in "
            f"{{symbol = \"w\", shape = [2, 3]}}"
        )
    if shape[0] * shape[1] > MAX_SYMBOL_ENTRIES:
        raise InvalidInputError(
            f"{where} asks for a {shape[0]} × {shape[1]} matrix of symbols; at most "
            f"{MAX_SYMBOL_ENTRIES} symbol entries are accepted per matrix"
        )


def _check_table(table: Any, where: str, valid_keys: tuple[str, ...]) -> None:
    if not isinstance(table, dict):
        raise InvalidInputError(f"{where} is {table!r}; expected a table")
    for key in table:
        if key not in valid_keys:
            place = key if where == "the top level" else f"{where}.{key}"
            close = difflib.get_close_matches(str(key), valid_keys, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise InvalidInputError(
                f"{place} is not a valid key{hint}; valid keys in {where} are {', '.join(valid_keys)}"
            )


@contextlib.contextmanager
def _key_path(where: str) -> Iterator[None]:
    """Prefix the key path to the message of an InvalidInputError raised inside."""
    try:
        yield
    except InvalidInputError as error:
        raise type(error)(f"{where}: {error}") from None
