"""Error metrics of an implementation's array against a certified reference.

For an implementation that computes in a binary format F (float64, float32, float16, bfloat16),
with a its value and r the exact value:

- absolute error |a − r| and relative error |a − r| / |r|, with r taken as its nearest float64;
- error in ULPs |a − r_F| / ulp_F(r_F), with r_F the value of r correctly rounded to F, so 0 means
  the implementation returned the correctly rounded value and 0.5 is the best a wrong value can do;
- normwise error max|a − r| / (eps_F · max|r|), the error in units of F's epsilon scaled to the
  largest reference value, which stays meaningful where cancellation makes r tiny.

NaN and infinities are compared as values: a NaN where the reference is NaN (the "nan" policy for
a query row with no visible key), or the same infinity, is a match. Any other NaN or infinity fails
the comparison and counts as an infinite ULP error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError, ShapeError
from .floats import dtype_name, eps, ulp

# How many of the worst entries and of the NaN or infinity positions a comparison keeps.
KEPT_ENTRIES = 5
KEPT_POSITIONS = 10

# torch.testing.assert_close's default (rtol, atol) per dtype, from torch 2.13's
# torch/testing/_comparison.py; used when a caller gives no tolerance.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-7),
    "float32": (1.3e-6, 1e-5),
    "float16": (1e-3, 1e-5),
    "bfloat16": (0.016, 1e-5),
}


@dataclass(frozen=True)
class Tolerance:
    """The largest error an entry may have and still pass.

    ``ulps``: the largest error in ULPs of the implementation's dtype. ``rtol``, ``atol``: an entry
    passes when |a − r| ≤ atol + rtol · |r|, as in ``numpy.isclose``; a missing one counts as 0.
    When both forms are given, an entry passes if it meets either, so ``ulps`` with ``atol``
    accepts entries whose reference is so close to zero that their ULPs are meaningless.
    """

    ulps: float | None = None
    rtol: float | None = None
    atol: float | None = None

    def __post_init__(self) -> None:
        for name in ("ulps", "rtol", "atol"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InvalidInputError(f"{name} is {value!r}; expected a finite number ≥ 0")
        if self.ulps is None and self.rtol is None and self.atol is None:
            raise InvalidInputError(
                "the tolerance is empty; give ulps, or rtol and atol, or use Tolerance.default(dtype)"
            )

    @classmethod
    def default(cls, dtype: object) -> "Tolerance":
        """Return torch.testing.assert_close's default rtol and atol for ``dtype``."""
        rtol, atol = DEFAULT_TOLERANCES[dtype_name(dtype)]
        return cls(rtol=rtol, atol=atol)

    @property
    def has_closeness(self) -> bool:
        return self.rtol is not None or self.atol is not None

    def allows(self, abs_error: np.ndarray, reference: np.ndarray, ulp_error: np.ndarray) -> np.ndarray:
        """Return, per entry, whether the errors are within this tolerance."""
        inside = np.zeros(np.shape(abs_error), dtype=bool)
        if self.ulps is not None:
            inside |= ulp_error <= self.ulps
        if self.has_closeness:
            with np.errstate(invalid="ignore"):
                inside |= abs_error <= (self.atol or 0.0) + (self.rtol or 0.0) * np.abs(reference)
        return inside

    def describe(self) -> str:
        """Return the tolerance in words, for example "4 ULPs or |a − r| ≤ 1e-05"."""
        parts = []
        if self.ulps is not None:
            parts.append(f"{self.ulps:g} ULPs")
        if self.has_closeness:
            parts.append(f"|a − r| ≤ {self.atol or 0.0:g} + {self.rtol or 0.0:g}·|r|")
        return " or ".join(parts)

    def to_dict(self) -> dict:
        return {"ulps": self.ulps, "rtol": self.rtol, "atol": self.atol}


