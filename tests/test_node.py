"""`lungrt serve`, the DICOM node, against things nobody here wrote: a real Orthanc as the destination AE, DCMTK's
storescu and pynetdicom as senders, all on loopback inside a private network namespace (tests/node_scenarios.py).
Every study is answered exactly once with the SEGs `lungrt infer` makes of the same files (one study offered in
RLE Lossless only, as a compressing modality sends it); an unknown calling AE
is refused; a knee gets no SEG; SIGKILL mid-stream and a destination that is down lose nothing and send nothing
twice; SIGTERM stops it cleanly."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lungrt.cli import app

pytest.importorskip("pynetdicom", reason="pip install 'lungrt[dicom]'")
SCENARIO = Path(__file__).with_name("node_scenarios.py")
LOOPBACK_ONLY = 'ip link set lo up && exec "$@"'
pytestmark = pytest.mark.skipif(
    not (shutil.which("Orthanc") and shutil.which("storescu") and shutil.which("unshare")),
    reason="needs Orthanc, DCMTK (storescu) and unshare: apt-get install orthanc dcmtk util-linux",
)


@pytest.fixture(scope="module")
def node_run(tmp_path_factory, tiny_checkpoint):
    work = tmp_path_factory.mktemp("node")
    cmd = ["unshare", "--net", "--", "sh", "-c", LOOPBACK_ONLY, "sh", sys.executable, str(SCENARIO)]
    res = subprocess.run([*cmd, str(tiny_checkpoint), str(work)], capture_output=True, text=True, timeout=500)
    if res.returncode and "unshare failed" in res.stderr:
        pytest.skip(f"cannot make a private network namespace: {res.stderr.strip()[-300:]}")
    logs = "".join(p.read_text()[-1500:] for p in work.glob("node-*.log"))
    assert res.returncode == 0, res.stderr[-3000:] + logs
    return work, json.loads((work / "node.json").read_text())


def test_unknown_calling_ae_is_refused_and_echo_answers(node_run):
    _, facts = node_run
    assert facts["unknown_ae"] == "rejected" and facts["allowed_echo"] == "ok"


def test_every_study_answered_once_with_one_seg_per_chest_film(node_run):
    _, facts = node_run
    assert facts["storescu_rc"] == 0 and set(facts["pynetdicom_status"]) == {0}
    assert facts["first_round_answered"] and facts["killed_answered"] and facts["down_answered"]
    studies = [a["study"] for a in facts["answered"]]
    assert len(studies) == len(set(studies)) == 8  # 4, knee, a real CR, killed one, one sent while PACS was down
    per_study, captures, reports = {}, {}, {}
    for seg in facts["segs"]:
        counts = {"SEG": per_study, "SC": captures, "SR": reports}[seg["kind"]]
        counts[seg["study"]] = counts.get(seg["study"], 0) + 1
    uids = facts["study_uids"]
    expected = {
        uids["s0"]: 2,
        uids["s1"]: 2,
        uids["s2"]: 2,
        uids["s3"]: 2,
        facts["killed_uid"]: 3,
        facts["down_uid"]: 2,
        uids["real"]: 1,  # the vendor's chest CR, received in JPEG 2000
    }
    assert per_study == expected  # the knee's study got nothing: header screening refuses a lung SEG
    assert captures == expected  # and one Secondary Capture with the outline per film that got a SEG
    assert reports == {**expected, uids["knee"]: 1}  # an SR per film: the knee's says why it got no SEG
    assert len({s["sop"] for s in facts["segs"]}) == len(facts["segs"])
    assert facts["sent_lines"] == facts["sent_unique"] == 43  # nothing sent twice, SIGKILL and the outage included
    # what Orthanc stored is what the node wrote, byte for byte after the file meta (sent as stored, not re-encoded)
    assert sorted(seg["digest"] for seg in facts["segs"]) == facts["spool_digests"]


def test_the_node_segments_as_lungrt_infer_does(node_run, tiny_checkpoint):
    """Masks byte for byte and the SEGs' UIDs: the node is `lungrt infer` behind a DICOM port."""
    import pydicom

    work, facts = node_run
    res = CliRunner().invoke(
        app,
        ["infer", str(work / "spool" / "incoming"), "--out", str(work / "infer"), "--model", str(tiny_checkpoint),
         "--backend", "torch", "--batch-size", "2", "--dicom-seg"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    node_masks = {
        p.relative_to(work / "spool" / "results"): p.read_bytes()
        for p in (work / "spool" / "results").rglob("*.mask.png")
    }
    infer_masks = {
        p.relative_to(work / "infer" / "incoming"): p.read_bytes() for p in (work / "infer").rglob("*.mask.png")
    }
    assert node_masks and node_masks == infer_masks
    with open(work / "spool" / "results" / "results.csv", newline="") as f:  # every film of every round
        assert len(list(csv.DictReader(f))) == 15
    infer_segs = {pydicom.dcmread(p).SOPInstanceUID for p in (work / "infer").rglob("*.seg.dcm")}
    assert infer_segs == {s["sop"] for s in facts["segs"] if s["kind"] == "SEG"}


@pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dciodvfy not installed: apt-get install dicom3tools")
def test_what_orthanc_holds_for_a_real_chest_cr_passes_dciodvfy(node_run):
    """The SEG, Secondary Capture and SR of a vendor's film as the PACS stored them: valid IODs (dciodvfy)."""
    work, _ = node_run
    kept = sorted((work / "real-from-orthanc").glob("*.dcm"))
    assert sorted(p.name.split("-")[0] for p in kept) == ["SC", "SEG", "SR"], kept
    for path in kept:
        res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
        errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
        assert not errors, (path.name, errors)


def test_what_orthanc_holds_for_a_real_chest_cr_reads_back_with_highdicom_as_the_mask(node_run):
    """highdicom reads Orthanc's SEG as the node's mask of that film, and its SR as the areas results.csv holds."""
    import highdicom as hd
    import numpy as np

    from lungrt.data.io import read_mask

    work, facts = node_run
    kept = {p.name.split("-")[0]: p for p in (work / "real-from-orthanc").glob("*.dcm")}
    seg = hd.seg.segread(kept["SEG"])
    labels = [seg.get_segment_description(n).SegmentLabel for n in seg.get_segment_numbers()]
    assert labels == ["Right lung structure", "Left lung structure"]
    [(study, _, sop)] = seg.get_source_image_uids()  # the vendor's film, by its own UIDs
    assert study == facts["study_uids"]["real"]
    [mask] = (work / "spool" / "results").glob(f"*/{sop}.mask.png")
    assert np.array_equal(seg.pixel_array.reshape(-1, seg.Rows, seg.Columns).max(axis=0) > 0, read_mask(mask) > 0)
    with open(work / "spool" / "results" / "results.csv", newline="") as f:
        [row] = [r for r in csv.DictReader(f) if r["path"].endswith(f"{sop}.dcm")]
    groups = hd.sr.srread(kept["SR"]).content.get_image_measurement_groups()
    areas = {g.finding_type.meaning: [m.value for m in g.get_measurements()] for g in groups}
    expected = {"Right lung structure": row["right_lung_mm2"], "Left lung structure": row["left_lung_mm2"]}
    assert areas == {k: [float(v)] if v else [] for k, v in expected.items()}  # RG1: no usable spacing, no area


def test_sigterm_stops_cleanly_with_a_status(node_run):
    _, facts = node_run
    status = facts["status"]
    assert facts["sigterm_exit"] == 0
    assert status["studies_answered"] == 8 and status["queued"] == 0 and status["send_failures"] >= 1
    assert status["latency_s_p50"] is not None and status["latency_s_p99"] >= status["latency_s_p50"]


def test_a_full_queue_answers_out_of_resources_and_drops_nothing(tmp_path):
    """Backpressure: past `max_queued` waiting films a C-STORE is answered A700 (the sender keeps the film and
    retries); what was acknowledged is on disk. In-process, loopback; a named fake runner (nothing is segmented)."""
    import socket

    from pydicom import dcmread
    from pynetdicom import AE

    from lungrt.data.dicom import write_dicom
    from lungrt.data.phantoms import make_phantom
    from lungrt.inference.node import DicomNode, NodeConfig

    class FakeRunnerNeverRun:
        info = spec = None

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = DicomNode(
        FakeRunnerNeverRun(), NodeConfig(tmp_path / "spool", port=port, allowed_callers=("PACS",), max_queued=2)
    )
    node.start()
    try:
        films = []
        for i in range(3):
            films.append(tmp_path / f"f{i}.dcm")
            write_dicom(films[-1], (make_phantom(i, 64).image * 4000).astype("uint16"))
        ae = AE(ae_title="PACS")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="LUNGRT")
        statuses = [int(assoc.send_c_store(dcmread(f)).Status) for f in films]
        assoc.release()
    finally:
        node.server.shutdown()
    assert statuses == [0x0000, 0x0000, 0xA700]
    kept = sorted(p.name for p in (tmp_path / "spool" / "incoming").rglob("*.dcm"))
    assert kept == sorted(f"{dcmread(f).SOPInstanceUID}.dcm" for f in films[:2])
    assert node.status()["refused"] == 1 and node.status()["queued"] == 2
    node.config.max_queued, node.config.min_free_mb = 100, 10**12  # a disk with less free than asked: refused too
    node.start()
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="LUNGRT")
        status = int(assoc.send_c_store(dcmread(films[2])).Status)
        assoc.release()
    finally:
        node.server.shutdown()
    assert status == 0xA700 and node.status()["refused"] == 2 and node.status()["queued"] == 2
