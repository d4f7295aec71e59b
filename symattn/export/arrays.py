"""Export of certified references as .npz, .npy and JSON, with the inputs to reproduce them.

An .npz archive (format "symattn-reference/1") holds:

- ``format``, ``engine`` and ``spec`` (JSON text in the case-file form that ``symattn verify``
  reads: heads, scale, masks, causal, key_length, masked_rows), ``digits`` and ``mode``;
- every input under its own name (``query_source``, ``W_Q``, … or ``Q``, ``K``, ``V``), as given:
  float and integer arrays unchanged, exact rationals as strings "p/q";
- per stage ``<stage>.<dtype>`` (the correctly rounded values, bfloat16 stored in float32) and
  ``<stage>.radius`` (float64 upper bounds on the distance to the exact value).

A .npy file contains one stage in one dtype. A JSON document holds the same as the archive, with
floats written by ``float.hex`` (exact and portable), the decimal strings to the reference's
digits, and the radii. Keys come in a fixed order and the archive's members carry a fixed
timestamp, so exporting the same reference twice gives identical bytes.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import sympy as sp

from .. import __version__
from ..errors import InvalidInputError, SymattnError, UnsupportedError
from ..numeric.ieee import FORMATS
from ..numeric.reference import Reference
from ..problem import Problem
from ..spec import AttentionSpec, Mask
from ..values import parse_number
from .files import write_files

FORMAT = "symattn-reference/1"
DTYPES: tuple[str, ...] = tuple(FORMATS)  # float64, float32, float16, bfloat16
SUFFIXES: tuple[str, ...] = (".npz", ".npy", ".json")
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def spec_to_dict(spec: AttentionSpec, problem: Problem) -> dict:
    """Return the specification as a JSON-ready dict that case files and ``spec_from_dict`` read."""
    return {
        "heads": int(spec.heads),
        "scale": _scale_text(spec, problem),
        "masks": [{"kind": mask.kind, "values": _mask_values(mask)} for mask in spec.masks],
        "causal": spec.causal,
        "key_length": spec.key_length,
        "masked_rows": spec.masked_rows,
    }


def _scale_text(spec: AttentionSpec, problem: Problem) -> str:
    if isinstance(spec.scale, str):
        return spec.scale
    a, b = problem.scale_factor()
    if b == 1:
        return str(a)
    if a < 0:
        raise UnsupportedError(
            f"the scale {sp.sstr(spec.scale)} is negative and irrational, which a case file cannot "
            f"state; use a positive scale"
        )
    return f"1/sqrt({1 / (a * a * b)})"  # a·√b = 1/√(1/(a²·b))


def _mask_values(mask: Mask) -> Any:
    if mask.kind == "additive":
        flat = ["-inf" if value == -sp.oo else sp.sstr(value) for value in mask.values]
    else:
        flat = [bool(value) for value in mask.values]
    return np.array(flat, dtype=object).reshape(mask.shape).tolist()


def spec_from_dict(data: Any) -> AttentionSpec:
    """Build an AttentionSpec from ``spec_to_dict`` output (numbers are parsed, never evaluated)."""
    expected = ("heads", "scale", "masks", "causal", "key_length", "masked_rows")
    if not isinstance(data, dict) or set(data) != set(expected):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise InvalidInputError(f"spec has keys {keys}; expected exactly {', '.join(expected)}")
    if not isinstance(data["masks"], list) or not all(
        isinstance(mask, dict) and set(mask) == {"kind", "values"} for mask in data["masks"]
    ):
        raise InvalidInputError("spec.masks must be a list of {kind, values} objects")
    return AttentionSpec(
        heads=data["heads"],
        scale=data["scale"],
        masks=tuple(Mask.create(mask["kind"], mask["values"]) for mask in data["masks"]),
        causal=data["causal"],
        key_length=data["key_length"],
        masked_rows=data["masked_rows"],
    )


def _checked_dtypes(dtypes: Iterable[str]) -> tuple[str, ...]:
    dtypes = (dtypes,) if isinstance(dtypes, str) else tuple(dtypes)
    unknown = [dtype for dtype in dtypes if dtype not in DTYPES]
    if unknown or not dtypes:
        raise InvalidInputError(f"dtypes {list(dtypes)!r} are not valid; expected some of {', '.join(DTYPES)}")
    return dtypes


def _input_for_storage(array: np.ndarray) -> np.ndarray:
    """Return the input as stored: numeric arrays unchanged, exact rationals as 'p/q' strings."""
    if array.dtype.kind in "fiu":
        return np.asarray(array)
    return np.array([str(Fraction(entry)) for entry in array.reshape(-1).tolist()]).reshape(array.shape)


def reference_to_npz(reference: Reference, dtypes: Iterable[str] = DTYPES) -> bytes:
    """Return the bytes of an .npz archive with the inputs, the spec and every stage in ``dtypes``."""
    dtypes = _checked_dtypes(dtypes)
    problem = reference.problem
    members: dict[str, np.ndarray] = {
        "format": np.array(FORMAT),
        "spec": np.array(json.dumps(spec_to_dict(problem.spec, problem))),
        "digits": np.array(reference.digits, dtype=np.int64),
        "engine": np.array(reference.engine),
        "mode": np.array("direct" if problem.direct else "projections"),
    }
    for name, array in problem.inputs.items():
        members[name] = _input_for_storage(array)
    for name, matrix in reference.stages.items():
        for dtype in dtypes:
            members[f"{name}.{dtype}"] = matrix.rounded(dtype)
        members[f"{name}.radius"] = matrix.radii()
    return _zip_arrays(members)


def _zip_arrays(members: dict[str, np.ndarray]) -> bytes:
    """Write arrays as .npy members of a zip archive, as numpy.savez does but with fixed timestamps."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in members.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def reference_to_npy(reference: Reference, stage: str = "output", dtype: str = "float64") -> bytes:
    """Return the bytes of an .npy file holding one stage correctly rounded to ``dtype``."""
    (dtype,) = _checked_dtypes(dtype)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, reference[stage].rounded(dtype), allow_pickle=False)
    return buffer.getvalue()


