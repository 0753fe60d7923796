"""Does QC catch broken masks? Test-split X-rays are corrupted in ways that break segmentation;
per corruption: the share of images QC flags, and how good the masks are that it lets through.

    .venv/bin/python benchmarks/qc_corruptions.py --data ../shared/data/cxr-mc-sz [--models msag-unet]

Scored at native resolution against the gold mask transformed like the image (rotations, flips,
crops); "not a chest" images have no lung, so every unflagged one is a miss. Clean test images give
the false-alarm rate. Runs the shipped model's FP32 ONNX variant on ONNX Runtime; writes
benchmarks/results/qc_corruptions.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from lungrt.data.abnormalities import paint_benchmark
from lungrt.build.resolve import open_runner
from lungrt.data.datasets import select_split
from lungrt.inference.infer import measure
from lungrt.data.io import XRay, read_mask, read_xray
from lungrt.evaluation.metrics import segmentation_metrics
from lungrt.inference.qc import QCThresholds

RESULTS = Path(__file__).parent / "results"


def corruptions(img: np.ndarray, gold: np.ndarray, rng: np.random.Generator):
    """(name, image, gold) for each corruption of one X-ray (float image in [0, 1])."""
    h, w = img.shape
    yield "clean", img, gold
    yield (
        "dense opacity, whole lung",
        paint_benchmark(img, gold, "consolidation", "severe", int(rng.integers(1 << 30))),
        gold,
    )
    yield (
        "lobe white-out (lower part of one lung)",
        paint_benchmark(img, gold, "lobe", "severe", int(rng.integers(1 << 30))),
        gold,
    )
    yield "heavy noise", np.clip(img + rng.normal(0, 0.3, img.shape), 0, 1).astype(np.float32), gold
    yield "wrong exposure (burned out)", np.clip((img - 0.6) * 4, 0, 1).astype(np.float32), gold
    yield "rotated 90 degrees", np.rot90(img).copy(), np.rot90(gold).copy()
    yield "upside down", img[::-1].copy(), gold[::-1].copy()
    half = slice(0, w // 2)
    crop = cv2.resize(img[:, half], (w, h), interpolation=cv2.INTER_LINEAR)
    crop_gold = cv2.resize(gold[:, half].astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    yield "one side only (lateral-like crop)", crop, crop_gold
    yield "not a chest (smooth texture)", _not_a_chest(h, w, rng), np.zeros_like(gold)


def _not_a_chest(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A bony, blobby picture with no lungs: a stand-in for an abdomen, a limb or a scanned form."""
    small = rng.random((8, 8)).astype(np.float32)
    base = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(6):
        cv2.ellipse(
            base,
            (int(rng.integers(w)), int(rng.integers(h))),
            (int(rng.integers(10, w // 4)), int(rng.integers(10, h // 4))),
            float(rng.uniform(0, 180)),
            0,
            360,
            float(rng.uniform(0.6, 1.0)),
            -1,
        )
    return np.clip(base, 0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--models", default="msag-unet")
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    pairs = select_split(args.data, "test")
    pairs = pairs[: args.limit] if args.limit else pairs
    report = {}
    for model in args.models.split(","):
        with open_runner(model, backend="onnxruntime", precision="fp32") as runner:
            thresholds = QCThresholds.from_dict(runner.info.qc)
            rows: dict[str, list[tuple[bool, float]]] = {}
            rng = np.random.default_rng(7)
            for pair in pairs:
                xr, gold = read_xray(pair.image), read_mask(pair.mask)
                cases = list(corruptions(xr.pixels, gold, rng))
                probs = runner.run(np.stack([runner.spec.apply(XRay("", c[1]).gray8) for c in cases]))
                for (name, img, g), p in zip(cases, probs):
                    m = measure(XRay("", img), p[0], runner.spec, True, thresholds)
                    dice = segmentation_metrics(m.mask > 0, g)["dice"] if g.any() else float(not m.mask.any())
                    rows.setdefault(name, []).append((m.qc != "ok", dice))
            table = []
            for name, vals in rows.items():
                flagged = np.array([f for f, _ in vals])
                dice = np.array([d for _, d in vals])
                table.append(
                    {
                        "corruption": name,
                        "images": len(vals),
                        "flagged": float(flagged.mean()),
                        "dice_unflagged": float(dice[~flagged].mean()) if (~flagged).any() else None,
                        "dice_flagged": float(dice[flagged].mean()) if flagged.any() else None,
                        "unflagged_below_0.9": int(((dice < 0.9) & ~flagged).sum()),
                    }
                )
            bounds = {
                k: v for k, v in thresholds.to_dict().items() if k != "shape_model"
            }  # the shape model: in the weights
            report[model] = {"thresholds": bounds, "rows": table}
        print(
            f"\n{model}: QC thresholds {thresholds.fitted_on} (validation false alarms "
            f"{'n/a' if thresholds.false_alarm_val is None else f'{thresholds.false_alarm_val:.1%}'})\n"
        )
        print("| corruption | images | flagged | Dice of unflagged | unflagged with Dice < 0.9 | Dice of flagged |")
        print("|---|---|---|---|---|---|")
        for r in table:
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            print(
                f"| {r['corruption']} | {r['images']} | {r['flagged']:.1%} | {fmt(r['dice_unflagged'])} | "
                f"{r['unflagged_below_0.9']} | {fmt(r['dice_flagged'])} |"
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "qc_corruptions.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
