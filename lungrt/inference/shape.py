"""A statistical shape model of the two lung fields (a point distribution model, Cootes et al.):
is a predicted mask a shape lungs have?

Each lung's outline is resampled to `POINTS_PER_LUNG` landmarks between two anchors it always has,
the apex (its highest point) and its lowest point: half along the lateral side, half back up the
medial side. Both lungs together (patient's right first) make one shape; shapes are aligned by
translation and scale only (films are upright; the pair's own size is the scale, so the features do
not depend on the image's framing or resolution; a prediction's landmarks are taken back to its
image's proportions first, the network having seen it squeezed to a square) and their principal
modes kept up to 98 % of the variance. Fitted on the reference masks of the training split
(`ShapeModel.fit`), stored with the QC thresholds (checkpoint, ONNX metadata, engine sidecar) and
versioned.

Predicted masks are fitted robustly, a batch at once (`ShapeModel.fit_many`: pose and mode weights
by iteratively re-weighted least squares, landmarks far from the model's reach down-weighted, a
Gaussian prior on the modes), which yields per mask: its Mahalanobis distance in shape space, the residual, and
the plausible
fit (modes clamped to 3 standard deviations) drawn as two polygons. The Dice between the mask and
that drawing, `shape_dice`, estimates how much of the mask anatomy would keep: a lung that ends
halfway down the rib cage, next to a full one, scores low. QC's `implausible_shape` bounds the
distance (scale-free); the Dice falls with the lungs' size in pixels and is reported only. Blind
spot: both lungs cut short alike make a plausible pair of small lungs (the pair is its own scale).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from lungrt.data.postprocess import lung_fields

VERSION = 1
POINTS_PER_LUNG = 32
VARIANCE_KEPT = 0.98
NOISE = 0.03  # landmark noise (share of the shape's size) against which the modes' Gaussian prior weighs


def _largest_contour(region: np.ndarray) -> np.ndarray | None:
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    c = max(contours, key=cv2.contourArea)
    return c[:, 0, :].astype(np.float64) if len(c) >= 8 else None


def _smooth(contour: np.ndarray) -> np.ndarray:
    """A closed pixel outline with its staircase averaged out (a circular running mean over ~2 % of
    its length): landmarks then move with the shape, not with the pixel grid (framing, resolution)."""
    k = max(3, len(contour) // 50) | 1
    padded = np.concatenate([contour[-(k // 2) :], contour, contour[: k // 2]])
    kernel = np.ones(k) / k
    return np.stack([np.convolve(padded[:, i], kernel, mode="valid") for i in (0, 1)], axis=1)


@functools.lru_cache(maxsize=8)
def _spacing(n: int, endpoints: bool) -> np.ndarray:
    t = np.linspace(0, 1, n) if endpoints else np.linspace(0, 1, n + 2)[1:-1]
    t.flags.writeable = False
    return t


def lung_landmarks(contour: np.ndarray, image_left: bool) -> np.ndarray:
    """POINTS_PER_LUNG landmarks of one lung's closed outline: apex -> lateral side -> lowest point
    -> medial side -> (apex), each side's points evenly spaced by arc length (the medial side's
    without its ends). `image_left`: the lung on the image's left (the patient's right in a PA
    film), whose lateral side is toward x = 0. Both sides are stretches of one arc length around
    the outline, which starts at the apex, so all the points come from one interpolation."""
    contour = _smooth(contour)
    n = len(contour)
    apex = int(np.argmin(contour[:, 1]))
    d = (int(np.argmax(contour[:, 1])) - apex) % n  # the lowest point, counted from the apex onward
    if d == 0:  # a flat outline: every landmark the one point
        return np.repeat(contour[apex][None], POINTS_PER_LUNG, axis=0)
    ring = np.roll(contour, -apex, axis=0)
    ring = np.concatenate([ring, ring[:1]])  # closed: back to the apex, at arc length `total`
    arc = np.zeros(n + 1)
    np.cumsum(np.hypot(*np.diff(ring, axis=0).T), out=arc[1:])
    onward, total = arc[d], arc[n]  # apex -> lowest point onward; the rest of the way round is the other side
    half = POINTS_PER_LUNG // 2
    ends, inner = _spacing(half, True), _spacing(POINTS_PER_LUNG - half, False)
    # the onward side is lateral when its points lie further toward the lateral edge than the other side's
    onward_x, other_x = ring[: d + 1, 0].mean(), ring[d:, 0].mean()
    if (onward_x < other_x) == image_left:  # lateral onward from the apex, medial from the base onward
        at = np.concatenate([ends * onward, onward + inner * (total - onward)])
    else:  # lateral backward from the apex (the way round), medial backward from the base
        at = np.concatenate([total - ends * (total - onward), onward - inner * onward])
    return np.stack([np.interp(at, arc, ring[:, 0]), np.interp(at, arc, ring[:, 1])], axis=1)


def pair_landmarks(mask: np.ndarray) -> np.ndarray | None:
    """(2 * POINTS_PER_LUNG, 2) landmarks (x, y) of a mask's two lung fields (cleaned and split as
    `postprocess.lung_fields` measures them; the image-left lung first), or None without one lung
    on each side."""
    fields = lung_fields(mask if mask.dtype == np.uint8 else mask.astype(np.uint8))
    if fields.split_x is not None:  # lungs that touch: one outline, cut at the mediastinum
        halves = np.zeros_like(fields.mask), np.zeros_like(fields.mask)
        halves[0][:, : fields.split_x], halves[1][:, fields.split_x :] = (
            fields.mask[:, : fields.split_x],
            fields.mask[:, fields.split_x :],
        )
        outlines = [_largest_contour(h) for h in halves]
    else:
        contours, _ = cv2.findContours(fields.mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        by_side = {
            bool(c[:, 0, 0].mean() >= mask.shape[1] / 2): c[:, 0, :].astype(np.float64)
            for c in sorted(contours, key=cv2.contourArea)[-2:]
            if len(c) >= 8
        }
        outlines = [by_side.get(False), by_side.get(True)]
    if any(o is None for o in outlines):
        return None
    return np.concatenate([lung_landmarks(outlines[0], True), lung_landmarks(outlines[1], False)])


def _normalise(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    centre = points.mean(axis=0)
    scale = float(np.sqrt(((points - centre) ** 2).sum(axis=1).mean()))
    return (points - centre) / scale, centre, scale


def draw(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The two lungs of a landmark shape filled, uint8 0/1 at `shape`."""
    out = np.zeros(shape, np.uint8)
    for lung in (points[:POINTS_PER_LUNG], points[POINTS_PER_LUNG:]):
        cv2.fillPoly(out, [np.round(lung).astype(np.int32)], 1)
    return out


