"""Stages of the exact derivation: values, structure, properties and input errors."""

import mpmath
import pytest
import sympy as sp

from symattn import (
    InvalidInputError,
    Mask,
    MaskError,
    ShapeError,
    derive,
    derive_direct,
    matrix_to_decimals,
    symbol_matrix,
)

T, F = True, False

# A small cross-attention case: 3 image patches (width 3) attend to 2 words (width 2), 2 heads.
X_Q = [[1, 0, 2], [0, 1, 1], [2, 1, 0]]
X_KV = [[1, 2], [0, 1]]
W_Q = [[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]]
W_K = [[1, 0, 1, 0], [0, 1, 0, 1]]
W_V = [[1, 2, 0, 1], [0, 1, 1, 0]]


def cross():
    return derive(X_Q, X_KV, W_Q=W_Q, W_K=W_K, W_V=W_V, heads=2)


def test_projections_by_hand():
    d = cross()
    assert d["Q"] == sp.Matrix([[3, 2, 0, 1], [1, 2, 1, 0], [2, 1, 1, 2]])
    assert d["K"] == sp.Matrix([[1, 2, 1, 2], [0, 1, 0, 1]])
    assert d["V"] == sp.Matrix([[1, 4, 2, 1], [0, 1, 1, 0]])


def test_logits_by_hand():
    d = cross()
    assert d["Z_0"] == sp.Matrix([[7, 2], [5, 2], [4, 1]])
    assert d["Z_1"] == sp.Matrix([[2, 1], [1, 0], [5, 2]])
    assert d["Z_scaled_0"] == sp.Matrix([[7, 2], [5, 2], [4, 1]]) / sp.sqrt(2)


def test_stage_order_and_names():
    names = list(cross().stages)
    assert names[:3] == ["Q", "K", "V"]
    assert names[3:11] == ["Q_0", "K_0", "V_0", "Z_0", "Z_scaled_0", "Z_masked_0", "A_0", "O_0"]
    assert names[-2:] == ["concat", "output"]


def test_stages_are_immutable():
    assert isinstance(cross()["A_1"], sp.ImmutableMatrix)


def test_stage_lookup_by_head():
    d = cross()
    assert d.stage("A", head=1) == d["A_1"]
    with pytest.raises(InvalidInputError, match="head 2 does not exist"):
        d.stage("A", head=2)


def test_unknown_stage_lists_names():
    with pytest.raises(KeyError, match="stages are Q, K, V"):
        cross()["P"]


@mpmath.workdps(50)
def test_attention_weights_match_mpmath():
    d = cross()
    s = 1 / mpmath.sqrt(2)
    expected = mpmath.exp(7 * s) / (mpmath.exp(7 * s) + mpmath.exp(2 * s))
    assert matrix_to_decimals(d["A_0"], 30)[0][0] == mpmath.nstr(expected, 30, strip_zeros=False)


@mpmath.workdps(50)
def test_head_output_matches_mpmath():
    d = cross()
    s = 1 / mpmath.sqrt(2)
    a = [mpmath.exp(5 * s), mpmath.exp(2 * s)]  # head 0, query 1
    expected = (a[0] * 4 + a[1] * 1) / (a[0] + a[1])  # V_0 column 1 is [4, 1]
    assert matrix_to_decimals(d["O_0"], 30)[1][1] == mpmath.nstr(expected, 30, strip_zeros=False)


def test_softmax_rows_sum_to_one_exactly():
    d = cross()
    for head in range(2):
        A = d.stage("A", head=head)
        for i in range(A.rows):
            assert sp.together(sum(A.row(i))) == 1


def test_multi_head_equals_single_head_on_blocks():
    d = cross()
    Q, K, V = d["Q"], d["K"], d["V"]
    for head in range(2):
        single = derive_direct(Q[:, 2 * head : 2 * head + 2], K[:, 2 * head : 2 * head + 2], V[:, 2 * head : 2 * head + 2])
        assert single["A_0"] == d.stage("A", head=head)
        assert single.output == d.stage("O", head=head)
    assert d["concat"] == sp.Matrix.hstack(d["O_0"], d["O_1"])


