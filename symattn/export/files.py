"""Writing output files whole or not at all.

Each file is written to a temporary file in the destination folder, flushed to disk and then
renamed over the destination, so an interrupted run leaves the previous file intact and never
a half-written one. A group of files is checked for conflicts before any of them is written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import OutputError


def check_writable(paths: list[Path], contents: list[bytes] | None = None, force: bool = False) -> None:
    """Raise OutputError if any path exists with other content and ``force`` is False.

    An existing file whose bytes equal the new content is not a conflict, so a repeated run
    that would write the same bytes succeeds.
    """
    if force:
        return
    conflicts = []
    for index, path in enumerate(paths):
        if not path.exists():
            continue
        if contents is not None and contents[index] is not None and path.read_bytes() == contents[index]:
            continue
        conflicts.append(str(path))
    if conflicts:
        raise OutputError(
            f"output file {', '.join(conflicts)} already exists with other content; pass --force "
            f"(force=True) to overwrite it, or choose another output folder"
        )


def write_atomic(path: Path | str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename in the same folder."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def write_files(files: dict[Path, bytes | str], force: bool = False) -> None:
    """Write a group of files atomically after checking that none would overwrite other content."""
    paths = list(files)
    contents = [value.encode("utf-8") if isinstance(value, str) else value for value in files.values()]
    check_writable(paths, contents, force)
    for path, data in zip(paths, contents):
        write_atomic(path, data)
