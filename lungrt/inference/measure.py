"""One image's measurements and files: its mask at the original size, lung areas, QC, the PNGs and the
DICOM SEG, and its record. The one place infer, the Python API and Ray turn probabilities into results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lungrt.backends.base import Runner
from lungrt.core.errors import LungrtError, one_line
from lungrt.core.plots import overlay
from lungrt.core.spec import PreprocessSpec
from lungrt.data.dicom import screen, seg_refusal
from lungrt.data.io import atomic_write_bytes, encode_mask_png1
from lungrt.inference.inputs import Item, display_path
from lungrt.inference.options import FATAL_ERRNOS, InferOptions
from lungrt.inference.outputs import error_row, outputs_for, source_stat, write_record
from lungrt.data.postprocess import LungFields, lung_fields, side_labels
from lungrt.inference.qc import QCThresholds, features as qc_features, features_many as qc_features_many
from lungrt.inference.qc import thresholds_of as qc_thresholds_of, verdict as qc_verdict
from lungrt.inference.shape import complete, plausible_fit


# no row filter + run-length zlib: a third faster than OpenCV's defaults on 0/255 masks, ~30% larger files
_PNG_FAST = [
    cv2.IMWRITE_PNG_FILTER,
    cv2.IMWRITE_PNG_FILTER_NONE,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_RLE,
    cv2.IMWRITE_PNG_COMPRESSION,
    3,
]


def _png(array: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(".png", array, params or [])
    if not ok:
        raise LungrtError("PNG encoding failed")
    return buf.tobytes()


@dataclass(frozen=True)
class RunnerFacts:
    """What writing one image's outputs needs of the runner (spec, QC thresholds, names), without
    the runner itself: what a helper process receives."""

    spec: PreprocessSpec
    info: object
    weights_id: str | None
    content_hash: str | None
    described: str

    @classmethod
    def of(cls, runner: Runner) -> "RunnerFacts":
        return cls(runner.spec, runner.info, runner.weights_id, runner.content_hash, runner.describe())

    def describe(self) -> str:
        return self.described


@dataclass
class Measured:
    """One image's segmentation at its original size, and what is measured on it."""

    mask: np.ndarray  # uint8 0/255 (H, W), after the clean-up when asked
    right_px: int | None  # None: the header says this is not a frontal chest film (not measured)
    left_px: int | None
    lung_fraction: float
    right_mm2: float | None
    left_mm2: float | None
    mean_confidence: float
    qc: str  # "ok" or ";"-separated reasons
    qc_features: dict
    prob_small: np.ndarray  # the network's own (size, size) probabilities
    spec: PreprocessSpec
    fields: LungFields  # the mask as measured (sides, and where touching lungs were split)

    @property
    def probability(self) -> np.ndarray:
        """float32 probabilities at the original size, made when asked (most runs write masks only)."""
        return self.spec.invert(self.prob_small, self.mask.shape)


def measure(
    xray,
    prob_small: np.ndarray,
    spec,
    postprocess: bool = True,
    qc: QCThresholds | None = None,
    complete_shape: bool = False,
    feats: dict | None = None,
    reference: np.ndarray | None = None,
) -> Measured:
    """Network-size probabilities of one X-ray -> its mask, lung areas and QC at the original size:
    the one function infer, the Python API and Ray all use. With `complete_shape`, a mask QC calls
    an implausible shape gets the lung its shape fit says is missing (`shape.complete`). `feats`:
    its QC numbers when already computed with its batch's (`qc.features_many`); else computed here, with the
    second opinion's probabilities `reference` when given."""
    qc = qc or QCThresholds.from_dict(None)
    feats = dict(feats) if feats is not None else qc_features(prob_small, qc.shape, xray.shape, reference)
    lungs = lung_fields(spec.invert_mask(prob_small, xray.shape), postprocess, spec.mask_region(prob_small, xray.shape))
    h, w = xray.shape
    verdict = qc_verdict(feats, qc)
    if complete_shape and qc.shape is not None and "implausible_shape" in verdict.split(";"):
        completed, added = complete(lungs.mask, prob_small, qc.shape)
        lungs = lung_fields(completed, clean=postprocess)
        feats["shape_added_fraction"] = added / (h * w)
    screened = screen(getattr(xray, "header", None))
    if screened:  # not a frontal chest film by its header: flagged, and its "lung areas" are not measurements
        verdict = ";".join(screened + ([] if verdict == "ok" else verdict.split(";")))
        right = left = None
    else:
        right, left = lungs.right_px, lungs.left_px
    px_mm2 = xray.spacing_mm[0] * xray.spacing_mm[1] if xray.spacing_mm and right is not None else None
    return Measured(
        lungs.mask,
        right,
        left,
        round(lungs.area_px / (h * w), 6),
        round(right * px_mm2, 2) if px_mm2 else None,
        round(left * px_mm2, 2) if px_mm2 else None,
        _mean_confidence(prob_small, lungs.mask),
        verdict,
        {k: round(v, 5) for k, v in feats.items()},
        prob_small,
        spec,
        lungs,
    )


def finish_batch(
    out_dir: Path,
    entries: list,
    probs: np.ndarray,
    runner: Runner | RunnerFacts,
    opts: InferOptions,
    references: np.ndarray | None = None,
) -> list[dict]:
    """`finish_or_error_row` for one batch's (item, xray) entries and their probabilities (and the second
    opinion's, when there is one); their QC numbers computed together first (the shape fits of a batch cost
    about what one did)."""
    qc = qc_thresholds_of(runner.info.qc)
    feats = qc_features_many(probs, qc.shape, [xr.shape for _, xr in entries], references)
    return [
        finish_or_error_row(out_dir, item, xr, p, runner, opts, f) for (item, xr), p, f in zip(entries, probs, feats)
    ]


