"""Reading verification cases from .npz archives and TOML files, and rejecting bad ones."""

import json
import pickle
from fractions import Fraction

import numpy as np
import pytest

from symattn.errors import InvalidInputError, MaskError, ShapeError
from symattn.verify.cases import load_case

X_Q = np.array([[1.0, 0.0]])
X_K = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
X_V = np.array([[2.0], [4.0]])
W_K = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # maps 3 features to 2, keeping the first two
W_V = np.array([[1.0, 0.0]])  # maps 1 feature to 2


def cross_inputs() -> dict:
    return {"query_source": X_Q, "key_source": X_K, "value_source": X_V,
            "W_Q": np.eye(2), "W_K": W_K, "W_V": W_V}


def write_npz(path, spec: dict, **arrays) -> None:
    np.savez(path, spec=json.dumps(spec), **arrays)


def test_npz_case_round_trip(tmp_path):
    path = tmp_path / "case.npz"
    output = np.array([[2.66, 0.0]], dtype=np.float32)
    write_npz(path, {"heads": 1, "masked_rows": "zeros"}, output=output, **cross_inputs())
    case = load_case(path)
    assert case.dtype == "float32"
    assert case.problem.n_q == 1
    assert case.problem.n_kv == 2
    assert case.problem.d_out == 2
    assert case.problem.spec.masked_rows == "zeros"
    assert not case.problem.direct
    assert np.array_equal(case.output, output)
    assert case.attention_weights is None


def test_npz_direct_case_with_mask(tmp_path):
    path = tmp_path / "case.npz"
    spec = {"masks": [{"kind": "block", "values": [[False, True, True]]}], "scale": "none"}
    write_npz(path, spec, Q=np.array([[1.0, 0.0]]), K=np.eye(3, 2), V=np.eye(3, 2), output=np.zeros((1, 2)))
    case = load_case(path)
    assert case.problem.direct
    assert case.problem.spec.masks[0].kind == "block"
    assert case.problem.spec.masks[0].values == (False, True, True)
    assert case.problem.spec.scale == "none"


def test_toml_case_with_npy_files_and_inline_rows(tmp_path):
    np.save(tmp_path / "x_k.npy", X_K)
    np.save(tmp_path / "out.npy", np.array([[2.5, 0.0]]))
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "keep.npy", np.array([True, True]))
    (tmp_path / "case.toml").write_text(
        """
[spec]
heads = 1
dtype = "float64"

[[spec.masks]]
kind = "keep"
array = "data/keep.npy"

[inputs]
query_source = [[1, 0]]
key_source = "x_k.npy"
value_source = [[2], [4]]
W_Q = [[1, 0], [0, 1]]
W_K = [[1, 0], [0, 1], [0, 0]]
W_V = [["1", "0"]]
b_Q = ["0.1", "-2.5"]

[outputs]
output = "out.npy"
""",
        encoding="utf-8",
    )
    case = load_case(tmp_path / "case.toml")
    assert case.dtype == "float64"
    assert case.problem.inputs["b_Q"].tolist() == [Fraction(1, 10), Fraction(-5, 2)]  # "0.1" is exactly 1/10
    assert case.problem.inputs["key_source"].dtype == np.float64
    assert case.problem.spec.masks[0].values == (True, True)
    assert case.output.tolist() == [[2.5, 0.0]]


def test_mask_error_names_mask_and_position(tmp_path):
    path = tmp_path / "case.npz"
    spec = {"masks": [{"kind": "keep", "values": [[True, True, True]]},
                      {"kind": "block", "values": [[False, True, 2]]}], "scale": "none"}
    write_npz(path, spec, Q=np.array([[1.0, 0.0]]), K=np.eye(3, 2), V=np.eye(3, 2), output=np.zeros((1, 2)))
    with pytest.raises(MaskError) as caught:
        load_case(path)
    assert "masks[1]: block mask entry [0, 2] is 2" in str(caught.value)


def test_pytorch_weight_layout_is_transposed(tmp_path):
    path = tmp_path / "case.npz"
    inputs = cross_inputs()
    inputs["W_K"] = W_K.T  # PyTorch's (out, in) layout
    inputs["W_V"] = W_V.T
    write_npz(path, {"weight_layout": "pytorch"}, **inputs)
    case = load_case(path)
    assert case.problem.inputs["W_K"].shape == (3, 2)
    assert case.problem.inputs["W_V"].tolist() == [[1.0, 0.0]]
    assert case.dtype is None


def test_nan_input_names_input_and_position(tmp_path):
    path = tmp_path / "case.npz"
    inputs = cross_inputs()
    inputs["key_source"] = X_K.copy()
    inputs["key_source"][1, 2] = np.nan
    write_npz(path, {}, **inputs)
    with pytest.raises(InvalidInputError, match=r"key_source contains nan at position \(1, 2\)"):
        load_case(path)


def test_infinite_input_rejected(tmp_path):
    path = tmp_path / "case.npz"
    write_npz(path, {}, Q=np.array([[np.inf, 0.0]]), K=np.eye(2), V=np.eye(2))
    with pytest.raises(InvalidInputError, match=r"Q contains inf"):
        load_case(path)


def test_output_dtype_mismatch_names_both(tmp_path):
    path = tmp_path / "case.npz"
    write_npz(path, {"dtype": "float32"}, output=np.zeros((1, 2)), **cross_inputs())
    with pytest.raises(InvalidInputError, match="output has dtype float64 but the case declares dtype float32"):
        load_case(path)


def test_output_shape_mismatch_names_both(tmp_path):
    path = tmp_path / "case.npz"
    write_npz(path, {}, output=np.zeros((2, 2)), **cross_inputs())
    with pytest.raises(ShapeError, match=r"output has shape \(2, 2\).*shape \(1, 2\)"):
        load_case(path)


