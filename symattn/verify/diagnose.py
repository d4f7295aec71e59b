"""Naming the known mistake that a mismatch fits.

Each known mistake is replayed as a float64 forward pass of the same problem (see forward.py).
A mistake fits when the implementation's array is within MATCH_EPS_MULTIPLE · eps(dtype) ·
max(1, max|v|) of the mistaken values v everywhere, and at least DISTANCE_RATIO times closer to
them than to the right values. The mistakes:

- scale 1/√d_model or 1 instead of 1/√d_k;
- the softmax over queries instead of keys;
- heads split or merged with a plain reshape, without the transpose;
- the attention weights averaged over heads before they multiply V;
- keep and block masks with the opposite polarity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .floats import eps as machine_eps
from .forward import RIGHT, Variant, forward

MATCH_EPS_MULTIPLE = 256
DISTANCE_RATIO = 4.0


@dataclass(frozen=True)
class Diagnosis:
    """A known mistake that the implementation's values fit.

    ``mistake`` is a stable identifier such as "scale_sqrt_d_model", and ``description`` states
    the mistake in words. ``stage`` is the compared stage. ``distance`` and ``right_distance`` are
    the largest absolute differences from the mistaken and from the right float64 values.
    """

    mistake: str
    description: str
    stage: str
    distance: float
    right_distance: float

    def to_dict(self) -> dict:
        return {
            "mistake": self.mistake,
            "description": self.description,
            "stage": self.stage,
            "distance": self.distance,
            "right_distance": self.right_distance,
        }


def known_mistakes(problem) -> list[tuple[str, str, Variant]]:
    """Return (identifier, description, variant) for each mistake that changes this problem."""
    spec = problem.spec
    heads, d_k, n_kv = problem.heads, problem.d_k, problem.n_kv
    right_scale = float(spec.scale_value(d_k, n_kv))
    d_model = heads * d_k
    mistakes = []

    if not math.isclose(1 / math.sqrt(d_model), right_scale, rel_tol=1e-15):
        mistakes.append((
            "scale_sqrt_d_model",
            f"the logits are scaled by 1/√d_model = 1/√{d_model} instead of "
            f"{_scale_words(spec.scale, d_k)}",
            Variant(scale=1 / math.sqrt(d_model)),
        ))

    if right_scale != 1.0:
        mistakes.append((
            "scale_one",
            f"the logits are not scaled (scale 1) instead of {_scale_words(spec.scale, d_k)}",
            Variant(scale=1.0),
        ))

    if problem.n_q > 1:
        mistakes.append((
            "softmax_over_queries",
            "the softmax runs over queries (down each column of Z) instead of over keys",
            Variant(softmax_axis=0),
        ))

    if heads > 1:
        mistakes.extend([
            ("heads_split_reshape",
             "the heads are split with a plain reshape (n, d_model) → (h, n, d_k) instead of "
             "reshape to (n, h, d_k) and transpose",
             Variant(split_reshape=True)),
            ("heads_merged_reshape",
             "the head outputs are merged with a plain reshape (h, n, d_v) → (n, h·d_v) instead "
             "of transpose and reshape",
             Variant(merge_reshape=True)),
            ("heads_split_and_merged_reshape",
             "the heads are split and merged with a plain reshape, without the transposes",
             Variant(split_reshape=True, merge_reshape=True)),
            ("weights_averaged_over_heads",
             "every head uses the attention weights averaged over heads",
             Variant(average_weights=True)),
        ])

    if any(mask.kind in ("keep", "block") for mask in spec.masks):
        mistakes.append((
            "mask_polarity_flipped",
            "the boolean mask is read with the opposite polarity (True = may attend taken as "
            "True = hidden, or the reverse)",
            Variant(flip_masks=True),
        ))

    return mistakes


def _scale_words(scale, d_k: int) -> str:
    if scale == "sqrt_dk":
        return f"1/√d_k = 1/√{d_k}"
    return f"the specified scale {scale}"


def diagnose(
    problem,
    actual: np.ndarray,
    *,
    dtype: object,
    stage: str = "output",
) -> list[Diagnosis]:
    """Return the known mistakes whose float64 replay matches ``actual``, closest first.

    ``stage`` is "output" (shape (n_q, d_out)), "weights" (h, n_q, n_kv) or "head_outputs"
    (h, n_q, d_v). A NaN in the replay (a query row left with no visible key) matches a NaN
    or a 0 in ``actual``, since implementations return either.
    """
    actual = np.asarray(actual, dtype=np.float64)
    right = forward(problem, RIGHT)[stage]
    if right.shape != actual.shape:
        return []
    eps = machine_eps(dtype)
    right_distance = _distance(actual, right)
    found = []
    for mistake, description, variant in known_mistakes(problem):
        values = forward(problem, variant)[stage]
        if values.shape != actual.shape:
            continue
        distance = _distance(actual, values)
        limit = MATCH_EPS_MULTIPLE * eps * max(1.0, float(np.max(np.abs(np.nan_to_num(values)), initial=0.0)))
        if distance <= limit and distance * DISTANCE_RATIO < right_distance:
            found.append(Diagnosis(mistake, description, stage, distance, right_distance))
    return sorted(found, key=lambda diagnosis: diagnosis.distance)


def _distance(actual: np.ndarray, values: np.ndarray) -> float:
    """Return max |actual − values|, where a NaN in ``values`` is matched by a NaN or 0."""
    replay_nan = np.isnan(values)
    matched = replay_nan & (np.isnan(actual) | (actual == 0))
    if np.any(replay_nan & ~matched) or np.any(np.isnan(actual) & ~replay_nan):
        return math.inf
    with np.errstate(invalid="ignore"):
        differences = np.abs(np.where(replay_nan, 0.0, actual - values))
    return float(np.max(differences, initial=0.0))
