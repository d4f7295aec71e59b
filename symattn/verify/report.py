"""The verification report: per-stage errors, notes, diagnoses and a verdict, as a table or JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from .diagnose import Diagnosis
from .floats import binary_format, eps
from .forward import hidden_and_bias
from .metrics import StageComparison, Tolerance

FORMAT = "symattn-verification/1"


@dataclass(frozen=True)
class Report:
    """The result of verifying an implementation against a certified reference.

    ``stages`` contains one comparison per compared stage, the output first. ``notes`` explain
    findings that are not errors by themselves (a float16 overflow risk, where a NaN came from).
    ``diagnoses`` name the known mistakes that a mismatch fits.
    """

    dtype: str
    tolerance: Tolerance
    digits: int
    engine: str
    stages: tuple[StageComparison, ...]
    notes: tuple[str, ...] = ()
    diagnoses: tuple[Diagnosis, ...] = ()

    @property
    def passed(self) -> bool:
        return all(stage.passed for stage in self.stages)

    def stage(self, name: str) -> StageComparison:
        """Return the comparison of the stage called ``name``."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}; the report has {', '.join(s.name for s in self.stages)}")

    def verdict(self) -> str:
        """Return one line such as "PASS: every entry within 4 ULPs"."""
        tolerance = self.tolerance.describe()
        if self.passed:
            return f"PASS: every entry within {tolerance}"
        failing = [
            f"{stage.failing_count} of {stage.entry_count} {stage.name} entries"
            for stage in self.stages
            if not stage.passed
        ]
        return f"FAIL: {', '.join(failing)} outside {tolerance}"

    def to_dict(self) -> dict:
        """Return the report as JSON-ready data; NaN and infinities become "nan", "inf", "-inf"."""
        data = {
            "format": FORMAT,
            "passed": self.passed,
            "verdict": self.verdict(),
            "dtype": self.dtype,
            "eps": eps(self.dtype),
            "tolerance": self.tolerance.to_dict(),
            "reference": {"digits": self.digits, "engine": self.engine},
            "stages": [stage.to_dict() for stage in self.stages],
            "notes": list(self.notes),
            "diagnoses": [diagnosis.to_dict() for diagnosis in self.diagnoses],
        }
        return _json_safe(data)

    def to_json(self) -> str:
        """Return the report as JSON text with a final newline."""
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False, allow_nan=False) + "\n"

    def to_table(self) -> str:
        """Return the report as a plain-text table, one row per stage, then details."""
        lines = [
            f"{self.dtype} implementation against the certified reference "
            f"({self.digits} digits, engine {self.engine})",
            f"tolerance: {self.tolerance.describe()}",
            f"normwise error is max|a − r| in units of eps·max|r|, eps = {eps(self.dtype):.3g}",
            "",
        ]
        lines.extend(_stage_table(self.stages))
        for stage in self.stages:
            if stage.passed:
                continue
            lines.append("")
            lines.append(f"worst entries of {stage.name}:")
            for entry in stage.worst_entries:
                if entry.ulp_error == 0:
                    break
                lines.append(
                    f"  {entry.location()}: actual {format_value(entry.actual, self.dtype)}, "
                    f"reference {format_value(entry.reference, self.dtype)}, {_number(entry.ulp_error)} ULPs"
                )
        if self.notes:
            lines.append("")
            lines.append("notes:")
            lines.extend(f"  - {note}" for note in self.notes)
        if self.diagnoses:
            lines.append("")
            lines.append("known mistakes that fit:")
            for diagnosis in self.diagnoses:
                lines.append(
                    f"  - {diagnosis.stage}: {diagnosis.description} (max difference "
                    f"{_number(diagnosis.distance)} from that mistake, "
                    f"{_number(diagnosis.right_distance)} from the right values)"
                )
        lines.append("")
        lines.append(f"verdict: {self.verdict()}")
        return "\n".join(lines) + "\n"


_COLUMNS = ("stage", "shape", "max abs", "max rel", "max ULPs", "normwise", "NaN", "Inf", "failing", "worst entry")


