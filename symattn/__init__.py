"""symattn derives multi-head (cross) attention exactly, stage by stage.

Conventions, kept everywhere in the package:

- Rows are tokens. Projections multiply on the right: Q = X_q W_Q (+ b_Q), K = X_k W_K,
  V = X_v W_V, with weights of shape (input width, output width).
- Head i owns the contiguous column block i·d_k … (i+1)·d_k − 1 of Q and K (and the block
  i·d_v … (i+1)·d_v − 1 of V). Head outputs are concatenated head-major along features.
- Z_i = Q_i K_iᵀ, scaled by 1/√d_k with d_k the per-head width unless another scale is named
  ("sqrt_seq" for 1/√n_kv, "none", or an exact number). The softmax runs along each row (over keys).
- A mask states its kind: keep (True = may attend), block (True = hidden) or additive.
  A query row with no visible key raises MaskError unless masked_rows is "zeros" or "nan".
- Values are exact: decimal strings become rationals ("2.1" is 21/10) and floats are taken at
  their exact binary value (0.1 is 3602879701896397/36028797018963968).

Other layouts, such as PyTorch's ``x Wᵀ`` and packed ``in_proj_weight``, are converted at the edge.
"""

from .derive import Derivation, derive, derive_direct, softmax_rows
from .errors import (
    EvaluationError,
    InvalidInputError,
    MaskError,
    OutputError,
    ResourceLimitError,
    ShapeError,
    SymattnError,
    SymattnWarning,
    UnsupportedError,
)
from .numeric.decimals import matrix_to_decimals
from .numeric.reference import CertifiedMatrix, Reference, compute_reference
from .problem import Problem
from .spec import AttentionSpec, Mask
from .values import symbol_matrix, to_exact, to_matrix

__version__ = "0.1.0"

__all__ = [
    "AttentionSpec",
    "CertifiedMatrix",
    "Derivation",
    "EvaluationError",
    "InvalidInputError",
    "Mask",
    "MaskError",
    "OutputError",
    "Problem",
    "Reference",
    "ResourceLimitError",
    "ShapeError",
    "SymattnError",
    "SymattnWarning",
    "UnsupportedError",
    "compute_reference",
    "derive",
    "derive_direct",
    "matrix_to_decimals",
    "softmax_rows",
    "symbol_matrix",
    "to_exact",
    "to_matrix",
]
