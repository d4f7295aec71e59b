"""Verification of an implementation's arrays against certified references.

A reference covers one sequence (no batch axis). A batch is a list of problems or references,
and the implementation's arrays then carry a leading batch axis. Layouts, batch axis first when
there is one:

- output: (n_q, d_out);
- attention weights: (h, n_q, n_kv) per head, or (n_q, n_kv) when ``average_weights``;
- per-head outputs: (h, n_q, d_v).
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np

from ..errors import EvaluationError, InvalidInputError, ShapeError
from ..progress import Progress, report
from .diagnose import Diagnosis, diagnose
from .floats import dtype_name, round_fraction
from .metrics import StageComparison, Tolerance, compare_stage
from .report import Report, nan_leak_notes, overflow_notes

DEFAULT_DIGITS = 50
# A head mean that sits within the decimals' error of a rounding boundary is recomputed with
# twice the digits, at most this many times.
MAX_DIGIT_DOUBLINGS = 3


def verify(
    reference: Any,
    output: np.ndarray | None,
    *,
    weights: np.ndarray | None = None,
    average_weights: bool = False,
    head_outputs: np.ndarray | None = None,
    dtype: object = None,
    tolerance: Tolerance | None = None,
    digits: int = DEFAULT_DIGITS,
    engine: str = "auto",
    name_mistakes: bool = True,
    progress: Progress | None = None,
) -> Report:
    """Compare an implementation's output and intermediates, where given, with the reference.

    ``reference`` is a Reference or a Problem (whose reference is computed to ``digits`` digits
    with ``engine``), or a list of them for a batch. ``output`` may be None when ``weights`` or
    ``head_outputs`` are given. ``dtype`` is the implementation's format, taken from the first
    array when omitted; bfloat16 values arrive as float32 arrays, so bfloat16 must be named.
    Without ``tolerance``, torch.testing's default rtol and atol for the dtype apply. With
    ``name_mistakes``, each failed stage is replayed under the known mistakes. ``progress``
    hears ("certified references", k, n) as the n references to compute are finished
    (see symattn.progress).
    """
    given = {"output": output, "weights": weights, "head_outputs": head_outputs}
    given = {name: array for name, array in given.items() if array is not None}
    if not given:
        raise InvalidInputError("nothing to verify; give the output, the weights or the per-head outputs")
    batched = isinstance(reference, (list, tuple))
    references = _references(list(reference) if batched else [reference], digits, engine, progress)
    dtype = _implementation_dtype(next(iter(given.values())), dtype)
    tolerance = tolerance or Tolerance.default(dtype)
    batch_axis = ("batch",) if batched else ()

    def with_batch(array: np.ndarray, what: str, rank: int) -> np.ndarray:
        array = np.asarray(array)
        expected_rank = rank + (1 if batched else 0)
        if array.ndim != expected_rank:
            raise ShapeError(
                f"the implementation's {what} has {array.ndim} dimensions (shape {array.shape}); "
                f"expected {expected_rank}" + (" with the batch axis first" if batched else "")
            )
        return array if batched else array[None]

    # Inside this function every array has a batch axis, even for a single sequence.
    actual: dict[str, np.ndarray] = {}
    stages: list[StageComparison] = []
    if output is not None:
        actual["output"] = with_batch(output, "output", 2)
        nearest, rounded = _stacked(references, ["output"], dtype)
        nearest_output = nearest[:, 0]
        axes = batch_axis + ("query", "feature")
        stages.append(_compare(actual["output"], nearest_output, rounded[:, 0], dtype, tolerance, "output", axes, batched))

    if weights is not None and average_weights:
        actual["weights"] = with_batch(weights, "attention weights (averaged over heads)", 2)
        references, nearest, rounded = rounded_head_means(references, dtype)
        axes = batch_axis + ("query", "key")
        name = "attention weights (mean over heads)"
        stages.append(_compare(actual["weights"], nearest, rounded, dtype, tolerance, name, axes, batched))
    elif weights is not None:
        actual["weights"] = with_batch(weights, "attention weights", 3)
        _check_not_averaged(actual["weights"], references[0], batched)
        nearest, rounded = _stacked(references, _head_stage_names(references[0], "A"), dtype)
        axes = batch_axis + ("head", "query", "key")
        stages.append(_compare(actual["weights"], nearest, rounded, dtype, tolerance, "attention weights", axes, batched))

    if head_outputs is not None:
        actual["head_outputs"] = with_batch(head_outputs, "per-head outputs", 3)
        nearest, rounded = _stacked(references, _head_stage_names(references[0], "O"), dtype)
        axes = batch_axis + ("head", "query", "feature")
        stages.append(_compare(actual["head_outputs"], nearest, rounded, dtype, tolerance, "head outputs", axes, batched))

    problems = [r.problem for r in references]
    notes = _overflow_notes(references, dtype, batched)
    if output is not None:
        notes += nan_leak_notes(problems, actual["output"].astype(np.float64), nearest_output,
                                _head_nan(actual, average_weights), batched)
    diagnoses: list[Diagnosis] = []
    if name_mistakes:
        diagnoses = _diagnoses(problems, stages, actual, batched, dtype)
    return Report(
        dtype=dtype,
        tolerance=tolerance,
        digits=references[0].digits,
        engine=references[0].engine,
        stages=tuple(stages),
        notes=tuple(notes),
        diagnoses=tuple(diagnoses),
    )


def _head_nan(actual: dict[str, np.ndarray], average_weights: bool) -> np.ndarray | None:
    """Flag the (batch, head, query) positions where a given per-head result has a NaN."""
    if "head_outputs" in actual:
        return np.isnan(actual["head_outputs"]).any(axis=-1)
    if "weights" in actual and not average_weights:
        return np.isnan(actual["weights"]).any(axis=-1)
    return None


def _references(items: list, digits: int, engine: str, progress: Progress | None = None) -> list:
    if not items:
        raise InvalidInputError("the batch of references is empty; give at least one problem")
    from ..numeric.reference import compute_reference

    references = []
    to_compute = sum(1 for item in items if not hasattr(item, "stages"))
    computed = 0
    if to_compute:
        report(progress, "certified references", computed, to_compute)
    for item in items:
        if hasattr(item, "stages") and hasattr(item, "problem"):
            references.append(item)
        elif hasattr(item, "spec") and hasattr(item, "inputs"):
            references.append(compute_reference(item, digits, engine=engine))
            computed += 1
            report(progress, "certified references", computed, to_compute)
        else:
            raise InvalidInputError(
                f"expected a symattn Problem or Reference, got {type(item).__name__}"
            )
    return references


def _implementation_dtype(output: Any, dtype: object) -> str:
    if dtype is not None:
        return dtype_name(dtype)
    array_dtype = np.asarray(output).dtype
    if array_dtype.kind != "f":
        raise InvalidInputError(
            f"the implementation's output has dtype {array_dtype}; expected float16, float32 or "
            f"float64 (name bfloat16 explicitly with dtype='bfloat16')"
        )
    return dtype_name(array_dtype)


def _head_stage_names(reference, prefix: str) -> list[str]:
    return [f"{prefix}_{head}" for head in range(reference.problem.heads)]


def _stacked(references: list, names: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the float64 values and the values rounded to ``dtype`` of the named stages, shaped
    (batch, len(names), rows, columns)."""
    nearest = np.array([[r.stages[n].midpoints() for n in names] for r in references], dtype=np.float64)
    rounded = np.array([[r.stages[n].rounded(dtype) for n in names] for r in references], dtype=np.float64)
    return nearest, rounded