def _stage_table(stages: tuple[StageComparison, ...]) -> list[str]:
    rows = [_COLUMNS]
    for stage in stages:
        rows.append((
            stage.name,
            "(" + ", ".join(map(str, stage.shape)) + ")",
            _number(stage.max_abs_error),
            _number(stage.max_rel_error),
            _number(stage.max_ulp_error),
            _number(stage.normwise_error),
            str(stage.nan_count),
            str(stage.inf_count),
            str(stage.failing_count),
            stage.worst.location() if stage.worst is not None and stage.worst.ulp_error > 0 else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _number(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    if value == 0:
        return "0"
    return f"{value:.3g}"


def format_value(value: float, dtype: str) -> str:
    """Format a value with the fewest digits that identify it in ``dtype``."""
    if dtype in ("float16", "float32"):
        return str(getattr(np, dtype)(value))
    return repr(float(value))


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def overflow_notes(reference, dtype: str) -> list[str]:
    """Note each head whose unscaled logits Q_i K_iᵀ overflow ``dtype`` while the scaled ones fit.

    An implementation that forms Q Kᵀ in float16 and scales afterwards gets inf there, then NaN
    from the softmax, although every scaled logit is representable.
    """
    fmt = binary_format(dtype)
    notes = []
    for head in range(reference.problem.heads):
        unscaled = reference.stages[f"Z_{head}"]
        scaled = reference.stages[f"Z_scaled_{head}"]
        unscaled_values = np.abs(unscaled.midpoints())
        scaled_values = np.abs(scaled.midpoints())
        if np.max(unscaled_values) <= fmt.max_finite or np.max(scaled_values) > fmt.max_finite:
            continue
        query, key = (int(i) for i in np.unravel_index(np.argmax(unscaled_values), unscaled_values.shape))
        unscaled_text = unscaled.decimals(20)[query][key]
        scaled_text = scaled.decimals(20)[query][key]
        notes.append(
            f"head {head}: the unscaled dot product Q_{head} K_{head}ᵀ at (query {query}, key {key}) is "
            f"{unscaled_text}, above the {dtype} maximum {fmt.max_finite:g}, while the scaled logit "
            f"{scaled_text} fits. An implementation that multiplies in {dtype} before scaling gets "
            f"inf there; scale Q before the product or accumulate in float32."
        )
    return notes


def nan_leak_notes(
    problems: list,
    actual_output: np.ndarray,
    reference_output: np.ndarray,
    head_nan: np.ndarray | None,
    batched: bool,
) -> list[str]:
    """Explain NaN in the output where the reference is finite: which rows and columns, and
    which heads it came from.

    ``actual_output`` and ``reference_output`` have a leading batch axis; ``head_nan``, when
    intermediates were given, flags (batch, head, query) positions whose head result is NaN.
    """
    notes = []
    unexpected = np.isnan(actual_output) & ~np.isnan(reference_output)
    for batch, problem in enumerate(problems):
        rows = np.flatnonzero(unexpected[batch].any(axis=-1))
        if rows.size == 0:
            continue
        width = actual_output.shape[-1]
        columns = np.flatnonzero(unexpected[batch][rows].any(axis=0))
        where = f"batch {batch}, " if batched else ""
        column_text = (
            f"every output column ({width} of {width})"
            if columns.size == width
            else f"output columns {_list(columns)}"
        )
        text = (
            f"{where}query rows {_list(rows)}: the output is NaN in {column_text} where the "
            f"reference is finite."
        )
        text += " " + _nan_source(problem, rows, None if head_nan is None else head_nan[batch])
        notes.append(text)
    return notes


def _nan_source(problem, rows: np.ndarray, head_nan: np.ndarray | None) -> str:
    heads = problem.heads
    if head_nan is not None:
        source = head_nan[:, rows].any(axis=1)
        origin = "the given per-head result is NaN in these query rows"
    else:
        hidden, _ = hidden_and_bias(problem.spec, heads, problem.n_q, problem.n_kv)
        source = hidden.all(axis=-1)[:, rows].any(axis=1)
        origin = "no visible key for these query rows, and a softmax over no keys is 0/0"
    source_heads = np.flatnonzero(source)
    if source_heads.size == 0:
        return "No head has a fully masked query row here, so the NaN starts inside the computation."
    label = "Head" if source_heads.size == 1 else "Heads"
    text = f"{label} {_list(source_heads)}: {origin}; the reference follows masked_rows={problem.spec.masked_rows!r}."
    if "W_O" in problem.inputs and source_heads.size < heads:
        text += (
            f" The output projection W_O mixes every head into every output column, so the NaN "
            f"leaks from {label.lower()} {_list(source_heads)} into the columns of the other heads too."
        )
    return text


def _list(values) -> str:
    return ", ".join(str(int(v)) for v in values)
