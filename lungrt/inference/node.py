"""lungrt as a DICOM node: receive chest films over DIMSE (C-STORE, C-ECHO), segment them with `lungrt infer`'s
batched stream, send the results back by C-STORE, lose nothing.

Everything lives in one spool folder, so a node killed at any moment (SIGKILL included) picks up where it was:

    SPOOL/incoming/STUDY/SOP.dcm   what was received: written and fsynced before the C-STORE is acknowledged
    SPOOL/results/...              `lungrt infer`'s output folder (its journal says which films are done)
    SPOOL/sent.jsonl               one fsynced line per instance a destination acknowledged (never sent twice)
    SPOOL/studies.jsonl            one line per study answered (films, SEGs, destinations, latency)
    SPOOL/status.json              counts and latency percentiles (`lungrt serve --status SPOOL`)

A study is processed once no film of it arrived for `quiet_seconds`: its films join the node's one live stream
(`InferRun.consume` fed by `films_due`; batches across studies keep an accelerator fed; the batch shape is fixed,
so a film's mask never depends on what came with it). Its SEGs (and, if asked, a Secondary Capture with the
outline burned in and an SR) go to every destination, retried with back-off until acknowledged. Films that
header screening refuses get no SEG (what infer writes decides what is sent); QC-flagged films' results are held
unless `send_flagged`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from lungrt.backends.base import Runner
from lungrt.core.errors import LungrtError
from lungrt.data.io import atomic_write_bytes
from lungrt.inference.infer import InferRun
from lungrt.inference.inputs import Item, collect_inputs
from lungrt.inference.journal import lock_out_dir, read_records, records_folder
from lungrt.inference.options import InferOptions
from lungrt.inference.outputs import remove_partial_writes, run_identity, todo_items, write_results_csv

log_ = logging.getLogger(__name__)

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
ACCEPTED_SOP_CLASSES = (CR, DX_PRESENTATION, DX_PROCESSING)
VERIFICATION = "1.2.840.10008.1.1"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR: what highdicom writes for TID 1500
STATUS_OUT_OF_RESOURCES = 0xA700
MAX_PDU_BYTES = 1 << 20
STATUS_CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """AE@HOST:PORT, e.g. PACS@127.0.0.1:4242."""
        try:
            ae, rest = text.split("@", 1)
            host, port = rest.rsplit(":", 1)
            return cls(ae, host, int(port))
        except ValueError:
            raise LungrtError(f"destination {text!r}: write it as AE@HOST:PORT, e.g. PACS@127.0.0.1:4242") from None

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass
class NodeConfig:
    spool: Path
    ae_title: str = "LUNGRT"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_callers: tuple[str, ...] = ()  # calling AE titles accepted; any other association is rejected
    destinations: tuple[Destination, ...] = ()
    quiet_seconds: float = 5.0  # a study is complete once no film of it arrived for this long
    max_queued: int = 2000  # films received and not yet processed; beyond it C-STORE answers "out of resources"
    min_free_mb: int = 512  # and so it does when the spool's disk has less free than this
    batch_size: int = 8
    workers: int = 2
    secondary_capture: bool = False  # also a Secondary Capture with the outline burned in, per film
    send_flagged: bool = False  # QC-flagged films' results too (their SEG says "QC flagged: ...")
    structured_report: bool = False  # a DICOM SR (TID 1500) per film: lung areas and the QC verdict, flagged too
    retry_seconds: float = 2.0  # first back-off for a destination that does not answer (doubles, up to a minute)
    options: InferOptions = field(default_factory=InferOptions)


class DicomNode:
    """The node: a pynetdicom storage SCP on `config.port`, a processing loop and a sender, over one spool."""

    def __init__(self, runner: Runner, config: NodeConfig):
        if not config.allowed_callers:
            raise LungrtError("serve: name the calling AE titles to accept (--allow AE); others are refused")
        self.runner, self.config = runner, config
        self.incoming = config.spool / "incoming"
        self.results = config.spool / "results"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.results.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.counts = dict.fromkeys(("received", "refused", "sent", "send_failures"), 0)
        self.finished = dict.fromkeys(("ok", "failed", "qc_flagged", "screened_out", "not_radiographs"), 0)
        self.run: InferRun | None = None  # the live stream (its counts add to `finished` when it ends)
        self.fed: set[str] = set()  # films given to the stream and not done yet
        self._status_written = self._csv_written = 0.0
        self._csv_due = False  # studies answered since results.csv was written
        self.seconds = dict.fromkeys(("sending", "receiving_cpu", "sending_cpu"), 0.0)
        self.answered, self.latencies = self._earlier_answers()  # study -> films answered; every study's latency
        self._scanned = None  # the journal's signature at the sender's last look
        self.sent = self._read_sent()
        self.last_arrival: dict[str, float] = {}
        self._records_cache, self._records_signature = {}, None  # infer's journal, re-read when it changed
        done = self._done_sources()  # films received and not done: listed once here, then kept up to date
        self.waiting = {f"{f.parent.name}/{f.stem}" for f in self.incoming.glob("*/*.dcm")} - done
        self.next_try: dict[str, float] = {}
        self.server = None
        self.opts = replace(
            config.options, batch_size=config.batch_size, workers=config.workers, dicom_seg=True, pad_batch=True,
            overlay=config.options.overlay or config.secondary_capture, screen="flag",
        )  # fmt: skip

    # -- receiving ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start listening (in pynetdicom's threads); `serve_forever` or `step` does the rest."""
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, evt

        ae = AE(ae_title=self.config.ae_title)
        ae.require_calling_aet = list(self.config.allowed_callers)
        # senders cut a film into PDUs of at most this: 16 KB (pynetdicom's default) made a 2 MB film 128 PDUs,
        # each a round of Python; 1 MB makes it 2
        ae.maximum_pdu_size = MAX_PDU_BYTES
        for uid in ACCEPTED_SOP_CLASSES:  # any transfer syntax: a modality may offer only JPEG Lossless or J2K,
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)  # and lungrt decodes them all
        ae.add_supported_context(VERIFICATION)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: 0x0000)]
        self.server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        log_.info("listening as %s on %s:%d", self.config.ae_title, self.config.host, self.config.port)

    def _on_store(self, event) -> int:
        """Write the instance durably, then acknowledge; refuse (never drop) when the queue or the disk is full."""
        c0 = time.thread_time()
        try:
            return self._store(event)
        finally:
            self.seconds["receiving_cpu"] += time.thread_time() - c0

    def _store(self, event) -> int:
        try:
            ds = event.dataset
            study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        except Exception:  # no UIDs to file it under: the sender hears it
            return STATUS_CANNOT_UNDERSTAND
        if self.queued() >= self.config.max_queued or self._free_mb() < self.config.min_free_mb:
            with self.lock:
                self.counts["refused"] += 1
            return STATUS_OUT_OF_RESOURCES
        folder = self.incoming / _safe_uid(study)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / f"{_safe_uid(sop)}.dcm", event.encoded_dataset(), durable=True)
        with self.lock:
            self.counts["received"] += 1
            self.last_arrival[folder.name] = time.time()
            self.waiting.add(f"{folder.name}/{_safe_uid(sop)}")
        return 0x0000

    def queued(self) -> int:
        """Films received and not done yet (kept as a set: a glob of the spool per C-STORE grew with the spool)."""
        done = self._done_sources()
        with self.lock:
            self.waiting -= done
            return len(self.waiting)

    def _free_mb(self) -> float:
        return shutil.disk_usage(self.config.spool).free / 2**20

    # -- processing and sending ---------------------------------------------------------------
    def serve_forever(self, poll: float = 0.2) -> None:
        """Receive, process and send until `stop()` (SIGTERM): then stop listening, finish the films in
        flight, write the status, return. Segmenting is one live stream for the node's life; sending runs in a
        thread of its own, so results go out while the next studies are segmented."""
        with lock_out_dir(self.results):
            remove_partial_writes(self.results)
            resume = records_folder(self.results).exists()  # checks (or writes) the model and options it was made with
            todo_items(self.results, [], replace(self.opts, resume=resume), run_identity(self.runner, self.opts))
            if self.server is None:
                self.start()
            sender = threading.Thread(target=self._send_forever, args=(poll,), name="lungrt-send")
            sender.start()
            try:
                self._segment_forever(poll)
            finally:
                if self.server is not None:
                    self.server.shutdown()
                sender.join()
                write_results_csv(self.results, self._every_film())
                self.write_status()

    def _segment_forever(self, poll: float) -> None:
        """One live stream (`InferRun.consume`) fed by `films_due`: reading the next study overlaps the model's
        work on this one (a stream per round drained and refilled the pipeline every round: 0.69x of infer's
        throughput). A stream that fails (a full disk) is said and started again: nothing stops the node."""
        while not self.stopping.is_set():
            self.run = InferRun(self.runner, [], self.results, self.opts)
            try:
                self.run.consume(self.films_due(), wait_for_input=lambda: self.stopping.wait(poll))
                if self.run.fatal is not None:
                    raise self.run.fatal
            except Exception:
                log_.exception("node stream failed; starting it again")
                self.stopping.wait(max(poll, self.config.retry_seconds))
            finally:
                with self.lock:
                    self.fed.clear()  # what the stream was given and did not finish is given again
                    self.finished = _add_counts(self.finished, self.run.counts)

    def _send_forever(self, poll: float) -> None:
        while not self.stopping.is_set():
            now = time.time()
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                if self.send_pending(now):
                    self.seconds["sending"] += time.perf_counter() - t0
                    self.seconds["sending_cpu"] += time.thread_time() - c0
                if now - self._status_written >= 1.0:
                    self.write_status()
                    self._status_written = now
                if self._csv_due and now - self._csv_written >= 30.0:  # every film answered: O(films), so rarely
                    self._csv_due, self._csv_written = False, now
                    write_results_csv(self.results, self._every_film())
            except Exception:  # an unreachable destination or a full disk must never stop the node: retried
                log_.exception("node send round failed; retrying")
            self.stopping.wait(poll)

    def stop(self) -> None:
        self.stopping.set()

    def films_due(self) -> Iterator[Item | None]:
        """The node stream's live source: each film of every study due (`due_studies`) once, None while there
        is nothing; it ends when the node stops (the films already given are finished)."""
        while not self.stopping.is_set():
            due = self.due_studies(time.time())
            items = collect_inputs([str(self.incoming / s) for s in due]) if due else []
            with self.lock:
                items = [it for it in items if str(it.rel) not in self.fed]
                self.fed.update(str(it.rel) for it in items)
            if items:
                log_.info("segmenting %d films of %d studies", len(items), len(due))
            yield from items or [None]

    def due_studies(self, now: float) -> list[str]:
        """Studies to segment now: complete ones (no film for `quiet_seconds`; after a restart the files' times
        count), once they fill a batch, or once the oldest has waited another `quiet_seconds` for company. Every
        batch runs in the same shape, so a lone 4-film study would compute 8 films' worth: waiting a moment for
        the next study halved the work per film when studies come one after another."""
        unfinished = self._unfinished()
        due, films_due, oldest = [], 0, now
        for study, films in sorted(unfinished.items()):
            last = self.last_arrival.get(study) or max(_mtime(f) for f in films)
            if now - last >= self.config.quiet_seconds:
                due.append(study)
                films_due += len(films)
                oldest = min(oldest, last + self.config.quiet_seconds)
        if films_due % self.config.batch_size == 0 or now - oldest >= self.config.quiet_seconds:
            return due
        return []

    def _unfinished(self) -> dict[str, list[Path]]:
        """study -> its films received and neither done (journal) nor in the stream now: from the `waiting` set,
        not a listing of the spool (asked whenever the stream runs dry; a spool of months would be listed each time)."""
        done = self._done_sources()
        with self.lock:
            self.waiting -= done
            self.fed -= done
            keys = self.waiting - self.fed
        out: dict[str, list[Path]] = {}
        for key in keys:
            study, sop = key.split("/", 1)
            out.setdefault(study, []).append(self.incoming / study / f"{sop}.dcm")
        return out

    def _every_film(self) -> list:
        return collect_inputs([str(p) for p in sorted(self.incoming.iterdir()) if p.is_dir()])

    def outputs_of(self, study: str, records: dict) -> tuple[list[Path], bool]:
        """(files to send for `study`, whether every film of it is done)."""
        films = sorted((self.incoming / study).glob("*.dcm"))
        files, complete = [], bool(films)  # a folder made for a film still being written is not a study yet
        for film in films:
            row = records.get(f"{study}/{film.stem}")
            if row is None or row.get("status") not in ("ok", "skipped", "error"):
                complete = False
                continue
            if row.get("status") != "ok":
                continue
            if self.config.structured_report:  # areas and the QC verdict; for a flagged film, the reasons
                files.append(self._report(film, row))
            if row.get("qc", "ok") != "ok" and not self.config.send_flagged:
                continue
            seg = row.get("dicom_seg", "")
            if seg.endswith(".seg.dcm"):
                files.append(self.results / seg)
                if self.config.secondary_capture:
                    files.append(self._secondary_capture(film, self.results / seg))
        return files, complete

    def send_pending(self, now: float) -> int:
        """Send every processed study's unsent outputs to every destination (one association each); a
        destination that fails waits its back-off. A study whose outputs all went everywhere is answered: one
        line in studies.jsonl. Looks again only when the journal changed or a send is to be retried.
        Returns how many instances it tried to send."""
        records = self._records()
        signature = self._records_signature
        if signature == self._scanned and not self.next_try:
            return 0
        ready = {}  # study -> its files, for every processed study not yet answered with all its films
        for folder in sorted(p for p in self.incoming.iterdir() if p.is_dir()):
            if self.answered.get(folder.name, 0) < len(list(folder.glob("*.dcm"))):  # a later film reopens it
                files, complete = self.outputs_of(folder.name, records)
                if complete:
                    ready[folder.name] = files
        tried = 0
        for dest in self.config.destinations:
            unsent = [f for files in ready.values() for f in files if (str(dest), f.name) not in self.sent]
            if unsent and self.next_try.get(str(dest), 0) <= now:
                tried += len(unsent)
                self._send(dest, unsent)
        for study, files in ready.items():
            if all((str(d), f.name) in self.sent for d in self.config.destinations for f in files):
                self._answer(study, self.incoming / study, files)
        self._scanned = signature
        return tried

    def _send(self, dest: Destination, files: list[Path]) -> None:
        """One association per destination and round; each acknowledged instance is recorded at once."""
        from pydicom.uid import ExplicitVRLittleEndian
        from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES

        ae = AE(ae_title=self.config.ae_title)
        for uid in (SEG_STORAGE, SC_STORAGE, SR_STORAGE):  # a context of what lungrt writes (sent as stored)
            ae.add_requested_context(uid, ExplicitVRLittleEndian)  # apart: a peer picks one syntax per context
            ae.add_requested_context(uid, DEFAULT_TRANSFER_SYNTAXES)
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            self._back_off(dest, "association refused or no answer")
            return
        try:
            for f in files:
                status = _send_as_stored(assoc, f)
                if status and getattr(status, "Status", None) == 0x0000:
                    self._record_sent(dest, f)
                else:
                    self._back_off(dest, f"C-STORE of {f.name}: status {getattr(status, 'Status', 'none')}")
                    return
            self.next_try.pop(str(dest), None)
        finally:
            assoc.release()

    def _back_off(self, dest: Destination, why: str) -> None:
        with self.lock:
            self.counts["send_failures"] += 1
        wait = min(60.0, self.config.retry_seconds * 2 ** min(self.counts["send_failures"], 5))
        self.next_try[str(dest)] = time.time() + wait
        log_.warning("%s: %s; retrying in %.0f s", dest, why, wait)

    def _record_sent(self, dest: Destination, f: Path) -> None:
        line = json.dumps({"destination": str(dest), "file": f.name, "time": time.time()}) + "\n"
        with open(self.config.spool / "sent.jsonl", "a", encoding="utf-8") as out:
            out.write(line)
            out.flush()
            os.fsync(out.fileno())
        with self.lock:
            self.sent.add((str(dest), f.name))
            self.counts["sent"] += 1

    def _answer(self, study: str, folder: Path, files: list[Path]) -> None:
        last_received = max(f.stat().st_mtime for f in folder.glob("*.dcm"))
        latency = time.time() - last_received
        line = {
            "study": study,
            "films": len(list(folder.glob("*.dcm"))),
            "sent_files": len(files),
            "destinations": [str(d) for d in self.config.destinations],
            "latency_s": round(latency, 3),
        }
        with open(self.config.spool / "studies.jsonl", "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")
            out.flush()
            os.fsync(out.fileno())
        self.latencies.append(latency)
        self.answered[study] = line["films"]
        self._csv_due = True
        log_.info("study answered: %s", json.dumps(line))

    def _report(self, film: Path, row: dict) -> Path:
        """FILM.sr.dcm in the results: its SR (made once, reused after a restart)."""
        from lungrt.inference.dicom_seg import report_bytes

        path = self.results / f"{film.parent.name}/{film.stem}.sr.dcm"
        if not path.exists():
            areas = {side: _number(row.get(f"{side}_lung_mm2")) for side in ("right", "left")}
            artifact = self.runner.content_hash or self.runner.weights_id
            atomic_write_bytes(path, report_bytes(film, areas, self.runner.info.name, artifact, row.get("qc", "ok")))
        return path

    def _secondary_capture(self, film: Path, seg: Path) -> Path:
        """FILM.sc.dcm beside its SEG: the film with the lung outline burned in (made once, reused after a restart)."""
        from lungrt.inference.dicom_seg import secondary_capture_bytes

        path = seg.with_name(seg.name.removesuffix(".seg.dcm") + ".sc.dcm")
        if not path.exists():
            overlay = seg.with_name(seg.name.removesuffix(".seg.dcm") + ".overlay.png")
            atomic_write_bytes(path, secondary_capture_bytes(film, overlay, self.runner.info.name))
        return path

    # -- records ------------------------------------------------------------------------------
    def _records(self) -> dict:
        """infer's journal of the results folder, re-read only when a journal file changed (both loops ask for it
        several times a round)."""
        folder = records_folder(self.results)
        files = sorted(folder.glob("*.jsonl")) if folder.exists() else []
        signature = tuple((f.name, *_size_and_time(f)) for f in files)
        with self.lock:
            if signature != self._records_signature:
                self._records_cache, self._records_signature = read_records(self.results), signature
            return self._records_cache

    def _done_sources(self) -> set[str]:
        return {rel for rel, row in self._records().items() if row.get("status") in ("ok", "skipped", "error")}

    def _read_sent(self) -> set[tuple[str, str]]:
        path = self.config.spool / "sent.jsonl"
        if not path.exists():
            return set()
        sent = set()
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                sent.add((row["destination"], row["file"]))
            except (ValueError, KeyError):  # a line cut by a crash: that instance is sent again (same UID)
                continue
        return sent

    def _earlier_answers(self) -> tuple[dict[str, int], list[float]]:
        """(study -> how many films it had when it was last answered, every answer's latency) from studies.jsonl."""
        path = self.config.spool / "studies.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        rows = [json.loads(x) for x in lines if x.strip().endswith("}")]  # a line cut by a crash: answered again
        return {row["study"]: row["films"] for row in rows}, [row["latency_s"] for row in rows]

    def status(self) -> dict:
        with self.lock:
            counts = dict(self.counts)
            done = _add_counts(self.finished, self.run.counts if self.run is not None else {})
        lat = np.array(self.latencies) if self.latencies else None
        return {
            **counts,
            "processed": done["ok"] + done["screened_out"] + done["not_radiographs"],
            "failed": done["failed"],
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
            "queued": self.queued(),
            "studies_answered": len(self.latencies),
            "latency_s_p50": float(np.percentile(lat, 50)) if lat is not None else None,
            "latency_s_p99": float(np.percentile(lat, 99)) if lat is not None else None,
            "listening": f"{self.config.ae_title}@{self.config.host}:{self.config.port}",
            "destinations": [str(d) for d in self.config.destinations],
            "time": time.time(),
        }

    def write_status(self) -> None:
        atomic_write_bytes(self.config.spool / "status.json", json.dumps(self.status(), indent=2).encode(), False)


