"""Problem: validation of exact input arrays, masks, scale and the SymPy path."""

from fractions import Fraction

import numpy as np
import pytest
import sympy as sp

from symattn import AttentionSpec, InvalidInputError, Mask, MaskError, ShapeError, derive, derive_direct, symbol_matrix
from symattn.problem import Problem

T, F = True, False
E1 = {"Q": [[1, 0], [0, 1]], "K": [[1, 0], [0, 1], [1, 1]], "V": [[1, 2], [3, 4], [5, 6]]}


def projection_inputs(rng, n_q=2, n_kv=3, d_in=3, d_model=4, d_v=4):
    return {
        "query_source": rng.standard_normal((n_q, d_in)),
        "key_source": rng.standard_normal((n_kv, d_in)),
        "value_source": rng.standard_normal((n_kv, 2)),
        "W_Q": rng.standard_normal((d_in, d_model)),
        "W_K": rng.standard_normal((d_in, d_model)),
        "W_V": rng.standard_normal((2, d_v)),
    }


def test_problem_direct_properties():
    problem = Problem.from_arrays(spec=AttentionSpec(), direct=True, **E1)
    assert (problem.n_q, problem.n_kv, problem.d_model, problem.d_k, problem.d_v, problem.heads) == (2, 3, 2, 2, 2, 1)
    assert problem.d_out == 2


def test_problem_projection_properties():
    rng = np.random.default_rng(0)
    problem = Problem.from_arrays(spec=AttentionSpec(heads=2), **projection_inputs(rng), W_O=rng.standard_normal((4, 5)))
    assert (problem.n_q, problem.n_kv, problem.d_model, problem.d_k, problem.d_v) == (2, 3, 4, 2, 2)
    assert problem.d_out == 5


def test_problem_inputs_are_read_only_copies():
    Q = np.array([[1.0, 2.0]])
    problem = Problem.from_arrays(spec=AttentionSpec(), direct=True, Q=Q, K=[[1.0, 0.0]], V=[[1.0]])
    Q[0, 0] = 5.0
    assert problem.inputs["Q"][0, 0] == 1.0
    with pytest.raises(ValueError):
        problem.inputs["Q"][0, 0] = 3.0


def test_problem_keeps_float_dtypes_exactly():
    q = np.array([[0.1, 0.2]], dtype=np.float32)
    problem = Problem.from_arrays(spec=AttentionSpec(), direct=True, Q=q, K=q.astype(np.float16), V=[[1]])
    assert problem.inputs["Q"].dtype == np.float32
    assert problem.inputs["K"].dtype == np.float16
    derivation = problem.to_derivation()
    assert derivation["Q"][0, 0] == sp.Rational(13421773, 134217728)  # float32 0.1 exactly


def test_problem_fraction_object_inputs():
    third = Fraction(1, 3)
    problem = Problem.from_arrays(spec=AttentionSpec(), direct=True, Q=[[third, 1]], K=[[1, 0]], V=[["1/2"]])
    assert problem.inputs["Q"].dtype == object
    assert problem.inputs["Q"][0, 0] == third
    assert problem.inputs["V"][0, 0] == Fraction(1, 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_problem_rejects_nonfinite_inputs(bad):
    K = np.array([[1.0, 0.0], [0.0, bad]])
    with pytest.raises(InvalidInputError, match=r"K contains .* at position \(1, 1\)"):
        Problem.from_arrays(spec=AttentionSpec(), direct=True, Q=[[1.0, 0.0]], K=K, V=[[1.0], [2.0]])


def test_problem_rejects_nan_in_object_input():
    with pytest.raises(InvalidInputError, match="Q entry at position \\(0, 1\\)"):
        Problem.from_arrays(spec=AttentionSpec(), direct=True, Q=np.array([[1, float("nan")]], dtype=object),
                            K=[[1, 0]], V=[[1]])


def test_problem_rejects_boolean_input():
    with pytest.raises(InvalidInputError, match="boolean"):
        Problem.from_arrays(spec=AttentionSpec(), direct=True, Q=[[True, False]], K=[[1, 0]], V=[[1]])


def test_problem_shape_error_names_both_shapes():
    rng = np.random.default_rng(1)
    inputs = projection_inputs(rng)
    inputs["W_K"] = rng.standard_normal((5, 4))
    with pytest.raises(ShapeError, match=r"key_source has 3 features \(shape \(3, 3\)\) but W_K has 5 rows \(shape \(5, 4\)\)"):
        Problem.from_arrays(spec=AttentionSpec(), **inputs)


def test_problem_direct_shape_error():
    with pytest.raises(ShapeError, match=r"K has shape \(3, 2\) but V has shape \(2, 2\)"):
        Problem.from_arrays(spec=AttentionSpec(), direct=True, Q=E1["Q"], K=E1["K"], V=[[1, 2], [3, 4]])


def test_problem_bias_shape_error():
    rng = np.random.default_rng(2)
    with pytest.raises(ShapeError, match=r"b_Q has shape \(3,\)"):
        Problem.from_arrays(spec=AttentionSpec(), **projection_inputs(rng), b_Q=[1.0, 2.0, 3.0])


def test_problem_row_bias_becomes_vector():
    rng = np.random.default_rng(2)
    problem = Problem.from_arrays(spec=AttentionSpec(), **projection_inputs(rng), b_Q=[[1.0, 2.0, 3.0, 4.0]])
    assert problem.inputs["b_Q"].shape == (4,)


def test_problem_heads_must_divide_width():
    with pytest.raises(ShapeError, match="not divisible by 3 heads"):
        Problem.from_arrays(spec=AttentionSpec(heads=3), direct=True, **E1)


def test_problem_output_projection_rows():
    with pytest.raises(ShapeError, match=r"W_O has shape \(3, 2\)"):
        Problem.from_arrays(spec=AttentionSpec(), direct=True, **E1, W_O=np.ones((3, 2)))


def test_problem_unknown_and_missing_inputs():
    with pytest.raises(InvalidInputError, match="unknown input W_Q for direct mode"):
        Problem.from_arrays(spec=AttentionSpec(), direct=True, **E1, W_Q=[[1]])
    with pytest.raises(InvalidInputError, match="missing input V"):
        Problem.from_arrays(spec=AttentionSpec(), direct=True, Q=E1["Q"], K=E1["K"])
    with pytest.raises(InvalidInputError, match="b_O was given without W_O"):
        Problem.from_arrays(spec=AttentionSpec(), direct=True, **E1, b_O=[1, 2])


def test_problem_kv_source_serves_keys_and_values():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 2))
    problem = Problem.from_arrays(spec=AttentionSpec(), query_source=x[:1], kv_source=x, W_Q=np.eye(2),
                                  W_K=np.eye(2), W_V=np.eye(2))
    assert np.array_equal(problem.inputs["key_source"], x)
    assert np.array_equal(problem.inputs["value_source"], x)


