"""Parity: does a candidate runner segment like the PyTorch FP32 reference on the same inputs?

Both runners get the identical preprocessed batch; probabilities are compared directly, and masks
are compared at each image's native resolution (what a user sees). Where gold masks exist, the task
Dice of both is measured and the drop is gated.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lungrt.data.datasets import Pair
from lungrt.evaluation.evaluate import batched, load_samples
from lungrt.evaluation.metrics import hd95
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


# The reference's probabilities per (reference identity, preprocessing, image files): a build gates
# many candidates, and the INT8 search many graphs, against the same slow PyTorch FP32 run.
_REFERENCE_CACHE: OrderedDict = OrderedDict()
REFERENCE_CACHE_ENTRIES = 4
REFERENCE_CACHE_MAX_IMAGES = 512  # 128 MiB at 256 px; larger sets (a user's parity run) stream instead


def _reference_key(reference: Runner, pairs: list[Pair]) -> tuple | None:
    ident = reference.identity()
    if not (ident["weights_hash"] or ident["content_hash"]):
        return None  # nothing says what it computes: never reuse
    try:
        stats = [(str(p.image), p.image.stat()) for p in pairs]
    except OSError:
        return None
    files = tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats)
    return (json.dumps(ident, sort_keys=True), reference.spec.to_json(), files)


def with_reference(reference: Runner, pairs: list[Pair], batches) -> Iterator[tuple]:
    """(batch, x, reference output) for each (batch, x) of `batches` (the preprocessed `pairs`, in
    order): the reference runs once per process for the same reference, preprocessing and files,
    and is replayed after that."""
    key = _reference_key(reference, pairs) if len(pairs) <= REFERENCE_CACHE_MAX_IMAGES else None
    if key is not None and key in _REFERENCE_CACHE:
        _REFERENCE_CACHE.move_to_end(key)
        cached, start = _REFERENCE_CACHE[key], 0
        for batch, x in batches:
            yield batch, x, cached[start : start + len(x)]
            start += len(x)
        return
    done = []
    for batch, x in batches:
        p_ref = reference.run(x)
        if key is not None:
            done.append(p_ref)
        yield batch, x, p_ref
    if key is not None and done:
        _REFERENCE_CACHE[key] = np.concatenate(done)
        while len(_REFERENCE_CACHE) > REFERENCE_CACHE_ENTRIES:
            _REFERENCE_CACHE.popitem(last=False)


def compare(reference: Runner, candidate: Runner, pairs: list[Pair], batch_size: int = 8, worst: int = 5,
            distances: bool = True) -> dict:
    """Per-image and summary parity numbers (no gate applied). `distances=False` leaves out the
    boundary distances (HD95: two thirds of the time on 512 px masks), for gates that need only
    agreement and Dice, such as the INT8 search's many."""
    if reference.spec != candidate.spec:
        raise ValueError(f"preprocessing differs: reference {reference.spec} vs candidate {candidate.spec}")
    spec = reference.spec
    rows = []
    max_abs, sum_abs, n_px = 0.0, 0.0, 0
    batches = ((b, np.stack([s.tensor for s in b])) for b in batched(load_samples(pairs, spec), batch_size))
    with progress_bar() as bar:
        task = bar.add_task(f"parity {candidate.describe()} vs {reference.describe()}", total=len(pairs))
        for batch, x, p_ref in with_reference(reference, pairs, batches):
            p_cand = candidate.run(x)
            d = np.abs(p_ref - p_cand)
            max_abs = max(max_abs, float(d.max()))
            sum_abs += float(d.sum())
            n_px += d.size
            for s, pr, pc in zip(batch, p_ref, p_cand):
                m_ref = spec.invert_mask(pr[0], s.xray.shape) > 0
                m_cand = spec.invert_mask(pc[0], s.xray.shape) > 0
                row = {"name": s.name, "agreement": _agreement(m_ref, m_cand),
                       "max_abs_prob_diff": float(np.abs(pr - pc).max())}
                if distances:
                    row["boundary_hd95_px"] = hd95(m_ref, m_cand)
                if s.gold is not None:
                    gold = np.asarray(s.gold, bool)
                    row["dice_reference"] = _agreement(m_ref, gold)  # Dice: 2|A&B| / (|A| + |B|)
                    row["dice_candidate"] = _agreement(m_cand, gold)
                rows.append(row)
            bar.advance(task, len(batch))
    summary = {
        "images": len(rows),
        "max_abs_prob_diff": max_abs,
        "mean_abs_prob_diff": sum_abs / max(n_px, 1),
        "mask_agreement": float(np.mean([r["agreement"] for r in rows])),
        "min_mask_agreement": float(np.min([r["agreement"] for r in rows])),
    }
    if distances:
        summary["boundary_hd95_px"] = float(np.nanmean([r["boundary_hd95_px"] for r in rows]))
    labelled = [r for r in rows if "dice_reference" in r]
    if labelled:
        summary["dice_reference"] = float(np.mean([r["dice_reference"] for r in labelled]))
        summary["dice_candidate"] = float(np.mean([r["dice_candidate"] for r in labelled]))
        summary["dice_drop"] = summary["dice_reference"] - summary["dice_candidate"]
    summary["worst"] = sorted(rows, key=lambda r: r["agreement"])[:worst]
    return {"reference": reference.describe(), "candidate": candidate.describe(), "summary": summary, "per_image": rows,
            "reference_identity": reference.identity(), "candidate_identity": candidate.identity()}


class GateScore:
    """The score a gate search maximises on `pairs`: mask agreement with the reference, less any
    task-Dice drop (labelled pairs), of any function from a batch to probabilities. The reference's
    masks are made once, for searches that score many graphs (NNCF's accuracy control)."""

    def __init__(self, reference: Runner, pairs: list[Pair], batch_size: int = 8):
        self.spec, self.batch_size = reference.spec, batch_size
        self.inputs, self.shapes, self.masks, self.golds = [], [], [], []
        batches = ((b, np.stack([s.tensor for s in b])) for b in batched(load_samples(pairs, self.spec), batch_size))
        for batch, x, p_ref in with_reference(reference, pairs, batches):
            for s, xi, pr in zip(batch, x, p_ref):
                self.inputs.append(xi)
                self.shapes.append(s.xray.shape)
                self.masks.append(self.spec.invert_mask(pr[0], s.xray.shape) > 0)
                self.golds.append(None if s.gold is None else np.asarray(s.gold, bool))

    def __len__(self) -> int:
        return len(self.inputs)

    def __call__(self, run, indices=None) -> float:
        idx = list(range(len(self.inputs)) if indices is None else indices)
        agreement, dice_ref, dice_cand = [], [], []
        for start in range(0, len(idx), self.batch_size):
            chunk = idx[start : start + self.batch_size]
            for i, p in zip(chunk, run(np.stack([self.inputs[i] for i in chunk]))):
                mask = self.spec.invert_mask(p[0], self.shapes[i]) > 0
                agreement.append(_agreement(self.masks[i], mask))
                if self.golds[i] is not None:
                    dice_ref.append(_agreement(self.masks[i], self.golds[i]))
                    dice_cand.append(_agreement(mask, self.golds[i]))
        drop = float(np.mean(dice_ref) - np.mean(dice_cand)) if dice_ref else 0.0
        return float(np.mean(agreement)) - max(drop, 0.0)


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
