"""Hostile strings as entries, names, options, file keys and values: rejected, and nothing runs.

Each test runs under a spy that fails the test if ``eval``, ``exec``, ``sympify`` of a string
or SymPy's ``parse_expr`` is called, and checks afterwards that the marker file that the first
payload would create does not exist.
"""

import builtins
import importlib
import json

import mpmath
import pytest
import sympy as sp
import sympy.parsing.sympy_parser

from symattn import InvalidInputError, Mask, derive_direct, matrix_to_decimals, symbol_matrix, to_matrix
from symattn.cli import build_parser, main
from symattn.export.json_reader import parse_derivation_json, rederive
from symattn.export.numbers import derivation_to_json
from symattn.loaders import load_derivation_file
from symattn.spec import AttentionSpec
from symattn.values import make_symbol, parse_entry, parse_name, parse_number

MARKER = "PWNED"
# Import every command module now: an import under the spy would run dataclass code through exec.
build_parser()
# The module, not the function of the same name that `sympy.core` exports.
SYMPIFY_MODULE = importlib.import_module("sympy.core.sympify")

PAYLOADS = [
    f"__import__('os').system('touch {MARKER}')",
    "().__class__.__bases__[0]",
    "().__class__.__base__.__subclasses__()",
    "x.__globals__",
    "lambda: 0",
    "exec('1')",
    "eval('1+1')",
    "\\input{/etc/passwd}",
    "\\write18{touch PWNED}",
    "${HOME}",
    "$(touch PWNED)",
    "`touch PWNED`",
    "w\u0445",  # w and a Cyrillic x
    "\uff57",  # fullwidth w
    "w\u200b",  # w and a zero-width space
    "\U0001d464",  # mathematical italic w
    "\uff11/\uff12",  # fullwidth 1/2
    "\u0663",  # Arabic-Indic digit three
    "1e999999999",
    "9" * 5000,
    "1/" + "7" * 3000,
    "nan",
    "inf",
    "-Infinity",
    "",
    "w\nx",
    "w_",
    "b__1",
]
# "nan" and "inf" are valid names, although as matrix entries they are rejected as non-finite.
NAME_PAYLOADS = [payload for payload in PAYLOADS if payload not in ("nan", "inf")]
# masked_rows = "nan" is a valid policy and "-Infinity" a valid additive mask entry.
OPTION_PAYLOADS = [payload for payload in PAYLOADS if payload not in ("nan", "-Infinity")]


def short_id(payload):
    return ascii(payload)[:32]


