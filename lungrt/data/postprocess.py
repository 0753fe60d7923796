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
    split_x: int | None = None  # lungs that touch: the column they were split at (the mediastinum)

    @property
    def area_px(self) -> int:
        return self.right_px + self.left_px


def lung_fields(mask: np.ndarray, clean: bool = True, within: tuple[slice, slice] | None = None) -> LungFields:
    """Measure a binary mask (bool, or uint8 with non-zero = lung); with `clean`, keep its two largest components
    with holes filled.
    Each component goes to the side of the image its centroid lies on; lungs that touch (one
    component across the midline) are split at the mediastinum (`_touching_lungs`). `within`:
    (rows, columns) known to hold every lung pixel (`PreprocessSpec.mask_region`): the clean-up
    looks for outlines there only."""
    u8 = mask if mask.dtype == np.uint8 else (mask != 0).view(np.uint8)  # OpenCV: non-zero is foreground
    if not clean:
        return _touching_lungs(_measure_components(u8))
    rows, cols = within or (slice(0, u8.shape[0]), slice(0, u8.shape[1]))
    region = u8[rows, cols]
    contours = (
        cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(cols.start, rows.start))[0]
        if region.size
        else ()
    )
    drawn = np.zeros(u8.shape, np.uint8)
    sides = [0, 0]
    for c in sorted(contours, key=cv2.contourArea, reverse=True)[:2]:
        # outer contours of distinct components fill disjoint regions, so a component's area is the
        # count its drawing adds inside its bounding box (not the whole 5-megapixel image, twice)
        x, y, bw, bh = cv2.boundingRect(c)
        box = drawn[y : y + bh, x : x + bw]
        before = cv2.countNonZero(box)
        cv2.drawContours(drawn, [c], -1, 255, thickness=cv2.FILLED)
        sides[_centroid_x(c) >= u8.shape[1] / 2] += cv2.countNonZero(box) - before
    return _touching_lungs(LungFields(drawn, sides[0], sides[1]))


# a mask counts as both lungs when it reaches this share of the image width past the midline on each side
TOUCHING_REACH = 0.10


def _touching_lungs(fields: LungFields) -> LungFields:
    """One side empty although the mask spans both sides of the midline: the lungs touch (severe
    consolidation, ARDS, a mask drawn over the heart). Split at the mediastinum: the column with
    the fewest mask pixels in the central 30 % of the mask's own width. A single lung that stays on
    its side keeps the other side at 0, as it should."""
    if fields.right_px and fields.left_px or not fields.area_px:
        return fields
    per_column = cv2.reduce(fields.mask, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel() // 255
    xs = np.flatnonzero(per_column)
    w = fields.mask.shape[1]
    x0, x1 = int(xs[0]), int(xs[-1])
    if x0 > w / 2 - TOUCHING_REACH * w or x1 < w / 2 + TOUCHING_REACH * w:
        return fields
    lo, hi = x0 + int(0.35 * (x1 - x0)), x1 - int(0.35 * (x1 - x0))  # the central 30 %: where the mediastinum is
    split = lo + int(np.argmin(per_column[lo : hi + 1]))
    right = int(per_column[:split].sum())
    return LungFields(fields.mask, right, int(per_column[split:].sum()), split)


def side_labels(fields: LungFields) -> np.ndarray:
    """uint8 labels at the mask's size: 1 the patient's right lung, 2 the left, 0 background; the
    same assignment the areas were measured with (a DICOM SEG's two segments)."""
    labels = np.zeros(fields.mask.shape, np.uint8)
    if fields.split_x is not None:
        labels[:, : fields.split_x][fields.mask[:, : fields.split_x] > 0] = 1
        labels[:, fields.split_x :][fields.mask[:, fields.split_x :] > 0] = 2
        return labels
    components, side, _ = _components_by_side((fields.mask > 0).view(np.uint8))
    return side[components]


def _centroid_x(contour: np.ndarray) -> float:
    m = cv2.moments(contour)
    if m["m00"] > 0:
        return m["m10"] / m["m00"]
    x, _, w, _ = cv2.boundingRect(contour)  # a line or a point: no polygon area
    return x + (w - 1) / 2


def _components_by_side(u8: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected components (8-connected), each's side by its centroid: the label image, the side
    per label (0 background, 1 the image's left half = the patient's right lung, 2 the other) and
    the area per label."""
    _, components, stats, centroids = cv2.connectedComponentsWithStats(u8, connectivity=8)
    side = np.where(centroids[:, 0] < u8.shape[1] / 2, 1, 2).astype(np.uint8)
    side[0] = 0
    return components, side, stats[:, cv2.CC_STAT_AREA]


def _measure_components(u8: np.ndarray) -> LungFields:
    _, side, areas = _components_by_side(u8)
    return LungFields(cv2.compare(u8, 0, cv2.CMP_NE), int(areas[side == 1].sum()), int(areas[side == 2].sum()))
