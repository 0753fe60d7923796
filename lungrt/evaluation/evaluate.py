"""Evaluation against masks at their native resolution, through any runner.

Predictions are mapped back through the preprocessing spec's inverse before scoring, so the
numbers are what a user sees on the original images, not on the network's grid.
"""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lungrt.data.datasets import Pair
from lungrt.data.io import XRay, read_mask, read_xray
from lungrt.evaluation.metrics import METRIC_NAMES, behind_heart, mean_metrics, segmentation_metrics
from lungrt.core.progress import progress_bar
from lungrt.backends.base import Runner


@dataclass
class Sample:
    name: str
    xray: XRay
    gold: np.ndarray | None
    tensor: np.ndarray  # (1, S, S) normalised network input


def load_samples(pairs: list[Pair], spec, workers: int = 4) -> Iterator[Sample]:
    """Read and preprocess pairs in a thread pool, yielding them in order."""

    def load(p: Pair) -> Sample:
        xr = read_xray(p.image)
        return Sample(p.name, xr, read_mask(p.mask), spec.apply_xray(xr))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(load, pairs)


def batched(items, n: int):
    batch = []
    for it in items:
        batch.append(it)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_native(runner: Runner, samples: list[Sample]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(uint8 mask, 255 = lung, at the sample's native size as infer makes it; the network-size
    probabilities) per sample."""
    probs = runner.run(np.stack([s.tensor for s in samples]))
    return [(runner.spec.invert_mask(p[0], s.xray.shape), p[0]) for p, s in zip(probs, samples)]


def evaluate(runner: Runner, pairs: list[Pair], batch_size: int = 8, keep: int = 0, postprocess: bool = False) -> dict:
    """Per-image metrics and their means; the first `keep` samples ("examples") and the `keep`
    with the lowest Dice ("worst": with their network-size probabilities, for the shape fit) are
    returned for figures. `postprocess` applies infer's clean-up (two largest components, holes filled) first."""
    from lungrt.data.postprocess import lung_fields

    rows, kept, worst = [], [], []
    with progress_bar() as bar:
        task = bar.add_task(f"evaluating {runner.info.name} ({runner.describe()})", total=len(pairs))
        for batch in batched(load_samples(pairs, runner.spec), batch_size):
            for s, (mask, prob) in zip(batch, predict_native(runner, batch)):
                pred = (lung_fields(mask).mask if postprocess else mask) > 0
                rows.append(
                    {
                        "name": s.name,
                        **segmentation_metrics(pred, s.gold, s.xray.spacing_mm),
                        **behind_heart(pred, s.gold),
                    }
                )
                if len(kept) < keep:
                    kept.append((s.name, s.xray.pixels, s.gold, pred))
                if keep:
                    worst = sorted(
                        worst + [(rows[-1]["dice"], s.name, s.xray.pixels, s.gold, pred, prob)], key=lambda w: w[0]
                    )[:keep]
            bar.advance(task, len(batch))
    return {
        "model": runner.info.name,
        "backend": runner.describe(),
        "mean": mean_metrics(rows),
        "per_image": rows,
        "examples": kept,
        "worst": worst,
    }


def convention_warning(runner: Runner, data) -> str | None:
    """One line when the data's masks and the model draw different lungs (`lungrt.core.spec.CONVENTIONS`):
    then Dice measures the convention as much as the model."""
    from lungrt.data.datasets import dataset_convention

    theirs, ours = dataset_convention(data), runner.spec.convention
    if theirs is None:
        return (
            f"{data}: its mask convention is not declared (lungrt-dataset.json); the model segments {ours}: "
            "compare only if the masks do too"
        )
    if theirs != ours:
        return (
            f"{data} draws {theirs} masks, the model segments {ours}: the scores measure the difference of "
            f"convention as much as the model (use --convention {theirs} or a {theirs} model)"
        )
    return None


HABIT_SHARE = 0.02  # of the gold lung area: above it, gold and prediction disagree behind the heart


def by_behind_heart(rows: list[dict], share: float = HABIT_SHARE) -> dict:
    """Means over the images where gold and prediction disagree about the lung behind the heart by
    more than `share` of the lung area ("differ": mostly an annotation habit, see `behind_heart`)
    and over the rest, so a report can say how much of the error that habit carries."""

    def differs(r: dict) -> bool:
        return max(r.get("behind_heart_missed", 0.0), r.get("behind_heart_added", 0.0)) > share

    return {
        "share": share,
        "differ": mean_metrics([r for r in rows if differs(r)]),
        "rest": mean_metrics([r for r in rows if not differs(r)]),
    }


def behind_heart_line(rows: list[dict], share: float = HABIT_SHARE) -> str:
    """One line for a report: how much of the error sits where annotators differ behind the heart."""
    split = by_behind_heart(rows, share)
    d, r = split["differ"], split["rest"]
    if not d["images"]:
        return f"gold and prediction agree behind the heart (within {share:.0%} of the lung) on every image"
    return (
        f"{d['images']} images where gold and prediction differ behind the heart by > {share:.0%} of the lung "
        f"(an annotation habit, see README): Dice {d['dice']:.4f}, HD95 {d['hd95']:.2f} px; "
        f"the other {r['images']}: Dice {r['dice']:.4f}, HD95 {r['hd95']:.2f} px"
    )


def write_per_image_csv(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["name", *METRIC_NAMES, "behind_heart_missed", "behind_heart_added"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]) for k in fields if k in r})
