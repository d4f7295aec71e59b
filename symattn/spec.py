"""The frozen specification of an attention computation: heads, scale rule, masks, masked-row policy.

A mask always states its kind, because the same booleans mean opposite things in different
libraries (PyTorch's ``nn.MultiheadAttention`` hides keys where a bool mask is True, while
``scaled_dot_product_attention`` lets queries attend where it is True):

- ``Mask.keep(values)``: True means the query may attend to the key.
- ``Mask.block(values)``: True means the key is hidden from the query.
- ``Mask.additive(values)``: each value is added to the scaled logit; ``-inf`` hides the key.

Mask values may be 1-D (one entry per key, applied to every query), 2-D (query × key) or 3-D
(head × query × key).
"""

from __future__ import annotations

import decimal
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import sympy as sp

from .errors import InvalidInputError, MaskError, ShapeError, SymattnWarning
from .values import parse_number, to_exact

MaskKind = Literal["keep", "block", "additive"]
MASK_KINDS: tuple[str, ...] = ("keep", "block", "additive")
SCALE_NAMES: tuple[str, ...] = ("sqrt_dk", "sqrt_seq", "none")
MASKED_ROW_POLICIES: tuple[str, ...] = ("error", "zeros", "nan")
CAUSAL_ALIGNMENTS: tuple[str, ...] = ("top_left", "bottom_right")


def _flatten_nested(values: Any, where: str) -> tuple[tuple[int, ...], list]:
    """Return the shape and the flat entries of a nested list or NumPy array."""
    if type(values).__module__ == "numpy":
        return tuple(values.shape), values.reshape(-1).tolist()
    if not isinstance(values, (list, tuple)):
        raise MaskError(f"{where} is {type(values).__name__}; expected nested lists or an array")
    if not values:
        raise MaskError(f"{where} is empty; expected at least one entry")
    if isinstance(values[0], (list, tuple)):
        inner = [_flatten_nested(v, where) for v in values]
        shapes = {shape for shape, _ in inner}
        if len(shapes) != 1:
            raise MaskError(f"{where} is ragged: its rows have shapes {sorted(shapes)}")
        return (len(values),) + inner[0][0], [x for _, flat in inner for x in flat]
    return (len(values),), list(values)


def _position(index: int, shape: tuple[int, ...]) -> str:
    """Return the row-major ``index`` of an entry as its position in ``shape``: "[1, 2]" for (query 1, key 2)."""
    position = []
    for size in reversed(shape):
        index, rest = divmod(index, size)
        position.append(rest)
    return "[" + ", ".join(str(i) for i in reversed(position)) + "]"


def _bool_entry(value: Any, where: str) -> bool:
    if isinstance(value, bool) or type(value).__name__ == "bool":
        return bool(value)
    raise MaskError(
        f"{where} is {value!r}; keep and block masks take booleans (true/false). "
        f"For numbers added to the logits use Mask.additive"
    )


def _additive_entry(value: Any, where: str) -> sp.Expr:
    if isinstance(value, str) and value.strip().lower() in ("-inf", "-infinity"):
        return -sp.oo
    if isinstance(value, float) and value == float("-inf"):
        return -sp.oo
    if type(value).__module__ == "numpy" and isinstance(value, numbers.Real) and math.isinf(float(value)) and float(value) < 0:
        return -sp.oo
    if value is -sp.oo:
        return -sp.oo
    if isinstance(value, bool) or type(value).__name__ == "bool":
        raise MaskError(
            f"{where} is the boolean {value!r}; an additive mask takes numbers. "
            f"For booleans use Mask.keep (True = may attend) or Mask.block (True = hidden)"
        )
    return to_exact(value, where)


