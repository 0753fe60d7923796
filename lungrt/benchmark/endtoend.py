"""`lungrt infer` end to end against the bare model on the same runner, measured interleaved.

A shared VM's speed drifts by up to 40% within seconds (a neighbour's load), so the images go in
chunks, each paired with a bare-model slice of the same image count, in ABBA order, and both sides
are summed over the same stretch of time."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from lungrt.backends.base import Runner
from lungrt.evaluation.parity import throughput
from lungrt.inference.infer import InferOptions, Item, run_infer


def interleaved_ratio(
    runner: Runner,
    items: list[Item],
    x: np.ndarray,
    batch_size: int = 8,
    passes: int = 2,
    chunks: int = 4,
    workers: int = 2,
    pool: str = "thread",
) -> dict:
    """End-to-end and bare-model images/s and their ratio; `x` is one preprocessed batch."""
    parts = [items[i::chunks] for i in range(chunks)] * passes
    options = InferOptions(batch_size=batch_size, workers=workers, pool=pool)
    # warm-up, both sides: the bare model, and one untimed batch through infer (its first call pays
    # for imports, pools and caches once: 0.64-0.68 of the bare model in a fresh process against
    # 0.70-0.80 for the calls after it, in the same process on the same images)
    throughput(runner, x, seconds=2)
    _infer_part(runner, parts[0][:batch_size], options)
    t_e2e = t_bare = 0.0
    per_round = []
    for i, part in enumerate(parts):
        timings = {}
        for side in ("e2e", "bare") if i % 2 == 0 else ("bare", "e2e"):
            t0 = time.perf_counter()
            if side == "bare":
                for _ in range(-(-len(part) // batch_size)):
                    runner.run(x)
                timings[side] = time.perf_counter() - t0
            else:
                timings[side] = _infer_part(runner, part, options)
        t_e2e, t_bare = t_e2e + timings["e2e"], t_bare + timings["bare"]
        padded = -(-len(part) // batch_size) * batch_size  # the bare side runs whole batches
        per_round.append((len(part) / timings["e2e"]) / (padded / timings["bare"]))
    n = sum(len(p) for p in parts)
    bare_n = sum(-(-len(p) // batch_size) * batch_size for p in parts)
    return {
        "backend": runner.describe(),
        "images": n,
        "end_to_end_img_per_s": n / t_e2e,
        "bare_model_img_per_s": bare_n / t_bare,
        "ratio": (n / t_e2e) / (bare_n / t_bare),
        "ratio_per_round": per_round,
    }


def _infer_part(runner: Runner, part: list[Item], options: InferOptions) -> float:
    """Seconds `lungrt infer` took for `part` (into a temporary folder, removed after, untimed)."""
    tmp = Path(tempfile.mkdtemp(prefix="lungrt-e2e-"))
    try:
        t0 = time.perf_counter()
        summary = run_infer(runner, part, tmp, options)
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp)
    if summary["ok"] != len(part):
        raise RuntimeError(f"infer failed on {len(part) - summary['ok']} of {len(part)} images")
    return seconds


class ReplayRunner(Runner):
    """Stand-in for a model that costs nothing: returns probabilities computed once by `runner`
    for one batch. For measuring what `lungrt infer` costs around the model; never a backend."""

    def __init__(self, runner: Runner, x: np.ndarray):
        self.info, self.spec, self.weights_id = runner.info, runner.spec, runner.weights_id
        self.sleeps_when_idle, self.precision = True, runner.precision
        self.backend, self.device = f"replay-of-{runner.backend}", runner.device
        self.probs = runner.run(x)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.probs[: len(batch)]


def pipeline_core_ms(runner: Runner, items: list[Item], x: np.ndarray, batch_size: int = 8, workers: int = 2) -> float:
    """CPU milliseconds per image that `lungrt infer` spends on everything but the model (decode,
    preprocess, inverse resize, clean-up, QC, encode, journal), summed over all threads: with a
    model costing m core-ms per image, end to end can reach at most m / (m + this) of the bare
    model on a machine whose cores both share."""
    replay = ReplayRunner(runner, x)
    tmp = Path(tempfile.mkdtemp(prefix="lungrt-pipeline-"))
    try:
        c0 = time.process_time()
        summary = run_infer(replay, items, tmp, InferOptions(batch_size=batch_size, workers=workers))
        spent = time.process_time() - c0
    finally:
        shutil.rmtree(tmp)
    if summary["ok"] != len(items):
        raise RuntimeError(f"infer failed on {len(items) - summary['ok']} of {len(items)} images")
    return 1000.0 * spent / len(items)
