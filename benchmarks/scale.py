"""Does `lungrt infer` stay flat with the number of inputs? Hard-linked trees of phantom X-rays.

    .venv/bin/python benchmarks/scale.py [--small 2000] [--large 20000] [--listing 50000]

For each tree size: CPU seconds per image (user + sys of the whole `lungrt infer` process, less a
50-input run's fixed cost: imports, opening the runner) and peak RSS, and their large/small ratios
(target: within 10 %); `--resume` on the complete large output, per 1,000 inputs; listing (what
infer does before the first batch: walking, sorting, the unique output names) for `--listing`
inputs; `lungrt report` time and size at the large output. The model is a width-4 U-Net trained
for one epoch on phantoms, so that what is measured is lungrt's own per-input cost, not the
network's. Results: printed and written to benchmarks/results/scale.json. Everything else lives in
a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import save_result
from lungrt.core.hardware import cpu_identity
from lungrt.data.io import write_png
from lungrt.data.phantoms import make_phantom, write_phantom_dataset

PER_FOLDER = 1000


def tree(root: Path, n: int, sources: list[Path]) -> Path:
    """n hard links to a few phantom PNGs, 1,000 to a folder (a hospital export's shape)."""
    for i in range(n):
        f = root / f"batch_{i // PER_FOLDER:03d}" / f"img_{i:06d}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        os.link(sources[i % len(sources)], f)
    return root


def measured(cmd: list[str]) -> dict:
    """Run `cmd`; its own CPU seconds, peak RSS and wall time (os.wait4: this child only)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) not in (0, 3):
        raise SystemExit(f"{' '.join(cmd[:6])}...: failed: {proc.stderr.read().decode()[-500:]}")
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": wall}


def tiny_model(folder: Path) -> Path:
    from lungrt.training.train import TrainConfig, train

    data = write_phantom_dataset(folder / "train", count=8, size=64, seed=3)
    train(
        TrainConfig(model="unet", width=4, size=64, epochs=1, batch_size=4, seed=0, augment=False),
        data,
        folder / "run",
        log=lambda *a: None,
    )
    return folder / "run" / "model.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--large", type=int, default=20000)
    ap.add_argument("--listing", type=int, default=50000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lungrt-scale-"))
    lungrt = [sys.executable, "-m", "lungrt.cli"]
    try:
        sources = []
        for i in range(8):
            sources.append(tmp / "src" / f"p{i}.png")
            write_png(sources[-1], (make_phantom(900 + i, 256).image * 255).astype(np.uint8))
        ckpt = tiny_model(tmp)
        common = ["--model", str(ckpt), "--backend", "onnxruntime", "--batch-size", "8", "--workers", "2"]
        measured([*lungrt, "infer", str(sources[0]), "--out", str(tmp / "warm-up"), *common])  # the ONNX cache
        runs = {}
        for n in (50, args.small, args.large):
            src = tree(tmp / f"in{n}", n, sources)
            runs[n] = measured([*lungrt, "infer", str(src), "--out", str(tmp / f"out{n}"), *common])
            print(f"{n} inputs: {runs[n]}", flush=True)
        fixed = runs[50]["cpu_s"]
        per_image = {n: (runs[n]["cpu_s"] - fixed) / (n - 50) for n in (args.small, args.large)}
        resume = measured(
            [
                *lungrt,
                "infer",
                str(tmp / f"in{args.large}"),
                "--out",
                str(tmp / f"out{args.large}"),
                *common,
                "--resume",
            ]
        )
        report = measured([*lungrt, "report", str(tmp / f"out{args.large}")])
        report_mb = (tmp / f"out{args.large}" / "report.html").stat().st_size / 2**20
        shutil.rmtree(tmp / f"in{args.small}")
        listing_tree = tree(tmp / "listing", args.listing, sources)
        from lungrt.inference.infer import collect_inputs

        t0 = time.perf_counter()
        listed = collect_inputs([str(listing_tree)], str(tmp / "out-listing"))
        listing_s = time.perf_counter() - t0
        assert len(listed) == args.listing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        **cpu_identity(),
        "cpu_ms_per_image": {str(n): round(1000 * v, 2) for n, v in per_image.items()},
        "cpu_ratio_large_over_small": round(per_image[args.large] / per_image[args.small], 3),
        "peak_rss_mb": {str(n): round(runs[n]["peak_rss_mb"], 1) for n in (50, args.small, args.large)},
        "rss_ratio_large_over_small": round(runs[args.large]["peak_rss_mb"] / runs[args.small]["peak_rss_mb"], 3),
        "fixed_cpu_s_50_inputs": round(fixed, 2),
        "resume_s_per_1000_on_complete_output": round(1000 * resume["wall_s"] / args.large, 3),
        "resume_wall_s": round(resume["wall_s"], 2),
        f"listing_s_{args.listing}": round(listing_s, 2),
        "report_s": round(report["wall_s"], 2),
        "report_mb": round(report_mb, 2),
        "report_rows": args.large,
        "command": f"benchmarks/scale.py --small {args.small} --large {args.large} --listing {args.listing}",
    }
    save_result("scale", result)


if __name__ == "__main__":
    main()
