"""``symattn grad FILE.toml --wrt W_Q``: the exact gradient of an objective with respect to one input.

Prints the gradient compactly and writes ``<name>-grad-<wrt>.tex`` (the gradient worked example
for one entry), ``.pdf`` (when pdflatex is installed) and ``.json`` (the gradient exactly and to
N certified digits), where ``<name>`` is the file's name without ``.toml``. For a source it prints
the roles the gradient covers. A gradient summed over several roles gets no worked example,
because the example follows one role's chain.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import sympy as sp

from ..derive import Derivation
from ..errors import InvalidInputError, UnsupportedError
from ..export.gradient_json import gradient_to_json
from ..export.latex_grad import gradient_example
from ..gradients import ROLE_NAMES, grad, parse_objective, source_roles
from ..loaders import load_derivation_file
from ..numeric.balls import certified_decimals
from . import EXIT_OK
from .derive import add_output_options, add_pdf, write_and_report

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
            "entry's chain), NAME-grad-WRT.pdf (when pdflatex is installed) and NAME-grad-WRT.json. "
            "A source's gradient sums every role the source fills (self attention: query, key "
            "and value); the command prints which, and writes no worked example for a sum of "
            "several roles."
        ),
    )
    parser.add_argument("file", metavar="FILE.toml", type=Path, help="the derivation file to read")
    parser.add_argument(
        "--wrt", required=True, metavar="NAME",
        help="the input to differentiate with respect to: W_Q, W_K, W_V, b_Q, b_K, b_V, W_O, b_O; "
             "a source, which gets the total over every role it fills: query_source, key_source, "
             "value_source, kv_source (key and value given once as kv_source, or self attention) "
             "or source (self attention: query, key and value); one role only: query_role, "
             "key_role, value_role; or Q, K, V for a file that gives them directly",
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
    objective = _objective(args.of)
    entry = _entry(args.entry)
    started = time.perf_counter()
    derivation, meta = load_derivation_file(args.file)
    print(f"derived {args.file} in {time.perf_counter() - started:.1f} s")
    roles = source_roles(derivation, args.wrt)
    if not roles and args.wrt not in derivation.inputs:
        raise InvalidInputError(
            f"--wrt {args.wrt!r} is not an input of {args.file.name}; its inputs are "
            f"{', '.join(derivation.inputs)}"
            + ("" if derivation.direct else f", and the role names {', '.join(ROLE_NAMES)}")
        )
    rows, cols = derivation.inputs[roles[0] if roles else args.wrt].shape
    if entry[0] >= rows or entry[1] >= cols:
        raise InvalidInputError(
            f"--entry {args.entry!r} is outside {args.wrt}, which has shape ({rows}, {cols}); "
            f"rows and columns count from 0"
        )

    gradient = grad(derivation, objective, args.wrt)
    print(f"gradient of {args.of} with respect to {args.wrt}, shape {gradient.shape}:")
    if roles:
        print(f"  covers {_roles_text(derivation, roles)}")
    print(_compact(gradient))

    name = f"{args.file.stem}-grad-{args.wrt}"
    files: dict[Path, bytes | str] = {}
    build_hint = None
    if len(roles) > 1:
        build_hint = (
            f"no worked example was written: it follows one role's chain, and this gradient sums "
            f"{len(roles)} roles; run "
            + " or ".join(f"--wrt {_role_name(role)}" for role in roles)
            + " for one role's worked example"
        )
    else:
        wrt_input = roles[0] if roles else args.wrt
        tex = gradient_example(derivation, objective, wrt_input, entry, meta, args.digits)
        files[args.out / f"{name}.tex"] = tex
        build_hint = add_pdf(files, tex, name, args)
    files[args.out / f"{name}.json"] = gradient_to_json(derivation, objective, args.wrt, args.digits)
    write_and_report(files, args.force, build_hint)
    print(f"done in {time.perf_counter() - started:.1f} s")
    return EXIT_OK


def verify_gradients(args: argparse.Namespace, case: object, started: float) -> int:
    """Run ``symattn verify CASE --grad``: PyTorch autograd on the case against the exact gradients.

    Prints the report (a table, or JSON with --json) and returns 0 when every gradient is
    within tolerance and 1 otherwise.
    """
    from .verify import tolerance_option, write_report

    try:
        from ..verify.autograd import compare_problem_gradients
    except ModuleNotFoundError as error:
        if error.name != "torch":
            raise
        raise UnsupportedError(
            "verify --grad compares with PyTorch's autograd, and PyTorch is not installed; install it "
            "with pip install torch==2.13.0 (add --index-url https://download.pytorch.org/whl/cpu for "
            "the CPU build), or run symattn grad for the exact gradients alone"
        ) from None

    report = compare_problem_gradients(case.problem, digits=args.digits, tolerance=tolerance_option(args))
    text = json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n" if args.json else report.to_table()
    return write_report(args, text, f"the gradients of {args.case}", started, report.passed)


def _objective(text: str) -> str | tuple[str, int, int]:
    objective = parse_objective(text)
    if objective != "sum" and objective[0] != "output":
        raise InvalidInputError(
            f"--of {text!r} reads stage {objective[0]!r}; the command takes 'sum' or an output "
            f"entry such as 'output[0,1]' (use Derivation.grad in Python for other stages)"
        )
    return objective


def _role_name(role: str) -> str:
    return next(name for name, input_name in ROLE_NAMES.items() if input_name == role)


def _roles_text(derivation: Derivation, roles: tuple[str, ...]) -> str:
    """Describe the roles a source gradient covers, such as "the query, key and value roles (...)"."""
    words = [role.removesuffix("_source") for role in roles]
    listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    shared = len(derivation.tied_sources)
    if len(roles) == shared:
        given = "self attention: one source in all three roles" if shared == 3 else "one kv_source in both roles"
    elif len(roles) == 2:
        given = "of the self-attention source, without its query role"
    elif shared and roles[0] in derivation.tied_sources:
        given = f"one of the {shared} roles of a shared source; the others are not included"
    else:
        given = "a source of its own"
    plural = "role" if len(roles) == 1 else "roles"
    return f"the {listed} {plural} ({given})"


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
