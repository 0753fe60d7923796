"""A PACS as input and output over DICOMweb (dicomweb-client): `lungrt infer URL --store`.

An input `http(s)://HOST/ROOT/studies/STUDY[/series/SERIES]` is listed with QIDO-RS and its
instances fetched with WADO-RS into `OUT/.lungrt-dicomweb/PACS/STUDY/SERIES/SOP.dcm` (PACS: its host and
port), where the usual pipeline reads them like local files (one fetched before is not fetched again, so
`--resume` compares them like any input); their outputs go to `OUT/pacs_PACS/STUDY/SERIES/SOP.*`, beside
local inputs' own. `--store` (`store_results`) sends back with STOW-RS exactly the SEGs that this run's
journal lists for instances fetched from a PACS, each to the PACS it came from and only into the study it
came from; films QC flagged only when asked. It checks that the PACS then lists each (QIDO-RS) and records
each stored one in `OUT/.lungrt-records/stored.txt`, so a resumed run stores only the rest.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

from lungrt.core.errors import LungrtError, one_line
from lungrt.data.io import NOT_IMAGE_SOP_CLASSES, atomic_write_bytes

FETCHED = ".lungrt-dicomweb"
STORED = "stored.txt"
_URL = re.compile(r"^(?P<root>https?://.+?)/studies/(?P<study>[0-9.]+)(?:/series/(?P<series>[0-9.]+))?/?$")


def is_dicomweb_url(text: str) -> bool:
    return bool(_URL.match(text))


@dataclass(frozen=True)
class PacsInput:
    """A DICOMweb input of a run: where it came from and where its instances and outputs live."""

    url: str  # as given
    root: str  # the DICOMweb root the SEGs go back to
    study: str  # the one study they may go into
    folder: Path  # its fetched instances: OUT/.lungrt-dicomweb/PACS/STUDY
    label: str  # its outputs' folder under OUT: pacs_PACS

    def holds(self, rel: Path) -> bool:
        """Whether an output stem belongs to this input."""
        return rel.parts[:2] == (self.label, self.study)


def pacs_tag(root: str) -> str:
    """A PACS's DICOMweb root as a folder name: host and port (and path when the root has one)."""
    text = re.sub(r"^https?://", "", root).strip("/")
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text)


def fetch_inputs(urls: list[str], out_dir: Path) -> list[PacsInput]:
    """Every DICOMweb input fetched (`fetch`), with its origin for storing back."""
    found = []
    for url in urls:
        m = _URL.match(url)
        if not m:
            raise LungrtError(f"{url}: not a DICOMweb study or series URL (…/studies/UID[/series/UID])")
        tag = pacs_tag(m["root"])
        found.append(PacsInput(url, m["root"], m["study"], fetch(url, out_dir), f"pacs_{tag}"))
    return found


def _client(root: str):
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise LungrtError("DICOMweb inputs need dicomweb-client: pip install 'lungrt[dicom]'") from None
    client = DICOMwebClient(url=root)
    # dicomweb-client retries (also a refused connection) 5 times with back-off from 1 s: 30 s before
    # an unreachable PACS is reported. 3 attempts from 0.25 s still ride out a busy PACS's 503s.
    client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=250)
    return client


def _failure(url: str, what: str, e: Exception) -> LungrtError:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 404:
        return LungrtError(f"{url}: {what}: not found on the PACS (HTTP 404)")
    if status is not None:
        return LungrtError(f"{url}: {what}: the PACS answered HTTP {status}")
    return LungrtError(f"{url}: {what}: PACS unreachable ({one_line(e, 160)})")


def fetch(url: str, out_dir: Path) -> Path:
    """The study or series at `url` as local files under OUT/.lungrt-dicomweb/STUDY; that folder."""
    m = _URL.match(url)
    if not m:
        raise LungrtError(f"{url}: not a DICOMweb study or series URL (…/studies/UID[/series/UID])")
    client, study, series = _client(m["root"]), m["study"], m["series"]
    try:
        found = client.search_for_instances(study_instance_uid=study, series_instance_uid=series)
    except Exception as e:  # requests' connection errors and HTTP errors alike
        raise _failure(url, "listing its instances", e) from None
    if not found:
        raise LungrtError(f"{url}: the PACS lists no instances there")
    folder = out_dir / FETCHED / pacs_tag(m["root"]) / study
    for entry in found:
        series_uid, sop = entry["0020000E"]["Value"][0], entry["00080018"]["Value"][0]
        if _not_an_image(entry):  # the study's SEGs (lungrt's own, stored back), reports, presentation states
            continue
        path = folder / series_uid / f"{sop}.dcm"
        if path.exists():
            continue
        try:
            instance = client.retrieve_instance(study, series_uid, sop)
        except Exception as e:
            raise _failure(url, f"retrieving instance {sop}", e) from None
        buf = io.BytesIO()
        instance.save_as(buf, enforce_file_format=True)
        atomic_write_bytes(path, buf.getvalue())
    return folder


