"""Reading a derivation JSON document (``symattn-derivation/1``) back into exact matrices.

The document stores every entry as SymPy's plain string form (``sp.sstr``). Those strings are
never handed to ``sympify`` or ``eval``, because a JSON file may come from anyone. Instead:

- input entries are read with ``symattn.values``: integers, ratios ``p/q``, names such as ``w``
  or ``-b_1``, and the indexed names ``x_{1,2}`` of symbol matrices;
- stage entries that are integers or ratios are read exactly. Any other stage entry (an
  exponential, a square root, ``-oo``, ``nan``) is kept as checked text and not read back,
  so its stage comes back as None;
- ``rederive`` derives the stages again from the exact inputs and specification and checks
  that every entry string equals the document's, which reads back the whole derivation exactly.

A document that cannot be read raises InvalidInputError (or a subclass) whose message names the
file and the key path, and a valid document that uses an input this reader does not parse (a
SymPy expression such as ``sqrt(2)`` as an input entry) raises UnsupportedError.
"""

from __future__ import annotations

import decimal
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sympy as sp

from ..derive import Derivation, derive, derive_direct
from ..errors import InvalidInputError, SymattnError, UnsupportedError
from ..limits import DEFAULT_MAX_EXPRESSION_SIZE, read_limited
from ..numeric.decimals import check_digits, matrix_to_decimals
from ..spec import CAUSAL_ALIGNMENTS, MASK_KINDS, MASKED_ROW_POLICIES, SCALE_NAMES, AttentionSpec, Mask
from ..values import parse_entry, parse_number
from .numbers import FORMAT, exact_strings

DIRECT_INPUTS: tuple[str, ...] = ("Q", "K", "V", "W_O", "b_O")
PROJECTION_INPUTS: tuple[str, ...] = (
    "query_source", "key_source", "value_source", "W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "b_O",
)
TOP_LEVEL_KEYS: tuple[str, ...] = (
    "format", "symattn_version", "precision", "mode", "spec", "scale", "symbols", "inputs", "stages",
)
SPEC_KEYS: tuple[str, ...] = ("heads", "scale", "masks", "causal", "key_length", "masked_rows")

# Entries of symbol matrices are named base_{row,col}, indexed from 1 (see values.symbol_matrix).
_INDEXED_NAME = re.compile(r"-?[A-Za-z][A-Za-z0-9]*_\{[0-9]{1,9},[0-9]{1,9}\}", re.ASCII)
# Characters of sp.sstr output for the exact stages: names, numbers, operators and brackets.
_EXACT_TEXT = re.compile(r"[A-Za-z0-9_{}(),*/+\- ]{1,100000}", re.ASCII)
# An operator or a bracket after the first character: an expression, not a number or a name.
_OPERATOR = re.compile(r"[()*/+]|.-")
# sp.sstr of a scale 1/√N with N rational: "sqrt(6)/3", "2*sqrt(3)/3", "sqrt(2)".
_SQRT_SCALE = re.compile(r"(?:([0-9]{1,100})\*)?sqrt\(([0-9]{1,100})\)(?:/([0-9]{1,100}))?", re.ASCII)


@dataclass(frozen=True)
class DerivationRecord:
    """A derivation JSON document, read back.

    ``inputs``: every input matrix, exactly. ``stages``: each stage exactly when all its entries
    are rational, else None. ``exact_text``: the exact entry strings of each stage as written.
    ``decimals``: the decimal strings of each matrix, or None where the document has none.
    """

    mode: str
    spec: AttentionSpec
    digits: int
    scale_text: str
    symbols: tuple[str, ...]
    inputs: dict[str, sp.ImmutableMatrix]
    stages: dict[str, sp.ImmutableMatrix | None]
    exact_text: dict[str, list[list[str]]]
    decimals: dict[str, list[list[str]] | None]
    symattn_version: str


def read_derivation_json(path: Path | str) -> DerivationRecord:
    """Read a derivation JSON file written by ``symattn.export.numbers.derivation_to_json``."""
    path = Path(path)
    data = read_limited(path, "derivation JSON file")
    return parse_derivation_json(data, path.name)


