"""A lung-field runner with a second opinion: the same architecture's whole-lung weights read the same input, so
QC can see a lung-field mask that stops short of lung disease made opaque (`qc.whole_lung_cover`). Opt-in: it
costs a second network's compute per film. The masks, areas and SEGs are the lung-field runner's alone; the
whole-lung probabilities only feed QC, against the bound fitted with these very reference weights (their hash is
in the lung-field weights' QC record, covered by their digest): any other reference is refused.
"""

from __future__ import annotations

import numpy as np

from lungrt.backends.base import Runner
from lungrt.core.errors import LungrtError
from lungrt.core.spec import WHOLE_LUNG

COVER = "whole_lung_cover"  # the QC feature the second opinion feeds (lungrt.inference.qc.FEATURES)


def reference_record(reference: Runner) -> dict:
    """What names the weights a `whole_lung_cover` bound was fitted with."""
    return {"model": reference.info.name, "convention": reference.spec.convention, "weights_hash": reference.weights_id}


def check_reference(runner: Runner, reference: Runner) -> None:
    """A second opinion is a whole-lung model reading the very input of a lung-field model: refuse anything else."""
    if runner.spec.convention == WHOLE_LUNG:
        raise LungrtError(f"{runner.info.name} segments whole lungs already; a second opinion checks lung-field masks")
    if reference.spec.convention != WHOLE_LUNG:
        raise LungrtError(
            f"the second opinion must be a whole-lung model; {reference.info.name} is {reference.spec.convention}"
        )
    mine, theirs = runner.spec.to_dict(), reference.spec.to_dict()
    mine.pop("convention"), theirs.pop("convention")
    if mine != theirs:
        raise LungrtError(
            f"{reference.info.name} ({WHOLE_LUNG}) prepares its input otherwise than {runner.info.name}: "
            f"{theirs} vs {mine}; a second opinion must read the same input"
        )


def check_fitted_with(runner: Runner, reference: Runner) -> None:
    """The lung-field weights' QC record must hold a `whole_lung_cover` bound fitted with `reference`'s weights."""
    qc = runner.info.qc or {}
    fitted = qc.get("second_opinion") or {}
    how = (
        "fit QC with these whole-lung weights (`lungrt.inference.qc.fit_for_model(..., reference=...)`; shipped "
        f"weights: `scripts/ship_weights.py {runner.info.name} --qc-only --second-opinion`)"
    )
    if COVER not in qc.get("bounds", {}) or not fitted.get("weights_hash"):
        raise LungrtError(f"{runner.info.name}: its QC thresholds hold no bound for a second opinion; {how}")
    if fitted["weights_hash"] != reference.weights_id:
        raise LungrtError(
            f"{runner.info.name}: its second-opinion bound was fitted with {fitted.get('model')} weights "
            f"{str(fitted['weights_hash'])[:12]}, not these ({str(reference.weights_id)[:12]}); "
            f"refusing a QC bound that does not belong to them ({how})"
        )


class SecondOpinionRunner(Runner):
    """`runner` as it is (`run`: its probabilities alone, so evaluation, parity and bench see the lung-field model),
    with the whole-lung `reference` that the stream runs on the same batches (`stream.run_batch`)."""

    def __init__(self, runner: Runner, reference: Runner):
        check_reference(runner, reference)
        check_fitted_with(runner, reference)
        self.runner, self.reference = runner, reference
        self.backend, self.device, self.precision = runner.backend, runner.device, runner.precision
        self.spec, self.info, self.path = runner.spec, runner.info, runner.path
        self.weights_id, self.content_hash = runner.weights_id, runner.content_hash
        self.sleeps_when_idle = runner.sleeps_when_idle and reference.sleeps_when_idle
        ranges = [r.batch_range for r in (runner, reference) if hasattr(r, "batch_range")]
        if ranges:
            self.batch_range = (max(lo for lo, _ in ranges), min(hi for _, hi in ranges))

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.runner.run(batch)

    def describe(self) -> str:
        return f"{self.runner.describe()}+{WHOLE_LUNG}"

    def identity(self) -> dict:
        return {**self.runner.identity(), "second_opinion": self.reference.identity()}

    def close(self) -> None:
        self.runner.close()
        self.reference.close()
