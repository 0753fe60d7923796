"""Synthetic lung abnormalities painted inside the gold lung field (the mask stays unchanged).

Opacified lung is still lung: a segmenter trained only on clear lungs leaves dense consolidation,
haze and effusion out of the mask. Following XLSor's idea of "radiorealistic abnormalities", these
functions brighten parts of the lung field of a raw (not yet equalized) X-ray.

Two families with different shape generators, so the robustness benchmark does not test the
training augmentation on itself:

- `paint_training`: consolidation from thresholded smoothed noise (random-field blobs), haze from a
  smoothed noise field, effusion under a curved (quadratic) meniscus, occasional white-out of a lung,
  and opacity that spills past the lung's edge (a meniscus or blob region grown by a random disc).
- `paint_benchmark`: consolidation from unions of rotated ellipses, haze as a vertical ramp,
  effusion under a tilted straight fluid line rising laterally, and silhouette (ellipses grown past
  the lung's edge by a fixed distance, flat); graded severities.

Opacity confined to the gold mask leaves the mask's outline visible as an edge, a cue real X-rays
do not give: consolidation against the heart, diaphragm or chest wall makes that border vanish (the
silhouette sign). Spill and silhouette paint over the border into the neighbouring soft tissue (never
into the other lung), so the mask has to come from anatomy, not from where the paint stops.

All work on float images in [0, 1] of any size (H, W) and a boolean lung mask of the same size.
"""

from __future__ import annotations

import cv2
import numpy as np

SEVERITIES = ("mild", "moderate", "severe")
KINDS = ("consolidation", "haze", "effusion", "silhouette", "lobe")

# Benchmark severity -> (share of one lung's area covered, opacity of the painted region)
_BENCH_LEVELS = {"mild": (0.15, 0.45), "moderate": (0.35, 0.65), "severe": (0.7, 0.85)}


# ---------------------------------------------------------------------------------------------
# shared pieces
def split_lungs(mask: np.ndarray) -> list[np.ndarray]:
    """The two largest connected components of a lung mask (fewer if the mask has fewer)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    order = np.argsort(-stats[1:, cv2.CC_STAT_AREA])[:2] + 1
    return [labels == i for i in order if stats[i, cv2.CC_STAT_AREA] > 0]


def _soft(region: np.ndarray, sigma: float) -> np.ndarray:
    """Feathered version of a binary region (float 0..1)."""
    r = region.astype(np.float32)
    if sigma <= 0:
        return r
    k = int(2 * round(3 * sigma) + 1)
    return cv2.GaussianBlur(r, (k, k), sigma)


def _smooth_noise(shape: tuple[int, int], scale: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ~scale pixels."""
    h, w = shape
    f = max(1.0, scale / 2)
    small = rng.standard_normal((max(2, int(h / f)), max(2, int(w / f)))).astype(np.float32)
    k = int(2 * round(2 * 1.0) + 1)
    small = cv2.GaussianBlur(small, (k, k), 1.0)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return (big - big.mean()) / (big.std() + 1e-6)


def _opacify(image: np.ndarray, weight: np.ndarray, level: float, texture: np.ndarray | None = None) -> np.ndarray:
    """Blend towards a bright, soft-tissue-like level where weight > 0 (weight in 0..1)."""
    target = np.full_like(image, level)
    if texture is not None:
        target = np.clip(target + texture, 0, 1)
    # dense lung never gets darker than it was
    target = np.maximum(target, image)
    return image * (1 - weight) + target * weight


