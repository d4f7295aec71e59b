"""Exact gradients, Jacobians and Hessian-vector products, checked independently.

Two checks are independent of symattn's backward pass. Plain SymPy ``diff`` of explicit entries
covers small symbolic cases. Central finite differences of a plain mpmath forward pass, written
in this file, cover the rest: with 80 working digits and step 1e-25 the difference quotient is
good to about 1e-48, so every gradient entry must agree to 1e-45 absolute. The evaluation
points are random rationals from a fixed seed.
"""

import random
from fractions import Fraction

import mpmath
import pytest
import sympy as sp

from symattn import InvalidInputError, Mask, ShapeError, derive, derive_direct, symbol_matrix
from symattn.gradients import (
    backward,
    expression_gradient,
    grad,
    hessian_vector_product,
    objective_seeds,
    parse_objective,
    softmax_backward,
    softmax_jacobian,
    stage_entries,
)
from symattn.numeric.balls import certified_decimals

T, F = True, False
E1 = {"Q": [[1, 0], [0, 1]], "K": [[1, 0], [0, 1], [1, 1]], "V": [[1, 2], [3, 4], [5, 6]]}
X = [[1, 0], [0, 1], [1, 1]]

FD_DIGITS = 80
FD_STEP = mpmath.mpf("1e-25")
FD_TOLERANCE = mpmath.mpf("1e-45")
NEG_INF = float("-inf")


# A plain mpmath forward pass, independent of symattn.

def mp_matmul(A, B):
    return [[mpmath.fsum(A[i][k] * B[k][j] for k in range(len(B))) for j in range(len(B[0]))] for i in range(len(A))]


def mp_forward(inputs, heads, scale, hidden, bias, masked_rows="error"):
    """Return {"output": rows, "A_<i>": rows} for inputs given as nested lists of mpf.

    ``hidden(h, i, j)`` returns whether key j is hidden from query i in head h, and
    ``bias(h, i, j)`` returns the additive mask value. A missing projection means the input is Q, K or V itself.
    """
    def project(source, weight, b):
        if weight not in inputs:
            return inputs[source]
        P = mp_matmul(inputs[source], inputs[weight])
        if b in inputs:
            P = [[p + inputs[b][0][j] for j, p in enumerate(row)] for row in P]
        return P

    direct = "Q" in inputs
    Q = project("Q" if direct else "query_source", "W_Q", "b_Q")
    K = project("K" if direct else "key_source", "W_K", "b_K")
    V = project("V" if direct else "value_source", "W_V", "b_V")
    d_k, d_v = len(Q[0]) // heads, len(V[0]) // heads
    result, concat = {}, [[] for _ in Q]
    for h in range(heads):
        A = []
        for i, q in enumerate(Q):
            logits = []
            for j, k in enumerate(K):
                dot = mpmath.fsum(q[h * d_k + c] * k[h * d_k + c] for c in range(d_k))
                logits.append(None if hidden(h, i, j) else scale * dot + bias(h, i, j))
            exps = [None if z is None else mpmath.exp(z) for z in logits]
            kept = [e for e in exps if e is not None]
            if not kept:
                A.append([mpmath.mpf(0) if masked_rows == "zeros" else mpmath.nan] * len(K))
                continue
            total = mpmath.fsum(kept)
            A.append([mpmath.mpf(0) if e is None else e / total for e in exps])
        result[f"A_{h}"] = A
        O_h = mp_matmul(A, [row[h * d_v : (h + 1) * d_v] for row in V])
        for i, row in enumerate(O_h):
            concat[i] += row
    output = concat
    if "W_O" in inputs:
        output = mp_matmul(concat, inputs["W_O"])
        if "b_O" in inputs:
            output = [[o + inputs["b_O"][0][j] for j, o in enumerate(row)] for row in output]
    result["output"] = output
    return result


def random_rational_matrix(rng, rows, cols):
    return [[Fraction(rng.randint(-12, 12), rng.randint(1, 7)) for _ in range(cols)] for _ in range(rows)]


def mp_fraction(value):
    value = Fraction(value)
    return mpmath.mpf(value.numerator) / value.denominator


def to_mp(matrix):
    return [[mp_fraction(x) for x in row] for row in matrix]