@pytest.fixture
def no_evaluation(monkeypatch, tmp_path):
    """Fail on eval, exec or sympify of a string, on parse_expr, and on the marker file."""
    calls = []

    def refuse(name):
        def spy(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called while reading untrusted input")

        return spy

    def refuse_source(name, real):
        # Imports run module code through exec as code objects; only source text is refused.
        def spy(source, *args, **kwargs):
            if isinstance(source, (str, bytes)):
                calls.append(name)
                raise AssertionError(f"{name} was called on the source {source!r}")
            return real(source, *args, **kwargs)

        return spy

    real_sympify = SYMPIFY_MODULE.sympify

    def sympify_spy(value, *args, **kwargs):
        # A strict sympify never parses a string, so only the non-strict form is refused.
        if isinstance(value, (str, bytes)) and not kwargs.get("strict", False):
            calls.append("sympify")
            raise AssertionError(f"sympify was called on the string {value!r}")
        return real_sympify(value, *args, **kwargs)

    monkeypatch.setattr(builtins, "eval", refuse_source("eval", builtins.eval))
    monkeypatch.setattr(builtins, "exec", refuse_source("exec", builtins.exec))
    monkeypatch.setattr(sympy, "sympify", sympify_spy)
    monkeypatch.setattr(SYMPIFY_MODULE, "sympify", sympify_spy)
    monkeypatch.setattr(sympy.parsing.sympy_parser, "parse_expr", refuse("parse_expr"))
    monkeypatch.setattr(sympy.parsing.sympy_parser, "eval_expr", refuse("eval_expr"))
    monkeypatch.chdir(tmp_path)
    yield calls
    assert not (tmp_path / MARKER).exists()
    assert calls == []


def toml_string(text):
    """Quote text as a TOML basic string; JSON's escapes of quotes, backslashes and controls are valid TOML."""
    return json.dumps(text, ensure_ascii=False)


def write_toml(tmp_path, text):
    path = tmp_path / "hostile.toml"
    path.write_text(text, encoding="utf-8")
    return path


VALID_DIRECT_TOML = """
[spec]
scale = "none"

[inputs]
Q = [[1, 0]]
K = [[1, 0], [0, 1]]
V = [[1], [2]]
"""


# The spy itself.

def test_spy_catches_sympify_of_string(no_evaluation):
    with pytest.raises(AssertionError, match="sympify was called"):
        sp.sympify("1 + 1")
    no_evaluation.clear()


def test_spy_catches_eval(no_evaluation):
    with pytest.raises(AssertionError, match="eval was called"):
        eval("1")
    no_evaluation.clear()


# Values and names through the Python API.

@pytest.mark.parametrize("payload", PAYLOADS, ids=short_id)
def test_matrix_entry_payload_rejected(no_evaluation, payload):
    with pytest.raises(InvalidInputError):
        to_matrix([[payload, 1]], "W_Q")
    with pytest.raises(InvalidInputError):
        parse_entry(payload)
    with pytest.raises(InvalidInputError):
        derive_direct([[payload]], [[1]], [[1]])


@pytest.mark.parametrize("payload", PAYLOADS, ids=short_id)
def test_number_payload_rejected(no_evaluation, payload):
    with pytest.raises(InvalidInputError):
        parse_number(payload)


@pytest.mark.parametrize("payload", NAME_PAYLOADS, ids=short_id)
def test_symbol_name_payload_rejected(no_evaluation, payload):
    with pytest.raises(InvalidInputError):
        parse_name(payload)
    with pytest.raises(InvalidInputError):
        make_symbol(payload)
    with pytest.raises(InvalidInputError):
        symbol_matrix(payload, 2, 2)
    with pytest.raises(InvalidInputError):
        to_matrix({"symbol": payload, "shape": [2, 2]}, "query_source")


@pytest.mark.parametrize("payload", OPTION_PAYLOADS, ids=short_id)
def test_option_payload_rejected(no_evaluation, payload):
    with pytest.raises(InvalidInputError):
        AttentionSpec(scale=payload)
    with pytest.raises(InvalidInputError):
        AttentionSpec(scale=f"1/sqrt({payload})")
    with pytest.raises(InvalidInputError):
        AttentionSpec(masked_rows=payload)
    with pytest.raises(InvalidInputError):
        AttentionSpec(causal=payload)
    with pytest.raises(InvalidInputError):
        AttentionSpec(heads=payload)
    with pytest.raises(InvalidInputError):
        Mask.create(payload, [[True]])
    with pytest.raises(InvalidInputError):
        Mask.additive([[payload]])


@pytest.mark.parametrize("payload", PAYLOADS[:8], ids=short_id)
def test_subs_key_payload_rejected(no_evaluation, payload):
    derivation = derive_direct([["w", 0]], [[1, 0], [0, 1]], [[1], [2]])
    with pytest.raises(InvalidInputError, match="is not a symbol of this derivation; its symbols are w"):
        derivation.subs({payload: 2})


def test_subs_by_name_substitutes():
    # SymPy's own subs turns the key "w" into a symbol without real=True, which matched
    # nothing and left the derivation unchanged.
    derivation = derive_direct([["w", 0]], [[1, 0], [0, 1]], [[1], [2]])
    expected = derive_direct([[2, 0]], [[1, 0], [0, 1]], [[1], [2]]).output
    assert derivation.subs({"w": 2}).output == expected
    assert derivation.subs({sp.Symbol("w"): 2}).output == expected


# TOML derivation files.

@pytest.mark.parametrize("payload", PAYLOADS, ids=short_id)
def test_toml_entry_payload_rejected(no_evaluation, tmp_path, payload):
    path = write_toml(tmp_path, VALID_DIRECT_TOML.replace("Q = [[1, 0]]", f"Q = [[{toml_string(payload)}, 0]]"))
    with pytest.raises(InvalidInputError, match="inputs.Q"):
        load_derivation_file(path)


@pytest.mark.parametrize("payload", PAYLOADS, ids=short_id)
def test_toml_key_payload_rejected(no_evaluation, tmp_path, payload):
    path = write_toml(tmp_path, VALID_DIRECT_TOML + f"{toml_string(payload)} = [[1]]\n")
    with pytest.raises(InvalidInputError, match="is not a valid key"):
        load_derivation_file(path)


@pytest.mark.parametrize("option", ["scale", "masked_rows", "causal", "heads", "key_length"])
@pytest.mark.parametrize("payload", OPTION_PAYLOADS, ids=short_id)
def test_toml_option_payload_rejected(no_evaluation, tmp_path, option, payload):
    text = VALID_DIRECT_TOML.replace('scale = "none"', f"{option} = {toml_string(payload)}")
    with pytest.raises(InvalidInputError, match=f"spec.{option}"):
        load_derivation_file(write_toml(tmp_path, text))


@pytest.mark.parametrize("payload", OPTION_PAYLOADS, ids=short_id)
def test_toml_mask_payload_rejected(no_evaluation, tmp_path, payload):
    kind = VALID_DIRECT_TOML + f'[[spec.mask]]\nkind = {toml_string(payload)}\nvalues = [true, true]\n'
    with pytest.raises(InvalidInputError, match=r"spec.mask\[0\]"):
        load_derivation_file(write_toml(tmp_path, kind))
    value = VALID_DIRECT_TOML + f'[[spec.mask]]\nkind = "additive"\nvalues = [{toml_string(payload)}, 0]\n'
    with pytest.raises(InvalidInputError, match=r"spec.mask\[0\]"):
        load_derivation_file(write_toml(tmp_path, value))


@pytest.mark.parametrize("payload", NAME_PAYLOADS, ids=short_id)
def test_toml_symbol_table_payload_rejected(no_evaluation, tmp_path, payload):
    text = VALID_DIRECT_TOML.replace("Q = [[1, 0]]", f"Q = {{symbol = {toml_string(payload)}, shape = [1, 2]}}")
    with pytest.raises(InvalidInputError, match="inputs.Q"):
        load_derivation_file(write_toml(tmp_path, text))


@pytest.mark.parametrize(
    "entry", ["1e999999999", "-1e999999999", "1e-999999999", "1" + "0" * 5000 + ".5"]
)
def test_toml_huge_decimal_rejected(no_evaluation, tmp_path, entry):
    # TOML decimals arrive as exact Decimals; these would expand to billions of digits.
    path = write_toml(tmp_path, VALID_DIRECT_TOML.replace("Q = [[1, 0]]", f"Q = [[{entry}, 0]]"))
    with pytest.raises(InvalidInputError, match="inputs.Q"):
        load_derivation_file(path)
    scaled = write_toml(tmp_path, VALID_DIRECT_TOML.replace('scale = "none"', f"scale = {entry}"))
    with pytest.raises(InvalidInputError, match="spec.scale"):
        load_derivation_file(scaled)


def test_toml_valid_file_still_derives(no_evaluation, tmp_path):
    derivation, _ = load_derivation_file(write_toml(tmp_path, VALID_DIRECT_TOML))
    # Weights e/(e + 1) and 1/(e + 1) on the values 1 and 2.
    with mpmath.workdps(40):
        expected = mpmath.nstr((mpmath.e + 2) / (mpmath.e + 1), 25, strip_zeros=False)
    assert matrix_to_decimals(derivation.output, 25) == [[expected]]


# Derivation JSON documents.

def valid_document():
    derivation = derive_direct([["1/2", "w"]], [[1, 0], [0, 1]], [[1], [2]], mask=Mask.additive([["1/4", "-inf"]]))
    return json.loads(derivation_to_json(derivation, 8))


def set_path(document, path, value):
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return document


JSON_PLACES = {
    "input entry": ("inputs", "Q", "exact", 0, 0),
    "stage entry": ("stages", "A_0", "exact", 0, 0),
    "scale": ("spec", "scale"),
    "masked_rows": ("spec", "masked_rows"),
    "causal": ("spec", "causal"),
    "heads": ("spec", "heads"),
    "mask kind": ("spec", "masks", 0, "kind"),
    "mask value": ("spec", "masks", 0, "values", 0),
    "symbol name": ("symbols", 0),
    "format": ("format",),
    "mode": ("mode",),
    "decimal entry": ("stages", "output", "decimal", 0, 0),
    "digits": ("precision", "significant_digits"),
}


def test_json_valid_document_reads(no_evaluation):
    record = parse_derivation_json(json.dumps(valid_document()))
    assert record.inputs["Q"] == sp.Matrix([[sp.Rational(1, 2), sp.Symbol("w", real=True)]])
    assert record.stages["Z_0"] is None  # contains w
    assert record.stages["A_0"] == sp.Matrix([[1, 0]])  # the -inf mask hides key 1


# masked_rows = "nan" is a valid policy.
JSON_CASES = [
    pytest.param(place, payload, id=f"{place}-{short_id(payload)}")
    for place in JSON_PLACES
    for payload in PAYLOADS
    if (place, payload) != ("masked_rows", "nan")
]


@pytest.mark.parametrize("place, payload", JSON_CASES)
def test_json_value_payload_rejected(no_evaluation, place, payload):
    # A stage entry is kept as checked text, so the check against the inputs rejects it.
    document = set_path(valid_document(), JSON_PLACES[place], payload)
    with pytest.raises(InvalidInputError):
        rederive(parse_derivation_json(json.dumps(document)))


@pytest.mark.parametrize("payload", PAYLOADS[:12], ids=short_id)
def test_json_key_payload_rejected(no_evaluation, payload):
    document = valid_document()
    document["inputs"][payload] = document["inputs"]["Q"]
    with pytest.raises(InvalidInputError, match="is not a valid key"):
        parse_derivation_json(json.dumps(document))


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_constants_rejected(no_evaluation, constant):
    text = json.dumps(valid_document()).replace('"significant_digits": 8', f'"significant_digits": {constant}')
    with pytest.raises(InvalidInputError, match=f"JSON constant {constant}"):
        parse_derivation_json(text)


# Command-line arguments.

CLI_PLACES = {
    "digits": ["example", "--no-pdf", "--digits", "{payload}"],
    "derive digits": ["derive", "--no-pdf", "--digits", "{payload}", "case.toml"],
    "grad wrt": ["grad", "--no-pdf", "--wrt", "{payload}", "case.toml"],
    "grad objective": ["grad", "--no-pdf", "--wrt", "Q", "--of", "{payload}", "case.toml"],
    "grad entry": ["grad", "--no-pdf", "--wrt", "Q", "--entry", "{payload}", "case.toml"],
    "verify engine": ["verify", "--engine", "{payload}", "case.toml"],
    "verify ulps": ["verify", "--ulps", "{payload}", "case.toml"],
    "verify digits": ["verify", "--digits", "{payload}", "case.toml"],
}
# Payloads that argparse reads as valid floats are left out of the float options.
CLI_CASES = [
    pytest.param(place, payload, id=f"{place}-{short_id(payload)}")
    for place in CLI_PLACES
    for payload in PAYLOADS
    if not (place == "verify ulps" and payload in ("1e999999999", "nan", "inf", "-Infinity"))
    and not (place == "verify ulps" and payload.isdigit())
]


@pytest.mark.parametrize("place, payload", CLI_CASES)
def test_cli_argument_payload_rejected(no_evaluation, tmp_path, capsys, place, payload):
    (tmp_path / "case.toml").write_text(VALID_DIRECT_TOML)
    args = [payload if arg == "{payload}" else arg for arg in CLI_PLACES[place]]
    try:
        status = main(args)
    except SystemExit as exit:
        status = exit.code
    error = capsys.readouterr().err
    assert status == 2
    assert "Traceback" not in error
