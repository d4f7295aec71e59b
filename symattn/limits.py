"""Resource limits: the size of the exact stages, estimated from shapes before any stage is built.

SymPy builds the stages without simplifying them, so their size follows from the shapes alone.
A softmax entry e^{z_ij} / Σ_k e^{z_ik} repeats its whole row, and each output entry sums n_kv
of them, so the output of one head grows like n_q · d_v · n_kv² · (size of a logit). A rational
matrix product collapses to rational numbers, but a symbolic one grows with its inner width.

The measure is the *expression size*: the number of expression-tree nodes in all stages, plus
one for each exact arithmetic operation on rational entries. A subexpression shared between
entries counts each time it appears, because printing, evaluation and export walk it each time.
The estimate assumes that no entry is zero and no terms cancel, so it bounds the trees SymPy
builds from above, within a factor of three on the cases in tests/test_limits.py.

Measured on one 2-core x86 machine (SymPy 1.14, Python 3.11): the stages were built at 100,000
to 400,000 nodes per second, and the JSON export to 20 digits walked about 10,000 nodes per second.
"""

from __future__ import annotations

import numbers
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sympy as sp

from .errors import InvalidInputError, ResourceLimitError

# About 10 s to build and a few minutes to export on the machine above. A one-head case with
# n_q = n_kv = d = 2 whose inputs and weights are all symbols has an estimated size of 4,096.
DEFAULT_MAX_EXPRESSION_SIZE = 2_000_000

# The largest input file (TOML, JSON, .npz) that a reader loads into memory.
MAX_INPUT_FILE_BYTES = 256 * 1024 * 1024

_NUMERIC_HINT = (
    "Use the numeric mode instead (symattn.numeric.reference.compute_reference in Python, or "
    "`symattn reference CASE --out FILE` for a case file as docs/case-format.md describes): its "
    "certified engine evaluates the same formulas to the requested digits without building "
    "expressions"
)


@dataclass(frozen=True)
class EntrySize:
    """The estimated tree size of one entry of a matrix, the same for all its entries.

    ``nodes``: nodes in the entry's expression tree. ``terms``: top-level terms when the entry
    is a sum, else 1. ``rational``: every entry is a rational number, so sums and products of
    such entries collapse to one number.
    """

    nodes: int
    terms: int
    rational: bool


RATIONAL = EntrySize(nodes=1, terms=1, rational=True)


@dataclass(frozen=True)
class SizeEstimate:
    """The estimated expression size of a derivation, in total and by stage.

    ``stages`` also has the entry "rational arithmetic": the operations of the rational products.
    """

    total: int
    stages: dict[str, int]


def entry_size(expr: sp.Expr) -> EntrySize:
    """Measure one exact expression: its tree nodes and its top-level terms."""
    if isinstance(expr, sp.Rational):
        return RATIONAL
    if isinstance(expr, sp.Atom):
        return EntrySize(1, 1, False)
    nodes = sum(1 for _ in sp.preorder_traversal(expr))
    terms = len(expr.args) if isinstance(expr, sp.Add) else 1
    return EntrySize(nodes, terms, False)


def matrix_entry_size(matrix: sp.MatrixBase) -> EntrySize:
    """Return the largest entry size of a matrix, as the size of every entry."""
    # SymPy 1.14 stores a dense matrix as a DomainMatrix whose domain is ZZ or QQ exactly
    # when every entry is rational, which avoids a pass over a large numeric matrix.
    domain = getattr(getattr(matrix, "_rep", None), "domain", None)
    if domain is not None and (domain.is_ZZ or domain.is_QQ):
        return RATIONAL
    entries = list(matrix)
    if all(isinstance(entry, sp.Rational) for entry in entries):
        return RATIONAL
    measured = [entry_size(entry) for entry in entries]
    return EntrySize(
        nodes=max(size.nodes for size in measured),
        terms=max(size.terms for size in measured),
        rational=False,
    )


def product_size(a: EntrySize, b: EntrySize) -> EntrySize:
    """Estimate the size of a · b."""
    if a.rational and b.rational:
        return RATIONAL
    if a.rational or b.rational:
        # SymPy distributes a number over a sum: 2(x + y) becomes 2x + 2y.
        other = b if a.rational else a
        if other.terms > 1:
            return EntrySize(other.nodes + 2 * other.terms, other.terms, False)
    return EntrySize(a.nodes + b.nodes + 1, 1, False)


