"""A PACS as input and output over DICOMweb (dicomweb-client): `lungrt infer URL --store`.

An input `http(s)://HOST/ROOT/studies/STUDY[/series/SERIES]` is listed with QIDO-RS and its
instances fetched with WADO-RS into `OUT/.lungrt-dicomweb/STUDY/SERIES/SOP.dcm`, where the usual
pipeline reads them like local files (one fetched before is not fetched again, so `--resume`
compares them like any input). `--store` sends the run's DICOM SEG instances back with STOW-RS, checks
that the PACS then lists each (QIDO-RS), and records each stored one in
`OUT/.lungrt-records/stored.txt`, so a resumed run stores only the rest.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from lungrt.core.errors import LungrtError, one_line
from lungrt.data.io import atomic_write_bytes

FETCHED = ".lungrt-dicomweb"
STORED = "stored.txt"
_URL = re.compile(r"^(?P<root>https?://.+?)/studies/(?P<study>[0-9.]+)(?:/series/(?P<series>[0-9.]+))?/?$")


def is_dicomweb_url(text: str) -> bool:
    return bool(_URL.match(text))


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
    folder = out_dir / FETCHED / study
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


# SOP classes without a radiograph to segment: segmentation/registration, structured reports,
# presentation states, encapsulated documents, key object selection
NOT_IMAGES = ("1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.",
              "1.2.840.10008.5.1.4.1.1.104.")


def _not_an_image(entry: dict) -> bool:
    sop_class = (entry.get("00080016", {}).get("Value") or [""])[0]
    return sop_class.startswith(NOT_IMAGES)


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
        found = client.search_for_instances(study_instance_uid=str(ds.StudyInstanceUID),
                                            search_filters={"SOPInstanceUID": str(ds.SOPInstanceUID)})
    except Exception as e:
        return f"stored, then could not be listed: {one_line(e, 120)}"
    return "" if found else "acknowledged by STOW-RS, yet QIDO-RS does not list it"


def store_segs(root_url: str, out_dir: Path, seg_paths: list[Path]) -> tuple[int, int]:
    """STOW-RS every SEG not stored before; (stored now, stored earlier). One failure stops it with
    one line; what was stored is recorded first, so `--resume --store` sends only the rest."""
    import pydicom

    m = _URL.match(root_url)
    client = _client(m["root"] if m else root_url)
    record = out_dir / ".lungrt-records" / STORED
    done = set(record.read_text().split()) if record.exists() else set()
    now = 0
    for path in seg_paths:
        ds = pydicom.dcmread(path)
        if ds.SOPInstanceUID in done:
            continue
        what = f"storing {path.name} (STOW-RS; {now} stored now, the rest after a rerun with --resume --store)"
        try:
            response = client.store_instances([ds])
        except Exception as e:
            raise _failure(root_url, what, e) from None
        refused = _refusal(response) or _not_listed(client, ds)
        if refused:
            raise LungrtError(f"{root_url}: {what}: the PACS refused it ({refused})")
        with open(record, "a") as f:
            f.write(ds.SOPInstanceUID + "\n")
        done.add(ds.SOPInstanceUID)
        now += 1
    return now, len(seg_paths) - now
