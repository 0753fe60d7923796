"""Peak memory of `LungSegmenter.predict(folder, stream=True)` over native-size DICOMs: 100 vs 500.

    .venv/bin/python benchmarks/stream_memory.py [--small 100] [--large 500] [--model msag-unet]

A 2320x2320 16-bit DICOM phantom (5.4 MP) is hard-linked N times into a folder; a fresh process
streams the folder through the API (results consumed one at a time, areas kept) and reports its peak
RSS (os.wait4). Target: the large/small ratio within 10 %. Results: printed and written to
benchmarks/results/stream_memory.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import save_result
from lungrt.core.hardware import cpu_identity
from lungrt.data.dicom import write_dicom
from lungrt.data.phantoms import make_chest_phantom

CHILD = """
import sys, lungrt
seg = lungrt.LungSegmenter.load(sys.argv[2], backend=sys.argv[3])
n = sum(1 for r in seg.predict(sys.argv[1], stream=True) if r.right_lung_px is not None)
print(n)
"""


def peak_rss_mb(folder: Path, model: str, backend: str) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder), model, backend],
        stdout=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the streaming run over {folder} failed")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0, int(proc.stdout.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--large", type=int, default=500)
    ap.add_argument("--model", default="msag-unet")
    ap.add_argument("--backend", default="onnxruntime")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lungrt-stream-") as tmp:
        source = Path(tmp) / "native.dcm"
        write_dicom(source, (make_chest_phantom(1, 2320).image * 4000).astype(np.uint16))
        rows = {}
        for n in (args.small, args.large):
            folder = Path(tmp) / f"in{n}"
            folder.mkdir()
            for i in range(n):
                os.link(source, folder / f"x{i:05d}.dcm")
            rss, wall, done = peak_rss_mb(folder, args.model, args.backend)
            rows[n] = {"peak_rss_mb": round(rss, 1), "wall_s": round(wall, 1), "results": done}
            print(n, rows[n], flush=True)
    result = {
        **cpu_identity(),
        "model": args.model,
        "backend": args.backend,
        "megapixels": 5.38,
        "runs": {str(k): v for k, v in rows.items()},
        "rss_ratio_large_over_small": round(rows[args.large]["peak_rss_mb"] / rows[args.small]["peak_rss_mb"], 3),
        "command": f"benchmarks/stream_memory.py --small {args.small} --large {args.large} --model {args.model}",
    }
    save_result("stream_memory", result)


if __name__ == "__main__":
    main()