def finite_difference_gradient(inputs, wrt, objective, forward):
    """Central differences (L(x + h e) − L(x − h e)) / 2h of every entry of inputs[wrt]."""
    gradient = []
    for i in range(len(inputs[wrt])):
        row = []
        for j in range(len(inputs[wrt][0])):
            values = []
            for sign in (1, -1):
                shifted = {name: [list(r) for r in m] for name, m in inputs.items()}
                shifted[wrt][i][j] += sign * FD_STEP
                values.append(objective(forward(shifted)))
            row.append((values[0] - values[1]) / (2 * FD_STEP))
        gradient.append(row)
    return gradient


def assert_matches_finite_differences(exact, expected, label):
    decimals = certified_decimals(exact, 60).decimals
    for i, row in enumerate(expected):
        for j, value in enumerate(row):
            error = abs(mpmath.mpf(decimals[i][j]) - value)
            assert error < FD_TOLERANCE, f"{label}[{i},{j}]: symattn {decimals[i][j]}, differences {value}"



def assert_matches_gradient_difference(hvp, shifted, step):
    """Compare H v with (∇L(x + h v) − ∇L(x − h v)) / 2h, from the gradients ``shifted`` at ±h."""
    hvp_decimals = certified_decimals(hvp, 60).decimals
    difference = certified_decimals((shifted[0] - shifted[1]) / (2 * step), 60).decimals
    for i, row in enumerate(hvp_decimals):
        for j, value in enumerate(row):
            error = abs(mpmath.mpf(value) - mpmath.mpf(difference[i][j]))
            assert error < mpmath.mpf("1e-40"), (i, j)

# A cross-attention case with every part: biases, output projection, two heads, masks.

RNG = random.Random(20240611)
SHAPES = {
    "query_source": (2, 3), "key_source": (3, 2), "value_source": (3, 2),
    "W_Q": (3, 4), "W_K": (2, 4), "W_V": (2, 4), "b_Q": (1, 4), "b_K": (1, 4), "b_V": (1, 4),
    "W_O": (4, 3), "b_O": (1, 3),
}
POINT = {name: random_rational_matrix(RNG, *shape) for name, shape in SHAPES.items()}
UPSTREAM = random_rational_matrix(RNG, 2, 3)
ADDITIVE = [[Fraction(1, 2), 0, Fraction(-1, 3)], [0, 2, 0]]
BLOCK = [[F, F, T], [F, F, F]]


def full_derivation(scale="sqrt_dk"):
    return derive(
        POINT["query_source"], key_source=POINT["key_source"], value_source=POINT["value_source"],
        W_Q=POINT["W_Q"], W_K=POINT["W_K"], W_V=POINT["W_V"],
        b_Q=POINT["b_Q"][0], b_K=POINT["b_K"][0], b_V=POINT["b_V"][0],
        W_O=POINT["W_O"], b_O=POINT["b_O"][0], heads=2, scale=scale,
        mask=[Mask.additive(ADDITIVE), Mask.block(BLOCK)],
    )


def full_forward(scale_value):
    def forward(inputs):
        return mp_forward(
            inputs, heads=2, scale=scale_value,
            hidden=lambda h, i, j: BLOCK[i][j],
            bias=lambda h, i, j: mp_fraction(ADDITIVE[i][j]),
        )
    return forward


OBJECTIVES = {
    "output entry": (("output", 1, 2), lambda r: r["output"][1][2]),
    "sum": ("sum", lambda r: mpmath.fsum(x for row in r["output"] for x in row)),
    "weighted sum": (
        UPSTREAM,
        lambda r: mpmath.fsum(
            mpmath.mpf(g.numerator) / g.denominator * o
            for g_row, o_row in zip(UPSTREAM, r["output"]) for g, o in zip(g_row, o_row)
        ),
    ),
}


@pytest.mark.parametrize("objective_name", list(OBJECTIVES))
@pytest.mark.parametrize("wrt", list(SHAPES))
def test_gradient_full_case_finite_differences(objective_name, wrt):
    objective, mp_objective = OBJECTIVES[objective_name]
    exact = full_derivation().grad(objective, wrt)
    assert exact.shape == SHAPES[wrt]
    with mpmath.workdps(FD_DIGITS):
        expected = finite_difference_gradient(
            {name: to_mp(m) for name, m in POINT.items()}, wrt, mp_objective,
            full_forward(1 / mpmath.sqrt(2)),
        )
        assert_matches_finite_differences(exact, expected, wrt)


