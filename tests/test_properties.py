"""Properties of the exact derivation over random shapes, heads, masks, scales and exact inputs.

Inputs mix ints, Fractions, decimal strings and floats (taken at their exact binary value), so
every property is checked exactly or to a stated number of correctly rounded digits. The
number of examples is modest so that the file runs in about a minute; set
SYMATTN_PROPERTY_EXAMPLES to run more.
"""

import decimal
import fractions
import json
import os

import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from symattn import EvaluationError, InvalidInputError, Mask, derive, derive_direct, matrix_to_decimals
from symattn.export.json_reader import parse_derivation_json, rederive
from symattn.export.numbers import derivation_to_json
from symattn.numeric.reference import compute_reference
from symattn.problem import Problem

EXAMPLES = int(os.environ.get("SYMATTN_PROPERTY_EXAMPLES", "50"))
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
SCALES = ["sqrt_dk", "sqrt_seq", "none", "1/2", "-3/4", "1/sqrt(3)", "1/sqrt(5/2)"]

exact_values = st.one_of(
    st.integers(-3, 3),
    st.fractions(min_value=-3, max_value=3, max_denominator=7),
    st.decimals(min_value=-3, max_value=3, places=2, allow_nan=False, allow_infinity=False).map(str),
    st.floats(min_value=-3, max_value=3, allow_nan=False, allow_infinity=False, width=32),
)
names = st.sampled_from(["a", "b", "w", "x_1"])


def matrices(rows, cols, values=exact_values):
    return st.lists(st.lists(values, min_size=cols, max_size=cols), min_size=rows, max_size=rows)


@st.composite
def attention_cases(draw, symbolic=False):
    """Draw keyword arguments for derive_direct: Q, K, V, heads, scale, masks, policy, W_O."""
    heads = draw(st.integers(1, 2))
    d_k = draw(st.integers(1, 2))
    d_v = draw(st.integers(1, 2))
    n_q = draw(st.integers(1, 3))
    n_kv = draw(st.integers(1, 3))
    values = st.one_of(exact_values, names) if symbolic else exact_values

    case = {
        "Q": draw(matrices(n_q, heads * d_k, values)),
        "K": draw(matrices(n_kv, heads * d_k, values)),
        "V": draw(matrices(n_kv, heads * d_v, values)),
        "heads": heads,
        "scale": draw(st.sampled_from(SCALES)),
        "masked_rows": draw(st.sampled_from(["zeros", "nan"])),
    }
    mask_kind = draw(st.sampled_from([None, "keep", "block", "additive"]))
    if mask_kind == "additive":
        bias = st.one_of(st.integers(-2, 2), st.fractions(-2, 2, max_denominator=4), st.just("-inf"))
        case["mask"] = Mask.additive(draw(matrices(n_q, n_kv, bias)))
    elif mask_kind is not None:
        case["mask"] = Mask.create(mask_kind, draw(matrices(n_q, n_kv, st.booleans())))
    if draw(st.booleans()):
        case["W_O"] = draw(matrices(heads * d_v, draw(st.integers(1, 2))))
    return case


def permute_rows(rows, order):
    return [rows[k] for k in order]


def permute_mask(mask, query_order=None, key_order=None):
    """Return the 2-D mask with its query rows and key columns reordered."""
    if mask is None:
        return None
    n_q, n_kv = mask.shape
    query_order = query_order or list(range(n_q))
    key_order = key_order or list(range(n_kv))
    values = [[mask.values[i * n_kv + j] for j in key_order] for i in query_order]
    if mask.kind == "additive":
        values = [["-inf" if value == -sp.oo else value for value in row] for row in values]
    return Mask.create(mask.kind, values)


def visible_rows(derivation, head):
    return [i for i, row in enumerate(derivation.visible[head]) if any(row)]


@PROPERTY_SETTINGS
@given(attention_cases(symbolic=True))
def test_softmax_rows_sum_to_one(case):
    derivation = derive_direct(**case)
    for head in range(derivation.heads):
        A = derivation.stage("A", head=head)
        for i in range(A.rows):
            total = sp.together(sum(A.row(i)))
            if i in visible_rows(derivation, head):
                assert total == 1
            elif case["masked_rows"] == "zeros":
                assert total == 0


@PROPERTY_SETTINGS
@given(attention_cases(symbolic=True), st.randoms(use_true_random=False))
def test_key_value_permutation_keeps_output(case, random):
    n_kv = len(case["K"])
    order = list(range(n_kv))
    random.shuffle(order)
    permuted = dict(
        case,
        K=permute_rows(case["K"], order),
        V=permute_rows(case["V"], order),
        mask=permute_mask(case.get("mask"), key_order=order),
    )
    assert derive_direct(**permuted).output == derive_direct(**case).output


@PROPERTY_SETTINGS
@given(attention_cases(symbolic=True), st.randoms(use_true_random=False))
def test_query_permutation_permutes_rows(case, random):
    n_q = len(case["Q"])
    order = list(range(n_q))
    random.shuffle(order)
    permuted = dict(case, Q=permute_rows(case["Q"], order), mask=permute_mask(case.get("mask"), query_order=order))
    output = derive_direct(**case).output
    permuted_output = derive_direct(**permuted).output
    for new_row, old_row in enumerate(order):
        assert permuted_output.row(new_row) == output.row(old_row)


