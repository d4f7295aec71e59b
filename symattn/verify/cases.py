"""Reading a verification case: inputs, weights, specification and an implementation's outputs.

A case is an .npz archive, or a TOML file that points at .npy files; docs/case-format.md
describes both. Arrays are always loaded with ``allow_pickle=False``, so a case file cannot run
code, and paths in a TOML case must stay inside the TOML file's folder.
"""

from __future__ import annotations

import difflib
import io
import json
import tomllib
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..derive import INPUT_NAMES
from ..errors import InvalidInputError, ShapeError, SymattnError
from ..limits import MAX_INPUT_FILE_BYTES, read_limited
from ..spec import MASK_KINDS, AttentionSpec, Mask
from .floats import FORMATS, round_array

OUTPUT_NAMES: tuple[str, ...] = ("output", "attention_weights", "head_outputs")
DIRECT_NAMES: tuple[str, ...] = ("Q", "K", "V", "W_O", "b_O")
SPEC_KEYS: tuple[str, ...] = (
    "heads", "scale", "masks", "causal", "key_length", "masked_rows",
    "dtype", "weight_layout", "average_weights",
)
WEIGHT_LAYOUTS: tuple[str, ...] = ("symattn", "pytorch")
_WEIGHT_NAMES = ("W_Q", "W_K", "W_V", "W_O")


@dataclass(frozen=True)
class Case:
    """A loaded case: the problem, the implementation's dtype and its outputs (each may be None).

    ``output`` is (n_q, d_out); ``attention_weights`` is (h, n_q, n_kv), or (n_q, n_kv) when
    ``average_weights``; ``head_outputs`` is (h, n_q, d_v). ``dtype`` is None only when the case
    has no output and states no dtype.
    """

    source: Path
    problem: Any
    dtype: str | None
    output: np.ndarray | None = None
    attention_weights: np.ndarray | None = None
    head_outputs: np.ndarray | None = None
    average_weights: bool = False


