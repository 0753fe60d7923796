"""QC with and without its second opinion (`lungrt infer --second-opinion`), with the thresholds as shipped.

The lung-field weights' QC record holds a `whole_lung_cover` bound fitted with the same architecture's shipped
whole-lung weights (`scripts/ship_weights.py NAME --qc-only --second-opinion`: on cxr-mc-sz's training split,
under the 5 % false-alarm budget of each framing of its validation split). Measured here, without the second
opinion, with it at the fitted bound, and at tighter bounds (what they would catch, and what they would cost):

- cxr-covid-v7's test split (by patient; recall against its whole-lung masks, native resolution, infer's clean-up):
  the masks that miss 30 % or more of the lung (recall < 0.7) flagged, the other films flagged, the 10 lowest-Dice
  masks flagged;
- the well-segmented validation films flagged in each framing (as they come, padded, cropped, down-sampled):
  cxr-mc-sz's (the budget the fit keeps) and cxr-covid-v7's (sick films, outside the fit).

    .venv/bin/python benchmarks/qc_reference_cover.py --model msag-unet

Writes benchmarks/results/qc_reference_cover_MODEL.json (counts and bounds only: the data are restricted).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
from _common import save_result

from lungrt.build.resolve import open_runner
from lungrt.data.datasets import select_split
from lungrt.evaluation.evaluate import evaluate
from lungrt.inference.qc import COVER, REFRAMINGS, collect_features, flags, thresholds_of, well_segmented

MISSES = 0.7  # recall below this: the mask misses 30 % or more of the lung
WHAT_IF = (0.6, 0.65, 0.68, 0.7)  # cover bounds tighter than the fitted one: what they would catch, and cost


def caught(rows: list[dict], verdicts: list[list[str]]) -> dict:
    short = [v for r, v in zip(rows, verdicts) if r["recall"] < MISSES]
    clean = [v for r, v in zip(rows, verdicts) if r["recall"] >= MISSES]
    worst = [v for _, v in sorted(zip([r["dice"] for r in rows], verdicts), key=lambda t: t[0])[:10]]
    return {
        "stops_short": {"flagged": sum(map(bool, short)), "of": len(short)},
        "other_films": {"flagged": sum(map(bool, clean)), "of": len(clean)},
        "lowest_dice_10": {"flagged": sum(map(bool, worst)), "of": len(worst)},
        "reasons_on_stops_short": sorted({f for v in short for f in v}),
    }


def verdicts(feats: list[dict], qc, bound: float | None) -> list[list[str]]:
    """QC's reasons per film with the cover bound at `bound` (None: without the second opinion)."""
    if bound is None:
        return [flags({k: v for k, v in f.items() if k != COVER}, qc) for f in feats]
    at = replace(qc, bounds={**qc.bounds, COVER: [bound, None]})
    return [flags(f, at) for f in feats]


def flagged_share(feats: list[dict], qc, bound: float | None) -> float:
    return round(float(np.mean([bool(v) for v in verdicts(feats, qc, bound)])), 4)


def framings(runner, pairs, qc) -> dict[str, list[dict]]:
    return {
        framing or "as it comes": collect_features(
            runner, pairs, shape=qc.shape, framing=framing, reference=runner.reference
        )
        for framing in (None, *REFRAMINGS)
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="msag-unet")
    ap.add_argument("--sick", type=Path, default=Path("../shared/data/cxr-covid-v7"))
    ap.add_argument("--healthy", type=Path, default=Path("../shared/data/cxr-mc-sz"))
    ap.add_argument("--backend", default="onnxruntime")
    args = ap.parse_args()
    with open_runner(args.model, backend=args.backend, precision="fp32", second_opinion=True) as runner:
        qc = thresholds_of(runner.info.qc)
        test = select_split(args.sick, "test")
        rows = evaluate(runner, test, postprocess=True)["per_image"]
        feats = collect_features(runner, test, shape=qc.shape, reference=runner.reference)
        clean = {
            f"{args.healthy.name} val": framings(runner, well_segmented(runner, select_split(args.healthy, "val")), qc),
            f"{args.sick.name} val": framings(runner, well_segmented(runner, select_split(args.sick, "val")), qc),
        }
    fitted = qc.bounds[COVER][0]
    sweep = {}
    for bound in (None, fitted, *WHAT_IF):
        sweep["without" if bound is None else f"{bound:.3f}"] = {
            "sick_test": caught(rows, verdicts(feats, qc, bound)),
            "clean_validation_flagged": {
                data: {how: flagged_share(f, qc, bound) for how, f in groups.items()} for data, groups in clean.items()
            },
        }
    result = {
        "model": args.model,
        "backend": runner.describe(),
        "recall_below": MISSES,
        "cover_bound_fitted": fitted,
        "qc_fitted_on": qc.fitted_on,
        "second_opinion": qc.reference,
        "sick_test_data": f"{args.sick.name} test split ({len(test)} films, whole-lung masks)",
        "clean_validation_data": {
            data: f"{len(next(iter(groups.values())))} well-segmented (recall >= {MISSES}) validation films"
            for data, groups in clean.items()
        },
        "by_cover_bound": sweep,
    }
    save_result(f"qc_reference_cover_{args.model}", result)


if __name__ == "__main__":
    main()
