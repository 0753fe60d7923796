"""`lungrt infer`'s run: the batched stream (`stream.segment`) with a journal, writers and a summary.

Decoding and preprocessing run in helpers ahead of the model (bounded window, in input order), the model
runs batches of one shape (`stream.run_batch`), and writing runs in a second pool. Every output is written
atomically; a per-input record (journal.py) is written last, so an input counts as done only when all its
files are complete. results.csv is assembled from those records. Inputs: inputs.py; outputs and resume:
outputs.py; one image's measurements and files: measure.py.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import cv2

from lungrt.backends.base import Runner
from lungrt.core.errors import LungrtError
from lungrt.core.progress import progress_bar
from lungrt.inference.inputs import (  # noqa: F401  (re-exported: infer's public names)
    Item,
    collect_inputs,
    collect_with_pacs,
    display_path,
    gather_inputs,
    prepare_out_dir,
)
from lungrt.inference.journal import lock_out_dir, write_summary
from lungrt.inference.measure import Measured, RunnerFacts, finish_batch, finish_one, measure  # noqa: F401
from lungrt.inference.options import (  # noqa: F401
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    HELPER_POOLS,
    InferOptions,
)
from lungrt.inference.outputs import (  # noqa: F401
    CSV_FIELDS,
    REPORT_COLUMNS,
    error_row,
    is_done,
    remove_partial_writes,
    run_identity,
    skipped_row,
    stopped_by_disk,
    todo_items,
    write_record,
    write_results_csv,
)
from lungrt.inference.stream import POLL_SECONDS, Frame, batch_shape, load, read_window, segment, stacked


def effective_batch(opts: InferOptions, items: list[Item], runner: Runner) -> int:
    """`stream.batch_shape` of the whole input list (not of what is left: a resumed run computes every
    image in the same batch shape as an uninterrupted one)."""
    return batch_shape(opts.batch_size, None if opts.pad_batch else len(items), runner)


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


def _start_helper_process(idle: bool, parent: int) -> None:
    die_with_parent()
    if os.getppid() != parent:  # the run died while this helper was still starting: the signal came too late
        os._exit(1)  # (an orphan would wait forever on a queue its sibling keeps open)
    cv2.setNumThreads(1)  # the pool is the parallelism; OpenCV's own threads would only compete with it
    if idle:
        _take_idle_cpu_only()


def _load_without_pixels(item: Item, spec, keep_pixels: bool, screen: str) -> Frame:
    """`load` in a helper process: the network input and the X-ray's facts travel back, not its
    megapixels (unless an overlay needs them)."""
    frame = load(item, spec, keep_pixels, screen)
    if not keep_pixels and frame.xray is not None:
        frame.xray = frame.xray.facts()
    return frame


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
            opts.workers, multiprocessing.get_context("spawn"), _start_helper_process, (idle, os.getpid())
        ) as pool:
            try:
                yield (
                    lambda item: pool.submit(_load_without_pixels, item, runner.spec, opts.overlay, opts.screen),
                    lambda out_dir, entries, probs, refs: pool.submit(
                        finish_batch, out_dir, entries, probs, facts, opts, refs
                    ),
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
                lambda item: readers.submit(load, item, runner.spec, opts.overlay, opts.screen),
                lambda out_dir, entries, probs, refs: writers.submit(
                    finish_batch, out_dir, entries, probs, runner, opts, refs
                ),
            )
    finally:
        cv2.setNumThreads(opencv_threads)


def run_infer(runner: Runner, items: list[Item], out_dir: str | Path, opts: InferOptions) -> dict:
    """Segment `items` into `out_dir` (locked for the run); the run's summary (also OUT/summary.json)."""
    out_dir = prepare_out_dir(Path(out_dir))
    with lock_out_dir(out_dir):
        return InferRun(runner, items, out_dir, opts).execute()


