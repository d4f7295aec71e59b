"""Writing output files whole or not at all.

Each file is written to a temporary file in the destination folder, flushed to disk and then
renamed over the destination, so an interrupted run leaves the previous file intact and never
a half-written one. A group of files is checked for conflicts before any of them is written.

A group is also replaced as a whole, because every temporary file is written before the first
rename. When a rename fails or the run is interrupted (KeyboardInterrupt included), the files
already replaced get their previous content back and new ones are removed. So the folder ends
with either all the old files or all the new ones.

NOTE: a crash of the whole process (SIGKILL, power loss) between two renames can still leave
a mix of whole old and whole new files, and its temporary files (``.NAME.*.tmp``, ``.bak``).
"""

from __future__ import annotations

import os
import secrets
import shutil
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
        files, verb, pronoun = ("file", "exists", "it") if len(conflicts) == 1 else ("files", "exist", "them")
        raise OutputError(
            f"output {files} {', '.join(conflicts)} already {verb} with other content; pass --force "
            f"(force=True in Python) to overwrite {pronoun}, or write to another path"
        )


def write_atomic(path: Path | str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename in the same folder."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        temporary = _write_temporary(path, data)
        try:
            os.replace(temporary, path)
        except BaseException:
            _remove(temporary)
            raise
    except OSError as error:
        raise _output_error(error) from None


def _output_error(error: OSError) -> OutputError:
    where = error.filename if error.filename is not None else "an output file"
    return OutputError(
        f"writing {where} failed: {error.strerror or error}; the previous outputs are unchanged. "
        f"Check that the output folder is a writable folder with free space"
    )


def write_files(files: dict[Path, bytes | str], force: bool = False) -> None:
    """Write a group of files atomically after checking that none would overwrite other content.

    All files are replaced, or, when writing fails or is interrupted, none is (see the module
    docstring for the one exception).
    """
    paths = [Path(path) for path in files]
    contents = [value.encode("utf-8") if isinstance(value, str) else value for value in files.values()]
    try:
        check_writable(paths, contents, force)
        staged: list[tuple[Path, Path]] = []  # (temporary, destination)
        try:
            for path, data in zip(paths, contents):
                staged.append((_write_temporary(path, data), path))
            _replace_all(staged)
        finally:
            for temporary, _ in staged:
                _remove(temporary)  # a renamed temporary no longer exists
    except OSError as error:
        raise _output_error(error) from None


def _replace_all(staged: list[tuple[Path, Path]]) -> None:
    """Rename each temporary over its destination; on any failure put the old files back."""
    backups: list[tuple[Path, Path | None]] = []  # (destination, copy of its old content or None)
    try:
        for temporary, destination in staged:
            backups.append((destination, _backup(destination)))
            os.replace(temporary, destination)
    except BaseException:
        for destination, backup in reversed(backups):
            _restore(destination, backup)
        raise
    for _, backup in backups:
        if backup is not None:
            _remove(backup)


def _restore(destination: Path, backup: Path | None) -> None:
    if backup is None:
        _remove(destination)  # the file did not exist before
    elif destination.exists() and os.path.samefile(backup, destination):
        # Not replaced yet. A rename between two links of one file does nothing, so remove it.
        _remove(backup)
    else:
        os.replace(backup, destination)


def _write_temporary(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new hidden file beside ``path``, flushed to disk, and return its path.

    The file gets the permissions of the file it replaces, or those of a file created with
    ``open`` (0o666 less the umask), rather than tempfile's 0o600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = _create_beside(path, "tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            shutil.copymode(path, temporary)
    except BaseException:
        _remove(temporary)
        raise
    return temporary


def _backup(path: Path) -> Path | None:
    """Keep the current content of ``path`` under a hidden name beside it; None if it does not exist."""
    if not path.exists():
        return None
    for _ in range(100):
        backup = path.parent / f".{path.name}.{secrets.token_hex(6)}.bak"
        try:
            os.link(path, backup)  # a hard link: the old bytes are not copied
            return backup
        except FileExistsError:
            continue
        except OSError:
            break  # a file system without hard links
    descriptor, backup = _create_beside(path, "bak")
    os.close(descriptor)
    shutil.copy2(path, backup)
    return backup


def _create_beside(path: Path, suffix: str) -> tuple[int, Path]:
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{secrets.token_hex(6)}.{suffix}"
        try:
            return os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), candidate
        except FileExistsError:
            continue
    raise OutputError(
        f"creating a temporary file beside {path} failed 100 times; remove old .{path.name}.* files"
    )


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