def _lung_level(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(lung brightness, soft-tissue brightness) of this image: the opacity target between them."""
    inside = image[mask] if mask.any() else image.ravel()
    outside = image[~mask] if (~mask).any() else image.ravel()
    return float(np.median(inside)), float(np.percentile(outside, 75))


# ---------------------------------------------------------------------------------------------
# training family
def paint_training(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random training abnormality (or two), with random strength; returns a new image."""
    lungs = split_lungs(mask)
    if not lungs:
        return image
    out = image.astype(np.float32, copy=True)
    lung_v, tissue_v = _lung_level(out, mask)
    for _ in range(1 + int(rng.random() < 0.3)):
        kind = rng.choice(["blobs", "haze", "meniscus", "whiteout", "spill"], p=[0.3, 0.15, 0.2, 0.1, 0.25])
        lung = lungs[rng.integers(len(lungs))]
        opacity = rng.uniform(0.35, 1.0)
        level = lung_v + (tissue_v - lung_v) * rng.uniform(0.8, 1.25)
        h, w = out.shape
        scale = max(h, w)
        texture = 0.04 * _smooth_noise(out.shape, scale * 0.03, rng)
        if kind == "blobs":
            field = _smooth_noise(out.shape, scale * rng.uniform(0.06, 0.15), rng)
            region = (field > rng.uniform(-0.3, 1.2)) & lung
            weight = _soft(region, scale * 0.012) * lung
        elif kind == "haze":
            field = _smooth_noise(out.shape, scale * 0.2, rng)
            weight = np.clip(0.5 + 0.3 * field, 0, 1) * _soft(lung, scale * 0.01)
            opacity *= 0.6
        elif kind == "meniscus":
            weight = _meniscus_curve(lung, rng.uniform(0.1, 0.6), rng) * lung
        elif kind == "whiteout":
            weight = _soft(lung, scale * 0.01)
        else:  # spill: the lower lung or a blob, grown past the lung's edge
            if rng.random() < 0.6:
                region = (_meniscus_curve(lung, rng.uniform(0.2, 0.9), rng) > 0.5) & lung
            else:
                region = (_smooth_noise(out.shape, scale * rng.uniform(0.08, 0.2), rng) > rng.uniform(-0.5, 0.8)) & lung
            weight = _soft(
                _spill(region, mask & ~lung, scale * rng.uniform(0.03, 0.1)), scale * rng.uniform(0.008, 0.03)
            )
            opacity, texture = rng.uniform(0.7, 1.0), texture * 0.5
        out = _opacify(out, opacity * weight, level, texture)
    return np.clip(out, 0, 1)


def _meniscus_curve(lung: np.ndarray, height_share: float, rng: np.random.Generator) -> np.ndarray:
    """Everything below a concave-up curve that cuts off the lower `height_share` of the lung."""
    ys, xs = np.nonzero(lung)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    level = bottom - height_share * (bottom - top)
    h, w = lung.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    centre = rng.uniform(left, right)
    span = max(1.0, right - left)
    curve = level - rng.uniform(0.0, 0.25) * (bottom - top) * ((xx - centre) / span) ** 2
    return _soft(yy > curve, max(h, w) * 0.01)


def _spill(region: np.ndarray, other_lung: np.ndarray, reach: float) -> np.ndarray:
    """`region` grown by a disc of radius `reach` pixels, kept clear of the other lung."""
    k = 2 * max(1, int(reach)) + 1
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    grown = cv2.dilate(region.astype(np.uint8), disc) > 0
    guard = cv2.dilate(other_lung.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    return grown & ~guard


# ---------------------------------------------------------------------------------------------
# benchmark family
def paint_benchmark(image: np.ndarray, mask: np.ndarray, kind: str, severity: str, seed: int) -> np.ndarray:
    """A benchmark abnormality of a given kind and severity, deterministic for (image, seed)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if severity not in _BENCH_LEVELS:
        raise ValueError(f"severity must be one of {SEVERITIES}")
    rng = np.random.default_rng(seed)
    lungs = split_lungs(mask)
    if not lungs:
        return image
    cover, opacity = _BENCH_LEVELS[severity]
    out = image.astype(np.float32, copy=True)
    lung_v, tissue_v = _lung_level(out, mask)
    level = lung_v + (tissue_v - lung_v) * 1.05
    lung = lungs[rng.integers(len(lungs))]
    scale = max(out.shape)
    if kind == "consolidation":
        weight = _soft(_ellipses_covering(lung, cover, rng), scale * 0.008) * lung
    elif kind == "haze":
        # both lungs, brighter towards the base; haze is less dense than consolidation
        yy = np.linspace(0, 1, out.shape[0], dtype=np.float32)[:, None]
        ramp = np.clip(0.3 + yy * 1.2, 0, 1) * np.ones_like(out)
        weight = ramp * _soft(mask, scale * 0.006) * min(1.0, cover * 1.6)
        opacity *= 0.7
    elif kind == "effusion":
        weight = _fluid_line(lung, cover, rng) * lung
    elif kind == "lobe":
        # a lobe-sized white-out: the lower part of one lung (half at moderate) at the severity's
        # opacity, its ribs kept (the image's fine detail is added back over the opacity)
        weight = _soft(_lower_part(lung, 0.3 + 0.4 * cover), scale * 0.006) * lung
        detail = out - cv2.GaussianBlur(out, (0, 0), scale * 0.008)
        return np.clip(_opacify(out, max(opacity, 0.8) * weight, level) + detail * weight, 0, 1)
    else:  # silhouette: consolidation whose edge against the neighbouring soft tissue vanishes
        weight = _soft(_spill(_ellipses_covering(lung, cover, rng) & lung, mask & ~lung, scale * 0.05), scale * 0.015)
    return np.clip(_opacify(out, opacity * weight, level), 0, 1)


def _lower_part(lung: np.ndarray, share: float) -> np.ndarray:
    """The part of a lung below the line that leaves `share` of its height underneath."""
    ys = np.nonzero(lung)[0]
    cut = ys.max() - share * (ys.max() - ys.min())
    return lung & (np.arange(lung.shape[0])[:, None] >= cut)


def _ellipses_covering(lung: np.ndarray, cover: float, rng: np.random.Generator) -> np.ndarray:
    """Union of random rotated ellipses inside a lung's box, added until `cover` of it is covered."""
    ys, xs = np.nonzero(lung)
    area = lung.sum()
    region = np.zeros(lung.shape, np.uint8)
    box_h, box_w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    for _ in range(60):
        i = rng.integers(len(ys))
        axes = (int(box_w * rng.uniform(0.12, 0.35)), int(box_h * rng.uniform(0.08, 0.25)))
        cv2.ellipse(region, (int(xs[i]), int(ys[i])), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        if (region.astype(bool) & lung).sum() >= cover * area:
            break
    return region.astype(bool)


def _fluid_line(lung: np.ndarray, cover: float, rng: np.random.Generator) -> np.ndarray:
    """Below a straight, slightly tilted line placed so that about `cover` of the lung is beneath it."""
    ys, xs = np.nonzero(lung)
    h, w = lung.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tilt = rng.uniform(-0.15, 0.15)
    # line height by the quantile of lung pixels' (y - tilt*x): exact coverage on the lung itself
    proj = ys - tilt * (xs - xs.mean())
    cut = np.quantile(proj, 1 - cover)
    return _soft(yy - tilt * (xx - xs.mean()) > cut, max(h, w) * 0.006)