def test_masked_keys_get_zero_weight():
    d = derive(X_Q, X_KV, W_Q=W_Q, W_K=W_K, W_V=W_V, heads=2, mask=Mask.block([F, T]))
    for head in range(2):
        A = d.stage("A", head=head)
        assert list(A.col(1)) == [0, 0, 0]
        assert list(A.col(0)) == [1, 1, 1]
    assert d["Z_masked_0"][0, 1] == -sp.oo


def test_per_head_mask():
    mask = Mask.keep([[[T, T]] * 3, [[T, F]] * 3])
    d = derive(X_Q, X_KV, W_Q=W_Q, W_K=W_K, W_V=W_V, heads=2, mask=mask)
    assert 0 not in list(d["A_0"])
    assert list(d["A_1"].col(1)) == [0, 0, 0]


def test_causal_bottom_right_alignment():
    # 2 queries, 3 keys: bottom-right alignment lets query 0 see keys 0 and 1.
    d = derive_direct([[1], [1]], [[1], [1], [1]], [[1], [2], [3]], causal="bottom_right", scale="none")
    assert list(d["A_0"].row(0)) == [sp.Rational(1, 2), sp.Rational(1, 2), 0]
    assert list(d["A_0"].row(1)) == [sp.Rational(1, 3)] * 3


def test_causal_top_left_alignment():
    d = derive_direct([[1], [1]], [[1], [1], [1]], [[1], [2], [3]], causal="top_left", scale="none")
    assert list(d["A_0"].row(0)) == [1, 0, 0]
    assert list(d["A_0"].row(1)) == [sp.Rational(1, 2), sp.Rational(1, 2), 0]


def test_output_projection_and_biases():
    d = derive([[1, 2]], [[1, 0]], W_Q=[[1], [0]], W_K=[[1], [1]], W_V=[[2], [0]], b_Q=[1], b_K=[0], b_V=["1/2"],
               W_O=[[3, 1]], b_O=[0, -1], scale="none")
    assert d["Q"] == sp.Matrix([[2]])
    assert d["V"] == sp.Matrix([[sp.Rational(5, 2)]])
    assert d["A_0"] == sp.Matrix([[1]])
    assert d.output == sp.Matrix([[sp.Rational(15, 2), sp.Rational(3, 2)]])


def test_value_width_differs_from_query_width():
    d = derive([[1, 0]], [[1, 0], [0, 1]], W_Q=[[1, 0], [0, 1]], W_K=[[1, 0], [0, 1]],
               W_V=[[1, 0, 0, 0], [0, 1, 0, 0]], heads=2)
    assert d.d_k == 1
    assert d.d_v == 2
    assert d.output.shape == (1, 4)


def test_symbolic_inputs_give_symbolic_stages():
    d = derive_direct(symbol_matrix("q", 1, 2), symbol_matrix("k", 2, 2), symbol_matrix("v", 2, 1))
    q11, q12, k11, k12 = (sp.Symbol(n, real=True) for n in ("q_{1,1}", "q_{1,2}", "k_{1,1}", "k_{1,2}"))
    assert d["Z_0"][0, 0] == q11 * k11 + q12 * k12
    assert d.output[0, 0].free_symbols >= {q11, k11}


def test_subs_matches_numeric_derivation():
    symbolic = derive_direct([["w", 0]], [[1, 0], [0, 1]], [[1], [2]])
    assert symbolic.subs({sp.Symbol("w", real=True): 2}).output == derive_direct([[2, 0]], [[1, 0], [0, 1]], [[1], [2]]).output