def sum_size(term: EntrySize, count: int) -> EntrySize:
    """Estimate the size of a sum of ``count`` terms of the given size."""
    if term.rational or count == 1:
        return term
    return EntrySize(count * term.nodes + 1, count * term.terms, False)


def add_size(a: EntrySize, b: EntrySize) -> EntrySize:
    """Estimate the size of a + b."""
    if a.rational and b.rational:
        return RATIONAL
    return EntrySize(a.nodes + b.nodes + 1, a.terms + b.terms, False)


def matmul_size(a: EntrySize, b: EntrySize, inner: int) -> EntrySize:
    """Estimate the entry size of A B, where A has ``inner`` columns."""
    return sum_size(product_size(a, b), inner)


def softmax_size(z: EntrySize, n_kv: int) -> EntrySize:
    """Estimate the size of e^{z_ij} / Σ_k e^{z_ik} over n_kv keys."""
    if n_kv == 1:
        return RATIONAL  # e^z / e^z is 1
    exp = EntrySize(z.nodes + 1, 1, False)
    denominator = sum_size(exp, n_kv)
    # Mul(exp, Pow(denominator, -1)): two nodes for the power and one for the product.
    return EntrySize(exp.nodes + denominator.nodes + 3, 1, False)


def rational_work(a: EntrySize, b: EntrySize, rows: int, inner: int, cols: int) -> int:
    """Count the rational multiplications of a product of two rational matrices, else 0."""
    return rows * inner * cols if a.rational and b.rational else 0


