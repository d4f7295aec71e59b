"""The gallery in derivations/ is reproducible byte for byte from its .toml files."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

from symattn import derive, matrix_to_decimals
from symattn.loaders import load_derivation_file

REPOSITORY = Path(__file__).resolve().parent.parent
DERIVATIONS = REPOSITORY / "derivations"
SCRIPT = REPOSITORY / "scripts" / "regenerate_derivations.py"
CASES = sorted(path.name for path in DERIVATIONS.iterdir() if path.is_dir())


def load_script():
    spec = importlib.util.spec_from_file_location("regenerate_derivations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gallery = load_script()


def test_gallery_has_every_case():
    expected = {
        "example", "causal", "padded-batch", "symbolic-one-head", "mixed-symbolic-weight", "gradient",
        "pytorch-compatible",
    }
    assert expected <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_case_folder_holds_sources_and_outputs(case):
    folder = DERIVATIONS / case
    names = {path.name for path in folder.iterdir()}
    expected = set()
    for source in gallery.case_sources(folder):
        stem = gallery.output_stem(source)
        expected |= {source.name, f"{stem}.tex", f"{stem}.pdf", f"{stem}.json", f"{stem}-page1.png"}
        # A one-page PDF has one preview.
        if f"{stem}-page2.png" in names:
            expected.add(f"{stem}-page2.png")
    assert names == expected


@pytest.mark.parametrize("case", CASES)
def test_tex_and_json_regenerate_identically(case, tmp_path, capsys):
    folder = DERIVATIONS / case
    assert gallery.regenerate_case(folder, tmp_path, pdf=False) == 0
    generated = sorted(path.name for path in tmp_path.iterdir())
    committed = sorted(path.name for path in folder.iterdir() if path.suffix in (".tex", ".json"))
    assert generated == committed
    for name in generated:
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), (
            f"{case}/{name} differs; run scripts/regenerate_derivations.py"
        )


def pdftex_version() -> str:
    """Return the pdfTeX version of the installed pdflatex, such as "1.40.24"."""
    banner = subprocess.run(["pdflatex", "--version"], capture_output=True, text=True, check=True).stdout
    return re.search(r"-(\d+\.\d+\.\d+)", banner.splitlines()[0])[1]


@pytest.mark.requires_pdflatex
@pytest.mark.parametrize("case", CASES)
def test_pdf_regenerates_identically(case, tmp_path, capsys):
    folder = DERIVATIONS / case
    documents = sorted(folder.glob("*.pdf"))
    for document in documents:
        producer = re.search(rb"/Producer \(pdfTeX-([\d.]+)\)", document.read_bytes())[1].decode()
        if producer != pdftex_version():
            # The PDF bytes depend on the pdfTeX build; the .tex comparison above still holds.
            pytest.skip(f"{document.name} was built by pdfTeX {producer}, but pdflatex here is pdfTeX {pdftex_version()}")
    assert gallery.regenerate_case(folder, tmp_path, previews=False) == 0
    assert sorted(path.name for path in tmp_path.glob("*.pdf")) == [document.name for document in documents]
    for document in documents:
        assert (tmp_path / document.name).read_bytes() == document.read_bytes(), (
            f"{case}/{document.name} differs; run scripts/regenerate_derivations.py"
        )


@pytest.mark.requires_pdftoppm
@pytest.mark.parametrize("case", CASES)
def test_previews_regenerate_identically(case):
    folder = DERIVATIONS / case
    for document in sorted(folder.glob("*.pdf")):
        committed = sorted(folder.glob(f"{document.stem}-page*.png"))
        software = gallery.png_text(committed[0].read_bytes(), "Software")
        if software != f"pdftoppm {gallery.pdftoppm_version()}":
            pytest.skip(f"{committed[0].name} was rendered by {software}, but pdftoppm here is {gallery.pdftoppm_version()}")
        # Rendered from the committed PDF, so only pdftoppm is compared here.
        first = gallery.render_previews(document.read_bytes())
        second = gallery.render_previews(document.read_bytes())
        assert first == second, f"two renderings of {document.name} differ"
        assert [path.read_bytes() for path in committed] == first, (
            f"the previews of {case}/{document.name} differ; run scripts/regenerate_derivations.py"
        )


def test_index_regenerates_identically():
    committed = (DERIVATIONS / "README.md").read_text(encoding="utf-8")
    assert gallery.index_markdown() == committed, "derivations/README.md differs; run scripts/regenerate_derivations.py"


def test_index_links_every_case_and_preview():
    index = (DERIVATIONS / "README.md").read_text(encoding="utf-8")
    for case in CASES:
        for path in (DERIVATIONS / case).iterdir():
            assert f"({case}/{path.name})" in index, f"the index does not link {case}/{path.name}"


def test_text_chunk_is_valid_png_chunk():
    png = (DERIVATIONS / "example" / "example-page1.png").read_bytes()
    # The chunk after IHDR (8 signature bytes + 25 IHDR bytes) is the inserted tEXt chunk.
    length = int.from_bytes(png[33:37], "big")
    body = png[37 : 41 + length]
    crc = int.from_bytes(png[41 + length : 45 + length], "big")
    assert body[:4] == b"tEXt"
    assert crc == zlib.crc32(body)
    assert gallery.png_text(png, "Software").startswith("pdftoppm ")
    assert gallery.png_text(png, "Title") is None


def test_regeneration_script_names_missing_case():
    result = subprocess.run([sys.executable, str(SCRIPT), "no-such-case"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "case folder" in result.stderr
    assert "no-such-case not found" in result.stderr


# What the cases show, checked independently of the committed files.


def test_padded_batch_gives_padding_keys_zero_weight():
    for index, valid in enumerate((3, 2, 1)):
        derivation, _ = load_derivation_file(DERIVATIONS / "padded-batch" / f"sequence-{index}.toml")
        weights = derivation["A_0"]
        for query in range(3):
            for key in range(valid, 3):
                assert weights[query, key] == 0


def test_padded_batch_matches_unpadded_sequence():
    derivation, _ = load_derivation_file(DERIVATIONS / "padded-batch" / "sequence-1.toml")
    x = derivation.inputs["query_source"][:2, :]
    weights = {name: derivation.inputs[name] for name in ("W_Q", "W_K", "W_V")}
    unpadded = derive(x, **weights)
    padded_rows = matrix_to_decimals(derivation["output"][:2, :], 30)
    assert padded_rows == matrix_to_decimals(unpadded["output"], 30)


def test_padded_batch_single_token_output():
    # One valid token: every query takes its value row, x W_V = [1, 1] [[1, 0], [0, 2]] = [1, 2].
    derivation, _ = load_derivation_file(DERIVATIONS / "padded-batch" / "sequence-2.toml")
    assert derivation["output"] == sp.Matrix([[1, 2], [1, 2], [1, 2]])


def test_pytorch_compatible_case_matches_multihead_attention():
    torch = pytest.importorskip("torch")
    derivation, _ = load_derivation_file(DERIVATIONS / "pytorch-compatible" / "pytorch-compatible.toml")

    def array(name: str) -> np.ndarray:
        return np.array(derivation.inputs[name].tolist(), dtype=np.float64)

    module = torch.nn.MultiheadAttention(4, 2, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        module.in_proj_weight.copy_(torch.from_numpy(np.concatenate([array("W_Q").T, array("W_K").T, array("W_V").T])))
        module.in_proj_bias.copy_(torch.from_numpy(np.concatenate([array(f"b_{n}")[0] for n in "QKV"])))
        module.out_proj.weight.copy_(torch.from_numpy(array("W_O").T))
        module.out_proj.bias.copy_(torch.from_numpy(array("b_O")[0]))
    x = torch.from_numpy(array("query_source"))[None]
    output, _ = module(x, x, x, need_weights=False)

    exact = np.array(matrix_to_decimals(derivation["output"], 25), dtype=np.float64)
    # Every input is a binary fraction, so float64 PyTorch receives the exact inputs and differs
    # only by its rounding errors: a few units of 2^-52 on outputs of magnitude about 1.
    assert output.shape == (1, 3, 4)
    assert np.max(np.abs(output[0].detach().numpy() - exact)) < 1e-14
