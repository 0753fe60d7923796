"""Mask clean-up and measurements on a predicted lung mask at native resolution.

OpenCV's connected components (8-connectivity) are used for speed: this runs once per image on
the inference hot path.
"""

from __future__ import annotations

import cv2
import numpy as np


def _components(mask: np.ndarray):
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return n, labels, stats, centroids  # label 0 is the background


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background regions that do not touch the image border are holes."""
    n, labels, stats, _ = _components(~mask)
    h, w = mask.shape
    x, y, bw, bh = stats[1:, 0], stats[1:, 1], stats[1:, 2], stats[1:, 3]
    inner = (x > 0) & (y > 0) & (x + bw < w) & (y + bh < h)
    if not inner.any():
        return mask
    return mask | np.concatenate([[False], inner])[labels]  # lookup table, faster than np.isin


def keep_two_largest_and_fill(mask: np.ndarray) -> np.ndarray:
    """Two lungs: keep the two largest connected components, fill holes inside them."""
    n, labels, stats, _ = _components(mask)
    if n > 3:  # background + more than two components
        keep = np.zeros(n, bool)
        keep[np.argsort(stats[1:, cv2.CC_STAT_AREA])[-2:] + 1] = True
        mask = keep[labels]
    return fill_holes(mask)


def lung_areas(mask: np.ndarray) -> tuple[int, int]:
    """(right, left) lung areas in pixels for a PA view: the patient's right lung is on the
    image's left. Each connected component goes to the side its centroid lies on."""
    n, _, stats, centroids = _components(mask)
    if n <= 1:
        return 0, 0
    areas = stats[1:, cv2.CC_STAT_AREA]
    image_left = centroids[1:, 0] < mask.shape[1] / 2
    return int(areas[image_left].sum()), int(areas[~image_left].sum())