def _compare(actual, nearest, rounded, dtype, tolerance, name, axes, batched) -> StageComparison:
    if not batched:
        actual, nearest, rounded = actual[0], nearest[0], rounded[0]
    return compare_stage(actual, nearest, rounded=rounded, dtype=dtype, tolerance=tolerance, name=name, axes=axes)


def _check_not_averaged(actual_weights: np.ndarray, reference, batched: bool) -> None:
    problem = reference.problem
    expected = (problem.heads, problem.n_q, problem.n_kv)
    if actual_weights.shape[1:] != expected:
        shape = actual_weights.shape if batched else actual_weights.shape[1:]
        raise ShapeError(
            f"the implementation's attention weights have shape {shape}; expected per-head weights "
            f"{expected}" + (" after the batch axis" if batched else "") + ". Weights of shape "
            f"(n_q, n_kv) are averaged over heads: pass average_weights=True to compare them"
        )


def mean_over_heads(reference) -> tuple[list[list[Fraction]], list[list[Fraction]]]:
    """Return the mean over heads of the attention weights as rationals, with error bounds.

    The mean is formed exactly from each head's weights correctly rounded to the reference's
    digits, so its error is at most the mean of their rounding errors (half a unit in the last
    digit each). A NaN row (masked_rows="nan") comes back as None entries.
    """
    heads = reference.problem.heads
    tables = [reference.stages[f"A_{head}"].decimals(reference.digits) for head in range(heads)]
    means, bounds = [], []
    for i, row in enumerate(tables[0]):
        mean_row, bound_row = [], []
        for j in range(len(row)):
            parsed = [_decimal_with_error(table[i][j], reference.digits) for table in tables]
            if any(value is None for value, _ in parsed):
                mean_row.append(None)
                bound_row.append(None)
                continue
            mean_row.append(sum(value for value, _ in parsed) / heads)
            bound_row.append(sum(error for _, error in parsed) / heads)
        means.append(mean_row)
        bounds.append(bound_row)
    return means, bounds