def load_case(path: Path | str) -> Case:
    """Read a case from an .npz archive or a .toml file, raising InvalidInputError on bad content."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        settings, arrays = _read_npz(path)
    elif suffix == ".toml":
        settings, arrays = _read_toml(path)
    else:
        raise InvalidInputError(
            f"case file {str(path)!r} has the suffix {path.suffix!r}; expected .npz or .toml"
        )
    try:
        return _build_case(path, settings, arrays)
    except SymattnError as error:
        raise type(error)(f"case {str(path)!r}: {error}") from None


# .npz archives


def _read_npz(path: Path) -> tuple[dict, dict[str, Any]]:
    data = read_limited(path, "case file")
    if not data.startswith(b"PK"):
        # np.load would take any other bytes for a pickle and blame allow_pickle.
        raise InvalidInputError(
            f"case file {str(path)!r} is not an .npz archive: it does not start with the zip "
            f"signature; write it with numpy.savez, or give a .toml case file"
        )
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            _check_member_sizes(archive, path)
            arrays = {name: _npz_member(archive, name, path) for name in archive.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as error:
        # NotImplementedError: a zip version or compression method that zipfile cannot read.
        # RuntimeError: a member flagged as encrypted.
        raise InvalidInputError(
            f"case file {str(path)!r} is not a readable .npz archive ({error}); it may be "
            f"truncated or corrupt, so write it again with numpy.savez"
        ) from None
    except ValueError as error:
        raise InvalidInputError(
            f"case file {str(path)!r} is not a readable .npz archive ({error}); write it again "
            f"with numpy.savez"
        ) from None
    if "spec" not in arrays:
        raise InvalidInputError(
            f"case file {str(path)!r} has no 'spec' member; store the specification as JSON text, "
            f"for example numpy.savez(path, spec=json.dumps({{'heads': 2}}), ...)"
        )
    spec_array = arrays.pop("spec")
    if spec_array.dtype.kind != "U" or spec_array.ndim != 0:
        raise InvalidInputError(
            f"the 'spec' member of {str(path)!r} has dtype {spec_array.dtype} and shape "
            f"{spec_array.shape}; expected JSON text (a 0-d string array)"
        )
    try:
        settings = json.loads(str(spec_array))
    except ValueError as error:  # JSONDecodeError, or an integer of more than 4300 digits
        raise InvalidInputError(f"the 'spec' member of {str(path)!r} is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidInputError(f"the 'spec' member of {str(path)!r} is not valid JSON: nested too deeply") from None
    if not isinstance(settings, dict):
        raise InvalidInputError(f"the 'spec' member of {str(path)!r} is JSON but not an object")
    return settings, arrays


def _check_member_sizes(archive, path: Path) -> None:
    for info in archive.zip.infolist():
        if info.file_size > MAX_INPUT_FILE_BYTES:
            raise InvalidInputError(
                f"member {info.filename!r} of {str(path)!r} unpacks to {info.file_size:,} bytes, "
                f"above the limit of {MAX_INPUT_FILE_BYTES:,} bytes"
            )


def _npz_member(archive, name: str, path: Path) -> np.ndarray:
    try:
        return archive[name]
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise InvalidInputError(
                f"member {name!r} of {str(path)!r} contains Python objects, which are rejected "
                f"because unpickling can run code; store numbers (float, int or bool arrays)"
            ) from None
        raise


# TOML files


def _read_toml(path: Path) -> tuple[dict, dict[str, Any]]:
    data = read_limited(path, "case file")
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except ValueError as error:  # TOMLDecodeError, UnicodeDecodeError, or an integer of over 4300 digits
        raise InvalidInputError(f"case file {str(path)!r} is not valid TOML: {error}") from None
    except RecursionError:
        raise InvalidInputError(f"case file {str(path)!r} is not valid TOML: nested too deeply") from None
    unknown = sorted(set(document) - {"spec", "inputs", "outputs"})
    if unknown:
        raise InvalidInputError(
            f"case file {str(path)!r} has unknown tables {', '.join(unknown)}; expected [spec], "
            f"[inputs] and [outputs]"
        )
    settings = dict(document.get("spec", {}))
    arrays: dict[str, Any] = {}
    for table in ("inputs", "outputs"):
        for name, entry in document.get(table, {}).items():
            if isinstance(entry, str):
                arrays[name] = _load_npy(path, entry, f"[{table}] {name}")
            elif isinstance(entry, list):
                arrays[name] = entry  # inline values, made exact when the problem is built
            else:
                raise InvalidInputError(
                    f"[{table}] {name} in {str(path)!r} is {entry!r}; expected the path of an "
                    f".npy file or an inline list of rows"
                )
    masks = settings.get("masks", [])
    if isinstance(masks, list):
        for index, mask in enumerate(masks):
            if isinstance(mask, dict) and isinstance(mask.get("array"), str):
                mask = dict(mask)
                mask["values"] = _load_npy(path, mask.pop("array"), f"spec.masks[{index}].array")
                masks[index] = mask
    return settings, arrays


def _load_npy(case_path: Path, relative: str, where: str) -> np.ndarray:
    """Load an .npy file named relative to the case file's folder, which it may not leave."""
    folder = case_path.resolve().parent
    if Path(relative).is_absolute():
        raise InvalidInputError(
            f"{where} is the absolute path {relative!r}; give a path relative to the case file's "
            f"folder {str(folder)!r}"
        )
    target = (folder / relative).resolve()
    if not target.is_relative_to(folder):
        raise InvalidInputError(
            f"{where} is {relative!r}, which leads outside the case file's folder {str(folder)!r}; "
            f"move the .npy file next to the case file"
        )
    data = read_limited(target, where)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise InvalidInputError(
                f"{where} ({str(target)!r}) contains Python objects, which are rejected because "
                f"unpickling can run code; store numbers"
            ) from None
        raise InvalidInputError(f"{where} ({str(target)!r}) is not a readable .npy file: {error}") from None
    except (EOFError, OSError) as error:
        raise InvalidInputError(
            f"{where} ({str(target)!r}) is not a readable .npy file ({error}); it may be truncated"
        ) from None


# From settings and arrays to a case


