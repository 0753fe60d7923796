"""`lungrt infer --dicom-seg` over real DICOM files nobody here wrote (tests/real_dicom.py): every file one
row and no traceback, a SEG only for chest films the header vouches for, and every SEG read back by
radiology's tools (dciodvfy, highdicom's reader) with frames equal to the mask PNG, the patient's right lung first."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lungrt.cli import app
from lungrt.data.io import read_mask
from tests.real_dicom import pydicom_data_folder, write_corpus

pytestmark = pytest.mark.skipif(pydicom_data_folder() is None, reason="pip install pydicom-data (the test set-up does)")
runner = CliRunner()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("real-dicom"))


def _infer_corpus(corpus: Path, out: Path, checkpoint: Path, *extra: str):
    args = ["infer", str(corpus), "--out", str(out), "--dicom-seg", "--model", str(checkpoint), "--backend", "torch"]
    return runner.invoke(app, [*args, "--batch-size", "4", *extra])


@pytest.fixture(scope="module")
def corpus_run(corpus, tmp_path_factory, tiny_checkpoint):
    out = tmp_path_factory.mktemp("real-dicom-out")
    res = _infer_corpus(corpus, out, tiny_checkpoint)
    rows = (
        {Path(r["path"]).name: r for r in csv.DictReader(open(out / "results.csv"))}
        if (out / "results.csv").exists()
        else {}
    )
    return res, out, rows


def _files(corpus: Path) -> list[Path]:
    return sorted(p for p in corpus.rglob("*") if p.is_file())


def test_every_real_file_gets_one_row_and_none_stops_the_run(corpus, corpus_run):
    res, out, rows = corpus_run
    assert "Traceback" not in res.output, res.output[-3000:]
    assert res.exit_code == 3, res.output[-2000:]  # some real files are damaged on purpose: their rows say so
    assert set(rows) == {p.name for p in _files(corpus)}
    for name, row in rows.items():
        assert row["status"] in ("ok", "error", "skipped"), name
        if row["status"] == "error":
            assert row["error"] and "\n" not in row["error"], name


def test_objects_that_are_not_radiographs_are_skipped_not_failed(corpus_run):
    _, _, rows = corpus_run
    for name in ("rtplan.dcm", "test-SR.dcm", "reportsi.dcm", "emri_small.dcm"):  # RT plan, two SRs, a multi-frame MR
        assert rows[name]["status"] == "skipped" and rows[name]["qc"] == "not_a_radiograph", rows[name]
        assert rows[name]["note"].startswith("not a radiograph"), rows[name]


def test_a_seg_only_for_films_the_header_calls_frontal_chests(corpus_run):
    _, out, rows = corpus_run
    with_seg = {name for name, r in rows.items() if r["dicom_seg"].endswith(".seg.dcm")}
    assert {"RG1_UNCR.dcm", "RG1_J2KR.dcm", "no_part10_header.dcm", "CR.1.2.840.99.5457.1"} <= with_seg
    for name in ("RG3_UNCR.dcm", "CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm", "SC_jpeg_no_color_transform.dcm"):
        row = rows[name]
        assert row["status"] == "ok" and row["mask"], row  # the mask is written (and flagged) ...
        assert row["dicom_seg"].startswith("no SEG: header screening"), row  # ... the lung SEG is not
    assert all(
        rows[n].get("dicom_seg", "").endswith(".seg.dcm")
        or rows[n]["status"] != "ok"
        or rows[n]["dicom_seg"].startswith("no SEG")
        for n in rows
    )


def test_real_archive_quirks(corpus_run):
    _, out, rows = corpus_run
    assert rows["no_part10_header.dcm"]["status"] == "ok"  # no preamble / File Meta: read as pydicom can
    assert [p.name for p in out.rglob("CR.1.2.840.99.5457.*.png")] == ["CR.1.2.840.99.5457.1.mask.png"]  # whole UID
    for bad in ("spacing_nan.dcm", "spacing_negative.dcm", "RG1_UNCR.dcm"):  # NaN, negative, 0\0: no spacing
        assert rows[bad]["status"] == "ok" and rows[bad]["right_lung_mm2"] == "", rows[bad]
    assert float(rows["spacing_valid.dcm"]["right_lung_mm2"]) > 0
    assert rows["private_sequence.dcm"]["status"] == "ok"
    assert rows["rows_lie.dcm"]["status"] == "error" and "rows_lie" not in rows["rows_lie.dcm"]["error"]


def _segs(out: Path) -> list[Path]:
    segs = sorted(out.rglob("*.seg.dcm"))
    assert len(segs) >= 8
    return segs


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="apt-get install dicom3tools")
def test_every_seg_passes_dciodvfy(corpus_run):
    for seg in _segs(corpus_run[1]):
        res = subprocess.run(["dciodvfy", str(seg)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
        assert not errors, (seg.name, errors)


def test_every_seg_reads_back_with_highdicom_as_the_mask(corpus_run):
    import highdicom as hd

    for path in _segs(corpus_run[1]):
        seg = hd.seg.segread(path)
        labels = [seg.get_segment_description(n).SegmentLabel for n in seg.get_segment_numbers()]
        assert labels == ["Right lung structure", "Left lung structure"], (path.name, labels)
        frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
        assert np.array_equal(frames.max(axis=0) > 0, read_mask(str(path).replace(".seg.dcm", ".mask.png")) > 0), (
            path.name
        )
        assert seg.ContentDescription.startswith(("QC ok", "QC flagged: ")) and "lung" in seg.SeriesDescription


def test_dcmqi_cannot_take_a_projection_radiograph_seg_by_design(corpus_run, tmp_path):
    """Evidence for the README: dcmqi (3D Slicer's SEG route) builds a 3-D volume and needs the plane
    orientation that a CR/DX without a frame of reference does not have. This fails once dcmqi learns 2-D."""
    tool = shutil.which("segimage2itkimage") or str(Path(__import__("sys").executable).parent / "segimage2itkimage")
    if not Path(tool).exists():
        pytest.skip("pip install dcmqi")
    seg = _segs(corpus_run[1])[0]
    res = subprocess.run(
        [tool, "--inputDICOM", str(seg), "--outputDirectory", str(tmp_path), "-t", "nrrd"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Plane Orientation (Patient) is missing" in res.stdout + res.stderr
    assert not list(tmp_path.iterdir())


def test_resume_after_damaged_files_finishes(corpus, corpus_run, tiny_checkpoint):
    _, out, rows = corpus_run
    res = _infer_corpus(corpus, out, tiny_checkpoint, "--resume")
    assert "Traceback" not in res.output and res.exit_code == 3, res.output[-2000:]
    done = sum(r["status"] in ("ok", "skipped") for r in rows.values())
    assert f"{done} already done" in res.output


def test_a_seg_that_cannot_be_encoded_keeps_the_mask_and_the_run(corpus, tmp_path, tiny_checkpoint, monkeypatch):
    """A FAKE encoder failure (glue): the film's mask stands, its row names why it has no SEG, the run goes on."""
    import lungrt.inference.dicom_seg as dicom_seg

    def refuse(*args, **kwargs):
        raise ValueError("Cannot encode non-finite floats")

    monkeypatch.setattr(dicom_seg, "segmentation_bytes", refuse)
    films = [str(corpus / "real" / "RG1_UNCR.dcm"), str(corpus / "edited" / "spacing_valid.dcm")]
    res = runner.invoke(
        app,
        ["infer", *films, "--out", str(tmp_path), "--dicom-seg", "--model", str(tiny_checkpoint), "--backend", "torch"],
    )
    assert res.exit_code == 0 and "2 ok" in res.output, res.output
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert all(
        r["status"] == "ok" and r["dicom_seg"] == "no SEG: ValueError: Cannot encode non-finite floats" for r in rows
    )
    assert len(list(tmp_path.rglob("*.mask.png"))) == 2 and not list(tmp_path.rglob("*.seg.dcm"))
