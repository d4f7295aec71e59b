"""``symattn verify CASE``: compare an implementation's outputs in a case file with the reference."""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import InvalidInputError
from ..numeric.reference import ENGINES
from . import EXIT_OK, EXIT_VERIFICATION_FAILED
from .terminal import progress_bar


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="verify an implementation's output against the certified reference",
        description=(
            "Compare the implementation's output in CASE (and its attention weights and per-head "
            "outputs, where CASE has them) with the certified reference. Prints a table, or JSON "
            "with --json. Exits with 0 when every entry is within tolerance, 1 when some are not, "
            "and 2 on invalid input. Without a tolerance, torch.testing's default rtol and atol "
            "for the dtype apply."
        ),
    )
    parser.add_argument("case", metavar="CASE", help="the case: an .npz archive or a .toml file (see docs/case-format.md)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--ulps", type=float, metavar="N", help="tolerance in ULPs of the implementation's dtype")
    parser.add_argument("--rtol", type=float, metavar="R", help="relative tolerance: |a − r| ≤ atol + rtol·|r|")
    parser.add_argument("--atol", type=float, metavar="A", help="absolute tolerance: |a − r| ≤ atol + rtol·|r|")
    parser.add_argument("--digits", type=int, default=50, metavar="N",
                        help="significant digits of the reference (default: 50)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="reference engine (default: auto, python-flint when installed, else mpmath)")
    # Gradients: symattn.cli.grad.verify_gradients runs the check.
    parser.add_argument("--grad", action="store_true",
                        help="instead of the stored output, run PyTorch autograd on CASE's inputs in "
                             "float64 and float32 and compare its gradients of the output's sum "
                             "with the exact gradients")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..verify import load_case, verify

    started = time.perf_counter()
    case = load_case(args.case)
    if args.grad:
        from .grad import verify_gradients

        return verify_gradients(args, case, started)
    if case.output is None:
        raise InvalidInputError(
            f"case {args.case!r} has no 'output' array, so there is nothing to verify; add the "
            f"implementation's output, or export references with `symattn reference`"
        )
    with progress_bar() as progress:
        report = verify(
            case.problem,
            case.output,
            weights=case.attention_weights,
            average_weights=case.average_weights,
            head_outputs=case.head_outputs,
            dtype=case.dtype,
            tolerance=tolerance_option(args),
            digits=args.digits,
            engine=args.engine,
            progress=progress,
        )
    return write_report(args, report.to_json() if args.json else report.to_table(), args.case, started, report.passed)


def tolerance_option(args: argparse.Namespace):
    """Return the Tolerance that --ulps, --rtol and --atol give, or None for the default."""
    from ..verify import Tolerance

    if args.ulps is None and args.rtol is None and args.atol is None:
        return None
    return Tolerance(ulps=args.ulps, rtol=args.rtol, atol=args.atol)


def write_report(args: argparse.Namespace, text: str, subject: str, started: float, passed: bool) -> int:
    """Write a verification report to stdout and a one-line summary to stderr, and return the exit code."""
    sys.stdout.write(text)
    form = "JSON" if args.json else "a table"
    print(
        f"symattn: verified {subject} in {time.perf_counter() - started:.2f} s; wrote the report as {form} "
        f"to stdout and no files",
        file=sys.stderr,
    )
    return EXIT_OK if passed else EXIT_VERIFICATION_FAILED