def finish_or_error_row(
    out_dir: Path,
    item: Item,
    xray,
    prob_small: np.ndarray,
    runner: Runner | RunnerFacts,
    opts: InferOptions,
    feats: dict | None = None,
    reference: np.ndarray | None = None,
) -> dict:
    """`finish_one`, with a failure that belongs to this input alone (its name, a permission) made
    its error row. A full or read-only disk is everyone's failure: it propagates and stops the run."""
    try:
        return finish_one(out_dir, item, xray, prob_small, runner, opts, feats, reference)
    except OSError as e:
        if e.errno in FATAL_ERRNOS:
            raise
        return write_record(out_dir, item, error_row(item, f"could not write its outputs ({e.strerror})", runner))
    except Exception as e:  # measuring or encoding one input failed: its row says why, the run goes on
        return write_record(out_dir, item, error_row(item, f"{type(e).__name__}: {e}", runner))


def finish_one(
    out_dir: Path,
    item: Item,
    xray,
    prob_small: np.ndarray,
    runner: Runner,
    opts: InferOptions,
    feats: dict | None = None,
    reference: np.ndarray | None = None,
) -> dict:
    """Native-size mask, measurements and files for one image; the record is written last."""
    qc = qc_thresholds_of(runner.info.qc)
    m = measure(xray, prob_small, runner.spec, opts.postprocess, qc, opts.complete_shape, feats, reference)
    files = {"mask": encode_mask_png1(m.mask) if opts.mask_bits == 1 else _png(m.mask, _PNG_FAST)}
    if opts.overlay:
        files["overlay"] = _png(_overlay_with_fit(xray, m, qc))
    if opts.probabilities:
        files["probability"] = _png(cv2.convertScaleAbs(m.probability, alpha=255.0))
    dicom = getattr(xray, "header", None) is not None
    seg_note = ""
    if opts.dicom_seg and dicom:
        seg, seg_note = _segmentation_or_why_not(item, xray, m, runner)
        if seg is not None:
            files["seg"] = seg
    paths = outputs_for(out_dir, item, opts, seg="seg" in files)
    for kind, data in files.items():
        atomic_write_bytes(paths[kind], data, durable=False)
    h, w = xray.shape
    row = {
        "path": display_path(item.source),
        "width": w,
        "height": h,
        "status": "ok",
        "error": "",
        "lung_fraction": m.lung_fraction,
        "right_lung_px": _blank(m.right_px),
        "left_lung_px": _blank(m.left_px),
        "right_lung_mm2": _blank(m.right_mm2),
        "left_lung_mm2": _blank(m.left_mm2),
        "mean_confidence": m.mean_confidence,
        "qc": m.qc,
        **{f"qc_{k}": v for k, v in m.qc_features.items() if k != "lung_fraction"},
        "backend": runner.describe(),
        "model": runner.info.name,
        "mask": str(paths["mask"].relative_to(out_dir)),
        "sizes": {kind: len(data) for kind, data in files.items()},
        "source_stat": source_stat(item.file),
        "dicom": dicom,
        "dicom_seg": str(paths["seg"].relative_to(out_dir)) if "seg" in paths else seg_note,
    }
    return write_record(out_dir, item, row)


def _segmentation_or_why_not(item: Item, xray, m: Measured, runner) -> tuple[bytes | None, str]:
    """(the DICOM SEG's bytes, '') or (None, why this film has none): no lung SEG for a film that header
    screening says is not a frontal chest, none for an empty mask; a SEG that cannot be made (a header
    highdicom refuses) leaves the mask and the row as they are, with the reason."""
    reasons = seg_refusal(getattr(xray, "header", None))
    if reasons:
        return None, f"no SEG: header screening ({';'.join(reasons)})"
    labels = side_labels(m.fields)
    if not labels.any():
        return None, "no SEG: empty mask"
    from lungrt.inference.dicom_seg import segmentation_bytes

    artifact = getattr(runner, "content_hash", None) or getattr(runner, "weights_id", None)
    try:
        return segmentation_bytes(item.file, labels, runner.info.name, artifact, runner.spec.convention, m.qc), ""
    except Exception as e:  # one film's header must never stop the run: its mask stands, its row says why
        return None, f"no SEG: {one_line(f'{type(e).__name__}: {e}', 200)}"


def _overlay_with_fit(xray, m: Measured, qc: QCThresholds) -> np.ndarray:
    """The overlay PNG's pixels (BGR); where the shape is implausible, its plausible fit outlined
    in yellow, so the report shows why it was flagged."""
    bgr = cv2.cvtColor(overlay(xray.gray8, m.mask > 0), cv2.COLOR_RGB2BGR)
    if qc.shape is not None and "implausible_shape" in m.qc.split(";"):
        fit = plausible_fit(m.prob_small, qc.shape, m.mask.shape)
        if fit is not None:
            outline, _ = cv2.findContours(fit, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(bgr, outline, -1, (0, 255, 255), max(1, max(m.mask.shape) // 300))
    return bgr


def _blank(value):
    return "" if value is None else value


def _mean_confidence(prob_small: np.ndarray, mask: np.ndarray) -> float:
    """Mean network probability inside the final mask, at the network's own resolution (where the
    probabilities come from; 7x fewer pixels than a 512x512 original)."""
    small = prob_small.reshape(prob_small.shape[-2:])
    inside = cv2.resize(mask, small.shape[::-1], interpolation=cv2.INTER_NEAREST)
    return round(cv2.mean(small, mask=inside)[0], 6) if cv2.countNonZero(inside) else 0.0
