"""Errors that tell the user exactly what is wrong with their input."""

from __future__ import annotations


class TwinInputError(ValueError):
    """Bad user input: names the file, the row and the field, and what was expected.

    ``row`` is the 0-based data row (header excluded) where one applies.
    """

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 field: str | None = None):
        self.file, self.row, self.field, self.detail = file, row, field, message
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__((": ".join([", ".join(where), message])) if where else message)


class ConfigError(TwinInputError):
    """A serving configuration vLLM itself would refuse (e.g. KV cache too small)."""
