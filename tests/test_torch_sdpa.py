"""torch 2.13's scaled_dot_product_attention against the certified reference.

Measured on one x86 CPU over 10 seeds of the grouped-query calls below: the per-head outputs are
within 2.8 eps·max|r| normwise in float64 and 2.0 in float32, while single entries that come from
cancellation are off by up to a few thousand of their own ULPs. The bound asserted below leaves a
margin over those measurements.
"""

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import symattn.torch as st
from symattn.errors import InvalidInputError, MaskError, ShapeError, UnsupportedError

sdpa = F.scaled_dot_product_attention
OUTPUT_NORMWISE_BOUND = 8.0  # in units of eps·max|r|


def grouped_inputs(dtype, seed: int):
    torch.manual_seed(seed)
    query = torch.randn(2, 4, 5, 8, dtype=dtype)  # (N, Hq, L, E)
    key = torch.randn(2, 2, 7, 8, dtype=dtype)  # (N, Hkv, S, E)
    value = torch.randn(2, 2, 7, 3, dtype=dtype)  # (N, Hkv, S, Ev)
    return query, key, value


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"is_causal": True},
        {"scale": 0.25},
        {"bool_mask": True},
        {"float_mask": True},
    ],
)
def test_sdpa_grouped_query_within_bounds(dtype, options):
    query, key, value = grouped_inputs(dtype, seed=1)
    arguments = {key_: v for key_, v in options.items() if key_ in ("is_causal", "scale")}
    if options.get("bool_mask"):
        allowed = torch.rand(2, 1, 5, 7) > 0.4
        allowed[..., 0] = True  # every query may attend to key 0
        arguments["attn_mask"] = allowed
    if options.get("float_mask"):
        arguments["attn_mask"] = torch.randn(5, 7, dtype=dtype)
    report = st.verify(sdpa, query, key, value, enable_gqa=True, ulps=1e9, **arguments)
    (heads,) = report.stages
    assert heads.name == "head outputs"
    assert heads.shape == (2, 4, 5, 3)
    assert heads.normwise_error <= OUTPUT_NORMWISE_BOUND
    assert heads.nan_count == 0


def test_sdpa_reference_layout_matches_pytorch():
    query, key, value = grouped_inputs(torch.float32, seed=2)
    reference = st.reference(sdpa, query, key, value, enable_gqa=True)
    actual = sdpa(query, key, value, enable_gqa=True)
    assert reference.shape == actual.shape == (2, 4, 5, 3)
    assert reference.dtype == torch.float32
    assert torch.allclose(reference, actual, atol=1e-5)


def test_sdpa_three_dimensional_inputs():
    torch.manual_seed(3)
    query, key, value = torch.randn(3, 4, 6), torch.randn(3, 5, 6), torch.randn(3, 5, 2)
    reference = st.reference(sdpa, query, key, value)
    assert reference.shape == (3, 4, 2)
    report = st.verify(sdpa, query, key, value, ulps=1e9)
    assert report.stages[0].normwise_error <= OUTPUT_NORMWISE_BOUND


def test_sdpa_bfloat16():
    query, key, value = (t.to(torch.bfloat16) for t in grouped_inputs(torch.float32, seed=4))
    reference = st.reference(sdpa, query, key, value, enable_gqa=True)
    assert reference.dtype == torch.bfloat16
    report = st.verify(sdpa, query, key, value, enable_gqa=True, ulps=1e9)
    assert report.dtype == "bfloat16"
    assert report.stages[0].normwise_error <= OUTPUT_NORMWISE_BOUND


# Semantics worked out by hand: with one visible key, a query's output is that key's value.

V3 = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
Q2 = torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=torch.float64)
K3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)


def test_sdpa_causal_is_top_left():
    # L = 2 queries, S = 3 keys: query 0 may attend to key 0 only (top-left alignment), not to
    # keys 0 and 1 (bottom-right alignment).
    output = st.reference(sdpa, Q2, K3, V3, is_causal=True)
    assert output[0].tolist() == [1.0, 2.0]


def test_sdpa_bool_mask_true_attends():
    only_key2 = torch.tensor([[False, False, True], [True, True, True]])
    output = st.reference(sdpa, Q2, K3, V3, attn_mask=only_key2)
    assert output[0].tolist() == [5.0, 6.0]


