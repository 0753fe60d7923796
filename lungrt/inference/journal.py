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

import contextlib
import fcntl
import functools
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from lungrt.core.errors import LungrtError

RECORDS = ".lungrt-records"


LOCK = ".lungrt-lock"
IDENTITY = "run.json"
# recorded in run.json (which runner and artifact made the masks) but no reason to refuse --resume:
# another backend at the same precision and weights makes the same masks
RECORDED_ONLY = ("runner", "artifact")


def records_folder(out_dir: str | Path) -> Path:
    """OUT/.lungrt-records, refused when it is a link (it would carry writes out of OUT)."""
    folder = Path(out_dir) / RECORDS
    if folder.is_symlink():
        raise LungrtError(f"{folder}: is a symbolic link; lungrt keeps its journal only inside --out (remove the link)")
    return folder


@contextlib.contextmanager
def lock_out_dir(out_dir: str | Path):
    """One run per output folder at a time: a second one is refused (it would drop the first's
    rows). An advisory lock the kernel releases when the process dies, however it dies."""
    path = Path(out_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise LungrtError(f"{path}: cannot open the run lock ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise LungrtError(
                f"{out_dir}: in use by another lungrt run (pid {holder}); wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_identity(out_dir: str | Path, identity: dict) -> None:
    folder = records_folder(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / IDENTITY).write_text(json.dumps(identity, indent=2, sort_keys=True))


INVOCATION_KEYS = ("ok", "failed", "qc_flagged", "skipped_done", "seconds", "images_per_second", "backend", "artifact")


def write_summary(out_dir: str | Path, summary: dict) -> dict:
    """This invocation's summary, plus `run`: every invocation of the run so far (a fresh run
    starts the list; each `--resume` adds one) and their totals, the whole run's speed among
    them (None when nothing was processed), for `lungrt report`. Returns what was written."""
    folder = records_folder(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "summary.json"
    try:
        earlier = json.loads(path.read_text())
        invocations = list(earlier.get("run", {}).get("invocations", [])) if isinstance(earlier, dict) else []
    except (OSError, ValueError):
        invocations = []
    invocations.append({k: summary.get(k) for k in INVOCATION_KEYS})
    processed = sum((i.get("ok") or 0) + (i.get("failed") or 0) for i in invocations)
    seconds = sum(i.get("seconds") or 0.0 for i in invocations)
    run = {
        "invocations": invocations,
        "processed": processed,
        "seconds": seconds,
        "qc_flagged": sum(i.get("qc_flagged") or 0 for i in invocations),
        "images_per_second": processed / seconds if processed and seconds > 0 else None,
    }
    whole = {**summary, "run": run}
    path.write_text(json.dumps(whole, indent=2, default=str))
    return whole


def check_identity(out_dir: str | Path, identity: dict) -> None:
    """`--resume` continues only a run of the same model, weights and mask-changing options."""
    path = records_folder(out_dir) / IDENTITY
    try:
        earlier = json.loads(path.read_text())
    except FileNotFoundError:
        if any(records_folder(out_dir).glob("*.jsonl")):
            raise LungrtError(
                f"{out_dir}: its earlier run recorded no model identity (an older lungrt); "
                "start afresh without --resume or use another --out"
            ) from None
        write_identity(out_dir, identity)
        return
    except (OSError, ValueError):
        raise LungrtError(f"{path}: unreadable run identity; start afresh without --resume") from None
    diffs = [
        f"{k} {earlier.get(k)!r} -> {identity.get(k)!r}"
        for k in sorted(set(identity) | set(earlier))  # an option on then and off now differs too
        if k not in RECORDED_ONLY and earlier.get(k) != identity.get(k)
    ]
    if diffs:
        raise LungrtError(
            f"{out_dir}: --resume would mix two runs ({'; '.join(diffs)}); resume with the earlier model and "
            "options, or start afresh without --resume, or use another --out"
        )


class Journal:
    def __init__(self, out_dir: Path):
        folder = records_folder(out_dir)
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
    shutil.rmtree(records_folder(out_dir), ignore_errors=True)


class Records(Mapping):
    """Latest row per input (keyed by its output stem), over every journal in an output folder.

    Only where each input's latest line lies is held (file, offset, length): a parsed row costs
    ~2.5 KB of memory, a location ~0.15 KB, so 20,000 inputs hold 3 MB rather than 50, and a
    million stay in reach. A row is read back from its file and parsed when asked for."""

    def __init__(self, out_dir: str | Path):
        self._files: list[Path] = sorted(records_folder(out_dir).glob("*.jsonl"))
        self._where: dict[str, tuple[int, int, int]] = {}
        for i, f in enumerate(self._files):
            offset = 0
            for line in f.read_bytes().splitlines(keepends=True):
                rel = _rel_of(line)
                if rel is not None:
                    self._where[rel] = (i, offset, len(line))
                offset += len(line)

    def __getitem__(self, rel: str) -> dict:
        i, offset, length = self._where[rel]
        with open(self._files[i], "rb") as f:
            f.seek(offset)
            return json.loads(f.read(length))

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _rel_of(line: bytes) -> str | None:
    try:
        return json.loads(line)["rel"]
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a power loss: its input is simply redone


def read_records(out_dir: str | Path) -> Records:
    """Latest row per input (keyed by its output stem), over every journal in `out_dir`."""
    return Records(out_dir)
