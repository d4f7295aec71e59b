"""PyTorch autograd (torch 2.13, CPU) against symattn's exact gradients.

In float64, autograd's gradients of these small cases carry a few rounding errors per entry.
So every gradient must agree with the exact one to a relative error of 1e-12 where the exact
value is not 0, and to 1e-15 absolute where it is. In float32 the bound is 1e-4 relative.
"""

import numpy as np
import pytest
import torch

from symattn.errors import UnsupportedError
from symattn.verify import Tolerance
from symattn.verify.autograd import compare_gradients, compare_hessian_vector_product

SDPA = torch.nn.functional.scaled_dot_product_attention


def mha(embed_dim=4, heads=2, **options):
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(embed_dim, heads, **options)
    return module.double()


def assert_close_in_float64(report):
    stages = report.report("float64").stages
    for stage in stages:
        assert stage.max_rel_error < 1e-12, stage.name
        assert stage.max_abs_error < 1e-15 * max(1.0, stage.max_abs_reference), stage.name
        assert stage.nan_count == 0, stage.name


def test_autograd_mha_batch_first_float64_and_float32():
    torch.manual_seed(1)
    query = torch.randn(2, 3, 4, dtype=torch.float64)
    memory = torch.randn(2, 5, 4, dtype=torch.float64)
    upstream = torch.randn(2, 3, 4, dtype=torch.float64)
    report = compare_gradients(mha(batch_first=True), query, memory, memory, upstream=upstream)
    names = [stage.name for stage in report.report("float64").stages]
    assert names == [
        "grad query", "grad key", "grad value", "grad in_proj_weight", "grad in_proj_bias",
        "grad out_proj.weight", "grad out_proj.bias",
    ]
    assert report.passed
    assert_close_in_float64(report)
    for stage in report.report("float32").stages:
        assert stage.max_rel_error < 1e-4, stage.name


def test_autograd_mha_sequence_first_with_masks():
    torch.manual_seed(2)
    query = torch.randn(3, 2, 4, dtype=torch.float64)  # (L, N, E)
    key = torch.randn(4, 2, 4, dtype=torch.float64)
    inf = float("inf")
    padding = torch.tensor([[0.0, 0.0, 0.0, -inf], [0.0, -inf, 0.0, 0.0]], dtype=torch.float64)
    additive = torch.tensor([[0.5, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, 2.0], [-0.25, 0.0, 0.0, 0.0]],
                            dtype=torch.float64)
    report = compare_gradients(
        mha(), query, key, key, key_padding_mask=padding, attn_mask=additive, dtypes=("float64",)
    )
    assert report.passed
    assert_close_in_float64(report)


def test_autograd_mha_separate_widths_unbatched():
    torch.manual_seed(3)
    module = mha(embed_dim=4, heads=2, kdim=3, vdim=2, bias=False)
    query, key, value = (torch.randn(n, w, dtype=torch.float64) for n, w in ((2, 4), (3, 3), (3, 2)))
    report = compare_gradients(module, query, key, value, dtypes=("float64",))
    names = [stage.name for stage in report.report("float64").stages]
    assert "grad q_proj_weight" in names
    assert "grad in_proj_bias" not in names
    assert_close_in_float64(report)


def test_autograd_mha_key_bias_gradient_is_exact_zero():
    # The softmax ignores q · b_K, so the exact gradient of in_proj_bias[E:2E] is 0.
    torch.manual_seed(4)
    query = torch.randn(3, 4, dtype=torch.float64)
    report = compare_gradients(mha(), query, query, query, dtypes=("float64",))
    stage = next(s for s in report.report("float64").stages if s.name == "grad in_proj_bias")
    assert stage.max_abs_error < 1e-15
    # torch 2.13 leaves rounding residues of about 1e-17 there, which the report explains.
    notes = report.report("float64").notes
    assert any(note.startswith("grad in_proj_bias: 4 entries have an exact gradient of 0") for note in notes)


def test_autograd_sdpa_heads_masks_scale():
    torch.manual_seed(5)
    query, key = torch.randn(2, 3, 2, 3, dtype=torch.float64), torch.randn(2, 3, 4, 3, dtype=torch.float64)
    value = torch.randn(2, 3, 4, 2, dtype=torch.float64)
    keep = torch.tensor([[True, True, False, True], [False, True, True, True]])
    upstream = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    report = compare_gradients(SDPA, query, key, value, attn_mask=keep, scale=0.3, upstream=upstream)
    assert report.passed
    assert_close_in_float64(report)


def test_autograd_sdpa_causal():
    torch.manual_seed(6)
    query, key, value = (torch.randn(3, 4, 2, dtype=torch.float64) for _ in range(3))
    report = compare_gradients(SDPA, query, key, value, is_causal=True, dtypes=("float64",))
    assert_close_in_float64(report)


def test_autograd_sdpa_fully_masked_rows_zeros():
    # Queries 1 and 2 see no key; PyTorch's SDPA gives zero rows there and finite gradients,
    # which are exactly the gradients under policy "zeros".
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    keep = torch.tensor([[True, False, False], [False, False, False], [False, False, False]])
    report = compare_gradients(SDPA, X, X, X, attn_mask=keep, masked_rows="zeros", dtypes=("float64",))
    for stage in report.report("float64").stages:
        assert stage.nan_count == 0, stage.name
        assert stage.max_abs_error == 0, stage.name


