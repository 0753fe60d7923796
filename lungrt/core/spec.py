"""The one preprocessing spec that travels with a model.

Training, every backend, parity and inference call `PreprocessSpec.apply_xray` on a decoded X-ray
(`apply` on an image array); predicted masks go back
to the original image size through `PreprocessSpec.invert`. The spec is stored in checkpoints and in
ONNX / engine metadata as JSON, so no consumer re-implements it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache

import cv2
import numpy as np

EQUALIZATIONS = ("none", "histogram", "clahe")

# What a "lung" mask means. Two conventions of annotators, which contradict each other as one target:
CONVENTIONS = {
    "lung-field": "the visible lung fields; the lung behind the heart and below the diaphragm's dome left out "
    "(JSRT/SCR, Montgomery, Shenzhen)",
    "whole-lung": "the whole lung, behind the heart and where disease made it opaque, down to the diaphragm "
    "(cxr-covid-v7)",
}
LUNG_FIELD, WHOLE_LUNG = CONVENTIONS
DEFAULT_CONVENTION = LUNG_FIELD  # what every model before the conventions were named was trained on


def check_convention(name: str) -> str:
    if name not in CONVENTIONS:
        raise ValueError(f"mask convention must be one of {', '.join(CONVENTIONS)}, got {name!r}")
    return name


@dataclass(frozen=True)
class PreprocessSpec:
    size: int = 256  # square network input; the originals are resized without keeping aspect
    equalization: str = "histogram"  # none | histogram | clahe (papers: histogram)
    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    mean: float = 0.5
    std: float = 0.25
    # the mask convention the model segments: travels with the spec (checkpoint, ONNX metadata, engine sidecar,
    # the artifact's digest), so a deployed file cannot be taken for the other convention
    convention: str = DEFAULT_CONVENTION

    def __post_init__(self):
        check_convention(self.convention)
        if self.equalization not in EQUALIZATIONS:
            raise ValueError(f"equalization must be one of {EQUALIZATIONS}, got {self.equalization!r}")
        if self.size % 16 or not 32 <= self.size <= 2048:
            raise ValueError(f"input size must be a multiple of 16 in 32..2048, got {self.size}")
        if self.std <= 0:
            raise ValueError("std must be positive")

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    @classmethod
    def from_json(cls, s: str) -> "PreprocessSpec":
        return cls.from_dict(json.loads(s))

    # -- forward mapping -----------------------------------------------------------------------
    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """[0,1] float image (or its uint8 `to_gray8`) of any size -> equalized [0,1] float32 image
        of size x size. Split from `normalize` so training can augment intensities in between."""
        return self.equalize8(self.resize8(pixels)).astype(np.float32) / 255.0

    def resize8(self, pixels: np.ndarray) -> np.ndarray:
        """Any-size image -> uint8 size x size, before equalization (training augments here)."""
        return self._resize(pixels if pixels.dtype == np.uint8 else to_gray8(pixels))

    def _resize(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape
        if self.resizes_in_bands(h, w):
            return area_downsize(image, self.size)
        interp = cv2.INTER_AREA if (h > self.size or w > self.size) else cv2.INTER_LINEAR
        return cv2.resize(image, (self.size, self.size), interpolation=interp)

    def resizes_in_bands(self, h: int, w: int) -> bool:
        """Whether an h x w image goes to the network's size by `area_downsize` (then a reader may
        reduce it band by band while reading: `area_downsize_bands`)."""
        return h * w >= BANDED_AREA_PIXELS and h > 2 * self.size and w > 2 * self.size

    def resize_xray8(self, xray) -> np.ndarray:
        """A decoded X-ray (`lungrt.data.io.XRay`) -> uint8 size x size. A 16-bit image is resized
        on its raw values, then mapped to 8 bits through its window: the window is affine, so this
        is the same area average rounded once instead of twice, without mapping megapixels one by
        one (a 5-megapixel detector image: 18 ms -> a few)."""
        if getattr(xray, "window", None) is None:
            return self.resize8(xray.gray8)
        return xray.to_gray8(self._resize(xray.image))

    def apply_xray(self, xray) -> np.ndarray:
        """A decoded X-ray -> network input (1, size, size): what every backend, evaluation,
        calibration and infer feed the model."""
        return self.normalize(self.equalize8(self.resize_xray8(xray)).astype(np.float32) / 255.0)[None]

    def equalize8(self, u8: np.ndarray) -> np.ndarray:
        if self.equalization == "histogram":
            return cv2.equalizeHist(u8)
        if self.equalization == "clahe":
            clahe = cv2.createCLAHE(clipLimit=self.clahe_clip, tileGridSize=(self.clahe_tiles, self.clahe_tiles))
            return clahe.apply(u8)
        return u8

    def normalize(self, unit: np.ndarray) -> np.ndarray:
        return ((unit - self.mean) / self.std).astype(np.float32)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """[0,1] float image of any size -> network input, float32 array (1, size, size)."""
        return self.normalize(self.prepare(pixels))[None]

    def apply_batch(self, images: list[np.ndarray]) -> np.ndarray:
        return np.stack([self.apply(im) for im in images])

    # -- inverse mapping -----------------------------------------------------------------------
    def invert(self, probability: np.ndarray, original_shape: tuple[int, int]) -> np.ndarray:
        """Network-size probability map (size x size) -> probability map at the original (h, w)."""
        h, w = original_shape
        prob = np.asarray(probability, dtype=np.float32).reshape(self.size, self.size)
        return cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)

    def invert_mask(self, probability: np.ndarray, original_shape: tuple[int, int]) -> np.ndarray:
        """Network-size probability map -> uint8 mask (255 = lung) at the original (h, w): where the
        probability interpolated as in `invert` is >= 0.5. Interpolated in 8 bits (a pixel's
        verdict can change only where the probability is within 1/255 of 0.5): a 5-megapixel detector
        image never gets a full-size float map (3.4 + 0.9 ms -> 0.9 + 0.7 ms on one core)."""
        h, w = original_shape
        full = cv2.resize(self._prob8(probability), (w, h), interpolation=cv2.INTER_LINEAR)
        return cv2.threshold(full, 127, 255, cv2.THRESH_BINARY, dst=full)[
            1
        ]  # > 127, in place: no second full-size array

    def mask_region(self, probability: np.ndarray, original_shape: tuple[int, int]) -> tuple[slice, slice]:
        """The rows and columns of the original size outside which `invert_mask` is 0: an
        interpolated pixel is a weighted mean of its network-size neighbours, so it passes the
        threshold only next to one that does. Clean-up scans this box, not a whole 5 MP film."""
        hot = self._prob8(probability) > 127
        rows, cols = np.flatnonzero(hot.any(axis=1)), np.flatnonzero(hot.any(axis=0))
        if not len(rows):
            return slice(0, 0), slice(0, 0)
        return (
            _upscaled_span(rows[0], rows[-1], self.size, original_shape[0]),
            _upscaled_span(cols[0], cols[-1], self.size, original_shape[1]),
        )

    def _prob8(self, probability: np.ndarray) -> np.ndarray:
        return cv2.convertScaleAbs(np.asarray(probability, dtype=np.float32).reshape(self.size, self.size), alpha=255.0)


def _upscaled_span(first: int, last: int, n_in: int, n_out: int) -> slice:
    """Output indices of a linear resize n_in -> n_out whose two source neighbours (floor(f) and
    the next, f = (i + 0.5) * n_in / n_out - 0.5) can include one of first..last; 2 more on each
    side for OpenCV's float rounding of f."""
    scale = n_in / n_out
    start = int(np.floor((first - 0.5) / scale - 0.5)) - 2
    stop = int(np.ceil((last + 1.5) / scale - 0.5)) + 2
    return slice(max(0, start), min(n_out, stop))


