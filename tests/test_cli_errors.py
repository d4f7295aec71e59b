"""Command-line errors: exit statuses, messages that name the value, and no traceback without --debug.

Exit statuses: 0 success, 1 a verification outside tolerance, 2 a usage error or invalid
input, 3 any other error.
"""

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest

from symattn.cli import main

EXAMPLE_TOML = """
[spec]
heads = 1
scale = "none"

[inputs]
Q = [[1, 0]]
K = [[1, 0], [0, 1]]
V = [[1], [2]]
"""

# A large fully symbolic case: its stages would hold far more nodes than the default limit.
LARGE_TOML = """
[inputs]
query_source = { symbol = "x", shape = [12, 12] }
kv_source = { symbol = "y", shape = [12, 12] }

[weights]
W_Q = { symbol = "a", shape = [12, 12] }
W_K = { symbol = "b", shape = [12, 12] }
W_V = { symbol = "c", shape = [12, 12] }
"""

# Q, K and V of a one-head cross attention whose output is known: row 0 is [3, 4] exactly and
# row 1 is [(1 + 8c)/(1 + 2c), (2 + 10c)/(1 + 2c)] with c = e^{1/√2}.
E1 = {
    "Q": np.array([[1.0, 0.0], [0.0, 1.0]]),
    "K": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
    "V": np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
}
E1_OUTPUT = np.array([[3.0, 4.0], [3.4066725560787154619, 4.4066725560787154619]])


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Write a derivation file, a passing and a failing verification case; run in tmp_path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.toml").write_text(EXAMPLE_TOML)
    (tmp_path / "large.toml").write_text(LARGE_TOML)
    (tmp_path / "broken.toml").write_text("[inputs\nQ = [[1]]\n")
    (tmp_path / "notes.txt").write_text("not a case\n")
    np.savez(tmp_path / "pass.npz", spec=json.dumps({"heads": 1}), output=E1_OUTPUT, **E1)
    wrong = E1_OUTPUT.copy()
    wrong[1, 0] += 1e-3
    np.savez(tmp_path / "fail.npz", spec=json.dumps({"heads": 1}), output=wrong, **E1)
    return tmp_path


def run_cli(args, capsys):
    """Run the command line in this process and return (status, stdout, stderr)."""
    try:
        status = main(args)
    except SystemExit as exit:  # argparse exits by itself on usage errors
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# (arguments, expected status, fragments the error message must contain)
ERROR_CASES = [
    ([], 2, ["the following arguments are required: COMMAND"]),
    (["bogus"], 2, ["invalid choice: 'bogus'"]),
    (["example", "--bogus"], 2, ["unrecognized arguments: --bogus"]),
    (["example", "--digits", "abc"], 2, ["--digits: invalid int value: 'abc'"]),
    (["example", "--digits", "0", "--no-pdf"], 2, ["digits is 0", "expected an integer from 1 to 10000"]),
    (["example", "--digits", "10001", "--no-pdf"], 2, ["digits is 10001", "from 1 to 10000"]),
    (["example", "--digits", "-3", "--no-pdf"], 2, ["digits is -3"]),
    # int() and float() read look-alike digits; the options take ASCII only.
    (["example", "--digits", "\u0663", "--no-pdf"], 2, ["--digits: invalid int value: '\u0663'"]),
    (["example", "--digits", "\uff15", "--no-pdf"], 2, ["--digits: invalid int value: '\uff15'"]),
    (["derive", "missing.toml"], 2, ["'missing.toml' does not exist", "check the path"]),
    (["verify", "--ulp", "4", "pass.npz"], 2, ["unrecognized arguments: --ulp"]),
    (["derive", "good.toml", "--debug"], 2, ["unrecognized arguments: --debug", "--debug goes before the command"]),
    (["reference", "--digits", "0", "--out", "r.npy", "pass.npz"], 2, ["--digits is 0; expected an integer from 1 to 10000"]),
    (["derive", "."], 2, ["derivation file '.' is a folder; give the path of a file in it"]),
    (["derive", "broken.toml"], 2, ["broken.toml", "invalid TOML"]),
    (["derive", "--digits", "0", "good.toml"], 2, ["digits is 0"]),
    (["derive", "--no-pdf", "large.toml"], 2, ["large.toml", "max_expression_size", "compute_reference", "smaller case"]),
    (["verify", "missing.npz"], 2, ["'missing.npz' does not exist"]),
    (["verify", "notes.txt"], 2, ["suffix '.txt'", "expected .npz or .toml"]),
    (["verify", "--engine", "bogus", "pass.npz"], 2, ["--engine: invalid choice: 'bogus'"]),
    (["verify", "--digits", "0", "pass.npz"], 2, ["digits is 0"]),
    (["verify", "--digits", "10001", "pass.npz"], 2, ["digits is 10001"]),
    (["verify", "--ulps", "-1", "pass.npz"], 2, ["ulps is -1.0", "finite number ≥ 0"]),
    (["verify", "--rtol", "nan", "pass.npz"], 2, ["rtol is nan"]),
    (["verify", "--atol", "1e999", "pass.npz"], 2, ["atol is inf"]),
    (["verify", "--ulps", "\u0661", "pass.npz"], 2, ["--ulps: invalid float value: '\u0661'"]),
    (["reference", "pass.npz"], 2, ["the following arguments are required: --out"]),
    (["reference", "--out", "r.npz", "missing.npz"], 2, ["'missing.npz' does not exist"]),
    (["reference", "--out", "r", "pass.npz"], 2, ["output file 'r' has suffix ''", ".npz, .npy, .json"]),
    (["reference", "--digits", "0", "--out", "r.json", "pass.npz"], 2, ["digits is 0"]),
    (["reference", "--stage", "P", "--out", "r.npy", "pass.npz"], 2, ["--stage 'P' is not a stage", "stages are Q, K, V"]),
    (["reference", "--stage", "A_0", "--out", "r.npz", "pass.npz"], 2, ["--stage applies to .npy files only", "'r.npz' gets every stage"]),
    (["grad", "good.toml"], 2, ["the following arguments are required: --wrt"]),
    (["grad", "--wrt", "bogus", "--no-pdf", "good.toml"], 2, ["--wrt 'bogus'", "its inputs are"]),
    (["grad", "--wrt", "Q", "--of", "P[0,0]", "--no-pdf", "good.toml"], 2, ["'P[0,0]'", "'output[0,1]'"]),
    (["grad", "--wrt", "Q", "--of", "output[9,0]", "--no-pdf", "good.toml"], 2, ["row index 9", "expected 0 … 0"]),
    (["grad", "--wrt", "Q", "--entry", "a,b", "--no-pdf", "good.toml"], 2, ["--entry 'a,b'", "such as '0,1'"]),
    (["grad", "--wrt", "Q", "--entry", "9,0", "--no-pdf", "good.toml"], 2, ["9", "is outside Q, which has shape (1, 2)", "count from 0"]),
    (["grad", "--wrt", "Q", "--digits", "0", "--no-pdf", "good.toml"], 2, ["digits is 0"]),
    (["example", "--no-pdf", "--out", "notes.txt/out"], 3, ["notes.txt", "Not a directory"]),
]


