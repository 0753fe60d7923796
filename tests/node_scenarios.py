"""The DICOM node's scenario, run by tests/test_node.py inside a private network namespace that has only loopback
(Orthanc 1.10 cannot bind its DICOM port to 127.0.0.1 alone; in the namespace nothing else exists).

    python tests/node_scenarios.py CHECKPOINT WORK      -> WORK/node.json (what was seen), exit 0

A real Orthanc is the destination AE; `lungrt serve` runs as its own process (so SIGKILL is real); senders are
pynetdicom and DCMTK's storescu, concurrently. Facts only: the test decides what they must be.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lungrt.data.dicom import write_dicom  # noqa: E402
from lungrt.data.phantoms import make_phantom  # noqa: E402

NODE_AE, ORTHANC_AE = "LUNGRT", "ORTHANC"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_orthanc(home: Path, http: int, dicom: int) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "node-test", "StorageDirectory": str(home / "db"), "IndexDirectory": str(home / "db"),
        "HttpPort": http, "DicomServerEnabled": True, "DicomAet": ORTHANC_AE, "DicomPort": dicom,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True,
    }  # fmt: skip
    (home / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen(
        ["Orthanc", str(home / "orthanc.json")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http}/system", timeout=2).read()
            return proc
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("Orthanc did not start")


def dataset_digest(data: bytes) -> str:
    """SHA-256 of a DICOM file's dataset: what follows the File Meta group (which every writer writes its own)."""
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) group length first
    return hashlib.sha256(data[144 + int.from_bytes(data[140:144], "little") :]).hexdigest()


def orthanc_segs(http: int) -> list[dict]:
    """Every result instance Orthanc holds: its SOP Instance UID, the study it was filed in, its dataset's digest."""
    base = f"http://127.0.0.1:{http}"
    found = []
    for iid in json.loads(urllib.request.urlopen(f"{base}/instances", timeout=10).read()):
        tags = json.loads(urllib.request.urlopen(f"{base}/instances/{iid}/simplified-tags", timeout=10).read())
        kind = {"SEG": "SEG", "SR": "SR"}.get(tags.get("Modality"))
        if tags.get("SOPClassUID") == "1.2.840.10008.5.1.4.1.1.7":
            kind = "SC"
        if kind:
            stored = urllib.request.urlopen(f"{base}/instances/{iid}/file", timeout=10).read()
            found.append(
                {"sop": tags["SOPInstanceUID"], "study": tags["StudyInstanceUID"], "kind": kind,
                 "digest": dataset_digest(stored)}
            )  # fmt: skip
    return found


RESULT_KINDS = {
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.7": "SC",
    "1.2.840.10008.5.1.4.1.1.88.34": "SR",
}


def real_chest_cr(folder: Path) -> Path:
    """pydicom-data's real chest CR (RG1, JPEG 2000 lossless; the test set-up installs the package)."""
    import data_store

    folder.mkdir(parents=True)
    return Path(shutil.copy(Path(data_store.__file__).parent / "data" / "RG1_J2KR.dcm", folder / "RG1_J2KR.dcm"))