def parse_derivation_json(text: str | bytes, source: str = "derivation JSON") -> DerivationRecord:
    """Parse derivation JSON text; ``source`` starts every error message.

    >>> from symattn import derive_direct
    >>> from symattn.export.numbers import derivation_to_json
    >>> record = parse_derivation_json(derivation_to_json(derive_direct([["1/2"]], [[1]], [[3]]), 5))
    >>> record.stages["output"]
    Matrix([[3]])
    >>> record.stages["A_0"]
    Matrix([[1]])
    """
    try:
        return _parse_document(_load_json(text))
    except SymattnError as error:
        raise type(error)(f"{source}: {error}") from None


def rederive(
    record: DerivationRecord,
    check_decimals: bool = True,
    max_expression_size: int | None = DEFAULT_MAX_EXPRESSION_SIZE,
) -> Derivation:
    """Derive the stages again from the record's inputs and spec, and check them against the document.

    Every exact entry string is compared, and with ``check_decimals`` every decimal string too,
    evaluated again to the document's digits (the slow part for large derivations). Raises
    InvalidInputError naming the first entry that differs, which means the document was edited
    or written from other inputs.
    """
    spec = record.spec
    options = dict(
        heads=spec.heads, scale=spec.scale, mask=list(spec.masks), causal=spec.causal,
        key_length=spec.key_length, masked_rows=spec.masked_rows, max_expression_size=max_expression_size,
    )
    if record.mode == "direct":
        derivation = derive_direct(**record.inputs, **options)
    else:
        inputs = dict(record.inputs)
        derivation = derive(inputs.pop("query_source"), **inputs, **options)

    if list(derivation.stages) != list(record.exact_text):
        raise InvalidInputError(
            f"the document lists the stages {', '.join(record.exact_text)}, but its inputs give "
            f"{', '.join(derivation.stages)}; the document was edited or is damaged"
        )
    for name, matrix in derivation.stages.items():
        _check_same_entries(f"stages.{name}.exact", exact_strings(matrix), record.exact_text[name])
    if sp.sstr(derivation.scale) != record.scale_text:
        raise InvalidInputError(
            f"scale is {record.scale_text!r} in the document, but its spec gives "
            f"{sp.sstr(derivation.scale)!r}; the document was edited or is damaged"
        )
    if check_decimals:
        for group, matrices in (("inputs", derivation.inputs), ("stages", derivation.stages)):
            for name, matrix in matrices.items():
                written = record.decimals[name]
                derived = None if matrix.free_symbols else matrix_to_decimals(matrix, record.digits)
                _check_same_decimals(f"{group}.{name}.decimal", derived, written)
    return derivation


def _check_same_decimals(where: str, derived: list[list[str]] | None, written: list[list[str]] | None) -> None:
    if (derived is None) != (written is None):
        raise InvalidInputError(
            f"{where} is {'missing' if written is None else 'present'} in the document, but the "
            f"inputs give {'a symbolic matrix' if derived is None else 'numbers'}; the document "
            f"was edited or is damaged"
        )
    if derived is not None:
        _check_same_entries(where, derived, written)


def _check_same_entries(where: str, derived: list[list[str]], written: list[list[str]]) -> None:
    for i, (derived_row, written_row) in enumerate(zip(derived, written)):
        for j, (derived_entry, written_entry) in enumerate(zip(derived_row, written_row)):
            if derived_entry != written_entry:
                raise InvalidInputError(
                    f"{where}[{i}][{j}] is {_short(written_entry)!r}, but the inputs give "
                    f"{_short(derived_entry)!r}; the document was edited or is damaged"
                )


# Reading JSON text.

def _load_json(text: str | bytes) -> Any:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidInputError(
                f"the file is not UTF-8 text ({error.reason} at byte {error.start}); a derivation "
                f"JSON file is UTF-8"
            ) from None
    try:
        return json.loads(text, parse_float=decimal.Decimal, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"invalid JSON: {error}") from None
    except RecursionError:
        raise InvalidInputError(
            "invalid JSON: the document is nested too deeply; a derivation document nests at "
            "most five levels"
        ) from None
    except ValueError as error:  # for example an integer of more than 4300 digits
        raise InvalidInputError(f"invalid JSON: {error}") from None


