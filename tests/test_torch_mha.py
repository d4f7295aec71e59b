"""torch 2.13's nn.MultiheadAttention against the certified reference.

Expected values of the small cases are closed forms evaluated here with plain mpmath. The measured errors of PyTorch
(10 seeds of the cross-attention module below, on one x86 CPU): the output is within 1.1
eps·max|r| normwise in float64 and float32; the attention weights within 10 ULPs in float64 and
21 ULPs in float32. Entries of the output that come from cancellation are off by hundreds of
their own ULPs, which is why the output bound is normwise. The bounds asserted below leave a
margin over those measurements.
"""

from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch

import symattn.torch as st
from symattn.errors import MaskError, ShapeError
from symattn.numeric.reference import compute_reference
from symattn.verify import mean_over_heads

OUTPUT_NORMWISE_BOUND = 8.0  # in units of eps·max|r|
WEIGHT_ULP_BOUND = {torch.float64: 32, torch.float32: 64}

with mpmath.workdps(40):
    E = +mpmath.e  # the unary plus evaluates the constant at 40 digits
    C = mpmath.exp(1 / mpmath.sqrt(2))  # e^{1/√2}


@pytest.fixture(autouse=True)
def forty_digits():
    with mpmath.workdps(40):
        yield


def digits20(value) -> str:
    return mpmath.nstr(value, 20, strip_zeros=False)


def cross_attention_module(dtype, seed: int, **options) -> torch.nn.MultiheadAttention:
    torch.manual_seed(seed)
    module = torch.nn.MultiheadAttention(8, 2, kdim=6, vdim=3, dtype=dtype, **options)
    with torch.no_grad():
        module.in_proj_bias.normal_()
        module.out_proj.bias.normal_()
    return module


def cross_attention_inputs(dtype, batch_first: bool):
    shape = (lambda n, width: (2, n, width)) if batch_first else (lambda n, width: (n, 2, width))
    query = torch.randn(shape(5, 8), dtype=dtype)
    key = torch.randn(shape(7, 6), dtype=dtype)
    value = torch.randn(shape(7, 3), dtype=dtype)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, 6] = True
    padding[1, :2] = True
    bias = torch.randn(5, 7, dtype=dtype)
    bias = bias.masked_fill(bias > 1.0, float("-inf"))
    return query, key, value, padding, bias