def study_of(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def keep_orthanc_copies(http: int, study: str, folder: Path) -> None:
    """The files Orthanc stored for `study`'s results, as a PACS would hand them to a viewer."""
    base = f"http://127.0.0.1:{http}"
    folder.mkdir()
    for iid in json.loads(urllib.request.urlopen(f"{base}/instances", timeout=10).read()):
        tags = json.loads(urllib.request.urlopen(f"{base}/instances/{iid}/simplified-tags", timeout=10).read())
        kind = RESULT_KINDS.get(tags.get("SOPClassUID"))
        if tags.get("StudyInstanceUID") == study and kind:
            data = urllib.request.urlopen(f"{base}/instances/{iid}/file", timeout=10).read()
            (folder / f"{kind}-{iid}.dcm").write_bytes(data)


def make_study(
    folder: Path, films: int, seed: int, body_part: str = "CHEST", syntax: str = "explicit-le"
) -> tuple[str, list[Path]]:
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(films):
        path = folder / f"film_{seed}_{i}.dcm"
        pixels = (make_phantom(seed * 10 + i, 128).image * 4000).astype(np.uint16)
        write_dicom(path, pixels, syntax, study_uid=study, series_uid=series, body_part=body_part)
        paths.append(path)
    return study, paths


def send_pynetdicom(files: list[Path], port: int, calling: str) -> list[int]:
    from pydicom import dcmread
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    datasets = [dcmread(f) for f in files]
    # each film offered in its own transfer syntax only, as a modality that compresses does
    for sop_class, syntax in dict.fromkeys((ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets):
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established, f"{calling}: association not established"
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def send_storescu(files: list[Path], port: int) -> int:
    # -xv: JPEG 2000 lossless besides the uncompressed syntaxes (the real CR is stored so; storescu sends it as is)
    cmd = ["storescu", "-xv", "-aet", "STORESCU", "-aec", NODE_AE, "127.0.0.1", str(port), *map(str, files)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if res.returncode:
        print("storescu:", res.stdout[-2000:], res.stderr[-2000:], file=sys.stderr)
    return res.returncode


def start_node(ckpt: str, spool: Path, port: int, orthanc_dicom: int) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "lungrt.cli", "serve", "--spool", str(spool), "--port", str(port),
        "--allow", "SENDER1", "--allow", "STORESCU", "--to", f"{ORTHANC_AE}@127.0.0.1:{orthanc_dicom}",
        "--model", ckpt, "--backend", "torch", "--batch-size", "2", "--quiet-seconds", "1.0", "--send-flagged",
        "--secondary-capture", "--sr",
    ]  # fmt: skip
    log = open(spool.parent / f"node-{time.time():.0f}.log", "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 90
    while time.time() < deadline:  # listening once a C-ECHO from an allowed AE succeeds
        if echo(port, "SENDER1") == "ok":
            return proc
        time.sleep(0.5)
    raise RuntimeError("the node did not start listening")


def echo(port: int, calling: str) -> str:
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if assoc.is_rejected:
        return "rejected"
    if not assoc.is_established:
        return "no answer"
    status = assoc.send_c_echo()
    assoc.release()
    return "ok" if status and status.Status == 0 else "failed"


def answered(spool: Path) -> list[dict]:
    path = spool / "studies.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def wait_for(predicate, seconds: float = 120.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def main(ckpt: str, work: Path) -> None:
    facts: dict = {}
    spool, films = work / "spool", work / "films"
    spool.mkdir(parents=True)
    http, dicom, node_port = free_port(), free_port(), free_port()
    orthanc = start_orthanc(work / "orthanc", http, dicom)
    node = start_node(ckpt, spool, node_port, dicom)
    facts["unknown_ae"] = echo(node_port, "INTRUDER")
    facts["allowed_echo"] = echo(node_port, "SENDER1")

    # two senders at once, two studies each; one study that header screening refuses (a knee)
    studies = {f"s{i}": make_study(films / f"s{i}", 2, i, syntax="rle" if i == 1 else "explicit-le") for i in range(4)}
    knee_uid, knee_files = make_study(films / "knee", 1, 9, body_part="KNEE")
    t = threading.Thread(target=lambda: facts.setdefault("pynetdicom_status", send_pynetdicom(
        studies["s0"][1] + studies["s1"][1] + knee_files, node_port, "SENDER1")))  # fmt: skip
    t.start()
    real = real_chest_cr(films / "real")  # a vendor's chest CR in JPEG 2000, as storescu finds it on disk
    facts["storescu_rc"] = send_storescu(studies["s2"][1] + studies["s3"][1] + [real], node_port)
    t.join()
    facts["first_round_answered"] = wait_for(lambda: len(answered(spool)) >= 6)
    facts["segs_after_first_round"] = orthanc_segs(http)
    facts["study_uids"] = {k: v[0] for k, v in studies.items()} | {"knee": knee_uid, "real": study_of(real)}

    # killed with SIGKILL right after a study arrives, restarted on the same spool
    kill_uid, kill_files = make_study(films / "killed", 3, 20)
    facts["killed_send_status"] = send_pynetdicom(kill_files, node_port, "SENDER1")
    node.send_signal(signal.SIGKILL)
    node.wait(timeout=30)
    node = start_node(ckpt, spool, node_port, dicom)
    facts["killed_answered"] = wait_for(lambda: any(a["study"] == kill_uid for a in answered(spool)))
    facts["killed_uid"] = kill_uid

    # the destination down for a while: retried until it is back
    orthanc.terminate()
    orthanc.wait(timeout=30)
    down_uid, down_files = make_study(films / "down", 2, 30)
    facts["down_send_status"] = send_pynetdicom(down_files, node_port, "SENDER1")
    facts["retried_while_down"] = wait_for(
        lambda: json.loads((spool / "status.json").read_text()).get("send_failures", 0) > 0, 60
    )
    orthanc = start_orthanc(work / "orthanc", http, dicom)
    facts["down_answered"] = wait_for(lambda: any(a["study"] == down_uid for a in answered(spool)))
    facts["down_uid"] = down_uid
    facts["segs"] = orthanc_segs(http)
    keep_orthanc_copies(http, facts["study_uids"]["real"], work / "real-from-orthanc")  # for dciodvfy
    sent = [json.loads(x) for x in (spool / "sent.jsonl").read_text().splitlines()]
    facts["sent_lines"], facts["sent_unique"] = len(sent), len({(s["destination"], s["file"]) for s in sent})
    results = [p for p in (spool / "results").rglob("*.dcm") if p.name.endswith((".seg.dcm", ".sc.dcm", ".sr.dcm"))]
    facts["spool_digests"] = sorted(dataset_digest(p.read_bytes()) for p in results)

    node.send_signal(signal.SIGTERM)
    facts["sigterm_exit"] = node.wait(timeout=60)
    facts["status"] = json.loads((spool / "status.json").read_text())
    facts["answered"] = answered(spool)
    orthanc.terminate()
    orthanc.wait(timeout=30)
    (work / "node.json").write_text(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
