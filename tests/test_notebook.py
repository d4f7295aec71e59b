"""docs/tutorial.ipynb runs in a real Jupyter kernel, and its outputs are the right values.

Cells are found by their tag (cell metadata "tags"), so cells can be added without breaking
the checks. Expected numbers are computed here with plain mpmath.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import mpmath
import nbclient
import nbformat
import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
TUTORIAL = REPOSITORY / "docs" / "tutorial.ipynb"
KERNEL_TIMEOUT_SECONDS = 300
KERNEL_NAME = "symattn-tests"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, list]:
    """Execute the tutorial once and return the outputs of each tagged code cell.

    The kernel runs this test's interpreter, through a kernel spec made for the test, so it
    imports the symattn under test whatever kernels Jupyter has installed.
    """
    notebook = nbformat.read(TUTORIAL, as_version=4)
    folder = tmp_path_factory.mktemp("tutorial")
    spec_folder = folder / "jupyter" / "kernels" / KERNEL_NAME
    spec_folder.mkdir(parents=True)
    kernel = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
              "display_name": "symattn tests", "language": "python"}
    (spec_folder / "kernel.json").write_text(json.dumps(kernel), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(folder / "jupyter"))
        client = nbclient.NotebookClient(
            notebook, timeout=KERNEL_TIMEOUT_SECONDS, kernel_name=KERNEL_NAME,
            resources={"metadata": {"path": str(folder)}},
        )
        client.execute()
    tagged = {}
    for cell in notebook.cells:
        if cell.cell_type == "code":
            for tag in cell.metadata.get("tags", []):
                tagged[tag] = cell.outputs
    return tagged


def result(outputs: dict[str, list], tag: str) -> dict[str, str]:
    """Return the data (MIME type → text) of the execute_result of the cell tagged ``tag``."""
    results = [output for output in outputs[tag] if output.output_type == "execute_result"]
    assert len(results) == 1, f"cell {tag!r} has {len(results)} results"
    return results[0].data


def stdout(outputs: dict[str, list], tag: str) -> str:
    return "".join(output.text for output in outputs[tag] if output.output_type == "stream" and output.name == "stdout")


def digits(value: mpmath.mpf, significant: int) -> str:
    with mpmath.workdps(significant + 20):
        return mpmath.nstr(value, significant, strip_zeros=False)


# c = e^{1/√2}, the exponential of the scaled logit 1/√2 of a query and a key with one common 1.
with mpmath.workdps(60):
    C = mpmath.exp(1 / mpmath.sqrt(2))


def test_tutorial_is_a_valid_notebook():
    notebook = nbformat.read(TUTORIAL, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs for cell in code_cells), "commit the tutorial without outputs"


def test_tutorial_summary_describes_derivation(outputs):
    data = result(outputs, "summary")
    assert "Derivation: 1 head, 2 queries, 3 keys" in data["text/html"]
    assert "scale: sqrt(2)/2 (sqrt_dk)" in data["text/plain"]
    assert "symbols: none" in data["text/plain"]


def test_tutorial_stage_typesets_exactly(outputs):
    latex = result(outputs, "weights")["text/latex"]
    assert latex.startswith("$\\displaystyle")
    assert "\\frac{1}{1 + 2 e^{\\frac{\\sqrt{2}}{2}}}" in latex


def test_tutorial_output_decimals(outputs):
    values = ast.literal_eval(result(outputs, "decimals")["text/plain"])
    with mpmath.workdps(60):
        second = [(1 + 8 * C) / (1 + 2 * C), (2 + 10 * C) / (1 + 2 * C)]
    assert values[0] == ["3.0000000000000000000", "4.0000000000000000000"]
    assert values[1] == [digits(second[0], 20), digits(second[1], 20)]
    assert values[1][0] == "3.4066725560787154619"


def test_tutorial_abbreviates_symbolic_output(outputs):
    latex = result(outputs, "abbreviated")["text/latex"]
    full_length = int(result(outputs, "full-length")["text/plain"])
    assert "\\cdots" in latex
    assert "operations]" in latex
    assert len(latex) < full_length


def test_tutorial_gradient_is_column_sums(outputs):
    values = ast.literal_eval(result(outputs, "gradient")["text/plain"])
    with mpmath.workdps(60):
        first, last = (1 + C) / (1 + 2 * C), 2 * C / (1 + 2 * C)
    assert values[0] == [digits(first, 12)] * 2
    assert values[1] == [digits(first, 12)] * 2
    assert values[2] == [digits(last, 12)] * 2


def test_tutorial_verification_passes(outputs):
    assert result(outputs, "verify")["text/plain"] == "(True, True)"


def test_tutorial_progress_reports(outputs):
    expected = "".join(f"certified references: {done}/3\n" for done in range(4))
    assert stdout(outputs, "progress") == expected
