"""Expected values for publicly reported attention bugs, restated with small inputs.

Each expected value is a closed form evaluated here with plain mpmath (independently of
symattn's evaluation), and also given as the decimal string from the report.
"""

import warnings

import mpmath
import pytest
import sympy as sp

from symattn import Mask, MaskError, SymattnWarning, derive, derive_direct, matrix_to_decimals, softmax_rows
from symattn.export.numbers import derivation_to_dict

T, F = True, False
with mpmath.workdps(40):
    C = mpmath.exp(1 / mpmath.sqrt(2))  # c = e^{1/√2}, the weight ratio that E1's scaled logits produce

# E1: cross attention, one head, d_k = 2, given directly as Q, K, V.
E1 = {"Q": [[1, 0], [0, 1]], "K": [[1, 0], [0, 1], [1, 1]], "V": [[1, 2], [3, 4], [5, 6]]}
# E2: self attention over X, one head.
X = [[1, 0], [0, 1], [1, 1]]


def digits20(value) -> str:
    return mpmath.nstr(value, 20, strip_zeros=False)


@pytest.fixture(autouse=True)
def forty_digits():
    with mpmath.workdps(40):
        yield


def test_unmasked_cross_attention_row_values():
    output = derive_direct(**E1).output
    assert matrix_to_decimals(output, 20)[0] == ["3.0000000000000000000", "4.0000000000000000000"]
    row1 = matrix_to_decimals(output, 20)[1]
    assert row1 == ["3.4066725560787154619", "4.4066725560787154619"]
    assert row1[0] == digits20((1 + 8 * C) / (1 + 2 * C))


def test_unmasked_cross_attention_row0_simplifies_to_integers():
    output = derive_direct(**E1).output
    assert sp.simplify(output[0, 0]) == 3
    assert sp.simplify(output[0, 1]) == 4


def test_keep_mask_with_empty_row_under_zeros_policy():
    mask = Mask.keep([[T, T, F], [F, F, F]])
    derivation = derive_direct(**E1, mask=mask, masked_rows="zeros")
    values = matrix_to_decimals(derivation.output, 20)
    assert values[0] == ["1.6604769013466861488", "2.6604769013466861488"]
    assert values[0][0] == digits20((C + 3) / (C + 1))
    assert values[0][1] == digits20((2 * C + 4) / (C + 1))
    assert list(derivation.output.row(1)) == [0, 0]


def test_empty_row_error_names_row():
    with pytest.raises(MaskError, match="query rows 1[;)]"):
        derive_direct(**E1, mask=Mask.keep([[T, T, F], [F, F, F]]))


def test_keep_mask_with_empty_row_nan_policy():
    derivation = derive_direct(**E1, mask=Mask.keep([[T, T, F], [F, F, F]]), masked_rows="nan")
    assert all(entry is sp.nan for entry in derivation.output.row(1))
    assert all(entry is not sp.nan for entry in derivation.output.row(0))


def test_additive_minus_infinity_equals_keep_mask():
    keep = derive_direct(**E1, mask=Mask.keep([[T, T, F], [F, F, F]]), masked_rows="zeros")
    inf = float("-inf")
    additive = derive_direct(**E1, mask=Mask.additive([[0, 0, inf], [inf, inf, inf]]), masked_rows="zeros")
    assert additive.output == keep.output
    assert matrix_to_decimals(additive.output, 30) == matrix_to_decimals(keep.output, 30)


def test_finite_additive_mask_is_added_not_thresholded():
    derivation = derive_direct(**E1, mask=Mask.additive([["1/2", -1, 0], [0, 0, 2]]))
    values = matrix_to_decimals(derivation.output, 20)
    assert values[0] == ["2.5415577363914413606", "3.5415577363914413606"]
    assert values[1] == ["4.5527787709189329890", "5.5527787709189329890"]
    s = 1 / mpmath.sqrt(2)
    weights = [mpmath.exp(s + mpmath.mpf(1) / 2), mpmath.exp(-1), mpmath.exp(s)]
    expected_row0 = sum(w * v for w, v in zip(weights, (1, 3, 5))) / sum(weights)
    assert values[0][0] == digits20(expected_row0)
    assert all(entry is not sp.nan for entry in derivation.output)


def test_zero_one_additive_mask_warns():
    with pytest.warns(SymattnWarning, match="only 0s and 1s"):
        mask = Mask.additive([[1, 1, 0], [1, 1, 1]])
    derivation = derive_direct(**E1, mask=mask)
    values = matrix_to_decimals(derivation.output, 20)
    assert values[0] == ["2.3206467737961984007", "3.3206467737961984007"]
    unmasked = matrix_to_decimals(derive_direct(**E1).output, 20)
    assert values[1] == unmasked[1]


