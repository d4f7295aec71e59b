"""Certified references: the engines agree with the SymPy path and contain the exact values.

The independent oracle is a plain mpmath evaluation of the attention formulas at 80 digits. It is
written here from the conventions: rows are tokens, head i owns a contiguous column block, and
the softmax runs over keys. Only the masks come from the spec's own visibility table.
"""

import math
import warnings
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import sympy as sp

from symattn import (
    AttentionSpec, EvaluationError, InvalidInputError, Mask, SymattnWarning, UnsupportedError, matrix_to_decimals,
)
from symattn.numeric import certified, reference
from symattn.numeric.reference import CertifiedMatrix, compute_reference, stage_names
from symattn.problem import Problem

T, F = True, False
E1 = {"Q": [[1, 0], [0, 1]], "K": [[1, 0], [0, 1], [1, 1]], "V": [[1, 2], [3, 4], [5, 6]]}
E4_X = [[1, 0], [0, 1], [1, 1]]
ORACLE_DIGITS = 80


def oracle(problem: Problem) -> dict[str, list[list]]:
    """Return the output, weights and head outputs in plain mpmath (None marks NaN)."""
    with mpmath.workdps(ORACLE_DIGITS):
        exact = {name: [[mpmath.mpf(Fraction(x).numerator) / Fraction(x).denominator for x in row]
                        for row in np.atleast_2d(array).tolist()] for name, array in problem.inputs.items()}

        def matmul(a, b):
            return [[mpmath.fsum(a[i][k] * b[k][j] for k in range(len(b))) for j in range(len(b[0]))] for i in range(len(a))]

        def plus_bias(m, name):
            return m if name not in exact else [[x + b for x, b in zip(row, exact[name][0])] for row in m]

        if problem.direct:
            Q, K, V = exact["Q"], exact["K"], exact["V"]
        else:
            Q = plus_bias(matmul(exact["query_source"], exact["W_Q"]), "b_Q")
            K = plus_bias(matmul(exact["key_source"], exact["W_K"]), "b_K")
            V = plus_bias(matmul(exact["value_source"], exact["W_V"]), "b_V")
        a, b = problem.scale_factor()
        s = mpmath.mpf(a.numerator) / a.denominator * mpmath.sqrt(mpmath.mpf(b.numerator) / b.denominator)
        visible, bias = problem.visibility()
        d_k, d_v = problem.d_k, problem.d_v
        weights, heads = [], []
        for h in range(problem.heads):
            A, O = [], []
            for i in range(problem.n_q):
                logits = {}
                for j in range(problem.n_kv):
                    if visible[h, i, j]:
                        z = mpmath.fsum(Q[i][h * d_k + c] * K[j][h * d_k + c] for c in range(d_k)) * s
                        if bias is not None:
                            z += mpmath.mpf(Fraction(bias[h, i, j]).numerator) / Fraction(bias[h, i, j]).denominator
                        logits[j] = z
                if not logits:
                    fill = 0 if problem.spec.masked_rows == "zeros" else None
                    A.append([fill] * problem.n_kv)
                    O.append([fill] * d_v)
                    continue
                top = max(logits.values())
                total = mpmath.fsum(mpmath.exp(z - top) for z in logits.values())
                row = [mpmath.exp(logits[j] - top) / total if j in logits else mpmath.mpf(0) for j in range(problem.n_kv)]
                A.append(row)
                O.append([mpmath.fsum(row[j] * V[j][h * d_v + c] for j in range(problem.n_kv)) for c in range(d_v)])
            weights.append(A)
            heads.append(O)
        concat = [sum((heads[h][i] for h in range(problem.heads)), []) for i in range(problem.n_q)]
        output = concat
        if "W_O" in exact:
            output = []
            for row in concat:
                if any(x is None for x in row):
                    output.append([None] * len(exact["W_O"][0]))
                else:
                    output.append(plus_bias(matmul([row], exact["W_O"]), "b_O")[0])
        return {"output": output, "weights": weights, "heads": heads}


