"""A numeric attention case: exact input arrays plus the specification.

A ``Problem`` is what the certified engines evaluate. Its inputs are NumPy arrays whose entries
are exact numbers: float16/float32/float64 entries are taken at their exact binary value, integer
entries as integers, and object arrays hold Python ints or ``fractions.Fraction`` values. NaN and
infinities are rejected, because the reference of such an input is undefined.

Input names follow ``Derivation.inputs``: ``query_source``, ``key_source``, ``value_source``,
``W_Q``, ``W_K``, ``W_V``, the 1-D biases ``b_Q``, ``b_K``, ``b_V``, and ``W_O`` with its 1-D bias
``b_O``. In direct mode they are ``Q``, ``K``, ``V`` and optionally ``W_O``, ``b_O``. Weights are
shaped (input width, output width), because rows are tokens: Q = X_q W_Q + b_Q.
"""

from __future__ import annotations

import decimal
import fractions
import numbers
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
import sympy as sp

from .derive import INPUT_NAMES, Derivation, _check_masked_rows, derive, derive_direct
from .errors import InvalidInputError, ShapeError, UnsupportedError, count_noun
from .spec import AttentionSpec

PROJECTION_REQUIRED: tuple[str, ...] = ("query_source", "key_source", "value_source", "W_Q", "W_K", "W_V")
DIRECT_NAMES: tuple[str, ...] = ("Q", "K", "V", "W_O", "b_O")
BIAS_NAMES: tuple[str, ...] = ("b_Q", "b_K", "b_V", "b_O")
EXACT_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class Problem:
    """A numeric attention case for one sequence (no batch): exact inputs and the spec.

    ``inputs`` maps input names to read-only NumPy arrays: 2-D matrices, 1-D biases.
    ``direct`` is True when the inputs are Q, K and V themselves (no input projections).
    """

    spec: AttentionSpec
    inputs: Mapping[str, np.ndarray]
    direct: bool = False

    @classmethod
    def from_arrays(cls, *, spec: AttentionSpec, direct: bool = False, **inputs: Any) -> "Problem":
        """Validate and freeze the input arrays.

        ``kv_source`` may stand for both ``key_source`` and ``value_source``.

        >>> from symattn import AttentionSpec
        >>> p = Problem.from_arrays(spec=AttentionSpec(), direct=True, Q=[[1, 0]], K=[[1, 0], [0, 1]], V=[[1], [2]])
        >>> (p.n_q, p.n_kv, p.d_k, p.d_v)
        (1, 2, 2, 1)
        """
        if not isinstance(spec, AttentionSpec):
            raise InvalidInputError(f"spec is {type(spec).__name__}; expected an AttentionSpec")
        if "kv_source" in inputs:
            if "key_source" in inputs or "value_source" in inputs:
                raise InvalidInputError("give either kv_source or key_source and value_source, not both")
            kv_source = inputs.pop("kv_source")
            inputs["key_source"] = inputs["value_source"] = kv_source
        allowed = DIRECT_NAMES if direct else INPUT_NAMES
        required = ("Q", "K", "V") if direct else PROJECTION_REQUIRED
        unknown = sorted(set(inputs) - set(allowed))
        if unknown:
            mode = "direct mode (direct=True)" if direct else "projection mode"
            raise InvalidInputError(
                f"unknown input {', '.join(unknown)} for {mode}; expected names among {', '.join(allowed)}"
            )
        missing = [name for name in required if inputs.get(name) is None]
        if missing:
            raise InvalidInputError(f"missing input {', '.join(missing)}; give every one of {', '.join(required)}")
        if inputs.get("b_O") is not None and inputs.get("W_O") is None:
            raise InvalidInputError("b_O was given without W_O; give W_O too, or drop b_O")

        arrays = {
            name: _exact_array(value, name, 1 if name in BIAS_NAMES else 2)
            for name, value in inputs.items()
            if value is not None
        }
        problem = cls(spec, MappingProxyType(arrays), bool(direct))
        problem._check_shapes()
        problem.visibility()  # raises for masks of the wrong shape and fully masked rows under "error"
        return problem

    @classmethod
    def from_derivation(cls, derivation: Derivation) -> "Problem":
        """Build the numeric problem of a derivation whose inputs are all numbers."""
        if derivation.free_symbols:
            names = ", ".join(sorted(str(s) for s in derivation.free_symbols))
            raise InvalidInputError(
                f"the derivation contains the symbols {names}; substitute numbers first with "
                f"derivation.subs({{...}})"
            )
        arrays = {}
        for name, matrix in derivation.inputs.items():
            entries = [[_sympy_to_fraction(matrix[i, j], f"{name}[{i}][{j}]") for j in range(matrix.shape[1])]
                       for i in range(matrix.shape[0])]
            array = _object_array(entries)
            arrays[name] = array.reshape(-1) if name in BIAS_NAMES else array
        return cls.from_arrays(spec=derivation.spec, direct=derivation.direct, **arrays)

    def to_derivation(self) -> Derivation:
        """Build the exact SymPy derivation of the same case (practical for small sizes only)."""
        spec = self.spec
        options = dict(
            heads=spec.heads, scale=spec.scale, mask=list(spec.masks), causal=spec.causal,
            key_length=spec.key_length, masked_rows=spec.masked_rows,
        )
        exact = {name: _to_sympy_rows(array) for name, array in self.inputs.items()}
        if self.direct:
            return derive_direct(**exact, **options)
        return derive(exact.pop("query_source"), **exact, **options)

    @property
    def n_q(self) -> int:
        return int(self.inputs["Q" if self.direct else "query_source"].shape[0])

    @property
    def n_kv(self) -> int:
        return int(self.inputs["K" if self.direct else "key_source"].shape[0])

    @property
    def d_model(self) -> int:
        """Width of Q and K (all heads together)."""
        return int(self.inputs["Q"].shape[1] if self.direct else self.inputs["W_Q"].shape[1])

    @property
    def d_vmodel(self) -> int:
        """Width of V (all heads together)."""
        return int(self.inputs["V"].shape[1] if self.direct else self.inputs["W_V"].shape[1])

    @property
    def heads(self) -> int:
        return int(self.spec.heads)

    @property
    def d_k(self) -> int:
        return self.d_model // self.heads

    @property
    def d_v(self) -> int:
        return self.d_vmodel // self.heads

    @property
    def d_out(self) -> int:
        """Width of the output: W_O's column count, or h·d_v without an output projection."""
        W_O = self.inputs.get("W_O")
        return self.d_vmodel if W_O is None else int(W_O.shape[1])

    def scale_factor(self) -> tuple[fractions.Fraction, fractions.Fraction]:
        """Return (a, b) with the exact scale s = a·√b (b = 1 for a rational scale)."""
        value = self.spec.scale_value(self.d_k, self.n_kv)
        if isinstance(value, sp.Rational):
            return fractions.Fraction(_sympy_to_fraction(value, "scale")), fractions.Fraction(1)
        coefficient, rest = value.as_coeff_Mul()
        if isinstance(rest, sp.Pow) and isinstance(rest.base, sp.Rational) and rest.exp in (sp.S.Half, -sp.S.Half):
            base = fractions.Fraction(_sympy_to_fraction(rest.base, "scale"))
            a = fractions.Fraction(_sympy_to_fraction(coefficient, "scale"))
            return (a, base) if rest.exp == sp.S.Half else (a / base, base)
        raise UnsupportedError(
            f"the scale {sp.sstr(value)} is neither rational nor a rational times a square root; "
            f"the numeric engines support those forms, such as 1/8 or 1/sqrt(6)"
        )

    def visibility(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Return (visible, bias): a bool array (heads, n_q, n_kv) and the exact additive bias.

        ``bias`` is None when no additive mask is given, otherwise an object array of the same
        shape holding ``Fraction`` values (0 where nothing is added). Raises MaskError when a query
        row has no visible key and ``masked_rows`` is "error".
        """
        heads, n_q, n_kv = self.heads, self.n_q, self.n_kv
        spec = self.spec
        visible = np.ones((heads, n_q, n_kv), dtype=bool)
        bias = None
        if spec.key_length is not None:
            if spec.key_length > n_kv:
                raise ShapeError(f"key_length is {spec.key_length} but there are only {n_kv} keys")
            visible[:, :, spec.key_length:] = False
        if spec.causal is not None:
            offset = 0 if spec.causal == "top_left" else n_kv - n_q
            # Query i may attend to key j when j <= i + offset.
            allowed = np.arange(n_kv)[None, :] <= np.arange(n_q)[:, None] + offset
            visible &= allowed[None, :, :]
        for index, mask in enumerate(spec.masks):
            mask.check_shape(heads, n_q, n_kv, index)
            if mask.kind in ("keep", "block"):
                values = np.array(mask.values, dtype=bool).reshape(mask.shape)
                visible &= _broadcast(values if mask.kind == "keep" else ~values, heads, n_q, n_kv)
                continue
            hidden = np.array([value == -sp.oo for value in mask.values], dtype=bool).reshape(mask.shape)
            visible &= _broadcast(~hidden, heads, n_q, n_kv)
            added = np.empty(len(mask.values), dtype=object)
            added[:] = [
                fractions.Fraction(0) if value == -sp.oo else _sympy_to_fraction(value, "additive mask entry")
                for value in mask.values
            ]
            added = _broadcast(added.reshape(mask.shape), heads, n_q, n_kv)
            bias = added.copy() if bias is None else bias + added
        if spec.masked_rows == "error" and not visible.any(axis=2).all():
            _check_masked_rows(spec, visible.tolist())  # raises MaskError naming the rows
        return visible, bias

    def _check_shapes(self) -> None:
        inputs = self.inputs
        if self.direct:
            Q, K, V = inputs["Q"], inputs["K"], inputs["V"]
            _require(Q.shape[1] == K.shape[1], f"Q has shape {Q.shape} but K has shape {K.shape}; "
                     f"queries and keys need the same width d_model")
            _require(K.shape[0] == V.shape[0], f"K has shape {K.shape} but V has shape {V.shape}; "
                     f"every key needs exactly one value")
        else:
            for source, weight, bias in (("query_source", "W_Q", "b_Q"), ("key_source", "W_K", "b_K"),
                                         ("value_source", "W_V", "b_V")):
                X, W = inputs[source], inputs[weight]
                _require(X.shape[1] == W.shape[0], f"{source} has {count_noun(X.shape[1], 'feature')} (shape {X.shape}) "
                         f"but {weight} has {count_noun(W.shape[0], 'row')} (shape {W.shape}); {weight} needs one row per "
                         f"feature of {source}")
                if bias in inputs:
                    _require(inputs[bias].shape == (W.shape[1],), f"{bias} has shape {inputs[bias].shape} "
                             f"but {weight} has shape {W.shape}; {bias} needs {W.shape[1]} entries")
            W_Q, W_K = inputs["W_Q"], inputs["W_K"]
            _require(W_Q.shape[1] == W_K.shape[1], f"W_Q has shape {W_Q.shape} but W_K has shape "
                     f"{W_K.shape}; queries and keys need the same width d_model")
            X_k, X_v = inputs["key_source"], inputs["value_source"]
            _require(X_k.shape[0] == X_v.shape[0], f"key_source has shape {X_k.shape} but value_source "
                     f"has shape {X_v.shape}; every key needs exactly one value")
        heads = self.heads
        for name, width in (("Q (d_model)", self.d_model), ("V", self.d_vmodel)):
            _require(width % heads == 0, f"{name} has width {width}, which is not divisible by "
                     f"{heads} heads; choose a head count that divides {width}")
        if "W_O" in inputs:
            W_O = inputs["W_O"]
            _require(W_O.shape[0] == self.d_vmodel, f"the concatenated heads have shape "
                     f"({self.n_q}, {self.d_vmodel}) but W_O has shape {W_O.shape}; W_O needs "
                     f"{self.d_vmodel} rows (a PyTorch out_proj.weight must be transposed first)")
            if "b_O" in inputs:
                _require(inputs["b_O"].shape == (W_O.shape[1],), f"b_O has shape {inputs['b_O'].shape} "
                         f"but W_O has shape {W_O.shape}; b_O needs {W_O.shape[1]} entries")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ShapeError(message)


def _broadcast(values: np.ndarray, heads: int, n_q: int, n_kv: int) -> np.ndarray:
    """Broadcast a (n_kv,), (n_q, n_kv) or (heads, n_q, n_kv) mask array to (heads, n_q, n_kv)."""
    if values.ndim == 1:
        values = values[None, None, :]
    elif values.ndim == 2:
        values = values[None, :, :]
    return np.broadcast_to(values, (heads, n_q, n_kv))


def _exact_array(value: Any, name: str, ndim: int) -> np.ndarray:
    """Convert one input to a read-only array of exact entries, rejecting NaN and infinities."""
    if isinstance(value, sp.MatrixBase):
        value = [[value[i, j] for j in range(value.shape[1])] for i in range(value.shape[0])]
    array = np.asarray(value) if type(value).__module__ == "numpy" else _array_from_nested(value, name)
    if ndim == 1 and array.ndim == 2 and 1 in array.shape:
        array = array.reshape(-1)
    if array.ndim != ndim:
        expected = "a 1-D vector" if ndim == 1 else "a 2-D matrix whose rows are tokens"
        raise ShapeError(f"{name} has shape {array.shape}; expected {expected}")
    if array.size == 0:
        raise ShapeError(f"{name} has shape {array.shape}; expected at least one entry")

    kind = array.dtype.kind
    if kind == "b":
        raise InvalidInputError(
            f"{name} is a boolean array; value matrices take numbers. Give masks as Mask.keep or Mask.block"
        )
    if kind == "f":
        if array.dtype not in EXACT_FLOAT_DTYPES:
            array = _object_array(_fractions(array, name))  # long double: exact through as_integer_ratio
        elif not np.all(np.isfinite(array)):
            position = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
            raise InvalidInputError(
                f"{name} contains {array[position]} at position {position}, which has no exact value; "
                f"replace NaN and infinities with finite numbers (hide a key with a mask instead)"
            )
    elif kind in "iu":
        if array.dtype.itemsize == 8 and kind == "u":
            array = _object_array(array.tolist())
    elif kind == "O":
        array = _object_array(_fractions(array, name))
    else:
        raise InvalidInputError(
            f"{name} has dtype {array.dtype}; expected float16/float32/float64, integers, or an "
            f"object array of int and fractions.Fraction"
        )
    array = np.array(array, copy=True)
    array.flags.writeable = False
    return array


def _array_from_nested(value: Any, name: str) -> np.ndarray:
    """Build an array from nested lists, keeping ints, Fractions and strings exact."""
    try:
        array = np.array(value)
    except ValueError:
        raise ShapeError(f"{name} is ragged; rows must have equal length") from None
    if array.dtype.kind in "fiub":
        return array
    if array.dtype.kind in "UO":
        return np.array(value, dtype=object)
    raise InvalidInputError(f"{name} has dtype {array.dtype}; expected numbers")


def _fractions(array: np.ndarray, name: str) -> list:
    """Convert every entry of an object or long-double array to an exact int or Fraction."""
    flat = []
    for index, entry in enumerate(array.reshape(-1).tolist()):
        position = tuple(int(i) for i in np.unravel_index(index, array.shape))
        flat.append(_scalar_to_fraction(entry, f"{name} entry at position {position}"))
    return np.array(flat, dtype=object).reshape(array.shape).tolist()


def _scalar_to_fraction(entry: Any, where: str) -> int | fractions.Fraction:
    if isinstance(entry, bool):
        raise InvalidInputError(f"{where} is the boolean {entry!r}; expected a number")
    if isinstance(entry, numbers.Integral):
        return int(entry)
    if isinstance(entry, fractions.Fraction):
        return entry
    if isinstance(entry, (str, sp.Basic, float, decimal.Decimal)) or type(entry).__module__ == "numpy":
        from .values import to_exact

        return _sympy_to_fraction(to_exact(entry, where), where)  # rejects NaN and infinities
    raise InvalidInputError(
        f"{where} is {entry!r} of type {type(entry).__name__}; expected an int, a Fraction or a float"
    )


def _sympy_to_fraction(value: sp.Expr, where: str) -> int | fractions.Fraction:
    if isinstance(value, sp.Float):
        value = sp.Rational(value)  # the Float's exact binary value
    if isinstance(value, sp.Integer):
        return int(value)
    if isinstance(value, sp.Rational):
        return fractions.Fraction(int(value.p), int(value.q))
    raise InvalidInputError(
        f"{where} is {sp.sstr(value)}, which is not a rational number; the numeric engines take "
        f"rational inputs (use the SymPy derivation for irrational values)"
    )


def _object_array(rows: list) -> np.ndarray:
    """Build an object array from nested lists without NumPy converting the entries."""
    array = np.empty((len(rows), len(rows[0])) if rows and isinstance(rows[0], list) else (len(rows),), dtype=object)
    if array.ndim == 2:
        for i, row in enumerate(rows):
            array[i, :] = row
    else:
        array[:] = rows
    return array


def _to_sympy_rows(array: np.ndarray) -> Any:
    """Return the array as nested lists of exact SymPy numbers (1-D for biases)."""
    if array.dtype.kind == "f":
        from .exact_arrays import float_array_to_rationals

        rows = float_array_to_rationals(array.reshape(-1, array.shape[-1]))
        return rows[0] if array.ndim == 1 else rows
    convert = lambda entry: sp.Rational(entry.numerator, entry.denominator) if isinstance(entry, fractions.Fraction) else sp.Integer(int(entry))
    if array.ndim == 1:
        return [convert(entry) for entry in array.tolist()]
    return [[convert(entry) for entry in row] for row in array.tolist()]
