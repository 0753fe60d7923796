"""Typed errors. Every user-facing failure names the file (when there is one) and the reason."""

from __future__ import annotations

from pathlib import Path


class LungrtError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ImageReadError(LungrtError):
    """An input file could not be read as an X-ray."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NotARadiograph(ImageReadError):
    """A DICOM instance that holds no radiograph to segment (a SEG, SR, presentation state, key
    object selection, ...): a study received whole holds them beside its films. Skipped with its
    reason, never counted as a failure."""


class CheckpointError(LungrtError):
    """Weights or checkpoint metadata that cannot be loaded into a model."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DatasetError(LungrtError):
    """A dataset folder that holds no usable image/mask pairs."""


class BackendUnavailable(LungrtError):
    """A backend that is not installed, or whose hardware is not here: a skip with its reason
    (bench), never a silent one; any other failure of a backend is an error."""


def one_line(text: str, limit: int = 400) -> str:
    """A library's message as one line (whitespace runs, newlines and tabs become one space),
    cut to `limit` characters: fit for a CSV cell or a one-line error, the reason kept."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
