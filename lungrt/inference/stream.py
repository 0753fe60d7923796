"""The one batched stream every front door uses (`lungrt infer`, the Python API, Ray's actors, the DICOM node).

It reads ahead through a bounded window in input order, batches the readable images, runs the runner on
batches of one shape (a short last batch is padded to it, so an image's probabilities never depend on how
many came with it), and yields every input as a `Frame`, in input order, with errors and skips as frames of
their own: one bad input never stops the others, and none is ever dropped.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from lungrt.backends.base import Runner
from lungrt.core.errors import ImageReadError, LungrtError, NotARadiograph
from lungrt.data.dicom import screen as screen_header
from lungrt.data.io import array_xray, read_xray
from lungrt.inference.inputs import Item

SCREEN_CHOICES = ("flag", "skip")
POLL_SECONDS = 0.05  # how long a stream whose live source has nothing waits before asking again


@dataclass
class Frame:
    """One input on its way through the stream."""

    item: Item
    xray: object = None  # XRay (or its XRayFacts from a helper process); None when it could not be read
    tensor: np.ndarray | None = None  # the network input; dropped once the batch has run
    prob: np.ndarray | None = None  # the network's (size, size) probabilities
    reference: np.ndarray | None = None  # the second opinion's (whole-lung) probabilities, when the runner has one
    error: str = ""  # why it could not be read or prepared (one line)
    skipped: tuple[str, ...] = ()  # why it gets no mask although nothing failed: not_a_radiograph, screening
    note: str = ""  # what a skipped input holds instead (e.g. the SOP class of a SEG)

    @property
    def status(self) -> str:
        return "error" if self.error else "skipped" if self.skipped else "ok"


def load(item: Item, spec, keep_pixels: bool = True, screen: str = "flag") -> Frame:
    """Read and prepare one input; every failure is the frame's error, never an exception. Without
    `keep_pixels` (no overlay to draw) a native detector DICOM is reduced to the network's size while it
    is read (`read_xray`'s `reduce_for`). `screen="skip"`: a DICOM whose header says it is not a frontal
    chest film is skipped with the reasons (with "flag" it is segmented and QC names them)."""
    if item.error:
        return Frame(item, error=item.error)
    try:
        if item.array is not None:
            xr = array_xray(item.array)
        else:
            xr = read_xray(item.file, reduce_for=None if keep_pixels else spec)
        if screen == "skip" and (reasons := screen_header(getattr(xr, "header", None))):
            return Frame(item, xr, skipped=tuple(reasons))
        return Frame(item, xr, spec.apply_xray(xr))
    except NotARadiograph as e:
        return Frame(item, skipped=("not_a_radiograph",), note=e.reason)
    except ImageReadError as e:
        return Frame(item, error=e.reason)
    except LungrtError as e:
        return Frame(item, error=str(e))
    except Exception as e:  # one bad file must never stop the run
        return Frame(item, error=f"{type(e).__name__}: {e}")


def batch_shape(requested: int, inputs: int | None, runner: Runner) -> int:
    """The one batch size a stream runs: no larger than the inputs (padding 1 image to 256 costs 256
    images' compute), nor than the engine's profile. It depends on the whole input list, not on what is
    left, so a resumed run computes every image in the same batch shape as an uninterrupted one."""
    limit = getattr(runner, "batch_range", (1, requested))[1]
    return max(1, min(requested, inputs or requested, limit))


def read_window(batch_size: int, workers: int) -> int:
    """How many inputs are read ahead of the model: three batches, enough to keep every helper busy."""
    return max(3 * batch_size, 2 * workers)


def run_batch(runner: Runner, tensors: list[np.ndarray], batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(n, size, size) probabilities of n <= batch_size network inputs, run as one batch of `batch_size`
    (the last input repeated): the last-batch rule of every front door; and the second opinion's of the same
    inputs (`SecondOpinionRunner.reference`), or None."""
    x = np.stack(tensors)
    if len(x) < batch_size:
        x = np.concatenate([x, np.repeat(x[-1:], batch_size - len(x), 0)])
    n, reference = len(tensors), getattr(runner, "reference", None)
    refs = reference.run(x)[:n, 0] if reference is not None else None
    return runner.run(x)[:n, 0], refs


@contextmanager
def thread_reader(spec, workers: int = 2, keep_pixels: bool = True, screen: str = "flag"):
    """`submit(item) -> Future[Frame]` on a pool of `workers` threads (decoding and resizing release the GIL)."""
    with ThreadPoolExecutor(max(1, workers), "lungrt-read") as pool:
        yield lambda item: pool.submit(load, item, spec, keep_pixels, screen)


def segment(
    runner: Runner,
    items: Iterable[Item | None],
    batch_size: int,
    submit_read: Callable[[Item], Future],
    window: int,
    stop_at_error: bool = False,
    wait_for_input: Callable[[], object] = lambda: time.sleep(POLL_SECONDS),
) -> Iterator[list[Frame]]:
    """Frames of `items` in input order, yielded in chunks: each chunk holds at most `batch_size` readable
    frames (their `prob` set, computed as one padded batch) and the failed or skipped frames read among
    them. `stop_at_error`: the chunk that holds the first error is the last. An exception raised by
    `items` itself (a caller's generator) is re-raised after everything before it was yielded.

    A live source (the DICOM node's films as their studies complete) yields None when it has nothing now:
    what was read is run (a short batch padded) and yielded, and once nothing is in flight the source is
    asked again after `wait_for_input()`; it ends the stream by ending."""
    pending: deque[Future] = deque()
    sources = iter(items)
    source_error: list[BaseException] = []
    chunk: list[Frame] = []
    ended = quiet = False  # quiet: the live source had nothing; not asked again before the stream drains

    def refill() -> None:
        nonlocal ended, quiet
        while not ended and not quiet and len(pending) < max(1, window):
            try:
                item = next(sources)
            except StopIteration:
                ended = True
            except Exception as e:  # the caller's source failed: what came before it is still handed over
                source_error.append(e)
                ended = True
            else:
                if item is None:
                    quiet = True
                else:
                    pending.append(submit_read(item))

    try:
        refill()
        while pending or not ended:
            if not pending:  # a live source with nothing now: ask again after a while
                wait_for_input()
                quiet = False
                refill()
                continue
            frame = pending.popleft().result()
            refill()
            chunk.append(frame)
            stop = stop_at_error and frame.status == "error"
            good = [f for f in chunk if f.status == "ok"]
            if len(good) == batch_size or stop or not pending:  # nothing pending after a refill: the source paused
                _run_chunk(runner, good, batch_size)
                yield chunk
                chunk = []
                if stop:
                    return
                if not pending:
                    quiet = False
                    refill()
    finally:
        for f in pending:
            f.cancel()
    if source_error:
        raise source_error[0]


def stacked(good: list[Frame]) -> tuple[np.ndarray, np.ndarray | None]:
    """The probabilities of segmented frames as one array, and their second opinion's (None without one)."""
    probs = np.stack([f.prob for f in good])
    return probs, (np.stack([f.reference for f in good]) if good[0].reference is not None else None)


def _run_chunk(runner: Runner, good: list[Frame], batch_size: int) -> None:
    if not good:
        return
    probs, refs = run_batch(runner, [f.tensor for f in good], batch_size)
    for i, f in enumerate(good):
        f.prob, f.tensor = probs[i], None
        f.reference = None if refs is None else refs[i]
