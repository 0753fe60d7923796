"""Batch inference over folders of X-rays: masks at original resolution, measurements, resumable.

Decoding/preprocessing runs in a thread pool ahead of the model (bounded window, in input order),
the model runs full batches (partial batches are padded so every image sees the same batch shape,
which keeps results identical between a resumed and an uninterrupted run), and writing runs in a
second pool. Every output is written atomically; a per-input record (journal.py) is written last, so
an input counts as done only when all its files are complete. results.csv is assembled from those records.
"""

from __future__ import annotations

import csv
import errno
import fnmatch
import functools
import glob
import hashlib
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lungrt.core.errors import ImageReadError, LungrtError, NotARadiograph, one_line
from lungrt.data.io import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    TEMP_SUFFIX,
    atomic_text_file,
    atomic_write_bytes,
    encode_mask_png1,
    is_special_file,
    is_supported,
    read_xray,
    sync_filesystem,
)
from lungrt.inference.journal import (
    check_identity,
    journal_for,
    lock_out_dir,
    read_records,
    start_fresh,
    write_identity,
    write_summary,
)
from lungrt.core.plots import overlay
from lungrt.data.dicom import screen, seg_refusal
from lungrt.inference.postprocess import LungFields, lung_fields, side_labels
from lungrt.inference.shape import complete, plausible_fit
from lungrt.inference.qc import FEATURES as QC_FEATURES
from lungrt.inference.qc import QCThresholds, features as qc_features, features_many as qc_features_many
from lungrt.inference.qc import thresholds_of as qc_thresholds_of, verdict as qc_verdict
from lungrt.core.progress import progress_bar
from lungrt.core.spec import PreprocessSpec
from lungrt.backends.base import Runner

EXIT_OK, EXIT_USAGE, EXIT_SOME_FAILED = 0, 2, 3
# a full, over-quota, read-only or failing disk stops the run (every later write would fail too)
FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}
# the one list of result columns: results.csv writes them, the report shows a subset (REPORT_COLUMNS), the README
# names them (a test holds the three together). qc_shape_dice / qc_shape_residual: reported, not checked
CSV_FIELDS = [
    "path",
    "width",
    "height",
    "status",
    "error",
    "qc",
    "lung_fraction",
    "right_lung_px",
    "left_lung_px",
    "right_lung_mm2",
    "left_lung_mm2",
    "mean_confidence",
    *(f"qc_{k}" for k in QC_FEATURES if k != "lung_fraction"),
    "qc_shape_dice",
    "qc_shape_residual",
    "backend",
    "model",
    "mask",
    "dicom_seg",
    "note",
]
REPORT_COLUMNS = [
    "path",
    "status",
    "qc",
    "lung_fraction",
    "right_lung_px",
    "left_lung_px",
    "mean_confidence",
    "qc_shape_dice",
    "qc_shape_distance",
    "qc_lr_balance",
    "qc_uncertain_fraction",
    "width",
    "height",
    "error",
    "dicom_seg",
    "note",
]


@dataclass(frozen=True)
class Item:
    source: Path
    rel: Path  # output path stem relative to the output folder, without suffix
    error: str = ""  # known before reading (a broken link, an unreadable folder): becomes its row
    where: Path | None = None  # the file from any working folder (a Ray worker's is not the driver's)

    @property
    def file(self) -> Path:
        return self.where or self.source


@dataclass
class InferOptions:
    batch_size: int = 8
    workers: int = 2
    overlay: bool = False
    probabilities: bool = False
    resume: bool = False
    strict: bool = False
    postprocess: bool = True
    screen: str = "flag"  # DICOM header says not a frontal chest film: "flag" (QC reasons) or "skip" (no mask)
    dicom_seg: bool = False  # also a DICOM Segmentation per DICOM input (NAME.seg.dcm)
    mask_bits: int = 1  # NAME.mask.png as a 1-bit PNG (same pixels as the 8-bit one, a fifth of the time) or 8-bit
    pool: str = "thread"  # helpers for decoding and writing: "thread" or "process" (past the GIL, `helper_pools`)
    complete_shape: bool = False  # add the lung the shape model says is missing where QC finds the shape implausible