def additive(padding: torch.Tensor, dtype) -> torch.Tensor:
    """The float form of a bool key padding mask, to go with a float attention mask."""
    return torch.zeros(padding.shape, dtype=dtype).masked_fill(padding, float("-inf"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_cross_attention_within_bounds(dtype, batch_first):
    module = cross_attention_module(dtype, seed=1, batch_first=batch_first)
    query, key, value, padding, bias = cross_attention_inputs(dtype, batch_first)
    report = st.verify(module, query, key, value, key_padding_mask=additive(padding, dtype),
                       attn_mask=bias, average_attn_weights=False, ulps=1e9)
    output, weights = report.stages
    assert output.shape == (2, 5, 8)
    assert output.normwise_error <= OUTPUT_NORMWISE_BOUND
    assert weights.name == "attention weights"
    assert weights.shape == (2, 2, 5, 7)
    assert weights.max_ulp_error <= WEIGHT_ULP_BOUND[dtype]
    assert output.nan_count == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mha_cross_attention_passes_stated_tolerance(dtype):
    module = cross_attention_module(dtype, seed=2)
    query, key, value, padding, _ = cross_attention_inputs(dtype, batch_first=False)
    eps = torch.finfo(dtype).eps
    reference_output, _ = st.reference(module, query, key, value, key_padding_mask=padding)
    floor = OUTPUT_NORMWISE_BOUND * eps * float(reference_output.abs().max())
    report = st.verify(module, query, key, value, key_padding_mask=padding, ulps=16, atol=floor)
    assert report.passed
    assert report.stage("attention weights (mean over heads)").shape == (2, 5, 7)


def test_mha_sdpa_path_within_bounds():
    # need_weights=False sends nn.MultiheadAttention through scaled_dot_product_attention.
    module = cross_attention_module(torch.float32, seed=3)
    query, key, value, padding, _ = cross_attention_inputs(torch.float32, batch_first=False)
    report = st.verify(module, query, key, value, key_padding_mask=padding, need_weights=False, ulps=1e9)
    assert len(report.stages) == 1
    assert report.stages[0].normwise_error <= OUTPUT_NORMWISE_BOUND


def test_mha_bias_kv_and_zero_attention():
    module = cross_attention_module(torch.float64, seed=4, add_bias_kv=True, add_zero_attn=True)
    query, key, value, padding, bias = cross_attention_inputs(torch.float64, batch_first=False)
    report = st.verify(module, query, key, value, key_padding_mask=additive(padding, torch.float64),
                       attn_mask=bias, average_attn_weights=False, ulps=1e9)
    output, weights = report.stages
    assert weights.shape == (2, 2, 5, 9)  # two more keys: bias_k, then the zero key
    assert output.normwise_error <= OUTPUT_NORMWISE_BOUND
    assert weights.max_ulp_error <= WEIGHT_ULP_BOUND[torch.float64]


def test_mha_packed_weights_with_three_d_mask():
    torch.manual_seed(5)
    module = torch.nn.MultiheadAttention(8, 2, dtype=torch.float64)
    x = torch.randn(4, 3, 8, dtype=torch.float64)  # (L, N, E)
    blocked = torch.rand(3 * 2, 4, 4) > 0.6
    blocked[..., 0] = False  # every query keeps key 0
    padding = torch.tensor([[False, False, False, True]] * 3)
    report = st.verify(module, x, x, x, key_padding_mask=padding, attn_mask=blocked,
                       average_attn_weights=False, ulps=1e9)
    assert report.stages[0].normwise_error <= OUTPUT_NORMWISE_BOUND
    assert report.stages[1].max_ulp_error <= WEIGHT_ULP_BOUND[torch.float64]


def test_mha_reference_layout_matches_pytorch():
    module = cross_attention_module(torch.float32, seed=6)
    query, key, value, padding, _ = cross_attention_inputs(torch.float32, batch_first=False)
    output, weights = st.reference(module, query, key, value, key_padding_mask=padding, average_attn_weights=False)
    actual_output, actual_weights = module(query, key, value, key_padding_mask=padding, average_attn_weights=False)
    assert output.shape == actual_output.shape == (5, 2, 8)
    assert weights.shape == actual_weights.shape == (2, 2, 5, 7)
    assert output.dtype == torch.float32
    assert torch.allclose(output, actual_output, atol=1e-5)


def test_mha_reference_without_weights():
    module = cross_attention_module(torch.float64, seed=7)
    query, key, value, _, _ = cross_attention_inputs(torch.float64, batch_first=False)
    output, weights = st.reference(module, query, key, value, need_weights=False)
    assert weights is None
    assert output.shape == (5, 2, 8)


def test_mha_real_size_float32():
    # A layer-sized case: 32 queries, 48 keys, d_model 64, 4 heads.
    torch.manual_seed(8)
    module = torch.nn.MultiheadAttention(64, 4, batch_first=True)
    with torch.no_grad():
        module.in_proj_bias.normal_(std=0.1)
    query = torch.randn(1, 32, 64)
    memory = torch.randn(1, 48, 64)
    report = st.verify(module, query, memory, memory, average_attn_weights=False, ulps=1e9)
    output, weights = report.stages
    assert output.normwise_error <= OUTPUT_NORMWISE_BOUND
    assert weights.max_ulp_error <= WEIGHT_ULP_BOUND[torch.float32]
    assert report.engine == "flint"


def test_mha_dropout_in_training_rejected():
    module = torch.nn.MultiheadAttention(4, 2, dropout=0.5)
    x = torch.randn(3, 4)
    with pytest.raises(Exception, match="call module.eval"):
        st.reference(module, x, x, x)


# Cross attention with key and value inputs of other widths: d_model = 2, h = 1, kdim = 3,
# vdim = 1. The key projection keeps the first two of three features and the value
# projection maps 1 feature to [x, 0], so the values are [2, 0] and [4, 0].


def other_widths_module() -> torch.nn.MultiheadAttention:
    module = torch.nn.MultiheadAttention(2, 1, kdim=3, vdim=1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        module.q_proj_weight.copy_(torch.eye(2))
        module.k_proj_weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))  # (out, in)
        module.v_proj_weight.copy_(torch.tensor([[1.0], [0.0]]))
        module.out_proj.weight.copy_(torch.eye(2))
    return module


X_Q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
X_K = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
X_V = torch.tensor([[2.0], [4.0]], dtype=torch.float64)


def test_other_widths_output_value():
    expected = 2 * (2 + C) / (1 + C)
    assert digits20(expected) == "2.6604769013466861488"
    call = st.problems_from_call(other_widths_module(), X_Q, X_K, X_V)
    reference = compute_reference(call.problems[0], 30)
    assert reference.stages["output"].decimals(20) == [["2.6604769013466861488", "0"]]
    assert reference.stages["A_0"].decimals(20)[0] == [digits20(C / (1 + C)), digits20(1 / (1 + C))]


def test_other_widths_reference_tensor():
    output, weights = st.reference(other_widths_module(), X_Q, X_K, X_V)
    assert output.tolist() == [[float(2 * (2 + C) / (1 + C)), 0.0]]
    assert weights.tolist() == [[float(C / (1 + C)), float(1 / (1 + C))]]


def test_other_widths_pytorch_within_bounds():
    report = st.verify(other_widths_module(), X_Q, X_K, X_V, ulps=4)
    assert report.passed


def test_other_widths_value_width_names_both():
    wide_value = torch.tensor([[2.0, 0.0], [4.0, 0.0]], dtype=torch.float64)
    with pytest.raises(ShapeError, match="value has width 2 but the module declares vdim = 1"):
        st.reference(other_widths_module(), X_Q, X_K, wide_value)


# A query row that may attend to no key: X = [[1,0],[0,1],[1,1]] as query, key and value,
# key padding [F, T, T] with attention mask [[F,F,F],[T,F,F],[T,T,F]] (PyTorch's bool masks
# hide where True), so query rows 1 and 2 see no key.

X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
PADDING = torch.tensor([False, True, True])
CAUSAL_BLOCK = torch.tensor([[False, False, False], [True, False, False], [True, True, False]])


def identity_module(heads: int, out_weight=None) -> torch.nn.MultiheadAttention:
    module = torch.nn.MultiheadAttention(2, heads, bias=False, dtype=torch.float64)
    with torch.no_grad():
        module.in_proj_weight.copy_(torch.eye(2).repeat(3, 1))
        module.out_proj.weight.copy_(torch.eye(2) if out_weight is None else torch.tensor(out_weight))
    return module


def test_empty_rows_default_error_names_rows():
    with pytest.raises(MaskError, match="query rows 1, 2"):
        st.reference(identity_module(1), X, X, X, key_padding_mask=PADDING, attn_mask=CAUSAL_BLOCK)


def test_empty_rows_zeros_policy_exact():
    output, weights = st.reference(identity_module(1), X, X, X, key_padding_mask=PADDING,
                                   attn_mask=CAUSAL_BLOCK, masked_rows="zeros")
    assert output.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    assert weights.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_empty_rows_nan_policy_only_there():
    output, _ = st.reference(identity_module(1), X, X, X, key_padding_mask=PADDING,
                             attn_mask=CAUSAL_BLOCK, masked_rows="nan")
    assert output[0].tolist() == [1.0, 0.0]
    assert torch.isnan(output[1:]).all()


def test_empty_rows_pytorch_nan_shown():
    # With need_weights=True, PyTorch 2.13 returns NaN for the rows with no visible key.
    report = st.verify(identity_module(1), X, X, X, key_padding_mask=PADDING,
                       attn_mask=CAUSAL_BLOCK, masked_rows="zeros", ulps=4)
    output = report.stage("output")
    assert not report.passed
    assert output.nan_count == 4
    assert output.unexpected_nan_count == 4
    assert output.nan_positions == ((1, 0), (1, 1), (2, 0), (2, 1))
    assert "query rows 1, 2" in report.notes[0]
    assert "nan" in report.to_table()


def test_empty_rows_pytorch_matches_nan_policy():
    report = st.verify(identity_module(1), X, X, X, key_padding_mask=PADDING,
                       attn_mask=CAUSAL_BLOCK, masked_rows="nan", ulps=0)
    assert report.passed
    assert report.stage("output").nan_count == 4


# One head fully masked while the other is healthy: X as above, d_model = 2, h = 2, identity
# projections (d_k = 1, so the scale is 1), head 1 fully blocked, W_O = [[1,1],[0,1]] applied
# as concat·W_Oᵀ in PyTorch's layout.

HEAD_ONE_BLOCKED = torch.zeros(2, 3, 3, dtype=torch.bool)
HEAD_ONE_BLOCKED[1] = True
W_O_PYTORCH = [[1.0, 1.0], [0.0, 1.0]]


def test_blocked_head_values():
    head0 = 2 * E / (1 + 2 * E)
    assert digits20(head0) == "0.84463759650303639321"
    call = st.problems_from_call(identity_module(2, W_O_PYTORCH), X, X, X, attn_mask=HEAD_ONE_BLOCKED,
                                 masked_rows="zeros")
    reference = compute_reference(call.problems[0], 30)
    expected_head0 = [[digits20(head0)], ["0.66666666666666666667"], [digits20(head0)]]
    assert reference.stages["O_0"].decimals(20) == expected_head0
    assert reference.stages["O_1"].decimals(20) == [["0"], ["0"], ["0"]]
    assert reference.stages["output"].decimals(20) == [
        ["0.84463759650303639321", "0"],
        ["0.66666666666666666667", "0"],
        ["0.84463759650303639321", "0"],
    ]
    # Query 1 has three equal logits in head 0, so its head-0 output is exactly 2/3, not only to 20 digits.
    intervals = reference.stages["output"].intervals
    assert (intervals.lo[2], intervals.hi[2], intervals.den[2]) == (2, 2, 3)
    assert (intervals.lo[3], intervals.hi[3], intervals.den[3]) == (0, 0, 1)


def test_blocked_head_nan_leaks_into_every_column():
    report = st.verify(identity_module(2, W_O_PYTORCH), X, X, X, attn_mask=HEAD_ONE_BLOCKED,
                       masked_rows="zeros", average_attn_weights=False, ulps=4)
    output = report.stage("output")
    assert output.nan_count == 6  # every entry of every row, both columns
    assert "every output column (2 of 2)" in report.notes[0]
    assert "Head 1" in report.notes[0]
    assert "leaks from head 1" in report.notes[0]
    weights = report.stage("attention weights")
    assert weights.nan_positions[0] == (1, 0, 0)  # the NaN starts in head 1


def test_blocked_head_sdpa_path_gives_zeros():
    # need_weights=False goes through scaled_dot_product_attention, which returns zeros there.
    report = st.verify(identity_module(2, W_O_PYTORCH), X, X, X, attn_mask=HEAD_ONE_BLOCKED,
                       masked_rows="zeros", need_weights=False, ulps=4)
    assert report.passed


# Attention weights averaged over heads: X as above, h = 2, identity projections, no mask.

HEAD0_ROW0 = ["0.42231879825151819660", "0.15536240349696360679", "0.42231879825151819660"]
MEAN_ROW0 = ["0.37782606579242576497", "0.24434786841514847006", "0.37782606579242576497"]


def test_averaged_weights_values():
    assert [digits20(E / (1 + 2 * E)), digits20(1 / (1 + 2 * E))] == HEAD0_ROW0[:2]
    with mpmath.workdps(40):
        mean = [(E / (1 + 2 * E) + mpmath.mpf(1) / 3) / 2, (1 / (1 + 2 * E) + mpmath.mpf(1) / 3) / 2]
    assert [digits20(m) for m in mean] == MEAN_ROW0[:2]


def test_per_head_weights_unless_asked():
    _, weights = st.reference(identity_module(2), X, X, X, average_attn_weights=False)
    assert weights.shape == (2, 3, 3)
    assert weights[0, 0].tolist() == [float(w) for w in HEAD0_ROW0]
    assert weights[1, 0].tolist() == [1 / 3, 1 / 3, 1 / 3]


def test_averaged_weights_when_asked():
    _, weights = st.reference(identity_module(2), X, X, X, average_attn_weights=True)
    assert weights.shape == (3, 3)
    assert weights[0].tolist() == [float(w) for w in MEAN_ROW0]


def test_head_one_row0_exactly_one_third():
    # Query 0 has 0 in head 1's feature, so its logits there are all 0 and its weights exactly 1/3.
    call = st.problems_from_call(identity_module(2), X, X, X)
    intervals = compute_reference(call.problems[0], 30).stages["A_1"].intervals
    row0 = list(zip(intervals.lo, intervals.hi, intervals.den))[:3]
    assert row0 == [(1, 1, 3)] * 3


def test_mean_over_heads_digits():
    call = st.problems_from_call(identity_module(2), X, X, X)
    means, bounds = mean_over_heads(compute_reference(call.problems[0], 30))
    for computed, bound, text in zip(means[0], bounds[0], MEAN_ROW0):
        assert abs(computed - Fraction(text)) < Fraction(1, 10**20)
        assert bound < Fraction(1, 10**29)


def test_averaged_weights_pytorch_within_bounds():
    report = st.verify(identity_module(2), X, X, X, ulps=WEIGHT_ULP_BOUND[torch.float64])
    assert report.passed
    assert report.stages[1].name == "attention weights (mean over heads)"
