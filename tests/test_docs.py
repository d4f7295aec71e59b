"""Every code block in docs/ runs, so the guides cannot go stale.

Each Markdown file of docs/ runs in its own temporary folder, which links to the repository's
derivations/, docs/, examples/ and scripts/, so a block can read derivations/causal/causal.toml.
Blocks run in the order of the file:

- ``python`` blocks run in one namespace per file and must not raise;
- ``pycon`` blocks are doctests whose printed values must match, in the same namespace;
- ``console`` blocks run each ``$ `` line with bash and compare the lines below it with the
  command's output (stdout and stderr) as doctest does with ELLIPSIS: ``...`` matches any
  text, across lines too. Durations ("0.4 s") and byte counts ("(7,824 bytes)") match any
  value. A command must exit with 0, or with the status that a ``<!-- exit: N -->`` comment
  before the block names;
- ``bash`` and ``sh`` blocks run as one bash script that must exit with 0.

An HTML comment on the line before a block changes how it runs:

- ``<!-- no-run: reason -->`` skips it; the reason is required;
- ``<!-- file: NAME -->`` writes its text to NAME in the folder instead of running it;
- ``<!-- requires: pdflatex -->`` skips the file's test when pdflatex is missing (it fails
  instead when SYMATTN_REQUIRE_PDFLATEX=1).

Blocks in other languages (toml, text, none) are text for the reader and do not run.
"""

from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
DOCS = REPOSITORY / "docs"
LINKED_FOLDERS = ("derivations", "docs", "examples", "scripts")
RUN_LANGUAGES = ("python", "pycon", "console", "bash", "sh")
COMMAND_TIMEOUT_SECONDS = 300

_FENCE = re.compile(r"^```(?P<language>[\w-]*)\s*$")
_MARKER = re.compile(r"^<!--\s*(?P<kind>no-run|file|requires|exit):\s*(?P<value>.*?)\s*-->\s*$")
_DURATION = re.compile(r"\b\d+(\.\d+)? s\b")
_BYTES = re.compile(r"\([\d,]+ bytes\)")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file, with the markers of the line before it."""

    path: Path
    line: int
    language: str
    text: str
    markers: dict[str, str]

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPOSITORY)}:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    """Return the fenced code blocks of a Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        start = index
        index += 1
        body = []
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index])
            index += 1
        markers = {}
        before = start - 1
        while before >= 0 and (marker := _MARKER.match(lines[before])):
            markers[marker["kind"]] = marker["value"]
            before -= 1
        blocks.append(Block(path, start + 1, fence["language"], "\n".join(body) + "\n", markers))
        index += 1
    return blocks


def documents() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def prepare_folder(folder: Path) -> dict[str, str]:
    """Link the repository folders into ``folder`` and return the environment for commands."""
    for name in LINKED_FOLDERS:
        if (REPOSITORY / name).exists():
            (folder / name).symlink_to(REPOSITORY / name)
    bin_folder = folder / ".bin"
    bin_folder.mkdir()
    # `symattn` and `python` in a shell block mean this checkout and this interpreter.
    for name, command in (("symattn", f'exec "{sys.executable}" -m symattn "$@"'), ("python", f'exec "{sys.executable}" "$@"')):
        script = bin_folder / name
        script.write_text(f"#!/bin/sh\n{command}\n", encoding="utf-8")
        script.chmod(0o755)
    environment = dict(os.environ)
    environment["PATH"] = f"{bin_folder}{os.pathsep}{environment.get('PATH', '')}"
    environment["PYTHONPATH"] = f"{REPOSITORY}{os.pathsep}{environment.get('PYTHONPATH', '')}"
    environment["COLUMNS"] = "100"
    return environment


def normalise(text: str) -> str:
    """Return ``text`` with durations and byte counts replaced by placeholders and lines right-stripped."""
    text = _BYTES.sub("(<bytes>)", _DURATION.sub("<duration> s", text))
    return "\n".join(line.rstrip() for line in text.rstrip("\n").splitlines()) + "\n"


def output_matches(expected: str, actual: str) -> bool:
    """Tell whether ``actual`` matches ``expected``, where "..." matches any text."""
    return doctest.OutputChecker().check_output(normalise(expected), normalise(actual), doctest.ELLIPSIS)


