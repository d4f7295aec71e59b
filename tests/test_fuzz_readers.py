"""Fuzzing the readers: random and mutated input raises nothing but the package's own errors.

Each reader (TOML derivation files, derivation JSON, verification cases and certified
references) starts from valid files, then hypothesis mutates their bytes (flips, insertions,
deletions, repeats, truncation) or their structure (a node of the parsed document replaced by
a random value, a key removed or added). Reading must then return normally or raise a
SymattnError; any other exception is a crash in the reader.

SYMATTN_FUZZ_EXAMPLES sets the examples per test (default 150); docs/fuzzing.md records the
long campaigns and how to rerun one.
"""

import decimal
import importlib
import io
import json
import os
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from symattn import AttentionSpec, InvalidInputError, Mask, SymattnError, derive, derive_direct, symbol_matrix
from symattn.export.arrays import read_reference, reference_to_json, reference_to_npz
from symattn.export.json_reader import parse_derivation_json, read_derivation_json, rederive
from symattn.export.numbers import derivation_to_json
from symattn.loaders import load_derivation_file, parse_derivation
from symattn.numeric.reference import compute_reference
from symattn.problem import Problem
from symattn.verify.cases import load_case

EXAMPLES = int(os.environ.get("SYMATTN_FUZZ_EXAMPLES", "150"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# A fuzzed document may describe a valid but large derivation; a lower size limit keeps each
# example fast. The limit itself is tested in test_limits.py.
FUZZ_MAX_EXPRESSION_SIZE = 30_000

DERIVE_MODULE = importlib.import_module("symattn.derive")


@contextmanager
def small_size_limit():
    real = DERIVE_MODULE.check_expression_size

    def check(spec, inputs, direct, max_expression_size):
        limit = FUZZ_MAX_EXPRESSION_SIZE if max_expression_size is None else min(max_expression_size, FUZZ_MAX_EXPRESSION_SIZE)
        return real(spec, inputs, direct, limit)

    with mock.patch.object(DERIVE_MODULE, "check_expression_size", check):
        yield


def read_or_raise_own_error(read, *args):
    """Call the reader; a SymattnError is an accepted outcome, any other exception propagates.

    The outcome is recorded as a hypothesis event, so --hypothesis-show-statistics shows how
    many inputs were read and which errors rejected the others.
    """
    with small_size_limit():
        try:
            result = read(*args)
        except SymattnError as error:
            event(f"{read.__name__}: {type(error).__name__}")
            return None
    event(f"{read.__name__}: read")
    return result


# Seeds: valid files of every reader.

TOML_SEEDS = [
    b"""
[meta]
title = "Two heads"
description = "Image patches attend to words."

[spec]
heads = 2
scale = "sqrt_dk"
masked_rows = "zeros"

[[spec.mask]]
kind = "block"
values = [[false, true], [false, false], [true, true]]

[inputs]
query_source = [[1, 0, 2], [0, 1, 1], [2, 1, 0]]
kv_source = [[1, 2], [0, 1]]

[weights]
W_Q = [[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]]
W_K = [[1, 0, 1, 0], [0, 1, 0, 1]]
W_V = [[1, 2, 0, 1], [0, "1/2", 1, 0]]
b_Q = [0, 1, "0.5", -1]
""",
    b"""
[spec]
scale = "1/sqrt(2)"
causal = "bottom_right"
key_length = 2

[[spec.mask]]
kind = "additive"
values = [[0.5, -inf, 0], [0, 1.25, 2]]

[inputs]
Q = [[1, 0], [0, "w"]]
K = {symbol = "k", shape = [3, 2]}
V = [[1], [2], ["-b_1"]]

[weights]
W_O = [[2]]
b_O = ["1/3"]
""",
]


def toml_path(tmp_path, data):
    path = tmp_path / "fuzz.toml"
    path.write_bytes(data)
    return path


def json_seeds():
    cases = [
        derive_direct([["1/2", "w"]], [[1, 0], [0, 1]], [[1], [2]], mask=Mask.additive([["1/4", "-inf"]])),
        derive(
            [[1, 0], [0, 1]], [[1, 2]], W_Q=[[1, 0], [0, 1]], W_K=[[1, 0], [0, 1]], W_V=symbol_matrix("v", 2, 2),
            b_Q=[0, "0.25"], W_O=[[1], [2]], heads=2, causal="top_left",
        ),
    ]
    return [derivation_to_json(derivation, 8).encode() for derivation in cases]


JSON_SEEDS = json_seeds()


def npz_bytes(spec, **arrays):
    buffer = io.BytesIO()
    np.savez(buffer, spec=json.dumps(spec), **arrays)
    return buffer.getvalue()


NPZ_SEEDS = [
    npz_bytes(
        {"heads": 1, "masked_rows": "zeros", "masks": [{"kind": "block", "values": [[False, True]]}]},
        query_source=np.array([[1.0, 0.0]]), key_source=np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
        value_source=np.array([[2.0], [4.0]]), W_Q=np.eye(2), W_K=np.eye(3, 2), W_V=np.array([[1.0, 0.0]]),
        output=np.array([[2.66, 0.0]], dtype=np.float32),
    ),
    npz_bytes(
        {"scale": "none", "heads": 2, "dtype": "float16", "weight_layout": "pytorch"},
        Q=np.eye(2, dtype=np.float16), K=np.eye(3, 2, dtype=np.float16), V=np.ones((3, 2), dtype=np.float16),
        output=np.zeros((2, 2), dtype=np.float16),
    ),
]

CASE_TOML_SEED = b"""
[spec]
heads = 1
dtype = "float64"
masked_rows = "zeros"

[[spec.masks]]
kind = "keep"
values = [[true, false]]

[inputs]
Q = [[1, 0]]
K = "k.npy"
V = [["2"], ["4.5"]]

[outputs]
output = [[2.5]]
"""


# Mutations.

@st.composite
def mutated_bytes(draw, seeds):
    """Apply 1 to 8 random byte edits to one of the seeds."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        edit = draw(st.sampled_from(["flip", "set", "delete", "insert", "repeat", "truncate"]))
        if edit == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif edit == "set" and data:
            data[position] = draw(st.sampled_from(b"\x00\"'[]{}=,.-+e\\\n#01979"))
        elif edit == "delete":
            del data[position : position + draw(st.integers(1, 16))]
        elif edit == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=12))
        elif edit == "repeat":
            chunk = data[position : position + draw(st.integers(1, 64))]
            data[position:position] = chunk * draw(st.integers(1, 20))
        elif edit == "truncate":
            del data[position:]
    return bytes(data)


# Values a structural mutation puts in place of a node.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.sampled_from([0, 1, -1, 2**63, -(2**63)]),
    st.builds(lambda: 10**4000),  # near the 4300 digits that int() accepts from text
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "-inf", "nan", "1e999999999", "1/0", "sqrt_dk", "keep", "additive", "w", "x_{1,1}", "-oo"]),
    st.text(max_size=20),
)
random_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8) | st.sampled_from(["kind", "values", "shape", "exact", "symbol"]), children, max_size=4),
    ),
    max_leaves=12,
)


def mutate_structure(data, document):
    """Replace, delete or add one node somewhere in a parsed document (a dict of dicts and lists)."""
    node = document
    for _ in range(data.draw(st.integers(0, 6))):
        if isinstance(node, dict):
            children = list(node.items())
        elif isinstance(node, list):
            children = list(enumerate(node))
        else:
            children = []
        children = [(key, child) for key, child in children if isinstance(child, (dict, list)) and child]
        if not children:
            break
        _, node = data.draw(st.sampled_from(children))
    if not isinstance(node, (dict, list)) or not node:
        return document
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    key = data.draw(st.sampled_from(keys))
    action = data.draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if action == "replace":
        node[key] = data.draw(random_values)
    elif action == "delete":
        del node[key]
    elif isinstance(node, dict):
        node[data.draw(st.text(max_size=8))] = data.draw(random_values)
    else:
        node.append(data.draw(random_values))
    return document


HUGE_INTEGER_MARK = "\u0000huge integer\u0000"


def to_json_text(document):
    """Serialise a mutated document; Decimals become strings and huge ints stay huge literals."""
    text = json.dumps(_mark_huge_integers(document), default=str)
    return text.replace(json.dumps(HUGE_INTEGER_MARK), "9" * 5000)


def _mark_huge_integers(value):
    # json.dumps cannot print an int of more than 4300 digits, so it is written in afterwards.
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 10_000:
        return HUGE_INTEGER_MARK
    if isinstance(value, dict):
        return {key: _mark_huge_integers(child) for key, child in value.items()}
    if isinstance(value, list):
        return [_mark_huge_integers(child) for child in value]
    return value


# The TOML derivation reader.

@FUZZ_SETTINGS
@given(mutated_bytes(TOML_SEEDS))
def test_toml_reader_mutated_bytes(tmp_path, data):
    read_or_raise_own_error(load_derivation_file, toml_path(tmp_path, data))


@FUZZ_SETTINGS
@given(st.binary(max_size=400))
def test_toml_reader_random_bytes(tmp_path, data):
    read_or_raise_own_error(load_derivation_file, toml_path(tmp_path, data))


@FUZZ_SETTINGS
@given(st.data())
def test_toml_reader_mutated_structure(data):
    import tomllib

    seed = data.draw(st.sampled_from(TOML_SEEDS))
    document = mutate_structure(data, tomllib.loads(seed.decode(), parse_float=decimal.Decimal))
    read_or_raise_own_error(parse_derivation, document, "fuzz.toml")


def test_toml_reader_deep_nesting(tmp_path):
    # tomllib recurses once per level and raised RecursionError.
    path = toml_path(tmp_path, b"[inputs]\nQ = " + b"[" * 100_000 + b"]" * 100_000 + b"\n")
    with pytest.raises(InvalidInputError, match="fuzz.toml: invalid TOML: arrays or tables nested too deeply"):
        load_derivation_file(path)


def test_toml_reader_long_integer(tmp_path):
    # int() rejects more than 4300 digits with a ValueError that was not a TOMLDecodeError.
    path = toml_path(tmp_path, b"[inputs]\nQ = [[" + b"9" * 5000 + b"]]\n")
    with pytest.raises(InvalidInputError, match="fuzz.toml: invalid TOML: Exceeds the limit"):
        load_derivation_file(path)


# The derivation JSON reader.

@FUZZ_SETTINGS
@given(mutated_bytes(JSON_SEEDS))
def test_json_reader_mutated_bytes(data):
    record = read_or_raise_own_error(parse_derivation_json, data)
    if record is not None:
        read_or_raise_own_error(rederive, record)


@FUZZ_SETTINGS
@given(st.data())
def test_json_reader_mutated_structure(data):
    seed = data.draw(st.sampled_from(JSON_SEEDS))
    text = to_json_text(mutate_structure(data, json.loads(seed)))
    record = read_or_raise_own_error(parse_derivation_json, text)
    if record is not None:
        read_or_raise_own_error(rederive, record)


@FUZZ_SETTINGS
@given(random_values)
def test_json_reader_random_documents(document):
    read_or_raise_own_error(parse_derivation_json, to_json_text(document))


def test_json_reader_deep_nesting(tmp_path):
    path = tmp_path / "deep.json"
    path.write_bytes(b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(InvalidInputError, match="deep.json: invalid JSON: the document is nested too deeply"):
        read_derivation_json(path)


def test_json_reader_long_integer():
    with pytest.raises(InvalidInputError, match="invalid JSON: Exceeds the limit"):
        parse_derivation_json('{"format": ' + "9" * 5000 + "}")


# The verification case reader (.npz archives and TOML files).

@FUZZ_SETTINGS
@given(mutated_bytes(NPZ_SEEDS))
def test_npz_case_reader_mutated_bytes(tmp_path, data):
    path = tmp_path / "case.npz"
    path.write_bytes(data)
    read_or_raise_own_error(load_case, path)


@FUZZ_SETTINGS
@given(st.data())
def test_npz_case_reader_mutated_structure(tmp_path, data):
    seed = {"spec": {"heads": 1, "masked_rows": "zeros", "scale": "none", "masks": [{"kind": "keep", "values": [[True, False]]}]}}
    if data.draw(st.booleans()):
        seed = mutate_structure(data, seed)
    spec = seed.get("spec")

    # Valid arrays of one query and two keys; some draws change one array's shape or dtype.
    arrays = {"Q": np.eye(1, 2), "K": np.eye(2), "V": np.ones((2, 1)), "output": np.full((1, 1), 0.5)}
    if data.draw(st.booleans()):
        name = data.draw(st.sampled_from(sorted(arrays)))
        if data.draw(st.integers(0, 4)) == 0:
            del arrays[name]  # a missing member
        else:
            shape = tuple(data.draw(st.lists(st.integers(0, 3), min_size=0, max_size=3)))
            dtype = data.draw(st.sampled_from(
                ["float64", "float32", "float16", "int8", "int64", "bool", "complex64", "U3", "uint8"]
            ))
            arrays[name] = np.zeros(shape, dtype=dtype) if dtype.startswith("U") else np.ones(shape, dtype=dtype)

    buffer = io.BytesIO()
    np.savez(buffer, spec=np.array(to_json_text(spec)), **arrays)
    path = tmp_path / "case.npz"
    path.write_bytes(buffer.getvalue())
    read_or_raise_own_error(load_case, path)


@pytest.mark.parametrize(
    "spec_text, message",
    [("[" * 100_000 + "]" * 100_000, "nested too deeply"), ('{"heads": ' + "9" * 5000 + "}", "Exceeds the limit")],
    ids=["deep nesting", "long integer"],
)
def test_npz_case_reader_spec_json(tmp_path, spec_text, message):
    path = tmp_path / "case.npz"
    np.savez(path, spec=np.array(spec_text), Q=np.eye(2), K=np.eye(2), V=np.eye(2))
    with pytest.raises(InvalidInputError, match=f"'spec' member .* is not valid JSON: .*{message}"):
        load_case(path)


def test_npz_case_reader_unknown_zip_version(tmp_path):
    # zipfile raises NotImplementedError for a member that needs a newer zip version.
    data = bytearray(NPZ_SEEDS[0])
    central_entry = data.index(b"PK\x01\x02")  # the first member's central directory entry
    data[central_entry + 6] = 109  # its "version needed to extract": 10.9
    path = tmp_path / "case.npz"
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidInputError, match="is not a readable .npz archive"):
        load_case(path)


def test_npz_case_reader_encrypted_member(tmp_path):
    # zipfile raises RuntimeError for a member whose flag bits mark it as encrypted.
    data = bytearray(NPZ_SEEDS[0])
    central_entry = data.index(b"PK\x01\x02")
    data[central_entry + 8] |= 0x01  # general purpose flag bit 0: encrypted
    path = tmp_path / "case.npz"
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidInputError, match="is not a readable .npz archive"):
        load_case(path)


@FUZZ_SETTINGS
@given(mutated_bytes([CASE_TOML_SEED]))
def test_toml_case_reader_mutated_bytes(tmp_path, data):
    np.save(tmp_path / "k.npy", np.eye(2))
    path = tmp_path / "case.toml"
    path.write_bytes(data)
    read_or_raise_own_error(load_case, path)


@pytest.mark.parametrize("member", ["k.npy", "../k.npy", "/etc/passwd", "missing.npy", "pickled.npy", "text.npy"])
def test_toml_case_reader_member_paths(tmp_path, member):
    folder = tmp_path / "case"
    folder.mkdir()
    np.save(folder / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (folder / "text.npy").write_text("not an array")
    np.save(tmp_path / "k.npy", np.eye(2))
    path = folder / "case.toml"
    path.write_bytes(CASE_TOML_SEED.replace(b'"k.npy"', json.dumps(member).encode()))
    with pytest.raises(SymattnError):
        load_case(path)


# The certified-reference reader (.npz archives and JSON documents from `symattn reference`).

def reference_seeds():
    problem = Problem.from_arrays(
        spec=AttentionSpec(heads=1), direct=True, Q=[[1, 0], ["1/3", 1]], K=[[1, 0], [0, 1]], V=[[1], [2]]
    )
    reference = compute_reference(problem, 20)
    return {".json": reference_to_json(reference).encode(), ".npz": reference_to_npz(reference)}


REFERENCE_SEEDS = reference_seeds()


@FUZZ_SETTINGS
@given(st.sampled_from([".json", ".npz"]), st.data())
def test_reference_reader_mutated_bytes(tmp_path, suffix, data):
    path = tmp_path / f"reference{suffix}"
    path.write_bytes(data.draw(mutated_bytes([REFERENCE_SEEDS[suffix]])))
    read_or_raise_own_error(read_reference, path)


@FUZZ_SETTINGS
@given(st.data())
def test_reference_reader_mutated_structure(tmp_path, data):
    path = tmp_path / "reference.json"
    path.write_text(to_json_text(mutate_structure(data, json.loads(REFERENCE_SEEDS[".json"]))))
    read_or_raise_own_error(read_reference, path)


def test_reference_reader_huge_exponent(tmp_path):
    # Fraction("1e999999999") builds a billion-digit integer; stored inputs are bounded instead.
    document = json.loads(REFERENCE_SEEDS[".json"])
    document["inputs"]["Q"]["exact"][0][0] = "1e999999999"
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(document))
    with pytest.raises(InvalidInputError, match="decimal exponent beyond"):
        read_reference(path)


def test_reference_reader_wrong_type(tmp_path):
    document = json.loads(REFERENCE_SEEDS[".json"])
    document["inputs"]["Q"]["dtype"] = "nbject"
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(document))
    with pytest.raises(InvalidInputError, match="is not a valid symattn-reference/1 document"):
        read_reference(path)