OUTPUT_SUFFIXES = (".mask.png", ".overlay.png", ".prob.png", ".seg.dcm")
MAX_NAME_BYTES = 160  # leaves room for ".overlay.png" and the temp-file affixes under NAME_MAX (255)


def display_path(path) -> str:
    """A path as text that any encoder accepts: undecodable bytes of a file name shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _safe_part(part: str) -> str:
    """One output path component: valid UTF-8, no control characters, not hidden, not too long."""
    text = os.fsencode(part).decode("utf-8", "replace").replace("\ufffd", "_")
    text = "".join("_" if ord(c) < 32 or ord(c) == 127 else c for c in text)
    if text.startswith("."):
        text = "_" + text
    if len(text.encode()) > MAX_NAME_BYTES:
        digest = hashlib.sha1(os.fsencode(part)).hexdigest()[:8]
        text = text.encode()[: MAX_NAME_BYTES - 9].decode("utf-8", "ignore") + "~" + digest
    return text or "_"


def _safe_rel(rel: Path) -> Path:
    """Relative path that cannot climb out of the output folder or hide as a dotfile."""
    parts = [_safe_part(p) for p in rel.parts if p not in ("", ".", "..", "/")]
    return Path(*parts) if parts else Path("_")


def _walk_files(folder: Path):
    """(path, error) for every file under `folder`, following folder links once each (a link loop
    is visited once, never forever); unreadable folders and broken links come with their error."""
    seen: set[str] = set()
    errors: list[tuple[Path, str]] = []
    for root, dirs, files in os.walk(
        folder,
        followlinks=True,
        onerror=lambda e: errors.append((Path(e.filename), f"unreadable folder ({e.strerror})")),
    ):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) not in seen
        )
        for name in sorted(files):
            f = Path(root) / name
            if name.startswith("."):
                continue
            if os.path.islink(f) and not os.path.exists(f):
                yield f, "broken symbolic link (dangling, or a loop)"
            elif is_special_file(f):  # never opened: a FIFO would block the listing forever
                yield f, "not a regular file (a FIFO, socket or device); never read"
            elif is_supported(f):
                yield f, ""
    yield from errors


def _glob_base(spec: str) -> Path:
    """The longest leading folder of a glob without wildcards."""
    parts = Path(spec).parts
    k = next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))
    return Path(*parts[:k]) if k else Path(".")


def _match_parts(parts: tuple[str, ...], pats: tuple[str, ...]) -> bool:
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_match_parts(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and _match_parts(parts[1:], pats[1:])


def _glob_files(spec: str):
    """Files matching a glob; `**` walks folders without ever looping through links."""
    base = _glob_base(spec)
    pats = Path(spec).parts[len(base.parts) :] if base != Path(".") else Path(spec).parts
    if "**" not in pats:
        for f in sorted(glob.glob(spec)):
            if os.path.isfile(f) or os.path.islink(f):
                yield Path(f), ("" if os.path.exists(f) else "broken symbolic link (dangling, or a loop)")
        return
    if not base.is_dir():
        return
    for f, err in _walk_files(base):
        rel = f.relative_to(base).parts if not err.startswith("unreadable") else ()
        if err.startswith("unreadable") or _match_parts(rel, tuple(pats)):
            yield f, err


def _is_own_output(f: Path, out_dir: Path | None) -> bool:
    if out_dir is None or not f.name.endswith(OUTPUT_SUFFIXES):
        return False
    root = os.path.abspath(out_dir)
    return os.path.abspath(f).startswith(root + os.sep)


def collect_inputs(inputs: list[str], out_dir: str | Path | None = None) -> list[Item]:
    """Files, folders (recursive) and globs, in a stable order, each with a unique output stem:
    the input's path relative to the common folder of all inputs (siteA/images/x and
    siteB/images/x stay apart). lungrt's own outputs inside `out_dir` are never inputs."""
    found: dict[str, tuple[Path, Path, str]] = {}  # real path -> (source, anchor folder, error)

    def add(f: Path, anchor: Path, error: str) -> None:
        if not _is_own_output(f, Path(out_dir) if out_dir is not None else None):
            found.setdefault(os.path.realpath(f) if not error else os.path.abspath(f), (f, anchor, error))

    for spec in inputs:
        if not spec:
            raise LungrtError("an input is an empty string; give files, folders or globs")
        p = Path(spec)
        if p.is_dir():
            anchor = Path(os.path.abspath(p)).parent
            for f, err in _walk_files(p):
                add(f, anchor, err)
        elif os.path.lexists(p):  # a file, or a link that leads nowhere (its row says so)
            add(p, Path(os.path.abspath(p)).parent, "" if p.exists() else "broken symbolic link (dangling, or a loop)")
        elif glob.has_magic(spec):
            anchor = Path(os.path.abspath(_glob_base(spec)))
            for f, err in _glob_files(spec):
                add(f, anchor, err)
        else:
            raise LungrtError(f"{display_path(spec)}: no such file, folder or glob match")
    if not found:
        return []
    root = Path(os.path.commonpath([str(a) for _, a, _ in found.values()]))
    items, taken = [], set()
    for source, _, error in found.values():
        rel = _safe_rel(Path(os.path.abspath(source)).relative_to(root))
        if _image_suffix(source) and not error.startswith("unreadable"):  # CR.1.2.840.99.5457.1 keeps its UID whole
            rel = rel.with_name(rel.name.removesuffix(source.suffix))
        if rel in taken:  # a.png beside a.dcm, or names made equal by sanitising
            alt = rel.with_name(f"{rel.name}_{source.suffix.lstrip('.')}") if _image_suffix(source) else rel
            if alt in taken or alt == rel:
                alt = rel.with_name(f"{rel.name}_{hashlib.sha1(os.fsencode(source)).hexdigest()[:8]}")
            rel = alt
        taken.add(rel)
        items.append(Item(source, rel, error))
    return sorted(items, key=lambda it: str(it.rel))