def _send_as_stored(assoc, path: Path):
    """C-STORE of the file's bytes as written. Given a path, pynetdicom decodes and re-encodes the dataset (~50 ms
    of CPU per SEG here, half the node's sending cost) unless its process-wide STORE_SEND_CHUNKED_DATASET is on:
    on for this call. A peer that accepted none of the file's transfer syntax gets it decoded and re-encoded."""
    from pydicom import dcmread
    from pynetdicom import _config

    before, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        return assoc.send_c_store(path)
    except ValueError:  # no presentation context for the stored transfer syntax
        pass
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before
    return assoc.send_c_store(dcmread(path))


def _add_counts(a: dict, b: dict) -> dict:
    return {k: a[k] + b.get(k, 0) for k in a}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # gone since it was listed
        return 0.0


def _number(value) -> float | None:
    return None if value in (None, "") else float(value)


def _size_and_time(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def _safe_uid(uid: str) -> str:
    """A UID as a file name: digits and dots only (anything else a sender put there becomes '_')."""
    text = "".join(c if c.isdigit() or c == "." else "_" for c in uid.strip())
    return text.strip(".") or "_"


def read_status(spool: Path) -> dict:
    try:
        return json.loads((Path(spool) / "status.json").read_text())
    except (OSError, ValueError) as e:
        raise LungrtError(f"{spool}: no node status here ({e})") from None
