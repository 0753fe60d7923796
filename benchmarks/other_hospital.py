"""X-rays from another hospital, without masks: what a new user sees before trusting the models there.

    .venv/bin/python benchmarks/other_hospital.py --data ../shared/data/cxr-mc-sz/unlabeled-other-source \
        [--models unet,gsconv-unet,msag-unet] [--compare runs/unet-sil,...]

No gold masks, so no Dice: per model, how many images QC flags and why, the right/left lung balance
(an opacified lung left out of the mask shows as a lopsided pair) and how far the models agree with
each other (mean pairwise Dice). `--compare` puts other weights (checkpoints or run folders) beside
the named ones, in the same order. Writes benchmarks/results/other_hospital.json and, to look at
only (restricted X-rays: git-ignored, never committed), other_hospital_<model>.png, an overlay sheet.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from lungrt.api import LungSegmenter
from lungrt.evaluation.metrics import dice_batch

RESULTS = Path(__file__).parent / "results"


def overlay_sheet(files: list[Path], results: list, path: Path, cols: int = 8, tile: int = 200) -> None:
    tiles = []
    for f, r in zip(files, results):
        t = cv2.resize(cv2.cvtColor(r.overlay(), cv2.COLOR_RGB2BGR), (tile, tile), interpolation=cv2.INTER_AREA)
        label = f.stem + ("" if r.qc == "ok" else " QC")
        cv2.putText(t, label, (5, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 255, 255), 2)
        tiles.append(t)
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % cols)
    cv2.imwrite(str(path), np.vstack([np.hstack(tiles[i : i + cols]) for i in range(0, len(tiles), cols)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a folder of X-rays (no masks needed)")
    ap.add_argument("--models", default="unet,gsconv-unet,msag-unet")
    ap.add_argument("--compare", default="", help="other weights, one per model, same order")
    args = ap.parse_args()
    files = sorted(
        (p for p in args.data.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm")),
        key=lambda p: (len(p.stem), p.stem),
    )  # 2.png before 10.png
    if not files:
        raise SystemExit(f"{args.data}: no X-rays found")
    sets = {"shipped": args.models.split(",")}
    if args.compare:
        sets["compare"] = args.compare.split(",")
    report: dict = {"images": len(files), "sets": {}}
    RESULTS.mkdir(exist_ok=True)
    shown: set[str] = set()
    for label, models in sets.items():
        masks = {}
        rows = {}
        for model in models:
            with LungSegmenter.load(model, backend="onnxruntime") as seg:
                results = [seg.predict(str(f)) for f in files]
                fitted = bool((seg.runner.info.qc or {}).get("bounds"))
            name = Path(model).stem if "/" in model else model
            name = f"{name}-{label}" if name in shown else name  # compared weights named like the shipped ones
            shown.add(name)
            masks[name] = [r.mask for r in results]
            balance = [min(r.right_lung_px, r.left_lung_px) / max(1, r.right_lung_px, r.left_lung_px) for r in results]
            reasons = Counter(x for r in results if r.qc != "ok" for x in r.qc.split(";"))
            rows[name] = {
                "flagged": sum(r.qc != "ok" for r in results) / len(files) if fitted else None,
                "reasons": dict(reasons) if fitted else {},
                "mean_balance": float(np.mean(balance)),
                "lopsided_below_0.6": int(np.sum(np.array(balance) < 0.6)),
            }
            overlay_sheet(files, results, RESULTS / f"other_hospital_{name}.png")
        agree = {
            f"{a}|{b}": float(np.mean([dice_batch(x[None], y[None])[0] for x, y in zip(masks[a], masks[b])]))
            for a, b in itertools.combinations(masks, 2)
        }
        report["sets"][label] = {"models": rows, "pairwise_dice": agree}
        print(f"\n{label}: {len(files)} X-rays from {args.data}")
        print(
            (
                "| model | QC flagged | reasons | mean right/left balance | pairs "
                "with balance < 0.6 |\n|---|---|---|---|---|"
            )
        )
        for name, r in rows.items():
            flagged = "- (no fitted thresholds)" if r["flagged"] is None else f"{r['flagged']:.0%}"
            print(
                f"| {name} | {flagged} | {', '.join(f'{k} {v}' for k, v in sorted(r['reasons'].items()))} | "
                f"{r['mean_balance']:.3f} | {r['lopsided_below_0.6']} |"
            )
        print("mean pairwise Dice between models: " + ", ".join(f"{k} {v:.3f}" for k, v in agree.items()))
    (RESULTS / "other_hospital.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
