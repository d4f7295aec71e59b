"""Reading TOML derivation files: exact values, the file format, and errors that name file and key."""

from __future__ import annotations

import decimal
import tomllib
from pathlib import Path

import pytest
import sympy as sp

from symattn.errors import InvalidInputError, MaskError, ResourceLimitError, ShapeError, SymattnWarning
from symattn.examples import EXAMPLE_DATA, example_derivation
from symattn.loaders import MAX_FILE_BYTES, DerivationMeta, load_derivation_file, parse_derivation

REPOSITORY = Path(__file__).resolve().parent.parent

IDENTITY_WEIGHTS = "W_Q = [[1, 0], [0, 1]]\nW_K = [[1, 0], [0, 1]]\nW_V = [[1, 0], [0, 1]]\n"


def write_toml(folder: Path, text: str, name: str = "case.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_toml_decimal_stays_exact(tmp_path):
    path = write_toml(
        tmp_path,
        "[inputs]\nQ = [[2.1]]\nK = [[1]]\nV = [[0.1]]\n[spec]\nscale = \"none\"\n",
    )
    derivation, _ = load_derivation_file(path)
    assert derivation.inputs["Q"][0, 0] == sp.Rational(21, 10)
    # The TOML decimal 0.1 is one tenth, not the binary float 3602879701896397/2**55.
    assert derivation.inputs["V"][0, 0] == sp.Rational(1, 10)
    assert derivation["output"][0, 0] == sp.Rational(1, 10)


def test_load_string_entries(tmp_path):
    path = write_toml(
        tmp_path,
        '[inputs]\nQ = [["3/4", "-1.5e-3"]]\nK = [["w", "-b_1"]]\nV = [[1]]\n',
    )
    derivation, _ = load_derivation_file(path)
    w, b_1 = sp.Symbol("w", real=True), sp.Symbol("b_1", real=True)
    assert derivation.inputs["Q"][0, 0] == sp.Rational(3, 4)
    assert derivation.inputs["Q"][0, 1] == sp.Rational(-3, 2000)
    assert derivation.inputs["K"][0, 0] == w
    assert derivation.inputs["K"][0, 1] == -b_1


def test_load_symbol_table(tmp_path):
    path = write_toml(
        tmp_path,
        '[inputs]\nquery_source = {symbol = "x", shape = [1, 2]}\n[weights]\n' + IDENTITY_WEIGHTS,
    )
    derivation, _ = load_derivation_file(path)
    x_12 = sp.Symbol("x_{1,2}", real=True)
    assert derivation.inputs["query_source"].shape == (1, 2)
    assert derivation.inputs["query_source"][0, 1] == x_12
    # Self attention: the key and value sources are the query source.
    assert derivation["K"][0, 1] == x_12


def test_load_direct_mode_output(tmp_path):
    # Q = [1, 0], keys [1, 0] and [0, 1], values 2 and 4, no scaling:
    # weights e/(1 + e) and 1/(1 + e), so the output is (2e + 4)/(1 + e).
    path = write_toml(
        tmp_path,
        '[spec]\nscale = "none"\n[inputs]\nQ = [[1, 0]]\nK = [[1, 0], [0, 1]]\nV = [[2], [4]]\n',
    )
    derivation, _ = load_derivation_file(path)
    expected = (2 * sp.E + 4) / (1 + sp.E)
    assert derivation.direct
    assert sp.simplify(derivation["output"][0, 0] - expected) == 0


def test_load_separate_key_and_value_sources(tmp_path):
    path = write_toml(
        tmp_path,
        "[inputs]\nquery_source = [[1, 0]]\nkey_source = [[1, 0], [0, 1]]\nvalue_source = [[5], [7]]\n"
        "[weights]\nW_Q = [[1, 0], [0, 1]]\nW_K = [[1, 0], [0, 1]]\nW_V = [[1]]\n",
    )
    derivation, _ = load_derivation_file(path)
    assert derivation["V"] == sp.Matrix([[5], [7]])
    assert derivation["K"] == sp.Matrix([[1, 0], [0, 1]])


def test_load_biases_are_flat_lists(tmp_path):
    path = write_toml(
        tmp_path,
        "[inputs]\nquery_source = [[1, 0]]\n[weights]\n" + IDENTITY_WEIGHTS + 'b_Q = [1, "1/2"]\n',
    )
    derivation, _ = load_derivation_file(path)
    assert derivation["Q"] == sp.Matrix([[2, sp.Rational(1, 2)]])


def test_load_spec_options(tmp_path):
    path = write_toml(
        tmp_path,
        '[spec]\nheads = 2\nscale = "1/sqrt(8)"\ncausal = "top_left"\nmasked_rows = "zeros"\n'
        "[inputs]\nquery_source = [[1, 0], [0, 1]]\n[weights]\n" + IDENTITY_WEIGHTS,
    )
    derivation, _ = load_derivation_file(path)
    assert derivation.heads == 2
    assert derivation.scale == 1 / sp.sqrt(8)
    assert derivation["A_0"][0, :] == sp.Matrix([[1, 0]])
    assert derivation.spec.masked_rows == "zeros"


def test_load_additive_mask_with_minus_infinity(tmp_path):
    path = write_toml(
        tmp_path,
        '[inputs]\nQ = [[1, 0]]\nK = [[1, 0], [0, 1]]\nV = [[2], [4]]\n'
        '[[spec.mask]]\nkind = "additive"\nvalues = [[0, -inf]]\n',
    )
    derivation, _ = load_derivation_file(path)
    assert derivation["A_0"] == sp.Matrix([[1, 0]])
    assert derivation["output"] == sp.Matrix([[2]])


def test_load_keep_and_block_masks(tmp_path):
    path = write_toml(
        tmp_path,
        '[inputs]\nQ = [[1, 0], [0, 1]]\nK = [[1, 0], [0, 1]]\nV = [[2], [4]]\n'
        '[[spec.mask]]\nkind = "keep"\nvalues = [true, true]\n'
        '[[spec.mask]]\nkind = "block"\nvalues = [[false, true], [true, false]]\n',
    )
    derivation, _ = load_derivation_file(path)
    assert derivation["A_0"] == sp.Matrix([[1, 0], [0, 1]])


def test_load_meta(tmp_path):
    path = write_toml(
        tmp_path,
        '[meta]\ntitle = "Café & 50%"\ndescription = "Two lines."\n[inputs]\nQ = [[1]]\nK = [[1]]\nV = [[1]]\n',
    )
    _, meta = load_derivation_file(path)
    assert meta == DerivationMeta("Café & 50%", "Two lines.")


def test_example_file_matches_builtin_example():
    path = REPOSITORY / "derivations" / "example" / "example.toml"
    with path.open("rb") as handle:
        data = tomllib.load(handle, parse_float=decimal.Decimal)
    from_file, meta_from_file = load_derivation_file(path)
    builtin, builtin_meta = example_derivation()
    assert data == EXAMPLE_DATA
    assert meta_from_file == builtin_meta
    assert from_file.stages == builtin.stages


@pytest.mark.parametrize(
    ("text", "error_type", "message"),
    [
        ("[input]\nQ = [[1]]\n", InvalidInputError, "case.toml: input is not a valid key (did you mean inputs?); valid keys in the top level are meta, spec, inputs, weights"),
        ("[spec]\nhaeds = 2\n", InvalidInputError, "case.toml: spec.haeds is not a valid key (did you mean heads?); valid keys in spec are heads"),
        ('[spec]\nheads = "two"\n', InvalidInputError, "case.toml: spec.heads: heads is 'two'; expected a positive integer"),
        ("[spec]\nheads = 1.5\n", InvalidInputError, "case.toml: spec.heads: heads is 1.5; expected a positive integer"),
        ('[spec]\nscale = "sqrt_dmodel"\n', InvalidInputError, "case.toml: spec.scale: scale 'sqrt_dmodel' is unknown"),
        ('[spec]\ncausal = "upper"\n', InvalidInputError, "case.toml: spec.causal: causal is 'upper'"),
        ("[[spec.mask]]\nvalues = [true]\n", InvalidInputError, "case.toml: spec.mask[0].kind is missing"),
        ('[[spec.masks]]\nkind = "keep"\nvalues = [true]\n', InvalidInputError, "case.toml: spec.masks is not a valid key (did you mean mask?)"),
        ('[[spec.mask]]\nkind = "keep"\nvalues = [1, 0]\n', MaskError, "case.toml: spec.mask[0]: keep mask entry [0] is 1"),
        ('[[spec.mask]]\nkind = "visible"\nvalues = [true]\n', MaskError, "case.toml: spec.mask[0]: mask kind 'visible' is unknown"),
        ('[[spec.mask]]\nkind = "block"\nvalues = [[true, false], [false, 0]]\n', MaskError, "case.toml: spec.mask[0]: block mask entry [1, 1] is 0"),
        ('[[spec.mask]]\nkind = "additive"\nvalues = [0, "x!"]\n', InvalidInputError, "case.toml: spec.mask[0]: additive mask entry [1] 'x!' is neither a number nor a name"),
        ('[[spec.mask]]\nkind = "keep"\nvalues = [true]\nshape = [1]\n', InvalidInputError, "case.toml: spec.mask[0].shape is not a valid key"),
        ("[inputs]\nkv_source = [[1]]\n", InvalidInputError, "case.toml: inputs.query_source is missing"),
        ("[inputs]\nquery_source = [[1, 0]]\n[weights]\nW_Q = [[1], [0]]\nW_V = [[1], [0]]\n", InvalidInputError, "case.toml: weights.W_K is missing"),
        ('[inputs]\nquery_source = [[1, 0]]\n[weights]\nW_Q = [[1], ["x!"]]\nW_K = [[1], [0]]\nW_V = [[1], [0]]\n', InvalidInputError, "case.toml: weights.W_Q[1][0] 'x!' is neither a number nor a name"),
        ("[inputs]\nquery_source = [[1, 0]]\n[weights]\nW_Q = [[1], [nan]]\nW_K = [[1], [0]]\nW_V = [[1], [0]]\n", InvalidInputError, "case.toml: weights.W_Q[1][0] is NaN, which has no exact value"),
        ("[inputs]\nquery_source = [[1, 0]]\n[weights]\nW_Q = [[1], [true]]\nW_K = [[1], [0]]\nW_V = [[1], [0]]\n", InvalidInputError, "case.toml: weights.W_Q[1][0] is the boolean True"),
        ("[inputs]\nquery_source = [[1, 0]]\n[weights]\nW_Q = [[1], [0], [0]]\nW_K = [[1], [0]]\nW_V = [[1], [0]]\n", ShapeError, "case.toml: query_source has 2 features (shape (1, 2)) but W_Q has 3 rows (shape (3, 1))"),
        ('[inputs]\nquery_source = [[1, 0]]\n[weights]\nW_Q = {symbol = "w", shape = [2, 1], kind = "x"}\nW_K = [[1], [0]]\nW_V = [[1], [0]]\n', InvalidInputError, "case.toml: weights.W_Q.kind is not a valid key; valid keys in weights.W_Q are symbol, shape"),
        ('[inputs]\nquery_source = [[1, 0]]\n[weights]\nW_Q = {symbol = "w", shape = [2000, 1000]}\nW_K = [[1], [0]]\nW_V = [[1], [0]]\n', InvalidInputError, "case.toml: weights.W_Q asks for a 2000 × 1000 matrix of symbols"),
        ('[inputs]\nquery_source = [[1, 0]]\n[weights]\nW_Q = {symbol = "w"}\nW_K = [[1], [0]]\nW_V = [[1], [0]]\n', InvalidInputError, "case.toml: weights.W_Q is {'symbol': 'w'}; a symbol table needs symbol and shape"),
        ("[inputs]\nQ = [[1]]\nK = [[1]]\nV = [[1]]\n[weights]\nW_Q = [[1]]\n", InvalidInputError, "case.toml: weights.W_Q has no use in direct mode"),
        ("[inputs]\nQ = [[1]]\nK = [[1]]\nV = [[1]]\nquery_source = [[1]]\n", InvalidInputError, "case.toml: inputs.query_source cannot be combined with Q, K and V"),
        ("[inputs]\nQ = [[1]]\nK = [[1]]\n", InvalidInputError, "case.toml: inputs.V is missing"),
        ('[meta]\ntitle = "a → b"\n[inputs]\nQ = [[1]]\nK = [[1]]\nV = [[1]]\n', InvalidInputError, "case.toml: meta.title contains the character '→' (U+2192 RIGHTWARDS ARROW)"),
        ("[meta]\ntitle = 3\n[inputs]\nQ = [[1]]\nK = [[1]]\nV = [[1]]\n", InvalidInputError, "case.toml: meta.title is 3; expected a string"),
        ("spec = 3\n", InvalidInputError, "case.toml: spec is 3; expected a table"),
    ],
)
def test_load_errors_name_file_and_key(tmp_path, text, error_type, message):
    path = write_toml(tmp_path, text)
    with pytest.raises(error_type) as caught:
        load_derivation_file(path)
    assert str(caught.value).startswith(message)


def test_additive_mask_warning_names_key(tmp_path):
    path = write_toml(tmp_path, '[inputs]\nQ = [[1]]\nK = [[1], [0]]\nV = [[1], [2]]\n'
                                '[[spec.mask]]\nkind = "keep"\nvalues = [true, true]\n'
                                '[[spec.mask]]\nkind = "additive"\nvalues = [0, 1]\n')
    with pytest.warns(SymattnWarning) as caught:
        load_derivation_file(path)
    assert len(caught) == 1
    assert str(caught[0].message).startswith("spec.mask[1]: this additive mask holds only 0s and 1s")


def test_mask_shape_error_names_key(tmp_path):
    path = write_toml(tmp_path, '[inputs]\nQ = [[1]]\nK = [[1], [0], [2]]\nV = [[1], [2], [3]]\n'
                                '[[spec.mask]]\nkind = "keep"\nvalues = [true, true]\n')
    with pytest.raises(ShapeError) as caught:
        load_derivation_file(path)
    assert str(caught.value) == ("case.toml: spec.mask[0]: keep mask has shape (2,); expected (3,) for 1 head, "
                                 "1 query and 3 keys")


def test_load_invalid_toml_names_line(tmp_path):
    path = write_toml(tmp_path, "[inputs]\nQ = [[1, 2]]\nK = oops\n")
    with pytest.raises(InvalidInputError) as caught:
        load_derivation_file(path)
    assert str(caught.value).startswith("case.toml: invalid TOML:")
    assert "line 3" in str(caught.value)


def test_load_rejects_non_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[meta]\ntitle = "Caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(InvalidInputError) as caught:
        load_derivation_file(path)
    assert str(caught.value).startswith("latin1.toml: not UTF-8 text")


def test_load_rejects_oversized_file(tmp_path):
    path = tmp_path / "huge.toml"
    with path.open("wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(ResourceLimitError) as caught:
        load_derivation_file(path)
    assert str(caught.value).startswith(f"derivation file {str(path)!r} is 10,485,761 bytes")
    assert "above the limit of 10,485,760 bytes" in str(caught.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(InvalidInputError) as caught:
        load_derivation_file(tmp_path / "absent.toml")
    assert str(caught.value).startswith(f"derivation file {str(tmp_path / 'absent.toml')!r} does not exist")


def test_parse_derivation_names_source():
    with pytest.raises(InvalidInputError) as caught:
        parse_derivation({"inputs": {"Q": [[1]], "K": [[1]], "V": [["1/x"]]}}, "my data")
    assert str(caught.value).startswith("my data: inputs.V[0][0] '1/x' is neither a number nor a name")
