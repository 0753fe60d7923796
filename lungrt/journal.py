"""What `infer` has finished, for results.csv and `--resume`: append-only JSON lines.

One journal file per process and run under OUT/.lungrt-records/, one line per finished input, each
written by a single write() after that input's files are complete. A million inputs make a few
files rather than a million, and a line costs no file creation, rename or fsync (the run syncs
once at the end). A process killed mid-run leaves whole lines; a line cut short by a power loss
does not parse and its input is redone. Each process (a Ray worker too) appends to its own file,
so no two processes ever share one; files are named by start time, so a later run's line for an
input overrides an earlier one.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

RECORDS = ".lungrt-records"


class Journal:
    def __init__(self, out_dir: Path):
        folder = Path(out_dir) / RECORDS
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{time.time_ns():020d}-{socket.gethostname()}-{os.getpid()}.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()  # writer threads share the file

    def append(self, row: dict) -> dict:
        line = (json.dumps(row) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
        return row


_open: dict[tuple[str, int], Journal] = {}
_open_lock = threading.Lock()


@functools.lru_cache(maxsize=64)
def _folder_key(out_dir: str) -> str:
    return os.path.realpath(out_dir)  # once per folder: journal_for is called once per image


def journal_for(out_dir: str | Path) -> Journal:
    """This process's journal for `out_dir` (opened once; a forked child opens its own)."""
    key = (_folder_key(os.fspath(out_dir)), os.getpid())
    with _open_lock:
        if key not in _open or not _open[key].path.exists():  # removed under us: start a new file
            _open[key] = Journal(Path(out_dir))
        return _open[key]


def start_fresh(out_dir: str | Path) -> None:
    """A fresh (not resumed) run must not report an older run's rows."""
    with _open_lock:
        for key in [k for k in _open if k[0] == _folder_key(os.fspath(out_dir))]:
            os.close(_open.pop(key)._fd)
    shutil.rmtree(Path(out_dir) / RECORDS, ignore_errors=True)


def read_records(out_dir: str | Path) -> dict[str, dict]:
    """Latest row per input (keyed by its output stem), over every journal in `out_dir`."""
    rows: dict[str, dict] = {}
    for f in sorted((Path(out_dir) / RECORDS).glob("*.jsonl")):
        for line in f.read_bytes().splitlines():
            try:
                row = json.loads(line)
                rows[row["rel"]] = row
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a power loss: its input is simply redone
    return rows
