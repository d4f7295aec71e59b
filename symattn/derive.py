"""Multi-head cross attention, stage by stage, as exact SymPy matrices.

.. math::

    Q = X_q W_Q + b_Q,\\quad K = X_k W_K + b_K,\\quad V = X_v W_V + b_V

    Z_i = Q_i K_i^T,\\quad A_i = \\operatorname{softmax}_{\\text{rows}}(s Z_i + M_i),\\quad
    O_i = A_i V_i,\\quad O = [O_0 \\cdots O_{h-1}]\\, W_O + b_O

Shapes: X_q (n_q, d_q), X_k (n_kv, d_k_in), X_v (n_kv, d_v_in), W_Q and W_K (·, d_model),
W_V (d_v_in, d_vmodel), W_O (d_vmodel, d_out). Head i owns the columns
i·d_k … (i+1)·d_k − 1 of Q and K (d_k = d_model / h) and i·d_v … (i+1)·d_v − 1 of V.

No ``simplify()`` runs: it does not finish on softmax entries of modest size, and the stages are
exact as built. Rationals stay rational and square roots stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import sympy as sp

from .errors import InvalidInputError, MaskError, ShapeError, count_noun
from .limits import DEFAULT_MAX_EXPRESSION_SIZE, check_expression_size
from .spec import AttentionSpec, normalise_masks
from .values import to_matrix, to_row_vector

if TYPE_CHECKING:
    from .display import DerivationSummary, StageView

# Stage names of one head, in pipeline order; the full name appends "_<head>".
HEAD_STAGES: tuple[str, ...] = ("Q", "K", "V", "Z", "Z_scaled", "Z_masked", "A", "O")
INPUT_NAMES: tuple[str, ...] = (
    "query_source", "key_source", "value_source", "W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "b_O",
)


@dataclass(frozen=True)
class Derivation:
    """Every stage of one attention computation, by name.

    ``stages`` maps a stage name to an immutable SymPy matrix, in pipeline order: "Q", "K", "V",
    then per head i "Q_i", "K_i", "V_i", "Z_i", "Z_scaled_i", "Z_masked_i", "A_i", "O_i", then
    "concat" and "output". ``inputs`` maps the names in INPUT_NAMES that were given (or Q, K, V
    in direct mode) to their exact matrices. A source given once for several roles appears under
    each role's name, and ``tied_sources`` lists those roles: all three source names in self
    attention, "key_source" and "value_source" when ``kv_source`` was given, none otherwise.
    A gradient with respect to that one matrix sums over these roles (see ``symattn.gradients``).
    """

    spec: AttentionSpec
    inputs: dict[str, sp.ImmutableMatrix]
    stages: dict[str, sp.ImmutableMatrix]
    direct: bool
    scale: sp.Expr
    visible: tuple = field(repr=False)
    tied_sources: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> sp.ImmutableMatrix:
        try:
            return self.stages[name]
        except KeyError:
            raise KeyError(
                f"no stage named {name!r}; stages are {', '.join(self.stages)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.stages)

    def stage(self, name: str, head: int | None = None) -> sp.ImmutableMatrix:
        """Return a stage by name, for example ``stage("A", head=1)`` or ``stage("output")``."""
        if head is None:
            return self[name]
        if not 0 <= head < self.spec.heads:
            raise InvalidInputError(f"head {head} does not exist; heads are 0 … {self.spec.heads - 1}")
        return self[f"{name}_{head}"]

    @property
    def heads(self) -> int:
        return self.spec.heads

    @property
    def d_k(self) -> int:
        return self.stages["Q_0"].shape[1]

    @property
    def d_v(self) -> int:
        return self.stages["V_0"].shape[1]

    @property
    def n_q(self) -> int:
        return self.stages["Q"].shape[0]

    @property
    def n_kv(self) -> int:
        return self.stages["K"].shape[0]

    @property
    def output(self) -> sp.ImmutableMatrix:
        return self.stages["output"]

    @property
    def free_symbols(self) -> set[sp.Symbol]:
        symbols: set[sp.Symbol] = set()
        for matrix in self.inputs.values():
            symbols |= matrix.free_symbols
        return symbols

    def subs(self, values: dict) -> "Derivation":
        """Return the derivation with symbols replaced by exact values, rebuilt stage by stage.

        Keys are the derivation's symbols or their names (``"w"``, ``"x_{1,1}"``).
        """
        from .values import to_exact

        exact = {
            self._own_symbol(symbol): to_exact(value, f"value of {symbol}") for symbol, value in values.items()
        }
        inputs = {name: matrix.subs(exact) for name, matrix in self.inputs.items()}
        return _build(self.spec, inputs, self.direct, tied_sources=self.tied_sources)

    def _own_symbol(self, key: Any) -> sp.Symbol:
        # SymPy's own subs turns a string key into a new Symbol without real=True, which matches
        # none of ours and substitutes nothing, so names are matched here, never parsed.
        name = key.name if isinstance(key, sp.Symbol) else key
        symbols = {symbol.name: symbol for symbol in self.free_symbols}
        if not isinstance(name, str) or name not in symbols:
            raise InvalidInputError(
                f"subs key {key!r} is not a symbol of this derivation; its symbols are "
                f"{', '.join(sorted(symbols)) or 'none'}"
            )
        return symbols[name]

    def grad(self, objective: Any, wrt: Any) -> sp.ImmutableMatrix:
        """Return the exact gradient of a scalar objective, shaped like ``wrt``, in reverse mode.

        ``objective``: ``"sum"``, ``("output", i, j)``, an upstream gradient G (L = ⟨G, output⟩)
        or a SymPy expression of stage entries; ``wrt``: an input, weight, bias or stage name,
        where a source name gives the total derivative over every role that source fills and
        "query_role", "key_role", "value_role" give one role. See ``symattn.gradients.grad``.
        """
        from .gradients import grad

        return grad(self, objective, wrt)

    def jacobian(self, stage: str, wrt: str) -> sp.ImmutableMatrix:
        """Return ∂ vec(stage) / ∂ vec(wrt), flattened row-major; see ``symattn.gradients.jacobian``."""
        from .gradients import jacobian

        return jacobian(self, stage, wrt)

    # Display in Jupyter; the logic lives in symattn.display.

    def show(self, name: str, **options: Any) -> StageView:
        """Return stage ``name`` typeset for a notebook, long entries abbreviated; see ``symattn.display.show``."""
        from .display import show

        return show(self[name], name, **options)

    def summary(self) -> DerivationSummary:
        """Return a few lines that describe the derivation; see ``symattn.display.summary``."""
        from .display import summary

        return summary(self)

    def _repr_html_(self) -> str:
        return self.summary()._repr_html_()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self.summary()))


def derive(
    query_source: Any,
    kv_source: Any = None,
    *,
    key_source: Any = None,
    value_source: Any = None,
    W_Q: Any,
    W_K: Any,
    W_V: Any,
    b_Q: Any = None,
    b_K: Any = None,
    b_V: Any = None,
    W_O: Any = None,
    b_O: Any = None,
    heads: int = 1,
    scale: Any = "sqrt_dk",
    mask: Any = None,
    causal: str | None = None,
    key_length: int | None = None,
    masked_rows: str = "error",
    max_expression_size: int | None = DEFAULT_MAX_EXPRESSION_SIZE,
) -> Derivation:
    """Derive multi-head cross attention exactly from the two sources and the weights.

    ``kv_source`` serves as both key and value source; give ``key_source`` and
    ``value_source`` instead when they differ. With ``kv_source`` omitted as well, the
    attention is self attention over ``query_source``. ``mask`` is a Mask or a list of Masks.
    A case whose stages would exceed ``max_expression_size`` expression nodes, estimated before
    they are built, raises ResourceLimitError (see ``symattn.limits``); None turns the check off.

    >>> d = derive([[1, 0]], [[1, 0], [0, 1]], W_Q=[[1, 0], [0, 1]], W_K=[[1, 0], [0, 1]],
    ...            W_V=[[1, 0], [0, 1]], scale="none")
    >>> d["A_0"]
    Matrix([[E/(1 + E), 1/(1 + E)]])
    """
    if kv_source is not None and (key_source is not None or value_source is not None):
        raise InvalidInputError(
            "give either kv_source or key_source and value_source, not both"
        )
    tied_sources: tuple[str, ...] = ()
    if kv_source is None and key_source is None and value_source is None:
        kv_source = query_source
        tied_sources = ("query_source", "key_source", "value_source")
    elif kv_source is not None:
        tied_sources = ("key_source", "value_source")
    if kv_source is not None:
        key_source = value_source = kv_source
    if key_source is None or value_source is None:
        raise InvalidInputError("key_source and value_source go together; give both, or kv_source")

    spec = AttentionSpec(heads, scale, normalise_masks(mask), causal, key_length, masked_rows)
    inputs = {
        "query_source": to_matrix(query_source, "query_source"),
        "key_source": to_matrix(key_source, "key_source"),
        "value_source": to_matrix(value_source, "value_source"),
        "W_Q": to_matrix(W_Q, "W_Q"),
        "W_K": to_matrix(W_K, "W_K"),
        "W_V": to_matrix(W_V, "W_V"),
    }
    _add_biases(inputs, {"b_Q": (b_Q, "W_Q"), "b_K": (b_K, "W_K"), "b_V": (b_V, "W_V")})
    _add_output_projection(inputs, W_O, b_O)
    return _build(spec, inputs, direct=False, max_expression_size=max_expression_size, tied_sources=tied_sources)


def derive_direct(
    Q: Any,
    K: Any,
    V: Any,
    *,
    W_O: Any = None,
    b_O: Any = None,
    heads: int = 1,
    scale: Any = "sqrt_dk",
    mask: Any = None,
    causal: str | None = None,
    key_length: int | None = None,
    masked_rows: str = "error",
    max_expression_size: int | None = DEFAULT_MAX_EXPRESSION_SIZE,
) -> Derivation:
    """Derive attention from Q, K and V themselves, with no input projections.

    This is the form in which attention kernels (``scaled_dot_product_attention``,
    FlashAttention) start. ``max_expression_size`` works as in ``derive``.

    >>> d = derive_direct([[1, 1]], [[1, 1], [1, -1]], [[1], [0]])
    >>> d["A_0"][0, 0]
    exp(sqrt(2))/(1 + exp(sqrt(2)))
    """
    spec = AttentionSpec(heads, scale, normalise_masks(mask), causal, key_length, masked_rows)
    inputs = {"Q": to_matrix(Q, "Q"), "K": to_matrix(K, "K"), "V": to_matrix(V, "V")}
    _add_output_projection(inputs, W_O, b_O)
    return _build(spec, inputs, direct=True, max_expression_size=max_expression_size)


def _add_biases(inputs: dict, biases: dict) -> None:
    for name, (value, weight_name) in biases.items():
        if value is not None:
            inputs[name] = to_row_vector(value, name, inputs[weight_name].shape[1])


def _add_output_projection(inputs: dict, W_O: Any, b_O: Any) -> None:
    if W_O is not None:
        inputs["W_O"] = to_matrix(W_O, "W_O")
        if b_O is not None:
            inputs["b_O"] = to_row_vector(b_O, "b_O", inputs["W_O"].shape[1])
    elif b_O is not None:
        raise InvalidInputError("b_O was given without W_O; give W_O too, or drop b_O")


def _project(source: sp.ImmutableMatrix, weight: sp.ImmutableMatrix, bias: Any,
             source_name: str, weight_name: str) -> sp.ImmutableMatrix:
    if source.shape[1] != weight.shape[0]:
        raise ShapeError(
            f"{source_name} has {count_noun(source.shape[1], 'feature')} (shape {source.shape}) but "
            f"{weight_name} has {count_noun(weight.shape[0], 'row')} (shape {weight.shape}); {weight_name} needs one row per "
            f"feature of {source_name}"
        )
    projected = source * weight
    if bias is not None:
        projected = projected + sp.ones(source.shape[0], 1) * bias
    return sp.ImmutableMatrix(projected)


def _check_heads(width: int, heads: int, name: str) -> int:
    if width % heads:
        raise ShapeError(
            f"{name} has width {width}, which is not divisible by {heads} heads; choose a head "
            f"count that divides {width}"
        )
    return width // heads


def _build(spec: AttentionSpec, inputs: dict, direct: bool,
           max_expression_size: int | None = DEFAULT_MAX_EXPRESSION_SIZE,
           tied_sources: tuple[str, ...] = ()) -> Derivation:
    check_expression_size(spec, inputs, direct, max_expression_size)
    stages: dict[str, sp.ImmutableMatrix] = {}

    # Projections: rows are tokens, so Q = X_q W_Q (+ b_Q).
    if direct:
        Q, K, V = inputs["Q"], inputs["K"], inputs["V"]
    else:
        Q = _project(inputs["query_source"], inputs["W_Q"], inputs.get("b_Q"), "query_source", "W_Q")
        K = _project(inputs["key_source"], inputs["W_K"], inputs.get("b_K"), "key_source", "W_K")
        V = _project(inputs["value_source"], inputs["W_V"], inputs.get("b_V"), "value_source", "W_V")
    _check_qkv_shapes(Q, K, V, direct)
    stages.update(Q=Q, K=K, V=V)

    heads = spec.heads
    d_k = _check_heads(Q.shape[1], heads, "Q (d_model)")
    d_v = _check_heads(V.shape[1], heads, "V")
    n_q, n_kv = Q.shape[0], K.shape[0]
    scale = spec.scale_value(d_k, n_kv)
    visible, bias = spec.visibility(heads, n_q, n_kv)
    _check_masked_rows(spec, visible)

    for i in range(heads):
        # Head i owns a contiguous column block: (n, d_model) -> (n, d_k).
        Q_i = Q[:, i * d_k : (i + 1) * d_k]
        K_i = K[:, i * d_k : (i + 1) * d_k]
        V_i = V[:, i * d_v : (i + 1) * d_v]

        Z_i = sp.ImmutableMatrix(Q_i * K_i.T)  # (n_q, n_kv)
        Z_scaled_i = sp.ImmutableMatrix(Z_i * scale)
        Z_masked_i = _apply_mask(Z_scaled_i, visible[i], bias[i])
        A_i = softmax_rows(Z_masked_i, spec.masked_rows)
        O_i = sp.ImmutableMatrix(A_i * V_i)  # (n_q, d_v)

        for name, matrix in zip(HEAD_STAGES, (Q_i, K_i, V_i, Z_i, Z_scaled_i, Z_masked_i, A_i, O_i)):
            stages[f"{name}_{i}"] = sp.ImmutableMatrix(matrix)

    # Heads are concatenated head-major along features: (n_q, h * d_v).
    concat = sp.ImmutableMatrix(sp.Matrix.hstack(*(stages[f"O_{i}"] for i in range(heads))))
    stages["concat"] = concat
    stages["output"] = _output_projection(concat, inputs)
    return Derivation(spec, dict(inputs), stages, direct, scale, tuple(map(tuple, visible)), tied_sources)


def _check_qkv_shapes(Q: sp.Matrix, K: sp.Matrix, V: sp.Matrix, direct: bool) -> None:
    if Q.shape[1] != K.shape[1]:
        names = ("Q", "K") if direct else ("W_Q", "W_K")
        raise ShapeError(
            f"Q has width {Q.shape[1]} but K has width {K.shape[1]}; {names[0]} and {names[1]} "
            f"must give queries and keys the same width d_model"
        )
    if K.shape[0] != V.shape[0]:
        names = ("K", "V") if direct else ("key_source", "value_source")
        raise ShapeError(
            f"{names[0]} has {K.shape[0]} rows but {names[1]} has {V.shape[0]}; every key needs "
            f"exactly one value"
        )


def _check_masked_rows(spec: AttentionSpec, visible: list) -> None:
    if spec.masked_rows != "error":
        return
    empty = [
        (h, i) for h, rows in enumerate(visible) for i, row in enumerate(rows) if not any(row)
    ]
    if not empty:
        return
    by_head: dict[int, list[int]] = {}
    for h, i in empty:
        by_head.setdefault(h, []).append(i)
    where = "; ".join(f"head {h}: query rows {', '.join(map(str, rows))}" for h, rows in by_head.items())
    raise MaskError(
        f"some query rows have no key left to attend to ({where}); the softmax of such a row "
        f"is undefined. Set masked_rows to \"zeros\" or \"nan\" to choose an output for them "
        f"(masked_rows = \"zeros\" under [spec] in a file, masked_rows=\"zeros\" in Python), or change the mask"
    )


def _apply_mask(Z_scaled: sp.ImmutableMatrix, visible: list, bias: list) -> sp.ImmutableMatrix:
    """Add the exact bias to visible logits and put -oo where a key is hidden."""
    rows, cols = Z_scaled.shape
    return sp.ImmutableMatrix(
        rows, cols, lambda i, j: Z_scaled[i, j] + bias[i][j] if visible[i][j] else -sp.oo
    )


def softmax_rows(Z: sp.MatrixBase, masked_rows: str = "error") -> sp.ImmutableMatrix:
    """Return the exact row softmax e^{z_ij} / Σ_k e^{z_ik} of Z, where -oo entries weigh exactly 0.

    A row whose entries are all -oo follows ``masked_rows``: "zeros" gives a zero row, "nan"
    a NaN row and "error" raises MaskError.

    >>> softmax_rows(sp.Matrix([[0, 0], [0, -sp.oo]]))
    Matrix([
    [1/2, 1/2],
    [  1,   0]])
    """
    rows, cols = Z.shape
    entries = []
    for i in range(rows):
        exps = [None if Z[i, j] == -sp.oo else sp.exp(Z[i, j]) for j in range(cols)]
        kept = [e for e in exps if e is not None]
        if not kept:
            if masked_rows == "zeros":
                entries.append([sp.Integer(0)] * cols)
            elif masked_rows == "nan":
                entries.append([sp.nan] * cols)
            else:
                raise MaskError(
                    f"row {i} has no visible entry; set masked_rows to \"zeros\" or \"nan\", or change the mask"
                )
            continue
        if all(e == kept[0] for e in kept):
            # Equal logits share the weight 1/k. SymPy would leave e^z / (k e^z) as
            # exp(z)·exp(−z)/k when z is a sum such as w + 1/100.
            weight = sp.Rational(1, len(kept))
            entries.append([sp.Integer(0) if e is None else weight for e in exps])
            continue
        denominator = sp.Add(*kept)
        entries.append([sp.Integer(0) if e is None else e / denominator for e in exps])
    return sp.ImmutableMatrix(entries)


def _output_projection(concat: sp.ImmutableMatrix, inputs: dict) -> sp.ImmutableMatrix:
    W_O = inputs.get("W_O")
    if W_O is None:
        return concat
    if W_O.shape[0] != concat.shape[1]:
        raise ShapeError(
            f"the concatenated heads have width {concat.shape[1]} but W_O has shape {W_O.shape}; "
            f"W_O needs {concat.shape[1]} rows (a PyTorch out_proj.weight must be transposed first)"
        )
    output = concat * W_O
    if "b_O" in inputs:
        output = output + sp.ones(concat.shape[0], 1) * inputs["b_O"]
    return sp.ImmutableMatrix(output)