def console_commands(block: Block) -> list[tuple[str, list[str]]]:
    """Split a console block into (command, expected output lines) pairs."""
    commands: list[tuple[str, list[str]]] = []
    lines = block.text.rstrip("\n").splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line.startswith("$ "):
            raise AssertionError(f"{block.where}: console line {line!r} is neither a command ($ ...) nor its output")
        command = line[2:]
        while command.endswith("\\") and index + 1 < len(lines):
            index += 1
            command = command[:-1] + " " + lines[index].strip()
        index += 1
        expected = []
        while index < len(lines) and not lines[index].startswith("$ "):
            expected.append(lines[index])
            index += 1
        commands.append((command, expected))
    return commands


def run_shell(command: str, folder: Path, environment: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", command],
        cwd=folder,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
    )


def run_block(block: Block, folder: Path, environment: dict[str, str], namespace: dict) -> None:
    if block.language == "python":
        code = compile(block.text, block.where, "exec")
        exec(code, namespace)
    elif block.language == "pycon":
        parser = doctest.DocTestParser()
        test = parser.get_doctest(block.text, namespace, block.where, str(block.path), block.line)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        report: list[str] = []
        runner.run(test, out=report.append, clear_globs=False)
        namespace.update(test.globs)  # DocTest works on a copy; later blocks see what this one defined
        assert runner.failures == 0, f"{block.where}: doctest failed\n" + "".join(report)
    elif block.language == "console":
        expected_status = int(block.markers.get("exit", "0"))
        for command, expected in console_commands(block):
            result = run_shell(command, folder, environment)
            assert result.returncode == expected_status, (
                f"{block.where}: `{command}` exited with {result.returncode}, expected {expected_status}\n{result.stdout}"
            )
            if expected:
                assert output_matches("\n".join(expected), result.stdout), (
                    f"{block.where}: `{command}` printed\n{result.stdout}\nbut the guide shows\n" + "\n".join(expected)
                )
    else:
        result = run_shell(block.text, folder, environment)
        assert result.returncode == 0, f"{block.where}: the block exited with {result.returncode}\n{result.stdout}"


@pytest.mark.parametrize("path", documents(), ids=lambda path: path.name)
def test_doc_code_blocks_run(path, tmp_path, monkeypatch, request):
    blocks = read_blocks(path)
    for block in blocks:
        if "requires" in block.markers:
            # The fixture of tests/conftest.py skips, or fails under CI, without the tool.
            request.getfixturevalue(f"requires_{block.markers['requires']}")
    environment = prepare_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    for block in blocks:
        if "no-run" in block.markers:
            assert block.markers["no-run"], f"{block.where}: a no-run marker needs a reason"
            continue
        if "file" in block.markers:
            (tmp_path / block.markers["file"]).write_text(block.text, encoding="utf-8")
            continue
        if block.language in RUN_LANGUAGES:
            run_block(block, tmp_path, environment, namespace)


def test_docs_have_runnable_blocks():
    languages = {block.language for path in documents() for block in read_blocks(path)}
    assert {"python", "console"} <= languages


def test_read_blocks_parses_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Text\n\n<!-- no-run: needs a GPU -->\n```python\nraise SystemExit\n```\n\n"
        "<!-- file: case.toml -->\n```toml\n[spec]\nheads = 1\n```\n",
        encoding="utf-8",
    )
    blocks = read_blocks(page)
    assert [block.language for block in blocks] == ["python", "toml"]
    assert blocks[0].markers == {"no-run": "needs a GPU"}
    assert blocks[1].markers == {"file": "case.toml"}
    assert blocks[1].text == "[spec]\nheads = 1\n"


def test_output_matches_wildcards():
    assert output_matches("a\n...\nd", "a\nb\nc\nd\n")
    assert output_matches("a ... d", "a b c d")
    assert not output_matches("a\nd", "a\nb\nd")
    assert output_matches("done in 0.4 s", "done in 12.3 s")
    assert normalise("done in 0.4 s\nwrote x (7,824 bytes)") == "done in <duration> s\nwrote x (<bytes>)\n"
