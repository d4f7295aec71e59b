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
    assert lines[header + 1].startswith("  [0, ≈1.13451632300")


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