def _reject_constant(name: str) -> Any:
    raise InvalidInputError(
        f"the JSON constant {name} is not valid here; a derivation document writes numbers as strings"
    )


# Reading the document, table by table.

def _parse_document(data: Any) -> DerivationRecord:
    _check_table(data, "the top level", TOP_LEVEL_KEYS, required=TOP_LEVEL_KEYS)
    if data["format"] != FORMAT:
        raise InvalidInputError(
            f"format is {_short(data['format'])!r}; this reader reads {FORMAT!r} documents"
        )
    mode = data["mode"]
    if mode not in ("direct", "projections"):
        raise InvalidInputError(f"mode is {_short(mode)!r}; expected 'direct' or 'projections'")

    spec = _parse_spec(data["spec"])
    digits = _parse_digits(data["precision"])
    inputs = _parse_inputs(data["inputs"], DIRECT_INPUTS if mode == "direct" else PROJECTION_INPUTS)
    stages, exact_text, decimals = _parse_stages(data["stages"])
    for name, matrix in inputs.items():
        decimals[name] = _input_decimals(data["inputs"][name], name, matrix.shape)

    return DerivationRecord(
        mode=mode,
        spec=spec,
        digits=digits,
        scale_text=_exact_text(data["scale"], "scale"),
        symbols=tuple(_parse_symbols(data["symbols"])),
        inputs=inputs,
        stages=stages,
        exact_text=exact_text,
        decimals=decimals,
        symattn_version=_string(data["symattn_version"], "symattn_version", 100),
    )


def _parse_digits(precision: Any) -> int:
    _check_table(precision, "precision", ("significant_digits", "rounding"), required=("significant_digits",))
    digits = precision["significant_digits"]
    try:
        return check_digits(digits)
    except InvalidInputError as error:
        raise InvalidInputError(f"precision.significant_digits: {error}") from None


def _parse_spec(table: Any) -> AttentionSpec:
    _check_table(table, "spec", SPEC_KEYS, required=SPEC_KEYS)
    if table["causal"] is not None and table["causal"] not in CAUSAL_ALIGNMENTS:
        raise InvalidInputError(
            f"spec.causal is {_short(table['causal'])!r}; expected null, 'top_left' or 'bottom_right'"
        )
    if table["masked_rows"] not in MASKED_ROW_POLICIES:
        raise InvalidInputError(
            f"spec.masked_rows is {_short(table['masked_rows'])!r}; expected one of "
            f"{', '.join(MASKED_ROW_POLICIES)}"
        )
    masks = table["masks"]
    if not isinstance(masks, list):
        raise InvalidInputError(f"spec.masks is {_short(masks)!r}; expected a list of masks")
    try:
        return AttentionSpec(
            heads=table["heads"],
            scale=_parse_scale(table["scale"]),
            masks=tuple(_parse_mask(mask, f"spec.masks[{index}]") for index, mask in enumerate(masks)),
            causal=table["causal"],
            key_length=table["key_length"],
            masked_rows=table["masked_rows"],
        )
    except InvalidInputError as error:
        raise type(error)(f"spec: {error}") from None


def _parse_scale(text: Any) -> str | sp.Expr:
    text = _string(text, "spec.scale", 400)
    if text in SCALE_NAMES:
        return text
    match = _SQRT_SCALE.fullmatch(text)
    if match is not None:
        numerator, radicand, denominator = (int(group) if group else 1 for group in match.groups())
        if radicand == 0 or denominator == 0:
            raise InvalidInputError(f"spec.scale {text!r} has a zero radicand or denominator")
        return sp.Integer(numerator) * sp.sqrt(radicand) / denominator
    try:
        return parse_number(text, "spec.scale")
    except InvalidInputError:
        expected = (
            f"this reader reads a scale name ({', '.join(SCALE_NAMES)}), a rational number or a "
            f"square-root form such as 'sqrt(6)/3'"
        )
        if _EXACT_TEXT.fullmatch(text) and _OPERATOR.search(text):
            raise UnsupportedError(f"spec.scale is {_short(text)!r}; {expected}, not other expressions") from None
        raise InvalidInputError(f"spec.scale {_short(text)!r} is not valid; {expected}") from None