def gather_inputs(inputs: list[str], out_dir: str | Path) -> tuple[list[Item], list]:
    """(items, PACS inputs) of a run's inputs: DICOMweb URLs fetched into the output folder
    (`dicomweb.fetch_inputs`), local files, folders and globs as they are (`collect_with_pacs`)."""
    from lungrt.inference.dicomweb import fetch_inputs, is_dicomweb_url

    urls = [i for i in inputs if is_dicomweb_url(i)]
    pacs_inputs = fetch_inputs(urls, prepare_out_dir(Path(out_dir))) if urls else []
    return collect_with_pacs([i for i in inputs if i not in urls], pacs_inputs, out_dir), pacs_inputs


def collect_with_pacs(local: list[str], pacs_inputs: list, out_dir: str | Path) -> list[Item]:
    """Local inputs as `collect_inputs` names them, and each PACS input's fetched instances under
    `pacs_HOST_PORT/STUDY/SERIES/SOP` (`dicomweb.PacsInput`): the two never share an output folder."""
    items = collect_inputs(local, out_dir) if local else []
    taken = {it.rel.parts[0] for it in items if it.rel.parts}
    for pacs in pacs_inputs:
        if pacs.label in taken:
            raise LungrtError(
                f"a local input's outputs would share {pacs.label}/ with {pacs.url}'s; rename it or "
                "run the PACS input with an --out of its own"
            )
        items += [
            Item(it.source, Path(pacs.label) / pacs.study / it.rel.relative_to(it.rel.parts[0]), it.error)
            for it in collect_inputs([str(pacs.folder)], out_dir)
        ]
    return sorted(items, key=lambda it: str(it.rel))


def _image_suffix(path: Path) -> str:
    """The file's suffix when it names an image format ('' for none, and for the dots inside a UID)."""
    suffix = path.suffix.lower()
    return suffix if suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES else ""


def outputs_for(out_dir: Path, item: Item, opts: InferOptions, seg: bool = False) -> dict[str, Path]:
    """The files one input gets; `seg`: its DICOM Segmentation too (a DICOM input, --dicom-seg)."""
    base = out_dir / item.rel
    paths = {"mask": base.with_name(base.name + ".mask.png")}
    if seg:
        paths["seg"] = base.with_name(base.name + ".seg.dcm")
    if opts.overlay:
        paths["overlay"] = base.with_name(base.name + ".overlay.png")
    if opts.probabilities:
        paths["probability"] = base.with_name(base.name + ".prob.png")
    if not _inside(str(out_dir), str(base.parent)):  # defence in depth: never write outside the output folder
        raise LungrtError(f"{display_path(item.source)}: output {display_path(paths['mask'])} would escape {out_dir}")
    return paths