@pytest.mark.parametrize("args, status, fragments", ERROR_CASES, ids=[" ".join(case[0]) or "(none)" for case in ERROR_CASES])
def test_cli_error_status_and_message(files, capsys, args, status, fragments):
    actual_status, _, error = run_cli(args, capsys)
    assert actual_status == status
    for fragment in fragments:
        assert fragment in error
    assert "Traceback" not in error


def test_cli_verification_pass_exits_0(files, capsys):
    status, output, _ = run_cli(["verify", "pass.npz"], capsys)
    assert status == 0
    assert "PASS" in output


def test_cli_verification_failure_exits_1(files, capsys):
    status, output, error = run_cli(["verify", "fail.npz"], capsys)
    assert status == 1
    assert "FAIL: 1 of 4 output entries" in output
    assert "Traceback" not in error


def test_cli_debug_shows_traceback(files, capsys):
    status, _, error = run_cli(["--debug", "derive", "missing.toml"], capsys)
    assert status == 2
    assert "Traceback" in error
    assert "'missing.toml' does not exist" in error


def test_cli_internal_error_hides_traceback(files, capsys, monkeypatch):
    # A bug inside a command (here a KeyError raised by its run function) is reported in one
    # line that explains how to get the traceback.
    def broken(args):
        raise KeyError("stage")

    command = importlib.import_module("symattn.cli.example")
    monkeypatch.setattr(command, "run", broken)
    status, _, error = run_cli(["example"], capsys)
    assert status == 3
    assert "internal error: KeyError: 'stage'" in error
    assert "--debug" in error
    assert "Traceback" not in error

    status, _, error = run_cli(["--debug", "example"], capsys)
    assert status == 3
    assert "Traceback" in error


def test_cli_os_error_reported(files, capsys, monkeypatch):
    def unreadable(args):
        raise PermissionError(13, "Permission denied", "secret.toml")

    monkeypatch.setattr(importlib.import_module("symattn.cli.derive"), "run", unreadable)
    status, _, error = run_cli(["derive", "good.toml"], capsys)
    assert status == 3
    assert "Permission denied (secret.toml)" in error
    assert "Traceback" not in error


def test_cli_process_exit_status(files):
    # The real entry point: the exit status reaches the shell and stderr contains one line.
    result = subprocess.run(
        [sys.executable, "-m", "symattn", "derive", "missing.toml"], capture_output=True, text=True, cwd=files
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "symattn: error: derivation file 'missing.toml' does not exist; check the path"
    ]