def test_gradient_expression_objective_finite_differences():
    d = full_derivation()
    O, A_1 = stage_entries(d, "output"), stage_entries(d, "A_1")
    objective = O[0, 1] ** 2 + 3 * A_1[1, 2] * O[1, 0]
    with mpmath.workdps(FD_DIGITS):
        for wrt in ("W_K", "b_Q", "value_source"):
            expected = finite_difference_gradient(
                {name: to_mp(m) for name, m in POINT.items()}, wrt,
                lambda r: r["output"][0][1] ** 2 + 3 * r["A_1"][1][2] * r["output"][1][0],
                full_forward(1 / mpmath.sqrt(2)),
            )
            assert_matches_finite_differences(d.grad(objective, wrt), expected, wrt)


@pytest.mark.parametrize(
    "scale, scale_value",
    [
        ("sqrt_seq", lambda: 1 / mpmath.sqrt(3)),  # n_kv = 3 keys
        ("none", lambda: mpmath.mpf(1)),
        (Fraction(3, 7), lambda: mpmath.mpf(3) / 7),
    ],
)
def test_gradient_scale_choices_finite_differences(scale, scale_value):
    exact = full_derivation(scale).grad(("output", 0, 0), "W_Q")
    with mpmath.workdps(FD_DIGITS):
        expected = finite_difference_gradient(
            {name: to_mp(m) for name, m in POINT.items()}, "W_Q",
            lambda r: r["output"][0][0], full_forward(scale_value()),
        )
        assert_matches_finite_differences(exact, expected, "W_Q")


def test_gradient_causal_direct_finite_differences():
    rng = random.Random(7)
    point = {name: random_rational_matrix(rng, 3, 2) for name in ("Q", "K", "V")}
    d = derive_direct(point["Q"], point["K"], point["V"], causal="top_left")
    with mpmath.workdps(FD_DIGITS):
        forward = lambda inputs: mp_forward(
            inputs, heads=1, scale=1 / mpmath.sqrt(2), hidden=lambda h, i, j: j > i,
            bias=lambda h, i, j: 0,
        )
        for wrt in ("Q", "K", "V"):
            expected = finite_difference_gradient(
                {n: to_mp(m) for n, m in point.items()}, wrt, lambda r: r["output"][2][1], forward
            )
            assert_matches_finite_differences(d.grad(("output", 2, 1), wrt), expected, wrt)



# A source that fills several roles: self attention and kv_source.

def small_rational_matrix(rng, rows, cols):
    # Entries below 1 in size keep the softmax away from saturation, so every role's part of
    # the gradient is of the same order and a missing role shows.
    return [[Fraction(rng.randint(-4, 4), rng.randint(5, 9)) for _ in range(cols)] for _ in range(rows)]


SELF_RNG = random.Random(20261204)
SELF_POINT = {
    name: small_rational_matrix(SELF_RNG, *shape)
    for name, shape in {
        "x": (3, 4), "W_Q": (4, 4), "W_K": (4, 4), "W_V": (4, 4), "b_Q": (1, 4), "b_K": (1, 4),
        "b_V": (1, 4), "W_O": (4, 3), "b_O": (1, 3), "y": (2, 4),
    }.items()
}
SELF_UPSTREAM = small_rational_matrix(SELF_RNG, 3, 3)


def self_attention(kv_source=None):
    """Derive causal two-head self attention over x, or cross attention from x to kv_source."""
    p = SELF_POINT
    return derive(
        p["x"], kv_source, W_Q=p["W_Q"], W_K=p["W_K"], W_V=p["W_V"], b_Q=p["b_Q"][0],
        b_K=p["b_K"][0], b_V=p["b_V"][0], W_O=p["W_O"], b_O=p["b_O"][0], heads=2,
        causal=None if kv_source is not None else "top_left",
    )


def shared_source_forward(roles, causal):
    """Return a forward pass that reads the matrix "shared" in every one of ``roles``."""
    def forward(inputs):
        with_roles = dict(inputs)
        for role in roles:
            with_roles[role] = inputs["shared"]
        return mp_forward(
            with_roles, heads=2, scale=1 / mpmath.sqrt(2),
            hidden=lambda h, i, j: causal and j > i, bias=lambda h, i, j: 0,
        )
    return forward


def weighted_output(result):
    return mpmath.fsum(
        mp_fraction(g) * o for g_row, o_row in zip(SELF_UPSTREAM, result["output"]) for g, o in zip(g_row, o_row)
    )


def shared_point(shared, query=None):
    point = {name: to_mp(m) for name, m in SELF_POINT.items() if name not in ("x", "y")}
    point["shared"] = to_mp(shared)
    if query is not None:
        point["query_source"] = to_mp(query)
    return point


