"""The ``symattn`` command line: parse, call the API, report.

Each subcommand lives in its own module with two functions: ``add_parser(subparsers)`` registers
its options and ``run(args) -> int`` does the work and returns the exit status.

Exit statuses: 0 success, 1 a verification found values outside tolerance, 2 a usage error or
invalid input, 3 any other error (an output file conflict, a failed LaTeX build).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
import warnings
from typing import Any

from .. import __version__
from ..errors import InvalidInputError, SymattnError, SymattnWarning
from ..numeric.decimals import check_digits

EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_USAGE = 2
EXIT_ERROR = 3

# Subcommand modules in the order `symattn --help` lists them.
COMMAND_MODULES: tuple[str, ...] = ("example", "derive", "verify", "reference", "grad")


def _ascii_number(convert: type) -> Any:
    def parse(text: str) -> Any:
        if not text.isascii():  # int() and float() also read look-alike digits such as "٣"
            raise ValueError(text)
        return convert(text)

    parse.__name__ = convert.__name__  # argparse names the type in "invalid int value: ..."
    return parse


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviations: "--digit 20" is an error, not a quiet "--digits 20".
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        # Options declared with type=int or type=float accept ASCII text only.
        self.register("type", int, _ascii_number(int))
        self.register("type", float, _ascii_number(float))

    def error(self, message: str) -> None:  # argparse's own usage errors also exit with 2
        self.print_usage(sys.stderr)
        if message.startswith("unrecognized arguments:") and "--debug" in message.split():
            message += "; --debug goes before the command, as in symattn --debug derive FILE"
        self.exit(EXIT_USAGE, f"symattn: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the full argument parser; the CLI reference in docs/ is generated from it."""
    parser = _Parser(
        prog="symattn",
        description="Derive multi-head (cross) attention exactly, stage by stage.",
    )
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    parser.add_argument("--version", action="version", version=f"symattn {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").add_parser(subparsers)
    return parser


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Print a warning as one line, without the source location that Python's default adds."""
    if not issubclass(category, SymattnWarning):
        _default_showwarning(message, category, filename, lineno, file, line)
        return
    print(f"symattn: warning: {message}", file=sys.stderr)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # --digits is checked here for every command, before anything is loaded or computed.
        if getattr(args, "digits", None) is not None:
            check_digits(args.digits, "--digits")
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.run(args)
    except KeyboardInterrupt:
        print("symattn: interrupted; outputs written before now are intact", file=sys.stderr)
        return 130
    except SymattnError as error:
        if args.debug:
            traceback.print_exc()
        print(f"symattn: error: {error}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, InvalidInputError) else EXIT_ERROR
    except OSError as error:  # a file or folder that no command check caught
        if args.debug:
            traceback.print_exc()
        where = f" ({error.filename})" if error.filename else ""
        print(f"symattn: error: {error.strerror or error}{where}; check the path and its permissions", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # a bug in symattn: the traceback is shown with --debug only
        if args.debug:
            traceback.print_exc()
        print(
            f"symattn: internal error: {type(error).__name__}: {error}. This is a bug in symattn; "
            f"run the command again with --debug and report the traceback",
            file=sys.stderr,
        )
        return EXIT_ERROR


def entry_point() -> None:
    sys.exit(main())
