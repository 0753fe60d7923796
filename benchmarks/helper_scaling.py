"""Do infer's helpers scale on threads, or does the GIL hold them back? Native-size DICOMs.

    .venv/bin/python benchmarks/helper_scaling.py [--images 48] [--repeat 3]

1. Host work alone: what infer's helpers do for one native 5.4 MP 16-bit DICOM (decode,
   preprocess, mask and measure on a fixed probability map, 1-bit PNG, write), over the images on
   1 and 2 threads and on 1 and 2 processes, OpenCV single-threaded everywhere (the pool is the
   parallelism), alternating, best of `--repeat`. Processes show what the cores allow; threads fall
   short of them by the GIL-held share g of the work:
   threads(2) = e * 2 / (t * (1 + g)), with t the one-process time per image and e = processes(2)
   / (2 * processes(1)) the cores' own efficiency. Threads then cap at about 1/g cores of host
   work however many cores there are (Amdahl), processes do not.
2. `lungrt infer` end to end with a width-4 U-Net (the model costs next to nothing), `--workers 1`
   and `2`, `--pool thread` and `process`, alternating, best of `--repeat` (images/s of the run
   from its summary: helper start-up included, the CLI's start-up and model loading not).

Results: printed and written to benchmarks/results/helper_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from _common import save_result
from lungrt.core.hardware import cpu_identity
from lungrt.data.dicom import write_dicom
from lungrt.data.io import atomic_write_bytes, encode_mask_png1, read_xray
from lungrt.data.phantoms import make_chest_phantom
from lungrt.inference.infer import measure
from lungrt.models.checkpoint import resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from scale import tiny_model  # noqa: E402

SPEC = resolve_model("unet").spec
OUT = Path(tempfile.gettempdir())


def _single_threaded_opencv() -> None:
    cv2.setNumThreads(1)


def _probability_map() -> np.ndarray:
    """Two smooth lung-shaped blobs at the network's size: a fixed stand-in for the model's output."""
    prob = np.zeros((SPEC.size, SPEC.size), np.float32)
    s = SPEC.size
    prob[int(0.16 * s) : int(0.74 * s), int(0.12 * s) : int(0.43 * s)] = 1
    prob[:, s // 2 :] = prob[:, : s // 2][:, ::-1]
    return cv2.GaussianBlur(prob, (0, 0), s / 40)


PROB = _probability_map()


def host_one(path: str) -> int:
    """What a helper does for one image, bar the model (read as infer reads without overlays)."""
    xr = read_xray(path, reduce_for=SPEC)
    SPEC.apply_xray(xr)
    m = measure(xr, PROB, SPEC, True, None)
    atomic_write_bytes(OUT / (Path(path).stem + ".mask.png"), encode_mask_png1(m.mask), durable=False)
    return m.right_px


def host_scaling(files: list[str], repeat: int) -> dict:
    _single_threaded_opencv()
    kinds = {"thread": ThreadPoolExecutor, "process": ProcessPoolExecutor}
    pools = {
        (k, n): (kinds[k](n) if k == "thread" else kinds[k](n, initializer=_single_threaded_opencv))
        for k in kinds
        for n in (1, 2)
    }
    for pool in pools.values():
        list(pool.map(host_one, files[:4]))  # start the processes, warm the caches
    best: dict = {}
    for r in range(repeat):
        for key, pool in list(pools.items()) if r % 2 == 0 else list(pools.items())[::-1]:
            t0 = time.perf_counter()
            list(pool.map(host_one, files))
            best[key] = min(best.get(key, float("inf")), time.perf_counter() - t0)
            print(f"host work, {key[1]} {key[0]}(s): {len(files) / (time.perf_counter() - t0):.1f} img/s", flush=True)
    for pool in pools.values():
        pool.shutdown()
    rate = {f"{ {'thread': 'threads', 'process': 'processes'}[k] }_{n}": len(files) / v for (k, n), v in best.items()}
    efficiency = rate["processes_2"] / (2 * rate["processes_1"])
    gil_share = 2 * efficiency * rate["processes_1"] / rate["threads_2"] - 1
    return {
        "images_per_s": {k: round(v, 1) for k, v in rate.items()},
        "core_ms_per_image_one_process": round(1000 / rate["processes_1"], 2),
        "speedup_2_over_1": {
            "threads": round(rate["threads_2"] / rate["threads_1"], 2),
            "processes": round(rate["processes_2"] / rate["processes_1"], 2),
        },
        "two_core_efficiency": round(efficiency, 3),
        "gil_share": round(gil_share, 3),
        "thread_cap_cores": round(1 / gil_share, 1) if gil_share > 0 else None,
    }


def infer_scaling(tmp: Path, repeat: int) -> dict:
    """images/s of the run itself (infer's summary: from its first input to results.csv, helper
    processes' start-up included, the CLI's own start-up and model loading not)."""
    ckpt = tiny_model(tmp)
    common = ["--model", str(ckpt), "--backend", "onnxruntime", "--batch-size", "8"]
    lungrt = [sys.executable, "-m", "lungrt.cli", "infer", str(tmp / "in")]
    subprocess.run([*lungrt, "--out", str(tmp / "warm"), *common], check=True, capture_output=True)
    best: dict[str, float] = {}
    configs = [(pool, workers) for pool in ("thread", "process") for workers in (1, 2)]
    for r in range(repeat):
        for pool, workers in configs if r % 2 == 0 else configs[::-1]:
            key, summary = f"{pool}_{workers}", tmp / "summary.json"
            subprocess.run(
                [
                    *lungrt,
                    "--out",
                    str(tmp / f"o{key}_{r}"),
                    *common,
                    "--workers",
                    str(workers),
                    "--pool",
                    pool,
                    "--json",
                    str(summary),
                ],
                check=True,
                capture_output=True,
            )
            rate = json.loads(summary.read_text())["images_per_second"]
            best[key] = max(best.get(key, 0.0), rate)
            print(f"infer --pool {pool} --workers {workers}: {rate:.1f} img/s", flush=True)
    return {
        "images_per_s": {k: round(v, 1) for k, v in best.items()},
        "speedup_2_over_1": {pool: round(best[f"{pool}_2"] / best[f"{pool}_1"], 2) for pool in ("thread", "process")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=3)
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
        files = sorted(str(p) for p in (tmp / "in").glob("*.dcm"))
        host = host_scaling(files, args.repeat)
        infer = infer_scaling(tmp, args.repeat)
    result = {
        **cpu_identity(),
        "images": args.images,
        "megapixels": 5.38,
        "host_work": host,
        "infer": infer,
        "command": f"benchmarks/helper_scaling.py --images {args.images} --repeat {args.repeat}",
    }
    save_result("helper_scaling", result)


if __name__ == "__main__":
    main()