def test_averaged_weights_without_flag_get_a_hint(tmp_path):
    path = tmp_path / "case.npz"
    write_npz(path, {}, attention_weights=np.zeros((1, 2)), **cross_inputs())
    with pytest.raises(ShapeError, match="average_weights = true"):
        load_case(path)


def test_value_width_mismatch_names_both_widths(tmp_path):
    path = tmp_path / "case.npz"
    inputs = cross_inputs()
    inputs["value_source"] = np.array([[2.0, 0.0], [4.0, 0.0]])  # width 2, but W_V takes 1 feature
    write_npz(path, {}, **inputs)
    with pytest.raises(ShapeError, match=r"value_source has 2 features \(shape \(2, 2\)\) but W_V has 1 row \(shape \(1, 2\)\)"):
        load_case(path)


def test_bfloat16_outputs_must_hold_bfloat16_values(tmp_path):
    path = tmp_path / "case.npz"
    write_npz(path, {"dtype": "bfloat16"}, output=np.array([[1 / 3, 0.0]], dtype=np.float32), **cross_inputs())
    with pytest.raises(InvalidInputError, match="not bfloat16 values"):
        load_case(path)


def test_bfloat16_outputs_accepted(tmp_path):
    path = tmp_path / "case.npz"
    write_npz(path, {"dtype": "bfloat16"}, output=np.array([[171 / 512, 0.0]], dtype=np.float32), **cross_inputs())
    assert load_case(path).dtype == "bfloat16"


def test_corrupt_npz_rejected(tmp_path):
    path = tmp_path / "case.npz"
    path.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(InvalidInputError, match="does not start with the zip signature"):
        load_case(path)


def test_truncated_npz_rejected(tmp_path):
    whole = tmp_path / "whole.npz"
    write_npz(whole, {}, **cross_inputs())
    data = whole.read_bytes()
    path = tmp_path / "case.npz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match="truncated or corrupt"):
        load_case(path)


def test_pickled_member_not_loaded(tmp_path):
    path = tmp_path / "case.npz"
    objects = np.array([{"not": "numbers"}], dtype=object)
    np.savez(path, spec=json.dumps({}), Q=objects, K=np.eye(2), V=np.eye(2))
    with pytest.raises(InvalidInputError, match="Python objects"):
        load_case(path)


def test_pickle_file_is_not_an_npz(tmp_path):
    path = tmp_path / "case.npz"
    path.write_bytes(pickle.dumps({"spec": "{}"}))
    with pytest.raises(InvalidInputError, match="is not an .npz archive"):
        load_case(path)


def test_missing_spec_member(tmp_path):
    path = tmp_path / "case.npz"
    np.savez(path, **cross_inputs())
    with pytest.raises(InvalidInputError, match="no 'spec' member"):
        load_case(path)


def test_unknown_spec_key(tmp_path):
    path = tmp_path / "case.npz"
    write_npz(path, {"head": 2}, **cross_inputs())
    with pytest.raises(InvalidInputError, match=r"unknown spec keys head \(did you mean heads\?\)"):
        load_case(path)


def test_unknown_array_name(tmp_path):
    path = tmp_path / "case.npz"
    write_npz(path, {}, W_X=np.eye(2), **cross_inputs())
    with pytest.raises(InvalidInputError, match="unknown array W_X for projection mode"):
        load_case(path)


def test_misspelt_direct_array_named_alone(tmp_path):
    path = tmp_path / "case.npz"
    write_npz(path, {}, Qx=np.eye(2), K=np.eye(2), V=np.eye(2))
    with pytest.raises(InvalidInputError, match=r"unknown array Qx for direct mode \(an array named Q, K or V"):
        load_case(path)


def test_direct_case_missing_query_named(tmp_path):
    path = tmp_path / "case.npz"
    write_npz(path, {}, K=np.eye(2), V=np.eye(2))
    with pytest.raises(InvalidInputError, match="direct mode needs Q, K and V, but Q is missing"):
        load_case(path)


def test_toml_path_outside_folder_rejected(tmp_path):
    (tmp_path / "inner").mkdir()
    np.save(tmp_path / "outside.npy", X_Q)
    toml = tmp_path / "inner" / "case.toml"
    toml.write_text('[inputs]\nQ = "../outside.npy"\nK = [[1, 0]]\nV = [[1]]\n', encoding="utf-8")
    with pytest.raises(InvalidInputError, match="leads outside the case file's folder"):
        load_case(toml)


def test_toml_absolute_path_rejected(tmp_path):
    np.save(tmp_path / "q.npy", X_Q)
    toml = tmp_path / "case.toml"
    toml.write_text(f'[inputs]\nQ = "{(tmp_path / "q.npy").as_posix()}"\nK = [[1, 0]]\nV = [[1]]\n', encoding="utf-8")
    with pytest.raises(InvalidInputError, match="absolute path"):
        load_case(toml)


def test_toml_missing_npy_named(tmp_path):
    toml = tmp_path / "case.toml"
    toml.write_text('[inputs]\nQ = "missing.npy"\nK = [[1, 0]]\nV = [[1]]\n', encoding="utf-8")
    with pytest.raises(InvalidInputError, match="missing.npy"):
        load_case(toml)


def test_invalid_toml_rejected(tmp_path):
    toml = tmp_path / "case.toml"
    toml.write_text("[spec\nheads = 1\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="not valid TOML"):
        load_case(toml)


def test_unknown_suffix_rejected(tmp_path):
    path = tmp_path / "case.json"
    path.write_text("{}", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="expected .npz or .toml"):
        load_case(path)


def test_missing_case_file_named(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_case(tmp_path / "nowhere.npz")