def _build_case(path: Path, settings: dict, arrays: dict[str, Any]) -> Case:
    from ..problem import Problem

    unknown = sorted(set(settings) - set(SPEC_KEYS))
    if unknown:
        close = [match for key in unknown for match in difflib.get_close_matches(str(key), SPEC_KEYS, n=1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InvalidInputError(
            f"unknown spec keys {', '.join(unknown)}{hint}; expected keys among {', '.join(SPEC_KEYS)}"
        )
    layout = settings.get("weight_layout", "symattn")
    if layout not in WEIGHT_LAYOUTS:
        raise InvalidInputError(f"weight_layout is {layout!r}; expected 'symattn' or 'pytorch'")
    average_weights = settings.get("average_weights", False)
    if not isinstance(average_weights, bool):
        raise InvalidInputError(f"average_weights is {average_weights!r}; expected true or false")

    outputs = {name: arrays.pop(name) for name in OUTPUT_NAMES if name in arrays}
    # Direct mode as soon as one of Q, K and V is given, so that a misspelt Q is the one unknown name.
    direct = any(name in arrays for name in ("Q", "K", "V"))
    allowed = DIRECT_NAMES if direct else INPUT_NAMES
    unknown = sorted(set(arrays) - set(allowed))
    if unknown:
        mode = "direct mode (an array named Q, K or V is given)" if direct else "projection mode"
        raise InvalidInputError(
            f"unknown {'array' if len(unknown) == 1 else 'arrays'} {', '.join(unknown)} for {mode}; expected inputs among "
            f"{', '.join(allowed)} and outputs among {', '.join(OUTPUT_NAMES)}"
        )
    missing = [name for name in ("Q", "K", "V") if name not in arrays] if direct else []
    if missing:
        raise InvalidInputError(
            f"direct mode needs Q, K and V, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            f"missing; add {'it' if len(missing) == 1 else 'them'}, or give query_source, key_source, W_Q, "
            f"W_K and W_V for projection mode"
        )
    inputs = {name: _input_array(name, value, layout) for name, value in arrays.items()}
    spec = AttentionSpec(
        heads=settings.get("heads", 1),
        scale=settings.get("scale", "sqrt_dk"),
        masks=tuple(_mask(entry, index) for index, entry in enumerate(_mask_list(settings))),
        causal=settings.get("causal"),
        key_length=settings.get("key_length"),
        masked_rows=settings.get("masked_rows", "error"),
    )
    problem = Problem.from_arrays(spec=spec, direct=direct, **inputs)

    output = _output_array(outputs.get("output"), "output")
    weights = _output_array(outputs.get("attention_weights"), "attention_weights")
    head_outputs = _output_array(outputs.get("head_outputs"), "head_outputs")
    first = next((a for a in (output, weights, head_outputs) if a is not None), None)
    dtype = _case_dtype(settings.get("dtype"), first)
    for name, array in (("output", output), ("attention_weights", weights), ("head_outputs", head_outputs)):
        if array is not None:
            _check_output_dtype(name, array, dtype)
    _check_output_shapes(problem, output, weights, head_outputs, average_weights)
    return Case(path, problem, dtype, output, weights, head_outputs, average_weights)


def _mask_list(settings: dict) -> list:
    masks = settings.get("masks", [])
    if not isinstance(masks, list):
        raise InvalidInputError(f"masks is {masks!r}; expected a list of {{kind, values}} tables")
    return masks


def _mask(entry: Any, index: int) -> Mask:
    where = f"masks[{index}]"
    if not isinstance(entry, dict) or set(entry) - {"kind", "values", "array"}:
        raise InvalidInputError(
            f"{where} is {entry!r}; expected {{'kind': one of {', '.join(MASK_KINDS)}, 'values': "
            f"nested lists}} (a TOML case may give 'array': a path to an .npy file instead)"
        )
    if "array" in entry:
        raise InvalidInputError(f"{where} names an array file, which only a TOML case can load; give 'values'")
    if "kind" not in entry or "values" not in entry:
        raise InvalidInputError(f"{where} needs both 'kind' and 'values'")
    values = entry["values"]
    if isinstance(values, np.ndarray) and values.dtype.kind == "f" and np.isnan(values).any():
        raise InvalidInputError(f"{where} contains NaN; an additive mask takes numbers and -inf")
    return Mask.create(entry["kind"], values, where)


def _input_array(name: str, value: Any, layout: str) -> Any:
    if isinstance(value, list):
        value = _inline_array(name, value)
    else:
        kind = value.dtype.kind
        if kind not in "fiu":
            raise InvalidInputError(
                f"input {name} has dtype {value.dtype}; expected float16, float32, float64 or integers"
            )
        if kind == "f" and not np.all(np.isfinite(value)):
            position = tuple(int(i) for i in np.argwhere(~np.isfinite(value))[0])
            raise InvalidInputError(
                f"input {name} contains {value[position]} at position {position}; the reference of "
                f"NaN or infinite inputs is undefined, so replace them with finite numbers (hide a "
                f"key with a mask instead)"
            )
    if layout == "pytorch" and name in _WEIGHT_NAMES:
        value = np.asarray(value).T  # PyTorch stores (out, in); symattn uses (in, out)
    return value


def _inline_array(name: str, rows: list) -> np.ndarray:
    """Convert inline TOML rows (ints, floats, decimal strings) to an object array of exact values."""
    from fractions import Fraction

    from ..values import to_exact

    def exact(entry: Any, where: str) -> Any:
        value = to_exact(entry, where)
        if not value.is_Rational:
            raise InvalidInputError(f"{where} is {entry!r}; expected a number")
        return Fraction(int(value.p), int(value.q))

    if rows and isinstance(rows[0], list):
        table = [[exact(entry, f"{name}[{i}][{j}]") for j, entry in enumerate(row)] for i, row in enumerate(rows)]
        if len({len(row) for row in table}) != 1:
            raise ShapeError(f"input {name} is ragged; rows must have equal length")
        array = np.empty((len(table), len(table[0])), dtype=object)
        for i, row in enumerate(table):
            array[i, :] = row
        return array
    array = np.empty(len(rows), dtype=object)
    array[:] = [exact(entry, f"{name}[{i}]") for i, entry in enumerate(rows)]
    return array


def _output_array(value: Any, name: str) -> np.ndarray | None:
    if value is None:
        return None
    array = np.asarray(value, dtype=np.float64) if isinstance(value, list) else value
    if array.dtype.kind != "f":
        raise InvalidInputError(f"{name} has dtype {array.dtype}; an implementation's output is a float array")
    return array


def _case_dtype(declared: Any, first: np.ndarray | None) -> str | None:
    """Return the declared dtype, or else the dtype of the first output array present."""
    if declared is not None:
        if declared not in FORMATS:
            raise InvalidInputError(f"dtype is {declared!r}; expected one of {', '.join(FORMATS)}")
        return declared
    if first is None:
        return None
    if first.dtype.name not in FORMATS:
        raise InvalidInputError(
            f"the outputs have dtype {first.dtype}; expected float16, float32 or float64 (state "
            f"dtype = 'bfloat16' for bfloat16 values stored as float32)"
        )
    return first.dtype.name


def _check_output_dtype(name: str, array: np.ndarray, dtype: str) -> None:
    storage = "float32" if dtype == "bfloat16" else dtype
    if array.dtype.name == storage:
        if dtype == "bfloat16":
            finite = np.isfinite(array)
            if not np.array_equal(round_array(array[finite], "bfloat16"), array[finite].astype(np.float64)):
                raise InvalidInputError(
                    f"{name} contains float32 values that are not bfloat16 values, but the case "
                    f"declares dtype bfloat16; store the bfloat16 outputs widened to float32"
                )
        return
    raise InvalidInputError(
        f"{name} has dtype {array.dtype} but the case declares dtype {dtype}; store the "
        f"implementation's {name} in its own dtype ({storage}), or correct the declared dtype"
    )


def _check_output_shapes(problem, output, weights, head_outputs, average_weights: bool) -> None:
    heads, n_q, n_kv = problem.heads, problem.n_q, problem.n_kv
    expected = {
        "output": (n_q, problem.d_out),
        "attention_weights": (n_q, n_kv) if average_weights else (heads, n_q, n_kv),
        "head_outputs": (heads, n_q, problem.d_v),
    }
    for name, array in (("output", output), ("attention_weights", weights), ("head_outputs", head_outputs)):
        if array is None or array.shape == expected[name]:
            continue
        hint = ""
        if name == "attention_weights" and not average_weights and array.shape == (n_q, n_kv):
            hint = "; weights of shape (n_q, n_kv) are averaged over heads, so set average_weights = true"
        raise ShapeError(
            f"{name} has shape {array.shape} but the case's inputs give {name} of shape "
            f"{expected[name]}{hint}"
        )
