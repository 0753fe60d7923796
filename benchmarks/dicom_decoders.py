"""Decode time of a 5.4-megapixel 16-bit chest DICOM per transfer syntax and decoder plugin.

    .venv/bin/python benchmarks/dicom_decoders.py [--repeat 5]

A 2320x2320 phantom (12 bits stored) is written in each syntax pydicom or python-gdcm can encode
(`lungrt.data.dicom.write_dicom`); each installed pydicom decoding plugin decodes it `--repeat`
times on one thread (median ms; `dcmread` included, as in infer). Lossless syntaxes are checked
to give back the very pixels. Prints a Markdown table and writes benchmarks/results/dicom_decoders.json;
the fastest plugin per syntax is what `lungrt.data.dicom.PREFERRED_DECODER` records.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import save_result
from lungrt.core.hardware import cpu_identity
from lungrt.data.dicom import SYNTAXES, write_dicom
from lungrt.data.phantoms import make_phantom

SIDE = 2320  # 5.38 MP


def decode_ms(path: str, plugin: str, repeat: int) -> tuple[float, np.ndarray]:
    import pydicom

    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ds = pydicom.dcmread(path)
        ds.pixel_array_options(decoding_plugin=plugin)
        pixels = ds.pixel_array
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), pixels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from pydicom.pixels import get_decoder

    rng = np.random.default_rng(0)
    image = make_phantom(11, SIDE).image
    pixels = np.clip(image * 3800 + rng.normal(0, 12, image.shape), 0, 4095).astype(np.uint16)  # detector noise
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, syntax in SYNTAXES.items():
            if not syntax.uid.is_compressed:
                continue
            data = (pixels >> 4).astype(np.uint8) if name == "jpeg-baseline" else pixels
            path = str(Path(tmp) / f"{name}.dcm")
            try:
                write_dicom(path, data, name)
            except Exception as e:  # noqa: BLE001 - reported as a row
                rows.append({"syntax": syntax.uid.name, "key": name, "encoded": f"cannot encode here ({e})"})
                continue
            size_mb = os.path.getsize(path) / 2**20
            row = {"syntax": syntax.uid.name, "key": name, "mb": round(size_mb, 2), "ms": {}}
            for plugin in sorted(get_decoder(syntax.uid).available_plugins):
                try:
                    ms, got = decode_ms(path, plugin, args.repeat)
                except Exception as e:  # noqa: BLE001
                    row["ms"][plugin] = f"fails ({type(e).__name__})"
                    continue
                exact = bool(np.array_equal(got, data)) if syntax.lossless else None
                row["ms"][plugin] = round(ms, 1) if exact in (True, None) else f"{ms:.1f} (NOT lossless)"
            timed = {p: v for p, v in row["ms"].items() if isinstance(v, float)}
            row["fastest"] = min(timed, key=timed.get) if timed else None
            rows.append(row)
            print(row, flush=True)
    result = {**cpu_identity(), "megapixels": round(SIDE * SIDE / 1e6, 2), "repeat": args.repeat, "rows": rows}
    save_result("dicom_decoders", result, echo=False)
    plugins = sorted({p for r in rows for p in r.get("ms", {})})
    print(f"\n{result['megapixels']} MP 16-bit (12 stored), median of {args.repeat}, ms per image on one core\n")
    print("| transfer syntax | MB | " + " | ".join(plugins) + " | fastest |")
    print("|---|---|" + "---|" * len(plugins) + "---|")
    for r in rows:
        if "ms" not in r:
            print(f"| {r['syntax']} | {r['encoded']} |" + " |" * (len(plugins) + 1))
            continue
        cells = [str(r["ms"].get(p, "-")) for p in plugins]
        print(f"| {r['syntax']} | {r['mb']} | " + " | ".join(cells) + f" | {r['fastest']} |")


if __name__ == "__main__":
    main()
