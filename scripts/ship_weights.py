"""Copy trained checkpoints into the package as FP16 safetensors, with their test-split metrics
and their QC thresholds (fitted on the training split, checked on validation: lungrt.inference.qc).

    .venv/bin/python scripts/ship_weights.py runs/unet runs/gsconv-unet runs/msag-unet --data ../shared/data/cxr-mc-sz
    .venv/bin/python scripts/ship_weights.py unet gsconv-unet msag-unet --data ../shared/data/cxr-mc-sz --qc-only
    .venv/bin/python scripts/ship_weights.py runs/msag-unet-whole2 --data ../shared/data/cxr-covid-v7   # whole lung
    .venv/bin/python scripts/ship_weights.py msag-unet --data ../shared/data/cxr-mc-sz --qc-only --second-opinion

Weights of the default mask convention (lung-field) go to `lungrt/weights/NAME.safetensors`, whole-lung weights to
`NAME.whole-lung.safetensors` (`lungrt.models.checkpoint.shipped_checkpoint`); `--data` must be of the weights'
convention. The data card (sets, sources, licenses, splits) the training wrote travels in the metadata.

`--qc-only` re-fits the QC thresholds of weights already shipped (named by model) and leaves the
weights and their metrics as they are. `--second-opinion` fits lung-field weights' thresholds with the same
architecture's shipped whole-lung weights as their second opinion (`whole_lung_cover`, `lungrt infer
--second-opinion`); the thresholds then name those whole-lung weights, so ship them first.

The weights are rounded to FP16 first and the metrics measured on the rounded weights, so the
numbers in the metadata are the ones the shipped model gets.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lungrt.core.spec import DEFAULT_CONVENTION, WHOLE_LUNG
from lungrt.models.checkpoint import load_checkpoint, save_checkpoint, shipped_checkpoint
from lungrt.data.datasets import dataset_convention, select_split
from lungrt.evaluation.evaluate import evaluate
from lungrt.inference.qc import fit_for_model
from lungrt.backends.pytorch import TorchRunner

WEIGHTS = Path(__file__).resolve().parents[1] / "lungrt" / "weights"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path, help="training runs (or, with --qc-only, shipped model names)")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--qc-only", action="store_true")
    ap.add_argument("--second-opinion", action="store_true", help="fit whole_lung_cover too (lung-field weights)")
    args = ap.parse_args()
    if args.qc_only:
        for name in args.runs:
            refit_qc(Path(str(shipped_checkpoint(str(name)))), args.data, second_opinion=args.second_opinion)
        return
    test = select_split(args.data, "test")
    for run in args.runs:
        loaded = load_checkpoint(run / "model.safetensors")
        convention = loaded.spec.convention
        if dataset_convention(args.data) != convention:
            raise SystemExit(
                f"{args.data} is not {convention} data: the test metrics and QC would measure the other convention"
            )
        dest = WEIGHTS / (
            f"{loaded.info.name}.safetensors"
            if convention == DEFAULT_CONVENTION
            else f"{loaded.info.name}.{convention}.safetensors"
        )
        save_checkpoint(dest, loaded.model, loaded.info, dtype=torch.float16)
        shipped = load_checkpoint(dest)
        with TorchRunner(shipped) as r:
            mean = evaluate(r, test)["mean"]
        shipped.info.metrics = {**loaded.info.metrics, "test_split_native": mean, "test_images": len(test)}
        print(
            f"{dest}: {dest.stat().st_size / 1e6:.1f} MB, test Dice {mean['dice']:.4f}, recall {mean['recall']:.4f}, "
            f"IoU {mean['iou']:.4f}, accuracy {mean['accuracy']:.4f}"
        )
        refit_qc(dest, args.data, shipped, second_opinion=args.second_opinion)


def refit_qc(dest: Path, data: Path, shipped=None, second_opinion: bool = False) -> None:
    """Fit the QC thresholds of `shipped` (default: the checkpoint at `dest`) and save it to `dest`; with
    `second_opinion`, with the same architecture's shipped whole-lung weights as the reference."""
    shipped = shipped or load_checkpoint(dest)
    reference = None
    if second_opinion:
        reference = TorchRunner(load_checkpoint(shipped_checkpoint(shipped.info.name, convention=WHOLE_LUNG)))
    with TorchRunner(shipped) as r:
        thresholds = fit_for_model(r, select_split(data, "train"), select_split(data, "val"), reference=reference)
    shipped.info.qc = thresholds.to_dict()
    save_checkpoint(dest, shipped.model, shipped.info, dtype=torch.float16)
    print(f"{dest}: QC flags {thresholds.false_alarm_val:.1%} of validation images (margins {thresholds.margin})")


if __name__ == "__main__":
    main()
