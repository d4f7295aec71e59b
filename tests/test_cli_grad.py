"""``symattn grad``: printed gradient, written files, options and errors."""

import json

import mpmath
import pytest

from symattn.cli import main

E1_TOML = """
[spec]
heads = 1

[inputs]
Q = [[1, 0], [0, 1]]
K = [[1, 0], [0, 1], [1, 1]]
V = [[1, 2], [3, 4], [5, 6]]
"""

PROJECTED_TOML = """
[meta]
title = "Two tokens, two heads"

[spec]
heads = 2

[inputs]
query_source = [[1, 0], [0, 1]]
kv_source = [[1, 1], [0, 2]]

[weights]
W_Q = [[1, 0], [0, 1]]
W_K = [[1, 0], [0, 1]]
W_V = [[1, 2], [0, 1]]
b_K = [1, -1]
"""

# Causal self attention over one source x: the gradient with respect to x sums three roles.
SELF_TOML = """
[spec]
heads = 1
causal = "top_left"

[inputs]
query_source = [[1, 0], [0, 1]]

[weights]
W_Q = [[1, 0], [0, 1]]
W_K = [[1, 0], [0, 1]]
W_V = [[1, 2], [0, 1]]
"""

SEPARATE_TOML = """
[inputs]
query_source = [[1, 0], [0, 1]]
key_source = [[1, 1], [0, 2]]
value_source = [[1, 1], [0, 2]]

[weights]
W_Q = [[1, 0], [0, 1]]
W_K = [[1, 0], [0, 1]]
W_V = [[1, 2], [0, 1]]
"""


@pytest.fixture
def e1_file(tmp_path):
    path = tmp_path / "e1.toml"
    path.write_text(E1_TOML)
    return path


def c_value():
    return mpmath.exp(1 / mpmath.sqrt(2))


def test_cli_grad_writes_json_and_tex(e1_file, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["grad", str(e1_file), "--wrt", "V", "--of", "output[1,0]", "--out", str(out), "--no-pdf"])
    assert status == 0
    assert (out / "e1-grad-V.tex").exists()
    assert not (out / "e1-grad-V.pdf").exists()
    record = json.loads((out / "e1-grad-V.json").read_text())
    assert record["wrt"] == "V"
    assert record["objective"]["text"] == "output[1,0]"
    assert record["shape"] == [3, 2]
    assert record["precision"]["certified"] is True
    # ∂y[1,0]/∂V[j,0] is the weight of key j for query 1: (1, c, c) / (1 + 2c).
    with mpmath.workdps(60):
        c = c_value()
        assert record["decimal"][0][0] == mpmath.nstr(1 / (1 + 2 * c), 50, strip_zeros=False)
        assert record["decimal"][1][0] == mpmath.nstr(c / (1 + 2 * c), 50, strip_zeros=False)
    assert [row[1] for row in record["exact"]] == ["0", "0", "0"]
    printed = capsys.readouterr().out
    assert "gradient of output[1,0] with respect to V, shape (3, 2):" in printed
    assert "wrote " in printed


def test_cli_grad_prints_short_entries_exactly(e1_file, tmp_path, capsys):
    status = main(["grad", str(e1_file), "--wrt", "Q", "--of", "sum", "--out", str(tmp_path), "--no-pdf"])
    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines.index("gradient of sum with respect to Q, shape (2, 2):")
    # Entry (0, 0) cancels to exactly 0; entry (0, 1) is s · 4c / (1 + 2c) ≈ 1.13451632300.
    assert lines[header + 1].startswith("  [≈0, ≈1.13451632300")  # a bounded zero, not proven


def test_cli_grad_digits_option(e1_file, tmp_path):
    main(["grad", str(e1_file), "--wrt", "K", "--digits", "20", "--out", str(tmp_path), "--no-pdf"])
    record = json.loads((tmp_path / "e1-grad-K.json").read_text())
    assert record["precision"]["significant_digits"] == 20
    assert all(len(text.lstrip("-0.").replace(".", "")) <= 20 for row in record["decimal"] for text in row)


def test_cli_grad_projections_key_bias_is_zero(tmp_path):
    path = tmp_path / "projected.toml"
    path.write_text(PROJECTED_TOML)
    status = main(["grad", str(path), "--wrt", "b_K", "--out", str(tmp_path), "--no-pdf"])
    assert status == 0
    record = json.loads((tmp_path / "projected-grad-b_K.json").read_text())
    assert record["exact"] == [["0", "0"]]