def test_boolean_mask_without_kind_rejected():
    with pytest.raises(MaskError, match="no stated kind"):
        derive_direct(**E1, mask=[[T, T, F], [T, T, T]])


def test_block_mask_causal_result():
    upper = [[F, T, T], [F, F, T], [F, F, F]]
    derivation = derive_direct(X, X, X, mask=Mask.block(upper))
    values = matrix_to_decimals(derivation.output, 20)
    assert derivation.output.row(0) == sp.Matrix([[1, 0]])
    assert values[1] == ["0.33023845067334307438", "0.66976154932665692562"]
    assert values[2] == ["0.75174492174227693031", "0.75174492174227693031"]
    assert values[1][0] == digits20(1 / (1 + C))


def test_keep_and_block_polarity_are_opposite():
    upper = [[F, T, T], [F, F, T], [F, F, F]]
    lower_or_diagonal = [[not entry for entry in row] for row in upper]
    block = derive_direct(X, X, X, mask=Mask.block(upper))
    keep = derive_direct(X, X, X, mask=Mask.keep(lower_or_diagonal))
    causal = derive_direct(X, X, X, causal="top_left")
    assert block.output == keep.output
    assert block.output == causal.output


def test_valid_key_length_hides_padding():
    derivation = derive_direct(**E1, key_length=2)
    values = matrix_to_decimals(derivation.output, 20)
    assert values[0] == ["1.6604769013466861488", "2.6604769013466861488"]
    assert values[1] == ["2.3395230986533138512", "3.3395230986533138512"]
    assert values[1][0] == digits20((1 + 3 * C) / (1 + C))
    assert derivation["A_0"][0, 2] == 0
    assert derivation["A_0"][1, 2] == 0


def test_valid_key_length_recorded():
    derivation = derive_direct(**E1, key_length=2)
    assert derivation.spec.key_length == 2
    assert derivation_to_dict(derivation, 10)["spec"]["key_length"] == 2


def test_scale_uses_per_head_width():
    # d_model = 4 and 2 heads, so d_k = 2 and s = 1/√2, not 1/√4.
    Q = [[1, 1, 0, 0]]
    K = [[1, 1, 0, 0], [1, -1, 0, 0]]
    V = [[1, 0], [0, 0]]
    derivation = derive_direct(Q, K, V, heads=2)
    assert derivation.scale == 1 / sp.sqrt(2)
    weight = derivation["O_0"][0, 0]
    assert matrix_to_decimals(sp.Matrix([[weight]]), 20)[0][0] == "0.80442968250695690519"
    expected = mpmath.exp(mpmath.sqrt(2)) / (1 + mpmath.exp(mpmath.sqrt(2)))
    assert matrix_to_decimals(sp.Matrix([[weight]]), 20)[0][0] == digits20(expected)


def test_scale_sqrt_seq_is_named_option():
    Q = [[1, 1, 0, 0]]
    K = [[1, 1, 0, 0], [1, -1, 0, 0]]
    V = [[1, 0], [0, 0]]
    assert derive_direct(Q, K, V, heads=2, scale="sqrt_seq").scale == 1 / sp.sqrt(2)  # n_kv = 2
    assert derive_direct(Q, K, V, heads=2, scale="none").scale == 1


def test_softmax_rows_of_logits():
    A = softmax_rows(sp.Matrix([[1, 2, 3], [1, 1, 1]]))
    values = matrix_to_decimals(A, 20)
    assert values[0] == ["0.090030573170380457998", "0.24472847105479765247", "0.66524095577482188953"]
    assert list(A.row(1)) == [sp.Rational(1, 3)] * 3
    e = mpmath.e
    assert values[0][2] == digits20(e**3 / (e + e**2 + e**3))


def test_softmax_rows_sum_exactly_to_one():
    A = softmax_rows(sp.Matrix([[1, 2, 3], [1, 1, 1]]))
    for i in range(2):
        assert sp.together(sum(A.row(i))) == 1


def test_heads_split_into_contiguous_blocks():
    Q = [[0, 1, 2, 3], [4, 5, 6, 7]]
    derivation = derive_direct(Q, Q, [[1, 0], [0, 1]], heads=2)
    assert derivation["Q_0"] == sp.Matrix([[0, 1], [4, 5]])
    assert derivation["Q_1"] == sp.Matrix([[2, 3], [6, 7]])
    assert derivation["Z_0"] == sp.Matrix([[1, 5], [5, 41]])


def test_decimal_input_string_stays_exact():
    derivation = derive_direct([["2.1"]], [[1]], [[1]])
    assert derivation["Q"][0, 0] == sp.Rational(21, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        derive_direct([[0.1]], [[1]], [[1]])  # floats are exact, not a warning
    assert derive_direct([[0.1]], [[1]], [[1]])["Q"][0, 0] == sp.Rational(3602879701896397, 36028797018963968)