@functools.lru_cache(maxsize=4096)
def _inside(out_dir: str, folder: str) -> bool:
    """Whether `folder` lies in `out_dir` once symlinks are resolved (cached per folder: this is on
    the hot path, and outputs are written by rename, which replaces a symlink rather than following it)."""
    root, real = os.path.realpath(out_dir), os.path.realpath(folder)
    return real == root or real.startswith(root + os.sep)


def is_done(out_dir: Path, item: Item, opts: InferOptions, records: dict[str, dict]) -> bool:
    """Done = an ok record whose outputs all exist with the sizes it recorded (a file cut short by
    a power loss, since per-image files are not fsynced, is redone)."""
    row = records.get(str(item.rel))
    if row is None or row.get("status") not in ("ok", "skipped"):
        return False
    if row.get("source_stat") != source_stat(item.file):  # replaced by another image since
        return False
    if row["status"] == "skipped":  # screened out by its header: it has no outputs
        return True
    if opts.dicom_seg and row.get("dicom") and not row.get("dicom_seg"):  # done before without its SEG
        return False
    sizes = row.get("sizes", {})
    for kind, p in outputs_for(out_dir, item, opts, seg=opts.dicom_seg and "seg" in sizes).items():
        try:
            if p.stat().st_size != sizes.get(kind, -1):
                return False
        except OSError:
            return False
    return True


def source_stat(path: Path) -> list[int] | None:
    """Size and modification time of an input: an input replaced under the same name is redone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def run_identity(runner: Runner, opts: InferOptions) -> dict:
    """What makes two runs' masks comparable; `--resume` refuses to mix runs that differ in it."""
    return {
        "model": runner.info.name,
        "weights": runner.weights_id,
        "precision": runner.precision,
        "postprocess": opts.postprocess,
        "preprocess": runner.spec.to_dict(),
        "runner": runner.describe(),
        "artifact": runner.content_hash or runner.weights_id,
        **({"complete_shape": True} if opts.complete_shape else {}),
    }  # absent when off: older runs still resume


def todo_items(out_dir: Path, items: list[Item], opts: InferOptions, identity: dict | None = None) -> list[Item]:
    """What a run has to do: with --resume, what is not done yet (after checking that the earlier
    run used the same model and options); otherwise all, from a clean journal."""
    if not opts.resume:
        start_fresh(out_dir)
        if identity is not None:
            write_identity(out_dir, identity)
        return list(items)
    if identity is not None:
        check_identity(out_dir, identity)
    records = read_records(out_dir)
    return [it for it in items if not is_done(out_dir, it, opts, records)]


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


def _write_record(out_dir: Path, item: Item, row: dict) -> dict:
    return journal_for(out_dir).append({"rel": str(item.rel), **row})


def screened_out(xray, opts: InferOptions) -> list[str]:
    """The header-screening reasons that make `--screen skip` leave this input without a mask."""
    return screen(getattr(xray, "header", None)) if opts.screen == "skip" else []


class NotImage(str):
    """`_load`'s reason for an input that holds no radiograph (a SEG, SR, presentation state): skipped, not failed."""


def _skipped_row(item: Item, xray, reasons: list[str], runner: Runner, note: str = "") -> dict:
    h, w = xray.shape if xray is not None else ("", "")
    return {
        "path": display_path(item.source),
        "width": w,
        "height": h,
        "status": "skipped",
        "error": "",
        "qc": ";".join(reasons),
        "note": note,
        "backend": runner.describe(),
        "model": runner.info.name,
        "sizes": {},
        "source_stat": source_stat(item.file),
    }


def _error_row(item: Item, reason: str, runner: Runner) -> dict:
    return {
        "path": display_path(item.source),
        "status": "error",
        "error": one_line(reason),
        "backend": runner.describe(),
        "model": runner.info.name,
    }


