"""One small error hierarchy. Each error carries what a user needs to fix the input."""

from __future__ import annotations


class VisionLensError(Exception):
    """Base of every error the engine raises on purpose (never for bugs)."""

    def __init__(self, message: str, *, file: str | None = None, row: object = None,
                 field: str | None = None, choices: list | None = None):
        self.message = message
        self.file = file
        self.row = row
        self.field = field
        self.choices = choices
        super().__init__(self.describe())

    def describe(self) -> str:
        where = []
        if self.file is not None:
            where.append(f"file {self.file}")
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        text = self.message
        if where:
            text = f"{', '.join(where)}: {text}"
        if self.choices:
            shown = ", ".join(map(str, self.choices[:20]))
            more = f" (+{len(self.choices) - 20} more)" if len(self.choices) > 20 else ""
            text += f" (valid: {shown}{more})"
        return text


class StoreError(VisionLensError):
    """A store is missing, of another schema version, or unreadable."""


class IngestError(VisionLensError):
    """Input files or rows that cannot be ingested."""


class CohortError(VisionLensError):
    """A cohort filter or URL that cannot be parsed or compiled."""


class EvalError(VisionLensError):
    """Ground truth or detections that cannot be evaluated."""


class ExplainError(VisionLensError):
    """An explanation that cannot be computed for the given input."""
