"""Segmentation metrics as the papers report them, per image and as dataset means.

Conventions for empty masks: a ratio whose numerator and denominator are both 0 is 1.0 (nothing to
find and nothing found is perfect); HD95 is 0 when both masks are empty and NaN when only one is
(NaNs are left out of dataset means and counted).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

METRIC_NAMES = ("accuracy", "iou", "miou", "dice", "f1", "precision", "recall", "hd95")


def _ratio(num: float, den: float) -> float:
    return 1.0 if den == 0 else num / den


def boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, gold: np.ndarray, spacing: tuple[float, float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance between mask boundaries (pixels, or mm)."""
    pb, gb = boundary(pred), boundary(gold)
    if not pb.any() and not gb.any():
        return 0.0
    if not pb.any() or not gb.any():
        return float("nan")
    sampling = spacing or (1.0, 1.0)
    to_gold = ndimage.distance_transform_edt(~gb, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~pb, sampling=sampling)
    d = np.concatenate([to_gold[pb], to_pred[gb]])
    return float(np.percentile(d, 95))


def segmentation_metrics(pred: np.ndarray, gold: np.ndarray, spacing: tuple[float, float] | None = None) -> dict:
    pred, gold = np.asarray(pred, bool), np.asarray(gold, bool)
    if pred.shape != gold.shape:
        raise ValueError(f"prediction shape {pred.shape} != mask shape {gold.shape}")
    tp = float(np.count_nonzero(pred & gold))
    fp = float(np.count_nonzero(pred & ~gold))
    fn = float(np.count_nonzero(~pred & gold))
    tn = float(pred.size) - tp - fp - fn
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    iou = _ratio(tp, tp + fp + fn)
    iou_bg = _ratio(tn, tn + fp + fn)
    return {
        "accuracy": (tp + tn) / pred.size,
        "iou": iou,
        "miou": (iou + iou_bg) / 2.0,
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "f1": _ratio(2 * precision * recall, precision + recall) if precision + recall else 0.0,
        "precision": precision,
        "recall": recall,
        "hd95": hd95(pred, gold, spacing),
    }


def behind_heart(pred: np.ndarray, gold: np.ndarray) -> dict:
    """Where annotators differ, not a score: the shares of the gold lung area that `pred` leaves out
    and adds in the lower medial quarter of the patient's left lung (the image's right half in a PA
    view; the quarter is taken from the gold lung's extent): the lung behind the heart and below the
    diaphragm dome, which some annotators include and most Montgomery/Shenzhen masks leave out."""
    pred, gold = np.asarray(pred, bool), np.asarray(gold, bool)
    half = gold.shape[1] // 2
    ys, xs = np.nonzero(gold[:, half:])
    if len(ys) == 0:
        return {"behind_heart_missed": 0.0, "behind_heart_added": 0.0}
    quarter = np.zeros(gold.shape, bool)
    quarter[(ys.min() + ys.max()) // 2 :, half : half + (xs.min() + xs.max()) // 2] = True
    area = float(np.count_nonzero(gold))
    return {
        "behind_heart_missed": np.count_nonzero(quarter & gold & ~pred) / area,
        "behind_heart_added": np.count_nonzero(quarter & pred & ~gold) / area,
    }


def mean_metrics(rows: list[dict]) -> dict:
    """Dataset means over per-image rows (NaN HD95 left out and counted)."""
    out: dict = {"images": len(rows)}
    for k in METRIC_NAMES:
        vals = np.array([r[k] for r in rows if k in r], dtype=np.float64)
        out[k] = float(np.nanmean(vals)) if len(vals) and not np.all(np.isnan(vals)) else float("nan")
    out["hd95_undefined"] = int(sum(np.isnan(r.get("hd95", 0.0)) for r in rows))
    return out


def dice_batch(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Per-image Dice for (N, H, W) boolean stacks (training-time validation); `gold` may also hold
    each pixel's covered share (the expected Dice against the finer mask it was made from)."""
    p, g = pred.reshape(len(pred), -1), gold.reshape(len(gold), -1)
    inter = (p * g).sum(1).astype(np.float64)
    den = p.sum(1) + g.sum(1)
    return np.where(den == 0, 1.0, 2 * inter / np.where(den == 0, 1, den))
