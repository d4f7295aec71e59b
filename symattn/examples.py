"""The built-in example: three image patches attend to two words with two heads.

The query source X_q contains three image patches with three features each, and the
key/value source X_kv contains two word embeddings with two features each. So n_q = 3 differs
from n_kv = 2, and the two sources differ in width. Both are projected to d_model = 4, which
the two heads split into blocks of d_k = 2. The entries are small integers, so every score can
be checked by hand, and the scale 1/√2 and the softmax bring in exact irrational numbers.

EXAMPLE_DATA has the layout of a parsed derivation file. derivations/example/example.toml
contains the same data, and a test checks that the two agree.
"""

from __future__ import annotations

from typing import Any

from .derive import Derivation
from .loaders import DerivationMeta, parse_derivation

EXAMPLE_NAME = "example"

EXAMPLE_DATA: dict[str, Any] = {
    "meta": {
        "title": "Cross attention of image patches over words",
        "description": (
            "Three image patches (the queries) attend to two word embeddings (the keys and "
            "values) with two heads. Every entry is a small integer, so each step can be "
            "checked by hand."
        ),
    },
    "spec": {
        "heads": 2,
        "scale": "sqrt_dk",
    },
    "inputs": {
        # One row per image patch: three pixel features.
        "query_source": [[1, 0, 1], [0, 2, 1], [1, 1, 0]],
        # One row per word: a two-feature embedding.
        "kv_source": [[1, 2], [2, 0]],
    },
    "weights": {
        "W_Q": [[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0]],
        "W_K": [[1, 0, 0, 1], [0, 1, 1, 0]],
        "W_V": [[1, 0, 2, 0], [0, 1, 0, 1]],
        "W_O": [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [1, 0, 0, 1]],
    },
}


def example_derivation() -> tuple[Derivation, DerivationMeta]:
    """Derive the built-in example and return it with its title and description.

    >>> derivation, meta = example_derivation()
    >>> derivation["Z_0"]  # head 0: the first two columns of Q times those of K, transposed
    Matrix([
    [4, 4],
    [7, 2],
    [3, 2]])
    >>> derivation["A_0"][0, :]  # equal scores share the weight exactly
    Matrix([[1/2, 1/2]])
    """
    return parse_derivation(EXAMPLE_DATA, "built-in example")
