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


def interleaved_ratio(runner: Runner, items: list[Item], x: np.ndarray, batch_size: int = 8, passes: int = 2,
                      chunks: int = 4, workers: int = 2) -> dict:
    """End-to-end and bare-model images/s and their ratio; `x` is one preprocessed batch."""
    parts = [items[i::chunks] for i in range(chunks)] * passes
    throughput(runner, x, seconds=2)  # warm-up
    t_e2e = t_bare = 0.0
    per_round = []
    for i, part in enumerate(parts):
        timings = {}
        for side in (("e2e", "bare") if i % 2 == 0 else ("bare", "e2e")):
            t0 = time.perf_counter()
            if side == "bare":
                for _ in range(-(-len(part) // batch_size)):
                    runner.run(x)
                timings[side] = time.perf_counter() - t0
            else:
                tmp = Path(tempfile.mkdtemp(prefix="lungrt-e2e-"))
                summary = run_infer(runner, part, tmp, InferOptions(batch_size=batch_size, workers=workers))
                timings[side] = time.perf_counter() - t0
                shutil.rmtree(tmp)
                if summary["ok"] != len(part):
                    raise RuntimeError(f"infer failed on {len(part) - summary['ok']} of {len(part)} images")
        t_e2e, t_bare = t_e2e + timings["e2e"], t_bare + timings["bare"]
        padded = -(-len(part) // batch_size) * batch_size  # the bare side runs whole batches
        per_round.append((len(part) / timings["e2e"]) / (padded / timings["bare"]))
    n = sum(len(p) for p in parts)
    bare_n = sum(-(-len(p) // batch_size) * batch_size for p in parts)
    return {"backend": runner.describe(), "images": n, "end_to_end_img_per_s": n / t_e2e,
            "bare_model_img_per_s": bare_n / t_bare, "ratio": (n / t_e2e) / (bare_n / t_bare), "ratio_per_round": per_round}
