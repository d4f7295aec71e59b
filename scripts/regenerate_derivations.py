"""Rewrite the gallery in derivations/ from its .toml files.

Each folder derivations/<case>/ is one case. It contains one or more derivation files (.toml)
and what the command line writes from each: ``symattn derive FILE`` writes NAME.tex, NAME.pdf
and NAME.json, and the cases in COMMANDS use another command (``symattn grad`` for the gradient
walk-through). Every PDF gets PNG previews of its first PREVIEW_PAGES pages, NAME-page1.png and
so on, and derivations/README.md indexes the cases with their previews.

The outputs are reproducible byte for byte, and tests/test_derivations.py regenerates them and
compares. Run this script after a change that alters them, and commit the result:

    python scripts/regenerate_derivations.py            # every case, and the index
    python scripts/regenerate_derivations.py causal     # one case, and the index

The PDFs and previews are written only where pdflatex and pdftoppm (poppler-utils) are installed.
Their bytes depend on the pdfTeX and poppler versions: a PDF records its pdfTeX version in
/Producer and a preview its pdftoppm version in a PNG text chunk, which the test checks before
it compares them.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zlib
from pathlib import Path

from symattn.cli import main
from symattn.export.files import write_files

DERIVATIONS = Path(__file__).resolve().parent.parent / "derivations"
INDEX = DERIVATIONS / "README.md"

# The cases whose outputs come from another command than `symattn derive`: the command and the
# options that follow the file.
COMMANDS: dict[str, tuple[str, ...]] = {
    "gradient": ("grad", "--wrt", "W_Q", "--of", "sum", "--entry", "0,0"),
}
# The index lists these cases first, in this order, and any other case after them by name.
GALLERY_ORDER: tuple[str, ...] = (
    "example", "causal", "padded-batch", "symbolic-one-head", "mixed-symbolic-weight", "gradient",
    "pytorch-compatible",
)
# Index headings of the cases with several derivation files; a case with one takes its title.
CASE_TITLES: dict[str, str] = {
    "padded-batch": "A padded batch: three sequences with 3, 2 and 1 valid tokens",
}
PREVIEW_PAGES = 2
PREVIEW_DPI = 50
PDFTOPPM_TIMEOUT_SECONDS = 120
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def case_folders(names: list[str]) -> list[Path]:
    """Return the folders of the named cases, or of every case when none is named."""
    if not names:
        return sorted(path for path in DERIVATIONS.iterdir() if path.is_dir())
    folders = []
    for name in names:
        folder = DERIVATIONS / name
        if not folder.is_dir():
            raise SystemExit(f"regenerate_derivations: case folder {folder} not found; cases are folders of {DERIVATIONS}")
        folders.append(folder)
    return folders


def case_sources(folder: Path) -> list[Path]:
    """Return the derivation files of a case folder, in name order."""
    sources = sorted(folder.glob("*.toml"))
    if not sources:
        raise SystemExit(f"regenerate_derivations: {folder} contains no .toml file; each case folder contains at least one")
    return sources


def command_line(source: Path | str, out: Path | str, pdf: bool = True) -> list[str]:
    """Return the symattn arguments that write the outputs of ``source`` to ``out``."""
    command, *options = COMMANDS.get(Path(source).parent.name, ("derive",))
    arguments = [command, str(source), *options, "--out", str(out), "--force"]
    if not pdf:
        arguments.append("--no-pdf")
    return arguments


def output_stem(source: Path) -> str:
    """Return the name that the outputs of ``source`` start with, such as "gradient-grad-W_Q"."""
    command, *options = COMMANDS.get(source.parent.name, ("derive",))
    if command == "grad":
        return f"{source.stem}-grad-{options[options.index('--wrt') + 1]}"
    return source.stem


def regenerate_case(folder: Path, out: Path, pdf: bool = True, previews: bool = True) -> int:
    """Write the outputs of the case in ``folder`` to ``out``, with previews of the PDFs.

    Return 0, or the exit status of the first command that failed.
    """
    for source in case_sources(folder):
        status = main(command_line(source, out, pdf))
        if status != 0:
            return status
    if pdf and previews and shutil.which("pdflatex") is not None:
        for document in sorted(out.glob("*.pdf")):
            write_previews(document)
    return 0


def write_previews(document: Path) -> None:
    """Write NAME-page1.png … of the first PREVIEW_PAGES pages of NAME.pdf beside it."""
    pages = render_previews(document.read_bytes())
    files = {document.with_name(f"{document.stem}-page{number}.png"): png for number, png in enumerate(pages, 1)}
    write_files(files, force=True)
    for path, png in files.items():
        print(f"wrote {path} ({len(png):,} bytes)")


def pdftoppm_version() -> str:
    """Return the version of the installed pdftoppm, such as "22.12.0"."""
    banner = subprocess.run(["pdftoppm", "-v"], capture_output=True, text=True, check=True).stderr
    return re.search(r"version (\S+)", banner)[1]


def render_previews(pdf: bytes) -> list[bytes]:
    """Render the first PREVIEW_PAGES pages of a PDF as PNG images at PREVIEW_DPI.

    Each PNG records the pdftoppm version in a "Software" text chunk. pdftoppm writes no date,
    so the same PDF and version give the same bytes.
    """
    if shutil.which("pdftoppm") is None:
        raise SystemExit("regenerate_derivations: pdftoppm not found; install poppler-utils, or pass --no-pdf")
    software = f"pdftoppm {pdftoppm_version()}"
    with tempfile.TemporaryDirectory(prefix="symattn-previews-") as folder:
        (Path(folder) / "document.pdf").write_bytes(pdf)
        command = ["pdftoppm", "-png", "-r", str(PREVIEW_DPI), "-f", "1", "-l", str(PREVIEW_PAGES), "document.pdf", "page"]
        subprocess.run(command, cwd=folder, check=True, capture_output=True, timeout=PDFTOPPM_TIMEOUT_SECONDS)
        # pdftoppm may pad the page numbers with zeros ("page-01.png"), so they sort as numbers.
        pages = sorted(Path(folder).glob("page-*.png"), key=lambda path: int(path.stem.rsplit("-", 1)[1]))
        return [with_text_chunk(page.read_bytes(), "Software", software) for page in pages]


def with_text_chunk(png: bytes, keyword: str, text: str) -> bytes:
    """Return ``png`` with a tEXt chunk ``keyword: text`` placed right after its IHDR chunk."""
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file: the PNG signature is missing")
    header_end = len(PNG_SIGNATURE) + 8 + int.from_bytes(png[8:12], "big") + 4  # length, type, data, CRC
    body = b"tEXt" + keyword.encode("latin-1") + b"\0" + text.encode("latin-1")
    chunk = len(body[4:]).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
    return png[:header_end] + chunk + png[header_end:]


def png_text(png: bytes, keyword: str) -> str | None:
    """Return the text of the first tEXt chunk named ``keyword`` in a PNG, or None."""
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(png):
        length = int.from_bytes(png[position : position + 4], "big")
        kind = png[position + 4 : position + 8]
        data = png[position + 8 : position + 8 + length]
        if kind == b"tEXt":
            name, _, text = data.partition(b"\0")
            if name.decode("latin-1") == keyword:
                return text.decode("latin-1")
        position += 12 + length
    return None


def index_markdown(root: Path = DERIVATIONS) -> str:
    """Return derivations/README.md: one section per case with its sources, outputs and preview."""
    lines = [
        "# Gallery of derivations",
        "",
        "Each folder is one case: the derivation files (`.toml`) and what `symattn` writes from them,",
        "the worked example (`.tex` and `.pdf`), every stage exactly and to 50 digits (`.json`), and",
        f"PNG previews of the first {PREVIEW_PAGES} pages of each PDF. All of it is reproducible byte for byte:",
        "`python scripts/regenerate_derivations.py` rewrites it, this index included, and",
        "`tests/test_derivations.py` checks that nothing differs. This file is generated too.",
        "",
    ]
    folders = [path for path in root.iterdir() if path.is_dir()]
    rank = {name: position for position, name in enumerate(GALLERY_ORDER)}
    for folder in sorted(folders, key=lambda path: (rank.get(path.name, len(rank)), path.name)):
        sources = case_sources(folder)
        level = "##"
        if len(sources) > 1:
            lines += [f"## {CASE_TITLES.get(folder.name, folder.name)}", ""]
            level = "###"
        for source in sources:
            meta = tomllib.loads(source.read_text(encoding="utf-8")).get("meta", {})
            relative = f"{folder.name}/{source.name}"
            command = command_line(f"derivations/{relative}", f"derivations/{folder.name}")[:-1]  # without --force
            stem = output_stem(source)
            outputs = sorted(path.name for path in folder.iterdir() if re.fullmatch(rf"{re.escape(stem)}(-page\d+)?\.\w+", path.name))
            documents = [name for name in outputs if not name.endswith((".png", ".toml"))]
            previews = [name for name in outputs if name.endswith(".png")]
            lines += [f"{level} {meta.get('title', source.stem)}", "", meta.get("description", ""), ""]
            lines.append(f"- Source: [`{relative}`]({relative})")
            lines.append(f"- Command: `symattn {' '.join(command)}`")
            lines.append("- Outputs: " + ", ".join(f"[`{name}`]({folder.name}/{name})" for name in documents))
            lines.append("")
            if previews:
                lines.append(" ".join(f"![{name}]({folder.name}/{name})" for name in previews))
                lines.append("")
    return "\n".join(lines)


def regenerate(names: list[str], pdf: bool = True) -> int:
    """Rewrite the outputs of the named cases (every case when none is named) and the index.

    Return 0, or the exit status of the first command that failed.
    """
    started = time.perf_counter()
    for folder in case_folders(names):
        status = regenerate_case(folder, folder, pdf)
        if status != 0:
            return status
    index = index_markdown()
    write_files({INDEX: index}, force=True)
    print(f"wrote {INDEX} ({len(index.encode('utf-8')):,} bytes)")
    print(f"regenerated the gallery in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Rewrite the gallery in derivations/ and its index.")
    parser.add_argument("cases", nargs="*", help="case folder names (default: every case)")
    parser.add_argument("--no-pdf", action="store_true", help="leave the PDFs and their previews as they are")
    options = parser.parse_args()
    sys.exit(regenerate(options.cases, pdf=not options.no_pdf))
