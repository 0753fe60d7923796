"""Synthetic X-ray-like phantoms with exact lung masks, for tests and the embedded demo.

Each phantom has a body outline, two dark lung fields, the mediastinum and heart between them,
ribs crossing the lungs, a diaphragm dome, detector noise and blur, with seeded variation of
size, contrast and position. It is not anatomy, but it has the structures a lung model keys on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lungrt.data.io import write_png


@dataclass
class Phantom:
    image: np.ndarray  # float32 [0, 1], (h, w)
    mask: np.ndarray  # bool, (h, w): both lung fields


def _lung_polygon(cx: float, top: float, bottom: float, half_w: float, side: int, rng) -> np.ndarray:
    """A rounded lung field: apex at the top, wider base above a diaphragm dome."""
    t = np.linspace(0, 1, 40)
    inner = cx - side * half_w * 0.5 * (0.5 + 0.5 * np.sqrt(t))  # mediastinal edge, near straight
    outer = cx + side * half_w * (0.05 + 1.0 * t**0.45)  # rib-cage edge: narrow apex, wide base
    ys = top + (bottom - top) * t
    dome = bottom + (bottom - top) * 0.06 * np.sin(np.linspace(0, np.pi, 20))  # diaphragm arc
    xs_base = np.linspace(outer[-1], inner[-1], 20)
    pts = np.concatenate([
        np.stack([inner, ys], 1)[::-1],
        np.stack([outer, ys], 1),
        np.stack([xs_base, dome - (bottom - top) * 0.08], 1),
    ])
    pts += rng.normal(0, half_w * 0.01, pts.shape)
    return pts.astype(np.int32)


def make_phantom(seed: int, height: int = 256, width: int | None = None) -> Phantom:
    rng = np.random.default_rng(seed)
    width = width or height
    h, w = height, width
    img = np.zeros((h, w), np.float32)
    # body: a bright ellipse, position and size varied
    cx = w * (0.5 + rng.uniform(-0.04, 0.04))
    cy = h * (0.52 + rng.uniform(-0.03, 0.03))
    cv2.ellipse(img, (int(cx), int(cy)), (int(w * rng.uniform(0.40, 0.47)), int(h * 0.55)), 0, 0, 360, 0.62, -1)
    mask = np.zeros((h, w), np.uint8)
    lung_top = h * rng.uniform(0.14, 0.2)
    lung_bottom = h * rng.uniform(0.68, 0.78)
    half_w = w * rng.uniform(0.14, 0.18)
    gap = w * rng.uniform(0.07, 0.1)
    for side in (-1, 1):
        poly = _lung_polygon(cx + side * (gap + half_w * 0.55), lung_top, lung_bottom, half_w, side, rng)
        cv2.fillPoly(mask, [poly], 1)
    lungs = mask.astype(bool)
    img[lungs] = rng.uniform(0.18, 0.3)
    # heart overlapping the lower left lung (patient's left = image right); excluded from the mask
    heart_c = (int(cx + w * rng.uniform(0.04, 0.08)), int(h * rng.uniform(0.58, 0.64)))
    heart_ax = (int(w * rng.uniform(0.11, 0.15)), int(h * rng.uniform(0.12, 0.15)))
    heart = np.zeros_like(mask)
    cv2.ellipse(heart, heart_c, heart_ax, rng.uniform(-20, 20), 0, 360, 1, -1)
    img[heart.astype(bool)] = 0.7
    mask[heart.astype(bool)] = 0
    # mediastinum / spine column
    cv2.rectangle(img, (int(cx - gap * 0.6), 0), (int(cx + gap * 0.6), h), 0.75, -1)
    mask[:, int(cx - gap * 0.6) : int(cx + gap * 0.6)] = 0
    # diaphragm and abdomen below the lungs are dense
    below = np.arange(h)[:, None] > (lung_bottom + h * 0.03)
    img[below & (img > 0)] = np.maximum(img[below & (img > 0)], 0.66)
    # ribs: bright arcs across each hemithorax (they overlie lung; the mask stays lung)
    ribs = np.zeros_like(img)
    for k in range(9):
        y = lung_top + (lung_bottom - lung_top) * (k + 0.3) / 9
        for side in (-1, 1):
            c = (int(cx + side * w * 0.05), int(y - h * 0.05))
            cv2.ellipse(ribs, c, (int(w * 0.3), int(h * 0.06)), 0, 200 if side < 0 else -20, 340 if side < 0 else 160, 0.12, max(2, h // 90))
    img += ribs * (img > 0)
    # vessels: faint branching texture inside the lungs
    tex = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), max(1.0, h / 120))
    img += 0.05 * tex * lungs
    # exposure, blur, noise
    img = cv2.GaussianBlur(img, (0, 0), max(0.8, h / 300))
    contrast, offset, gamma = rng.uniform(0.8, 1.2), rng.uniform(-0.05, 0.08), rng.uniform(0.8, 1.25)
    img = np.clip(img * contrast + offset, 0, 1) ** gamma
    img += rng.normal(0, rng.uniform(0.01, 0.03), img.shape).astype(np.float32)
    return Phantom(np.clip(img, 0, 1).astype(np.float32), mask.astype(bool))


def write_phantom_dataset(folder: str | Path, count: int, size: int = 256, seed: int = 0,
                          sources: tuple[str, ...] = ("PHA", "PHB")) -> Path:
    """`folder/images/*.png` + `folder/masks/*.png` (0/255), names prefixed by source."""
    folder = Path(folder)
    for i in range(count):
        ph = make_phantom(seed * 100_003 + i, size)
        name = f"{sources[i % len(sources)]}_{i:04d}.png"
        write_png(folder / "images" / name, (ph.image * 255).round().astype(np.uint8))
        write_png(folder / "masks" / name, ph.mask.astype(np.uint8) * 255)
    return folder