@dataclass(frozen=True)
class EntryError:
    """The errors of one entry, with its index and the names of the axes it indexes."""

    index: tuple[int, ...]
    axes: tuple[str, ...]
    actual: float
    reference: float
    abs_error: float
    ulp_error: float

    def location(self) -> str:
        """Name the entry, for example "batch 0, head 1, query 2, key 0"."""
        return ", ".join(f"{axis} {i}" for axis, i in zip(self.axes, self.index))

    def to_dict(self) -> dict:
        return {
            "index": list(self.index),
            "location": self.location(),
            "actual": self.actual,
            "reference": self.reference,
            "abs_error": self.abs_error,
            "ulp_error": self.ulp_error,
        }


@dataclass(frozen=True)
class StageComparison:
    """The errors of one stage (the output, the attention weights, per-head outputs).

    ``max_rel_error`` leaves out entries whose reference is exactly 0, which the absolute error
    covers. ``worst`` is the entry with the largest ULP error, and an unexpected NaN or infinity
    counts as infinitely many ULPs. ``nan_positions`` and ``inf_positions`` list the first
    KEPT_POSITIONS NaN and infinite entries of the implementation's array.
    """

    name: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    tolerance: Tolerance
    entry_count: int
    failing_count: int
    max_abs_error: float
    max_rel_error: float
    max_ulp_error: float
    normwise_error: float
    max_abs_reference: float
    worst: EntryError | None
    worst_entries: tuple[EntryError, ...]
    nan_count: int
    inf_count: int
    nan_positions: tuple[tuple[int, ...], ...]
    inf_positions: tuple[tuple[int, ...], ...]
    reference_nan_count: int
    reference_inf_count: int
    unexpected_nan_count: int

    @property
    def passed(self) -> bool:
        return self.failing_count == 0

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "axes": list(self.axes),
            "shape": list(self.shape),
            "dtype": self.dtype,
            "passed": self.passed,
            "entry_count": self.entry_count,
            "failing_count": self.failing_count,
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "max_ulp_error": self.max_ulp_error,
            "normwise_error": self.normwise_error,
            "max_abs_reference": self.max_abs_reference,
            "worst": None if self.worst is None else self.worst.to_dict(),
            "worst_entries": [entry.to_dict() for entry in self.worst_entries],
            "nan_count": self.nan_count,
            "inf_count": self.inf_count,
            "nan_positions": [list(p) for p in self.nan_positions],
            "inf_positions": [list(p) for p in self.inf_positions],
            "reference_nan_count": self.reference_nan_count,
            "reference_inf_count": self.reference_inf_count,
            "unexpected_nan_count": self.unexpected_nan_count,
        }


