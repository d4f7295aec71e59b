"""Resource limits: the expression-size estimate, the derivation limit and input file sizes."""

import importlib
import random

import numpy as np
import pytest
import sympy as sp

from symattn import InvalidInputError, Mask, ResourceLimitError, derive, derive_direct, symbol_matrix
from symattn.limits import (
    DEFAULT_MAX_EXPRESSION_SIZE,
    RATIONAL,
    EntrySize,
    check_file_size,
    entry_size,
    estimate_expression_size,
    matmul_size,
    product_size,
    read_limited,
    softmax_size,
)


def tree_size(expr):
    """Count the nodes of an expression tree, a shared subtree once per appearance."""
    count = 0
    stack = [expr]
    while stack:
        node = stack.pop()
        count += 1
        stack.extend(node.args)
    return count


def actual_size(derivation):
    return sum(tree_size(entry) for matrix in derivation.stages.values() for entry in matrix)


def estimated_tree_size(derivation):
    estimate = estimate_expression_size(derivation.spec, derivation.inputs, derivation.direct)
    return estimate.total - estimate.stages["rational arithmetic"]


def fractions_matrix(rows, cols, seed):
    rng = random.Random(seed)
    return [[f"{rng.randint(1, 9)}/{rng.randint(1, 9)}" for _ in range(cols)] for _ in range(rows)]


def symbolic_projection_case():
    return derive(
        symbol_matrix("x", 2, 2), symbol_matrix("y", 2, 2),
        W_Q=symbol_matrix("a", 2, 2), W_K=symbol_matrix("b", 2, 2), W_V=symbol_matrix("c", 2, 2),
        W_O=symbol_matrix("o", 2, 2),
    )


SIZE_CASES = {
    "symbolic projections": symbolic_projection_case,
    "symbolic direct": lambda: derive_direct(symbol_matrix("q", 2, 2), symbol_matrix("k", 2, 2), symbol_matrix("v", 2, 2)),
    "symbolic two heads, rational scale": lambda: derive_direct(
        symbol_matrix("q", 3, 4), symbol_matrix("k", 3, 4), symbol_matrix("v", 3, 4), heads=2, scale="1/8"
    ),
    "numeric sources, symbolic weights": lambda: derive(
        fractions_matrix(3, 3, 1), fractions_matrix(3, 3, 2), W_Q=symbol_matrix("a", 3, 2),
        W_K=symbol_matrix("b", 3, 2), W_V=fractions_matrix(3, 2, 3), W_O=fractions_matrix(2, 2, 4),
    ),
    "numeric two heads": lambda: derive(
        fractions_matrix(6, 4, 1), fractions_matrix(5, 4, 2), W_Q=fractions_matrix(4, 4, 3),
        W_K=fractions_matrix(4, 4, 4), W_V=fractions_matrix(4, 4, 5), W_O=fractions_matrix(4, 4, 6), heads=2,
    ),
    "numeric additive mask": lambda: derive_direct(
        fractions_matrix(3, 2, 1), fractions_matrix(4, 2, 2), fractions_matrix(4, 2, 3),
        mask=Mask.additive([["1/2", -1, 0, 2]] * 3),
    ),
    "symbolic additive mask": lambda: derive_direct(
        symbol_matrix("q", 2, 2), symbol_matrix("k", 3, 2), fractions_matrix(3, 2, 3),
        mask=Mask.additive([["m", 0, "-inf"]] * 2),
    ),
    "one key": lambda: derive_direct(symbol_matrix("q", 2, 2), symbol_matrix("k", 1, 2), symbol_matrix("v", 1, 2)),
}


@pytest.mark.parametrize("name", list(SIZE_CASES))
def test_estimate_bounds_actual_size(name):
    derivation = SIZE_CASES[name]()
    actual = actual_size(derivation)
    estimate = estimated_tree_size(derivation)
    assert estimate >= actual
    assert estimate <= 3 * actual


def test_entry_size_counts_nodes():
    x, y = sp.symbols("x y")
    assert entry_size(sp.Rational(3, 4)) == RATIONAL
    assert entry_size(x) == EntrySize(1, 1, False)
    # Add(Mul(x, y), Integer(2)): five nodes, two terms.
    assert entry_size(x * y + 2) == EntrySize(5, 2, False)


