"""Exact gradients and Jacobians of attention, in reverse mode through the stages.

For a scalar objective L write G_X = ∂L/∂X, a matrix shaped like X. Starting from the upstream
gradient of the objective, each stage hands its gradient back to the stages it was built from.
Here s is the scale, ∘ the entrywise product, 1 a column of ones and M_i the visibility mask of
head i:

.. math::

    G_{concat} = G_{output} W_O^T,\\quad G_{W_O} = concat^T G_{output},\\quad
    G_{b_O} = 1^T G_{output}

    G_{A_i} = G_{O_i} V_i^T,\\quad G_{V_i} = A_i^T G_{O_i}

    G_{Z\\_masked_i} = A_i \\circ (G_{A_i} - \\operatorname{rowsum}(G_{A_i} \\circ A_i)\\, 1^T)

    G_{Z\\_scaled_i} = M_i \\circ G_{Z\\_masked_i},\\quad G_{Z_i} = s\\, G_{Z\\_scaled_i}

    G_{Q_i} = G_{Z_i} K_i,\\quad G_{K_i} = G_{Z_i}^T Q_i

    G_{W_Q} = X_q^T G_Q,\\quad G_{b_Q} = 1^T G_Q,\\quad G_{X_q} = G_Q W_Q^T \\quad
    (\\text{the same for } K \\text{ and } V)

So the softmax backward G_Z = s · A ∘ (G_A − rowsum(G_A ∘ A) 1ᵀ) is the gradient with respect to
the unscaled logits Z_i = Q_i K_iᵀ; without the factor s it is the gradient with respect to the
scaled logits. The row of the softmax Jacobian is diag(a) − a aᵀ, and the formula above is that
Jacobian applied to each row of G_A. The rows of G_Z sum to 0, so b_K, which adds the same
q · b_K to every logit of a row, gets no gradient through the logits: G_{b_K} is exactly 0
unless the objective reads K itself.

Every step works on the explicit entries of the stages (numbers or element symbols such as
``x_{1,2}``), never on SymPy ``MatrixSymbol`` objects: SymPy 1.14 returns 0 for the derivative of
``A[1, 1]`` with respect to a ``MatrixSymbol`` A, and for ∂(tr(FᵀF) − 3)/∂F. Nothing is expanded
or simplified: a gradient entry is a sum of products that reuses the forward stages' entries as
they are, so it stays within a small multiple of their size.

A source that fills several roles gets the sum of their gradients. In self attention,
``derive(X, ...)``, X is the query, key and value source, so ∂L/∂X = G_Q W_Q^T + G_K W_K^T +
G_V W_V^T, the gradient that PyTorch gives x for ``mha(x, x, x)``; with ``kv_source`` given, that
matrix gets G_K W_K^T + G_V W_V^T. ``grad`` returns these totals for source names and one role's
part for the role names in ``ROLE_NAMES`` (see ``source_roles``).

Masks, the masked-row policy, biases and the output projection flow through: a hidden key has
weight exactly 0, so no gradient reaches its logit. A fully masked row under policy "zeros" is a
constant zero row and passes no gradient back. Under policy "nan" its weights are NaN, so V's
gradient is NaN wherever that row's weights multiply it, as in IEEE arithmetic.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import sympy as sp

from .derive import HEAD_STAGES, Derivation, derive, derive_direct
from .errors import InvalidInputError, ShapeError
from .values import to_matrix

# A matrix as nested lists of SymPy expressions: the backward pass skips structural zeros
# entry by entry, which SymPy's own matrix product does not.
Rows = list[list[sp.Expr]]

_ZERO = sp.S.Zero
_STAGE_ENTRY = re.compile(r"([A-Za-z][A-Za-z0-9_]*)\[([0-9]+),([0-9]+)\]")
# Names for the gradient through one role of the sources, mapped to that role's name in
# Derivation.inputs. They give one role's part whether or not one matrix fills several roles.
ROLE_NAMES: dict[str, str] = {"query_role": "query_source", "key_role": "key_source", "value_role": "value_source"}
SOURCE_NAMES: tuple[str, ...] = ("source", "kv_source", "query_source", "key_source", "value_source")
_OBJECTIVE_TEXT = re.compile(r"\s*([A-Za-z][A-Za-z0-9_]*)\s*\[\s*([0-9]+)\s*,\s*([0-9]+)\s*\]\s*", re.ASCII)


# Objectives.

def stage_entry(stage: str, row: int, col: int) -> sp.Symbol:
    """Return the symbol that stands for the entry (row, col) of a stage inside an objective.

    Its name is ``stage[row,col]``, for example ``output[0,1]``; input names parsed by symattn
    cannot contain brackets, so it never clashes with an input symbol.

    >>> stage_entry("output", 0, 1)
    output[0,1]
    """
    return sp.Symbol(f"{stage}[{row},{col}]", real=True)


def stage_entries(derivation: Derivation, stage: str) -> sp.ImmutableMatrix:
    """Return a matrix of the objective symbols for every entry of a stage.

    >>> from symattn import derive_direct
    >>> d = derive_direct([[1, 0]], [[1, 0]], [[2, 3]])
    >>> O = stage_entries(d, "output")
    >>> d.grad(O[0, 0] ** 2 + O[0, 1], "V")
    Matrix([[4, 1]])
    """
    rows, cols = derivation[stage].shape
    return sp.ImmutableMatrix(rows, cols, lambda i, j: stage_entry(stage, i, j))


def parse_objective(text: str) -> str | tuple[str, int, int]:
    """Parse an objective written on a command line: ``sum`` or a stage entry such as ``output[0,1]``.

    >>> parse_objective("output[0, 1]")
    ('output', 0, 1)
    """
    if text.strip() == "sum":
        return "sum"
    match = _OBJECTIVE_TEXT.fullmatch(text)
    if match is None:
        raise InvalidInputError(
            f"objective {text!r} is not valid; expected 'sum' or a stage entry such as "
            f"'output[0,1]' or 'A_0[1,2]' (indices from 0)"
        )
    return match.group(1), int(match.group(2)), int(match.group(3))


def objective_seeds(derivation: Derivation, objective: Any) -> dict[str, sp.ImmutableMatrix]:
    """Return the upstream gradient ∂L/∂stage that an objective L puts on each stage it reads.

    ``objective`` is one of:

    - ``"sum"``: L = Σ output, so the upstream gradient is a matrix of ones;
    - ``(stage, row, col)``, for example ``("output", 0, 1)`` or ``("Z_scaled_0", 0, 1)``: one entry;
    - a matrix G shaped like the output (numbers or symbols): L = ⟨G, output⟩ = Σ G ∘ output;
    - a SymPy expression of stage-entry symbols (``stage_entries`` or ``stage_entry``); other
      symbols in it are constants.
    """
    if isinstance(objective, str):
        if objective != "sum":
            objective = parse_objective(objective)
        else:
            rows, cols = derivation.output.shape
            return {"output": sp.ImmutableMatrix(sp.ones(rows, cols))}
    if isinstance(objective, tuple) and len(objective) == 3 and isinstance(objective[0], str):
        return _one_entry_seed(derivation, *objective)
    if isinstance(objective, sp.Expr) and not isinstance(objective, sp.MatrixBase):
        return _expression_seeds(derivation, objective)
    upstream = to_matrix(objective, "upstream gradient")
    if upstream.shape != derivation.output.shape:
        raise ShapeError(
            f"the upstream gradient has shape {upstream.shape} but the output has shape "
            f"{derivation.output.shape}; give one weight per output entry"
        )
    return {"output": upstream}


def _one_entry_seed(derivation: Derivation, stage: str, row: Any, col: Any) -> dict[str, sp.ImmutableMatrix]:
    matrix = derivation[stage]
    for index, size, axis in ((row, matrix.shape[0], "row"), (col, matrix.shape[1], "column")):
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
            raise InvalidInputError(
                f"{axis} index {index!r} of stage {stage!r} is out of range; expected 0 … {size - 1} "
                f"for shape {matrix.shape}"
            )
    seed = sp.zeros(*matrix.shape)
    seed[row, col] = 1
    return {stage: sp.ImmutableMatrix(seed)}


def _expression_seeds(derivation: Derivation, objective: sp.Expr) -> dict[str, sp.ImmutableMatrix]:
    entries = {}
    for symbol in objective.free_symbols:
        match = _STAGE_ENTRY.fullmatch(symbol.name)
        if match is None:
            continue
        stage, row, col = match.group(1), int(match.group(2)), int(match.group(3))
        shape = derivation[stage].shape
        if row >= shape[0] or col >= shape[1]:
            raise InvalidInputError(
                f"the objective reads {symbol.name}, outside stage {stage!r} of shape {shape}"
            )
        entries[symbol] = (stage, row, col)
    values = {symbol: derivation[stage][row, col] for symbol, (stage, row, col) in entries.items()}

    seeds: dict[str, sp.Matrix] = {}
    for symbol, (stage, row, col) in entries.items():
        seed = seeds.setdefault(stage, sp.zeros(*derivation[stage].shape))
        seed[row, col] = sp.diff(objective, symbol).xreplace(values)
    return {stage: sp.ImmutableMatrix(seed) for stage, seed in seeds.items()}


# Matrix helpers on nested lists.

def _rows(matrix: sp.MatrixBase) -> Rows:
    return matrix.tolist()


def _zeros(rows: int, cols: int) -> Rows:
    return [[_ZERO] * cols for _ in range(rows)]


def _product(a: sp.Expr, b: sp.Expr) -> sp.Expr:
    """Return a·b, skipping the multiplication when a factor is a structural zero (0·NaN stays NaN)."""
    if a is _ZERO or b is _ZERO:
        return sp.nan if (a is sp.nan or b is sp.nan) else _ZERO
    return a * b


def _total(terms: Iterable[sp.Expr]) -> sp.Expr:
    kept = [term for term in terms if term is not _ZERO]
    return sp.Add(*kept) if kept else _ZERO


def _matmul(left: Rows, right: Rows) -> Rows:
    inner = len(right)
    cols = len(right[0])
    return [
        [_total(_product(row[k], right[k][j]) for k in range(inner)) for j in range(cols)]
        for row in left
    ]


def _transpose(matrix: Rows) -> Rows:
    return [list(column) for column in zip(*matrix)]


def _add(left: Rows, right: Rows | None) -> Rows:
    if right is None:
        return left
    return [[_total((a, b)) for a, b in zip(row_a, row_b)] for row_a, row_b in zip(left, right)]


def _column_sums(matrix: Rows) -> Rows:
    return [[_total(column) for column in zip(*matrix)]]


def _columns(matrix: Rows, start: int, stop: int) -> Rows:
    return [row[start:stop] for row in matrix]


def _hstack(blocks: list[Rows]) -> Rows:
    return [sum((block[i] for block in blocks), []) for i in range(len(blocks[0]))]


# The closed-form backward formulas, as matrix identities.

def softmax_backward(A: sp.MatrixBase, G_A: sp.MatrixBase) -> sp.ImmutableMatrix:
    """Return G_Z = A ∘ (G_A − rowsum(G_A ∘ A) 1ᵀ), the gradient with respect to the softmax's logits.

    Row by row this is (diag(a) − a aᵀ) g: the softmax Jacobian applied to the row g of G_A.

    >>> softmax_backward(sp.Matrix([[sp.Rational(1, 4), sp.Rational(3, 4)]]), sp.Matrix([[1, 0]]))
    Matrix([[3/16, -3/16]])
    """
    return sp.ImmutableMatrix(_softmax_backward(_rows(A), _rows(G_A)))


def _softmax_backward(A: Rows, G_A: Rows) -> Rows:
    result = []
    for a, g in zip(A, G_A):
        if any(entry is sp.nan for entry in a):
            result.append([sp.nan] * len(a))
            continue
        weighted = _total(_product(g_k, a_k) for g_k, a_k in zip(g, a))
        result.append([_product(a_k, _total((g_k, -weighted))) for g_k, a_k in zip(g, a)])
    return result


def softmax_jacobian(a: sp.MatrixBase) -> sp.ImmutableMatrix:
    """Return the softmax Jacobian diag(a) − a aᵀ of one row of weights a (entry (j, k) is ∂a_j/∂z_k).

    Its rows and columns sum to a_j (1 − Σ_k a_k), which is exactly 0 since the weights sum to 1.

    >>> softmax_jacobian(sp.Matrix([[sp.Rational(1, 4), sp.Rational(3, 4)]]))
    Matrix([
    [ 3/16, -3/16],
    [-3/16,  3/16]])
    """
    weights = list(a)
    n = len(weights)
    return sp.ImmutableMatrix(
        n, n, lambda j, k: (weights[j] if j == k else 0) - weights[j] * weights[k]
    )


def expression_gradient(expression: sp.Expr, matrix: sp.MatrixBase) -> sp.ImmutableMatrix:
    """Return the matrix of ∂expression/∂matrix[i, j] for a matrix whose entries are distinct symbols.

    This is the plain element-wise derivative on explicit entries, the check for every
    closed-form gradient. For a 3 × 3 matrix F of symbols it gives 2F for tr(FᵀF) − 3.

    >>> from symattn import symbol_matrix
    >>> F = symbol_matrix("f", 2, 2)
    >>> expression_gradient((F.T * F).trace() - 3, F) == 2 * F
    True
    """
    for entry in matrix:
        if not isinstance(entry, sp.Symbol):
            raise InvalidInputError(
                f"matrix entry {entry} is not a symbol; differentiate with respect to a matrix of "
                f"element symbols, for example symbol_matrix('F', 3, 3)"
            )
    if len(set(matrix)) != len(matrix):
        raise InvalidInputError("the matrix repeats a symbol; each entry needs its own symbol")
    return sp.ImmutableMatrix(
        matrix.shape[0], matrix.shape[1], lambda i, j: sp.diff(expression, matrix[i, j])
    )


# Reverse mode through the stages.

def backward(
    derivation: Derivation, seeds: Mapping[str, sp.MatrixBase], inputs_wanted: Iterable[str] | None = None
) -> dict[str, sp.ImmutableMatrix]:
    """Return ∂L/∂X for every stage and input X, given the upstream gradients ``seeds`` on stages.

    ``seeds`` maps stage names to ∂L/∂stage for the stages the objective reads directly (see
    ``objective_seeds``). Each stage's gradient is what it receives from later stages plus its
    own seed. Input names (``W_Q``, ``query_source`` …) get the gradient through their role
    only: in self attention ``query_source``, ``key_source`` and ``value_source`` each get one
    part of ∂L/∂X, and ``grad`` adds them up.
    ``inputs_wanted`` limits the inputs whose gradients are formed (all when None): these
    last products cost the most, and a gradient with respect to W_Q needs none of the others.
    """
    unknown = set(seeds) - set(derivation.stages)
    if unknown:
        raise InvalidInputError(
            f"no stage named {', '.join(sorted(unknown))}; stages are {', '.join(derivation.stages)}"
        )
    seed = {name: _rows(matrix) for name, matrix in seeds.items()}
    stages = {name: _rows(matrix) for name, matrix in derivation.stages.items()}
    inputs = {name: _rows(matrix) for name, matrix in derivation.inputs.items()}
    wanted = set(inputs) if inputs_wanted is None else set(inputs_wanted)
    grads: dict[str, Rows] = {}

    # Output projection: output = concat W_O + 1 b_O, or output = concat without W_O.
    G_output = seed.get("output", _zeros(*derivation.output.shape))
    grads["output"] = G_output
    if "W_O" in inputs:
        grads["concat"] = _add(_matmul(G_output, _transpose(inputs["W_O"])), seed.get("concat"))
        if "W_O" in wanted:
            grads["W_O"] = _matmul(_transpose(stages["concat"]), G_output)
        if "b_O" in inputs:
            grads["b_O"] = _column_sums(G_output)
    else:
        grads["concat"] = _add(G_output, seed.get("concat"))
        grads["output"] = grads["concat"]

    for i in range(derivation.heads):
        _backward_head(derivation, i, stages, seed, grads)

    # Heads are column blocks of Q, K and V: (n, d_k) blocks -> (n, d_model).
    for name in ("Q", "K", "V"):
        blocks = [grads[f"{name}_{i}"] for i in range(derivation.heads)]
        grads[name] = _add(_hstack(blocks), seed.get(name))

    if not derivation.direct:
        _backward_projections(inputs, grads, wanted)
        if "b_K" in inputs and "b_K" in wanted:
            grads["b_K"] = _column_sums(_key_seeds(derivation, seed))
    return {name: sp.ImmutableMatrix(rows) for name, rows in grads.items()}


def _key_seeds(derivation: Derivation, seed: dict) -> Rows:
    """Return the part of G_K that comes from seeds on K or K_i, not through the logits.

    b_K adds q · b_K to every logit of a query row, and the softmax ignores a constant added to a
    row, so no gradient reaches b_K through the logits: 1ᵀ G_Z^T Q = (G_Z 1)ᵀ Q with G_Z 1 = 0.
    Summing the columns of the full G_K gives the same zero only after cancellation that
    SymPy does not perform.
    """
    rows, d_k = derivation.n_kv, derivation.d_k
    blocks = [seed.get(f"K_{i}", _zeros(rows, d_k)) for i in range(derivation.heads)]
    return _add(_hstack(blocks), seed.get("K"))


def _backward_head(derivation: Derivation, i: int, stages: dict, seed: dict, grads: dict) -> None:
    d_v = derivation.d_v
    A, V, Q, K = (stages[f"{name}_{i}"] for name in ("A", "V", "Q", "K"))
    G_O = _add(_columns(grads["concat"], i * d_v, (i + 1) * d_v), seed.get(f"O_{i}"))

    # O_i = A_i V_i.
    G_A = _add(_matmul(G_O, _transpose(V)), seed.get(f"A_{i}"))
    G_V = _add(_matmul(_transpose(A), G_O), seed.get(f"V_{i}"))

    # A_i = softmax(Z_masked_i), and a hidden logit is the constant -oo, so it passes nothing back.
    G_Z_masked = _add(_softmax_backward(A, G_A), seed.get(f"Z_masked_{i}"))
    visible = derivation.visible[i]
    G_Z_scaled = [
        [g if visible[r][c] else _ZERO for c, g in enumerate(row)] for r, row in enumerate(G_Z_masked)
    ]
    G_Z_scaled = _add(G_Z_scaled, seed.get(f"Z_scaled_{i}"))
    G_Z = _add([[_product(derivation.scale, g) for g in row] for row in G_Z_scaled], seed.get(f"Z_{i}"))

    # Z_i = Q_i K_iᵀ.
    G_Q = _add(_matmul(G_Z, K), seed.get(f"Q_{i}"))
    G_K = _add(_matmul(_transpose(G_Z), Q), seed.get(f"K_{i}"))
    for name, rows in zip(HEAD_STAGES, (G_Q, G_K, G_V, G_Z, G_Z_scaled, G_Z_masked, G_A, G_O)):
        grads[f"{name}_{i}"] = rows


def _backward_projections(inputs: dict, grads: dict, wanted: set[str]) -> None:
    """Add the wanted gradients of X = source W + 1 b for Q, K and V."""
    for stage, source, weight, bias in (
        ("Q", "query_source", "W_Q", "b_Q"),
        ("K", "key_source", "W_K", "b_K"),
        ("V", "value_source", "W_V", "b_V"),
    ):
        G = grads[stage]
        if weight in wanted:
            grads[weight] = _matmul(_transpose(inputs[source]), G)
        if source in wanted:
            grads[source] = _matmul(G, _transpose(inputs[weight]))
        if bias in wanted and bias in inputs and bias != "b_K":
            grads[bias] = _column_sums(G)


def grad(derivation: Derivation, objective: Any, wrt: str | sp.Symbol) -> sp.ImmutableMatrix:
    """Return the exact gradient ∂L/∂wrt of a scalar objective L, as a matrix shaped like ``wrt``.

    ``objective`` is ``"sum"``, a stage entry such as ``("output", 0, 1)``, an upstream gradient
    G shaped like the output (L = ⟨G, output⟩), or a SymPy expression of ``stage_entries``.
    ``wrt`` names an input (``"W_Q"``, ``"b_V"``, ``"query_source"``, or ``"Q"`` in direct mode)
    or a stage (``"A_0"``). A source name gives the total derivative with respect to that
    matrix, summed over every role it fills (``source_roles``): in self attention
    ``"query_source"`` and ``"source"`` give ∂L/∂X through the query, key and value roles, as
    PyTorch's autograd does for ``mha(x, x, x)``, and ``"kv_source"`` gives the key and value
    roles of a source given once for both. ``"query_role"``, ``"key_role"`` and
    ``"value_role"`` give one role's part. A SymPy symbol gives the 1 × 1 total derivative with
    respect to that symbol, summed over every input entry that contains it.

    >>> from symattn import derive_direct
    >>> d = derive_direct([[1, 0], [0, 1]], [[1, 0], [0, 1], [1, 1]], [[1, 2], [3, 4], [5, 6]])
    >>> grad(d, ("Z_scaled_0", 0, 1), "Q")
    Matrix([
    [0, sqrt(2)/2],
    [0,         0]])
    """
    seeds = objective_seeds(derivation, objective)
    if isinstance(wrt, sp.Symbol):
        grads = backward(derivation, seeds)
        return sp.ImmutableMatrix([[_symbol_derivative(derivation, grads, wrt)]])
    roles = source_roles(derivation, wrt) if isinstance(wrt, str) else ()
    if roles:
        grads = backward(derivation, seeds, inputs_wanted=set(roles))
        total = _rows(grads[roles[0]])
        for role in roles[1:]:
            total = _add(total, _rows(grads[role]))
        return sp.ImmutableMatrix(total)
    if not isinstance(wrt, str) or (wrt not in derivation.inputs and wrt not in derivation.stages):
        names = list(derivation.inputs) + [s for s in derivation.stages if s not in derivation.inputs]
        if not derivation.direct:
            names[3:3] = [name for name in ("source", "kv_source") if _tied(derivation, name)] + list(ROLE_NAMES)
        raise InvalidInputError(
            f"cannot differentiate with respect to {wrt!r}; expected an input or stage name: "
            f"{', '.join(names)}, or a symbol of the inputs"
        )
    return backward(derivation, seeds, inputs_wanted={wrt})[wrt]


def source_roles(derivation: Derivation, wrt: str) -> tuple[str, ...]:
    """Return the source roles, as ``Derivation.inputs`` names, whose gradients add up to ∂L/∂wrt.

    A source name stands for the matrix given as that source, so its gradient covers every role
    the matrix fills (``Derivation.tied_sources``). A role name of ``ROLE_NAMES`` covers that
    role only. Any other name returns ``()``: it is not a source.

    ==============  ==================  ==================  ==================
    wrt             self attention      kv_source given     key_source and
                                                            value_source given
    ==============  ==================  ==================  ==================
    source          query, key, value   InvalidInputError   InvalidInputError
    kv_source       key, value          key, value          InvalidInputError
    query_source    query, key, value   query               query
    key_source      query, key, value   key, value          key
    value_source    query, key, value   key, value          value
    query_role      query               query               query
    ==============  ==================  ==================  ==================

    >>> from symattn import derive
    >>> d = derive([[1, 0]], W_Q=[[1], [0]], W_K=[[1], [0]], W_V=[[1], [0]])
    >>> source_roles(d, "query_source")
    ('query_source', 'key_source', 'value_source')
    >>> source_roles(d, "key_role")
    ('key_source',)
    """
    if wrt not in SOURCE_NAMES and wrt not in ROLE_NAMES:
        return ()
    if derivation.direct:
        raise InvalidInputError(
            f"cannot differentiate with respect to {wrt!r}: this derivation starts from Q, K and V, "
            f"so it has no sources; use 'Q', 'K' or 'V'"
        )
    if wrt in ROLE_NAMES:
        return (ROLE_NAMES[wrt],)
    if wrt in ("source", "kv_source") and not _tied(derivation, wrt):
        raise InvalidInputError(_untied_message(derivation, wrt))
    if wrt == "source":
        return derivation.tied_sources
    if wrt == "kv_source":
        return ("key_source", "value_source")
    if wrt in derivation.tied_sources:
        return derivation.tied_sources
    return (wrt,)


def _tied(derivation: Derivation, wrt: str) -> bool:
    roles = {"source": ("query_source", "key_source", "value_source"), "kv_source": ("key_source", "value_source")}
    return set(roles[wrt]) <= set(derivation.tied_sources)


def _untied_message(derivation: Derivation, wrt: str) -> str:
    given = (
        "kv_source, so the query source is a matrix of its own"
        if derivation.tied_sources else "key_source and value_source as separate matrices"
    )
    roles = "query, key and value" if wrt == "source" else "key and value"
    steer = (
        "use 'query_source' or 'kv_source'"
        if derivation.tied_sources else "use 'query_source', 'key_source' or 'value_source'"
    )
    return (
        f"cannot differentiate with respect to {wrt!r}, one matrix in the {roles} roles: this "
        f"derivation was given {given}; {steer}"
    )


def _symbol_derivative(derivation: Derivation, grads: dict, symbol: sp.Symbol) -> sp.Expr:
    """Chain ∂L/∂input with ∂input/∂symbol over every input entry that contains the symbol."""
    terms = []
    for name, matrix in derivation.inputs.items():
        for (i, j), entry in zip(((i, j) for i in range(matrix.rows) for j in range(matrix.cols)), matrix):
            if entry.has(symbol):
                terms.append(_product(grads[name][i, j], sp.diff(entry, symbol)))
    return _total(terms)


def jacobian(derivation: Derivation, stage: str, wrt: str) -> sp.ImmutableMatrix:
    """Return the Jacobian ∂ vec(stage) / ∂ vec(wrt), both flattened row-major.

    Entry (r · cols + c, p · wrt_cols + q) is ∂stage[r, c]/∂wrt[p, q]. The Jacobian of ``A_i``
    with respect to ``Z_masked_i`` is block diagonal, with the softmax Jacobian diag(a) − a aᵀ of
    each row as its blocks. One backward pass runs per entry of ``stage``.
    """
    rows, cols = derivation[stage].shape
    flat = []
    for r in range(rows):
        for c in range(cols):
            flat.append(list(grad(derivation, (stage, r, c), wrt)))
    return sp.ImmutableMatrix(flat)


# Second order.

def hessian_vector_product(
    derivation: Derivation, objective: Any, wrt: str, direction: Any
) -> sp.ImmutableMatrix:
    """Return the Hessian-vector product H v = d/dε ∂L/∂wrt (wrt + ε v) at ε = 0, exactly.

    ``wrt`` names an input, or a source or role name as in ``grad``; ``direction`` v has its
    shape. Every role that ``wrt`` covers is rebuilt as role + ε v with a fresh symbol ε, so a
    source shared by several roles moves in all of them, the gradient is taken in reverse mode,
    and its entries are differentiated in ε, so no matrix calculus is involved.
    """
    roles = source_roles(derivation, wrt)
    if not roles and wrt not in derivation.inputs:
        raise InvalidInputError(
            f"cannot take a Hessian-vector product with respect to {wrt!r}; expected an input: "
            f"{', '.join(derivation.inputs)}"
        )
    moved = roles or (wrt,)
    shape = derivation.inputs[moved[0]].shape
    v = to_matrix(direction, "direction")
    if v.shape != shape:
        raise ShapeError(
            f"the direction has shape {v.shape} but {wrt} has shape {shape}; "
            f"give one entry per entry of {wrt}"
        )
    epsilon = sp.Dummy("epsilon", real=True)
    inputs = dict(derivation.inputs)
    for name in moved:
        inputs[name] = inputs[name] + epsilon * v
    shifted = rebuild(derivation, inputs)
    gradient = grad(shifted, objective, wrt)
    return sp.ImmutableMatrix(gradient.applyfunc(lambda g: sp.diff(g, epsilon).subs(epsilon, 0)))


def rebuild(derivation: Derivation, inputs: Mapping[str, sp.MatrixBase]) -> Derivation:
    """Derive again with the same spec and mode from other input matrices of the same names.

    Sources that were one matrix stay one matrix while their new matrices are equal, so the
    rebuilt derivation keeps the ties that still hold.
    """
    spec = derivation.spec
    # The size limit was checked when the derivation was first built; inputs of the same shapes
    # give stages of about the same size.
    options = dict(
        heads=spec.heads, scale=spec.scale, mask=list(spec.masks), causal=spec.causal,
        key_length=spec.key_length, masked_rows=spec.masked_rows,
        W_O=inputs.get("W_O"), b_O=inputs.get("b_O"), max_expression_size=None,
    )
    if derivation.direct:
        return derive_direct(inputs["Q"], inputs["K"], inputs["V"], **options)
    tied = derivation.tied_sources
    query, key, value = inputs["query_source"], inputs["key_source"], inputs["value_source"]
    if len(tied) == 3 and query == key == value:
        sources = {}
    elif "key_source" in tied and key == value:
        sources = {"kv_source": key}
    else:
        sources = {"key_source": key, "value_source": value}
    return derive(
        query, **sources,
        W_Q=inputs["W_Q"], W_K=inputs["W_K"], W_V=inputs["W_V"],
        b_Q=inputs.get("b_Q"), b_K=inputs.get("b_K"), b_V=inputs.get("b_V"),
        **options,
    )

