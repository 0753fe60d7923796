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
from lungrt.evaluation.metrics import METRIC_NAMES, mean_metrics, segmentation_metrics
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


def predict_native(runner: Runner, samples: list[Sample]) -> list[np.ndarray]:
    """uint8 masks (255 = lung) at each sample's native size, as infer makes them."""
    probs = runner.run(np.stack([s.tensor for s in samples]))
    return [runner.spec.invert_mask(p[0], s.xray.shape) for p, s in zip(probs, samples)]


def evaluate(runner: Runner, pairs: list[Pair], batch_size: int = 8, keep: int = 0, postprocess: bool = False) -> dict:
    """Per-image metrics and their means; `keep` first samples are returned for figures.
    `postprocess` applies infer's clean-up (two largest components, holes filled) first."""
    from lungrt.inference.postprocess import lung_fields

    rows, kept = [], []
    with progress_bar() as bar:
        task = bar.add_task(f"evaluating {runner.info.name} ({runner.describe()})", total=len(pairs))
        for batch in batched(load_samples(pairs, runner.spec), batch_size):
            for s, mask in zip(batch, predict_native(runner, batch)):
                pred = (lung_fields(mask).mask if postprocess else mask) > 0
                rows.append({"name": s.name, **segmentation_metrics(pred, s.gold, s.xray.spacing_mm)})
                if len(kept) < keep:
                    kept.append((s.name, s.xray.pixels, s.gold, pred))
            bar.advance(task, len(batch))
    return {"model": runner.info.name, "backend": runner.describe(), "mean": mean_metrics(rows), "per_image": rows, "examples": kept}


def write_per_image_csv(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["name", *METRIC_NAMES])
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]) for k in ["name", *METRIC_NAMES]})
