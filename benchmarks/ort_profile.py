"""Where ONNX Runtime spends its time, by operator type, for each precision variant of a model.

    .venv/bin/python benchmarks/ort_profile.py --model unet --batch 8 --calib ../shared/data/cxr-mc-sz

Uses ONNX Runtime's own profiler (SessionOptions.enable_profiling) on the optimized graph.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lungrt.models.checkpoint import resolve_model
from lungrt.export.onnx import reference_inputs
from lungrt.export.variants import make_variant


def profile(path: Path, x: np.ndarray, runs: int) -> tuple[dict, float]:
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    opts.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})  # warm-up
    for _ in range(runs):
        sess.run(None, {name: x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"] / 1e3 / (runs + 1)
    return dict(by_op), sum(by_op.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="unet")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--calib", type=Path, default=None)
    args = ap.parse_args()
    loaded = resolve_model(args.model)
    x = np.repeat(reference_inputs(loaded.spec, 1), args.batch, 0)
    for precision in ("fp32", "int8"):
        path = make_variant(loaded, precision, calib_dir=args.calib).path
        ops, total = profile(path, x, args.runs)
        print(f"\n{args.model} {precision}: {total:.1f} ms of kernel time per batch of {args.batch}")
        for op, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:8]:
            print(f"  {op:24s} {ms:8.1f} ms  {100 * ms / total:5.1f}%")


if __name__ == "__main__":
    main()
