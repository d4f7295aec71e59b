"""``symattn example``: write the worked example and numbers of the built-in example.

Three image patches attend to two word embeddings with two heads (see symattn.examples); the
outputs are example.tex, example.pdf (when pdflatex is installed) and example.json.
"""

from __future__ import annotations

import argparse
import time

from ..examples import EXAMPLE_NAME, example_derivation
from .derive import add_output_options, write_outputs


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "example",
        help="write the built-in example: image patches attend to words with two heads",
        description=(
            "Derive the built-in example (three image patches attend to two word embeddings "
            "with two heads) and write example.tex, example.pdf (when pdflatex is installed) "
            "and example.json."
        ),
    )
    add_output_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    derivation, meta = example_derivation()
    print(f"derived the built-in example in {time.perf_counter() - started:.1f} s")
    return write_outputs(derivation, meta, EXAMPLE_NAME, args, started)
