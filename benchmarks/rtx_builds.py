"""Real TensorRT-RTX engines for every shipped model and precision, built ahead of time on this
(GPU-less) machine for the RTX 3090 class, each verified the way `lungrt build` verifies.

    .venv/bin/python benchmarks/rtx_builds.py [--data ../shared/data/cxr-mc-sz] [--targets sm86]

With --data, INT8 is calibrated on its training split and every build is gated on its validation
split (48 images); without, on generated phantoms. Prints a Markdown table (build seconds, engine
MiB, compute dtypes of the compiled graph, parity of what was checked) and writes
benchmarks/results/rtx_builds.json. Engines go beside the cached ONNX variants ($LUNGRT_CACHE/variants),
so the INT8 variants gated by `readme_tables.py parity` are the ones compiled.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lungrt.build import build_and_verify, census_text
from lungrt.core.cache import cache_root
from lungrt.models.checkpoint import resolve_model
from lungrt.backends.tensorrt import BatchProfile, parse_targets

MODELS = ("unet", "gsconv-unet", "msag-unet")
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--targets", default="sm86")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    targets = parse_targets(args.targets)
    rows = []
    folder = cache_root() / "variants"
    for name in args.models.split(","):
        loaded = resolve_model(name)
        for precision in ("fp32", "fp16", "int8"):
            t0 = time.time()
            b = build_and_verify(
                loaded,
                precision,
                "tensorrt-rtx",
                folder,
                args.data,
                "entropy",
                args.data,
                BatchProfile(1, 8, 16),
                4.0,
                False,
                targets,
                log=lambda *a: None,
            )
            meta = b.notes["engine"]
            v = b.verification
            rows.append(
                {
                    "model": name,
                    "precision": precision,
                    "targets": meta["targets"],
                    "tensorrt_rtx": meta["tensorrt"],
                    "build_seconds": meta["build_seconds"],
                    "total_seconds": round(time.time() - t0, 1),
                    "engine_mib": meta["engine_bytes"] / 2**20,
                    "census": meta["dtype_census"],
                    "checked": v["checked"],
                    "images": v["images"],
                    "agreement": v["parity"]["mask_agreement"],
                    "gate": v["gate"]["passed"],
                    "excluded_blocks": b.notes.get("excluded_blocks"),
                }
            )
            print(f"{name} {precision}: {meta['build_seconds']} s, {meta['engine_bytes'] / 2**20:.1f} MiB", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rtx_builds.json").write_text(json.dumps(rows, indent=2))
    print(
        f"\nTensorRT-RTX {rows[0]['tensorrt_rtx']}, targets {', '.join(rows[0]['targets'])}, batch profile 1-8-16, "
        f"checked on {rows[0]['images']} {'validation images' if args.data else 'phantoms'}\n"
    )
    print(
        (
            "| model | precision | build s | engine MiB | compute dtypes of "
            "the compiled graph | checked | mask agreement | gate |"
        )
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['precision']} | {r['build_seconds']:.1f} | {r['engine_mib']:.1f} | "
            f"{census_text(r['census'])} | {r['checked']} | {r['agreement']:.5f} | {'pass' if r['gate'] else 'FAIL'} |"
        )


if __name__ == "__main__":
    main()
