"""Naming known mistakes: each buggy implementation below is written out by hand in NumPy or
PyTorch, and the diagnosis must name its mistake and no other."""

import math

import mpmath
import numpy as np
import pytest
import torch

from symattn import AttentionSpec, Mask
from symattn.problem import Problem
from symattn.verify.diagnose import diagnose

# Scale 1/√d_model instead of 1/√d_k: d_model = 4, h = 2 (d_k = 2). Head 0 has q = [1, 1],
# keys [1, 1] and [1, −1] and values 1 and 0. Head 1 has zero inputs, so its output is 0 at any scale.
SCALE_CASE = {
    "Q": [[1, 1, 0, 0]],
    "K": [[1, 1, 0, 0], [1, -1, 0, 0]],
    "V": [[1, 0], [0, 0]],
}
RIGHT_VALUE = "0.80442968250695690519"  # e^√2 / (1 + e^√2), the scale 1/√2
SQRT_D_MODEL_VALUE = "0.73105857863000487925"  # e / (1 + e), the scale 1/√4


def scale_problem() -> Problem:
    return Problem.from_arrays(spec=AttentionSpec(heads=2), direct=True, **SCALE_CASE)


def test_scale_case_values_by_mpmath():
    with mpmath.workdps(30):
        right = mpmath.exp(mpmath.sqrt(2)) / (1 + mpmath.exp(mpmath.sqrt(2)))
        wrong = mpmath.e / (1 + mpmath.e)
        assert mpmath.nstr(right, 20) == RIGHT_VALUE
        assert mpmath.nstr(wrong, 20) == SQRT_D_MODEL_VALUE


def test_diagnose_scale_sqrt_d_model():
    actual = np.array([[float(SQRT_D_MODEL_VALUE), 0.0]])
    found = diagnose(scale_problem(), actual, dtype="float64")
    assert [d.mistake for d in found] == ["scale_sqrt_d_model"]
    assert "1/√d_model = 1/√4" in found[0].description
    assert "1/√d_k = 1/√2" in found[0].description
    assert found[0].distance < 1e-15
    assert found[0].right_distance == pytest.approx(float(RIGHT_VALUE) - float(SQRT_D_MODEL_VALUE))


def test_diagnose_right_output_names_nothing():
    actual = np.array([[float(RIGHT_VALUE), 0.0]])
    assert diagnose(scale_problem(), actual, dtype="float64") == []


def random_problem(seed: int, heads: int = 2, mask=None) -> tuple[Problem, dict]:
    generator = np.random.default_rng(seed)
    arrays = {
        "Q": generator.standard_normal((4, 6)),
        "K": generator.standard_normal((5, 6)),
        "V": generator.standard_normal((5, 4)),
    }
    masks = () if mask is None else (mask,)
    spec = AttentionSpec(heads=heads, masks=masks, masked_rows="nan")
    return Problem.from_arrays(spec=spec, direct=True, **arrays), arrays


def heads_first(matrix: torch.Tensor, heads: int) -> torch.Tensor:
    rows, width = matrix.shape
    return matrix.view(rows, heads, width // heads).transpose(0, 1)  # (h, n, d)


def buggy_attention(arrays: dict, heads: int, *, scale=None, softmax_dim=-1, plain_split=False,
                    plain_merge=False, average=False, keep=None) -> np.ndarray:
    """Multi-head attention in PyTorch, float64, with one switchable mistake."""
    Q, K, V = (torch.tensor(arrays[name]) for name in ("Q", "K", "V"))
    d_k = Q.shape[1] // heads
    if plain_split:
        q = Q.reshape(heads, Q.shape[0], d_k)
        k = K.reshape(heads, K.shape[0], d_k)
        v = V.reshape(heads, V.shape[0], V.shape[1] // heads)
    else:
        q, k, v = heads_first(Q, heads), heads_first(K, heads), heads_first(V, heads)
    logits = q @ k.transpose(1, 2) * (1 / math.sqrt(d_k) if scale is None else scale)
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(logits, dim=softmax_dim)
    if average:
        weights = weights.mean(dim=0, keepdim=True).expand_as(weights)
    out = weights @ v  # (h, n_q, d_v)
    if plain_merge:
        return out.reshape(out.shape[1], -1).numpy()
    return out.transpose(0, 1).reshape(out.shape[1], -1).numpy()


@pytest.mark.parametrize(
    "options, mistake",
    [
        ({"scale": 1.0}, "scale_one"),
        ({"scale": 1 / math.sqrt(6)}, "scale_sqrt_d_model"),
        ({"softmax_dim": 1}, "softmax_over_queries"),
        ({"plain_split": True}, "heads_split_reshape"),
        ({"plain_merge": True}, "heads_merged_reshape"),
        ({"plain_split": True, "plain_merge": True}, "heads_split_and_merged_reshape"),
        ({"average": True}, "weights_averaged_over_heads"),
    ],
)
def test_diagnose_names_buggy_torch_attention(options, mistake):
    problem, arrays = random_problem(seed=3)
    actual = buggy_attention(arrays, 2, **options)
    found = diagnose(problem, actual, dtype="float64")
    assert [d.mistake for d in found] == [mistake]


def test_diagnose_right_torch_attention_names_nothing():
    problem, arrays = random_problem(seed=3)
    assert diagnose(problem, buggy_attention(arrays, 2), dtype="float64") == []


def test_diagnose_noise_names_nothing():
    problem, arrays = random_problem(seed=4)
    actual = buggy_attention(arrays, 2) + np.random.default_rng(0).standard_normal((4, 4)) * 1e-3
    assert diagnose(problem, actual, dtype="float64") == []


def test_diagnose_flipped_mask_polarity():
    # The case states a block mask (True = hidden), as nn.MultiheadAttention reads it. Passing
    # the same booleans to scaled_dot_product_attention, which reads True as "may attend",
    # flips the polarity.
    block = np.array([[False, True, True, False, False]] * 4)
    problem, arrays = random_problem(seed=5, mask=Mask.block(block))
    q, k, v = (torch.tensor(arrays[name]).view(-1, 2, arrays[name].shape[1] // 2).transpose(0, 1)
               for name in ("Q", "K", "V"))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.tensor(block))
    actual = out.transpose(0, 1).reshape(4, -1).numpy()
    found = diagnose(problem, actual, dtype="float64")
    assert [d.mistake for d in found] == ["mask_polarity_flipped"]


def test_diagnose_float32_implementation():
    problem, arrays = random_problem(seed=6)
    arrays32 = {name: value.astype(np.float32) for name, value in arrays.items()}
    problem = Problem.from_arrays(spec=problem.spec, direct=True, **arrays32)
    actual = buggy_attention({n: a.astype(np.float64) for n, a in arrays32.items()}, 2, softmax_dim=1)
    found = diagnose(problem, actual.astype(np.float32), dtype="float32")
    assert [d.mistake for d in found] == ["softmax_over_queries"]


def test_diagnose_weights_stage_averaged():
    problem, arrays = random_problem(seed=7)
    q, k = (heads_first(torch.tensor(arrays[name]), 2) for name in ("Q", "K"))
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(3), dim=-1)
    averaged = weights.mean(dim=0, keepdim=True).expand_as(weights).numpy()
    found = diagnose(problem, averaged, dtype="float64", stage="weights")
    assert [d.mistake for d in found] == ["weights_averaged_over_heads"]
