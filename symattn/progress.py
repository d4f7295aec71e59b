"""Progress reports from long computations, as plain callbacks.

Library functions never print. A function that can run for long (a certified reference at a
large size, a LaTeX build, the references of a batch) accepts ``progress``, a callable with the
signature of ``Progress``, and calls it as it goes::

    progress("certified references", 3, 8)   # 3 of 8 steps of this task are finished
    progress("pdflatex", 0, 0)               # a task has started whose length is unknown

``total`` 0 means the length is unknown, and ``done == total > 0`` means the task has finished.
The command line turns these calls into a bar on a terminal (``symattn.cli.terminal``). In
Python, pass any callable, for example one that updates a notebook widget or writes a log.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

Progress = Callable[[str, int, int], None]
"""``progress(task, done, total)``: ``done`` of ``total`` steps of ``task`` are finished (total 0: unknown)."""

T = TypeVar("T")


def report(progress: Progress | None, task: str, done: int, total: int) -> None:
    """Call ``progress(task, done, total)`` unless ``progress`` is None."""
    if progress is not None:
        progress(task, done, total)


def track(progress: Progress | None, task: str, items: Iterable[T], total: int | None = None) -> Iterator[T]:
    """Yield ``items`` and report each one as finished once the loop body has run for it.

    ``total`` defaults to ``len(items)``. The report (task, 0, total) comes before the first
    item; an empty sequence reports nothing, because 0 as a total means "unknown".

    >>> calls = []
    >>> for item in track(lambda *call: calls.append(call), "squares", [1, 2]):
    ...     pass
    >>> calls
    [('squares', 0, 2), ('squares', 1, 2), ('squares', 2, 2)]
    """
    if total is None:
        items = list(items)
        total = len(items)
    if total == 0:
        yield from items
        return
    report(progress, task, 0, total)
    for done, item in enumerate(items, start=1):
        yield item
        report(progress, task, done, total)


class Stopwatch:
    """A task of unknown length: reports (task, 0, 0) on entry and (task, 1, 1) on a normal exit.

    >>> calls = []
    >>> with Stopwatch(lambda *call: calls.append(call), "pdflatex"):
    ...     pass
    >>> calls
    [('pdflatex', 0, 0), ('pdflatex', 1, 1)]
    """

    def __init__(self, progress: Progress | None, task: str) -> None:
        self.progress = progress
        self.task = task

    def __enter__(self) -> "Stopwatch":
        report(self.progress, self.task, 0, 0)
        return self

    def __exit__(self, error_type: object, error: object, traceback: object) -> None:
        if error_type is None:
            report(self.progress, self.task, 1, 1)