def test_autograd_zero_ulp_tolerance_fails_float32():
    # float32 gradients are not correctly rounded, so a tolerance of 0 ULPs must fail somewhere.
    torch.manual_seed(7)
    query = torch.randn(3, 4, dtype=torch.float64)
    report = compare_gradients(mha(), query, query, query, dtypes=("float32",), tolerance=Tolerance(ulps=0))
    assert not report.passed


def test_autograd_report_json_and_table():
    torch.manual_seed(8)
    query = torch.randn(2, 2, dtype=torch.float64)
    report = compare_gradients(SDPA, query, query, query, dtypes=("float64",))
    data = report.to_dict()
    assert data["implementation"] == "scaled_dot_product_attention"
    assert data["reports"][0]["dtype"] == "float64"
    assert "grad query" in report.to_table()


def test_autograd_rejects_add_zero_attn():
    module = mha(add_zero_attn=True)
    query = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(UnsupportedError, match="add_zero_attn"):
        compare_gradients(module, query, query, query, dtypes=("float64",))


@pytest.mark.parametrize("weight", ["W_Q", "W_K", "W_O"])
def test_hessian_vector_product_matches_double_backward(weight):
    torch.manual_seed(9)
    query = torch.randn(3, 4, dtype=torch.float64)
    memory = torch.randn(4, 4, dtype=torch.float64)
    direction = np.random.default_rng(9).standard_normal((4, 4))
    upstream = torch.randn(3, 4, dtype=torch.float64)
    check = compare_hessian_vector_product(
        mha(), query, memory, memory, weight=weight, direction=direction, upstream=upstream
    )
    assert check.passed
    assert check.comparison.max_rel_error < 1e-11
    assert check.comparison.max_abs_error < 1e-13


# Problems and `symattn verify --grad`.

def test_problem_gradients_projection_case():
    from symattn import AttentionSpec
    from symattn.problem import Problem
    from symattn.verify.autograd import compare_problem_gradients

    rng = np.random.default_rng(10)
    problem = Problem.from_arrays(
        spec=AttentionSpec(heads=2, causal="top_left"),
        query_source=rng.standard_normal((3, 4)), key_source=rng.standard_normal((3, 2)),
        value_source=rng.standard_normal((3, 5)), W_Q=rng.standard_normal((4, 4)),
        W_K=rng.standard_normal((2, 4)), W_V=rng.standard_normal((5, 4)), b_V=rng.standard_normal(4),
        W_O=rng.standard_normal((4, 4)),
    )
    report = compare_problem_gradients(problem, dtypes=("float64",))
    names = [stage.name for stage in report.report("float64").stages]
    assert "grad k_proj_weight" in names
    assert_close_in_float64(report)


def test_problem_gradients_reject_non_square_query_projection():
    from symattn import AttentionSpec
    from symattn.problem import Problem
    from symattn.verify.autograd import compare_problem_gradients

    problem = Problem.from_arrays(
        spec=AttentionSpec(), query_source=[[1, 0, 1]], kv_source=[[1, 0, 1]],
        W_Q=[[1, 0], [0, 1], [1, 1]], W_K=[[1, 0], [0, 1], [1, 1]], W_V=[[1, 0], [0, 1], [1, 1]],
    )
    with pytest.raises(UnsupportedError, match="nn.MultiheadAttention needs W_Q and W_O of shape"):
        compare_problem_gradients(problem)


def test_cli_verify_grad_fully_masked_rows(tmp_path, capsys):
    import json

    from symattn.cli import main

    # Queries 1 and 2 see no key; under policy "zeros" every gradient is finite and exact.
    X = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    path = tmp_path / "case.npz"
    np.savez(
        path,
        spec=json.dumps({"masked_rows": "zeros", "masks": [
            {"kind": "block", "values": [False, True, True]},
            {"kind": "block", "values": [[False, False, False], [True, False, False], [True, True, False]]},
        ]}),
        Q=np.array(X), K=np.array(X), V=np.array(X),
    )
    assert main(["verify", str(path), "--grad"]) == 0
    table = capsys.readouterr().out
    assert "gradients of scaled_dot_product_attention" in table
    assert "float32 implementation" in table
    assert main(["verify", str(path), "--grad", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True
    assert [stage["name"] for stage in report["reports"][0]["stages"]] == ["grad query", "grad key", "grad value"]
    assert all(stage["nan_count"] == 0 for r in report["reports"] for stage in r["stages"])


def test_cli_verify_grad_fails_zero_ulps(tmp_path):
    import json

    from symattn.cli import main

    rng = np.random.default_rng(12)
    path = tmp_path / "case.npz"
    np.savez(path, spec=json.dumps({"heads": 2}), query_source=rng.standard_normal((3, 4)),
             key_source=rng.standard_normal((4, 4)), value_source=rng.standard_normal((4, 4)),
             W_Q=rng.standard_normal((4, 4)), W_K=rng.standard_normal((4, 4)), W_V=rng.standard_normal((4, 4)))
    assert main(["verify", str(path), "--grad", "--ulps", "0"]) == 1


def test_verify_grad_without_torch(tmp_path):
    import json
    import subprocess
    import sys

    path = tmp_path / "case.npz"
    np.savez(path, spec=json.dumps({}), Q=np.eye(2), K=np.eye(2), V=np.eye(2))
    # None in sys.modules makes "import torch" fail as it does where PyTorch is not installed.
    code = "import sys; sys.modules['torch'] = None; from symattn.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, "verify", str(path), "--grad"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 3
    assert "PyTorch is not installed; install it with pip install torch==2.13.0" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