def assert_contains(matrix: CertifiedMatrix, expected: list[list], relative_width: float, absolute: bool = False):
    """Check that every interval contains the oracle value and is narrow (relative to 1 if ``absolute``)."""
    values = matrix.intervals
    columns = matrix.shape[1]
    with mpmath.workdps(ORACLE_DIGITS):
        for k in range(len(values.lo)):
            want = expected[k // columns][k % columns]
            if want is None:
                assert math.isnan(values.special[k])
                continue
            assert k not in values.special
            low = mpmath.mpf(values.lo[k]) / values.den[k]
            high = mpmath.mpf(values.hi[k]) / values.den[k]
            assert low <= want <= high
            scale = 1 if absolute else max(abs(want), mpmath.mpf(1) / 10**30)
            assert high - low <= relative_width * scale


# Known-answer values ---------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["flint", "mpmath", "sympy"])
def test_reference_cross_attention_known_values(engine):
    problem = Problem.from_arrays(spec=AttentionSpec(), direct=True, **E1)
    output = compute_reference(problem, 20, engine=engine).output
    assert output.decimals() == [["3.0000000000000000000", "4.0000000000000000000"],
                                 ["3.4066725560787154619", "4.4066725560787154619"]]
    with mpmath.workdps(40):
        c = mpmath.exp(1 / mpmath.sqrt(2))
        assert output.decimals(30)[1][0] == mpmath.nstr((1 + 8 * c) / (1 + 2 * c), 30, strip_zeros=False)


def test_reference_engine_recorded():
    problem = Problem.from_arrays(spec=AttentionSpec(), direct=True, **E1)
    assert compute_reference(problem, 10).engine == "flint"
    assert compute_reference(problem, 10, engine="mpmath").engine == "mpmath"


def test_reference_masked_head_spreads_nan_through_output_projection():
    # Head 1 fully blocked under policy "nan": its NaN reaches every output column through W_O.
    block = np.zeros((2, 3, 3), dtype=bool)
    block[1] = True
    spec = AttentionSpec(heads=2, scale="none", masks=(Mask.block(block.tolist()),), masked_rows="nan")
    problem = Problem.from_arrays(spec=spec, direct=True, Q=E4_X, K=E4_X, V=E4_X, W_O=[[1, 0], [1, 1]])
    ref = compute_reference(problem, 20)
    e = mpmath.e
    with mpmath.workdps(30):
        expected = mpmath.nstr(2 * e / (1 + 2 * e), 20, strip_zeros=False)
    assert [row[0] for row in ref["O_0"].decimals()] == [expected, "0.66666666666666666667", expected]
    assert all(value == "nan" for row in ref["O_1"].decimals() for value in row)
    assert np.isnan(ref.output.rounded("float64")).all()


def test_reference_masked_head_zeros_policy():
    block = np.zeros((2, 3, 3), dtype=bool)
    block[1] = True
    spec = AttentionSpec(heads=2, scale="none", masks=(Mask.block(block.tolist()),), masked_rows="zeros")
    problem = Problem.from_arrays(spec=spec, direct=True, Q=E4_X, K=E4_X, V=E4_X, W_O=[[1, 0], [1, 1]])
    output = compute_reference(problem, 20).output.decimals()
    assert [row[1] for row in output] == ["0", "0", "0"]
    assert output[1][0] == "0.66666666666666666667"


def test_reference_per_head_weights_not_averaged():
    problem = Problem.from_arrays(spec=AttentionSpec(heads=2, scale="none"), direct=True, Q=E4_X, K=E4_X, V=E4_X)
    ref = compute_reference(problem, 20, stages=["A_0", "A_1"])
    assert ref["A_0"].decimals()[0] == ["0.42231879825151819660", "0.15536240349696360679", "0.42231879825151819660"]
    assert ref["A_1"].decimals()[0] == ["0.33333333333333333333"] * 3
    assert list(ref.stages) == ["A_0", "A_1"]


def test_reference_cross_widths_and_float16_logit():
    # Key and value inputs narrower than the model; the value projection maps 1 -> 2.
    problem = Problem.from_arrays(spec=AttentionSpec(), query_source=[[1, 0]], key_source=[[1, 0, 0], [0, 1, 0]],
                                  value_source=[[2], [4]], W_Q=[[1, 0], [0, 1]], W_K=[[1, 0], [0, 1], [0, 0]],
                                  W_V=[[1, 0]])
    assert compute_reference(problem, 20).output.decimals() == [["2.6604769013466861488", "0"]]
    # d_k = 6 and q = k = [105]*6: the unscaled logit 66150 overflows float16, the output is exactly 2.
    big = Problem.from_arrays(spec=AttentionSpec(), direct=True, Q=[[105] * 6], K=[[105] * 6] * 2, V=[[1], [3]])
    ref = compute_reference(big, 20)
    assert ref.output.decimals() == [["2"]]
    assert ref["Z_0"].rounded("float16").tolist() == [[math.inf, math.inf]]
    assert ref["Z_scaled_0"].decimals() == [["27005.624414184538533"] * 2]


def test_reference_float_inputs_at_exact_binary_value():
    problem = Problem.from_arrays(spec=AttentionSpec(), direct=True, Q=[[0.1]], K=[[1.0]], V=[[np.float32(0.1)]])
    ref = compute_reference(problem, 30)
    assert ref["Q"].decimals(60) == [["0.1000000000000000055511151231257827021181583404541015625"]]
    assert ref.output.decimals(40) == [["0.100000001490116119384765625"]]  # float32 0.1 exactly


# Both paths agree --------------------------------------------------------------------------


def agreement_cases():
    rng = np.random.default_rng(11)
    keep = [[T, T, F], [F, F, F]]
    yield "E1 unmasked", AttentionSpec(), dict(direct=True, **E1)
    yield "E1 keep mask, zeros", AttentionSpec(masks=(Mask.keep(keep),), masked_rows="zeros"), dict(direct=True, **E1)
    yield "E1 additive", AttentionSpec(masks=(Mask.additive([["1/2", -1, 0], [0, 0, 2]]),)), dict(direct=True, **E1)
    yield "E1 key length", AttentionSpec(key_length=2), dict(direct=True, **E1)
    yield "causal self", AttentionSpec(causal="top_left"), dict(direct=True, Q=E4_X, K=E4_X, V=E4_X)
    yield "two heads, W_O", AttentionSpec(heads=2), dict(direct=True, Q=E4_X, K=E4_X, V=E4_X, W_O=[[1, 1], [0, 1]], b_O=["1/3", 2])
    per_head = rng.random((2, 2, 3)) > 0.6
    per_head[:, :, 0] = False
    yield "3-D block, nan rows", AttentionSpec(heads=2, masks=(Mask.block(per_head.tolist()),), masked_rows="nan"), dict(
        query_source=rng.integers(-2, 3, (2, 3)), kv_source=rng.integers(-2, 3, (3, 3)),
        W_Q=rng.integers(-1, 2, (3, 4)), W_K=rng.integers(-1, 2, (3, 4)), W_V=rng.integers(-1, 2, (3, 4)),
        b_V=[1, 0, "1/2", 0])
    yield "float inputs, bottom right", AttentionSpec(causal="bottom_right", scale="1/3"), dict(
        direct=True, Q=rng.standard_normal((2, 2)).round(2), K=rng.standard_normal((3, 2)).round(2),
        V=rng.standard_normal((3, 1)).round(2))


@pytest.mark.parametrize("name, spec, inputs", list(agreement_cases()), ids=[case[0] for case in agreement_cases()])
def test_reference_agrees_with_sympy_path(name, spec, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SymattnWarning)
        problem = Problem.from_arrays(spec=spec, **inputs)
    derivation = problem.to_derivation()
    ref = compute_reference(problem, 25)
    for stage in stage_names(problem):
        assert ref[stage].decimals() == matrix_to_decimals(derivation[stage], 25), stage


# Containment against the independent oracle ------------------------------------------------


def random_problem(seed: int, heads=2, n_q=5, n_kv=6, masked_rows="zeros", scale="sqrt_dk", direct=False):
    rng = np.random.default_rng(seed)
    d_model, d_in = 4 * heads, 5
    keep = rng.random((n_q, n_kv)) > 0.25
    keep[1] = False
    additive = np.where(rng.random((heads, n_q, n_kv)) > 0.85, "-inf", rng.integers(-2, 3, (heads, n_q, n_kv)).astype(str))
    masks = (Mask.keep(keep.tolist()), Mask.additive(additive.tolist()))
    spec = AttentionSpec(heads=heads, masks=masks, masked_rows=masked_rows, scale=scale)
    if direct:
        inputs = dict(direct=True, Q=rng.standard_normal((n_q, d_model)), K=rng.standard_normal((n_kv, d_model)),
                      V=rng.standard_normal((n_kv, d_model)).astype(np.float32))
    else:
        inputs = dict(query_source=rng.standard_normal((n_q, d_in)) * 3, kv_source=rng.standard_normal((n_kv, d_in)),
                      W_Q=rng.standard_normal((d_in, d_model)), W_K=rng.standard_normal((d_in, d_model)),
                      W_V=rng.standard_normal((d_in, d_model)).astype(np.float32), b_Q=rng.standard_normal(d_model),
                      b_V=rng.standard_normal(d_model))
    inputs.update(W_O=rng.standard_normal((d_model, 3)), b_O=rng.standard_normal(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SymattnWarning)
        return Problem.from_arrays(spec=spec, **inputs)


def check_against_oracle(problem: Problem, stages: dict, digits: int, absolute_weights: bool = False):
    """Check containment and width; ``absolute_weights`` measures A and O widths against 1."""
    expected = oracle(problem)
    width = 10.0 ** -digits
    assert_contains(stages["output"], expected["output"], width)
    for h in range(problem.heads):
        assert_contains(stages[f"A_{h}"], expected["weights"][h], width, absolute_weights)
        assert_contains(stages[f"O_{h}"], expected["heads"][h], width, absolute_weights)


@pytest.mark.parametrize("engine", ["flint", "mpmath"])
def test_reference_intervals_contain_oracle(engine):
    problem = random_problem(5)
    ref = compute_reference(problem, 30, engine=engine)
    check_against_oracle(problem, ref.stages, 30)


@pytest.mark.parametrize("seed, masked_rows, scale, direct", [
    (1, "zeros", "sqrt_dk", False), (2, "nan", "1/3", True), (3, "zeros", "none", True), (4, "nan", "sqrt_seq", False),
])
def test_vectorised_path_contains_oracle(seed, masked_rows, scale, direct):
    # The vectorised path computes the softmax in fixed point, so a small weight is accurate to
    # 2^-F absolutely. compute_reference raises the precision until it is also relatively narrow.
    problem = random_problem(seed, masked_rows=masked_rows, scale=scale, direct=direct)
    values = certified.VectorisedPipeline(problem, 140, set(stage_names(problem))).run()
    stages = {name: CertifiedMatrix(name, value.shape, value, 140, 30) for name, value in values.items()}
    check_against_oracle(problem, stages, 30, absolute_weights=True)


@pytest.mark.parametrize("seed, masked_rows, scale, direct", [
    (6, "zeros", "sqrt_dk", False), (7, "nan", "1/sqrt(5)", True), (8, "zeros", "2", False),
])
def test_vectorised_path_matches_entrywise(seed, masked_rows, scale, direct):
    problem = random_problem(seed, masked_rows=masked_rows, scale=scale, direct=direct)
    names = stage_names(problem)
    fast = certified.VectorisedPipeline(problem, 120, set(names)).run()
    plain = certified.evaluate_entrywise(problem, 120, set(names))
    for name in names:
        a = CertifiedMatrix(name, fast[name].shape, fast[name], 120, 25,
                            lambda bits, name=name: certified.VectorisedPipeline(problem, bits, {name}).run()[name])
        b = CertifiedMatrix(name, plain[name].shape, plain[name], 120, 25)
        assert np.array_equal(a.rounded("float64"), b.rounded("float64"), equal_nan=True), name
        assert np.array_equal(a.rounded("bfloat16"), b.rounded("bfloat16"), equal_nan=True), name
        if not name.startswith(("A_", "O_", "concat", "output")):
            assert a.decimals() == b.decimals(), name


def test_vectorised_path_exact_for_inputs_spanning_many_binades():
    # Weights and sources whose integer forms are over 72 bits wide, with negative entries far
    # below the largest one: the exact projections once split them with a rounding error.
    rng = np.random.default_rng(13)
    problem = random_problem(13)
    wide = {}
    for name in ("query_source", "W_Q", "W_K", "W_V", "b_Q", "W_O"):
        array = np.array(problem.inputs[name], dtype=np.float64)
        scales = np.where(rng.random(array.shape) < 0.3, 2.0**-40, 1.0)
        wide[name] = -np.abs(array) * scales
        wide[name].flat[0] = 2.0**30 + 1
    inputs = {name: np.asarray(problem.inputs[name]) for name in ("b_V", "b_O")}
    inputs["kv_source"] = np.asarray(problem.inputs["key_source"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SymattnWarning)
        problem = Problem.from_arrays(spec=problem.spec, **inputs, **wide)
    assert certified.IntegerMatrix.from_array(problem.inputs["W_Q"]).bits > 72
    values = certified.VectorisedPipeline(problem, 140, set(stage_names(problem))).run()
    stages = {name: CertifiedMatrix(name, value.shape, value, 140, 30) for name, value in values.items()}
    check_against_oracle(problem, stages, 30, absolute_weights=True)
    got = stages["Q"].intervals
    exact = [Fraction(lo, den) for lo, hi, den in zip(got.lo, got.hi, got.den) if lo == hi]
    assert len(exact) == len(got.lo)
    expected = oracle_projection(problem, "query_source", "W_Q", "b_Q")
    assert exact == [value for row in expected for value in row]


def test_vectorised_path_handles_huge_logits():
    # Logits near 2^60: the row shift once kept a margin relative to the logit, so every
    # exponential underflowed to 0 and the weights came out with infinite radii.
    rng = np.random.default_rng(14)
    Q = rng.standard_normal((5, 8)) * 2.0**30
    K = rng.standard_normal((6, 8)) * 2.0**30
    V = rng.standard_normal((6, 8))
    problem = Problem.from_arrays(spec=AttentionSpec(heads=2), direct=True, Q=Q, K=K, V=V)
    values = certified.VectorisedPipeline(problem, 140, set(stage_names(problem))).run()
    stages = {name: CertifiedMatrix(name, value.shape, value, 140, 30) for name, value in values.items()}
    check_against_oracle(problem, stages, 30, absolute_weights=True)
    # Each query attends to one key: the one with the largest logit per head.
    for head in range(2):
        block = slice(4 * head, 4 * head + 4)
        chosen = np.argmax(Q[:, block] @ K[:, block].T, axis=1)
        assert np.array_equal(stages[f"O_{head}"].rounded("float64"), V[chosen][:, block])


def oracle_projection(problem: Problem, source: str, weight: str, bias: str) -> list:
    """Return X W + b in exact Fractions."""
    X = [[Fraction(float(v)) for v in row] for row in np.asarray(problem.inputs[source]).tolist()]
    W = [[Fraction(float(v)) for v in row] for row in np.asarray(problem.inputs[weight]).tolist()]
    b = [Fraction(float(v)) for v in np.asarray(problem.inputs[bias]).reshape(-1).tolist()]
    return [[sum(x * W[i][j] for i, x in enumerate(row)) + b[j] for j in range(len(b))] for row in X]


def test_vectorised_path_used_for_many_logits():
    rng = np.random.default_rng(9)
    problem = Problem.from_arrays(spec=AttentionSpec(heads=4), direct=True, Q=rng.standard_normal((16, 32)),
                                  K=rng.standard_normal((16, 32)), V=rng.standard_normal((16, 32)))
    assert certified.use_vectorised(problem)
    ref = compute_reference(problem, 50, stages=["output"])
    expected = oracle(problem)["output"]
    assert_contains(ref.output, expected, 1e-50)
    with mpmath.workdps(60):
        assert ref.output.decimals()[3][5] == mpmath.nstr(expected[3][5], 50, strip_zeros=False)


def test_reference_more_digits_than_computed():
    problem = Problem.from_arrays(spec=AttentionSpec(), direct=True, **E1)
    ref = compute_reference(problem, 15)
    with mpmath.workdps(80):
        c = mpmath.exp(1 / mpmath.sqrt(2))
        assert ref.output.decimals(70)[1][1] == mpmath.nstr((2 + 10 * c) / (1 + 2 * c), 70, strip_zeros=False)


def test_reference_rounded_float32_is_correct():
    problem = random_problem(12, direct=True)
    ref = compute_reference(problem, 20, stages=["output"])
    expected = oracle(problem)["output"]
    got = ref.output.rounded("float32")
    with mpmath.workprec(24):
        for i, row in enumerate(expected):
            for j, value in enumerate(row):
                assert got[i, j] == float(mpmath.mpf(value))  # mpmath rounds to nearest at 24 bits


def test_reference_radii_and_midpoints():
    problem = Problem.from_arrays(spec=AttentionSpec(), direct=True, **E1)
    output = compute_reference(problem, 30).output
    radii = output.radii()
    assert radii.shape == (2, 2)
    assert 0 < output.max_radius() < 1e-30
    assert np.array_equal(output.midpoints(), output.rounded("float64"))


# Engine choice, stages and bad input -------------------------------------------------------


def test_reference_falls_back_to_mpmath_once(monkeypatch):
    monkeypatch.setattr(reference, "flint_available", lambda: False)
    monkeypatch.setattr(reference, "_warned_fallback", False)
    problem = Problem.from_arrays(spec=AttentionSpec(), direct=True, **E1)
    with pytest.warns(SymattnWarning, match="python-flint is not installed") as record:
        first = compute_reference(problem, 10)
        second = compute_reference(problem, 10)
    assert len(record) == 1
    assert first.engine == "mpmath"
    assert second.engine == "mpmath"


def test_reference_flint_engine_missing(monkeypatch):
    monkeypatch.setattr(reference, "flint_available", lambda: False)
    problem = Problem.from_arrays(spec=AttentionSpec(), direct=True, **E1)
    with pytest.raises(UnsupportedError, match="symattn\\[fast\\]"):
        compute_reference(problem, 10, engine="flint")


def test_reference_rejects_unknown_stage_and_engine():
    problem = Problem.from_arrays(spec=AttentionSpec(), direct=True, **E1)
    with pytest.raises(InvalidInputError, match="unknown stage 'A_3'"):
        compute_reference(problem, 10, stages=["A_3"])
    with pytest.raises(InvalidInputError, match="engine is 'gpu'"):
        compute_reference(problem, 10, engine="gpu")
    with pytest.raises(InvalidInputError, match="digits is 0"):
        compute_reference(problem, 0)


def test_reference_masked_logits_are_minus_infinity():
    problem = Problem.from_arrays(spec=AttentionSpec(key_length=2), direct=True, **E1)
    ref = compute_reference(problem, 10, stages=["Z_masked_0", "A_0"])
    assert ref["Z_masked_0"].decimals()[0][2] == "-inf"
    assert ref["Z_masked_0"].rounded("float32")[0, 2] == -np.inf
    assert ref["A_0"].decimals()[0][2] == "0"


def test_reference_sympy_irrational_scale_stage():
    problem = Problem.from_arrays(spec=AttentionSpec(), direct=True, **E1)
    ref = compute_reference(problem, 20, stages=["Z_scaled_0"], engine="sympy")
    assert ref["Z_scaled_0"].decimals()[0][0] == matrix_to_decimals(sp.Matrix([[1 / sp.sqrt(2)]]), 20)[0][0]


@pytest.mark.parametrize("seed, precision", [(0, 60), (2, 60), (3, 140)])
def test_whole_array_rounding_matches_exact_path(seed, precision):
    problem = random_problem(seed, masked_rows="nan" if seed % 2 else "zeros", direct=seed == 3)
    names = stage_names(problem)
    values = certified.VectorisedPipeline(problem, precision, set(names)).run()
    for name in names:
        def refine(bits, name=name):
            return certified.VectorisedPipeline(problem, bits, {name}).run()[name]

        fast = CertifiedMatrix(name, values[name].shape, values[name], precision, 20, refine)
        exact = CertifiedMatrix(name, values[name].shape, values[name].to_intervals(), precision, 20, refine)
        for dtype in ("float64", "float32", "float16", "bfloat16"):
            a, b = fast.rounded(dtype), exact.rounded(dtype)
            assert np.array_equal(a, b, equal_nan=True), (name, dtype)
            assert np.array_equal(np.signbit(a), np.signbit(b)), (name, dtype)


@pytest.mark.parametrize("integer, dtype, expected", [
    (2**53 + 1, "float64", 2.0**53),  # a tie: the even neighbour
    (2**53 + 3, "float64", 2.0**53 + 4),  # a tie: the even neighbour above
    (65520, "float16", math.inf),  # float16's overflow threshold is a tie that rounds up
    (65519, "float16", 65504.0),
    (-(2**24 + 1), "float32", -(2.0**24)),
    (0, "bfloat16", 0.0),
])
def test_whole_array_rounding_of_exact_ties(integer, dtype, expected):
    from symattn.numeric.limbs import from_ints
    from symattn.numeric.stage_values import ExactValues

    stage = ExactValues((1, 1), from_ints([integer], 4), 0)
    matrix = CertifiedMatrix("x", (1, 1), stage, 100, 20)
    assert matrix.rounded(dtype)[0, 0] == expected


def test_vectorised_path_keeps_exact_zero_logits_exact():
    # Q row 0 is zero, so Z_scaled row 0 is exactly 0 even with the irrational scale 1/√2. A ball
    # around 0 could never be rounded to any number of digits.
    rng = np.random.default_rng(15)
    Q = rng.standard_normal((16, 8))
    Q[0] = 0.0
    problem = Problem.from_arrays(spec=AttentionSpec(heads=4), direct=True, Q=Q,
                                  K=rng.standard_normal((16, 8)), V=rng.standard_normal((16, 8)))
    assert certified.use_vectorised(problem)
    ref = compute_reference(problem, 30, stages=["Z_scaled_1", "Z_masked_1"])
    for stage in ("Z_scaled_1", "Z_masked_1"):
        assert ref[stage].decimals()[0] == ["0"] * 16
        expected = (Q[1, 2:4] @ problem.inputs["K"][3, 2:4]) / math.sqrt(2)
        assert float(ref[stage].decimals()[1][3]) == pytest.approx(expected, rel=1e-15)


def test_reference_of_tiny_weights_reads_out():
    # Logits up to 4 · 10^5 apart: most weights are far below any fixed-point grid.
    # They are refined entry by entry, and their decimals come out without converting
    # hundred-thousand-bit integers to decimal.
    rng = np.random.default_rng(16)
    Q = rng.standard_normal((16, 8)) * 2.0**8
    K = rng.standard_normal((16, 8)) * 2.0**8
    problem = Problem.from_arrays(spec=AttentionSpec(heads=4), direct=True, Q=Q, K=K, V=rng.standard_normal((16, 8)))
    weights = compute_reference(problem, 20, stages=["A_0"])["A_0"].decimals()
    exact = oracle(problem)["weights"][0][5]
    logits = Q[5, :2] @ K[:, :2].T
    smallest = int(np.argmin(logits))
    with mpmath.workdps(ORACLE_DIGITS):
        assert exact[smallest] < mpmath.mpf(10) ** -1000
        for j in (int(np.argmax(logits)), smallest):
            assert abs(mpmath.mpf(weights[5][j]) / exact[j] - 1) < mpmath.mpf(10) ** -19


def test_decimal_rounding_of_wide_quotients_matches_exact_division():
    # Quotients of integers over 4096 bits are rounded through interval arithmetic. They must agree
    # with exact decimal division, ties and the carry to the next power of ten included.
    import random
    import decimal

    rng = random.Random(17)
    cases = [(999, 1000, 2), (-9996, 1000, 3), (1, 8, 2), (3 << 5000, 1 << 5003, 1)]
    for _ in range(60):
        numerator = rng.choice((1, -1)) * (rng.getrandbits(rng.randint(1, 6000)) | 1)
        denominator = (rng.getrandbits(rng.randint(4100, 6000)) | 1) if rng.random() < 0.5 else 1 << rng.randint(4100, 6000)
        cases.append((numerator, denominator, rng.choice((1, 17, 50))))
    for numerator, denominator, digits in cases:
        context = decimal.Context(prec=digits, rounding=decimal.ROUND_HALF_EVEN, Emax=10**9, Emin=-(10**9))
        expected = context.divide(decimal.Decimal(numerator), decimal.Decimal(denominator))
        assert str(reference._round_decimal(numerator, denominator, digits)) == str(expected)


def test_reference_of_astronomically_small_weights():
    # Logits about 2^40 apart: the small weights are near exp(−10^12). Their exact endpoints would
    # need a denominator of 10^12 bits, so they are enclosed below 2^-1048576. Every binary format
    # rounds them to 0, and printing their digits raises an error that explains why.
    rng = np.random.default_rng(18)
    Q = rng.standard_normal((16, 8)) * 2.0**20
    K = rng.standard_normal((16, 8)) * 2.0**20
    problem = Problem.from_arrays(spec=AttentionSpec(heads=4, scale="none"), direct=True, Q=Q, K=K,
                                  V=rng.standard_normal((16, 8)))
    weights = compute_reference(problem, 20, stages=["A_0"])["A_0"]
    logits = Q[:, :2] @ K[:, :2].T
    values = weights.rounded("float64")
    assert np.array_equal(values, (logits == logits.max(axis=1, keepdims=True)).astype(float))
    with pytest.raises(EvaluationError, match=r"below 2\^-1048576 in magnitude"):
        weights.decimals()


def test_single_threaded_blas_restores_thread_counts():
    from symattn.numeric.blas import _openblas_pools, single_threaded_blas

    pools = _openblas_pools()
    if not pools:
        pytest.skip("no OpenBLAS with openblas_set_num_threads is loaded in this process")
    before = [get() for get, _ in pools]
    with single_threaded_blas():
        assert [get() for get, _ in pools] == [1] * len(pools)
        assert np.array_equal(np.eye(3) @ np.arange(9.0).reshape(3, 3), np.arange(9.0).reshape(3, 3))
    assert [get() for get, _ in pools] == before