def _decimal_with_error(text: str, digits: int) -> tuple[Fraction | None, Fraction]:
    if text.lower() == "nan":
        return None, Fraction(0)
    value = Decimal(text)
    if value == 0:
        return Fraction(0), Fraction(0)  # a correctly rounded nonzero value never prints as 0
    # Half a unit in the last of `digits` significant digits.
    return Fraction(value), Fraction(1, 2) * Fraction(10) ** (value.adjusted() - digits + 1)


def rounded_head_means(references: list, dtype: str) -> tuple[list, np.ndarray, np.ndarray]:
    """Return the references and the mean over heads of their attention weights, as float64
    and correctly rounded to ``dtype``, both shaped (batch, n_q, n_kv).

    A reference whose mean is too close to a rounding boundary is recomputed with more digits,
    and the recomputed one is returned in its place.
    """
    from ..numeric.reference import compute_reference

    nearest_all, rounded_all, kept = [], [], []
    for reference in references:
        for _ in range(MAX_DIGIT_DOUBLINGS + 1):
            result = _rounded_mean(reference, dtype)
            if result is not None:
                break
            reference = compute_reference(reference.problem, 2 * reference.digits, engine=reference.engine)
        else:
            raise EvaluationError(
                f"the mean over heads of the attention weights lies on a {dtype} rounding "
                f"boundary even at {reference.digits} digits, so it cannot be rounded correctly"
            )
        kept.append(reference)
        nearest_all.append(result[0])
        rounded_all.append(result[1])
    return kept, np.array(nearest_all), np.array(rounded_all)


def _rounded_mean(reference, dtype: str) -> tuple[np.ndarray, np.ndarray] | None:
    means, bounds = mean_over_heads(reference)
    nearest = np.empty((len(means), len(means[0])))
    rounded = np.empty_like(nearest)
    for i, (mean_row, bound_row) in enumerate(zip(means, bounds)):
        for j, (mean, bound) in enumerate(zip(mean_row, bound_row)):
            if mean is None:
                nearest[i, j] = rounded[i, j] = np.nan
                continue
            for target, out in (("float64", nearest), (dtype, rounded)):
                low = round_fraction(mean - bound, target)
                high = round_fraction(mean + bound, target)
                if low != high:
                    return None
                out[i, j] = low
    return nearest, rounded


def _overflow_notes(references: list, dtype: str, batched: bool) -> list[str]:
    notes = []
    for batch, reference in enumerate(references):
        prefix = f"batch {batch}, " if batched else ""
        notes.extend(prefix + note for note in overflow_notes(reference, dtype))
    return notes


def _diagnoses(problems, stages, actual, batched, dtype) -> list[Diagnosis]:
    """Replay the known mistakes for each failed stage, on the batch element of its worst entry."""
    stage_keys = {"output": "output", "attention weights": "weights", "head outputs": "head_outputs"}
    found: list[Diagnosis] = []
    for stage in stages:
        key = stage_keys.get(stage.name)
        if key is None or stage.passed or stage.worst is None:
            continue  # weights averaged over heads have no per-head replay
        batch = stage.worst.index[0] if batched else 0
        found += diagnose(problems[batch], actual[key][batch], dtype=dtype, stage=key)
    return found
