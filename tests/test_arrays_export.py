"""Export of certified references: .npz, .npy and JSON round trips."""

import io
import json
import math
import zipfile
from fractions import Fraction

import numpy as np
import pytest

from symattn import AttentionSpec, InvalidInputError, Mask, OutputError
from symattn.export.arrays import (
    FORMAT, read_reference, reference_to_json, reference_to_npz, spec_from_dict, spec_to_dict, write_reference,
)
from symattn.numeric.reference import compute_reference
from symattn.problem import Problem


@pytest.fixture(scope="module")
def reference():
    rng = np.random.default_rng(5)
    spec = AttentionSpec(heads=2, scale="1/sqrt(3)", masked_rows="zeros",
                         masks=(Mask.additive([[0, "-1/2", "-inf"], [1, 0, 0]]), Mask.keep([True, True, False])))
    problem = Problem.from_arrays(
        spec=spec, query_source=rng.standard_normal((2, 4)).astype(np.float32), kv_source=rng.standard_normal((3, 4)),
        W_Q=np.eye(4), W_K=rng.integers(-2, 3, (4, 4)), W_V=np.array([[Fraction(1, 3)] * 4] * 4, dtype=object),
        W_O=rng.standard_normal((4, 2)), b_O=[0.5, -1.0])
    return compute_reference(problem, 20)


def same_problem(a: Problem, b: Problem) -> bool:
    if a.direct != b.direct or set(a.inputs) != set(b.inputs) or a.spec.describe() != b.spec.describe():
        return False
    return all(a.inputs[name].dtype == b.inputs[name].dtype and np.array_equal(a.inputs[name], b.inputs[name])
               for name in a.inputs)


def test_npz_round_trip(reference, tmp_path):
    path = write_reference(reference, tmp_path / "ref.npz")
    back = read_reference(path)
    assert same_problem(back.problem, reference.problem)
    assert back.digits == 20
    assert back.engine == "flint"
    for stage, matrix in reference.stages.items():
        for dtype in ("float64", "float32", "float16", "bfloat16"):
            assert np.array_equal(back.arrays[f"{stage}.{dtype}"], matrix.rounded(dtype), equal_nan=True)
        assert np.array_equal(back.arrays[f"{stage}.radius"], matrix.radii(), equal_nan=True)


def test_npz_inputs_reproduce_reference(reference, tmp_path):
    back = read_reference(write_reference(reference, tmp_path / "ref.npz"))
    again = compute_reference(back.problem, 20)
    assert again.output.decimals() == reference.output.decimals()


def test_npz_members_and_storage(reference):
    with np.load(io.BytesIO(reference_to_npz(reference, ["float32"])), allow_pickle=False) as archive:
        assert str(archive["format"]) == FORMAT
        assert json.loads(str(archive["spec"]))["scale"] == "1/sqrt(3)"
        assert archive["W_V"].dtype.kind == "U"  # exact rationals as text
        assert archive["W_V"][0, 0] == "1/3"
        assert archive["query_source"].dtype == np.float32
        assert archive["output.float32"].dtype == np.float32
        assert "output.float64" not in archive.files


def test_npz_bytes_are_reproducible(reference):
    assert reference_to_npz(reference) == reference_to_npz(reference)


def test_json_round_trip(reference, tmp_path):
    path = write_reference(reference, tmp_path / "ref.json")
    back = read_reference(path)
    assert same_problem(back.problem, reference.problem)
    assert back.decimals["output"] == reference.output.decimals()
    for stage, matrix in reference.stages.items():
        assert np.array_equal(back.arrays[f"{stage}.bfloat16"], matrix.rounded("bfloat16"), equal_nan=True)
        assert np.array_equal(back.arrays[f"{stage}.radius"], matrix.radii(), equal_nan=True)