def test_problem_fully_masked_row_names_rows():
    spec = AttentionSpec(masks=(Mask.keep([[T, T, F], [F, F, F]]),))
    with pytest.raises(MaskError, match="head 0: query rows 1"):
        Problem.from_arrays(spec=spec, direct=True, **E1)


def test_problem_mask_shape_checked():
    spec = AttentionSpec(masks=(Mask.block([[T, F], [F, T]]),))
    with pytest.raises(ShapeError, match=r"mask 0 \(block\) has shape \(2, 2\); expected \(2, 3\)"):
        Problem.from_arrays(spec=spec, direct=True, **E1)


def random_spec(rng, heads, n_q, n_kv):
    masks = (
        Mask.keep((rng.random(n_kv) > 0.2).tolist()),
        Mask.block((rng.random((heads, n_q, n_kv)) > 0.8).tolist()),
        Mask.additive(np.where(rng.random((n_q, n_kv)) > 0.85, "-inf",
                               rng.integers(-3, 4, (n_q, n_kv)).astype(str)).tolist()),
    )
    return AttentionSpec(heads=heads, masks=masks, causal="bottom_right", key_length=n_kv - 1, masked_rows="zeros")


@pytest.mark.parametrize("seed", range(4))
def test_problem_visibility_matches_spec(seed):
    rng = np.random.default_rng(seed)
    heads, n_q, n_kv = 2, 3, 5
    spec = random_spec(rng, heads, n_q, n_kv)
    problem = Problem.from_arrays(spec=spec, direct=True, Q=np.ones((n_q, 4)), K=np.ones((n_kv, 4)), V=np.ones((n_kv, 2)))
    visible, bias = problem.visibility()
    expected_visible, expected_bias = spec.visibility(heads, n_q, n_kv)
    assert visible.tolist() == expected_visible
    for h in range(heads):
        for i in range(n_q):
            for j in range(n_kv):
                if visible[h, i, j]:
                    assert bias[h, i, j] == Fraction(int(expected_bias[h][i][j].p), int(expected_bias[h][i][j].q))


@pytest.mark.parametrize("scale, d_k, expected", [
    ("sqrt_dk", 2, (Fraction(1, 2), Fraction(2))),  # 1/√2 = √2/2
    ("sqrt_dk", 4, (Fraction(1, 2), Fraction(1))),
    ("none", 2, (Fraction(1), Fraction(1))),
    ("1/8", 2, (Fraction(1, 8), Fraction(1))),
    ("1/sqrt(6)", 2, (Fraction(1, 6), Fraction(6))),
    ("sqrt_seq", 2, (Fraction(1, 3), Fraction(3))),  # n_kv = 3
])
def test_problem_scale_factor(scale, d_k, expected):
    Q = np.ones((1, d_k))
    problem = Problem.from_arrays(spec=AttentionSpec(scale=scale), direct=True, Q=Q, K=np.ones((3, d_k)), V=np.ones((3, 1)))
    assert problem.scale_factor() == expected


def test_problem_to_derivation_matches_derive():
    rng = np.random.default_rng(4)
    inputs = projection_inputs(rng)
    b_Q = rng.standard_normal(4)
    problem = Problem.from_arrays(spec=AttentionSpec(heads=2, causal="top_left"), **inputs, b_Q=b_Q)
    expected = derive(inputs["query_source"], key_source=inputs["key_source"], value_source=inputs["value_source"],
                      W_Q=inputs["W_Q"], W_K=inputs["W_K"], W_V=inputs["W_V"], b_Q=b_Q, heads=2, causal="top_left")
    derivation = problem.to_derivation()
    assert derivation["Z_1"] == expected["Z_1"]
    assert derivation["output"] == expected["output"]


def test_problem_from_derivation_round_trip():
    derivation = derive_direct(**E1, W_O=[[1, "1/2"], [0, 1]], b_O=["1/3", 0], mask=Mask.block([F, F, T]))
    problem = Problem.from_derivation(derivation)
    assert problem.direct
    assert problem.inputs["W_O"][0, 1] == Fraction(1, 2)
    assert problem.inputs["b_O"].tolist() == [Fraction(1, 3), 0]
    assert problem.to_derivation()["output"] == derivation["output"]


def test_problem_from_derivation_rejects_symbols():
    derivation = derive_direct(symbol_matrix("q", 1, 2), E1["K"], E1["V"])
    with pytest.raises(InvalidInputError, match="symbols"):
        Problem.from_derivation(derivation)
