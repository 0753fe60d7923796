"""The shape model as QC and as completion, on the shared X-rays (test and validation splits).

    .venv/bin/python benchmarks/shape_qc.py --data ../shared/data/cxr-mc-sz [--model msag-unet] [--pictures DIR]

1. Estimated Dice (`qc_shape_dice`: the mask against its plausible shape fit) against the true Dice
   on the test split: correlation, and the share of masks with true Dice < 0.9 that QC flags.
2. QC on corruptions of the test split: clean, a dense whole-lung opacity (`consolidation`,
   severe), lobe white-outs (`lobe`: the lower part of one lung, ribs kept; moderate and severe):
   flagged share (any reason / `implausible_shape`), Dice of what QC lets through.
3. False alarms on the validation split as it comes and re-framed (`qc.REFRAMINGS`).
4. The completion gate (`--complete-shape`): Dice and HD95 with and without it, on the clean test
   split (may lose at most 0.001 Dice, HD95 must not rise) and under the severe opacities (must gain).

Runs the model's FP32 ONNX variant on ONNX Runtime. `--pictures DIR` writes the worst masks (by true
Dice) with their shape fit and reference as PNGs there: pictures of the restricted X-rays, to look
at, never to commit. Results: benchmarks/results/shape_qc.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from _common import save_result
from lungrt.build.resolve import open_runner
from lungrt.core.hardware import cpu_identity
from lungrt.data.abnormalities import paint_benchmark
from lungrt.data.datasets import select_split
from lungrt.data.io import XRay, read_mask, read_xray
from lungrt.evaluation.metrics import segmentation_metrics
from lungrt.inference.infer import measure
from lungrt.inference.qc import REFRAMINGS, QCThresholds, reframe
from lungrt.inference.shape import plausible_fit

CASES = {
    "clean": None,
    "dense opacity, whole lung (severe)": ("consolidation", "severe"),
    "lobe white-out (moderate)": ("lobe", "moderate"),
    "lobe white-out (severe)": ("lobe", "severe"),
}


def predictions(runner, images: list[np.ndarray], batch: int = 8) -> np.ndarray:
    x = np.stack([runner.spec.apply(XRay("", im).gray8) for im in images])
    return np.concatenate([runner.run(x[i : i + batch]) for i in range(0, len(x), batch)])[:, 0]


def score(pred: np.ndarray, gold: np.ndarray) -> tuple[float, float]:
    m = segmentation_metrics(pred > 0, gold)
    return m["dice"], m.get("hd95", float("nan"))


def picture(path: Path, image: np.ndarray, mask: np.ndarray, gold: np.ndarray, prob: np.ndarray, qc) -> None:
    """The film with the mask (green), its plausible shape fit (yellow) and the reference (red)."""
    rgb = cv2.cvtColor((image * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    rgb[mask > 0] = (0.6 * rgb[mask > 0] + 0.4 * np.array([0, 200, 0])).astype(np.uint8)
    fit = plausible_fit(prob, qc.shape, mask.shape)
    layers = [(gold.astype(np.uint8), (0, 0, 255))] + ([(fit, (0, 255, 255))] if fit is not None else [])
    for region, colour in layers:
        contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(rgb, contours, -1, colour, max(1, mask.shape[1] // 300))
    cv2.imwrite(str(path), rgb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", default="msag-unet")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--pictures", type=Path)
    args = ap.parse_args()
    test, val = select_split(args.data, "test"), select_split(args.data, "val")
    if args.limit:
        test, val = test[: args.limit], val[: args.limit]
    runner = open_runner(args.model, backend="onnxruntime", precision="fp32")
    qc = QCThresholds.from_dict(runner.info.qc)
    if qc.shape is None:
        raise SystemExit(f"{args.model} carries no shape model: re-fit its QC (scripts/ship_weights.py --qc-only)")
    rows = {name: [] for name in CASES}
    worst = []
    for i, pair in enumerate(test):
        xr, gold = read_xray(pair.image), read_mask(pair.mask)
        images = [
            xr.pixels if kind is None else paint_benchmark(xr.pixels, gold, *kind, seed=i) for kind in CASES.values()
        ]
        for (name, image), prob in zip(zip(CASES, images), predictions(runner, images)):
            plain = measure(XRay("", image), prob, runner.spec, True, qc)
            completed = measure(XRay("", image), prob, runner.spec, True, qc, complete_shape=True)
            dice, hd95 = score(plain.mask, gold)
            dice_c, hd95_c = score(completed.mask, gold)
            rows[name].append(
                {
                    "dice": dice,
                    "hd95": hd95,
                    "dice_completed": dice_c,
                    "hd95_completed": hd95_c,
                    "estimated": plain.qc_features["shape_dice"],
                    "distance": plain.qc_features["shape_distance"],
                    "flagged": plain.qc != "ok",
                    "implausible": "implausible_shape" in plain.qc.split(";"),
                }
            )
            worst.append((dice, name, pair, image, plain.mask, gold, prob))
    val_rows = {}
    for framing in (None, *REFRAMINGS):
        flagged = implausible = 0
        for start in range(0, len(val), 16):
            chunk = [(read_xray(p.image).gray8, read_mask(p.mask)) for p in val[start : start + 16]]
            chunk = [reframe(im, framing, gold) if framing else im for im, gold in chunk]
            for im, prob in zip(chunk, predictions(runner, [im.astype(np.float32) / 255 for im in chunk])):
                verdict = measure(XRay("", im), prob, runner.spec, True, qc).qc.split(";")
                flagged += verdict != ["ok"]
                implausible += "implausible_shape" in verdict
        val_rows[framing or "as it comes"] = {
            "images": len(val),
            "flagged": flagged / len(val),
            "implausible_shape": implausible / len(val),
        }
    result = {
        **cpu_identity(),
        "model": args.model,
        "backend": runner.describe(),
        "qc_fitted_on": qc.fitted_on,
        "shape_model": qc.shape.fitted_on,
        "modes": len(qc.shape.variances),
        "test": {},
        "validation": val_rows,
    }
    for name, r in rows.items():
        dice, est = np.array([x["dice"] for x in r]), np.array([x["estimated"] for x in r])
        flagged, implausible = np.array([x["flagged"] for x in r]), np.array([x["implausible"] for x in r])
        low = dice < 0.9
        result["test"][name] = {
            "images": len(r),
            "flagged": flagged.mean(),
            "implausible_shape": implausible.mean(),
            "dice": dice.mean(),
            "dice_unflagged": dice[~flagged].mean() if (~flagged).any() else None,
            "true_dice_below_0.9": int(low.sum()),
            "of_those_flagged": float(flagged[low].mean()) if low.any() else None,
            "correlation_estimated_true": float(np.corrcoef(est, dice)[0, 1]) if est.std() and dice.std() else None,
            "hd95": float(np.nanmean([x["hd95"] for x in r])),
            "dice_completed": float(np.mean([x["dice_completed"] for x in r])),
            "hd95_completed": float(np.nanmean([x["hd95_completed"] for x in r])),
            "completed_images": int(implausible.sum()),
        }
    save_result("shape_qc", result)
    if args.pictures:
        args.pictures.mkdir(parents=True, exist_ok=True)
        for k, (dice, name, pair, image, mask, gold, prob) in enumerate(sorted(worst, key=lambda w: w[0])[:8]):
            picture(
                args.pictures / f"worst{k}-{pair.name}-{name.split(' (')[0].replace(' ', '_').replace(',', '')}.png",
                image,
                mask,
                gold,
                prob,
                qc,
            )


if __name__ == "__main__":
    main()
