"""Write docs/cli.md, the command-line reference, from the parser that `symattn` itself uses.

    python scripts/generate_cli_docs.py           # rewrite docs/cli.md
    python scripts/generate_cli_docs.py --check   # exit with 1 when docs/cli.md is out of date

Every subcommand, option, default and help text comes from ``symattn.cli.build_parser``, so the
page changes when an option does; tests/test_cli_docs.py regenerates it and compares.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from symattn.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, EXIT_VERIFICATION_FAILED, build_parser
from symattn.export.files import write_files

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
# Usage lines are wrapped at this width whatever the terminal, so the page is the same everywhere.
USAGE_WIDTH = 88


def cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """Return the Markdown reference of every subcommand of ``parser`` (symattn's by default)."""
    parser = parser or build_parser()
    lines = [
        "# Command-line reference",
        "",
        "This page is generated from the parser of the `symattn` command by",
        "`scripts/generate_cli_docs.py`, and a test checks that it is up to date. Run",
        "`python scripts/generate_cli_docs.py` after changing an option.",
        "",
        _usage_block(parser),
        "",
    ]
    lines += _options_table(parser)
    lines += [
        "",
        "Every command ends by printing what it wrote, where, and how long it took. On a terminal,",
        "long steps (a LaTeX build, certified references) show a progress bar on stderr; when stderr",
        "is not a terminal, nothing but the report is printed.",
        "",
        "Exit statuses:",
        "",
        f"- {EXIT_OK}: success;",
        f"- {EXIT_VERIFICATION_FAILED}: a verification found values outside the tolerance;",
        f"- {EXIT_USAGE}: a usage error or invalid input;",
        f"- {EXIT_ERROR}: any other error, such as an output file conflict or a failed LaTeX build;",
        "- 130: interrupted.",
        "",
    ]
    for name, subparser in _subcommands(parser).items():
        lines += [f"## symattn {name}", ""]
        if subparser.description:
            lines += [subparser.description, ""]
        lines += [_usage_block(subparser), ""]
        lines += _arguments_table(subparser)
        lines += _options_table(subparser)
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _usage_block(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return "```text\n" + formatter.format_help().strip("\n") + "\n```"


def _arguments_table(parser: argparse.ArgumentParser) -> list[str]:
    actions = [action for action in parser._actions if not action.option_strings and not isinstance(action, argparse._SubParsersAction)]
    if not actions:
        return []
    rows = ["| argument | meaning |", "| --- | --- |"]
    for action in actions:
        rows.append(f"| `{action.metavar or action.dest}` | {_help(parser, action)} |")
    return rows + [""]


def _options_table(parser: argparse.ArgumentParser) -> list[str]:
    actions = [action for action in parser._actions if action.option_strings and not isinstance(action, argparse._HelpAction)]
    if not actions:
        return []
    rows = ["| option | meaning |", "| --- | --- |"]
    for action in actions:
        flags = ", ".join(action.option_strings)
        if action.nargs != 0:
            flags += f" {action.metavar or action.dest.upper()}"
        meaning = _help(parser, action)
        if action.choices is not None:
            meaning += " Choices: " + ", ".join(f"`{choice}`" for choice in action.choices) + "."
        if action.required:
            meaning += " Required."
        rows.append(f"| `{flags}` | {meaning} |")
    return rows


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = argparse.HelpFormatter(parser.prog)._expand_help(action) if action.help else ""
    text = text.replace("|", "\\|")
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") or not text else ".")


def main(arguments: list[str] | None = None) -> int:
    options = argparse.ArgumentParser(description="Write docs/cli.md from the symattn parser.")
    options.add_argument("--check", action="store_true", help="exit with 1 when docs/cli.md is out of date, writing nothing")
    check = options.parse_args(arguments).check
    reference = cli_reference()
    if check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != reference:
            print(f"{OUTPUT} is out of date; run python scripts/generate_cli_docs.py", file=sys.stderr)
            return 1
        print(f"{OUTPUT} is up to date")
        return 0
    write_files({OUTPUT: reference}, force=True)
    print(f"wrote {OUTPUT} ({len(reference.encode('utf-8')):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