def test_derivation_records_tied_sources():
    assert self_attention().tied_sources == ("query_source", "key_source", "value_source")
    assert self_attention(SELF_POINT["y"]).tied_sources == ("key_source", "value_source")
    assert full_derivation().tied_sources == ()
    assert derive_direct(**E1).tied_sources == ()


def test_derivation_subs_keeps_tied_sources():
    x = symbol_matrix("x", 2, 2)
    d = derive(x, W_Q=sp.eye(2), W_K=sp.eye(2), W_V=sp.eye(2))
    assert d.subs({s: 1 for s in x}).tied_sources == ("query_source", "key_source", "value_source")


def test_gradient_self_attention_total_finite_differences():
    # Moving the one matrix x moves the query, key and value roles together, as in PyTorch's
    # mha(x, x, x). The query role alone is not that derivative.
    d = self_attention()
    roles = ("query_source", "key_source", "value_source")
    with mpmath.workdps(FD_DIGITS):
        expected = finite_difference_gradient(
            shared_point(SELF_POINT["x"]), "shared", weighted_output,
            shared_source_forward(roles, causal=True),
        )
        for wrt in ("source", "query_source", "key_source", "value_source"):
            assert_matches_finite_differences(d.grad(SELF_UPSTREAM, wrt), expected, wrt)


def test_gradient_self_attention_total_is_sum_of_roles():
    d = self_attention()
    parts = [d.grad("sum", role) for role in ("query_role", "key_role", "value_role")]
    total = d.grad("sum", "source")
    assert total == parts[0] + parts[1] + parts[2]
    assert d.grad("sum", "query_source") == total
    assert total != parts[0]


def test_gradient_self_attention_roles_match_backward():
    d = self_attention()
    grads = backward(d, objective_seeds(d, "sum"))
    assert d.grad("sum", "query_role") == grads["query_source"]
    assert d.grad("sum", "key_role") == grads["key_source"]
    assert d.grad("sum", "value_role") == grads["value_source"]


def test_gradient_self_attention_kv_source_finite_differences():
    # In self attention, kv_source moves only the key and value roles of x.
    d = self_attention()
    with mpmath.workdps(FD_DIGITS):
        expected = finite_difference_gradient(
            shared_point(SELF_POINT["x"], query=SELF_POINT["x"]), "shared", weighted_output,
            shared_source_forward(("key_source", "value_source"), causal=True),
        )
        assert_matches_finite_differences(d.grad(SELF_UPSTREAM, "kv_source"), expected, "kv_source")


def test_gradient_cross_attention_kv_source_finite_differences():
    d = self_attention(kv_source=SELF_POINT["y"])
    with mpmath.workdps(FD_DIGITS):
        expected = finite_difference_gradient(
            shared_point(SELF_POINT["y"], query=SELF_POINT["x"]), "shared", weighted_output,
            shared_source_forward(("key_source", "value_source"), causal=False),
        )
        for wrt in ("kv_source", "key_source", "value_source"):
            assert_matches_finite_differences(d.grad(SELF_UPSTREAM, wrt), expected, wrt)


def test_gradient_cross_attention_query_source_is_query_role():
    d = self_attention(kv_source=SELF_POINT["y"])
    assert d.grad("sum", "query_source") == d.grad("sum", "query_role")


def test_gradient_cross_attention_kv_total_is_sum_of_roles():
    d = self_attention(kv_source=SELF_POINT["y"])
    total = d.grad("sum", "kv_source")
    assert total == d.grad("sum", "key_role") + d.grad("sum", "value_role")
    assert total != d.grad("sum", "key_role")


def test_gradient_source_names_rejected_when_untied():
    separate = full_derivation()
    with pytest.raises(InvalidInputError, match="given key_source and value_source as separate matrices"):
        separate.grad("sum", "source")
    with pytest.raises(InvalidInputError, match="given key_source and value_source as separate matrices"):
        separate.grad("sum", "kv_source")
    with pytest.raises(InvalidInputError, match="the query source is a matrix of its own"):
        self_attention(kv_source=SELF_POINT["y"]).grad("sum", "source")


def test_gradient_untied_source_names_are_roles():
    d = full_derivation()
    assert d.grad("sum", "key_source") == d.grad("sum", "key_role")
    assert d.grad("sum", "value_source") == d.grad("sum", "value_role")


def test_gradient_role_names_rejected_in_direct_mode():
    with pytest.raises(InvalidInputError, match="has no sources; use 'Q', 'K' or 'V'"):
        derive_direct(**E1).grad("sum", "query_role")
    with pytest.raises(InvalidInputError, match="has no sources"):
        derive_direct(**E1).grad("sum", "source")