@dataclass(frozen=True)
class Mask:
    """A mask with its kind stated: ``keep``, ``block`` or ``additive``.

    ``shape`` is the shape of ``values``: (n_kv,), (n_q, n_kv) or (heads, n_q, n_kv).
    ``values`` holds the entries flat in row-major order: bools for keep and block masks,
    exact SymPy numbers or ``-oo`` for additive masks. ``where`` names the mask in the file it
    came from (such as "spec.mask[0]"), for error messages. It takes no part in comparisons.
    """

    kind: MaskKind
    shape: tuple[int, ...]
    values: tuple
    where: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise MaskError(
                f"mask kind {self.kind!r} is unknown; expected one of {', '.join(MASK_KINDS)}"
            )

    @classmethod
    def create(cls, kind: str, values: Any, where: str | None = None) -> "Mask":
        """Build a mask of the stated ``kind`` from nested lists or an array.

        ``where`` names the mask in a file (such as "spec.mask[0]"). Errors and warnings then start with it.
        """
        try:
            return cls._create(kind, values, where or "")
        except InvalidInputError as error:
            if not where:
                raise
            raise type(error)(f"{where}: {error}") from None

    @classmethod
    def _create(cls, kind: str, values: Any, where: str) -> "Mask":
        if kind not in MASK_KINDS:
            raise MaskError(
                f"mask kind {kind!r} is unknown; expected one of {', '.join(MASK_KINDS)} "
                f"(keep: True = may attend, block: True = hidden, additive: added to the logits)"
            )
        shape, flat = _flatten_nested(values, f"{kind} mask")
        if not 1 <= len(shape) <= 3:
            raise MaskError(
                f"{kind} mask has shape {shape}; expected (n_kv,), (n_q, n_kv) or (heads, n_q, n_kv)"
            )
        if kind == "additive":
            entries = tuple(_additive_entry(v, f"additive mask entry {_position(i, shape)}") for i, v in enumerate(flat))
            _warn_if_looks_boolean(entries, where)
        else:
            entries = tuple(_bool_entry(v, f"{kind} mask entry {_position(i, shape)}") for i, v in enumerate(flat))
        return cls(kind, shape, entries, where)

    @classmethod
    def keep(cls, values: Any) -> "Mask":
        """A mask whose True entries mark the keys a query may attend to."""
        return cls.create("keep", values)

    @classmethod
    def block(cls, values: Any) -> "Mask":
        """A mask whose True entries mark the keys hidden from a query."""
        return cls.create("block", values)

    @classmethod
    def additive(cls, values: Any) -> "Mask":
        """A mask added to the scaled logits; ``-inf`` (as ``float('-inf')`` or ``"-inf"``) hides a key."""
        return cls.create("additive", values)

    def entry(self, head: int, query: int, key: int) -> Any:
        """Return the entry that applies to (head, query, key), broadcasting a 1-D or 2-D mask."""
        if len(self.shape) == 1:
            return self.values[key]
        if len(self.shape) == 2:
            return self.values[query * self.shape[1] + key]
        return self.values[(head * self.shape[1] + query) * self.shape[2] + key]

    def check_shape(self, heads: int, n_q: int, n_kv: int, index: int = 0) -> None:
        """Raise ShapeError unless the mask broadcasts to (heads, n_q, n_kv). ``index`` is its place among the masks."""
        expected = {1: (n_kv,), 2: (n_q, n_kv), 3: (heads, n_q, n_kv)}[len(self.shape)]
        if self.shape != expected:
            name = f"{self.where}: {self.kind} mask" if self.where else f"mask {index} ({self.kind})"
            raise ShapeError(
                f"{name} has shape {self.shape}; expected {expected} for {_count(heads, 'head')}, "
                f"{_count(n_q, 'query', 'queries')} and {_count(n_kv, 'key')}"
            )


