"""``symattn grad FILE.toml --wrt W_Q``: the exact gradient of an objective with respect to one input.

Prints the gradient compactly and writes ``<name>-grad-<wrt>.tex`` (the gradient worked example
for one entry), ``.pdf`` (when pdflatex is installed) and ``.json`` (the gradient exactly and to
N certified digits), where ``<name>`` is the file's name without ``.toml``.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import sympy as sp

from ..errors import InvalidInputError
from ..export.files import write_files
from ..export.gradient_json import gradient_to_json
from ..export.latex import compile_pdf, pdflatex_path
from ..export.latex_grad import gradient_example
from ..gradients import grad, parse_objective
from ..loaders import load_derivation_file
from ..numeric.balls import certified_decimals
from ..numeric.decimals import check_digits
from . import EXIT_OK, EXIT_VERIFICATION_FAILED
from .derive import add_output_options
from .terminal import progress_bar

# An exact entry longer than this many characters prints as its decimal value instead.
MAX_PRINTED_ENTRY = 40
PRINTED_DIGITS = 12
_ENTRY = re.compile(r"\s*([0-9]+)\s*,\s*([0-9]+)\s*", re.ASCII)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "grad",
        help="the exact gradient of the output (its sum or one entry) with respect to one input or weight",
        description=(
            "Derive the attention in a TOML derivation file and compute the exact gradient of "
            "an objective with respect to one input, weight or bias, in reverse mode through the "
            "stages. Prints the gradient and writes NAME-grad-WRT.tex (a worked example of one "
            "entry's chain), NAME-grad-WRT.pdf (when pdflatex is installed) and NAME-grad-WRT.json."
        ),
    )
    parser.add_argument("file", metavar="FILE.toml", type=Path, help="the derivation file to read")
    parser.add_argument(
        "--wrt", required=True, metavar="NAME",
        help="the input to differentiate with respect to: W_Q, W_K, W_V, b_Q, b_K, b_V, W_O, b_O, "
             "query_source, key_source, value_source, or Q, K, V for a file that gives them directly",
    )
    parser.add_argument(
        "--of", default="sum", metavar="OBJECTIVE",
        help="the objective: 'sum' (the sum of the output, the default) or one output entry such "
             "as 'output[0,1]' (indices from 0)",
    )
    parser.add_argument(
        "--entry", default="0,0", metavar="R,C",
        help="the gradient entry whose chain the worked example shows, row and column from 0 (default: 0,0)",
    )
    add_output_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_digits(args.digits)
    objective = _objective(args.of)
    entry = _entry(args.entry)
    started = time.perf_counter()
    derivation, meta = load_derivation_file(args.file)
    print(f"derived {args.file} in {time.perf_counter() - started:.1f} s")
    if args.wrt not in derivation.inputs:
        raise InvalidInputError(
            f"--wrt {args.wrt!r} is not an input of {args.file.name}; its inputs are "
            f"{', '.join(derivation.inputs)}"
        )
    rows, cols = derivation.inputs[args.wrt].shape
    if entry[0] >= rows or entry[1] >= cols:
        raise InvalidInputError(
            f"--entry {args.entry!r} is outside {args.wrt}, which has shape ({rows}, {cols}); "
            f"rows and columns count from 0"
        )

    gradient = grad(derivation, objective, args.wrt)
    print(f"gradient of {args.of} with respect to {args.wrt}, shape {gradient.shape}:")
    print(_compact(gradient))

    name = f"{args.file.stem}-grad-{args.wrt}"
    tex = gradient_example(derivation, objective, args.wrt, entry, meta, args.digits)
    files: dict[Path, bytes | str] = {args.out / f"{name}.tex": tex}
    build_hint = None
    if not args.no_pdf:
        if pdflatex_path() is None:
            build_hint = (
                "pdflatex was not found, so no PDF was built. Install TeX Live (Debian: "
                "texlive-latex-extra texlive-fonts-recommended) and build it by hand with\n"
                f"  cd {shlex.quote(str(args.out))} && pdflatex -no-shell-escape {shlex.quote(name + '.tex')}"
            )
        else:
            with progress_bar() as progress:
                files[args.out / f"{name}.pdf"] = compile_pdf(tex, progress=progress, build_folder=args.out)
    files[args.out / f"{name}.json"] = gradient_to_json(derivation, objective, args.wrt, args.digits)

    write_files(files, args.force)
    for path, data in files.items():
        print(f"wrote {path} ({len(data.encode('utf-8') if isinstance(data, str) else data):,} bytes)")
    if build_hint:
        print(build_hint)
    print(f"done in {time.perf_counter() - started:.1f} s")
    return EXIT_OK


def verify_gradients(args: argparse.Namespace, case: object, started: float) -> int:
    """Run ``symattn verify CASE --grad``: PyTorch autograd on the case against the exact gradients.

    Prints the report (a table, or JSON with --json) and returns 0 when every gradient is
    within tolerance and 1 otherwise.
    """
    from ..verify import Tolerance
    from ..verify.autograd import compare_problem_gradients

    check_digits(args.digits)
    tolerance = None
    if args.ulps is not None or args.rtol is not None or args.atol is not None:
        tolerance = Tolerance(ulps=args.ulps, rtol=args.rtol, atol=args.atol)
    report = compare_problem_gradients(case.problem, digits=args.digits, tolerance=tolerance)
    sys.stdout.write(json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n" if args.json else report.to_table())
    form = "JSON" if args.json else "a table"
    print(
        f"symattn: verified the gradients of {args.case} in {time.perf_counter() - started:.2f} s; wrote the "
        f"report as {form} to stdout and no files",
        file=sys.stderr,
    )
    return EXIT_OK if report.passed else EXIT_VERIFICATION_FAILED


def _objective(text: str) -> str | tuple[str, int, int]:
    objective = parse_objective(text)
    if objective != "sum" and objective[0] != "output":
        raise InvalidInputError(
            f"--of {text!r} reads stage {objective[0]!r}; the command takes 'sum' or an output "
            f"entry such as 'output[0,1]' (use Derivation.grad in Python for other stages)"
        )
    return objective


def _entry(text: str) -> tuple[int, int]:
    match = _ENTRY.fullmatch(text)
    if match is None:
        raise InvalidInputError(f"--entry {text!r} is not valid; expected a row and a column from 0, such as '0,1'")
    return int(match.group(1)), int(match.group(2))


def _compact(gradient: sp.MatrixBase) -> str:
    """Format the gradient one row per line: short exact entries as they are, others as decimals."""
    numbers = None if gradient.free_symbols else certified_decimals(gradient, PRINTED_DIGITS)
    lines = []
    for i in range(gradient.rows):
        cells = []
        for j in range(gradient.cols):
            exact = sp.sstr(gradient[i, j])
            if len(exact) <= MAX_PRINTED_ENTRY:
                cells.append(exact)
            elif numbers is None:
                cells.append(exact[: MAX_PRINTED_ENTRY - 1] + "…")
            elif numbers.decimals[i][j] == "0" and (i, j) not in numbers.bounded_zeros:
                cells.append("0")  # proven zero after cancellation
            else:
                cells.append(f"≈{numbers.decimals[i][j]}")
        lines.append("  [" + ", ".join(cells) + "]")
    if numbers is None and any("…" in line for line in lines):
        lines.append("  (long symbolic entries are cut here; the .json file holds them whole)")
    return "\n".join(lines)
