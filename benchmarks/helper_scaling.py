"""Do infer's helper threads scale, or does the GIL hold them back? Native-size DICOMs, host-bound.

    .venv/bin/python benchmarks/helper_scaling.py [--images 48] [--repeat 2]

48 native 5.4 MP 16-bit DICOMs (hard links of a few phantoms) through `lungrt infer` with a width-4
U-Net (the model costs next to nothing, so decoding, preprocessing, mask and PNG work are what is
timed) and `--workers 1` then `--workers 2`, alternating, best of `--repeat` wall times. If the
reader/writer threads were GIL-bound, 2 workers would not beat 1 on these 2 cores; a process pool
would then be the remedy. Results: printed and written to benchmarks/results/helper_scaling.json.
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

sys.path.insert(0, str(Path(__file__).parent))
from scale import tiny_model  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lungrt-helpers-") as tmp:
        tmp = Path(tmp)
        sources = []
        for i in range(4):
            sources.append(tmp / f"src{i}.dcm")
            write_dicom(sources[-1], (make_chest_phantom(30 + i, 2320).image * 4000).astype(np.uint16))
        (tmp / "in").mkdir()
        for i in range(args.images):
            os.link(sources[i % 4], tmp / "in" / f"x{i:04d}.dcm")
        ckpt = tiny_model(tmp)
        common = ["--model", str(ckpt), "--backend", "onnxruntime", "--batch-size", "8"]
        lungrt = [sys.executable, "-m", "lungrt.cli", "infer", str(tmp / "in")]
        subprocess.run([*lungrt, "--out", str(tmp / "warm"), *common], check=True, capture_output=True)
        best: dict[int, float] = {}
        busy: dict[int, float] = {}  # CPU seconds per wall second of the whole process
        for r in range(args.repeat):
            for workers in (1, 2):
                t0 = time.perf_counter()
                proc = subprocess.Popen([*lungrt, "--out", str(tmp / f"o{workers}_{r}"), *common, "--workers",
                                         str(workers)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                _, status, usage = os.wait4(proc.pid, 0)
                wall = time.perf_counter() - t0
                assert os.waitstatus_to_exitcode(status) == 0
                if wall < best.get(workers, float("inf")):
                    best[workers], busy[workers] = wall, (usage.ru_utime + usage.ru_stime) / wall
                print(f"workers {workers}: {wall:.1f} s, {busy[workers]:.2f} cores busy", flush=True)
    result = {**cpu_identity(), "images": args.images, "megapixels": 5.38,
              "best_wall_s": {str(k): round(v, 2) for k, v in best.items()},
              "images_per_s": {str(k): round(args.images / v, 2) for k, v in best.items()},
              "speedup_2_over_1": round(best[1] / best[2], 2),
              "cores_busy": {str(k): round(v, 2) for k, v in busy.items()},
              "command": f"benchmarks/helper_scaling.py --images {args.images} --repeat {args.repeat}"}
    save_result("helper_scaling", result)


if __name__ == "__main__":
    main()
