"""``symattn reference CASE --out FILE``: export the certified reference of a case file."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import InvalidInputError
from ..numeric.reference import ENGINES
from ..progress import Stopwatch
from . import EXIT_OK
from .terminal import progress_bar

DTYPE_CHOICES = ("float64", "float32", "float16", "bfloat16")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reference",
        help="export the certified reference of a case as .npz, .npy or .json",
        description=(
            "Compute the certified reference of every stage of CASE and write it to FILE: an .npz "
            "archive or a JSON document (the inputs, the spec, every stage correctly rounded to "
            "the chosen dtypes, with error radii, and decimals in JSON), or an .npy file (one "
            "stage in one dtype). An existing FILE with other content is replaced only with --force."
        ),
    )
    parser.add_argument("case", metavar="CASE", help="the case: an .npz archive or a .toml file (see docs/case-format.md)")
    parser.add_argument("--out", required=True, type=Path, metavar="FILE",
                        help="the file to write; its suffix (.npz, .npy or .json) sets the format")
    parser.add_argument("--digits", type=int, default=50, metavar="N",
                        help="significant digits of the reference (default: 50)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES,
                        help="round to this dtype only (default: every dtype for .npz and .json; for "
                             ".npy the case's dtype, else float64)")
    parser.add_argument("--stage", metavar="NAME",
                        help="the stage that an .npy file contains, such as output, A_0 or O_1 (default: output); "
                             ".npz and .json files contain every stage")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="reference engine (default: auto, python-flint when installed, else mpmath)")
    parser.add_argument("--force", action="store_true", help="replace FILE if it exists with other content")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..export.arrays import DTYPES, write_reference
    from ..numeric.reference import compute_reference
    from ..verify import load_case

    started = time.perf_counter()
    npy = args.out.suffix.lower() == ".npy"
    if args.stage is not None and not npy:
        raise InvalidInputError(
            f"--stage applies to .npy files only, and {str(args.out)!r} gets every stage; drop --stage, "
            f"or write a .npy file to get one stage"
        )
    stage = args.stage or "output"
    case = load_case(args.case)
    if npy:
        dtypes: tuple[str, ...] = (args.dtype or case.dtype or "float64",)
    else:
        dtypes = (args.dtype,) if args.dtype else DTYPES
    with progress_bar() as progress, Stopwatch(progress, "certified reference"):
        reference = compute_reference(case.problem, args.digits, engine=args.engine)
    if stage not in reference.stages:
        raise InvalidInputError(
            f"--stage {stage!r} is not a stage of this case; stages are {', '.join(reference.stages)}"
        )
    path = write_reference(reference, args.out, dtypes=dtypes, stage=stage, force=args.force)
    elapsed = time.perf_counter() - started
    print(
        f"symattn: wrote {path} ({', '.join(dtypes)}; {reference.digits} digits, engine "
        f"{reference.engine}) in {elapsed:.2f} s",
        file=sys.stderr,
    )
    return EXIT_OK
