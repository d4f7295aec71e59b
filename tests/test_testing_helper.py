"""The pytest helper assert_attention_close."""

import json

import mpmath
import numpy as np
import pytest
import torch

from symattn import AttentionSpec
from symattn.numeric.reference import compute_reference
from symattn.problem import Problem
from symattn.testing import assert_attention_close

# One query over two keys with scores 1/√2 and 0: the output is (2c + 4)/(1 + c) with c = e^{1/√2}.
with mpmath.workdps(40):
    C = mpmath.exp(1 / mpmath.sqrt(2))
    OUTPUT = (2 * C + 4) / (1 + C)
OUTPUT_FLOAT64 = float(OUTPUT)  # mpmath rounds correctly at 40 digits


def problem() -> Problem:
    return Problem.from_arrays(spec=AttentionSpec(), direct=True, Q=[[1, 0], [0, 0]], K=[[1, 0], [0, 1]],
                               V=[[2, 1], [4, 1]])


def test_close_passes_exact_float64():
    actual = np.array([[OUTPUT_FLOAT64, 1.0], [3.0, 1.0]])
    assert_attention_close(actual, problem(), ulps=0)


def test_close_failure_lists_worst_entries():
    actual = np.array([[OUTPUT_FLOAT64, 1.0], [3.0, 1.0]])
    actual[0, 0] = np.nextafter(np.nextafter(OUTPUT_FLOAT64, 4.0), 4.0)  # two ULPs up
    actual[1, 1] = np.nextafter(1.0, 2.0)  # one ULP up
    with pytest.raises(AssertionError) as failure:
        assert_attention_close(actual, problem(), ulps=0.5)
    lines = str(failure.value).splitlines()
    assert lines[0].startswith("output: 2 of 4 entries outside 0.5 ULPs (max 2 ULPs")
    assert lines[1] == f"  query 0, feature 0: actual {float(actual[0, 0])!r}, reference {OUTPUT_FLOAT64!r}, 2 ULPs"
    assert lines[2] == f"  query 1, feature 1: actual {float(actual[1, 1])!r}, reference 1.0, 1 ULPs"


def test_close_accepts_torch_float32():
    reference = compute_reference(problem(), 30)
    actual = torch.from_numpy(reference.stages["output"].rounded("float32"))
    assert_attention_close(actual, reference, ulps=0)


def test_close_rtol_atol():
    actual = np.array([[2.66, 1.0], [3.0, 1.0]])
    assert_attention_close(actual, problem(), rtol=1e-3, atol=0.0)
    with pytest.raises(AssertionError, match="1 of 4 entries"):
        assert_attention_close(actual, problem(), rtol=1e-5, atol=0.0)


def test_close_bfloat16_tensor():
    reference = compute_reference(problem(), 30)
    actual = torch.from_numpy(reference.stages["output"].rounded("bfloat16")).to(torch.bfloat16)
    assert_attention_close(actual, reference, ulps=0)


def test_close_reads_case_file(tmp_path):
    path = tmp_path / "case.npz"
    np.savez(path, spec=json.dumps({"heads": 1}), Q=np.array([[1.0, 0.0], [0.0, 0.0]]),
             K=np.eye(2), V=np.array([[2.0, 1.0], [4.0, 1.0]]))
    assert_attention_close(np.array([[OUTPUT_FLOAT64, 1.0], [3.0, 1.0]]), path, ulps=0)


def test_close_nan_is_reported():
    actual = np.array([[np.nan, 1.0], [3.0, 1.0]])
    with pytest.raises(AssertionError, match="query 0, feature 0: actual nan"):
        assert_attention_close(actual, problem(), ulps=4)