def test_product_size_rules():
    symbol = EntrySize(1, 1, False)
    sum_of_three = EntrySize(7, 3, False)  # x*y + z + w
    assert product_size(RATIONAL, RATIONAL) == RATIONAL
    assert product_size(symbol, symbol) == EntrySize(3, 1, False)
    # A number distributes over a sum: 2(xy + z + w) = 2xy + 2z + 2w, at most two nodes per term.
    assert product_size(RATIONAL, sum_of_three) == EntrySize(13, 3, False)


def test_matmul_size_of_symbol_matrices():
    # (x_{1,1} y_{1,1} + x_{1,2} y_{2,1}): one Add over two Muls of two symbols.
    symbol = EntrySize(1, 1, False)
    assert matmul_size(symbol, symbol, 2) == EntrySize(7, 2, False)
    assert matmul_size(RATIONAL, RATIONAL, 768) == RATIONAL


def test_softmax_size_by_hand():
    # exp(z)/(exp(z) + exp(w)) for symbols z, w: Mul(exp(z), Pow(Add(exp(z), exp(w)), -1)).
    z, w = sp.symbols("z w")
    weight = sp.exp(z) / (sp.exp(z) + sp.exp(w))
    assert softmax_size(EntrySize(1, 1, False), 2).nodes == tree_size(weight)
    assert softmax_size(EntrySize(5, 2, False), 1) == RATIONAL


def test_tutorial_symbolic_case_passes_default_limit():
    derivation = symbolic_projection_case()
    assert estimated_tree_size(derivation) < DEFAULT_MAX_EXPRESSION_SIZE
    assert derivation.output.shape == (2, 2)


def test_large_numeric_case_rejected_with_hint():
    # The shapes of one BERT-base attention layer over 128 tokens: 12 heads of width 64.
    X = np.random.default_rng(0).integers(-3, 4, size=(128, 768))
    with pytest.raises(ResourceLimitError) as raised:
        derive_direct(X, X, X, heads=12)
    message = str(raised.value)
    assert "10,031,235,072 expression nodes" in message
    assert "max_expression_size = 2,000,000" in message
    assert "compute_reference" in message
    assert "`symattn reference CASE --out FILE`" in message
    assert "smaller case" in message


def test_limit_checked_before_stages_built(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a stage was built although the size check should have stopped the derivation")

    derive_module = importlib.import_module("symattn.derive")  # the package's `derive` is the function
    monkeypatch.setattr(derive_module, "softmax_rows", fail)
    monkeypatch.setattr(derive_module, "_project", fail)
    with pytest.raises(ResourceLimitError, match="above the limit max_expression_size = 1,000"):
        derive(
            symbol_matrix("x", 2, 2), symbol_matrix("y", 2, 2),
            W_Q=symbol_matrix("a", 2, 2), W_K=symbol_matrix("b", 2, 2), W_V=symbol_matrix("c", 2, 2),
            max_expression_size=1000,
        )


def test_limit_off_with_none():
    derivation = derive_direct([[1, 0]], [[1, 0], [0, 1]], [[1], [2]], max_expression_size=None)
    assert derivation.output.shape == (1, 1)


@pytest.mark.parametrize("bad", [0, -5, 2.5, "1000", True])
def test_limit_value_validated(bad):
    with pytest.raises(InvalidInputError, match="max_expression_size is"):
        derive_direct([[1]], [[1]], [[1]], max_expression_size=bad)


def test_file_size_over_limit_rejected(tmp_path):
    path = tmp_path / "case.toml"
    path.write_bytes(b"x" * 101)
    with pytest.raises(ResourceLimitError, match=r"case.toml' is 101 bytes, above the limit of 100 bytes"):
        check_file_size(path, "case file", max_bytes=100)
    with pytest.raises(ResourceLimitError, match="above the limit of 100 bytes"):
        read_limited(path, "case file", max_bytes=100)


def test_file_size_within_limit_read(tmp_path):
    path = tmp_path / "case.toml"
    path.write_bytes(b"x" * 100)
    assert check_file_size(path, "case file", max_bytes=100) == 100
    assert read_limited(path, "case file", max_bytes=100) == b"x" * 100


def test_missing_file_named(tmp_path):
    with pytest.raises(InvalidInputError, match=r"case file '.*absent.toml' does not exist"):
        read_limited(tmp_path / "absent.toml", "case file")
