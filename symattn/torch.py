"""Adapters that read PyTorch attention calls into symattn problems, references and reports.

Two callables are understood, with the semantics of torch 2.13
(``torch/nn/functional.py``: ``multi_head_attention_forward``, ``scaled_dot_product_attention``):

- ``torch.nn.MultiheadAttention``: projections x Wᵀ + b with a packed ``in_proj_weight``, or
  separate ``q_proj_weight``, ``k_proj_weight`` and ``v_proj_weight`` when kdim or vdim differ
  from embed_dim. ``bias_k`` and ``bias_v`` add one more key and value row after the projection,
  and ``add_zero_attn`` one more zero row. A bool ``key_padding_mask`` or ``attn_mask`` hides
  keys where it is True, and a float one is added to the scaled logits. A 3-D ``attn_mask`` is
  (N·num_heads, L, S). ``batch_first`` puts the batch axis first. The weights are averaged over
  heads only with ``average_attn_weights=True``.
- ``torch.nn.functional.scaled_dot_product_attention``: a bool ``attn_mask`` lets a query attend
  where it is True, a float one is added; ``is_causal`` is top-left aligned (query i sees keys
  j ≤ i); ``scale`` defaults to 1/√E; ``enable_gqa`` repeats each key and value head for
  Hq / Hkv consecutive query heads.

PyTorch computes x Wᵀ + b and symattn x W + b, so every weight is transposed here, at the edge.
Values are taken at their exact binary value, so the reference is the exact function of the very
numbers that PyTorch received. One Problem covers one batch element.

Where a query row has no visible key, PyTorch 2.13 returns NaN from nn.MultiheadAttention with
need_weights=True and zeros from scaled_dot_product_attention (and from nn.MultiheadAttention
with need_weights=False); the reference follows ``masked_rows`` instead ("error" by default).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .errors import InvalidInputError, ShapeError, UnsupportedError
from .problem import Problem
from .progress import Progress, track
from .spec import AttentionSpec, Mask
from .verify.check import DEFAULT_DIGITS, rounded_head_means, verify as verify_arrays
from .verify.floats import dtype_name
from .verify.metrics import Tolerance
from .verify.report import Report

MHA = "multihead_attention"
SDPA = "scaled_dot_product_attention"


@dataclass(frozen=True)
class TorchProblems:
    """The problems of one PyTorch call and how to lay results out as PyTorch does.

    ``kind``: MHA or SDPA. ``problems``: one per batch element (for SDPA, one per index of the
    dimensions before the head dimension). ``batch_shape``: those batch dimensions, () when the
    call was unbatched. ``dtype``: the name of the query's dtype. ``need_weights`` and
    ``average_weights``: whether nn.MultiheadAttention returns weights, and averaged over heads.
    """

    kind: str
    problems: tuple[Problem, ...]
    batch_shape: tuple[int, ...]
    dtype: str
    batch_first: bool = False
    need_weights: bool = False
    average_weights: bool = False
    sdpa_shape: tuple[int, ...] = ()

    def output_layout(self, stacked: np.ndarray) -> np.ndarray:
        """Arrange a (batch, n_q, d_out) stack of outputs as PyTorch returns them."""
        if self.kind == MHA:
            if not self.batch_shape:
                return stacked[0]
            return stacked if self.batch_first else stacked.transpose(1, 0, 2)
        heads = self.problems[0].heads
        batch, n_q, width = stacked.shape
        per_head = stacked.reshape(batch, n_q, heads, width // heads).transpose(0, 2, 1, 3)
        return per_head.reshape(self.sdpa_shape)

    def actual_arrays(self, output: np.ndarray, weights: np.ndarray | None) -> dict[str, np.ndarray | None]:
        """Arrange PyTorch's results in the layouts of symattn.verify.verify.

        nn.MultiheadAttention gives ``output`` (batch, n_q, d_out) and ``weights``; the heads of
        scaled_dot_product_attention are compared one by one as ``head_outputs`` (batch, h,
        n_q, E_v). The batch axis is dropped for an unbatched call and flattened when
        scaled_dot_product_attention had several batch dimensions.
        """
        if self.kind == MHA:
            if self.batch_shape and not self.batch_first:
                output = output.transpose(1, 0, 2)
            return {"output": output, "weights": weights, "head_outputs": None}
        heads = self.problems[0].heads
        per_head = output.reshape((len(self.problems), heads) + output.shape[-2:])
        return {"output": None, "weights": None, "head_outputs": per_head if self.batch_shape else per_head[0]}


def problems_from_call(fn: Any, query: Any, key: Any, value: Any, *args: Any,
                       masked_rows: str = "error", **kwargs: Any) -> TorchProblems:
    """Read a call of nn.MultiheadAttention or scaled_dot_product_attention into problems.

    The arguments are those the callable takes, so ``problems_from_call(mha, q, k, v,
    key_padding_mask=m)`` reads the call ``mha(q, k, v, key_padding_mask=m)``.
    """
    if isinstance(fn, torch.nn.MultiheadAttention):
        bound = _bind(fn.forward, query, key, value, *args, **kwargs)
        return _mha_problems(fn, masked_rows=masked_rows, **bound)
    if _is_sdpa(fn):
        bound = _bind(_sdpa_signature, query, key, value, *args, **kwargs)
        return _sdpa_problems(masked_rows=masked_rows, **bound)
    raise UnsupportedError(
        f"{fn!r} is not a callable symattn can read; expected a torch.nn.MultiheadAttention "
        f"module or torch.nn.functional.scaled_dot_product_attention"
    )


def reference(fn: Any, query: Any, key: Any, value: Any, *args: Any, digits: int = DEFAULT_DIGITS,
              masked_rows: str = "error", engine: str = "auto", progress: Progress | None = None,
              **kwargs: Any) -> Any:
    """Return the correctly rounded reference of the call, shaped as PyTorch returns it.

    For nn.MultiheadAttention this is ``(output, weights)``, with weights None unless
    ``need_weights``; for scaled_dot_product_attention the output alone. The values are the exact
    function of the given tensors, correctly rounded to the query's dtype. ``progress`` hears
    ("certified references", k, n) for the n batch elements (see symattn.progress).
    """
    call = problems_from_call(fn, query, key, value, *args, masked_rows=masked_rows, **kwargs)
    from .numeric.reference import compute_reference

    references = [
        compute_reference(problem, digits, engine=engine)
        for problem in track(progress, "certified references", call.problems)
    ]
    dtype = call.dtype
    output = np.array([r.stages["output"].rounded(dtype) for r in references])
    output_tensor = _tensor(call.output_layout(output), dtype)
    if call.kind == SDPA:
        return output_tensor
    if not call.need_weights:
        return output_tensor, None
    weights = _reference_weights(references, call)
    return output_tensor, _tensor(weights, dtype)


def verify(fn: Any, query: Any, key: Any, value: Any, *args: Any, actual: Any = None,
           ulps: float | None = None, rtol: float | None = None, atol: float | None = None,
           digits: int = DEFAULT_DIGITS, masked_rows: str = "error", engine: str = "auto",
           progress: Progress | None = None, **kwargs: Any) -> Report:
    """Run the call (unless its result is given as ``actual``) and verify it against the reference.

    The output is compared, and the attention weights too when nn.MultiheadAttention returns
    them. The tolerance is ``ulps``, or ``rtol`` and ``atol``, or torch.testing's default for
    the dtype when none is given. ``progress`` works as in ``reference``.
    """
    call = problems_from_call(fn, query, key, value, *args, masked_rows=masked_rows, **kwargs)
    if actual is None:
        actual = fn(query, key, value, *args, **kwargs)
    output, weights = (actual if call.kind == MHA else (actual, None))
    tolerance = None
    if ulps is not None or rtol is not None or atol is not None:
        tolerance = Tolerance(ulps=ulps, rtol=rtol, atol=atol)

    arrays = call.actual_arrays(_numpy(output), None if weights is None else _numpy(weights))
    problems = list(call.problems) if call.batch_shape else call.problems[0]
    return verify_arrays(
        problems, **arrays, average_weights=call.average_weights,
        dtype=call.dtype, tolerance=tolerance, digits=digits, engine=engine, progress=progress,
    )


# nn.MultiheadAttention


def _mha_problems(module: torch.nn.MultiheadAttention, *, query, key, value, key_padding_mask=None,
                  need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False,
                  masked_rows: str = "error") -> TorchProblems:
    if module.training and module.dropout > 0:
        raise UnsupportedError(
            f"the module is in training mode with dropout {module.dropout}, so its output is random; "
            f"call module.eval() first"
        )
    batched = query.dim() == 3
    if not batched and query.dim() != 2:
        raise ShapeError(f"query has shape {tuple(query.shape)}; expected (L, E) or a batched 3-D tensor")
    queries, keys, values = (_sequences(x, name, batched, module.batch_first)
                             for x, name in ((query, "query"), (key, "key"), (value, "value")))
    _check_widths(module, queries[0], keys[0], values[0])
    if len(keys) != len(queries) or len(values) != len(queries):
        raise ShapeError(
            f"query, key and value have batch sizes {len(queries)}, {len(keys)} and {len(values)}; "
            f"they must be equal"
        )
    if keys[0].shape[0] != values[0].shape[0]:
        raise ShapeError(
            f"key has {keys[0].shape[0]} positions but value has {values[0].shape[0]}; every key "
            f"needs exactly one value"
        )
    if is_causal and attn_mask is None:
        raise InvalidInputError(
            "is_causal=True needs attn_mask in nn.MultiheadAttention, as in PyTorch; pass the "
            "causal mask itself"
        )
    # PyTorch drops attn_mask and runs a top-left causal mask when is_causal holds, no key
    # padding mask is given and no weights are needed (multi_head_attention_forward).
    causal = "top_left" if is_causal and key_padding_mask is None and not need_weights else None
    if causal is not None:
        attn_mask = None

    weights = _mha_weights(module)
    heads = module.num_heads
    extra_rows = int(module.bias_k is not None) + int(module.add_zero_attn)
    problems = []
    for batch, (x_q, x_k, x_v) in enumerate(zip(queries, keys, values)):
        masks = _mha_masks(key_padding_mask, attn_mask, batch, heads, batched, x_q.shape[0],
                           x_k.shape[0], extra_rows)
        spec = AttentionSpec(heads=heads, masks=masks, causal=causal, masked_rows=masked_rows)
        problems.append(Problem.from_arrays(spec=spec, **_mha_inputs(module, weights, x_q, x_k, x_v)))
    return TorchProblems(
        kind=MHA,
        problems=tuple(problems),
        batch_shape=(len(queries),) if batched else (),
        dtype=_dtype(query),
        batch_first=bool(module.batch_first),
        need_weights=bool(need_weights),
        average_weights=bool(average_attn_weights),
    )


def _sequences(tensor, name: str, batched: bool, batch_first: bool) -> list[np.ndarray]:
    """Split a (L, E), (L, N, E) or (N, L, E) tensor into N arrays of shape (L, E)."""
    expected = 3 if batched else 2
    if tensor.dim() != expected:
        raise ShapeError(
            f"{name} has shape {tuple(tensor.shape)} but query has {expected} dimensions; "
            f"query, key and value must all be batched or all unbatched"
        )
    array = _numpy(tensor)
    if not batched:
        return [array]
    if not batch_first:
        array = array.transpose(1, 0, 2)
    return list(array)


def _check_widths(module, x_q: np.ndarray, x_k: np.ndarray, x_v: np.ndarray) -> None:
    for name, array, declared, option in (("query", x_q, module.embed_dim, "embed_dim"),
                                          ("key", x_k, module.kdim, "kdim"),
                                          ("value", x_v, module.vdim, "vdim")):
        if array.shape[1] != declared:
            raise ShapeError(
                f"{name} has width {array.shape[1]} but the module declares {option} = {declared}; "
                f"give {name} with {declared} features, or build the module with {option}={array.shape[1]}"
            )


def _mha_weights(module) -> dict[str, np.ndarray | None]:
    """Return W_Q, W_K, W_V, W_O (symattn layout: (in, out)) and the biases."""
    E = module.embed_dim
    if module._qkv_same_embed_dim:
        packed = _numpy(module.in_proj_weight)  # (3E, E) in PyTorch's (out, in) layout
        W_Q, W_K, W_V = packed[:E].T, packed[E : 2 * E].T, packed[2 * E :].T
    else:
        W_Q, W_K, W_V = (_numpy(w).T for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight))
    b_Q = b_K = b_V = None
    if module.in_proj_bias is not None:
        packed_bias = _numpy(module.in_proj_bias)
        b_Q, b_K, b_V = packed_bias[:E], packed_bias[E : 2 * E], packed_bias[2 * E :]
    return {
        "W_Q": W_Q, "W_K": W_K, "W_V": W_V, "b_Q": b_Q, "b_K": b_K, "b_V": b_V,
        "W_O": _numpy(module.out_proj.weight).T,
        "b_O": None if module.out_proj.bias is None else _numpy(module.out_proj.bias),
        "bias_k": None if module.bias_k is None else _numpy(module.bias_k).reshape(-1),
        "bias_v": None if module.bias_v is None else _numpy(module.bias_v).reshape(-1),
    }


def _mha_inputs(module, weights: dict, x_q: np.ndarray, x_k: np.ndarray, x_v: np.ndarray) -> dict:
    inputs = {
        "query_source": x_q, "key_source": x_k, "value_source": x_v,
        "W_Q": weights["W_Q"], "W_K": weights["W_K"], "W_V": weights["W_V"],
        "b_Q": weights["b_Q"], "b_K": weights["b_K"], "b_V": weights["b_V"],
        "W_O": weights["W_O"], "b_O": weights["b_O"],
    }
    if weights["bias_k"] is None and not module.add_zero_attn:
        return inputs
    inputs["key_source"], inputs["W_K"], inputs["b_K"] = _appended_rows(
        x_k, weights["W_K"], weights["b_K"], weights["bias_k"], module.add_zero_attn)
    inputs["value_source"], inputs["W_V"], inputs["b_V"] = _appended_rows(
        x_v, weights["W_V"], weights["b_V"], weights["bias_v"], module.add_zero_attn)
    return inputs


def _appended_rows(source: np.ndarray, W: np.ndarray, b: np.ndarray | None, extra: np.ndarray | None,
                   zero_row: bool) -> tuple[np.ndarray, np.ndarray, None]:
    """Return a source and weight whose projection is [source W + b; extra; 0], exactly.

    PyTorch appends bias_k (bias_v) as one more projected key (value) row, and add_zero_attn a
    zero row after that. Here the bias b becomes a weight row that multiplies a column of ones,
    and ``extra`` a weight row with a column of its own. The projected rows are then exact:
    [x, 1, 0] gives x W + b, [0, 0, 1] gives extra, and [0, 0, 0] gives 0.
    """
    n, width = source.shape
    d_model = W.shape[1]
    bias = np.zeros(d_model, dtype=W.dtype) if b is None else b
    rows = [np.hstack([source, np.ones((n, 1), source.dtype), np.zeros((n, 1), source.dtype)])]
    weight_rows = [W, bias.reshape(1, -1), np.zeros((1, d_model), W.dtype)]
    if extra is not None:
        row = np.zeros((1, width + 2), source.dtype)
        row[0, -1] = 1
        rows.append(row)
        weight_rows[2] = extra.reshape(1, -1).astype(W.dtype)
    if zero_row:
        rows.append(np.zeros((1, width + 2), source.dtype))
    return np.vstack(rows), np.vstack(weight_rows), None


def _mha_masks(key_padding_mask, attn_mask, batch: int, heads: int, batched: bool, n_q: int,
               n_kv: int, extra_rows: int) -> list[Mask]:
    """Return the masks of one batch element; appended key rows are visible, as PyTorch pads
    both masks with 0 (float) for them."""
    masks = []
    if key_padding_mask is not None:
        padding = _mask_array(key_padding_mask, "key_padding_mask")
        if batched:
            padding = padding[batch]
        if padding.shape != (n_kv,):
            raise ShapeError(
                f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected "
                + (f"(N, {n_kv})" if batched else f"({n_kv},)") + " with one entry per key"
            )
        masks.append(_mha_mask(_pad_keys(padding, extra_rows), key_padding_mask))
    if attn_mask is not None:
        values = _mask_array(attn_mask, "attn_mask")
        if values.ndim == 3:
            values = values[batch * heads : (batch + 1) * heads]
            expected = (heads, n_q, n_kv)
        else:
            expected = (n_q, n_kv)
        if values.shape != expected:
            total = f"({'N·' if batched else ''}{heads}, {n_q}, {n_kv})"
            raise ShapeError(
                f"attn_mask has shape {tuple(attn_mask.shape)}; expected ({n_q}, {n_kv}) or {total}"
            )
        masks.append(_mha_mask(_pad_keys(values, extra_rows), attn_mask))
    return masks


def _mha_mask(values: np.ndarray, tensor) -> Mask:
    # nn.MultiheadAttention: a bool True hides the key, a float is added to the logit.
    return Mask.block(values) if tensor.dtype == torch.bool else Mask.additive(values)


def _pad_keys(values: np.ndarray, extra_rows: int) -> np.ndarray:
    if not extra_rows:
        return values
    padding = [(0, 0)] * (values.ndim - 1) + [(0, extra_rows)]
    return np.pad(values, padding, constant_values=False if values.dtype == bool else 0)


def _reference_weights(references: list, call: TorchProblems) -> np.ndarray:
    dtype = call.dtype
    if call.average_weights:
        _, _, rounded = rounded_head_means(references, dtype)
        weights = rounded  # (N, L, S)
    else:
        heads = call.problems[0].heads
        weights = np.array([[r.stages[f"A_{h}"].rounded(dtype) for h in range(heads)] for r in references])
    return weights if call.batch_shape else weights[0]


# scaled_dot_product_attention


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """Stand in for torch.nn.functional.scaled_dot_product_attention (torch 2.13) when binding
    arguments, because the built-in function has no inspectable signature."""


def _is_sdpa(fn: Any) -> bool:
    return fn is torch.nn.functional.scaled_dot_product_attention or fn is torch._C._nn.scaled_dot_product_attention


def _sdpa_problems(*, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, masked_rows: str = "error") -> TorchProblems:
    if dropout_p:
        raise UnsupportedError(f"dropout_p is {dropout_p}, so the output is random; pass dropout_p=0.0")
    if is_causal and attn_mask is not None:
        raise InvalidInputError(
            "scaled_dot_product_attention takes attn_mask or is_causal, not both (PyTorch raises too)"
        )
    q, k, v = _numpy(query), _numpy(key), _numpy(value)
    for name, array in (("query", q), ("key", k), ("value", v)):
        if array.ndim < 2:
            raise ShapeError(f"{name} has shape {array.shape}; expected (..., L, E) with at least 2 dimensions")
    if enable_gqa and q.ndim >= 3:
        k, v = _repeat_kv_heads(q, k, "key"), _repeat_kv_heads(q, v, "value")
    _check_sdpa_shapes(q, k, v)

    # One problem per index of the dimensions before the head dimension (dim -3).
    heads = q.shape[-3] if q.ndim >= 3 else 1
    batch_shape = q.shape[:-3]
    n_q, n_kv = q.shape[-2], k.shape[-2]
    q4, k4, v4 = (a.reshape((-1, heads) + a.shape[-2:]) for a in (q, k, v))
    masks = _sdpa_masks(attn_mask, q.shape[:-2], heads, n_q, n_kv)
    spec_scale = "sqrt_dk" if scale is None else float(scale)

    problems = []
    for batch in range(q4.shape[0]):
        spec = AttentionSpec(heads=heads, scale=spec_scale, masks=masks[batch],
                             causal="top_left" if is_causal else None, masked_rows=masked_rows)
        # Heads side by side: head i owns the column block i·E … (i+1)·E − 1.
        Q, K, V = (np.concatenate(list(a[batch]), axis=1) for a in (q4, k4, v4))
        problems.append(Problem.from_arrays(spec=spec, direct=True, Q=Q, K=K, V=V))
    return TorchProblems(
        kind=SDPA,
        problems=tuple(problems),
        batch_shape=tuple(batch_shape),
        dtype=_dtype(query),
        sdpa_shape=tuple(q.shape[:-1]) + (v.shape[-1],),
    )


def _repeat_kv_heads(q: np.ndarray, kv: np.ndarray, name: str) -> np.ndarray:
    query_heads, kv_heads = q.shape[-3], kv.shape[-3] if kv.ndim >= 3 else 0
    if kv_heads == 0 or query_heads % kv_heads:
        raise ShapeError(
            f"with enable_gqa, the query's {query_heads} heads must be a multiple of the {name}'s "
            f"{kv_heads} heads (dimension -3)"
        )
    return np.repeat(kv, query_heads // kv_heads, axis=-3)


def _check_sdpa_shapes(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1]:
        raise ShapeError(
            f"query {q.shape}, key {k.shape} and value {v.shape} do not fit: the batch and head "
            f"dimensions must be equal (pass enable_gqa=True for fewer key/value heads) and key and "
            f"value need the same number of positions"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ShapeError(
            f"query has width {q.shape[-1]} but key has width {k.shape[-1]}; queries and keys need "
            f"the same width E"
        )


def _sdpa_masks(attn_mask, leading: tuple[int, ...], heads: int, n_q: int, n_kv: int) -> list[list[Mask]]:
    """Return the masks of each problem: the attention mask broadcast to its (heads, L, S)."""
    count = int(np.prod(leading[:-1])) if leading else 1
    if attn_mask is None:
        return [[] for _ in range(count)]
    values = _mask_array(attn_mask, "attn_mask")
    try:
        full = np.broadcast_to(values, tuple(leading) + (n_q, n_kv))
    except ValueError:
        raise ShapeError(
            f"attn_mask has shape {values.shape}, which does not broadcast to the attention "
            f"weights' shape {tuple(leading) + (n_q, n_kv)}"
        ) from None
    full = full.reshape((-1, heads, n_q, n_kv))
    masks = []
    for per_problem in full:
        # A mask equal across heads (and across queries) is kept 2-D (1-D), which is cheaper.
        if np.all(per_problem == per_problem[:1]):
            per_problem = per_problem[0]
            if np.all(per_problem == per_problem[:1]):
                per_problem = per_problem[0]
        # scaled_dot_product_attention: a bool True lets the query attend, a float is added.
        mask = Mask.keep(per_problem) if attn_mask.dtype == torch.bool else Mask.additive(per_problem)
        masks.append([mask])
    return masks


# Tensors


def _bind(function: Callable, *args: Any, **kwargs: Any) -> dict:
    try:
        bound = inspect.signature(function).bind(*args, **kwargs)
    except TypeError as error:
        raise InvalidInputError(f"the arguments do not fit {getattr(function, '__qualname__', function)}: {error}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def _numpy(tensor: Any) -> np.ndarray:
    """Return a tensor's values as a NumPy array of the same values (bfloat16 widened to float32)."""
    if not isinstance(tensor, torch.Tensor):
        raise InvalidInputError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()  # every bfloat16 value is a float32 value
    return tensor.numpy()


def _mask_array(tensor: Any, name: str) -> np.ndarray:
    if not isinstance(tensor, torch.Tensor):
        raise InvalidInputError(f"{name} is {type(tensor).__name__}; expected a torch.Tensor")
    if tensor.dtype != torch.bool and not tensor.is_floating_point():
        raise InvalidInputError(
            f"{name} has dtype {tensor.dtype}; PyTorch takes bool masks and float masks only"
        )
    return _numpy(tensor)


def _dtype(tensor: Any) -> str:
    return dtype_name(tensor.dtype)


def _tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    result = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32 if dtype == "bfloat16" else dtype))
    return result.to(torch.bfloat16) if dtype == "bfloat16" else result
