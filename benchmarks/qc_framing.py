"""QC false alarms on clean validation films framed in ways the thresholds were not fitted on.

    .venv/bin/python benchmarks/qc_framing.py --data ../shared/data/cxr-mc-sz [--models unet,gsconv-unet,msag-unet]

The thresholds are fitted on the validation split as it comes, padded, cropped (by up to 1/16) and
down-sampled (`qc.REFRAMINGS`); other sites frame tighter and store smaller films. Here the same
films are framed tightly around their reference lungs (2 % or 4 % of the image at the sides and
below, twice that above), tightly and at 0.45 of the size, at 0.45 alone, and padded below only
(an off-centre collimation), then every shipped model's QC runs on its own predictions (ONNX
Runtime FP32): per framing, the share flagged and by which reasons (5 % is the fitted budget).
Writes benchmarks/results/qc_framing.json.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from _common import save_result
from shape_qc import predictions
from lungrt.build.resolve import open_runner
from lungrt.core.hardware import cpu_identity
from lungrt.data.datasets import select_split
from lungrt.data.io import read_mask, read_xray
from lungrt.inference.qc import QCThresholds, features, flags, reframe


def tight(image: np.ndarray, lungs: np.ndarray, margin: float) -> np.ndarray:
    """`image` cut to its lungs' box plus `margin` of its size at the sides and below, 2x above."""
    h, w = image.shape
    ys, xs = np.nonzero(lungs)
    top, bottom = max(0, int(ys.min() - 2 * margin * h)), min(h, int(ys.max() + margin * h) + 1)
    left, right = max(0, int(xs.min() - margin * w)), min(w, int(xs.max() + margin * w) + 1)
    return image[top:bottom, left:right]


def smaller(image: np.ndarray, factor: float = 0.45) -> np.ndarray:
    h, w = image.shape
    return cv2.resize(image, (round(w * factor), round(h * factor)), interpolation=cv2.INTER_AREA)


FRAMINGS = {
    "as it comes (fitted)": lambda im, lungs: im,
    "cropped by 1/16 (fitted)": lambda im, lungs: reframe(im, "cropped", lungs),
    "tight, 2 %": lambda im, lungs: tight(im, lungs, 0.02),
    "tight, 4 %": lambda im, lungs: tight(im, lungs, 0.04),
    "tight 2 %, at 0.45 size": lambda im, lungs: smaller(tight(im, lungs, 0.02)),
    "at 0.45 size": lambda im, lungs: smaller(im),
    "padded below by 1/4": lambda im, lungs: np.pad(im, ((0, im.shape[0] // 4), (0, 0))),
}


def flagged_by_framing(model: str, films: list[tuple[np.ndarray, np.ndarray]], batch: int = 8) -> dict:
    runner = open_runner(model, backend="onnxruntime", precision="fp32")
    qc = QCThresholds.from_dict(runner.info.qc)
    out = {}
    for name, frame in FRAMINGS.items():
        images = [frame(image, lungs) for image, lungs in films]
        probs = predictions(runner, images, batch)
        reasons = [flags(features(p, qc.shape, im.shape), qc) for p, im in zip(probs, images)]
        out[name] = {
            "images": len(images),
            "flagged": float(np.mean([bool(r) for r in reasons])),
            "reasons": dict(Counter(reason for r in reasons for reason in r).most_common()),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--models", default="unet,gsconv-unet,msag-unet")
    args = ap.parse_args()
    films = [(read_xray(p.image).gray8, read_mask(p.mask)) for p in select_split(args.data, "val")]
    result = {**cpu_identity(), "split": "val", "models": {}}
    for model in args.models.split(","):
        result["models"][model] = flagged_by_framing(model, films)
    save_result("qc_framing", result, echo=False)
    print("| framing (validation, clean) | " + " | ".join(result["models"]) + " |")
    print("|---|" + "---|" * len(result["models"]))
    for name in FRAMINGS:
        cells = []
        for rows in result["models"].values():
            row = rows[name]
            top = ", ".join(f"{k} {v}" for k, v in list(row["reasons"].items())[:3])
            cells.append(f"{100 * row['flagged']:.1f} % ({top})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
