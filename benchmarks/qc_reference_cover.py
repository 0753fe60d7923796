"""Would a second opinion catch the lung-field masks that stop short? A measurement, not a shipped QC check.

Each film is segmented by the lung-field model and by the same architecture's whole-lung weights; the feature is
`cover`, the share of the whole-lung mask that the lung-field mask covers (~0.8 on a clean film: the lung behind
the heart is outside the lung-field convention; lower when the field mask stops short where disease is). Its
lower bound is fitted as QC's bounds are: a low percentile over well-segmented (recall >= 0.7) films of the
fitting split. Reported: masks that stop short (recall < 0.7 against cxr-covid-v7's whole-lung masks) caught by
today's QC, by `cover`, by both; clean films flagged, on cxr-covid-v7 and on healthy cxr-mc-sz films.

    .venv/bin/python benchmarks/qc_reference_cover.py --model msag-unet

Writes benchmarks/results/qc_reference_cover_MODEL.json (counts and bounds only: the data are restricted).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import save_result

from lungrt.api import LungSegmenter
from lungrt.data.datasets import select_split
from lungrt.evaluation.evaluate import evaluate
from lungrt.inference.qc import QCThresholds, collect_features, flags

MISSES = 0.7  # recall below this: the mask misses 30 % or more of the lung


def films(field: LungSegmenter, whole: LungSegmenter, data: Path, split: str, with_qc: bool) -> list[dict]:
    """Per film: recall (native resolution, infer's clean-up), `cover`, and today's QC flags."""
    pairs = select_split(data, split)
    runner = field.runner
    rows = evaluate(runner, pairs, postprocess=True)["per_image"]
    qc = QCThresholds.from_dict(runner.info.qc)
    feats = collect_features(runner, pairs, shape=qc.shape) if with_qc else [{}] * len(pairs)
    out = []
    for pair, row, feat in zip(pairs, rows, feats):
        f, w = field.predict(str(pair.image)).mask > 0, whole.predict(str(pair.image)).mask > 0
        cover = float((f & w).sum() / w.sum()) if w.any() else 0.0
        out.append({"recall": row["recall"], "cover": cover, "qc_flags": flags(feat, qc) if with_qc else []})
    return out


def tally(rows: list[dict], bound: float) -> dict:
    short = [r for r in rows if r["recall"] < MISSES]
    clean = [r for r in rows if r["recall"] >= MISSES]

    def share(group, flagged):
        return {"flagged": sum(map(flagged, group)), "of": len(group)}

    return {
        "stops_short_by_qc": share(short, lambda r: bool(r["qc_flags"])),
        "stops_short_by_cover": share(short, lambda r: r["cover"] < bound),
        "stops_short_by_either": share(short, lambda r: bool(r["qc_flags"]) or r["cover"] < bound),
        "clean_by_qc": share(clean, lambda r: bool(r["qc_flags"])),
        "clean_by_cover": share(clean, lambda r: r["cover"] < bound),
        "clean_by_either": share(clean, lambda r: bool(r["qc_flags"]) or r["cover"] < bound),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="msag-unet")
    ap.add_argument("--sick", type=Path, default=Path("../shared/data/cxr-covid-v7"))
    ap.add_argument("--healthy", type=Path, default=Path("../shared/data/cxr-mc-sz"))
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--percentile", type=float, default=1.0)
    args = ap.parse_args()
    field = LungSegmenter.load(args.model, convention="lung-field", backend=args.backend)
    whole = LungSegmenter.load(args.model, convention="whole-lung", backend=args.backend)
    fit = films(field, whole, args.sick, "val", with_qc=False)
    bound = float(np.percentile([r["cover"] for r in fit if r["recall"] >= MISSES], args.percentile))
    sick = films(field, whole, args.sick, "test", with_qc=True)
    healthy = films(field, whole, args.healthy, "val", with_qc=False)
    result = {
        "command": "benchmarks/qc_reference_cover.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "backend": args.backend,
        "recall_below": MISSES,
        "cover_bound": bound,
        "cover_bound_fitted_on": (
            f"{args.sick.name} val split: percentile {args.percentile} of `cover` over its "
            f"{sum(r['recall'] >= MISSES for r in fit)} well-segmented films"
        ),
        "sick_test": {"data": f"{args.sick.name} test split ({len(sick)} films)", **tally(sick, bound)},
        "healthy_val": {
            "data": f"{args.healthy.name} val split ({len(healthy)} films, lung-field masks)",
            "clean_by_cover": tally(healthy, bound)["clean_by_cover"],
        },
    }
    save_result(f"qc_reference_cover_{args.model}", result)


if __name__ == "__main__":
    main()
