"""Mask clean-up and lung measurements on a predicted lung mask at native resolution.

This runs once per image on the inference hot path, so clean-up and measurement share one pass:
the outer contours of the mask (OpenCV, 8-connected) give the components; the two largest are
drawn filled, which keeps the two lungs and fills every hole inside them at once, and the filled
drawing is also what is measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class LungFields:
    mask: np.ndarray  # uint8, 0/255, the image's size
    right_px: int  # the patient's right lung: the image's left half in a PA view
    left_px: int

    @property
    def area_px(self) -> int:
        return self.right_px + self.left_px


def lung_fields(mask: np.ndarray, clean: bool = True) -> LungFields:
    """Measure a binary mask (bool, or uint8 with non-zero = lung); with `clean`, keep its two largest components with holes filled.
    Each component goes to the side of the image its centroid lies on."""
    u8 = mask if mask.dtype == np.uint8 else (mask != 0).view(np.uint8)  # OpenCV: non-zero is foreground
    if not clean:
        return _measure_components(u8)
    contours, _ = cv2.findContours(u8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    drawn = np.zeros(u8.shape, np.uint8)
    sides, before = [0, 0], 0
    for c in sorted(contours, key=cv2.contourArea, reverse=True)[:2]:
        # outer contours of distinct components fill disjoint regions, so areas are count differences
        cv2.drawContours(drawn, [c], -1, 255, thickness=cv2.FILLED)
        now = cv2.countNonZero(drawn)
        sides[_centroid_x(c) >= u8.shape[1] / 2] += now - before
        before = now
    return LungFields(drawn, sides[0], sides[1])


def _centroid_x(contour: np.ndarray) -> float:
    m = cv2.moments(contour)
    if m["m00"] > 0:
        return m["m10"] / m["m00"]
    x, _, w, _ = cv2.boundingRect(contour)  # a line or a point: no polygon area
    return x + (w - 1) / 2


def _measure_components(u8: np.ndarray) -> LungFields:
    n, _, stats, centroids = cv2.connectedComponentsWithStats(u8, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    image_left = centroids[1:, 0] < u8.shape[1] / 2
    return LungFields(cv2.compare(u8, 0, cv2.CMP_NE), int(areas[image_left].sum()), int(areas[~image_left].sum()))