def test_gradient_self_attention_matches_torch_autograd():
    # nn.MultiheadAttention called as mha(x, x, x) with one leaf x: x.grad is the total
    # derivative. Float64 autograd of this small case is good to a relative 1e-12.
    torch = pytest.importorskip("torch")

    torch.manual_seed(5)
    module = torch.nn.MultiheadAttention(4, 2).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 4, dtype=torch.float64)
    causal = torch.triu(torch.ones(3, 3, dtype=torch.bool), diagonal=1)  # True = hidden
    output, _ = module(x, x, x, attn_mask=causal, need_weights=False)
    output.backward(upstream)

    # Float arrays convert to their exact binary values; PyTorch stores weights as x Wᵀ.
    weight = module.in_proj_weight.detach().numpy()
    bias = module.in_proj_bias.detach().numpy()
    d = derive(
        x.detach().numpy(), W_Q=weight[:4].T, W_K=weight[4:8].T, W_V=weight[8:].T,
        b_Q=bias[:4], b_K=bias[4:8], b_V=bias[8:], W_O=module.out_proj.weight.detach().numpy().T,
        b_O=module.out_proj.bias.detach().numpy(), heads=2, causal="top_left",
    )
    gradient = certified_decimals(d.grad(upstream.numpy(), "query_source"), 20).decimals
    autograd = x.grad.numpy()
    for i in range(3):
        for j in range(4):
            reference = mpmath.mpf(gradient[i][j])
            error = abs(mpmath.mpf(float(autograd[i, j])) - reference)
            assert error <= mpmath.mpf("1e-12") * max(1, abs(reference)), (i, j)


def test_hessian_vector_product_self_attention_source():
    # The direction moves x in all three roles, so the product is the change of the total gradient.
    x = [[Fraction(1, 2), -1], [Fraction(2, 3), Fraction(1, 5)]]
    W = {"W_Q": [[1, Fraction(1, 3)], [0, 1]], "W_K": [[Fraction(1, 2), 0], [1, 1]], "W_V": [[1, 2], [0, -1]]}
    direction = sp.Matrix([[1, 0], [Fraction(-1, 2), 2]])
    hvp = hessian_vector_product(derive(x, **W), "sum", "source", direction)
    step = sp.Rational(1, 10**25)
    shifted = [
        derive(sp.Matrix(x) + sign * step * direction, **W).grad("sum", "source") for sign in (1, -1)
    ]
    assert_matches_gradient_difference(hvp, shifted, step)


# Known answers.

def test_expression_gradient_matrix_element_is_one_hot():
    A = symbol_matrix("a", 3, 3)
    expected = sp.zeros(3, 3)
    expected[1, 1] = 1
    assert expression_gradient(A[1, 1], A) == expected


def test_expression_gradient_trace_minus_constant():
    F_ = symbol_matrix("f", 3, 3)
    assert expression_gradient((F_.T * F_).trace() - 3, F_) == 2 * F_


def test_expression_gradient_trace_plus_trace():
    F_ = symbol_matrix("f", 3, 3)
    assert expression_gradient((F_.T * F_).trace() + F_.trace(), F_) == 2 * F_ + sp.eye(3)


def test_expression_gradient_rejects_non_symbols():
    with pytest.raises(InvalidInputError, match="not a symbol"):
        expression_gradient(sp.Symbol("x"), sp.Matrix([[1, sp.Symbol("x")]]))


def test_gradient_scaled_logit_wrt_q():
    d = derive_direct(**E1)
    expected = sp.Matrix([[0, 1 / sp.sqrt(2)], [0, 0]])
    assert d.grad(("Z_scaled_0", 0, 1), "Q") == expected


def test_gradient_unscaled_logit_wrt_q():
    d = derive_direct(**E1)
    assert d.grad(("Z_0", 0, 1), "Q") == sp.Matrix([[0, 1], [0, 0]])


def test_gradient_output_wrt_v_is_weights():
    # Output row 1 is the weighted mean of V's rows with weights (1, c, c) / (1 + 2c),
    # c = e^{1/√2}, so ∂output[1,0]/∂V puts those weights in column 0.
    d = derive_direct(**E1)
    decimals = certified_decimals(d.grad(("output", 1, 0), "V"), 30).decimals
    with mpmath.workdps(40):
        c = mpmath.exp(1 / mpmath.sqrt(2))
        first, other = 1 / (1 + 2 * c), c / (1 + 2 * c)
        assert decimals[0][0] == mpmath.nstr(first, 30, strip_zeros=False)
        assert decimals[1][0] == mpmath.nstr(other, 30, strip_zeros=False)
        assert decimals[2][0] == mpmath.nstr(other, 30, strip_zeros=False)
    assert [decimals[i][1] for i in range(3)] == ["0", "0", "0"]