def compare_stage(
    actual: np.ndarray,
    reference: np.ndarray,
    *,
    dtype: object,
    rounded: np.ndarray | None = None,
    tolerance: Tolerance | None = None,
    name: str = "output",
    axes: tuple[str, ...] | None = None,
) -> StageComparison:
    """Compare an implementation's array with the reference, entry by entry.

    ``reference`` contains the exact values rounded to float64 and ``rounded`` the exact values
    correctly rounded to ``dtype`` (both as float64 arrays). Without ``rounded``, the float64
    reference is rounded to ``dtype``, which can be one ulp off at a tie. ``axes`` names each
    axis ("batch", "head", "query", "key", "feature") for the locations in the report.

    >>> result = compare_stage(np.float32([1.0, 2.0]), np.array([1.0, 2.0000001]), dtype="float32",
    ...                        tolerance=Tolerance(ulps=1))
    >>> result.passed, result.max_ulp_error
    (True, 0.0)
    """
    dtype = dtype_name(dtype)
    tolerance = tolerance or Tolerance.default(dtype)
    actual = _float64(actual, f"the {name} of the implementation")
    reference = _float64(reference, f"the {name} reference")
    if actual.shape != reference.shape:
        raise ShapeError(
            f"the implementation's {name} has shape {actual.shape} but the reference has shape "
            f"{reference.shape}; the two must have the same layout"
        )
    if rounded is None:
        from .floats import round_array

        rounded = round_array(reference, dtype)
    rounded = _float64(rounded, f"the rounded {name} reference")
    axes = tuple(axes) if axes is not None else tuple(f"axis {i}" for i in range(actual.ndim))

    errors = _entry_errors(actual, reference, rounded, dtype)
    abs_error, rel_error, ulp_error, comparable, agree = errors
    inside = tolerance.allows(abs_error, reference, ulp_error) | agree
    inside &= comparable | agree

    finite_reference = np.isfinite(reference)
    max_abs_reference = float(np.max(np.abs(reference[finite_reference]), initial=0.0))
    max_abs_error = float(np.max(abs_error[comparable], initial=0.0))
    return StageComparison(
        name=name,
        axes=axes,
        shape=tuple(actual.shape),
        dtype=dtype,
        tolerance=tolerance,
        entry_count=int(actual.size),
        failing_count=int(np.count_nonzero(~inside)),
        max_abs_error=max_abs_error,
        max_rel_error=float(np.max(rel_error[comparable & (reference != 0)], initial=0.0)),
        max_ulp_error=float(np.max(ulp_error, initial=0.0)),
        normwise_error=_normwise(max_abs_error, max_abs_reference, eps(dtype)),
        max_abs_reference=max_abs_reference,
        worst=_worst_entries(actual, rounded, abs_error, ulp_error, axes, 1)[0] if actual.size else None,
        worst_entries=tuple(_worst_entries(actual, rounded, abs_error, ulp_error, axes, KEPT_ENTRIES)),
        nan_count=int(np.count_nonzero(np.isnan(actual))),
        inf_count=int(np.count_nonzero(np.isinf(actual))),
        nan_positions=_positions(np.isnan(actual)),
        inf_positions=_positions(np.isinf(actual)),
        reference_nan_count=int(np.count_nonzero(np.isnan(reference))),
        reference_inf_count=int(np.count_nonzero(np.isinf(rounded))),
        unexpected_nan_count=int(np.count_nonzero(np.isnan(actual) & ~np.isnan(reference))),
    )


def _float64(values: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in "fiu":
        raise InvalidInputError(f"{what} has dtype {array.dtype}; expected a float array")
    return array.astype(np.float64)


def _entry_errors(
    actual: np.ndarray, reference: np.ndarray, rounded: np.ndarray, dtype: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return absolute, relative and ULP errors, which entries are finite on both sides, and
    which agree as NaN/infinity values (both NaN, or the same infinity)."""
    both_nan = np.isnan(actual) & np.isnan(reference)
    same_inf = np.isinf(actual) & (actual == rounded)
    agree = both_nan | same_inf
    comparable = np.isfinite(actual) & np.isfinite(reference) & np.isfinite(rounded)

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        abs_error = np.where(comparable, np.abs(actual - reference), np.inf)
        rel_error = np.where(comparable & (reference != 0), abs_error / np.abs(reference), 0.0)
        ulp_error = np.where(comparable, np.abs(actual - rounded) / ulp(rounded, dtype), np.inf)
    abs_error = np.where(agree, 0.0, abs_error)
    ulp_error = np.where(agree, 0.0, ulp_error)
    return abs_error, rel_error, ulp_error, comparable, agree


def _normwise(max_abs_error: float, max_abs_reference: float, epsilon: float) -> float:
    if max_abs_error == 0:
        return 0.0
    if max_abs_reference == 0:
        return math.inf
    return max_abs_error / (epsilon * max_abs_reference)


def _worst_entries(
    actual: np.ndarray, rounded: np.ndarray, abs_error: np.ndarray, ulp_error: np.ndarray,
    axes: tuple[str, ...], count: int,
) -> list[EntryError]:
    # Order by ULP error, then by absolute error, largest first.
    order = np.lexsort((-abs_error.reshape(-1), -ulp_error.reshape(-1)))[:count]
    entries = []
    for flat in order.tolist():
        index = tuple(int(i) for i in np.unravel_index(flat, actual.shape))
        entries.append(
            EntryError(
                index=index,
                axes=axes,
                actual=float(actual[index]),
                reference=float(rounded[index]),
                abs_error=float(abs_error[index]),
                ulp_error=float(ulp_error[index]),
            )
        )
    return entries


def _positions(flags: np.ndarray) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(i) for i in index) for index in np.argwhere(flags)[:KEPT_POSITIONS])
