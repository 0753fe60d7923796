"""A run's outputs and its resume rules: which files an input gets, when it counts as done, its journal
record (written last), results.csv assembled from the records, and clean-up after a killed run."""

from __future__ import annotations

import csv
import functools
import os
from pathlib import Path

from lungrt.backends.base import Runner
from lungrt.core.errors import LungrtError, one_line
from lungrt.data.io import TEMP_SUFFIX, atomic_text_file, sync_filesystem
from lungrt.inference.inputs import Item, display_path
from lungrt.inference.journal import check_identity, journal_for, read_records, start_fresh, write_identity
from lungrt.inference.options import InferOptions
from lungrt.inference.qc import FEATURES as QC_FEATURES


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
        **({"second_opinion": runner.reference.weights_id} if getattr(runner, "reference", None) else {}),
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


def write_record(out_dir: Path, item: Item, row: dict) -> dict:
    return journal_for(out_dir).append({"rel": str(item.rel), **row})


def skipped_row(item: Item, xray, reasons: list[str], runner: Runner, note: str = "") -> dict:
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


def error_row(item: Item, reason: str, runner: Runner) -> dict:
    return {
        "path": display_path(item.source),
        "status": "error",
        "error": one_line(reason),
        "backend": runner.describe(),
        "model": runner.info.name,
    }


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


def stopped_by_disk(out_dir: Path, items: list[Item], error: OSError, done: int) -> LungrtError:
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
