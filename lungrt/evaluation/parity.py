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


def _masks_compared(m_ref: np.ndarray, m_cand: np.ndarray, gold) -> dict:
    """One image: the candidate's mask against the reference's, and both against the gold mask if any."""
    row = {"agreement": _agreement(m_ref, m_cand)}
    if gold is not None:
        gold = np.asarray(gold, bool)
        row["dice_reference"] = _agreement(m_ref, gold)  # Dice: 2|A&B| / (|A| + |B|)
        row["dice_candidate"] = _agreement(m_cand, gold)
    return row


def _agreement_summary(rows: list[dict]) -> dict:
    """Mean mask agreement, and over the labelled rows the task Dice of both and its drop."""
    out = {"mask_agreement": float(np.mean([r["agreement"] for r in rows]))}
    labelled = [r for r in rows if "dice_reference" in r]
    if labelled:
        out["dice_reference"] = float(np.mean([r["dice_reference"] for r in labelled]))
        out["dice_candidate"] = float(np.mean([r["dice_candidate"] for r in labelled]))
        out["dice_drop"] = out["dice_reference"] - out["dice_candidate"]
    return out


def gate_score(summary: dict) -> float:
    """What a gate search maximises: mask agreement, less any task-Dice drop."""
    return summary["mask_agreement"] - max(summary.get("dice_drop", 0.0), 0.0)


def compare(
    reference: Runner, candidate: Runner, pairs: list[Pair], batch_size: int = 8, worst: int = 5, distances: bool = True
) -> dict:
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
                compared = _masks_compared(m_ref, m_cand, s.gold)
                row = {
                    "name": s.name,
                    "agreement": compared.pop("agreement"),
                    "max_abs_prob_diff": float(np.abs(pr - pc).max()),
                }
                if distances:
                    row["boundary_hd95_px"] = hd95(m_ref, m_cand)
                rows.append({**row, **compared})
            bar.advance(task, len(batch))
    summary = {
        "images": len(rows),
        "max_abs_prob_diff": max_abs,
        "mean_abs_prob_diff": sum_abs / max(n_px, 1),
        "min_mask_agreement": float(np.min([r["agreement"] for r in rows])),
        **_agreement_summary(rows),
    }
    if distances:
        summary["boundary_hd95_px"] = float(np.nanmean([r["boundary_hd95_px"] for r in rows]))
    summary["worst"] = sorted(rows, key=lambda r: r["agreement"])[:worst]
    return {
        "reference": reference.describe(),
        "candidate": candidate.describe(),
        "summary": summary,
        "per_image": rows,
        "reference_identity": reference.identity(),
        "candidate_identity": candidate.identity(),
    }


class GateScore:
    """`gate_score` on `pairs` of any function from a batch to probabilities, the reference's masks
    made once: for searches that score many graphs (NNCF's accuracy control)."""

    def __init__(self, reference: Runner, pairs: list[Pair], batch_size: int = 8):
        self.spec, self.batch_size = reference.spec, batch_size
        self.inputs, self.shapes, self.masks, self.golds = [], [], [], []
        batches = ((b, np.stack([s.tensor for s in b])) for b in batched(load_samples(pairs, self.spec), batch_size))
        for batch, x, p_ref in with_reference(reference, pairs, batches):
            for s, xi, pr in zip(batch, x, p_ref):
                self.inputs.append(xi)
                self.shapes.append(s.xray.shape)
                self.masks.append(self.spec.invert_mask(pr[0], s.xray.shape) > 0)
                self.golds.append(s.gold)

    def __len__(self) -> int:
        return len(self.inputs)

    def __call__(self, run, indices=None) -> float:
        idx = list(range(len(self.inputs)) if indices is None else indices)
        rows = []
        for start in range(0, len(idx), self.batch_size):
            chunk = idx[start : start + self.batch_size]
            for i, p in zip(chunk, run(np.stack([self.inputs[i] for i in chunk]))):
                rows.append(
                    _masks_compared(self.masks[i], self.spec.invert_mask(p[0], self.shapes[i]) > 0, self.golds[i])
                )
        return gate_score(_agreement_summary(rows))


def apply_gate(summary: dict, gate: Gate) -> dict:
    checks = {"mask_agreement": (summary["mask_agreement"] >= gate.min_agreement, f">= {gate.min_agreement}")}
    if gate.max_dice_drop is not None and "dice_drop" in summary:
        checks["dice_drop"] = (summary["dice_drop"] <= gate.max_dice_drop, f"<= {gate.max_dice_drop}")
    return {
        "passed": all(ok for ok, _ in checks.values()),
        "checks": {k: {"passed": ok, "required": req, "value": summary[k]} for k, (ok, req) in checks.items()},
    }


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


def compare_with_torch(loaded, onnx_path: str | Path, batch: int = 3) -> float:
    """Max |probability difference| between ONNX Runtime and PyTorch on phantom inputs, at a batch
    size other than the export example's (proves the dynamic batch axis too)."""
    from lungrt.backends.onnxruntime import OnnxRuntimeRunner
    from lungrt.backends.pytorch import TorchRunner
    from lungrt.export.onnx import reference_inputs

    x = reference_inputs(loaded.spec, batch, seed=7)
    ref = TorchRunner(loaded).run(x)
    with OnnxRuntimeRunner(onnx_path) as ort_runner:
        got = ort_runner.run(x)
    return float(np.abs(ref - got).max())


def check_export(loaded):
    """`export_onnx`'s check: the written graph computes what PyTorch does, within FP32_TOLERANCE (NaN fails)."""
    from lungrt.core.errors import LungrtError
    from lungrt.export.onnx import FP32_TOLERANCE

    def check(path: Path) -> None:
        diff = compare_with_torch(loaded, path)
        if not diff <= FP32_TOLERANCE:  # NaN too: weights that make NaN must not pass
            raise LungrtError(f"exported graph differs from PyTorch (max |dp| {diff:.2e} > {FP32_TOLERANCE:.0e})")

    return check


def verify_candidate(reference: Runner, candidate: Runner, pairs: list[Pair], precision: str) -> dict:
    """The build's verification in one call: parity of `candidate` against `reference` on `pairs` and the
    verdict of its precision's gate ({"parity": summary, "gate": verdict, "runner": what ran})."""
    result = compare(reference, candidate, pairs)
    summary = result["summary"]
    summary.pop("worst", None)
    return {"parity": summary, "gate": apply_gate(summary, GATES[precision]), "runner": result["candidate_identity"]}
