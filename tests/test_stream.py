"""The one batched stream (`lungrt.inference.stream.segment`) with a live source: the DICOM node feeds it films as
their studies complete and None while nothing is due."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import numpy as np

from lungrt.inference.inputs import Item
from lungrt.inference.stream import Frame, segment


class RecordingRunner:
    """Glue only (no model): each image's probability is its input's mean; records every batch's shape."""

    def __init__(self):
        self.shapes = []

    def run(self, x: np.ndarray) -> np.ndarray:
        self.shapes.append(x.shape[0])
        return np.broadcast_to(x.mean(axis=(1, 2, 3), keepdims=True), x.shape).copy()


def read_now(item: Item) -> Future:
    """A reader that needs no file: the tensor is the item's number."""
    done = Future()
    done.set_result(Frame(item, tensor=np.full((1, 4, 4), float(item.rel.name), np.float32)))
    return done


def film(n: int) -> Item:
    return Item(Path(f"f{n}"), Path(str(n)))


def test_a_live_source_gets_its_pause_answered_and_waits_only_when_the_stream_is_idle():
    runner, waits = RecordingRunner(), []
    source = [None, film(1), film(2), film(3), None, None, film(4), film(5)]  # None: nothing due right now
    chunks = list(segment(runner, iter(source), 2, read_now, window=6, wait_for_input=lambda: waits.append(1)))

    got = [[int(f.item.rel.name) for f in chunk] for chunk in chunks]
    assert got == [[1, 2], [3], [4, 5]]  # film 3 is not held back for company once the source pauses
    assert runner.shapes == [2, 2, 2]  # the short batch padded: one shape, whatever came with a film
    assert [float(f.prob[0, 0]) for chunk in chunks for f in chunk] == [1, 2, 3, 4, 5]
    assert len(waits) == 2  # at the start, and once film 3 was done: never while films were in flight


def test_a_list_source_never_waits():
    runner = RecordingRunner()
    chunks = list(segment(runner, [film(n) for n in range(5)], 2, read_now, 6, wait_for_input=lambda: 1 / 0))
    assert [len(c) for c in chunks] == [2, 2, 1] and runner.shapes == [2, 2, 2]