def same_values(first, second):
    """Compare two matrices of decimal strings by value, so that "0.1" equals "0.10000".

    SymPy writes an exact rational entry with its terminating digits only, while the certified
    engine, which computes an interval around it, writes all requested digits.
    """
    if len(first) != len(second):
        return False
    for row_a, row_b in zip(first, second):
        if len(row_a) != len(row_b):
            return False
        for a, b in zip(row_a, row_b):
            if a == b:
                continue
            if "nan" in (a, b) or decimal.Decimal(a) != decimal.Decimal(b):
                return False
    return True


@PROPERTY_SETTINGS
@given(attention_cases(), st.integers(5, 30))
def test_certified_engine_matches_sympy(case, digits):
    derivation = derive_direct(**case)
    reference = compute_reference(Problem.from_derivation(derivation), digits, stages=["A_0", "output"])
    assert same_values(reference["A_0"].decimals(), matrix_to_decimals(derivation["A_0"], digits))
    try:
        output = reference.output.decimals()
    except EvaluationError as error:
        # Intervals never shrink to an exact zero reached through cancellation, such as
        # (0 + 1 - 1)/3; the engine reports that, and the exact path shows the zero.
        assert "exact zero reached through cancellation" in str(error)
        assert 0 in list(derivation.output)
        return
    assert same_values(output, matrix_to_decimals(derivation.output, digits))


def test_certified_comparison_by_value():
    # Equal weights 1/2 on the values 0 and 1/5: the output is exactly 1/10.
    derivation = derive_direct([[0, 0]], [[0, 0], [0, 0]], [[0], [fractions.Fraction(1, 5)]])
    reference = compute_reference(Problem.from_derivation(derivation), 5, stages=["output"])
    assert matrix_to_decimals(derivation.output, 5) == [["0.1"]]
    assert same_values(reference.output.decimals(), [["0.1"]])
    assert not same_values([["0.10001"]], [["0.1"]])


@PROPERTY_SETTINGS
@given(attention_cases(symbolic=True), st.integers(3, 25))
def test_json_export_round_trips(case, digits):
    derivation = derive_direct(**case)
    text = derivation_to_json(derivation, digits)
    record = parse_derivation_json(text)

    assert record.inputs == derivation.inputs
    for name, matrix in derivation.stages.items():
        if all(isinstance(entry, sp.Rational) for entry in matrix):
            assert record.stages[name] == matrix
        else:
            assert record.stages[name] is None
    assert derivation_to_json(rederive(record), digits) == text


@settings(max_examples=max(EXAMPLES // 2, 10), deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.data())
def test_projection_json_round_trips(heads, n_q, n_kv, data):
    width = 2 * heads
    derivation = derive(
        data.draw(matrices(n_q, 2)),
        data.draw(matrices(n_kv, 3)),
        W_Q=data.draw(matrices(2, width)),
        W_K=data.draw(matrices(3, width)),
        W_V=data.draw(matrices(3, heads, st.one_of(exact_values, names))),
        b_Q=data.draw(matrices(1, width))[0],
        heads=heads,
        masked_rows="zeros",
    )
    text = derivation_to_json(derivation, 12)
    assert derivation_to_json(rederive(parse_derivation_json(text)), 12) == text


def test_float_entries_read_back_exactly():
    # 0.1 as a float is 3602879701896397/36028797018963968, and the JSON keeps every digit.
    derivation = derive_direct([[0.1]], [[1]], [[fractions.Fraction(1, 3)]])
    record = parse_derivation_json(derivation_to_json(derivation, 10))
    assert record.inputs["Q"][0, 0] == sp.Rational(3602879701896397, 36028797018963968)
    assert record.inputs["V"][0, 0] == sp.Rational(1, 3)


def test_edited_json_rejected():
    derivation = derive_direct([[1, 0]], [[1, 0], [0, 1]], [[1], [2]])
    document = json.loads(derivation_to_json(derivation, 10))
    document["stages"]["Z_0"]["exact"][0][1] = "1/3"
    with pytest.raises(InvalidInputError, match=r"stages.Z_0.exact\[0\]\[1\] is '1/3', but the inputs give '0'"):
        rederive(parse_derivation_json(json.dumps(document)))


def test_edited_decimal_rejected():
    derivation = derive_direct([[1, 0]], [[1, 0], [0, 1]], [[1], [2]])
    document = json.loads(derivation_to_json(derivation, 10))
    document["stages"]["output"]["decimal"][0][0] = "1.330238452"
    with pytest.raises(InvalidInputError, match=r"stages.output.decimal\[0\]\[0\] is '1.330238452'"):
        rederive(parse_derivation_json(json.dumps(document)))


def test_equal_logits_get_equal_weights():
    # Both keys give the logit w + 1/100. SymPy left e^z / (2 e^z) as exp(z)·exp(−z)/2, which
    # is 1/2 but not structurally, so the row sum did not simplify to 1.
    derivation = derive_direct([[1, 1]], [["w", "0.01"], ["w", "0.01"]], [[0], [3]], scale="none")
    assert derivation["A_0"] == sp.Matrix([[sp.Rational(1, 2), sp.Rational(1, 2)]])
    assert derivation.output == sp.Matrix([[sp.Rational(3, 2)]])
