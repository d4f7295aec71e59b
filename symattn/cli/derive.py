"""``symattn derive FILE.toml``: derive a derivation file and write its worked example and numbers.

The outputs are ``<name>.tex`` (the worked example), ``<name>.pdf`` (when pdflatex is
installed) and ``<name>.json`` (every stage exactly and to N digits), where ``<name>`` is the
file's name without ``.toml``. The ``example`` command writes the same outputs for the
built-in example through ``write_outputs``.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from ..derive import Derivation
from ..errors import InvalidInputError
from ..export.files import write_files
from ..export.latex import compile_pdf, pdflatex_path, worked_example
from ..export.numbers import derivation_to_json
from ..loaders import DerivationMeta, load_derivation_file
from ..numeric.decimals import DEFAULT_DIGITS
from . import EXIT_OK
from .terminal import progress_bar


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "derive",
        help="derive a .toml derivation file; write its worked example (.tex, .pdf) and numbers (.json)",
        description=(
            "Derive the attention described by a TOML derivation file exactly, and write "
            "NAME.tex (worked example), NAME.pdf (when pdflatex is installed) and NAME.json "
            "(every stage exactly and to N significant digits), NAME being the file name "
            "without .toml."
        ),
    )
    parser.add_argument("file", metavar="FILE.toml", type=Path, help="the derivation file to read")
    add_output_options(parser)
    parser.set_defaults(run=run)


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """Add the options shared by the commands that write a worked example."""
    parser.add_argument(
        "--out", metavar="DIR", type=Path, default=Path("."),
        help="folder to write the outputs to, created when missing (default: the current folder)",
    )
    parser.add_argument(
        "--digits", metavar="N", type=int, default=DEFAULT_DIGITS,
        help=f"significant digits of the decimals in the JSON file (default: {DEFAULT_DIGITS})",
    )
    parser.add_argument("--no-pdf", action="store_true", help="write the .tex and .json files only")
    parser.add_argument(
        "--force", action="store_true", help="overwrite output files that exist with other content"
    )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    derivation, meta = load_derivation_file(args.file)
    print(f"derived {args.file} in {time.perf_counter() - started:.1f} s")
    return write_outputs(derivation, meta, args.file.stem, args, started)


def write_outputs(
    derivation: Derivation, meta: DerivationMeta, name: str, args: argparse.Namespace, started: float
) -> int:
    """Write NAME.tex, NAME.pdf and NAME.json to ``args.out``, all or none, and report them.

    Every output is produced in memory first and the group is checked for conflicts before
    any file is written, so a failure leaves the folder as it was.
    """
    if args.out.exists() and not args.out.is_dir():
        raise InvalidInputError(f"--out {str(args.out)!r} is a file, not a folder; give a folder to write the outputs to")
    created_folder = not args.out.exists()
    try:
        return _write_outputs(derivation, meta, name, args, started)
    except BaseException:
        # A failed run leaves no trace, not even the empty folder it created.
        if created_folder and args.out.is_dir() and not any(args.out.iterdir()):
            args.out.rmdir()
        raise


def _write_outputs(
    derivation: Derivation, meta: DerivationMeta, name: str, args: argparse.Namespace, started: float
) -> int:
    tex = worked_example(derivation, meta, args.digits)
    files: dict[Path, bytes | str] = {args.out / f"{name}.tex": tex}
    build_hint = add_pdf(files, tex, name, args)
    files[args.out / f"{name}.json"] = derivation_to_json(derivation, args.digits)
    write_and_report(files, args.force, build_hint)
    print(f"done in {time.perf_counter() - started:.1f} s")
    return EXIT_OK


def add_pdf(files: dict[Path, bytes | str], tex: str, name: str, args: argparse.Namespace) -> str | None:
    """Compile ``tex`` into NAME.pdf in ``files`` unless --no-pdf was given.

    Returns how to build the PDF by hand when pdflatex is missing, and None otherwise.
    """
    if args.no_pdf:
        return None
    if pdflatex_path() is None:
        return (
            "pdflatex was not found, so no PDF was built. Install TeX Live (Debian: "
            "texlive-latex-extra texlive-fonts-recommended) and build it by hand with\n"
            f"  cd {shlex.quote(str(args.out))} && pdflatex -no-shell-escape {shlex.quote(name + '.tex')}"
        )
    with progress_bar() as progress:
        files[args.out / f"{name}.pdf"] = compile_pdf(tex, progress=progress, build_folder=args.out)
    return None


def write_and_report(files: dict[Path, bytes | str], force: bool, hint: str | None) -> None:
    """Write the group of files all or none, then print each path and size, and the hint if any."""
    write_files(files, force)
    for path, data in files.items():
        print(f"wrote {path} ({len(data.encode('utf-8') if isinstance(data, str) else data):,} bytes)")
    if hint:
        print(hint)