def finish_batch(
    out_dir: Path, entries: list, probs: np.ndarray, runner: Runner | RunnerFacts, opts: InferOptions
) -> list[dict]:
    """`finish_or_error_row` for one batch's (item, xray) entries and their probabilities; their QC
    numbers computed together first (the shape fits of a batch cost about what one did)."""
    qc = qc_thresholds_of(runner.info.qc)
    feats = qc_features_many(probs, qc.shape, [xr.shape for _, xr in entries])
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
) -> dict:
    """`finish_one`, with a failure that belongs to this input alone (its name, a permission) made
    its error row. A full or read-only disk is everyone's failure: it propagates and stops the run."""
    try:
        return finish_one(out_dir, item, xray, prob_small, runner, opts, feats)
    except OSError as e:
        if e.errno in FATAL_ERRNOS:
            raise
        return _write_record(out_dir, item, _error_row(item, f"could not write its outputs ({e.strerror})", runner))
    except Exception as e:  # measuring or encoding one input failed: its row says why, the run goes on
        return _write_record(out_dir, item, _error_row(item, f"{type(e).__name__}: {e}", runner))


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
) -> Measured:
    """Network-size probabilities of one X-ray -> its mask, lung areas and QC at the original size:
    the one function infer, the Python API and Ray all use. With `complete_shape`, a mask QC calls
    an implausible shape gets the lung its shape fit says is missing (`shape.complete`). `feats`:
    its QC numbers when already computed with its batch's (`qc.features_many`)."""
    qc = qc or QCThresholds.from_dict(None)
    feats = dict(feats) if feats is not None else qc_features(prob_small, qc.shape, xray.shape)
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


def finish_one(
    out_dir: Path,
    item: Item,
    xray,
    prob_small: np.ndarray,
    runner: Runner,
    opts: InferOptions,
    feats: dict | None = None,
) -> dict:
    """Native-size mask, measurements and files for one image; the record is written last."""
    qc = qc_thresholds_of(runner.info.qc)
    m = measure(xray, prob_small, runner.spec, opts.postprocess, qc, opts.complete_shape, feats)
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
    return _write_record(out_dir, item, row)


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


def _load(item: Item, spec, keep_pixels: bool = True):
    """(item, X-ray, network input, error). Without `keep_pixels` (no overlay to draw) a native
    detector DICOM is reduced to the network's size while it is read (`read_xray`'s `reduce_for`)."""
    if item.error:
        return item, None, None, item.error
    try:
        xr = read_xray(item.source, reduce_for=None if keep_pixels else spec)
        return item, xr, spec.apply_xray(xr), None
    except NotARadiograph as e:
        return item, None, None, NotImage(e.reason)
    except ImageReadError as e:
        return item, None, None, e.reason
    except Exception as e:  # one bad file must never stop the run
        return item, None, None, f"{type(e).__name__}: {e}"


def write_results_csv(out_dir: Path, items: list[Item]) -> Path:
    sync_filesystem(
        out_dir
    )  # per-image files and journal lines were not fsynced one by one; they reach the disk before the CSV
    records = read_records(out_dir)
    path = out_dir / "results.csv"
    with atomic_text_file(path) as f:  # row by row: a million inputs never sit in memory at once
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for it in items:
            r = records.get(str(it.rel))
            if r is not None:
                w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    return path


def remove_partial_writes(out_dir: Path) -> None:
    """Temp files of lungrt's own atomic writes that a killed run never renamed. Only names that
    only lungrt makes (`*.lungrt-tmp`), never a user's file; links to other folders are not followed."""
    for root, _, files in os.walk(out_dir, followlinks=False):
        for name in files:
            if name.endswith(TEMP_SUFFIX):
                Path(root, name).unlink(missing_ok=True)