def test_gradient_fully_masked_rows_zeros_policy_finite():
    # Key padding hides keys 1 and 2; the second block mask hides key 0 from query 1 and keys
    # 0 and 1 from query 2, so queries 1 and 2 see no key at all.
    d = derive_direct(
        X, X, X, mask=[Mask.block([F, T, T]), Mask.block([[F, F, F], [T, F, F], [T, T, F]])],
        masked_rows="zeros",
    )
    assert d.output == sp.Matrix([[1, 0], [0, 0], [0, 0]])
    for objective in ("sum", ("output", 0, 0), ("output", 2, 1)):
        for wrt in ("Q", "K", "V"):
            gradient = d.grad(objective, wrt)
            assert not gradient.has(sp.nan, sp.zoo, sp.oo, -sp.oo), (objective, wrt)
    assert d.grad("sum", "Q") == sp.zeros(3, 2)
    assert d.grad("sum", "K") == sp.zeros(3, 2)
    assert d.grad("sum", "V") == sp.Matrix([[1, 1], [0, 0], [0, 0]])


def test_gradient_fully_masked_rows_nan_policy():
    d = derive_direct(
        X, X, X, mask=[Mask.block([F, T, T]), Mask.block([[F, F, F], [T, F, F], [T, T, F]])],
        masked_rows="nan",
    )
    assert d.grad("sum", "V").has(sp.nan)
    assert d.grad("sum", "Q") == sp.zeros(3, 2)


def test_gradient_hidden_key_gets_nothing():
    d = derive_direct(**E1, mask=Mask.block([[F, F, T], [F, F, F]]))
    gradient = d.grad(("output", 0, 1), "K")
    assert list(gradient.row(2)) == [0, 0]
    assert d.grad(("output", 0, 1), "V").row(2) == sp.Matrix([[0, 0]])


def test_gradient_bias_is_column_sum_of_projection_gradient():
    d = full_derivation()
    G_Q = backward(d, objective_seeds(d, "sum"))["Q"]
    assert d.grad("sum", "b_Q") == sp.ones(1, G_Q.rows) * G_Q


def test_gradient_key_bias_is_structural_zero():
    # A key bias adds the same q · b_K to every logit of a row, which the softmax ignores.
    assert full_derivation().grad(("output", 1, 2), "b_K") == sp.zeros(1, 4)


def test_gradient_key_bias_from_key_seed():
    assert full_derivation().grad(("K", 2, 1), "b_K") == sp.Matrix([[0, 1, 0, 0]])


def test_gradient_output_bias_of_sum_is_row_count():
    assert full_derivation().grad("sum", "b_O") == sp.Matrix([[2, 2, 2]])


# Closed-form formulas against SymPy's element-wise derivatives.

def tiny_symbolic():
    return derive_direct(symbol_matrix("q", 1, 2), symbol_matrix("k", 2, 2), symbol_matrix("v", 2, 1))


@pytest.mark.parametrize("wrt", ["Q", "K", "V"])
def test_gradient_equals_elementwise_diff_exactly(wrt):
    d = tiny_symbolic()
    gradient = d.grad(("output", 0, 0), wrt)
    matrix = d.inputs[wrt]
    for i in range(matrix.rows):
        for j in range(matrix.cols):
            difference = gradient[i, j] - sp.diff(d.output[0, 0], matrix[i, j])
            assert sp.simplify(difference) == 0, (wrt, i, j)


def test_gradient_symbolic_projection_case_at_random_points():
    d = derive(
        symbol_matrix("x", 2, 2), symbol_matrix("y", 2, 2), W_Q=symbol_matrix("a", 2, 2),
        W_K=symbol_matrix("b", 2, 2), W_V=symbol_matrix("c", 2, 2), b_V=symbol_matrix("p", 1, 2),
        W_O=symbol_matrix("o", 2, 1), heads=2,
    )
    rng = random.Random(3)
    point = {s: sp.Rational(rng.randint(-9, 9), rng.randint(1, 5)) for s in d.free_symbols}
    target = d.output[1, 0]
    for wrt in ("W_Q", "W_K", "W_V", "b_V", "W_O", "query_source"):
        gradient = d.grad(("output", 1, 0), wrt)
        matrix = d.inputs[wrt]
        for i in range(matrix.rows):
            for j in range(matrix.cols):
                ours = sp.N(gradient[i, j].xreplace(point), 60)
                plain = sp.N(sp.diff(target, matrix[i, j]).xreplace(point), 60)
                assert abs(ours - plain) < sp.Float("1e-55"), (wrt, i, j)


