"""A real PACS round trip: Orthanc with its DICOMweb plugin, started by the test on a free port with a
throw-away config and storage folder (DICOM port off, remote access refused), then stopped.
`lungrt infer http://…/studies/UID --store` fetches the study, segments it and stores DICOM SEGs
back over STOW-RS; a resumed run stores nothing twice; an unreachable PACS and an unknown study
are one line each."""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lungrt.cli import app
from lungrt.data.dicom import write_dicom
from lungrt.data.io import read_mask
from lungrt.data.phantoms import make_phantom

runner = CliRunner()
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
pytestmark = pytest.mark.skipif(
    not (shutil.which("Orthanc") and DICOMWEB_PLUGIN.exists()),
    reason="Orthanc not installed: apt-get install orthanc orthanc-dicomweb",
)


# a PACS that refuses some instances: SEGs of patient REFUSE-SEG (a failing STOW-RS, for real)
REFUSE_SEGS = """
function ReceivedInstanceFilter(dicom, origin, info)
  return not (dicom.Modality == 'SEG' and dicom.PatientID == 'REFUSE-SEG')
end
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    yield from _orthanc(tmp_path_factory)


@pytest.fixture(scope="module")
def orthanc2(tmp_path_factory):
    """A second PACS: SEGs must go back to the one their film came from."""
    yield from _orthanc(tmp_path_factory)


def _orthanc(tmp_path_factory):
    pytest.importorskip("dicomweb_client", reason="pip install 'lungrt[dicom]'")
    home = tmp_path_factory.mktemp("orthanc")
    port = _free_port()
    config = {
        "Name": "lungrt-test",
        "StorageDirectory": str(home / "db"),
        "IndexDirectory": str(home / "db"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "LuaScripts": [str(home / "refuse.lua")],
    }
    (home / "orthanc.json").write_text(json.dumps(config))
    (home / "refuse.lua").write_text(REFUSE_SEGS)
    proc = subprocess.Popen(
        ["Orthanc", str(home / "orthanc.json")], stdout=subprocess.DEVNULL, stderr=open(home / "orthanc.log", "w")
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{base}/system", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"Orthanc exited: {(home / 'orthanc.log').read_text()[-1500:]}")
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("Orthanc did not answer within 60 s")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def _upload_study(base: str, folder: Path, n: int = 3, patient: str | None = None) -> str:
    import pydicom
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"cxr_{i}.dcm"
        write_dicom(
            path,
            (make_phantom(40 + i, 128).image * 4000).astype(np.uint16),
            "rle" if i else "explicit-le",
            study_uid=study,
            series_uid=series,
        )
        if patient:
            ds = pydicom.dcmread(path)
            ds.PatientID = patient
            ds.save_as(path)
        req = urllib.request.Request(
            f"{base}/instances", data=path.read_bytes(), method="POST", headers={"Content-Type": "application/dicom"}
        )
        assert json.loads(urllib.request.urlopen(req, timeout=30).read())["Status"] == "Success"
    return study


def _infer(*args: str):
    return runner.invoke(app, ["infer", *args])


def test_a_study_from_the_pacs_comes_back_as_dicom_seg(orthanc, tmp_path, tiny_checkpoint):
    from dicomweb_client.api import DICOMwebClient

    study = _upload_study(orthanc, tmp_path)
    url = f"{orthanc}/dicom-web/studies/{study}"
    out = tmp_path / "out"
    common = ["--out", str(out), "--model", str(tiny_checkpoint), "--backend", "torch", "--batch-size", "2"]
    held = _infer(url, "--out", str(tmp_path / "held"), *common[2:], "--store")  # the tiny model's films are QC flagged
    assert held.exit_code == 0 and "3 SEG(s) of QC-flagged films kept local" in held.output, held.output
    assert "stored 0 DICOM SEG instances" in held.output
    res = _infer(url, *common, "--store", "--store-flagged")
    assert res.exit_code == 0, res.output
    assert f"stored 3 DICOM SEG instances on {orthanc}/dicom-web (study {study})" in res.output

    client = DICOMwebClient(url=f"{orthanc}/dicom-web")
    segs = client.search_for_instances(study_instance_uid=study, search_filters={"Modality": "SEG"})
    assert len(segs) == 3
    sources = {
        e["00080018"]["Value"][0]
        for e in client.search_for_instances(study_instance_uid=study, search_filters={"Modality": "DX"})
    }
    for entry in segs:
        seg = client.retrieve_instance(study, entry["0020000E"]["Value"][0], entry["00080018"]["Value"][0])
        source = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        assert source in sources
        local = next(out.rglob(f"{source}.mask.png"))  # the same pipeline's mask, from the fetched file
        frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
        assert np.array_equal(frames.max(axis=0) > 0, read_mask(local) > 0)

    again = _infer(url, *common, "--store", "--store-flagged", "--resume")
    assert again.exit_code == 0, again.output
    assert "3 already done" in again.output and "stored 0 DICOM SEG instances" in again.output
    assert "(3 stored by an earlier run)" in again.output
    assert len(client.search_for_instances(study_instance_uid=study, search_filters={"Modality": "SEG"})) == 3


def test_pacs_unreachable_and_unknown_study_are_one_line(orthanc, tmp_path, tiny_checkpoint):
    from pydicom.uid import generate_uid

    common = ["--model", str(tiny_checkpoint), "--backend", "torch"]
    closed = f"http://127.0.0.1:{_free_port()}/dicom-web/studies/{generate_uid()}"
    res = _infer(closed, "--out", str(tmp_path / "a"), *common)
    assert res.exit_code == 2 and "PACS unreachable" in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    unknown = f"{orthanc}/dicom-web/studies/{generate_uid()}"
    res = _infer(unknown, "--out", str(tmp_path / "b"), *common)
    assert res.exit_code == 2 and ("no instances" in res.output or "not found" in res.output), res.output
    assert len(res.output.strip().splitlines()) == 1


def test_store_needs_a_pacs_input(tmp_path, tiny_checkpoint):
    res = _infer(str(tmp_path), "--out", str(tmp_path / "o"), "--model", str(tiny_checkpoint), "--store")
    assert res.exit_code == 2 and "DICOMweb input" in res.output


def test_a_refused_stow_is_one_line_and_keeps_the_local_outputs(orthanc, tmp_path, tiny_checkpoint):
    study = _upload_study(orthanc, tmp_path, n=2, patient="REFUSE-SEG")
    url = f"{orthanc}/dicom-web/studies/{study}"
    out = tmp_path / "out"
    common = ["--out", str(out), "--model", str(tiny_checkpoint), "--backend", "torch"]
    res = _infer(url, *common, "--store", "--store-flagged")
    assert res.exit_code == 2 and "the PACS refused it" in res.output and "Traceback" not in res.output, res.output
    assert "0 stored now" in res.output
    assert len(list(out.rglob("*.mask.png"))) == 2 and len(list(out.rglob("*.seg.dcm"))) == 2
    assert (out / "results.csv").exists()
    again = _infer(url, *common, "--dicom-seg", "--resume")  # the local run is complete; nothing redone
    assert again.exit_code == 0 and "2 already done" in again.output, again.output


def _file_into_study(base: str, folder: Path, study: str, patient: str) -> None:
    """Real non-chest films (pydicom's CT slice, pydicom-data's extremity CR) filed into `study`: they must get no
    lung SEG, and nothing of theirs may be stored."""
    import pydicom

    from tests.real_dicom import bundled_folder, pydicom_data_folder

    sources = [bundled_folder() / "CT_small.dcm"] + (
        [pydicom_data_folder() / "RG3_UNCR.dcm"] if pydicom_data_folder() else []
    )
    for path in sources:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.PatientID = study, patient
        out = folder / f"nonchest_{path.name}"
        ds.save_as(out, enforce_file_format=True)
        req = urllib.request.Request(
            f"{base}/instances", data=out.read_bytes(), method="POST", headers={"Content-Type": "application/dicom"}
        )
        assert json.loads(urllib.request.urlopen(req, timeout=30).read())["Status"] == "Success"


def _seg_patients(base: str) -> list[str]:
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=f"{base}/dicom-web")
    return sorted(
        e["00100020"]["Value"][0]
        for e in client.search_for_instances(search_filters={"Modality": "SEG"}, fields=["PatientID"])
    )


def test_each_seg_goes_back_to_its_own_pacs_and_never_a_local_ones(orthanc, orthanc2, tmp_path, tiny_checkpoint):
    """Two PACS and local films in one run: each PACS gets exactly its own study's SEGs; a local film's SEG
    (another patient) is written locally and stored nowhere; outputs of the two kinds never nest."""
    from tests.real_dicom import chest_cr

    study_a = _upload_study(orthanc, tmp_path / "a", n=2, patient="PACS-A")
    study_b = _upload_study(orthanc2, tmp_path / "b", n=1, patient="PACS-B")
    local = tmp_path / "local"
    local.mkdir()
    write_dicom(local / "local_dx.dcm", (make_phantom(7, 128).image * 4000).astype(np.uint16))
    shutil.copy(chest_cr(), local / "real_chest_cr.dcm")
    _file_into_study(orthanc, tmp_path / "a", study_a, "PACS-A")  # a CT slice and an extremity CR in the same study
    before_a, before_b = _seg_patients(orthanc), _seg_patients(orthanc2)
    out = tmp_path / "out"
    res = _infer(
        f"{orthanc}/dicom-web/studies/{study_a}",
        f"{orthanc2}/dicom-web/studies/{study_b}",
        str(local),
        "--out",
        str(out),
        "--model",
        str(tiny_checkpoint),
        "--backend",
        "torch",
        "--store",
        "--store-flagged",
    )
    assert res.exit_code == 0, res.output
    assert _seg_patients(orthanc) == sorted(before_a + ["PACS-A"] * 2)  # the two DX films only: no CT, no extremity
    assert _seg_patients(orthanc2) == sorted(before_b + ["PACS-B"])
    assert len(list((out / "local").glob("*.seg.dcm"))) == 2  # written, never stored
    rows = list(csv.DictReader(open(out / "results.csv")))
    screened = [r for r in rows if r["dicom_seg"].startswith("no SEG: header screening")]
    assert len(screened) == 2 and all(r["status"] == "ok" for r in screened)  # masked and flagged, no SEG
    tag = lambda base: "pacs_" + base.removeprefix("http://").replace(":", "_") + "_dicom-web"  # noqa: E731
    assert len(list((out / tag(orthanc) / study_a).rglob("*.seg.dcm"))) == 2
    assert len(list((out / tag(orthanc2) / study_b).rglob("*.seg.dcm"))) == 1
    assert not [p for p in out.rglob("*.mask.png") if str(tmp_path).lstrip("/") in str(p.relative_to(out))]


def _study_with_derived_objects(base: str, folder: Path) -> str:
    """A chest study that already holds a SEG, an SR and a presentation state (real files, re-filed into it)."""
    import pydicom

    from tests.real_dicom import bundled_folder, pydicom_data_folder

    if pydicom_data_folder() is None:
        pytest.skip("pip install pydicom-data")
    study = _upload_study(base, folder, n=1, patient="HAS-DERIVED")
    seg = pydicom_data_folder() / "liver.dcm"  # a real multi-frame SEG
    for path in (seg, bundled_folder() / "reportsi.dcm"):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.PatientID = study, "HAS-DERIVED"
        buf = folder / f"derived_{path.name}"
        ds.save_as(buf, enforce_file_format=True)
        req = urllib.request.Request(
            f"{base}/instances", data=buf.read_bytes(), method="POST", headers={"Content-Type": "application/dicom"}
        )
        assert json.loads(urllib.request.urlopen(req, timeout=30).read())["Status"] == "Success"
    return study


def test_a_study_that_already_holds_a_seg_and_an_sr_runs_clean(orthanc, tmp_path, tiny_checkpoint):
    """Received whole into a folder (as C-MOVE / storescp leave it) or over DICOMweb: its film is segmented, its
    SEG and SR are skipped with a reason, and the run exits 0."""
    study = _study_with_derived_objects(orthanc, tmp_path / "upload")
    received = tmp_path / "received"
    received.mkdir()
    ids = json.loads(urllib.request.urlopen(f"{orthanc}/tools/lookup", data=study.encode(), timeout=30).read())
    for instance in json.loads(
        urllib.request.urlopen(f"{orthanc}/studies/{ids[0]['ID']}/instances", timeout=30).read()
    ):
        data = urllib.request.urlopen(f"{orthanc}/instances/{instance['ID']}/file", timeout=30).read()
        (received / f"{instance['MainDicomTags']['SOPInstanceUID']}").write_bytes(data)  # storescp-like: no suffix
    common = ["--model", str(tiny_checkpoint), "--backend", "torch", "--dicom-seg"]
    res = _infer(str(received), "--out", str(tmp_path / "o1"), *common)
    assert res.exit_code == 0 and "1 ok" in res.output and "2 not radiographs" in res.output, res.output
    rows = list(csv.DictReader(open(tmp_path / "o1" / "results.csv")))
    assert sorted(r["status"] for r in rows) == ["ok", "skipped", "skipped"]
    res = _infer(f"{orthanc}/dicom-web/studies/{study}", "--out", str(tmp_path / "o2"), *common)
    assert res.exit_code == 0 and "1 ok" in res.output, res.output
