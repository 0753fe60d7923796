"""Parity: does a candidate runner segment like the PyTorch FP32 reference on the same inputs?

Both runners get the identical preprocessed batch; probabilities are compared directly, and masks
are compared at each image's native resolution (what a user sees). Where gold masks exist, the task
Dice of both is measured and the drop is gated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungrt.data.datasets import Pair
from lungrt.evaluation.evaluate import batched, load_samples
from lungrt.evaluation.metrics import hd95, segmentation_metrics
from lungrt.core.progress import progress_bar
from lungrt.backends.base import Runner


@dataclass(frozen=True)
class Gate:
    min_agreement: float  # per-image mean Dice of candidate mask vs reference mask
    max_dice_drop: float | None  # reference task Dice - candidate task Dice (labelled data only)


GATES = {
    "fp32": Gate(0.9999, None),
    "fp16": Gate(0.998, 0.001),
    "bf16": Gate(0.998, 0.001),  # OpenVINO's / PyTorch's bf16 mode: as strict as FP16
    "int8": Gate(0.99, 0.005),
}


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.count_nonzero(a & b)
    den = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if den == 0 else 2.0 * inter / den


def compare(reference: Runner, candidate: Runner, pairs: list[Pair], batch_size: int = 8, worst: int = 5) -> dict:
    """Per-image and summary parity numbers (no gate applied)."""
    if reference.spec != candidate.spec:
        raise ValueError(f"preprocessing differs: reference {reference.spec} vs candidate {candidate.spec}")
    spec = reference.spec
    rows = []
    max_abs, sum_abs, n_px = 0.0, 0.0, 0
    with progress_bar() as bar:
        task = bar.add_task(f"parity {candidate.describe()} vs {reference.describe()}", total=len(pairs))
        for batch in batched(load_samples(pairs, spec), batch_size):
            x = np.stack([s.tensor for s in batch])
            p_ref, p_cand = reference.run(x), candidate.run(x)
            d = np.abs(p_ref - p_cand)
            max_abs = max(max_abs, float(d.max()))
            sum_abs += float(d.sum())
            n_px += d.size
            for s, pr, pc in zip(batch, p_ref, p_cand):
                m_ref = spec.invert_mask(pr[0], s.xray.shape) > 0
                m_cand = spec.invert_mask(pc[0], s.xray.shape) > 0
                row = {"name": s.name, "agreement": _agreement(m_ref, m_cand),
                       "boundary_hd95_px": hd95(m_ref, m_cand), "max_abs_prob_diff": float(np.abs(pr - pc).max())}
                if s.gold is not None:
                    row["dice_reference"] = segmentation_metrics(m_ref, s.gold)["dice"]
                    row["dice_candidate"] = segmentation_metrics(m_cand, s.gold)["dice"]
                rows.append(row)
            bar.advance(task, len(batch))
    summary = {
        "images": len(rows),
        "max_abs_prob_diff": max_abs,
        "mean_abs_prob_diff": sum_abs / max(n_px, 1),
        "mask_agreement": float(np.mean([r["agreement"] for r in rows])),
        "min_mask_agreement": float(np.min([r["agreement"] for r in rows])),
        "boundary_hd95_px": float(np.nanmean([r["boundary_hd95_px"] for r in rows])),
    }
    labelled = [r for r in rows if "dice_reference" in r]
    if labelled:
        summary["dice_reference"] = float(np.mean([r["dice_reference"] for r in labelled]))
        summary["dice_candidate"] = float(np.mean([r["dice_candidate"] for r in labelled]))
        summary["dice_drop"] = summary["dice_reference"] - summary["dice_candidate"]
    summary["worst"] = sorted(rows, key=lambda r: r["agreement"])[:worst]
    return {"reference": reference.describe(), "candidate": candidate.describe(), "summary": summary, "per_image": rows}


def apply_gate(summary: dict, gate: Gate) -> dict:
    checks = {"mask_agreement": (summary["mask_agreement"] >= gate.min_agreement, f">= {gate.min_agreement}")}
    if gate.max_dice_drop is not None and "dice_drop" in summary:
        checks["dice_drop"] = (summary["dice_drop"] <= gate.max_dice_drop, f"<= {gate.max_dice_drop}")
    return {"passed": all(ok for ok, _ in checks.values()),
            "checks": {k: {"passed": ok, "required": req, "value": summary[k]} for k, (ok, req) in checks.items()}}


def throughput(runner: Runner, batch: np.ndarray, seconds: float = 2.0, min_iters: int = 3) -> float:
    """Images per second for repeated runs of one batch (after one warm-up run)."""
    runner.run(batch)
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < seconds:
        runner.run(batch)
        n += 1
    return n * len(batch) / (time.perf_counter() - t0)


def parity_report_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.parity.json"