def test_cli_grad_refuses_overwrite_without_force(e1_file, tmp_path, capsys):
    args = ["grad", str(e1_file), "--wrt", "Q", "--out", str(tmp_path), "--no-pdf"]
    assert main(args) == 0
    (tmp_path / "e1-grad-Q.json").write_text("other content")
    assert main(args) == 3
    assert "already exists with other content" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
    assert json.loads((tmp_path / "e1-grad-Q.json").read_text())["wrt"] == "Q"


def test_cli_grad_rejects_unknown_wrt(e1_file, tmp_path, capsys):
    assert main(["grad", str(e1_file), "--wrt", "W_Q", "--out", str(tmp_path)]) == 2
    assert "--wrt 'W_Q' is not an input of e1.toml; its inputs are Q, K, V" in capsys.readouterr().err


def test_cli_grad_rejects_stage_objective(e1_file, tmp_path, capsys):
    assert main(["grad", str(e1_file), "--wrt", "Q", "--of", "A_0[0,0]", "--out", str(tmp_path)]) == 2
    assert "takes 'sum' or an output entry" in capsys.readouterr().err


def test_cli_grad_rejects_bad_entry(e1_file, tmp_path, capsys):
    assert main(["grad", str(e1_file), "--wrt", "Q", "--entry", "1", "--out", str(tmp_path)]) == 2
    assert "--entry '1' is not valid" in capsys.readouterr().err


def test_cli_grad_rejects_entry_outside(e1_file, tmp_path, capsys):
    assert main(["grad", str(e1_file), "--wrt", "Q", "--entry", "2,0", "--out", str(tmp_path)]) == 2
    assert "--entry '2,0' is outside Q, which has shape (2, 2)" in capsys.readouterr().err
    assert list(tmp_path.glob("e1-grad-*")) == []


def test_cli_grad_missing_file(tmp_path, capsys):
    assert main(["grad", str(tmp_path / "missing.toml"), "--wrt", "Q"]) == 2
    assert "missing.toml" in capsys.readouterr().err


