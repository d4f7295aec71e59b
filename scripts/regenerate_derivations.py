"""Rewrite the generated outputs in derivations/ from their .toml files.

Each folder derivations/<case>/ contains <case>.toml and the <case>.tex, <case>.pdf and
<case>.json that ``symattn derive`` writes from it. The outputs are reproducible byte for
byte, and tests/test_derivations.py regenerates them and compares. Run this script after a
change that alters them, and commit the result:

    python scripts/regenerate_derivations.py            # every case
    python scripts/regenerate_derivations.py causal     # one case

The PDFs are written only where pdflatex is installed; their bytes depend on the pdfTeX
version, which the test checks before it compares them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from symattn.cli import main

DERIVATIONS = Path(__file__).resolve().parent.parent / "derivations"


def derivation_files(names: list[str]) -> list[Path]:
    """Return derivations/<case>/<case>.toml for the named cases, or for every case."""
    folders = [DERIVATIONS / name for name in names] if names else sorted(DERIVATIONS.iterdir())
    files = []
    for folder in folders:
        path = folder / f"{folder.name}.toml"
        if not path.is_file():
            raise SystemExit(f"regenerate_derivations: {path} not found; each case folder contains <case>.toml")
        files.append(path)
    return files


def regenerate(names: list[str], pdf: bool = True) -> int:
    """Rewrite the outputs of the named cases (every case when none is named) and return 0 or the first failing exit status."""
    for path in derivation_files(names):
        arguments = ["derive", str(path), "--out", str(path.parent), "--force"]
        if not pdf:
            arguments.append("--no-pdf")
        status = main(arguments)
        if status != 0:
            return status
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Rewrite the generated outputs in derivations/.")
    parser.add_argument("cases", nargs="*", help="case folder names (default: every case)")
    parser.add_argument("--no-pdf", action="store_true", help="leave the PDFs as they are")
    options = parser.parse_args()
    sys.exit(regenerate(options.cases, pdf=not options.no_pdf))
