"""A pytest helper that asserts an attention implementation's output is close to the reference.

>>> import numpy as np
>>> from symattn import AttentionSpec
>>> from symattn.problem import Problem
>>> problem = Problem.from_arrays(spec=AttentionSpec(), direct=True, Q=[[1, 0]], K=[[1, 0], [0, 1]], V=[[2], [4]])
>>> assert_attention_close(np.array([[2.6604769013466862]]), problem, ulps=0)
>>> assert_attention_close(np.array([[2.66]]), problem, ulps=1)
Traceback (most recent call last):
...
AssertionError: output: 1 of 1 entries outside 1 ULPs (max 1.07e+12 ULPs, max abs error 0.000477)
  query 0, feature 0: actual 2.66, reference 2.6604769013466862, 1.07e+12 ULPs
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .verify.check import DEFAULT_DIGITS, verify
from .verify.metrics import Tolerance
from .verify.report import format_value

# How many of the worst entries a failure message lists.
LISTED_ENTRIES = 5


def assert_attention_close(
    actual: Any,
    reference_or_case: Any,
    *,
    ulps: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    dtype: object = None,
    digits: int = DEFAULT_DIGITS,
) -> None:
    """Raise AssertionError unless ``actual`` is within tolerance of the reference output.

    ``reference_or_case`` is a Problem, a Reference, a loaded Case, or the path of a case file.
    ``actual`` is the implementation's output, (n_q, d_out), as a NumPy array or a torch tensor.
    The tolerance is ``ulps``, or ``rtol`` and ``atol``, or torch.testing's default for the dtype.
    The failure message lists the worst entries: index, actual value, reference value and ULPs.
    """
    reference = reference_or_case
    if isinstance(reference, (str, Path)):
        from .verify.cases import load_case

        reference = load_case(reference)
    if hasattr(reference, "source") and hasattr(reference, "problem") and not hasattr(reference, "stages"):
        dtype = dtype or reference.dtype
        reference = reference.problem
    array, dtype = _as_array(actual, dtype)
    tolerance = None
    if ulps is not None or rtol is not None or atol is not None:
        tolerance = Tolerance(ulps=ulps, rtol=rtol, atol=atol)

    report = verify(reference, array, dtype=dtype, tolerance=tolerance, digits=digits, name_mistakes=False)
    stage = report.stage("output")
    if stage.passed:
        return
    lines = [
        f"output: {stage.failing_count} of {stage.entry_count} entries outside "
        f"{stage.tolerance.describe()} (max {stage.max_ulp_error:.3g} ULPs, max abs error "
        f"{stage.max_abs_error:.3g})"
    ]
    for entry in stage.worst_entries[:LISTED_ENTRIES]:
        if entry.ulp_error == 0:
            break
        lines.append(
            f"  {entry.location()}: actual {format_value(entry.actual, report.dtype)}, reference "
            f"{format_value(entry.reference, report.dtype)}, {entry.ulp_error:.3g} ULPs"
        )
    lines.extend(f"  note: {note}" for note in report.notes)
    raise AssertionError("\n".join(lines))


def _as_array(actual: Any, dtype: object) -> tuple[np.ndarray, object]:
    if type(actual).__module__.startswith("torch"):
        import torch

        if actual.dtype == torch.bfloat16:
            return actual.detach().float().cpu().numpy(), dtype or "bfloat16"
        return actual.detach().cpu().numpy(), dtype
    return np.asarray(actual), dtype