def prepare_out_dir(out_dir: Path) -> Path:
    """The output folder, made if needed; one line when it cannot be one."""
    if str(out_dir) == "":
        raise LungrtError("--out is empty; name the output folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise LungrtError(f"{out_dir}: --out exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LungrtError(f"{out_dir}: cannot create the output folder ({e.strerror})") from None
    return out_dir


def effective_batch(opts: InferOptions, items: list[Item], runner: Runner) -> int:
    """No larger than the run (padding 1 image to 256 costs 256 images' compute and memory) nor
    than the engine's profile. Depends on the whole input list, not on what is left, so a resumed
    run computes every image in the same batch shape as an uninterrupted one."""
    limit = getattr(runner, "batch_range", (1, opts.batch_size))[1]
    return max(1, min(opts.batch_size, len(items), limit))


def _stopped_by_disk(out_dir: Path, items: list[Item], error: OSError, done: int) -> LungrtError:
    """The one line a full or read-only disk gets; results.csv of what is done, if it still fits."""
    try:
        write_results_csv(out_dir, items)
        kept = "results.csv lists them"
    except OSError:
        kept = "their journal lines are kept"
    where = f" writing {display_path(error.filename)}" if error.filename else ""
    return LungrtError(
        f"{out_dir}: {error.strerror or error}{where}; stopped after {done} more images ({kept}); "
        "free space and rerun with --resume to finish"
    )


def _take_idle_cpu_only() -> None:
    """Run the calling (decode/write) thread only on CPU time nothing else wants (Linux SCHED_IDLE).
    Preempting one of the model's threads stalls the others at its next synchronisation point (a
    parallel op is as slow as its slowest thread); at idle priority pre- and post-processing fill
    the model's gaps, and when the model runs out of input it blocks and they get every core.
    On 2 cores with ONNX Runtime, five paired runs gave +4 to +12 points of the bare model's img/s."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0 = the calling thread
    except (AttributeError, OSError):  # not Linux / not permitted: only a speed matter
        pass


HELPER_POOLS = ("thread", "process")


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


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the process that started it dies, however it dies (the OOM
    killer's SIGKILL runs no clean-up): no helper outlives its run holding memory or the output's journal."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a speed of clean-up matter only
        pass


def _start_helper_process(idle: bool) -> None:
    die_with_parent()
    cv2.setNumThreads(1)  # the pool is the parallelism; OpenCV's own threads would only compete with it
    if idle:
        _take_idle_cpu_only()


def _load_without_pixels(item: Item, spec, keep_pixels: bool):
    """`_load` in a helper process: the network input and the X-ray's facts travel back, not its
    megapixels (unless an overlay needs them)."""
    item, xr, tensor, err = _load(item, spec, keep_pixels)
    return item, xr if keep_pixels or xr is None else xr.facts(), tensor, err


@contextmanager
def helper_pools(runner: Runner, opts: InferOptions):
    """(submit one image's read, submit one batch's writes: `finish_batch`) for infer's helpers.
    Threads by default: decoding, resizing,
    PNG and zlib release the GIL for most of their time. With `pool="process"` one pool of
    `workers` processes does both (spawned: nothing of the runner is forked), for machines where
    the GIL-held share of that work (~14 % here, benchmarks/helper_scaling.py) caps threads."""
    idle = runner.sleeps_when_idle  # a spinning runner (PyTorch's OpenMP) would starve idle helpers
    if opts.pool == "process":
        facts = RunnerFacts.of(runner)
        with ProcessPoolExecutor(
            opts.workers, multiprocessing.get_context("spawn"), _start_helper_process, (idle,)
        ) as pool:
            try:
                yield (
                    lambda item: pool.submit(_load_without_pixels, item, runner.spec, opts.overlay),
                    lambda out_dir, entries, probs: pool.submit(finish_batch, out_dir, entries, probs, facts, opts),
                )
            except BrokenProcessPool:
                raise LungrtError(
                    "a helper process died (out of memory?); what is done is kept: rerun with --resume, "
                    "with fewer --workers or --pool thread"
                ) from None
        return
    helper_init = _take_idle_cpu_only if idle else None
    opencv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # for this run only: the helpers are the parallelism (OpenCV's pool cost 2x the core-ms)
    try:
        with (
            ThreadPoolExecutor(opts.workers, "read", helper_init) as readers,
            ThreadPoolExecutor(max(1, opts.workers), "write", helper_init) as writers,
        ):
            yield (
                lambda item: readers.submit(_load, item, runner.spec, opts.overlay),
                lambda out_dir, entries, probs: writers.submit(finish_batch, out_dir, entries, probs, runner, opts),
            )
    finally:
        cv2.setNumThreads(opencv_threads)


def run_infer(runner: Runner, items: list[Item], out_dir: str | Path, opts: InferOptions) -> dict:
    out_dir = prepare_out_dir(Path(out_dir))
    with lock_out_dir(out_dir):
        return _run_infer_locked(runner, items, out_dir, opts)


def _run_infer_locked(runner: Runner, items: list[Item], out_dir: Path, opts: InferOptions) -> dict:
    remove_partial_writes(out_dir)
    todo = todo_items(out_dir, items, opts, run_identity(runner, opts))
    skipped = len(items) - len(todo)
    batch_size = effective_batch(opts, items, runner)
    ok = failed = flagged = screened = not_images = 0
    stopped = False
    window = max(batch_size * 3, opts.workers * 2)
    fatal: list[OSError] = []
    t0 = time.perf_counter()
    with helper_pools(runner, opts) as (submit_read, submit_write), progress_bar() as bar:
        task = bar.add_task(f"infer {runner.describe()}", total=len(todo))
        pending: deque[Future] = deque()
        writes: deque[Future] = deque()
        it_todo = iter(todo)
        batch: list = []

        def fill():
            for item in it_todo:
                pending.append(submit_read(item))
                if len(pending) >= window:
                    return

        def settle(future: Future) -> None:
            nonlocal ok, failed, flagged
            try:
                rows = future.result()
            except OSError as e:  # disk full / read-only: keep what is done, stop cleanly
                fatal.append(e)
                return
            for row in rows:
                ok += row["status"] == "ok"
                failed += row["status"] != "ok"
                flagged += row["status"] == "ok" and row.get("qc", "ok") != "ok"
                bar.advance(task)

        def flush(batch):
            x = np.stack([b[2] for b in batch])
            if len(x) < batch_size:  # pad: every image is computed in a batch of one shape
                x = np.concatenate([x, np.repeat(x[-1:], batch_size - len(x), 0)])
            probs = runner.run(x)[: len(batch), 0]
            writes.append(submit_write(out_dir, [(item, xr) for item, xr, _, _ in batch], probs))
            while len(writes) * batch_size > window:
                settle(writes.popleft())

        fill()
        while pending and not fatal:
            item, xr, tensor, err = pending.popleft().result()
            fill()
            if isinstance(err, NotImage):
                try:
                    _write_record(out_dir, item, _skipped_row(item, None, ["not_a_radiograph"], runner, err))
                except OSError as e:
                    fatal.append(e)
                    break
                not_images += 1
                bar.advance(task)
                continue
            if err is not None:
                try:
                    _write_record(out_dir, item, _error_row(item, err, runner))
                except OSError as e:
                    fatal.append(e)
                    break
                failed += 1
                bar.advance(task)
                if opts.strict:
                    stopped = True
                    break
                continue
            if reasons := screened_out(xr, opts):
                try:
                    _write_record(out_dir, item, _skipped_row(item, xr, reasons, runner))
                except OSError as e:
                    fatal.append(e)
                    break
                screened += 1
                bar.advance(task)
                continue
            batch.append((item, xr, tensor, None))
            if len(batch) == batch_size:
                flush(batch)
                batch = []
        if batch and not stopped and not fatal:
            flush(batch)
        for f in pending:
            f.cancel()
        while writes:
            settle(writes.popleft())
    if fatal:
        raise _stopped_by_disk(out_dir, items, fatal[0], ok)
    csv_path = write_results_csv(out_dir, items)
    elapsed = time.perf_counter() - t0
    summary = {
        "inputs": len(items),
        "skipped_done": skipped,
        "batch_size": batch_size,
        "ok": ok,
        "failed": failed,
        "qc_flagged": flagged,
        "screened_out": screened,
        "not_radiographs": not_images,
        "stopped_early": stopped,
        "seconds": elapsed,
        "images_per_second": (ok + failed) / elapsed if elapsed > 0 else 0.0,
        "results_csv": str(csv_path),
        "backend": runner.describe(),
        "model": runner.info.name,
        "convention": runner.spec.convention,
        "artifact": runner.content_hash or runner.weights_id,
    }
    return write_summary(out_dir, summary)