def _count(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def _shown(value: Any) -> str:
    """Return ``value`` for a message: a number read from a TOML file (a Decimal) as it was written there."""
    if isinstance(value, decimal.Decimal):
        return str(value)
    return repr(value)


def _warn_if_looks_boolean(entries: tuple, where: str) -> None:
    if entries and all(e == 0 or e == 1 for e in entries) and any(e == 1 for e in entries):
        prefix = f"{where}: " if where else ""
        warnings.warn(
            f"{prefix}this additive mask holds only 0s and 1s, so it adds 1 to some logits and hides "
            f"nothing; if it was meant as a boolean mask, use a keep or block mask (Mask.keep or "
            f"Mask.block, or kind = \"keep\" or \"block\" in a file)",
            SymattnWarning,
            stacklevel=5,
        )


def parse_scale(scale: Any) -> str | sp.Expr:
    """Normalise a scale request to one of SCALE_NAMES or an exact SymPy expression.

    Strings name a rule ("sqrt_dk", "sqrt_seq", "none") or give a number ("1/2", "0.125"),
    or a reciprocal square root written as ``1/sqrt(N)`` with a number N.
    """
    if scale is None:
        return "none"
    if isinstance(scale, str):
        text = scale.strip()
        if text in SCALE_NAMES:
            return text
        if text.startswith("1/sqrt(") and text.endswith(")"):
            radicand = parse_number(text[len("1/sqrt(") : -1], "scale radicand")
            if radicand <= 0:
                raise InvalidInputError(f"scale {scale!r} needs a positive radicand")
            return 1 / sp.sqrt(radicand)
        try:
            return parse_number(text, "scale")
        except InvalidInputError:
            raise InvalidInputError(
                f"scale {scale!r} is unknown; expected one of {', '.join(SCALE_NAMES)}, "
                f"an exact number such as '1/8', or '1/sqrt(N)'"
            ) from None
    value = to_exact(scale, "scale")
    if value == 0:
        raise InvalidInputError("scale 0 makes every weight equal; give a nonzero scale")
    return value


@dataclass(frozen=True)
class AttentionSpec:
    """How attention is computed, apart from the values.

    ``heads``: number of heads h; d_model must be divisible by it.
    ``scale``: "sqrt_dk" (1/√d_k, the default), "sqrt_seq" (1/√n_kv, used by some hand-worked
    tutorials), "none" (no scaling) or an exact SymPy expression.
    ``masks``: masks combined together; a key is hidden if any mask hides it.
    ``causal``: None, "top_left" (query i sees keys j ≤ i) or "bottom_right" (query i sees keys
    j ≤ i + n_kv − n_q, as when the queries are the last n_q positions).
    ``key_length``: number of valid keys; keys from this index on are padding and hidden.
    ``masked_rows``: what a query row with no visible key gets: "error" (default), "zeros" or "nan".
    """

    heads: int = 1
    scale: Any = "sqrt_dk"
    masks: tuple[Mask, ...] = field(default_factory=tuple)
    causal: str | None = None
    key_length: int | None = None
    masked_rows: str = "error"

    def __post_init__(self) -> None:
        if isinstance(self.heads, bool) or not isinstance(self.heads, numbers.Integral) or self.heads < 1:
            raise InvalidInputError(f"heads is {_shown(self.heads)}; expected a positive integer")
        object.__setattr__(self, "scale", parse_scale(self.scale))
        masks = self.masks
        if isinstance(masks, Mask):
            masks = (masks,)
        for mask in masks:
            if not isinstance(mask, Mask):
                raise MaskError(
                    f"mask {mask!r} has no stated kind; wrap it as Mask.keep(...) "
                    f"(True = may attend), Mask.block(...) (True = hidden) or Mask.additive(...)"
                )
        object.__setattr__(self, "masks", tuple(masks))
        if self.causal not in (None,) + CAUSAL_ALIGNMENTS:
            raise InvalidInputError(
                f"causal is {self.causal!r}; expected None, 'top_left' or 'bottom_right'"
            )
        if self.key_length is not None and (
            isinstance(self.key_length, bool) or not isinstance(self.key_length, numbers.Integral) or self.key_length < 0
        ):
            raise InvalidInputError(f"key_length is {_shown(self.key_length)}; expected a non-negative integer")
        if self.masked_rows not in MASKED_ROW_POLICIES:
            raise InvalidInputError(
                f"masked_rows is {self.masked_rows!r}; expected one of {', '.join(MASKED_ROW_POLICIES)}"
            )

    def scale_value(self, d_k: int, n_kv: int) -> sp.Expr:
        """Return the exact scale factor for per-head width d_k and n_kv keys."""
        if self.scale == "sqrt_dk":
            return 1 / sp.sqrt(d_k)
        if self.scale == "sqrt_seq":
            return 1 / sp.sqrt(n_kv)
        if self.scale == "none":
            return sp.Integer(1)
        return self.scale

    def visibility(self, heads: int, n_q: int, n_kv: int) -> tuple[list, list]:
        """Return (visible, bias): per head, query and key whether the key is visible and the
        exact number added to its logit."""
        for index, mask in enumerate(self.masks):
            mask.check_shape(heads, n_q, n_kv, index)
        if self.key_length is not None and self.key_length > n_kv:
            raise ShapeError(f"key_length is {self.key_length} but there are only {n_kv} keys")
        visible = [[[True] * n_kv for _ in range(n_q)] for _ in range(heads)]
        bias = [[[sp.Integer(0)] * n_kv for _ in range(n_q)] for _ in range(heads)]
        for h in range(heads):
            for i in range(n_q):
                for j in range(n_kv):
                    visible[h][i][j], bias[h][i][j] = self._combine(h, i, j, n_q, n_kv)
        return visible, bias

    def _combine(self, h: int, i: int, j: int, n_q: int, n_kv: int) -> tuple[bool, sp.Expr]:
        visible = True
        bias = sp.Integer(0)
        if self.causal == "top_left" and j > i:
            visible = False
        if self.causal == "bottom_right" and j > i + n_kv - n_q:
            visible = False
        if self.key_length is not None and j >= self.key_length:
            visible = False
        for mask in self.masks:
            entry = mask.entry(h, i, j)
            if mask.kind == "keep" and not entry:
                visible = False
            elif mask.kind == "block" and entry:
                visible = False
            elif mask.kind == "additive":
                if entry == -sp.oo:
                    visible = False
                else:
                    bias += entry
        return visible, bias

    @property
    def has_mask(self) -> bool:
        return bool(self.masks) or self.causal is not None or self.key_length is not None

    def describe(self) -> dict:
        """Return a JSON-ready description with keys in a fixed order."""
        return {
            "heads": int(self.heads),
            "scale": self.scale if isinstance(self.scale, str) else sp.sstr(self.scale),
            "masks": [
                {
                    "kind": mask.kind,
                    "shape": list(mask.shape),
                    "values": [v if isinstance(v, bool) else sp.sstr(v) for v in mask.values],
                }
                for mask in self.masks
            ],
            "causal": self.causal,
            "key_length": self.key_length,
            "masked_rows": self.masked_rows,
        }


def normalise_masks(mask: Any) -> tuple[Mask, ...]:
    """Accept None, one Mask or a sequence of Masks and return a tuple of Masks."""
    if mask is None:
        return ()
    if isinstance(mask, Mask):
        return (mask,)
    if isinstance(mask, Sequence) and not isinstance(mask, str) and all(isinstance(m, Mask) for m in mask):
        return tuple(mask)
    raise MaskError(
        "the mask has no stated kind; wrap it as Mask.keep(...) (True = may attend), "
        "Mask.block(...) (True = hidden) or Mask.additive(...) (added to the logits)"
    )