def estimate_expression_size(spec: Any, inputs: dict[str, sp.MatrixBase], direct: bool) -> SizeEstimate:
    """Estimate the expression size of every stage of a derivation from its inputs' shapes.

    ``spec`` is the AttentionSpec and ``inputs`` the exact input matrices by name, as
    ``symattn.derive`` stores them. Shapes that do not fit together are left to the derivation
    to report, so the estimate uses only the widths it needs.
    """
    stages: dict[str, int] = {}
    work = 0

    # Projections, or Q, K and V as given.
    if direct:
        Q_size, K_size, V_size = (matrix_entry_size(inputs[name]) for name in ("Q", "K", "V"))
        n_q, d_model = inputs["Q"].shape
        n_kv, d_vmodel = inputs["V"].shape
    else:
        projected = {}
        for name, source in (("Q", "query_source"), ("K", "key_source"), ("V", "value_source")):
            X, W = inputs[source], inputs[f"W_{name}"]
            X_size, W_size = matrix_entry_size(X), matrix_entry_size(W)
            size = matmul_size(X_size, W_size, X.shape[1])
            work += rational_work(X_size, W_size, X.shape[0], X.shape[1], W.shape[1])
            if f"b_{name}" in inputs:
                size = add_size(size, matrix_entry_size(inputs[f"b_{name}"]))
            projected[name] = (size, X.shape[0], W.shape[1])
        (Q_size, n_q, d_model), (K_size, n_kv, _), (V_size, _, d_vmodel) = (
            projected["Q"], projected["K"], projected["V"]
        )
    # Each projection is stored whole and again split into heads.
    stages["Q"] = 2 * n_q * d_model * Q_size.nodes
    stages["K"] = 2 * n_kv * d_model * K_size.nodes
    stages["V"] = 2 * n_kv * d_vmodel * V_size.nodes

    # Per head: logits, scaled logits, masked logits, weights and outputs.
    heads = spec.heads
    d_k = max(d_model // heads, 1)
    d_v = max(d_vmodel // heads, 1)
    Z = matmul_size(Q_size, K_size, d_k)
    work += heads * rational_work(Q_size, K_size, n_q, d_k, n_kv)
    Z_scaled = product_size(Z, entry_size(spec.scale_value(d_k, n_kv)))
    Z_masked = add_size(Z_scaled, _mask_bias_size(spec)) if _has_additive_bias(spec) else Z_scaled
    A = softmax_size(Z_masked, n_kv)
    O = matmul_size(A, V_size, n_kv)
    work += heads * rational_work(A, V_size, n_q, n_kv, d_v)
    logits = heads * n_q * n_kv
    stages["Z"] = logits * Z.nodes
    stages["Z_scaled"] = logits * Z_scaled.nodes
    stages["Z_masked"] = logits * Z_masked.nodes
    stages["A"] = logits * A.nodes
    stages["O"] = heads * n_q * d_v * O.nodes

    # Concatenated heads, then the output projection.
    stages["concat"] = n_q * d_vmodel * O.nodes
    output, d_out = O, d_vmodel
    if "W_O" in inputs:
        W_O_size = matrix_entry_size(inputs["W_O"])
        d_out = inputs["W_O"].shape[1]
        if V_size.rational and W_O_size.rational:
            # Every output entry is then a rational combination of the weights A_ik of all
            # heads, and SymPy collects the terms: h · n_kv of them, not d_vmodel · n_kv.
            output = matmul_size(A, RATIONAL, heads * n_kv)
        else:
            output = matmul_size(O, W_O_size, d_vmodel)
        work += rational_work(O, W_O_size, n_q, d_vmodel, d_out)
        if "b_O" in inputs:
            output = add_size(output, matrix_entry_size(inputs["b_O"]))
    stages["output"] = n_q * d_out * output.nodes
    stages["rational arithmetic"] = work
    return SizeEstimate(total=sum(stages.values()), stages=stages)


def _has_additive_bias(spec: Any) -> bool:
    return any(mask.kind == "additive" for mask in spec.masks)


def _mask_bias_size(spec: Any) -> EntrySize:
    biases = [
        value for mask in spec.masks if mask.kind == "additive" for value in mask.values if value != -sp.oo
    ]
    if not biases:
        return RATIONAL
    return matrix_entry_size(sp.Matrix([biases]))


def check_expression_size(
    spec: Any, inputs: dict[str, sp.MatrixBase], direct: bool, max_expression_size: int | None
) -> SizeEstimate | None:
    """Raise ResourceLimitError if the estimated expression size exceeds ``max_expression_size``.

    ``None`` turns the check off. Returns the estimate, or None when the check is off.
    """
    if max_expression_size is None:
        return None
    if (
        isinstance(max_expression_size, bool)
        or not isinstance(max_expression_size, numbers.Integral)
        or max_expression_size < 1
    ):
        raise InvalidInputError(
            f"max_expression_size is {max_expression_size!r}; expected a positive integer, "
            f"or None to turn the size check off"
        )
    estimate = estimate_expression_size(spec, inputs, direct)
    if estimate.total <= max_expression_size:
        return estimate
    largest = max(estimate.stages, key=estimate.stages.__getitem__)
    raise ResourceLimitError(
        f"the exact stages would hold an estimated {estimate.total:,} expression nodes (largest "
        f"part: {largest}, about {estimate.stages[largest]:,}), above the limit "
        f"max_expression_size = {max_expression_size:,}, so building them could take hours. "
        f"{_NUMERIC_HINT}. Otherwise derive a smaller case, or raise the max_expression_size "
        f"keyword of derive or derive_direct (None turns the check off)"
    )


def check_file_size(path: Path | str, label: str, max_bytes: int = MAX_INPUT_FILE_BYTES) -> int:
    """Raise ResourceLimitError if the file at ``path`` is larger than ``max_bytes``; return its size.

    A missing file raises InvalidInputError that names the path.
    """
    path = Path(path)
    try:
        status = path.stat()
    except FileNotFoundError:
        raise InvalidInputError(f"{label} {str(path)!r} does not exist; check the path") from None
    except OSError as error:
        raise InvalidInputError(f"{label} {str(path)!r} cannot be read: {error.strerror}; check the path") from None
    if stat.S_ISDIR(status.st_mode):
        raise InvalidInputError(f"{label} {str(path)!r} is a folder; give the path of a file in it")
    size = status.st_size
    if size > max_bytes:
        raise ResourceLimitError(
            f"{label} {str(path)!r} is {size:,} bytes, above the limit of {max_bytes:,} bytes for "
            f"an input file; split the input into smaller files"
        )
    return size


def read_limited(path: Path | str, label: str, max_bytes: int = MAX_INPUT_FILE_BYTES) -> bytes:
    """Read a whole input file after checking its size, and check again while reading.

    The second check catches a file that grows between the size check and the read, and
    sources such as pipes whose size is not known in advance.
    """
    check_file_size(path, label, max_bytes)
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as error:
        raise InvalidInputError(f"{label} {str(path)!r} cannot be read: {error.strerror}") from None
    if len(data) > max_bytes:
        raise ResourceLimitError(
            f"{label} {str(path)!r} is larger than the limit of {max_bytes:,} bytes for an input "
            f"file; split the input into smaller files"
        )
    return data