@pytest.mark.requires_pdflatex
def test_cli_grad_builds_pdf(e1_file, tmp_path):
    assert main(["grad", str(e1_file), "--wrt", "K", "--entry", "2,1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "e1-grad-K.pdf").read_bytes().startswith(b"%PDF")


def write_toml(tmp_path, name, text):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def self_attention_sum_gradient():
    """Return ∂(sum of output)/∂x of the causal self attention in SELF_TOML, in plain mpmath.

    With x = I, W_Q = W_K = I and W_V = [[1, 2], [0, 1]]: query 0 attends to key 0 only, so row 0 of
    the output is x_0 W_V. Query 1 attends to keys 0 and 1 with logits s (x_1 · x_0, x_1 · x_1), s = 1/√2.
    """
    def output_sum(x):
        v = [[row[0], 2 * row[0] + row[1]] for row in x]
        z = [(x[1][0] * x[0][0] + x[1][1] * x[0][1]) / mpmath.sqrt(2),
             (x[1][0] ** 2 + x[1][1] ** 2) / mpmath.sqrt(2)]
        e = [mpmath.exp(t) for t in z]
        a = [t / (e[0] + e[1]) for t in e]
        return sum(v[0]) + a[0] * sum(v[0]) + a[1] * sum(v[1])

    step = mpmath.mpf("1e-25")
    x = [[mpmath.mpf(1), mpmath.mpf(0)], [mpmath.mpf(0), mpmath.mpf(1)]]
    gradient = []
    for i in range(2):
        row = []
        for j in range(2):
            plus = [list(r) for r in x]
            minus = [list(r) for r in x]
            plus[i][j] += step
            minus[i][j] -= step
            row.append((output_sum(plus) - output_sum(minus)) / (2 * step))
        gradient.append(row)
    return gradient


@pytest.mark.parametrize("wrt", ["source", "query_source"])
def test_cli_grad_self_attention_total(tmp_path, capsys, wrt):
    path = write_toml(tmp_path, "self", SELF_TOML)
    assert main(["grad", str(path), "--wrt", wrt, "--out", str(tmp_path), "--no-pdf"]) == 0
    printed = capsys.readouterr().out
    assert "covers the query, key and value roles (self attention: one source in all three roles)" in printed
    assert "no worked example was written" in printed
    assert "--wrt query_role or --wrt key_role or --wrt value_role" in printed
    assert not (tmp_path / f"self-grad-{wrt}.tex").exists()
    record = json.loads((tmp_path / f"self-grad-{wrt}.json").read_text())
    assert record["wrt"] == wrt
    # 80 working digits: the quotient's rounding error is about 10^-80 / 10^-25, its truncation
    # error about step², both far below the 1e-40 bound.
    with mpmath.workdps(80):
        expected = self_attention_sum_gradient()
        for i in range(2):
            for j in range(2):
                assert abs(mpmath.mpf(record["decimal"][i][j]) - expected[i][j]) < mpmath.mpf("1e-40"), (i, j)


def test_cli_grad_self_attention_kv_source(tmp_path, capsys):
    path = write_toml(tmp_path, "self", SELF_TOML)
    assert main(["grad", str(path), "--wrt", "kv_source", "--out", str(tmp_path), "--no-pdf"]) == 0
    assert "covers the key and value roles (of the self-attention source, without its query role)" in capsys.readouterr().out


def test_cli_grad_self_attention_one_role_has_example(tmp_path, capsys):
    path = write_toml(tmp_path, "self", SELF_TOML)
    assert main(["grad", str(path), "--wrt", "query_role", "--out", str(tmp_path), "--no-pdf"]) == 0
    printed = capsys.readouterr().out
    assert "covers the query role (one of the 3 roles of a shared source; the others are not included)" in printed
    assert (tmp_path / "self-grad-query_role.tex").exists()
    assert json.loads((tmp_path / "self-grad-query_role.json").read_text())["wrt"] == "query_role"


def test_cli_grad_roles_sum_to_total(tmp_path):
    path = write_toml(tmp_path, "self", SELF_TOML)
    decimals = {}
    for wrt in ("source", "query_role", "key_role", "value_role"):
        assert main(["grad", str(path), "--wrt", wrt, "--out", str(tmp_path), "--no-pdf"]) == 0
        decimals[wrt] = json.loads((tmp_path / f"self-grad-{wrt}.json").read_text())["decimal"]
    with mpmath.workdps(60):
        for i in range(2):
            for j in range(2):
                parts = mpmath.fsum(mpmath.mpf(decimals[role][i][j]) for role in ("query_role", "key_role", "value_role"))
                assert abs(parts - mpmath.mpf(decimals["source"][i][j])) < mpmath.mpf("1e-45"), (i, j)


def test_cli_grad_kv_source_cross_attention(tmp_path, capsys):
    path = write_toml(tmp_path, "projected", PROJECTED_TOML)
    assert main(["grad", str(path), "--wrt", "kv_source", "--out", str(tmp_path), "--no-pdf"]) == 0
    assert "covers the key and value roles (one kv_source in both roles)" in capsys.readouterr().out
    assert (tmp_path / "projected-grad-kv_source.json").exists()
    assert not (tmp_path / "projected-grad-kv_source.tex").exists()


def test_cli_grad_source_rejected_in_cross_attention(tmp_path, capsys):
    path = write_toml(tmp_path, "projected", PROJECTED_TOML)
    assert main(["grad", str(path), "--wrt", "source", "--out", str(tmp_path), "--no-pdf"]) == 2
    assert "this derivation was given kv_source, so the query source is a matrix of its own" in capsys.readouterr().err
    assert list(tmp_path.glob("projected-grad-*")) == []


@pytest.mark.parametrize("wrt", ["source", "kv_source"])
def test_cli_grad_tied_names_rejected_when_separate(tmp_path, capsys, wrt):
    path = write_toml(tmp_path, "separate", SEPARATE_TOML)
    assert main(["grad", str(path), "--wrt", wrt, "--out", str(tmp_path), "--no-pdf"]) == 2
    assert "given key_source and value_source as separate matrices" in capsys.readouterr().err
    assert list(tmp_path.glob("separate-grad-*")) == []


def test_cli_grad_separate_source_is_one_role(tmp_path, capsys):
    path = write_toml(tmp_path, "separate", SEPARATE_TOML)
    assert main(["grad", str(path), "--wrt", "key_source", "--out", str(tmp_path), "--no-pdf"]) == 0
    assert "covers the key role (a source of its own)" in capsys.readouterr().out
    assert (tmp_path / "separate-grad-key_source.tex").exists()
