"""Batch inference over folders of X-rays: masks at original resolution, measurements, resumable.

Decoding/preprocessing runs in a thread pool ahead of the model (bounded window, in input order),
the model runs full batches (partial batches are padded so every image sees the same batch shape,
which keeps results identical between a resumed and an uninterrupted run), and writing runs in a
second pool. Every output is written atomically; a per-input record is written last, so an input
counts as done only when all its files are complete. results.csv is assembled from those records.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import ImageReadError, LungrtError
from .io import atomic_write_bytes, is_supported, read_xray
from .plots import overlay
from .postprocess import keep_two_largest_and_fill, lung_areas
from .progress import progress_bar
from .runners import Runner

EXIT_OK, EXIT_USAGE, EXIT_SOME_FAILED = 0, 2, 3
RECORDS = ".lungrt-records"
CSV_FIELDS = ["path", "width", "height", "status", "error", "lung_fraction", "right_lung_px", "left_lung_px",
              "right_lung_mm2", "left_lung_mm2", "mean_confidence", "backend", "model", "mask"]


@dataclass(frozen=True)
class Item:
    source: Path
    rel: Path  # output path stem relative to the output folder, without suffix


@dataclass
class InferOptions:
    batch_size: int = 8
    workers: int = 2
    overlay: bool = False
    probabilities: bool = False
    resume: bool = False
    strict: bool = False
    postprocess: bool = True


def _safe_rel(rel: Path) -> Path:
    """Relative path that cannot climb out of the output folder or hide as a dotfile."""
    parts = [p for p in rel.parts if p not in ("", ".", "..", "/")]
    parts = [("_" + p) if p.startswith(".") else p for p in parts]
    return Path(*parts) if parts else Path("_")


def collect_inputs(inputs: list[str]) -> list[Item]:
    """Files, folders (recursive) and globs, in a stable order, each with its mirrored output stem."""
    items: dict[Path, Item] = {}
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            for f in sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")):
                if is_supported(f):
                    items.setdefault(f.resolve(), Item(f, _safe_rel(Path(p.resolve().name) / f.relative_to(p).with_suffix(""))))
        elif p.is_file() or p.is_symlink() or p.exists():
            items.setdefault(p.resolve(), Item(p, _safe_rel(Path(p.stem))))
        elif glob.has_magic(spec):
            base = Path(spec.split("*")[0].split("?")[0].split("[")[0])
            base = base if base.is_dir() else base.parent
            for f in sorted(Path(x) for x in glob.glob(spec, recursive=True)):
                if f.is_file():
                    items.setdefault(f.resolve(), Item(f, _safe_rel(f.relative_to(base).with_suffix(""))))
        else:
            raise LungrtError(f"{spec}: no such file, folder or glob match")
    # two inputs mapping to one stem (a.png and a.dcm) get distinct outputs
    seen: dict[Path, int] = {}
    out = []
    for it in items.values():
        rel = it.rel
        if rel in seen:
            seen[rel] += 1
            rel = rel.with_name(f"{rel.name}_{it.source.suffix.lstrip('.') or seen[rel]}")
        seen[rel] = seen.get(rel, 0)
        out.append(Item(it.source, rel))
    return out


def outputs_for(out_dir: Path, item: Item, opts: InferOptions) -> dict[str, Path]:
    base = out_dir / item.rel
    paths = {"mask": base.with_name(base.name + ".mask.png")}
    if opts.overlay:
        paths["overlay"] = base.with_name(base.name + ".overlay.png")
    if opts.probabilities:
        paths["probability"] = base.with_name(base.name + ".prob.png")
    for p in paths.values():  # defence in depth: never write outside the output folder
        if not str(p.resolve()).startswith(str(out_dir.resolve()) + os.sep):
            raise LungrtError(f"{item.source}: output {p} would escape {out_dir}")
    return paths


def record_path(out_dir: Path, item: Item) -> Path:
    return out_dir / RECORDS / (hashlib.sha1(str(item.rel).encode()).hexdigest() + ".json")


def is_done(out_dir: Path, item: Item, opts: InferOptions) -> bool:
    rec = record_path(out_dir, item)
    if not rec.exists():
        return False
    try:
        row = json.loads(rec.read_text())
    except (OSError, ValueError):
        return False
    if row.get("status") != "ok":
        return False
    return all(p.exists() for p in outputs_for(out_dir, item, opts).values())


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise LungrtError("PNG encoding failed")
    return buf.tobytes()


def _write_record(out_dir: Path, item: Item, row: dict) -> dict:
    atomic_write_bytes(record_path(out_dir, item), json.dumps(row).encode())
    return row


def _error_row(item: Item, reason: str, runner: Runner) -> dict:
    return {"path": str(item.source), "status": "error", "error": reason, "backend": runner.describe(), "model": runner.info.name}


def finish_one(out_dir: Path, item: Item, xray, prob_small: np.ndarray, runner: Runner, opts: InferOptions) -> dict:
    """Native-size mask, measurements and files for one image; the record is written last."""
    prob = runner.spec.invert(prob_small, xray.shape)
    mask = prob > 0.5
    if opts.postprocess:
        mask = keep_two_largest_and_fill(mask)
    paths = outputs_for(out_dir, item, opts)
    atomic_write_bytes(paths["mask"], _png(mask.astype(np.uint8) * 255))
    if opts.overlay:
        atomic_write_bytes(paths["overlay"], _png(cv2.cvtColor(overlay(xray.pixels, mask), cv2.COLOR_RGB2BGR)))
    if opts.probabilities:
        atomic_write_bytes(paths["probability"], _png(np.clip(np.rint(prob * 255), 0, 255).astype(np.uint8)))
    right, left = lung_areas(mask)
    h, w = xray.shape
    px_mm2 = xray.spacing_mm[0] * xray.spacing_mm[1] if xray.spacing_mm else None
    row = {
        "path": str(item.source), "width": w, "height": h, "status": "ok", "error": "",
        "lung_fraction": round(float(mask.mean()), 6), "right_lung_px": right, "left_lung_px": left,
        "right_lung_mm2": round(right * px_mm2, 2) if px_mm2 else "", "left_lung_mm2": round(left * px_mm2, 2) if px_mm2 else "",
        "mean_confidence": round(float(prob[mask].mean()), 6) if mask.any() else 0.0,
        "backend": runner.describe(), "model": runner.info.name, "mask": str(paths["mask"].relative_to(out_dir)),
    }
    return _write_record(out_dir, item, row)


def _load(item: Item, spec):
    try:
        xr = read_xray(item.source)
        return item, xr, spec.apply(xr.pixels), None
    except ImageReadError as e:
        return item, None, None, e.reason
    except Exception as e:  # one bad file must never stop the run
        return item, None, None, f"{type(e).__name__}: {e}"


def write_results_csv(out_dir: Path, items: list[Item]) -> Path:
    rows = []
    for it in items:
        rec = record_path(out_dir, it)
        if rec.exists():
            rows.append(json.loads(rec.read_text()))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    path = out_dir / "results.csv"
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


def remove_partial_writes(out_dir: Path) -> None:
    """Temp files of atomic writes that a killed run never renamed (never a finished output)."""
    for p in out_dir.rglob(".*.tmp"):
        p.unlink(missing_ok=True)


def run_infer(runner: Runner, items: list[Item], out_dir: str | Path, opts: InferOptions) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_writes(out_dir)
    todo = [it for it in items if not (opts.resume and is_done(out_dir, it, opts))]
    skipped = len(items) - len(todo)
    if not opts.resume:
        for it in items:  # a fresh run must not report an older run's rows
            record_path(out_dir, it).unlink(missing_ok=True)
    ok = failed = 0
    stopped = False
    window = max(opts.batch_size * 3, opts.workers * 2)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(opts.workers, thread_name_prefix="read") as readers, \
            ThreadPoolExecutor(max(1, opts.workers), thread_name_prefix="write") as writers, progress_bar() as bar:
        task = bar.add_task(f"infer {runner.describe()}", total=len(todo))
        pending: deque[Future] = deque()
        writes: deque[Future] = deque()
        it_todo = iter(todo)
        batch: list = []

        def fill():
            for item in it_todo:
                pending.append(readers.submit(_load, item, runner.spec))
                if len(pending) >= window:
                    return

        def flush(batch):
            nonlocal ok
            x = np.stack([b[2] for b in batch])
            if len(x) < opts.batch_size:  # pad: every image is computed in a batch of one shape
                x = np.concatenate([x, np.repeat(x[-1:], opts.batch_size - len(x), 0)])
            probs = runner.run(x)
            for (item, xr, _, _), p in zip(batch, probs):
                writes.append(writers.submit(finish_one, out_dir, item, xr, p[0], runner, opts))
            while len(writes) > window:
                writes.popleft().result()
                ok += 1
                bar.advance(task)

        fill()
        while pending:
            item, xr, tensor, err = pending.popleft().result()
            fill()
            if err is not None:
                _write_record(out_dir, item, _error_row(item, err, runner))
                failed += 1
                bar.advance(task)
                if opts.strict:
                    stopped = True
                    break
                continue
            batch.append((item, xr, tensor, None))
            if len(batch) == opts.batch_size:
                flush(batch)
                batch = []
        if batch and not stopped:
            flush(batch)
        for f in pending:
            f.cancel()
        while writes:
            writes.popleft().result()
            ok += 1
            bar.advance(task)
    elapsed = time.perf_counter() - t0
    csv_path = write_results_csv(out_dir, items)
    return {"inputs": len(items), "skipped_done": skipped, "ok": ok, "failed": failed, "stopped_early": stopped,
            "seconds": elapsed, "images_per_second": (ok + failed) / elapsed if elapsed > 0 else 0.0,
            "results_csv": str(csv_path), "backend": runner.describe(), "model": runner.info.name}