def _parse_mask(table: Any, where: str) -> Mask:
    _check_table(table, where, ("kind", "shape", "values"), required=("kind", "shape", "values"))
    kind, shape, values = table["kind"], table["shape"], table["values"]
    if kind not in MASK_KINDS:
        raise InvalidInputError(f"{where}.kind is {_short(kind)!r}; expected one of {', '.join(MASK_KINDS)}")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 3 or not all(_is_size(size) for size in shape):
        raise InvalidInputError(f"{where}.shape is {_short(shape)!r}; expected 1 to 3 positive integers")
    if not isinstance(values, list) or len(values) != _product(shape):
        raise InvalidInputError(
            f"{where}.values is not a list of {_product(shape)} entries, one per entry of shape {shape}"
        )
    if kind == "additive":
        flat = [_additive_value(value, f"{where}.values[{index}]") for index, value in enumerate(values)]
    else:
        flat = values  # Mask.create checks that these are booleans
    return Mask.create(kind, _nest(flat, shape))


def _additive_value(value: Any, where: str) -> Any:
    text = _string(value, where, 2100)
    if text == "-oo":
        return "-inf"
    return _input_entry(text, where)


def _parse_inputs(table: Any, valid_names: tuple[str, ...]) -> dict[str, sp.ImmutableMatrix]:
    required = ("Q", "K", "V") if "Q" in valid_names else ("query_source", "key_source", "value_source", "W_Q", "W_K", "W_V")
    _check_table(table, "inputs", valid_names, required=required)
    inputs = {}
    for name in valid_names:  # the order in which derive adds them
        if name in table:
            record = _matrix_record(table[name], f"inputs.{name}")
            rows = [
                [_input_entry(entry, f"inputs.{name}.exact[{i}][{j}]") for j, entry in enumerate(row)]
                for i, row in enumerate(record)
            ]
            inputs[name] = sp.ImmutableMatrix(rows)
    return inputs


def _input_entry(text: Any, where: str) -> sp.Expr:
    text = _string(text, where, 2100)
    if _INDEXED_NAME.fullmatch(text):
        symbol = sp.Symbol(text.lstrip("-"), real=True)
        return -symbol if text.startswith("-") else symbol
    try:
        return parse_entry(text, where)
    except InvalidInputError:
        if _EXACT_TEXT.fullmatch(text) and _OPERATOR.search(text):
            raise UnsupportedError(
                f"{where} is {_short(text)!r}; this reader reads input entries that are numbers "
                f"or names, not other expressions"
            ) from None
        raise


def _parse_stages(table: Any) -> tuple[dict, dict, dict]:
    if not isinstance(table, dict) or not table:
        raise InvalidInputError(f"stages is {_short(table)!r}; expected a table of stages by name")
    stages: dict[str, sp.ImmutableMatrix | None] = {}
    exact_text: dict[str, list[list[str]]] = {}
    decimals: dict[str, list[list[str]] | None] = {}
    for name, record in table.items():
        where = f"stages.{_short(name)}"
        rows = _matrix_record(record, where)
        exact_text[name] = [
            [_exact_text(entry, f"{where}.exact[{i}][{j}]") for j, entry in enumerate(row)]
            for i, row in enumerate(rows)
        ]
        stages[name] = _rational_matrix(exact_text[name])
        decimals[name] = _decimal_rows(record.get("decimal"), where, (len(rows), len(rows[0])))
    return stages, exact_text, decimals


def _rational_matrix(rows: list[list[str]]) -> sp.ImmutableMatrix | None:
    try:
        return sp.ImmutableMatrix([[parse_number(entry) for entry in row] for row in rows])
    except InvalidInputError:
        return None  # an exponential, a square root, -oo or nan: kept as text only


