"""A plain float64 NumPy forward pass of a Problem, with switches that reproduce known mistakes.

This is not a reference: it rounds at every step. It serves to recognise a mismatch: when an
implementation's output agrees with the forward pass under one mistaken switch (the wrong scale,
the softmax over queries, heads split with a plain reshape), the mistake gets a name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Variant:
    """A way to compute attention, right or wrong.

    ``scale``: the factor applied to Q_i K_iᵀ, or None for the spec's own scale.
    ``softmax_axis``: -1 normalises over keys (right), 0 over queries.
    ``split_reshape``: heads split from (n, d_model) by a plain reshape to (h, n, d_k) instead of
    reshape to (n, h, d_k) and transpose. ``merge_reshape``: head outputs (h, n, d_v) merged by a
    plain reshape to (n, h·d_v) instead of transpose and reshape.
    ``average_weights``: every head uses the mean of the heads' attention weights.
    ``flip_masks``: keep and block masks mean the opposite.
    """

    scale: float | None = None
    softmax_axis: int = -1
    split_reshape: bool = False
    merge_reshape: bool = False
    average_weights: bool = False
    flip_masks: bool = False


RIGHT = Variant()


def inputs_float64(problem) -> dict[str, np.ndarray]:
    """Return the problem's inputs as float64 arrays; biases become rows of shape (1, width)."""
    arrays = {}
    for name, value in problem.inputs.items():
        array = np.asarray(value)
        array = array.astype(np.float64) if array.dtype != object else np.vectorize(float, otypes=[np.float64])(array)
        arrays[name] = array.reshape(1, -1) if name.startswith("b_") else array
    return arrays


def hidden_and_bias(spec, heads: int, n_q: int, n_kv: int, flip_masks: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Return which keys each query cannot see and the additive bias, both shaped (heads, n_q, n_kv)."""
    hidden = np.zeros((heads, n_q, n_kv), dtype=bool)
    bias = np.zeros((heads, n_q, n_kv))
    query = np.arange(n_q)[:, None]
    key = np.arange(n_kv)[None, :]
    if spec.causal == "top_left":
        hidden |= key > query
    elif spec.causal == "bottom_right":
        hidden |= key > query + n_kv - n_q
    if spec.key_length is not None:
        hidden[..., spec.key_length :] = True

    for mask in spec.masks:
        # A 1-D mask is per key and a 2-D mask per (query, key); both apply to every head.
        shape = (1,) * (3 - len(mask.shape)) + tuple(mask.shape)
        if mask.kind == "additive":
            values = np.array([float(v) for v in mask.values]).reshape(shape)
            hidden |= np.isneginf(values)
            bias = bias + np.where(np.isneginf(values), 0.0, values)
            continue
        flags = np.array(mask.values, dtype=bool).reshape(shape)
        blocks = flags if mask.kind == "block" else ~flags
        hidden |= ~blocks if flip_masks else blocks
    return hidden, bias


def forward(problem, variant: Variant = RIGHT) -> dict[str, np.ndarray]:
    """Run attention in float64 under ``variant`` and return "weights" (h, n_q, n_kv),
    "head_outputs" (h, n_q, d_v) and "output". Rows with no visible key come out as NaN."""
    spec = problem.spec
    inputs = inputs_float64(problem)
    if problem.direct:
        Q, K, V = inputs["Q"], inputs["K"], inputs["V"]
    else:
        Q = _project(inputs["query_source"], inputs["W_Q"], inputs.get("b_Q"))
        K = _project(inputs["key_source"], inputs["W_K"], inputs.get("b_K"))
        V = _project(inputs["value_source"], inputs["W_V"], inputs.get("b_V"))

    heads = spec.heads
    n_q, n_kv = Q.shape[0], K.shape[0]
    d_k, d_v = Q.shape[1] // heads, V.shape[1] // heads
    Q_h = _split(Q, heads, variant.split_reshape)  # (h, n_q, d_k)
    K_h = _split(K, heads, variant.split_reshape)  # (h, n_kv, d_k)
    V_h = _split(V, heads, variant.split_reshape)  # (h, n_kv, d_v)

    scale = variant.scale if variant.scale is not None else float(spec.scale_value(d_k, n_kv))
    hidden, bias = hidden_and_bias(spec, heads, n_q, n_kv, variant.flip_masks)
    logits = np.where(hidden, -np.inf, Q_h @ K_h.transpose(0, 2, 1) * scale + bias)
    weights = _softmax(logits, axis=1 if variant.softmax_axis == 0 else 2)
    if variant.average_weights:
        weights = np.broadcast_to(weights.mean(axis=0), weights.shape)

    head_outputs = weights @ V_h  # (h, n_q, d_v)
    if variant.merge_reshape:
        concat = head_outputs.reshape(n_q, heads * d_v)
    else:
        concat = head_outputs.transpose(1, 0, 2).reshape(n_q, heads * d_v)
    output = concat if "W_O" not in inputs else _project(concat, inputs["W_O"], inputs.get("b_O"))
    return {"weights": np.array(weights), "head_outputs": head_outputs, "output": output}


def _project(source: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    projected = source @ weight
    return projected if bias is None else projected + bias


def _split(matrix: np.ndarray, heads: int, plain_reshape: bool) -> np.ndarray:
    rows, width = matrix.shape
    if plain_reshape:
        return matrix.reshape(heads, rows, width // heads)
    return matrix.reshape(rows, heads, width // heads).transpose(1, 0, 2)


def _softmax(logits: np.ndarray, axis: int) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        shifted = logits - np.max(logits, axis=axis, keepdims=True)
        exps = np.exp(shifted)
        return exps / np.sum(exps, axis=axis, keepdims=True)