def test_gradient_wrt_shared_symbol_is_total_derivative():
    # Self attention over symbols: the three roles share x's entries.
    x = symbol_matrix("x", 2, 2)
    d = derive(x, W_Q=sp.eye(2), W_K=sp.eye(2), W_V=sp.eye(2))
    symbol = x[0, 1]
    point = {s: sp.Rational(k + 1, 3) for k, s in enumerate(sorted(d.free_symbols, key=str))}
    ours = d.grad(("output", 1, 1), symbol)[0, 0].xreplace(point)
    plain = sp.diff(d.output[1, 1], symbol).xreplace(point)
    assert abs(sp.N(ours - plain, 60)) < sp.Float("1e-55")


def test_softmax_backward_matches_jacobian_product():
    z = symbol_matrix("z", 1, 3)
    g = symbol_matrix("g", 1, 3)
    exps = [sp.exp(entry) for entry in z]
    a = sp.Matrix([[e / sum(exps) for e in exps]])
    by_formula = softmax_backward(a, g)
    by_jacobian = g * softmax_jacobian(a)
    for k in range(3):
        assert sp.simplify(by_formula[0, k] - by_jacobian[0, k]) == 0
        elementwise = sum(g[0, j] * sp.diff(a[0, j], z[0, k]) for j in range(3))
        assert sp.simplify(by_formula[0, k] - elementwise) == 0


# Jacobians.

def test_softmax_jacobian_rows_sum_to_zero_exactly():
    z = symbol_matrix("z", 1, 3)
    exps = [sp.exp(entry) for entry in z]
    J = softmax_jacobian(sp.Matrix([[e / sum(exps) for e in exps]]))
    for j in range(3):
        assert sp.simplify(sum(J.row(j))) == 0


def test_jacobian_softmax_stage_rows_sum_to_zero_exactly():
    d = derive_direct(**E1)
    J = d.jacobian("A_0", "Z_masked_0")
    assert J.shape == (6, 6)
    for r in range(6):
        assert sp.simplify(sum(J.row(r))) == 0


def test_jacobian_softmax_stage_blocks():
    d = derive_direct(**E1)
    J = d.jacobian("A_0", "Z_masked_0")
    for row in range(2):
        block = J[3 * row : 3 * row + 3, 3 * row : 3 * row + 3]
        expected = softmax_jacobian(d["A_0"].row(row))
        assert sp.simplify(block - expected) == sp.zeros(3, 3)
    assert J[0:3, 3:6] == sp.zeros(3, 3)
    assert J[3:6, 0:3] == sp.zeros(3, 3)


def test_jacobian_logits_wrt_q_is_k_blocks():
    d = derive_direct(**E1)
    J = d.jacobian("Z_0", "Q")
    # ∂Z[r,c]/∂Q[p,q] = δ_rp K[c,q].
    for r in range(2):
        for c in range(3):
            for p in range(2):
                for q in range(2):
                    expected = d.inputs["K"][c, q] if r == p else 0
                    assert J[3 * r + c, 2 * p + q] == expected


# Second order.

def test_hessian_vector_product_matches_gradient_differences():
    rng = random.Random(11)
    point = {name: random_rational_matrix(rng, 2, 2) for name in ("Q", "K", "V")}
    direction = [[Fraction(1, 2), -1], [Fraction(2, 3), 0]]
    d = derive_direct(point["Q"], point["K"], point["V"])
    hvp = hessian_vector_product(d, ("output", 1, 0), "K", direction)
    step = sp.Rational(1, 10**25)
    shifted = []
    for sign in (1, -1):
        K = sp.Matrix(point["K"]) + sign * step * sp.Matrix(direction)
        shifted.append(derive_direct(point["Q"], K, point["V"]).grad(("output", 1, 0), "K"))
    assert_matches_gradient_difference(hvp, shifted, step)


def test_hessian_vector_product_linear_input_is_zero():
    # The output is linear in V, so its Hessian with respect to V is zero; a leftover ε or a
    # wrong derivative would show here.
    d = derive_direct(**E1)
    assert hessian_vector_product(d, "sum", "V", [[1, 0], [0, 1], [1, 1]]) == sp.zeros(3, 2)