def _not_an_image(entry: dict) -> bool:
    """The same SOP classes that a local folder's reader skips (`lungrt.data.io.not_a_radiograph`)."""
    sop_class = (entry.get("00080016", {}).get("Value") or [""])[0]
    return sop_class.startswith(tuple(NOT_IMAGE_SOP_CLASSES))


def _refusal(response) -> str:
    """The STOW-RS answer's failure reasons (PS3.18: Failed SOP Sequence), '' when all was stored."""
    failed = getattr(response, "FailedSOPSequence", None) if response is not None else None
    if not failed:
        return ""
    return ", ".join(f"failure reason {int(item.get('FailureReason', 0)):#06x}" for item in failed)


def _not_listed(client, ds) -> str:
    """Stored is what the PACS lists afterwards: Orthanc 1.10's DICOMweb plugin answers STOW-RS with
    success for an instance its own filter (a Lua ReceivedInstanceFilter) dropped."""
    try:
        found = client.search_for_instances(
            study_instance_uid=str(ds.StudyInstanceUID), search_filters={"SOPInstanceUID": str(ds.SOPInstanceUID)}
        )
    except Exception as e:
        return f"stored, then could not be listed: {one_line(e, 120)}"
    return "" if found else "acknowledged by STOW-RS, yet QIDO-RS does not list it"


def store_results(
    out_dir: Path, pacs_inputs: list[PacsInput], records: dict[str, dict], include_flagged: bool = False
) -> dict:
    """STOW-RS this run's SEGs (`records`: the journal, by output stem) of instances fetched from a PACS, each
    to the PACS and study it came from. A film QC flagged is held back unless `include_flagged`; a SEG
    whose study is not its source's is refused. The answer lists what went where."""
    result = {"stored": [], "stored_before": 0, "held_qc_flagged": [], "not_stored": []}
    for pacs in pacs_inputs:
        segs = []
        for rel, row in sorted(records.items()):
            if not pacs.holds(Path(rel)) or row.get("status") != "ok":
                continue
            seg = str(row.get("dicom_seg") or "")
            if not seg.endswith(".seg.dcm"):
                if seg:
                    result["not_stored"].append({"output": rel, "why": seg})
                continue
            if row.get("qc", "ok") != "ok" and not include_flagged:
                result["held_qc_flagged"].append({"output": rel, "qc": row["qc"]})
                continue
            segs.append(out_dir / seg)
        stored, before = store_segs(pacs.root, out_dir, segs, study=pacs.study)
        result["stored"] += [
            {"pacs": pacs.root, "study": pacs.study, "file": str(p.relative_to(out_dir))} for p in stored
        ]
        result["stored_before"] += before
    return result


def store_segs(root_url: str, out_dir: Path, seg_paths: list[Path], study: str | None = None) -> tuple[list[Path], int]:
    """STOW-RS to `root_url` every SEG not stored there before; (stored now, how many earlier). `study`: the one
    study they may go into (a SEG of another is refused, not sent). One failure stops it with one line; what was
    stored is recorded first, so `--resume --store` sends only the rest."""
    import pydicom

    m = _URL.match(root_url)
    root = m["root"] if m else root_url
    client = _client(root)
    record = out_dir / ".lungrt-records" / STORED
    done = {tuple(line.split(" ", 1)) for line in record.read_text().splitlines()} if record.exists() else set()
    now: list[Path] = []
    for path in seg_paths:
        ds = pydicom.dcmread(path)  # read once: the study check and STOW-RS share it
        if study is not None and str(ds.StudyInstanceUID) != study:
            raise LungrtError(
                f"{path}: its study {ds.StudyInstanceUID} is not {study}, fetched from {root}; not stored"
            )
        if (ds.SOPInstanceUID, root) in done:
            continue
        what = f"storing {path.name} (STOW-RS; {len(now)} stored now, the rest after a rerun with --resume --store)"
        try:
            response = client.store_instances([ds])
        except Exception as e:
            raise _failure(root, what, e) from None
        refused = _refusal(response) or _not_listed(client, ds)
        if refused:
            raise LungrtError(f"{root}: {what}: the PACS refused it ({refused})")
        record.parent.mkdir(parents=True, exist_ok=True)
        with open(record, "a") as f:
            f.write(f"{ds.SOPInstanceUID} {root}\n")
        done.add((ds.SOPInstanceUID, root))
        now.append(path)
    return now, len(seg_paths) - len(now)
