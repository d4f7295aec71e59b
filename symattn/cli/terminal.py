"""A progress bar on a terminal, drawn from the library's progress reports (see symattn.progress).

The bar is one line on stderr, redrawn in place with a carriage return, and erased when its
task finishes, so the lines the command prints afterwards start at the left margin. While a
task runs, a background thread redraws the line every REFRESH_SECONDS, so the elapsed time
advances even during one long step such as a pdflatex run. When stderr is not a terminal (a
pipe, a file, a CI log) ``progress_bar`` yields None and nothing is drawn.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Callable, Iterator, TextIO

from ..progress import Progress

BAR_WIDTH = 24
REFRESH_SECONDS = 0.2
# A bar for a task of unknown length: a block that moves back and forth.
BOUNCE_WIDTH = 4
ERASE_LINE = "\r\x1b[K"


class ProgressBar:
    """Draws ``progress(task, done, total)`` reports as one line on a terminal stream."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic,
                 refresh_seconds: float = REFRESH_SECONDS) -> None:
        self.stream = stream
        self.clock = clock
        self.lock = threading.Lock()
        self.task: str | None = None
        self.done = 0
        self.total = 0
        self.started = 0.0
        self.frame = 0
        self.stopped = threading.Event()
        self.ticker = threading.Thread(target=self._tick, args=(refresh_seconds,), daemon=True)
        self.ticker.start()

    def __call__(self, task: str, done: int, total: int) -> None:
        with self.lock:
            if task != self.task:
                self.task, self.started = task, self.clock()
            self.done, self.total = done, total
            if total > 0 and done >= total:
                self.task = None
                self._write(ERASE_LINE)
            else:
                self._draw()

    def close(self) -> None:
        """Stop redrawing and erase the line."""
        self.stopped.set()
        self.ticker.join()
        with self.lock:
            if self.task is not None:
                self.task = None
                self._write(ERASE_LINE)

    def line(self) -> str:
        """Return the text of the bar for the current task, such as ``pdflatex [##----] 1/3 2.0 s``."""
        elapsed = self.clock() - self.started
        if self.total > 0:
            filled = BAR_WIDTH * min(self.done, self.total) // self.total
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            count = f" {self.done}/{self.total}"
        else:
            span = BAR_WIDTH - BOUNCE_WIDTH
            position = self.frame % (2 * span)
            offset = position if position <= span else 2 * span - position
            bar = " " * offset + "=" * BOUNCE_WIDTH + " " * (span - offset)
            count = ""
        return f"{self.task} [{bar}]{count} {elapsed:.1f} s"

    def _draw(self) -> None:
        self._write(ERASE_LINE + self.line())

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed terminal must not fail the computation it reports on

    def _tick(self, refresh_seconds: float) -> None:
        while not self.stopped.wait(refresh_seconds):
            with self.lock:
                if self.task is not None:
                    self.frame += 1
                    self._draw()


def is_terminal(stream: TextIO) -> bool:
    """Tell whether ``stream`` is a terminal; a stream without ``isatty`` is not."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


@contextlib.contextmanager
def progress_bar(stream: TextIO | None = None) -> Iterator[Progress | None]:
    """Yield a ProgressBar on ``stream`` (stderr by default) when it is a terminal, else None.

    The bar is closed, and its line erased, when the block ends, also on an error.
    """
    stream = sys.stderr if stream is None else stream
    if not is_terminal(stream):
        yield None
        return
    bar = ProgressBar(stream)
    try:
        yield bar
    finally:
        bar.close()
