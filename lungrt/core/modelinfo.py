"""What travels with a model's weights (name, preprocessing, QC, metrics), torch-free: runners,
helper processes and the CLI read it without importing PyTorch."""

from __future__ import annotations

from dataclasses import dataclass, field

from lungrt._version import __version__
from lungrt.core.spec import PreprocessSpec


@dataclass
class ModelInfo:
    """What travels with the weights."""

    name: str
    width: int = 16
    spec: PreprocessSpec = field(default_factory=PreprocessSpec)
    data_fingerprint: str | None = None
    metrics: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    qc: dict = field(default_factory=dict)  # fitted QC thresholds (qc.QCThresholds.to_dict), if any
    lungrt_version: str = __version__
    source: str = ""  # where it was loaded from (not saved)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "width": self.width,
            "preprocess": self.spec.to_dict(),
            "data_fingerprint": self.data_fingerprint,
            "metrics": self.metrics,
            "training": self.training,
            "qc": self.qc,
            "lungrt_version": self.lungrt_version,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> "ModelInfo":
        return cls(
            name=d["name"],
            width=int(d.get("width", 16)),
            spec=PreprocessSpec.from_dict(d.get("preprocess", {})),
            data_fingerprint=d.get("data_fingerprint"),
            metrics=d.get("metrics", {}),
            training=d.get("training", {}),
            qc=d.get("qc") or {},
            lungrt_version=d.get("lungrt_version", "?"),
            source=source,
        )
