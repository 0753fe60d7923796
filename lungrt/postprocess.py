"""Mask clean-up and measurements on a predicted lung mask at native resolution."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def keep_two_largest_and_fill(mask: np.ndarray) -> np.ndarray:
    """Two lungs: keep the two largest connected components, fill holes inside them."""
    labels, n = ndimage.label(mask)
    if n > 2:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        keep = np.argsort(sizes)[-2:] + 1
        mask = np.isin(labels, keep)
    return ndimage.binary_fill_holes(mask)


def lung_areas(mask: np.ndarray) -> tuple[int, int]:
    """(right, left) lung areas in pixels for a PA view: the patient's right lung is on the
    image's left. Each connected component goes to the side its centroid lies on."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return 0, 0
    idx = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(mask, labels, index=idx)
    cols = np.array([c[1] for c in ndimage.center_of_mass(mask, labels, idx)])
    image_left = cols < mask.shape[1] / 2
    return int(sizes[image_left].sum()), int(sizes[~image_left].sum())