def test_rationals_stay_rational():
    d = derive_direct([["1/3", 0]], [[1, 0]], [["2/7"]], scale="none")
    assert d["Z_0"][0, 0] == sp.Rational(1, 3)
    assert d.output[0, 0] == sp.Rational(2, 7)


def test_square_root_scale_stays_exact():
    d = derive_direct([[1, 1, 1]], [[1, 1, 1]], [[1]])
    assert d["Z_scaled_0"][0, 0] == sp.sqrt(3)


def test_exact_scale_number():
    assert derive_direct([[2]], [[3]], [[1]], scale="1/8")["Z_scaled_0"][0, 0] == sp.Rational(3, 4)
    assert derive_direct([[2]], [[3]], [[1]], scale="1/sqrt(5)")["Z_scaled_0"][0, 0] == 6 / sp.sqrt(5)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ShapeError, match=r"query_source has 3 features \(shape \(3, 3\)\) but W_Q has 2 rows \(shape \(2, 4\)\)"):
        derive(X_Q, X_KV, W_Q=[[1, 0, 0, 1], [0, 1, 1, 0]], W_K=W_K, W_V=W_V, heads=2)


def test_heads_must_divide_model_width():
    with pytest.raises(ShapeError, match="not divisible by 3 heads"):
        derive(X_Q, X_KV, W_Q=W_Q, W_K=W_K, W_V=W_V, heads=3)


def test_query_and_key_widths_must_agree():
    with pytest.raises(ShapeError, match="Q has width 2 but K has width 3"):
        derive_direct([[1, 0]], [[1, 0, 0]], [[1]])


def test_keys_and_values_must_pair():
    with pytest.raises(ShapeError, match="K has 2 rows but V has 1"):
        derive_direct([[1]], [[1], [0]], [[1]])


def test_unknown_scale_name():
    with pytest.raises(InvalidInputError, match="scale 'sqrt_dmodel' is unknown"):
        derive_direct([[1]], [[1]], [[1]], scale="sqrt_dmodel")


def test_mask_wrong_shape():
    with pytest.raises(ShapeError, match=r"mask 0 \(keep\) has shape \(2, 2\); expected \(3, 2\)"):
        derive(X_Q, X_KV, W_Q=W_Q, W_K=W_K, W_V=W_V, heads=2, mask=Mask.keep([[T, T], [T, T]]))


def test_mask_unknown_kind():
    with pytest.raises(MaskError, match="mask kind 'attend' is unknown"):
        Mask.create("attend", [[T]])


def test_keep_mask_rejects_numbers():
    with pytest.raises(MaskError, match="Mask.additive"):
        Mask.keep([[1, 0]])


def test_fully_masked_rows_named_per_head():
    mask = Mask.block([[[F, F]] * 3, [[T, T], [F, F], [T, T]]])
    with pytest.raises(MaskError, match="head 1: query rows 0, 2"):
        derive(X_Q, X_KV, W_Q=W_Q, W_K=W_K, W_V=W_V, heads=2, mask=mask)


def test_masked_rows_policy_validated():
    with pytest.raises(InvalidInputError, match="masked_rows is 'skip'"):
        derive_direct([[1]], [[1]], [[1]], masked_rows="skip")


def test_non_numeric_string_rejected():
    with pytest.raises(InvalidInputError, match=r"W_Q\[0\]\[1\] 'one' is not|neither a number"):
        derive([[1, 0]], W_Q=[[1, "o ne"]], W_K=[[1], [0]], W_V=[[1], [0]])


def test_bias_width_checked():
    with pytest.raises(ShapeError, match="b_Q has shape"):
        derive([[1, 0]], W_Q=[[1], [0]], W_K=[[1], [0]], W_V=[[1], [0]], b_Q=[1, 2])


def test_output_projection_width_checked():
    with pytest.raises(ShapeError, match="W_O needs 1 rows"):
        derive_direct([[1]], [[1]], [[1]], W_O=[[1], [2]])