def test_hessian_vector_product_rejects_wrong_direction_shape():
    with pytest.raises(ShapeError, match="direction has shape"):
        hessian_vector_product(derive_direct(**E1), "sum", "Q", [[1, 0]])


# Objectives and errors.

def test_parse_objective_forms():
    assert parse_objective("sum") == "sum"
    assert parse_objective("output[0,1]") == ("output", 0, 1)
    assert parse_objective(" A_1[2, 0] ") == ("A_1", 2, 0)


def test_parse_objective_rejects_text():
    with pytest.raises(InvalidInputError, match="expected 'sum' or a stage entry"):
        parse_objective("output[0]")


def test_parse_objective_rejects_non_ascii_digits():
    with pytest.raises(InvalidInputError, match="is not valid"):
        parse_objective("output[\u0663,0]")  # ARABIC-INDIC DIGIT THREE, which int() accepts


def test_objective_string_entry_equals_tuple():
    d = derive_direct(**E1)
    assert d.grad("output[1,1]", "Q") == d.grad(("output", 1, 1), "Q")


def test_objective_upstream_shape_mismatch():
    with pytest.raises(ShapeError, match="upstream gradient has shape"):
        derive_direct(**E1).grad([[1, 2, 3]], "Q")


def test_objective_entry_out_of_range():
    with pytest.raises(InvalidInputError, match="row index 5"):
        derive_direct(**E1).grad(("output", 5, 0), "Q")


def test_objective_symbolic_upstream():
    d = derive_direct(**E1)
    G = symbol_matrix("g", 2, 2)
    gradient = d.grad(G, "V")
    assert gradient.free_symbols == set(G)
    assert gradient.xreplace({G[0, 0]: 1, G[0, 1]: 0, G[1, 0]: 0, G[1, 1]: 0}) == d.grad(("output", 0, 0), "V")


def test_grad_rejects_unknown_wrt():
    with pytest.raises(InvalidInputError, match="expected an input or stage name"):
        derive_direct(**E1).grad("sum", "W_Q")


def test_grad_wrt_stage_is_upstream_of_that_stage():
    d = derive_direct(**E1)
    assert d.grad("sum", "output") == sp.ones(2, 2)
    assert d.grad(("output", 0, 1), "A_0") == sp.Matrix([[2, 4, 6], [0, 0, 0]])


def test_grad_module_function_equals_method():
    d = derive_direct(**E1)
    assert grad(d, "sum", "K") == d.grad("sum", "K")


def test_gradient_entries_stay_compact():
    # Reverse mode reuses the forward entries instead of expanding them: the gradient entry of a
    # 2-head case stays within a small multiple of the size of the output entry it comes from.
    d = full_derivation()
    size_output = sp.count_ops(d.output[1, 2])
    size_gradient = max(sp.count_ops(entry) for entry in d.grad(("output", 1, 2), "W_Q"))
    assert size_gradient < 4 * size_output


# Decimal evaluation.

def test_certified_decimals_bounds_cancelling_zero():
    # Query 0 of E1 weighs keys 0 and 2 equally, and their value sums 3 and 11 lie symmetric
    # around the mean 7, so ∂sum/∂Q[0, 0] is 0 only after two terms cancel. Balls cannot
    # prove that, so the entry is a zero within a stated, tiny radius.
    result = certified_decimals(derive_direct(**E1).grad("sum", "Q"), 30)
    assert result.decimals[0][0] == "0"
    assert 0.0 < result.radii[0][0] < 1e-300
    assert result.bounded_zeros == ((0, 0),)
    assert result.decimals[0][1] != "0"


def test_certified_decimals_rejects_symbols():
    from symattn import EvaluationError

    with pytest.raises(EvaluationError, match="contains the symbols x"):
        certified_decimals(sp.Matrix([[sp.Symbol("x")]]), 10)


def test_matrix_to_decimals_negative_keeps_all_digits():
    # Negating a Decimal with unary minus rounds to the default context's 28 digits; gradient
    # entries are often negative, so both evaluation paths must keep every digit.
    from symattn import matrix_to_decimals

    with mpmath.workdps(50):
        expected = "-" + mpmath.nstr(mpmath.e, 40, strip_zeros=False)
    assert matrix_to_decimals(sp.Matrix([[-sp.E]]), 40)[0][0] == expected
    assert certified_decimals(sp.Matrix([[-sp.E]]), 40).decimals[0][0] == expected
