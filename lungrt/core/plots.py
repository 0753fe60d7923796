"""PNGs people would rather look at than read: loss curves, prediction grids, overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def figure(**kwargs):
    """A matplotlib Figure of its own, not pyplot's: no global backend switch (importing lungrt
    changes nothing in a notebook), nothing to close, safe in threads; savefig picks Agg for PNG."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def plot_loss_curves(history: list[dict], path: str | Path, title: str = "") -> None:
    ep = [h["epoch"] for h in history]
    fig = figure(figsize=(10, 3.8))
    ax = fig.subplots(1, 2)
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train")
    ax[0].plot(ep, [h["val_loss"] for h in history], label="validation")
    ax[0].set(xlabel="epoch", ylabel="Dice + BCE loss", title="loss")
    ax[0].legend()
    ax[1].plot(ep, [h["val_dice"] for h in history], color="tab:green")
    ax[1].set(xlabel="epoch", ylabel="Dice", title="validation Dice (network resolution)")
    for a in ax:
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def overlay(
    image: np.ndarray, mask: np.ndarray, gold: np.ndarray | None = None, fit: np.ndarray | None = None
) -> np.ndarray:
    """RGB uint8: the X-ray with the predicted lung field tinted and its outline drawn
    (gold outline in green, a shape fit's in yellow, when given)."""
    import cv2

    from lungrt.core.spec import to_gray8

    gray = image if image.dtype == np.uint8 else to_gray8(image)
    rgb = np.stack([gray] * 3, -1).astype(np.float32)
    tint = np.array([255, 64, 32], np.float32)
    rgb[mask] = 0.7 * rgb[mask] + 0.3 * tint
    rgb = rgb.astype(np.uint8)
    thick = max(1, round(max(image.shape) / 400))
    for outline, colour in ((gold, (40, 220, 40)), (fit, (255, 220, 0))):
        if outline is not None:
            cs, _ = cv2.findContours(outline.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(rgb, cs, -1, colour, thick)
    cs, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(rgb, cs, -1, (255, 80, 40), thick)
    return rgb


def prediction_grid(rows: list[tuple], path: str | Path, title: str = "") -> None:
    """The papers' Fig. 9: image | gold mask | prediction, one row per (name, image, gold, pred[,
    shape fit]): the prediction tinted, the gold outline green, the plausible shape fit yellow."""
    fig = figure(figsize=(9, 3 * len(rows)))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for r, (name, image, gold, pred, *fit) in enumerate(rows):
        shown = overlay(image, pred, gold, fit[0] if fit else None)
        for c, (im, label) in enumerate(((image, name), (gold, "gold mask"), (shown, "prediction"))):
            axes[r, c].imshow(im, cmap="gray" if im.ndim == 2 else None)
            axes[r, c].set_title(label, fontsize=9)
            axes[r, c].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