def _input_decimals(record: dict, name: str, shape: tuple[int, int]) -> list[list[str]] | None:
    return _decimal_rows(record.get("decimal"), f"inputs.{name}", shape)


def _decimal_rows(value: Any, where: str, shape: tuple[int, int]) -> list[list[str]] | None:
    if value is None:
        return None
    rows = _rows(value, f"{where}.decimal", shape)
    for i, row in enumerate(rows):
        for j, entry in enumerate(row):
            text = _string(entry, f"{where}.decimal[{i}][{j}]", 20_100)
            if text != "nan" and text not in ("inf", "-inf"):
                parse_number(text, f"{where}.decimal[{i}][{j}]")
    return rows


def _matrix_record(record: Any, where: str) -> list[list[Any]]:
    _check_table(record, where, ("shape", "exact", "decimal"), required=("shape", "exact"))
    shape = record["shape"]
    if not isinstance(shape, list) or len(shape) != 2 or not all(_is_size(size) for size in shape):
        raise InvalidInputError(f"{where}.shape is {_short(shape)!r}; expected [rows, cols] of positive integers")
    return _rows(record["exact"], f"{where}.exact", (shape[0], shape[1]))


def _rows(value: Any, where: str, shape: tuple[int, int]) -> list[list[Any]]:
    rows, cols = shape
    if not isinstance(value, list) or len(value) != rows:
        raise InvalidInputError(f"{where} is not a list of {rows} rows; expected {rows} rows for the shape {list(shape)}")
    for i, row in enumerate(value):
        if not isinstance(row, list) or len(row) != cols:
            raise InvalidInputError(
                f"{where}[{i}] is not a list of {cols} entries; expected {cols} entries for the shape {list(shape)}"
            )
    return value


def _parse_symbols(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise InvalidInputError(f"symbols is {_short(value)!r}; expected a list of names")
    names = []
    for index, name in enumerate(value):
        symbol = _input_entry(name, f"symbols[{index}]")
        if not isinstance(symbol, sp.Symbol):
            raise InvalidInputError(f"symbols[{index}] is {_short(name)!r}; expected a name such as 'w'")
        names.append(symbol.name)
    return names


# Small checks.

def _check_table(table: Any, where: str, valid_keys: tuple[str, ...], required: tuple[str, ...] = ()) -> None:
    if not isinstance(table, dict):
        raise InvalidInputError(f"{where} is {_short(table)!r}; expected a JSON object")
    for key in table:
        if key not in valid_keys:
            place = _short(key) if where == "the top level" else f"{where}.{_short(key)}"
            raise InvalidInputError(f"{place} is not a valid key; valid keys in {where} are {', '.join(valid_keys)}")
    for key in required:
        if key not in table:
            place = key if where == "the top level" else f"{where}.{key}"
            raise InvalidInputError(
                f"{place} is missing; documents that symattn writes always have it, so write this one again"
            )


def _string(value: Any, where: str, max_length: int) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{where} is {_short(value)!r}; expected a string")
    if len(value) > max_length:
        raise InvalidInputError(f"{where} is a string of {len(value)} characters; at most {max_length} are accepted")
    return value


def _exact_text(value: Any, where: str) -> str:
    text = _string(value, where, 100_000)
    if not _EXACT_TEXT.fullmatch(text):
        raise InvalidInputError(
            f"{where} is {_short(text)!r}, which is not the exact form of an entry; expected "
            f"SymPy's plain form such as '3/4' or 'exp(sqrt(2))/(1 + exp(sqrt(2)))'"
        )
    return text


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1_000_000


def _product(sizes: list[int]) -> int:
    product = 1
    for size in sizes:
        product *= size
    return product


def _nest(flat: list, shape: list[int]) -> list:
    if len(shape) == 1:
        return list(flat)
    step = len(flat) // shape[0]
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def _short(value: Any, limit: int = 60) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[: limit - 1] + "…"
    if isinstance(value, (list, dict)):
        text = json.dumps(value, default=str)
        return text if len(text) <= limit else text[: limit - 1] + "…"
    return value
