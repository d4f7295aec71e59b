"""The package's exceptions and warnings.

Every error raised on purpose is a ``SymattnError``, so a caller can catch the whole family
with one ``except``. The subclass tells the caller who must act. ``InvalidInputError`` means
the value given is wrong and must change, while ``UnsupportedError`` means the value is valid
but this version does not handle it yet.
"""


class SymattnError(Exception):
    """Base class of every error that symattn raises on purpose."""


class InvalidInputError(SymattnError, ValueError):
    """An input, weight, option or file content is invalid."""


class ShapeError(InvalidInputError):
    """Two matrices or a matrix and a declared size do not fit together."""


class MaskError(InvalidInputError):
    """A mask is malformed, or a query row has no key left to attend to under policy "error"."""


class ResourceLimitError(InvalidInputError):
    """A request exceeds a resource limit: stages too large to build, or an input file too large."""


class UnsupportedError(SymattnError):
    """A valid request that this version does not handle."""


class EvaluationError(SymattnError):
    """A stage could not be evaluated to the requested digits, for example because of free symbols."""


class OutputError(SymattnError):
    """An output file could not be written, or exists and may not be overwritten."""


class SymattnWarning(UserWarning):
    """A request that is valid but probably not what the caller meant."""


def count_noun(count: int, noun: str) -> str:
    """Return '1 row' or '3 rows' for messages."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