def test_json_holds_hex_floats_and_radii(reference):
    document = json.loads(reference_to_json(reference))
    assert list(document) == ["format", "symattn_version", "engine", "digits", "rounding", "mode", "spec", "inputs", "stages"]
    output = document["stages"]["output"]
    assert list(output)[:4] == ["shape", "precision_bits", "decimal", "radius"]
    first = reference.output.rounded("float64")[0, 0]
    assert float.fromhex(output["float64"][0][0]) == first
    assert 0 < float.fromhex(output["radius"][0][0]) < 1e-20
    assert document["stages"]["Z_masked_0"]["float32"][0][2] == "-inf"
    assert document["inputs"]["W_V"]["exact"][0][0] == "1/3"
    assert float.fromhex(document["inputs"]["query_source"]["hex"][0][0]) == float(reference.problem.inputs["query_source"][0, 0])


def test_json_text_is_reproducible(reference):
    assert reference_to_json(reference) == reference_to_json(reference)


def test_npy_single_stage(reference, tmp_path):
    path = write_reference(reference, tmp_path / "weights.npy", stage="A_1", dtypes="float16")
    values = np.load(path, allow_pickle=False)
    assert values.dtype == np.float16
    assert np.array_equal(values, reference["A_1"].rounded("float16"))


def test_npy_needs_one_dtype(reference, tmp_path):
    with pytest.raises(InvalidInputError, match="contains one dtype"):
        write_reference(reference, tmp_path / "out.npy", dtypes=["float16", "float32"])


def test_write_refuses_other_content_without_force(reference, tmp_path):
    path = tmp_path / "ref.json"
    path.write_text("something else")
    with pytest.raises(OutputError, match="already exists"):
        write_reference(reference, path)
    write_reference(reference, path, force=True)
    assert json.loads(path.read_text())["format"] == FORMAT
    write_reference(reference, path)  # the same bytes again are not a conflict


def test_write_rejects_unknown_suffix(reference, tmp_path):
    with pytest.raises(InvalidInputError, match="suffix '.csv'"):
        write_reference(reference, tmp_path / "ref.csv")


def test_read_truncated_npz(reference, tmp_path):
    data = reference_to_npz(reference)
    path = tmp_path / "cut.npz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match="not a readable .npz archive"):
        read_reference(path)


def test_read_npz_with_encrypted_member(reference, tmp_path):
    # A member flagged as encrypted makes zipfile raise RuntimeError; it must read as a damaged file.
    path = tmp_path / "ref.npz"
    write_reference(reference, path)
    data = bytearray(path.read_bytes())
    directory = data.index(b"PK\x01\x02")  # the first central directory entry
    data[directory + 8] |= 0x01  # general purpose flag bit 0: encrypted
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidInputError, match="not a readable .npz archive"):
        read_reference(path)


def test_read_npz_without_format(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, x=np.ones(2))
    with pytest.raises(InvalidInputError, match="no 'format' member"):
        read_reference(path)


def test_read_npz_rejects_pickled_members(tmp_path):
    path = tmp_path / "pickled.npz"
    buffer = io.BytesIO()
    np.save(buffer, np.array([Fraction(1, 3)], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("format.npy", _npy(np.array(FORMAT)))
        archive.writestr("W_Q.npy", buffer.getvalue())
    with pytest.raises(InvalidInputError, match="not a readable"):
        read_reference(path)


def _npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_spec_dict_round_trip(reference):
    problem = reference.problem
    text = json.dumps(spec_to_dict(problem.spec, problem))
    spec = spec_from_dict(json.loads(text))
    assert spec.describe() == problem.spec.describe()


def test_spec_dict_rejects_unknown_keys():
    with pytest.raises(InvalidInputError, match="expected exactly"):
        spec_from_dict({"heads": 1, "scale": "sqrt_dk", "masks": [], "causal": None, "key_length": None,
                        "masked_rows": "error", "extra": 1})


def test_export_nan_rows(tmp_path):
    spec = AttentionSpec(masks=(Mask.keep([[True, False], [False, False]]),), masked_rows="nan")
    problem = Problem.from_arrays(spec=spec, direct=True, Q=[[1.0], [2.0]], K=[[1.0], [0.5]], V=[[1.0], [3.0]])
    back = read_reference(write_reference(compute_reference(problem, 10), tmp_path / "nan.json"))
    assert math.isnan(back.arrays["output.float64"][1, 0])
    assert back.arrays["output.float64"][0, 0] == 1.0
    assert back.decimals["A_0"][1] == ["nan", "nan"]