def reference_to_dict(reference: Reference, dtypes: Iterable[str] = DTYPES) -> dict:
    """Return the JSON-ready description: inputs, spec, and per stage decimals, radii and rounded values."""
    dtypes = _checked_dtypes(dtypes)
    problem = reference.problem
    stages = {}
    for name, matrix in reference.stages.items():
        record: dict[str, Any] = {
            "shape": list(matrix.shape),
            "precision_bits": matrix.precision,
            "decimal": matrix.decimals(),
            "radius": _hex_rows(matrix.radii()),
        }
        for dtype in dtypes:
            record[dtype] = _hex_rows(matrix.rounded(dtype).astype(np.float64))
        stages[name] = record
    return {
        "format": FORMAT,
        "symattn_version": __version__,
        "engine": reference.engine,
        "digits": reference.digits,
        "rounding": "decimal: round half to even, every digit correct; floats: round to nearest, ties to even",
        "mode": "direct" if problem.direct else "projections",
        "spec": spec_to_dict(problem.spec, problem),
        "inputs": {name: _input_record(array) for name, array in problem.inputs.items()},
        "stages": stages,
    }


def _hex_rows(array: np.ndarray) -> list:
    return [[float(value).hex() for value in row] for row in np.atleast_2d(array).tolist()]


def _input_record(array: np.ndarray) -> dict:
    if array.dtype.kind == "f":
        values = array.astype(np.float64)  # exact: every narrower float is a float64
        return {"dtype": str(array.dtype), "shape": list(array.shape), "hex": _nested_hex(values)}
    exact = _input_for_storage(array) if array.dtype.kind == "O" else array.astype(object)
    return {"dtype": str(array.dtype), "shape": list(array.shape), "exact": _nested_text(exact)}


def _nested_hex(values: np.ndarray) -> list:
    if values.ndim == 1:
        return [float(v).hex() for v in values.tolist()]
    return [_nested_hex(row) for row in values]


def _nested_text(values: np.ndarray) -> list:
    if values.ndim == 1:
        return [str(v) for v in values.tolist()]
    return [_nested_text(row) for row in values]


def reference_to_json(reference: Reference, dtypes: Iterable[str] = DTYPES) -> str:
    """Serialise the reference as JSON text with a fixed key order and a final newline."""
    return json.dumps(reference_to_dict(reference, dtypes), indent=1, ensure_ascii=True) + "\n"