@dataclass
class ShapeFit:
    distance: float  # Mahalanobis distance of the fitted mode weights (before clamping)
    residual: float  # RMS landmark residual, in units of the shape's size
    points: np.ndarray  # the plausible fit (modes within 3 SD) in image coordinates
    weights: np.ndarray  # each landmark's final robust weight (0..1)


@dataclass
class ShapeModel:
    mean: np.ndarray  # (K, 2) normalised mean shape
    modes: np.ndarray  # (2K, m) orthonormal modes
    variances: np.ndarray  # (m,) variance of each mode
    fitted_on: str = ""
    version: int = VERSION

    @classmethod
    def fit(cls, shapes: list[np.ndarray], description: str = "") -> "ShapeModel":
        """Modes of `shapes` (each (K, 2) landmarks) after translation/scale alignment to their mean."""
        normed = np.stack([_normalise(s)[0] for s in shapes])
        mean = normed.mean(axis=0)
        for _ in range(3):  # align each to the mean (scale by least squares), re-estimate the mean
            normed = np.stack([n * (np.sum(n * mean) / np.sum(n * n)) for n in normed])
            mean = _normalise(normed.mean(axis=0))[0]
        flat = (normed - mean).reshape(len(normed), -1)
        _, sing, vt = np.linalg.svd(flat, full_matrices=False)
        var = sing**2 / max(len(normed) - 1, 1)
        keep = int(np.searchsorted(np.cumsum(var) / var.sum(), VARIANCE_KEPT) + 1)
        return cls(mean, vt[:keep].T, var[:keep], description or f"{len(shapes)} masks")

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "points_per_lung": POINTS_PER_LUNG,
            "fitted_on": self.fitted_on,
            "mean": np.round(self.mean, 6).tolist(),
            "modes": np.round(self.modes, 6).tolist(),
            "variances": np.round(self.variances, 9).tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict | None) -> "ShapeModel | None":
        """None for a missing model, or one of another version or landmark count (re-fit it)."""
        if not d or d.get("version") != VERSION or d.get("points_per_lung") != POINTS_PER_LUNG:
            return None
        return cls(
            np.asarray(d["mean"], np.float64),
            np.asarray(d["modes"], np.float64),
            np.asarray(d["variances"], np.float64),
            d.get("fitted_on", ""),
            d["version"],
        )

    @functools.cached_property
    def _landmark_outer(self) -> np.ndarray:
        """(K, m*m): per landmark, the sum of its x and y rows' outer products of the modes."""
        rows = self.modes[:, :, None] * self.modes[:, None, :]
        return (rows[0::2] + rows[1::2]).reshape(len(self.mean), -1)

    def fit_points(self, points: np.ndarray, iterations: int = 8) -> ShapeFit:
        """`fit_many` of one shape."""
        return self.fit_many(points[None], iterations)[0]

    def fit_many(self, points: np.ndarray, iterations: int = 8) -> list[ShapeFit]:
        """Robust fits of observed landmarks (B, K, 2), each on its own: pose (centre, scale) and
        mode weights b alternately, landmarks re-weighted by their residual (Tukey's biweight on 4.7
        robust SDs), b with a Gaussian prior of variance `variances`. The B shapes go through each
        step together: this runs for every image QC checks, and its cost is the count of small array
        operations (~40 an iteration), not their size, so a batch of 8 costs about what one did."""
        n, k = points.shape[:2]
        mean, modes, m = self.mean, self.modes, len(self.variances)
        prior = np.diag(NOISE**2 / self.variances)
        w = np.ones((n, 1, k))  # row vectors: weighted sums are matrix products
        b = np.zeros((n, len(self.variances)))
        model, (middle, half) = np.broadcast_to(mean, points.shape), ((k - 1) // 2, k // 2)  # b = 0; the median's ranks
        for _ in range(iterations):
            total = w.sum(axis=2, keepdims=True)
            centre_m, centre_x = w @ model / total, w @ points / total  # (n, 1, 2)
            dm, dx = model - centre_m, points - centre_x
            wdm = dm * w.transpose(0, 2, 1)
            scale = (np.einsum("nkd,nkd->n", wdm, dx) / np.maximum(np.einsum("nkd,nkd->n", wdm, dm), 1e-12))[
                :, None, None
            ]
            seen = dx / scale  # each observation in the model's frame, about the model's weighted centre
            # the weighted normal equations: modes' x w x modes as one product with each landmark's
            # outer products (its x and y rows summed), then the prior
            normal = (w[:, 0] @ self._landmark_outer).reshape(n, m, m) + prior
            rhs = ((seen + (centre_m - mean)).reshape(n, 1, -1) * np.repeat(w, 2, axis=2)) @ modes
            b = np.linalg.solve(normal, rhs.transpose(0, 2, 1))[..., 0]
            model = mean + (b @ modes.T).reshape(n, k, 2)
            diff = seen - (model - centre_m)
            residual = np.sqrt(np.einsum("nkd,nkd->nk", diff, diff))
            ranked = np.partition(residual, (middle, half), axis=1)  # np.median's value, without its checks
            spread = 1.4826 * ((ranked[:, middle] + ranked[:, half]) / 2) + 1e-3
            u = residual / (4.685 * spread[:, None])
            w = np.maximum(1 - u * u, 0)[:, None]  # u >= 0: the biweight's clip to [0, 1]
            w *= w
        sd = np.sqrt(self.variances)
        plausible = mean + (np.clip(b, -3 * sd, 3 * sd) @ modes.T).reshape(n, k, 2)
        centre_p = w @ plausible / w.sum(axis=2, keepdims=True)
        drawn = (plausible - centre_p) * scale + centre_x
        distance = np.sqrt(np.sum(b**2 / self.variances, axis=1))
        rms = np.sqrt(np.mean(residual**2, axis=1))
        return [ShapeFit(float(distance[i]), float(rms[i]), drawn[i], w[i, 0]) for i in range(n)]


def shape_features(
    mask: np.ndarray, model: ShapeModel, stretch: float = 1.0
) -> tuple[dict[str, float], ShapeFit | None]:
    """`shape_features_many` of one mask."""
    return shape_features_many([mask], model, [stretch])[0]


def shape_features_many(
    masks: list[np.ndarray], model: ShapeModel, stretches: list[float]
) -> list[tuple[dict[str, float], ShapeFit | None]]:
    """QC numbers of (network-resolution) masks against the shape model: `shape_dice` (the mask
    against its plausible fit), `shape_distance` (Mahalanobis), `shape_residual`, and the fit; the
    masks' landmarks are fitted together (`ShapeModel.fit_many`). Without a lung on each side there
    is no pair to fit: Dice 0, distance and residual at a fixed large value. `stretches`: each
    image's height over its width; the network saw it squeezed to a square, so the landmarks are
    fitted in the image's proportions (the fit comes back in the mask's pixels)."""
    points = [pair_landmarks(m) for m in masks]
    paired = [i for i, p in enumerate(points) if p is not None]
    out: list[tuple[dict[str, float], ShapeFit | None]] = [(dict(NO_PAIR), None) for _ in masks]
    if not paired:
        return out
    stretch = np.array([[1.0, stretches[i]] for i in paired])[:, None, :]
    fits = model.fit_many(np.stack([points[i] for i in paired]) * stretch)
    for i, fit, st in zip(paired, fits, stretch):
        fit.points /= st
        mask = masks[i]
        inside = mask if mask.dtype == np.uint8 else mask.astype(np.uint8)  # non-zero = lung: & with 0/1 keeps it
        drawn = draw(fit.points, mask.shape)
        both = cv2.countNonZero(drawn) + cv2.countNonZero(inside)
        dice = 2.0 * cv2.countNonZero(drawn & inside) / both if both else 0.0
        out[i] = (
            {"shape_dice": dice, "shape_distance": min(fit.distance, 99.0), "shape_residual": min(fit.residual, 9.9)},
            fit,
        )
    return out


NO_PAIR = {"shape_dice": 0.0, "shape_distance": 99.0, "shape_residual": 9.9}


def plausible_fit(prob_small: np.ndarray, model: ShapeModel, shape: tuple[int, int]) -> np.ndarray | None:
    """The plausible fit of a network-size probability map's mask, drawn (uint8 0/1) at `shape`
    (the original image's), or None without a lung on each side."""
    small = (np.asarray(prob_small).reshape(prob_small.shape[-2:]) > 0.5).astype(np.uint8)
    _, fit = shape_features(small, model, shape[0] / shape[1])
    if fit is None:
        return None
    h, w = shape
    scale = np.array([w / small.shape[1], h / small.shape[0]])
    return draw((fit.points + 0.5) * scale - 0.5, (h, w))


def complete(mask: np.ndarray, prob_small: np.ndarray, model: ShapeModel) -> tuple[np.ndarray, int]:
    """`mask` (uint8 0/255 at the original size) with the lung its plausible fit says is missing
    added: the fit drawn at the original size, outside the mask (so never over the other lung's
    pixels), inside the image. Returns the mask and the pixels added."""
    fit = plausible_fit(prob_small, model, mask.shape)
    if fit is None:
        return mask, 0
    added = fit & (mask == 0)
    return np.where(added > 0, np.uint8(255), mask), int(cv2.countNonZero(added))
