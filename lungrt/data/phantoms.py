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
    pts = np.concatenate(
        [
            np.stack([inner, ys], 1)[::-1],
            np.stack([outer, ys], 1),
            np.stack([xs_base, dome - (bottom - top) * 0.08], 1),
        ]
    )
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
            cv2.ellipse(
                ribs,
                c,
                (int(w * 0.3), int(h * 0.06)),
                0,
                200 if side < 0 else -20,
                340 if side < 0 else 160,
                0.12,
                max(2, h // 90),
            )
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


def _lung_field(cx_med: float, top: float, bottom: float, width: float, side: int, rng) -> np.ndarray:
    """One lung field as annotated on a PA film: a rounded apex, a convex lateral border along the
    ribs down to a sharp costophrenic angle, a domed base (higher medially), a medial border along
    the mediastinum. `side`: -1 the patient's right (image left), +1 the left."""
    t = np.linspace(0, 1, 60)
    lat_x = cx_med + side * width * (0.45 + 0.55 * np.sin(t * np.pi / 2) ** 0.7)
    lat_y = top + (bottom - top) * t
    u = np.linspace(0, 1, 30)
    dome = (bottom - top) * rng.uniform(0.10, 0.16)
    base_x = lat_x[-1] + (cx_med - lat_x[-1]) * u
    base_y = bottom - dome * np.sin(u * np.pi / 2) ** 0.8
    v = np.linspace(0, 1, 40)
    med_x = cx_med + side * width * (0.02 + 0.12 * np.sin(v * np.pi))
    med_y = base_y[-1] + (top + (bottom - top) * 0.04 - base_y[-1]) * v
    a = np.linspace(0, 1, 15)
    cap_x = med_x[-1] + (cx_med + side * width * 0.45 - med_x[-1]) * a
    cap_y = med_y[-1] + (top - med_y[-1]) * np.sin(a * np.pi / 2)
    xs = np.concatenate([lat_x, base_x, med_x, cap_x])
    ys = np.concatenate([lat_y, base_y, med_y, cap_y])
    return np.stack([xs, ys], 1).astype(np.int32)


def make_chest_phantom(seed: int, height: int = 256, width: int | None = None) -> Phantom:
    """A synthetic PA chest film that a model trained on real films reads as one: dark lung fields
    with the lung-field outline an annotator draws (apex above the clavicles, costophrenic angles,
    domed bases, heart and mediastinum excluded), soft tissue brighter toward the midline, a heart
    and mediastinum shadow, diaphragm domes over a dense abdomen, posterior and anterior ribs,
    clavicles, scapulae, breast shadows on some, vessel texture, detector falloff, blur and grain.
    Used by the demo and the README's examples; the tests train on the simpler `make_phantom`."""
    rng = np.random.default_rng(seed)
    h, w = height, width or height
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx = w * (0.5 + rng.uniform(-0.03, 0.03))
    half = w * rng.uniform(0.42, 0.47)
    shoulders = np.clip((h * 0.1 - yy) / (h * 0.1), 0, 1) * ((xx - cx) / half) ** 2  # the neck narrows the top
    body = np.clip(1 - ((xx - cx) / half) ** 4 - shoulders, 0, 1)
    img = (0.55 + 0.15 * np.clip(1 - np.abs(xx - cx) / half, 0, 1)) * body + 0.05 * yy / h
    top, bottom = h * rng.uniform(0.06, 0.10), h * rng.uniform(0.74, 0.82)
    lung_w, gap = w * rng.uniform(0.27, 0.31), w * rng.uniform(0.05, 0.07)
    mask = np.zeros((h, w), np.uint8)
    for side in (-1, 1):  # the left lung is narrower (the heart) and its base a little lower
        base = bottom - (h * rng.uniform(0.02, 0.05) if side > 0 else 0)
        cv2.fillPoly(
            mask, [_lung_field(cx + side * gap, top, base, lung_w * (0.92 if side > 0 else 1.0), side, rng)], 1
        )
    lungs = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), h / 250)  # a crisp edge where the outline is
    shade = rng.uniform(0.14, 0.22) + 0.10 * np.clip((yy - top) / (bottom - top), 0, 1) ** 2  # lighter bases
    img = img * (1 - lungs) + shade * lungs * body
    heart = np.zeros((h, w), np.uint8)
    cv2.ellipse(
        heart,
        (int(cx + w * rng.uniform(0.06, 0.09)), int(h * rng.uniform(0.60, 0.66))),
        (int(w * rng.uniform(0.13, 0.16)), int(h * rng.uniform(0.13, 0.16))),
        rng.uniform(-25, -10),
        0,
        360,
        1,
        -1,
    )
    mw = w * rng.uniform(0.055, 0.07)
    mediastinum = np.zeros((h, w), np.uint8)
    cv2.fillPoly(
        mediastinum,
        [
            np.array(
                [
                    [cx - mw, 0],
                    [cx + mw, 0],
                    [cx + mw * 1.2, h * 0.5],
                    [cx + mw * 1.3, h],
                    [cx - mw * 1.3, h],
                    [cx - mw * 1.2, h * 0.5],
                ],
                np.int32,
            )
        ],
        1,
    )
    dense = cv2.GaussianBlur(np.maximum(heart, mediastinum).astype(np.float32), (0, 0), h / 300)
    img = np.maximum(img, 0.72 * dense)
    mask[(heart > 0) | (mediastinum > 0)] = 0
    # under each lung's base: diaphragm and abdomen
    has_lung = mask.any(axis=0)
    lowest = np.where(has_lung, h - 1 - np.argmax(mask[::-1], axis=0), h)
    abdomen = (yy > lowest[None, :]).astype(np.float32) * body
    img = np.maximum(img, 0.68 * cv2.GaussianBlur(abdomen, (0, 0), h / 150))
    ribs = np.zeros((h, w), np.float32)
    thick = max(2, h // 64)
    for k in range(10):
        y = top + (bottom - top) * (k - 0.3) / 9.5
        for side in (-1, 1):  # posterior ribs arc out and down; anterior ribs, fainter, slope down medially
            cv2.ellipse(
                ribs,
                (int(cx + side * w * 0.02), int(y + h * 0.06)),
                (int(w * 0.40), int(h * 0.10)),
                0,
                180 if side < 0 else 270,
                270 if side < 0 else 360,
                0.08,
                thick,
            )
            cv2.ellipse(
                ribs,
                (int(cx + side * w * 0.30), int(y - h * 0.02)),
                (int(w * 0.22), int(h * 0.07)),
                0,
                0 if side < 0 else 180,
                90 if side < 0 else 270,
                0.06,
                thick,
            )
    img += cv2.GaussianBlur(ribs, (0, 0), 0.8) * body * (1 - dense) * (0.4 + 0.6 * lungs)
    scapulae = np.zeros((h, w), np.float32)
    for side in (-1, 1):
        cv2.line(
            img,
            (int(cx + side * w * 0.06), int(top + h * 0.10)),
            (int(cx + side * w * 0.38), int(top + h * 0.03)),
            0.6,
            max(3, h // 45),
        )  # clavicles cross the apices
        cv2.fillPoly(
            scapulae,
            [
                np.array(
                    [
                        [cx + side * w * 0.30, top],
                        [cx + side * w * 0.44, top + h * 0.05],
                        [cx + side * w * 0.36, top + h * 0.32],
                    ],
                    np.int32,
                )
            ],
            0.08,
        )
    img += cv2.GaussianBlur(scapulae, (0, 0), h / 80)
    if rng.random() < 0.5:  # breast shadows over the lower lateral lung fields
        breasts = np.zeros((h, w), np.float32)
        for side in (-1, 1):
            cv2.ellipse(
                breasts,
                (int(cx + side * w * 0.25), int(bottom - h * 0.03)),
                (int(w * 0.15), int(h * 0.10)),
                0,
                0,
                360,
                0.08,
                -1,
            )
        img += cv2.GaussianBlur(breasts, (0, 0), h / 40)
    img += 0.04 * cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), max(1.0, h / 150)) * lungs
    img *= 1 - 0.12 * (((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2)  # detector falloff
    img = cv2.GaussianBlur(img, (0, 0), max(0.7, h / 350))
    img = np.clip(img * rng.uniform(0.9, 1.15) + rng.uniform(-0.03, 0.05), 0, 1) ** rng.uniform(0.85, 1.2)
    img += rng.normal(0, rng.uniform(0.008, 0.02), img.shape).astype(np.float32)  # film grain
    return Phantom(np.clip(img, 0, 1).astype(np.float32), mask.astype(bool))


def write_phantom_dataset(
    folder: str | Path,
    count: int,
    size: int = 256,
    seed: int = 0,
    sources: tuple[str, ...] = ("PHA", "PHB"),
    chest: bool = False,
) -> Path:
    """`folder/images/*.png` + `folder/masks/*.png` (0/255), names prefixed by source; `chest`: the
    chest-film-like phantoms (`make_chest_phantom`) instead of the simple ones."""
    folder = Path(folder)
    make = make_chest_phantom if chest else make_phantom
    for i in range(count):
        ph = make(seed * 100_003 + i, size)
        name = f"{sources[i % len(sources)]}_{i:04d}.png"
        write_png(folder / "images" / name, (ph.image * 255).round().astype(np.uint8))
        write_png(folder / "masks" / name, ph.mask.astype(np.uint8) * 255)
    return folder
