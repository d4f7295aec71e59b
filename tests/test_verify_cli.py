"""The `symattn verify` and `symattn reference` commands, run through the CLI's main()."""

import json
import re
import subprocess
import sys

import mpmath
import numpy as np
import pytest

from symattn.cli import main

# Scale 1/√d_model instead of 1/√d_k: d_model = 4, h = 2 (d_k = 2). Head 0 has q = [1, 1], keys
# [1, 1] and [1, −1] and values 1 and 0. Head 1 has zero inputs, so its output is 0.
SCALE_CASE = {
    "Q": np.array([[1.0, 1.0, 0.0, 0.0]]),
    "K": np.array([[1.0, 1.0, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0]]),
    "V": np.array([[1.0, 0.0], [0.0, 0.0]]),
}
with mpmath.workdps(40):
    RIGHT = float(mpmath.exp(mpmath.sqrt(2)) / (1 + mpmath.exp(mpmath.sqrt(2))))  # 0.8044296825069569…
    SQRT_D_MODEL = float(mpmath.e / (1 + mpmath.e))  # 0.7310585786300049…


def write_scale_case(path, output, **extra) -> None:
    np.savez(path, spec=json.dumps({"heads": 2, **extra.pop("spec", {})}), output=output, **SCALE_CASE, **extra)


def test_verify_right_output_exits_zero(tmp_path, capsys):
    path = tmp_path / "case.npz"
    write_scale_case(path, np.array([[RIGHT, 0.0]]))
    assert main(["verify", str(path), "--ulps", "0"]) == 0
    table = capsys.readouterr().out
    assert "verdict: PASS: every entry within 0 ULPs" in table
    assert "float64 implementation" in table


def test_verify_wrong_scale_exits_one_and_names_it(tmp_path, capsys):
    path = tmp_path / "case.npz"
    write_scale_case(path, np.array([[SQRT_D_MODEL, 0.0]]))
    assert main(["verify", str(path), "--ulps", "4"]) == 1
    table = capsys.readouterr().out
    assert "1/√d_model = 1/√4 instead of 1/√d_k = 1/√2" in table
    assert "verdict: FAIL: 1 of 2 output entries outside 4 ULPs" in table