# from this many pixels on, `area_downsize` beats OpenCV's INTER_AREA (7.8 -> 4.0 ms at 7 MP, a tie
# near 1.5 MP on one core of an AMD EPYC); below it OpenCV's is used
BANDED_AREA_PIXELS = 2_000_000


def area_downsize(image: np.ndarray, size: int) -> np.ndarray:
    """OpenCV's INTER_AREA to size x size (each output pixel the mean of the input area it covers,
    edge pixels by their covered fraction), computed separably: rows first, each output row one
    vector-matrix product over the ~h/size input rows it covers (contiguous, SIMD in BLAS), then
    OpenCV's INTER_AREA across the size x w float rows. OpenCV's own non-integer INTER_AREA spends
    ~1.2 ns per input pixel scattering columns; this is ~0.5. The same weights in another summation
    order: an output pixel can differ from OpenCV's by one unit of the input's dtype where the mean
    lies within float rounding of a half (a few pixels of 65536; tests/test_preprocess.py)."""
    h, w = image.shape
    return area_downsize_bands([image], h, w, size, image.dtype)


def area_downsize_bands(bands, h: int, w: int, size: int, dtype) -> np.ndarray:
    """`area_downsize` of an h x w image given as consecutive bands of rows, top to bottom: a file
    is reduced while it is read, each band used while it sits in the cache, the whole image never
    in memory. A band's array may be reused for the next one (the rows still needed are copied).
    Each output row converts the few input rows it covers to float: they stay in the fastest cache."""
    weights = _area_weights(h, size)
    rows = np.empty((size, w), np.float32)
    carry, carry_start, read, j = np.empty((0, w), dtype), 0, 0, 0  # carry: rows read that a later output row needs
    for band in bands:
        band_start, read = read, read + len(band)
        while j < size and weights[j][0] + len(weights[j][1]) <= read:
            first, row_weights = weights[j]
            stop = first + len(row_weights) - band_start
            src = (
                band[first - band_start : stop]
                if first >= band_start
                else np.concatenate((carry[first - carry_start :], band[:stop]))
            )
            np.dot(row_weights, src.astype(np.float32), out=rows[j])
            j += 1
        keep = weights[j][0] if j < size else read
        carry = (
            band[keep - band_start :].copy()
            if keep >= band_start
            else np.concatenate((carry[keep - carry_start :], band))
        )
        carry_start = keep
    if j < size or read != h:
        raise ValueError(f"the bands held {read} rows, not {h}")
    out = cv2.resize(rows, (size, size), interpolation=cv2.INTER_AREA)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
    return np.clip(np.rint(out), info.min, info.max).astype(dtype) if info else out.astype(dtype)


@lru_cache(maxsize=64)
def _area_weights(n_in: int, n_out: int) -> tuple[tuple[int, np.ndarray], ...]:
    """Per output index: the first input index it covers and the covered fraction of each input
    index from there, divided by the scale (so the weights sum to 1). All rows at once: built row
    by row it took 2.2 ms, paid by every image of a height not seen recently (detectors differ)."""
    scale = n_in / n_out
    starts, ends = np.arange(n_out) * scale, np.arange(1, n_out + 1) * scale
    first = np.floor(starts).astype(np.int64)
    stop = np.minimum(np.ceil(ends).astype(np.int64), n_in)
    idx = first[:, None] + np.arange(int((stop - first).max()))
    weights = ((np.minimum(idx + 1, ends[:, None]) - np.maximum(idx, starts[:, None])) / scale).astype(np.float32)
    return tuple((int(f), w[:n]) for f, w, n in zip(first, weights, (stop - first).tolist()))


def to_gray8(pixels: np.ndarray) -> np.ndarray:
    """[0,1] float image -> uint8; the network sees 8-bit gray whatever the file stored."""
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))).astype(np.float32)
