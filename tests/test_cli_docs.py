"""docs/cli.md is generated from the command-line parser and matches it."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from symattn.cli import COMMAND_MODULES, build_parser

REPOSITORY = Path(__file__).resolve().parent.parent
SCRIPT = REPOSITORY / "scripts" / "generate_cli_docs.py"
REFERENCE = REPOSITORY / "docs" / "cli.md"


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_cli_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = load_generator()


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_cli_reference_is_up_to_date():
    assert generator.cli_reference() == REFERENCE.read_text(encoding="utf-8"), (
        "docs/cli.md is out of date; run python scripts/generate_cli_docs.py"
    )


def test_cli_reference_has_every_command():
    text = REFERENCE.read_text(encoding="utf-8")
    for name in COMMAND_MODULES:
        assert f"\n## symattn {name}\n" in text


def test_cli_reference_has_every_option():
    text = REFERENCE.read_text(encoding="utf-8")
    for name, parser in subcommands().items():
        section = text.split(f"\n## symattn {name}\n")[1].split("\n## ")[0]
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in section, f"{flag} of symattn {name} is missing from docs/cli.md"


def test_cli_reference_states_defaults():
    text = REFERENCE.read_text(encoding="utf-8")
    assert "| `--digits N` | Significant digits of the decimals in the JSON file (default: 50). |" in text
    assert "Choices: `auto`, `flint`, `mpmath`, `sympy`." in text


def test_check_mode_passes_when_current(capsys):
    assert generator.main(["--check"]) == 0
    assert "is up to date" in capsys.readouterr().out


def test_usage_width_is_fixed(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    narrow = generator.cli_reference()
    monkeypatch.setenv("COLUMNS", "200")
    assert generator.cli_reference() == narrow
