"""Shared markers and fixtures of the test suite.

Tests that run pdflatex, or pdftotext or pdftoppm from poppler-utils, use the marker
``@pytest.mark.requires_pdflatex`` (``requires_pdftotext``, ``requires_pdftoppm``) or the
fixture of the same name, which returns the tool's path. When the tool is not installed they
skip with the reason, so the suite runs on a machine without LaTeX. With
SYMATTN_REQUIRE_PDFLATEX=1 in the environment, as .ci/run sets it, a missing tool fails the
test instead, so CI never skips these tests.
"""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_TOOLS_VARIABLE = "SYMATTN_REQUIRE_PDFLATEX"
TOOLS: tuple[str, ...] = ("pdflatex", "pdftotext", "pdftoppm")
_INSTALL_HINT = {
    "pdflatex": "install TeX Live (Debian: texlive-latex-extra texlive-fonts-recommended)",
    "pdftotext": "install poppler-utils",
    "pdftoppm": "install poppler-utils",
}


def require_tool(name: str) -> str:
    """Return the path of a command-line tool, or skip the test (fail it under CI) when it is missing."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not on PATH; {_INSTALL_HINT.get(name, 'install it')} to run this test"
    if os.environ.get(REQUIRE_TOOLS_VARIABLE) == "1":
        pytest.fail(f"{message} ({REQUIRE_TOOLS_VARIABLE}=1 makes a missing tool a failure)")
    pytest.skip(message)


def pytest_configure(config: pytest.Config) -> None:
    for tool in TOOLS:
        config.addinivalue_line(
            "markers",
            f"requires_{tool}: the test runs {tool}; it skips when {tool} is missing, "
            f"and fails instead when {REQUIRE_TOOLS_VARIABLE}=1",
        )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for tool in TOOLS:
        if item.get_closest_marker(f"requires_{tool}") is not None:
            require_tool(tool)


@pytest.fixture
def requires_pdflatex() -> str:
    """The path of pdflatex; the test skips (fails under CI) without it."""
    return require_tool("pdflatex")


@pytest.fixture
def requires_pdftotext() -> str:
    """The path of pdftotext; the test skips (fails under CI) without it."""
    return require_tool("pdftotext")


@pytest.fixture
def requires_pdftoppm() -> str:
    """The path of pdftoppm; the test skips (fails under CI) without it."""
    return require_tool("pdftoppm")