def test_verify_json_report(tmp_path, capsys):
    path = tmp_path / "case.npz"
    write_scale_case(path, np.array([[SQRT_D_MODEL, 0.0]]))
    assert main(["verify", str(path), "--json", "--rtol", "1e-6", "--atol", "0"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False
    assert report["dtype"] == "float64"
    assert report["tolerance"] == {"ulps": None, "rtol": 1e-6, "atol": 0.0}
    assert report["stages"][0]["worst"]["location"] == "query 0, feature 0"
    assert report["stages"][0]["worst"]["reference"] == RIGHT
    assert [d["mistake"] for d in report["diagnoses"]] == ["scale_sqrt_d_model"]


def test_verify_float32_case_with_intermediates(tmp_path, capsys):
    path = tmp_path / "case.npz"
    weights = np.array([[[RIGHT, 1 - RIGHT]], [[0.5, 0.5]]], dtype=np.float32)
    heads = np.array([[[RIGHT]], [[0.0]]], dtype=np.float32)
    write_scale_case(path, np.array([[RIGHT, 0.0]], dtype=np.float32), attention_weights=weights, head_outputs=heads)
    assert main(["verify", str(path), "--ulps", "0"]) == 0
    table = capsys.readouterr().out
    assert "float32 implementation" in table
    assert "attention weights  (2, 1, 2)" in table
    assert "head outputs       (2, 1, 1)" in table


def test_verify_toml_case_with_nan_rows(tmp_path, capsys):
    # X = [[1,0],[0,1],[1,1]] as Q = K = V with key padding [F,T,T] and a block mask that hides
    # keys before the query: rows 1 and 2 see no key. The output has the NaN that PyTorch's
    # nn.MultiheadAttention gives there; the reference puts zeros.
    np.save(tmp_path / "output.npy", np.array([[1.0, 0.0], [np.nan, np.nan], [np.nan, np.nan]]))
    (tmp_path / "case.toml").write_text(
        """
[spec]
masked_rows = "zeros"
masks = [
  {kind = "block", values = [false, true, true]},
  {kind = "block", values = [[false, false, false], [true, false, false], [true, true, false]]},
]

[inputs]
Q = [[1, 0], [0, 1], [1, 1]]
K = [[1, 0], [0, 1], [1, 1]]
V = [[1, 0], [0, 1], [1, 1]]

[outputs]
output = "output.npy"
""",
        encoding="utf-8",
    )
    assert main(["verify", str(tmp_path / "case.toml"), "--ulps", "0"]) == 1
    table = capsys.readouterr().out
    assert "query rows 1, 2: the output is NaN in every output column (2 of 2)" in table
    header, row = (re.split(r"\s{2,}", line) for line in table.splitlines() if line.startswith(("stage", "output ")))
    assert row[header.index("NaN")] == "4"


def test_verify_nan_input_exits_two(tmp_path, capsys):
    path = tmp_path / "case.npz"
    case = dict(SCALE_CASE)
    case["K"] = case["K"].copy()
    case["K"][0, 1] = np.nan
    np.savez(path, spec=json.dumps({"heads": 2}), output=np.zeros((1, 2)), **case)
    assert main(["verify", str(path)]) == 2
    assert "K contains nan at position (0, 1)" in capsys.readouterr().err


def test_verify_corrupt_case_exits_two(tmp_path, capsys):
    path = tmp_path / "case.npz"
    write_scale_case(path, np.array([[RIGHT, 0.0]]))
    path.write_bytes(path.read_bytes()[:100])
    assert main(["verify", str(path)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_verify_case_without_output_exits_two(tmp_path, capsys):
    path = tmp_path / "case.npz"
    np.savez(path, spec=json.dumps({"heads": 2}), **SCALE_CASE)
    assert main(["verify", str(path)]) == 2
    assert "no 'output' array" in capsys.readouterr().err


def test_verify_negative_tolerance_exits_two(tmp_path, capsys):
    path = tmp_path / "case.npz"
    write_scale_case(path, np.array([[RIGHT, 0.0]]))
    assert main(["verify", str(path), "--ulps", "-1"]) == 2
    assert "ulps is -1.0" in capsys.readouterr().err


def test_verify_entry_point_runs(tmp_path):
    path = tmp_path / "case.npz"
    write_scale_case(path, np.array([[SQRT_D_MODEL, 0.0]]))
    result = subprocess.run([sys.executable, "-m", "symattn", "verify", str(path), "--ulps", "4"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "verdict: FAIL" in result.stdout
    assert "verified" in result.stderr


def write_other_widths_case(tmp_path):
    # Cross attention with key and value inputs of other widths: d_model = 2, h = 1, keys of
    # width 3 (the projection keeps the first two features), values of width 1 mapped to [x, 0].
    # The output is [2(2 + c)/(1 + c), 0] with c = e^{1/√2}.
    path = tmp_path / "case.npz"
    np.savez(path, spec=json.dumps({"heads": 1}), query_source=np.array([[1.0, 0.0]]),
             key_source=np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), value_source=np.array([[2.0], [4.0]]),
             W_Q=np.eye(2), W_K=np.eye(3, 2), W_V=np.array([[1.0, 0.0]]))
    return path


def test_reference_npy_float32(tmp_path, capsys):
    case = write_other_widths_case(tmp_path)
    out = tmp_path / "out.npy"
    assert main(["reference", str(case), "--digits", "30", "--dtype", "float32", "--out", str(out)]) == 0
    values = np.load(out)
    with mpmath.workdps(40):
        c = mpmath.exp(1 / mpmath.sqrt(2))
        expected = np.float32(float(2 * (2 + c) / (1 + c)))  # 2.6604769… is no float32 tie
    assert values.dtype == np.float32
    assert values.tolist() == [[expected, 0.0]]
    assert f"wrote {out}" in capsys.readouterr().err


def test_reference_json_decimals(tmp_path):
    case = write_other_widths_case(tmp_path)
    out = tmp_path / "reference.json"
    assert main(["reference", str(case), "--digits", "20", "--out", str(out)]) == 0
    document = json.loads(out.read_text(encoding="utf-8"))
    assert document["stages"]["output"]["decimal"] == [["2.6604769013466861488", "0"]]
    assert document["digits"] == 20


def test_reference_npz_then_existing_file_needs_force(tmp_path, capsys):
    case = write_other_widths_case(tmp_path)
    out = tmp_path / "reference.npz"
    assert main(["reference", str(case), "--digits", "20", "--out", str(out)]) == 0
    with np.load(out) as archive:
        assert archive["output.float64"].tolist() == [[2.6604769013466862, 0.0]]
    assert main(["reference", str(case), "--digits", "30", "--out", str(out)]) == 3
    assert "--force" in capsys.readouterr().err
    assert main(["reference", str(case), "--digits", "30", "--out", str(out), "--force"]) == 0


def test_reference_unknown_stage_exits_two(tmp_path, capsys):
    case = write_other_widths_case(tmp_path)
    assert main(["reference", str(case), "--stage", "A_7", "--out", str(tmp_path / "a.npy")]) == 2
    assert "stages are Q, K, V" in capsys.readouterr().err


def test_reference_unknown_suffix_exits_two(tmp_path, capsys):
    case = write_other_widths_case(tmp_path)
    assert main(["reference", str(case), "--out", str(tmp_path / "reference.csv")]) == 2
    assert ".csv" in capsys.readouterr().err
