"""One small runner interface for every backend, so evaluation, parity, infer and bench compare
any two of them with the same code.

A runner takes a preprocessed batch (B, 1, S, S) float32, normalised by the model's spec, and
returns lung probabilities (B, 1, S, S) float32. It reports its backend, device and precision,
and is closed (or used as a context manager) when done.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from lungrt.core.modelinfo import ModelInfo
from lungrt.core.errors import LungrtError
from lungrt.core.spec import PreprocessSpec

INPUT_NAME, OUTPUT_NAME = "image", "probability"


class Runner(ABC):
    backend: str = "?"
    device: str = "cpu"
    precision: str = "fp32"
    spec: PreprocessSpec
    info: ModelInfo
    # True when the runner's CPU threads sleep (never spin) while waiting: helper threads may then
    # take only the CPU time it leaves idle (see infer). Spinning runners would starve them.
    sleeps_when_idle: bool = False
    weights_id: str | None = None  # hash of the weights it runs: what `infer --resume` compares
    path: Path | None = None  # the artifact it runs (ONNX file, plan); None for in-memory weights
    content_hash: str | None = None  # SHA-256 of that artifact as checked on opening (integrity.py)

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """(B, 1, S, S) float32 normalised input -> (B, 1, S, S) float32 probabilities."""

    def close(self) -> None:  # noqa: B027 - optional for runners that hold nothing
        pass

    def describe(self) -> str:
        return f"{self.backend}/{self.device}/{self.precision}"

    def identity(self) -> dict:
        """What this runner is, as parity, build, bench and infer record it."""
        return {
            "backend": self.backend,
            "precision": self.precision,
            "device": self.device,
            "file": str(self.path) if self.path else None,
            "content_hash": self.content_hash,
            "weights_hash": self.weights_id,
        }

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def onnx_metadata(path: str | Path) -> dict:
    """lungrt metadata stored in an ONNX file's metadata_props (without loading the weights)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


def info_from_metadata(meta: dict, source: str) -> ModelInfo:
    if "lungrt.model" not in meta:
        raise LungrtError(f"{source}: ONNX file has no lungrt metadata (export it with `lungrt export`)")
    return ModelInfo.from_dict(json.loads(meta["lungrt.model"]), source=source)
