"""Where lungrt keeps files it derives (ONNX variants, calibration ranges) when no folder is given:
never the current folder. `LUNGRT_CACHE` overrides; else `$XDG_CACHE_HOME/lungrt` or `~/.cache/lungrt`."""

from __future__ import annotations

import os
from pathlib import Path


def engines_dir() -> Path:
    """Where `lungrt build` and `LungSegmenter.export("engine")` put engines when not told."""
    return cache_root() / "engines"


def cache_root() -> Path:
    explicit = os.environ.get("LUNGRT_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lungrt"
