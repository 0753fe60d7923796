"""What stops the second opinion's bound from being tight, and what would free it: a re-fit, not shipped.

The shipped lung-field QC spends the cropped framing's 5 % budget on its mask features, most of it `at_border`,
whose training spread is zero (no margin widens it: `qc.fit_thresholds`); the fit then widens `whole_lung_cover`
instead, to ~0.5. Here the lung-field model's QC is re-fitted exactly as `scripts/ship_weights.py ... --qc-only
--second-opinion` fits it (cxr-mc-sz training split; its well-segmented validation films as they come and
re-framed), once as shipped and once per floor under `border_fraction`'s spread (`fit_thresholds(min_spread=...)`),
and each fit is measured on cxr-covid-v7's test split (recall against its whole-lung masks) with the second opinion.

    .venv/bin/python benchmarks/qc_border_floor.py --model msag-unet

Writes benchmarks/results/qc_border_floor_MODEL.json (counts and bounds only: the data are restricted).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _common import save_result
from qc_reference_cover import MISSES, caught

from lungrt.build.resolve import open_runner
from lungrt.data.datasets import select_split
from lungrt.evaluation.evaluate import evaluate
from lungrt.inference.qc import COVER, REFRAMINGS, collect_features, fit_thresholds, flags, thresholds_of
from lungrt.inference.qc import well_segmented

FLOORS = (None, 0.002, 0.005)  # border_fraction: share of the mask's pixels in the image's outer 2-pixel ring


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="msag-unet")
    ap.add_argument("--sick", type=Path, default=Path("../shared/data/cxr-covid-v7"))
    ap.add_argument("--healthy", type=Path, default=Path("../shared/data/cxr-mc-sz"))
    args = ap.parse_args()
    with open_runner(args.model, backend="onnxruntime", precision="fp32", second_opinion=True) as runner:
        shape, ref = thresholds_of(runner.info.qc).shape, runner.reference

        def feats(pairs, framing=None):
            return collect_features(runner, pairs, shape=shape, framing=framing, reference=ref)

        train = feats(select_split(args.healthy, "train"))
        clean = well_segmented(runner, select_split(args.healthy, "val"))
        val = {framing or "as it comes": feats(clean, framing) for framing in (None, *REFRAMINGS)}
        test = select_split(args.sick, "test")
        rows = evaluate(runner, test, postprocess=True)["per_image"]
        sick = feats(test)
    fits = {}
    for floor in FLOORS:
        qc = fit_thresholds(train, val, min_spread={"border_fraction": floor} if floor else None)
        qc.shape = shape
        fits["as shipped" if floor is None else f"border_fraction spread >= {floor}"] = {
            "bounds": {k: qc.bounds[k] for k in (COVER, "border_fraction")},
            "margins": {k: qc.margin[k] for k in (COVER, "border_fraction")},
            "clean_validation_flagged": {
                how: round(float(np.mean([bool(flags(f, qc)) for f in group])), 4) for how, group in val.items()
            },
            "sick_test": caught(rows, [flags(f, qc) for f in sick]),
        }
    save_result(
        f"qc_border_floor_{args.model}",
        {
            "model": args.model,
            "backend": "onnxruntime/cpu/fp32+whole-lung",
            "recall_below": MISSES,
            "fitted_on": f"{args.healthy.name}: {len(train)} training films, {len(clean)} well-segmented val films",
            "sick_test_data": f"{args.sick.name} test split ({len(test)} films, whole-lung masks)",
            "fits": fits,
        },
    )


if __name__ == "__main__":
    main()