def test_sdpa_float_mask_is_added():
    # Logits of query 0 are 0.5·[1, 0, 1]/√2; adding [0, ln 2, 0] to them weighs key 1 twice.
    with mpmath.workdps(40):
        s = mpmath.mpf(1) / (2 * mpmath.sqrt(2))
        weights = [mpmath.exp(s), 2, mpmath.exp(s)]
        total = sum(weights)
        expected = [float(sum(w * v for w, v in zip(weights, column)) / total) for column in ([1, 3, 5], [2, 4, 6])]
    log2 = float(mpmath.log(2))
    bias = torch.tensor([[0.0, log2, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    output = st.reference(sdpa, Q2, K3, V3, attn_mask=bias)
    # ln 2 enters as its float64 value, so the weight of key 1 is 2 only to about 1e-16.
    assert output[0].tolist() == pytest.approx(expected, rel=1e-15)


def test_sdpa_empty_row_pytorch_gives_zeros():
    nothing_for_row1 = torch.tensor([[True, True, True], [False, False, False]])
    with pytest.raises(MaskError, match="query rows 1"):
        st.reference(sdpa, Q2, K3, V3, attn_mask=nothing_for_row1)
    report = st.verify(sdpa, Q2, K3, V3, attn_mask=nothing_for_row1, masked_rows="zeros", ulps=4)
    assert report.passed


def test_sdpa_mask_and_causal_rejected():
    with pytest.raises(InvalidInputError, match="not both"):
        st.reference(sdpa, Q2, K3, V3, attn_mask=torch.ones(2, 3, dtype=torch.bool), is_causal=True)


def test_sdpa_dropout_rejected():
    with pytest.raises(UnsupportedError, match="dropout_p"):
        st.reference(sdpa, Q2, K3, V3, dropout_p=0.1)


def test_sdpa_gqa_heads_must_divide():
    query = torch.randn(1, 3, 2, 4)
    key = torch.randn(1, 2, 2, 4)
    with pytest.raises(ShapeError, match="multiple"):
        st.reference(sdpa, query, key, key, enable_gqa=True)


def test_sdpa_heads_mismatch_without_gqa():
    query = torch.randn(1, 4, 2, 4)
    key = torch.randn(1, 2, 2, 4)
    with pytest.raises(ShapeError, match="enable_gqa"):
        st.reference(sdpa, query, key, key)


def test_unknown_callable_rejected():
    with pytest.raises(UnsupportedError, match="MultiheadAttention"):
        st.reference(torch.matmul, Q2, K3, V3)


# QKᵀ overflowing float16 before the scale: d_k = 6, q = [105]*6, two keys equal to q,
# V = [[1], [3]]. Both logits are equal, so the output is exactly (1 + 3)/2 = 2. The unscaled
# dot product is 6·105² = 66150 > 65504, while the scaled logit 66150/√6 = 11025√6 fits.

Q_HALF = torch.full((1, 6), 105.0, dtype=torch.float16)
K_HALF = torch.full((2, 6), 105.0, dtype=torch.float16)
V_HALF = torch.tensor([[1.0], [3.0]], dtype=torch.float16)


def test_fp16_overflow_output_exactly_two():
    output = st.reference(sdpa, Q_HALF, K_HALF, V_HALF)
    assert output.dtype == torch.float16
    assert output.tolist() == [[2.0]]


def test_fp16_overflow_note():
    with mpmath.workdps(40):
        scaled = mpmath.nstr(11025 * mpmath.sqrt(6), 20)
    assert scaled == "27005.624414184538533"
    report = st.verify(sdpa, Q_HALF, K_HALF, V_HALF, ulps=0)
    assert report.passed  # PyTorch's CPU kernel keeps float16 intermediates in float32
    (note,) = report.notes
    assert "66150" in note
    assert "65504" in note
    assert scaled in note


def test_fp16_naive_implementation_reported():
    # Q Kᵀ formed in float16 before the scale overflows to inf, and the softmax of inf is NaN.
    logits = (Q_HALF @ K_HALF.T) / np.sqrt(6.0)
    naive = torch.softmax(logits.float(), dim=-1).half() @ V_HALF
    assert torch.isnan(naive).all()
    report = st.verify(sdpa, Q_HALF, K_HALF, V_HALF, actual=naive, ulps=4)
    assert not report.passed
    assert report.stages[0].nan_count == 1
    assert "66150" in report.notes[0]