class InferRun:
    """One run's state: what is left to do, the counts, the writes in flight and a disk that stopped it."""

    def __init__(self, runner: Runner, items: list[Item], out_dir: Path, opts: InferOptions):
        self.runner, self.items, self.out_dir, self.opts = runner, items, out_dir, opts
        self.batch_size = effective_batch(opts, items, runner)
        self.window = read_window(self.batch_size, opts.workers)
        self.counts = dict.fromkeys(("ok", "failed", "qc_flagged", "screened_out", "not_radiographs"), 0)
        self.stopped = False
        self.fatal: OSError | None = None
        self.writes: deque[Future] = deque()

    def execute(self) -> dict:
        remove_partial_writes(self.out_dir)
        todo = todo_items(self.out_dir, self.items, self.opts, run_identity(self.runner, self.opts))
        t0 = time.perf_counter()
        with progress_bar() as bar:
            task = bar.add_task(f"infer {self.runner.describe()}", total=len(todo))
            self.consume(todo, lambda: bar.advance(task))
        if self.fatal is not None:
            raise stopped_by_disk(self.out_dir, self.items, self.fatal, self.counts["ok"])
        return self._summary(todo, write_results_csv(self.out_dir, self.items), time.perf_counter() - t0)

    def consume(
        self, todo: Iterable[Item | None], advance=lambda: None, wait_for_input=lambda: time.sleep(POLL_SECONDS)
    ) -> None:
        """Segment `todo` into the output folder: a list, or a live source (`stream.segment`: the DICOM node's
        films as their studies complete). Stops early at a full disk (`self.fatal`) or, strict, the first error."""
        self.advance = advance
        with helper_pools(self.runner, self.opts) as (submit_read, submit_write):
            stream = segment(
                self.runner, todo, self.batch_size, submit_read, self.window, self.opts.strict, wait_for_input
            )
            for chunk in stream:
                self._record(chunk, submit_write)
                if self.fatal is not None or self.stopped:
                    break
            while self.writes:
                self._settle(self.writes.popleft())

    def _record(self, chunk: list[Frame], submit_write) -> None:
        """Rows of the chunk's failed and skipped inputs now; its segmented ones to the writers."""
        try:
            for f in chunk:
                if f.status == "error":
                    write_record(self.out_dir, f.item, error_row(f.item, f.error, self.runner))
                    self.counts["failed"] += 1
                    self.stopped |= self.opts.strict
                elif f.status == "skipped":
                    row = skipped_row(f.item, f.xray, list(f.skipped), self.runner, f.note)
                    write_record(self.out_dir, f.item, row)
                    self.counts["not_radiographs" if "not_a_radiograph" in f.skipped else "screened_out"] += 1
                else:
                    continue
                self.advance()
        except OSError as e:  # disk full / read-only: keep what is done, stop cleanly
            self.fatal = e
            return
        good = [f for f in chunk if f.status == "ok"]
        if good:
            probs, refs = stacked(good)
            self.writes.append(submit_write(self.out_dir, [(f.item, f.xray) for f in good], probs, refs))
        while self.writes and (self.writes[0].done() or len(self.writes) * self.batch_size > self.window):
            self._settle(self.writes.popleft())  # counts stay current for a live stream's status

    def _settle(self, future: Future) -> None:
        try:
            rows = future.result()
        except OSError as e:  # disk full / read-only: keep what is done, stop cleanly
            self.fatal = self.fatal or e
            return
        for row in rows:
            self.counts["ok"] += row["status"] == "ok"
            self.counts["failed"] += row["status"] != "ok"
            self.counts["qc_flagged"] += row["status"] == "ok" and row.get("qc", "ok") != "ok"
            self.advance()

    def _summary(self, todo: list[Item], csv_path: Path, elapsed: float) -> dict:
        done = self.counts["ok"] + self.counts["failed"]
        summary = {
            "inputs": len(self.items),
            "skipped_done": len(self.items) - len(todo),
            "batch_size": self.batch_size,
            **self.counts,
            "stopped_early": self.stopped,
            "seconds": elapsed,
            "images_per_second": done / elapsed if elapsed > 0 else 0.0,
            "results_csv": str(csv_path),
            "backend": self.runner.describe(),
            "model": self.runner.info.name,
            "convention": self.runner.spec.convention,
            "artifact": self.runner.content_hash or self.runner.weights_id,
        }
        return write_summary(self.out_dir, summary)
