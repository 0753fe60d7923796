"""Does QC catch masks that stop short of the lung? On a labelled split (default: cxr-covid-v7's test split, by
patient), each image's recall (share of the true lung inside the mask, native resolution, infer's clean-up) and
its QC verdict with the model's shipped thresholds, with and without the `missed_mass` bound ("stops_short");
plus the validation false-alarm rate per framing that the thresholds were fitted to.

    .venv/bin/python benchmarks/qc_stops_short.py --model msag-unet --convention whole-lung \\
        --data ../shared/data/cxr-covid-v7

Writes benchmarks/results/qc_stops_short_MODEL_CONVENTION.json (no images, no file names: the data are restricted).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from _common import save_result

from lungrt.build.resolve import open_runner
from lungrt.data.datasets import select_split
from lungrt.evaluation.evaluate import evaluate
from lungrt.inference.qc import QCThresholds, collect_features, flags

MISSES = 0.7  # recall below this: the mask misses 30 % or more of the lung


def caught(rows, verdicts) -> dict:
    short = [v for r, v in zip(rows, verdicts) if r["recall"] < MISSES]
    clean = [v for r, v in zip(rows, verdicts) if r["recall"] >= MISSES]
    worst = [v for _, v in sorted(zip([r["dice"] for r in rows], verdicts), key=lambda t: t[0])[:10]]
    return {
        "stops_short_images": len(short),
        "stops_short_flagged": sum(bool(v) for v in short),
        "clean_images": len(clean),
        "clean_flagged": sum(bool(v) for v in clean),
        "worst10_flagged": sum(bool(v) for v in worst),
        "flag_reasons_on_short": sorted({f for v in short for f in v}),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="msag-unet")
    ap.add_argument("--convention", default=None)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cxr-covid-v7"))
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    pairs = select_split(args.data, args.split)
    with open_runner(args.model, backend="torch", convention=args.convention) as runner:
        qc = QCThresholds.from_dict(runner.info.qc)
        rows = evaluate(runner, pairs, postprocess=True)["per_image"]
        feats = collect_features(runner, pairs, shape=qc.shape)
    without = QCThresholds({k: v for k, v in qc.bounds.items() if k != "missed_mass"}, qc.fitted_on, shape=qc.shape)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    result = {
        "command": "benchmarks/qc_stops_short.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v),
        "date": time.strftime("%Y-%m-%d"),
        "model": runner.info.name,
        "convention": runner.spec.convention,
        "data": f"{args.data.name} {args.split} split ({len(pairs)} films)",
        "cpu": next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?"),
        "recall_below": MISSES,
        "qc_fitted_on": qc.fitted_on,
        "validation_false_alarm_worst_framing": qc.false_alarm_val,
        "missed_mass_bound": qc.bounds.get("missed_mass"),
        "with_stops_short": caught(rows, [flags(f, qc) for f in feats]),
        "without_stops_short": caught(rows, [flags(f, without) for f in feats]),
    }
    save_result(f"qc_stops_short_{runner.info.name}_{runner.spec.convention}", result)


if __name__ == "__main__":
    main()