def write_reference(reference: Reference, path: Path | str, *, dtypes: Iterable[str] = DTYPES,
                    stage: str = "output", force: bool = False) -> Path:
    """Write the reference to ``path`` in the format its suffix names (.npz, .npy or .json).

    An .npy file contains ``stage`` in one dtype, so ``dtypes`` must name exactly one. The file is
    written whole or not at all, and an existing file with other content is replaced only with
    ``force``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        data: bytes | str = reference_to_npz(reference, dtypes)
    elif suffix == ".json":
        data = reference_to_json(reference, dtypes)
    elif suffix == ".npy":
        dtypes = _checked_dtypes(dtypes)
        if len(dtypes) != 1:
            raise InvalidInputError(
                f"an .npy file contains one dtype but {len(dtypes)} were requested ({', '.join(dtypes)}); "
                f"name one dtype, or write an .npz archive"
            )
        data = reference_to_npy(reference, stage, dtypes[0])
    else:
        raise InvalidInputError(
            f"output file {str(path)!r} has suffix {path.suffix!r}; expected one of {', '.join(SUFFIXES)}"
        )
    write_files({path: data}, force=force)
    return path


@dataclass(frozen=True)
class ReferenceFile:
    """A reference read back from an .npz archive or a JSON document.

    ``problem`` is rebuilt from the stored inputs and spec, so ``compute_reference(problem, digits)``
    reproduces the case. ``arrays`` maps "<stage>.<dtype>" and "<stage>.radius" to arrays, and
    ``decimals`` maps stage names to decimal strings (JSON only, else empty).
    """

    problem: Problem
    digits: int
    engine: str
    arrays: dict[str, np.ndarray]
    decimals: dict[str, list[list[str]]]


def read_reference(path: Path | str) -> ReferenceFile:
    """Read an .npz archive or JSON document written by ``write_reference``."""
    from ..limits import read_limited

    path = Path(path)
    data = read_limited(path, "reference file")
    try:
        if path.suffix.lower() == ".json":
            return _read_json(data, str(path))
        return _read_npz(data, str(path))
    except SymattnError:
        raise
    except (
        KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError, RecursionError,
        EOFError, NotImplementedError, zipfile.BadZipFile, zlib.error,
    ) as error:
        # A missing key or a value of the wrong type, as after a hand edit, or a damaged archive.
        raise InvalidInputError(
            f"reference file {str(path)!r} is not a valid {FORMAT} document ({type(error).__name__}: "
            f"{error}); export it again with write_reference or `symattn reference`"
        ) from None


def _read_npz(data: bytes, where: str) -> ReferenceFile:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            members = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as error:
        # RuntimeError: zipfile raises it for a member flagged as encrypted.
        raise InvalidInputError(
            f"reference file {where!r} is not a readable .npz archive ({error}); it may be truncated "
            f"or corrupt, so export it again"
        ) from None
    for key in ("format", "spec", "digits", "engine", "mode"):
        if key not in members:
            raise InvalidInputError(f"reference file {where!r} has no {key!r} member; it was not written by symattn")
    if str(members["format"]) != FORMAT:
        raise InvalidInputError(f"reference file {where!r} has format {str(members['format'])!r}; expected {FORMAT!r}")
    spec = spec_from_dict(_json_object(str(members["spec"]), where))
    direct = str(members["mode"]) == "direct"
    inputs = {name: _stored_input(array) for name, array in members.items() if "." not in name
              and name not in ("format", "spec", "digits", "engine", "mode")}
    arrays = {name: array for name, array in members.items() if "." in name}
    problem = Problem.from_arrays(spec=spec, direct=direct, **inputs)
    return ReferenceFile(problem, int(members["digits"]), str(members["engine"]), arrays, {})


def _stored_input(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind != "U":
        return array
    # parse_number bounds the digits and the exponent; Fraction("1e999999999") would not finish.
    flat = [Fraction(str(parse_number(text, "stored input"))) for text in array.reshape(-1).tolist()]
    exact = np.empty(len(flat), dtype=object)
    exact[:] = flat
    return exact.reshape(array.shape)


def _json_object(text: str | bytes, where: str) -> Any:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise InvalidInputError(f"{where} is not valid JSON: {error}") from None
    return value


def _read_json(data: bytes, where: str) -> ReferenceFile:
    document = _json_object(data, where)
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise InvalidInputError(f"{where!r} is not a {FORMAT} document")
    spec = spec_from_dict(document["spec"])
    inputs = {}
    for name, record in document["inputs"].items():
        if "hex" in record:
            values = np.array(_from_hex(record["hex"]), dtype=np.float64).astype(record["dtype"])
        else:
            values = _stored_input(np.array(record["exact"], dtype=str))
            if record["dtype"] != "object":
                values = values.astype(record["dtype"])
        inputs[name] = values
    problem = Problem.from_arrays(spec=spec, direct=document["mode"] == "direct", **inputs)
    arrays, decimals = {}, {}
    for name, record in document["stages"].items():
        arrays[f"{name}.radius"] = np.array(_from_hex(record["radius"]))
        for dtype in DTYPES:
            if dtype in record:
                storage = FORMATS[dtype].storage
                arrays[f"{name}.{dtype}"] = np.array(_from_hex(record[dtype])).astype(storage)
        decimals[name] = record["decimal"]
    return ReferenceFile(problem, int(document["digits"]), document["engine"], arrays, decimals)


def _from_hex(rows: Any) -> Any:
    if isinstance(rows, list):
        return [_from_hex(row) for row in rows]
    if not isinstance(rows, str):
        raise InvalidInputError(f"expected a float written by float.hex, got {rows!r}")
    try:
        return float.fromhex(rows)
    except ValueError:
        raise InvalidInputError(f"{rows!r} is not a float written by float.hex") from None
