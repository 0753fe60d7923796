"""Clinical DICOM: every common transfer syntax decodes (lossless ones to the very masks of the
uncompressed file), a syntax without a decoder is one line with the pip command, the header screens
out what is not a frontal chest film, touching lungs are split, and `--dicom-seg` writes DICOM
Segmentations that dciodvfy (dicom3tools) finds no error in and that reference their sources."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lungrt.cli import app
from lungrt.core.errors import ImageReadError
from lungrt.data.dicom import SYNTAXES, write_dicom
from lungrt.data.io import read_xray
from lungrt.data.phantoms import make_phantom

runner = CliRunner()
ENCODED_HERE = [k for k in SYNTAXES if k != "jpeg-extended"]  # nothing here encodes 12-bit lossy JPEG


def _phantom16(seed: int = 2, size: int = 128) -> np.ndarray:
    return (make_phantom(seed, size).image * 4000).astype(np.uint16)


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "results.csv", encoding="utf-8") as f:
        return {Path(r["path"]).stem: r for r in csv.DictReader(f)}


def _infer(src: Path, out: Path, ckpt: Path, *extra: str):
    res = runner.invoke(
        app,
        ["infer", str(src), "--out", str(out), "--model", str(ckpt), "--backend", "torch", "--batch-size", "4", *extra],
    )
    assert res.exit_code in (0, 3), res.output
    return res


@pytest.fixture(scope="module")
def syntax_folder(tmp_path_factory):
    src = tmp_path_factory.mktemp("syntaxes")
    image = _phantom16()
    for name in ENCODED_HERE:
        data = (image >> 4).astype(np.uint8) if name == "jpeg-baseline" else image
        write_dicom(src / f"{name}.dcm", data, name)
    return src


def test_every_common_syntax_decodes_and_lossless_ones_give_identical_masks(syntax_folder, tmp_path, tiny_checkpoint):
    _infer(syntax_folder, tmp_path / "out", tiny_checkpoint)
    rows = _rows(tmp_path / "out")
    assert set(rows) == set(ENCODED_HERE) and all(r["status"] == "ok" for r in rows.values()), rows
    reference = (tmp_path / "out" / syntax_folder.name / "explicit-le.mask.png").read_bytes()
    for name in ENCODED_HERE:
        mask = (tmp_path / "out" / syntax_folder.name / f"{name}.mask.png").read_bytes()
        if SYNTAXES[name].lossless:
            assert mask == reference, name
    lossy = [read_xray(syntax_folder / f"{n}.dcm").pixels for n in ("j2k", "jpeg-ls-near")]
    exact = read_xray(syntax_folder / "explicit-le.dcm").pixels
    assert all(0 < np.abs(p - exact).max() < 0.2 for p in lossy)  # really lossy, and still the same image


def test_a_syntax_without_decoder_is_one_line_with_the_install_command(syntax_folder, monkeypatch):
    """FAKE: every decoder plugin reported missing, as on a set-up without lungrt[dicom]."""
    from pydicom.pixels.decoders.base import Decoder

    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    with pytest.raises(ImageReadError) as e:
        read_xray(syntax_folder / "jpeg-lossless-sv1.dcm")
    assert "\n" not in e.value.reason
    assert "JPEG Lossless" in e.value.reason and "pip install 'lungrt[dicom]'" in e.value.reason
    assert read_xray(syntax_folder / "deflated.dcm").shape == (128, 128)  # not compressed pixel data: no plugin needed


HEADERS = {
    "pa_chest": dict(modality="DX", body_part="CHEST", view="PA"),
    "cr_no_body_part": dict(modality="CR", body_part=None, view="AP"),
    "ct_slice": dict(modality="CT", body_part="HEAD", view=None),
    "hand": dict(modality="DX", body_part="HAND", view="PA"),
    "lateral": dict(modality="DX", body_part="CHEST", view="LL"),
}
EXPECTED = {
    "pa_chest": [],
    "cr_no_body_part": [],
    "ct_slice": ["not_chest_modality", "not_chest_body_part"],
    "hand": ["not_chest_body_part"],
    "lateral": ["lateral_view"],
}


@pytest.fixture(scope="module")
def header_folder(tmp_path_factory):
    src = tmp_path_factory.mktemp("headers")
    for i, (name, header) in enumerate(HEADERS.items()):
        write_dicom(src / f"{name}.dcm", _phantom16(10 + i), **header)
    return src


def test_header_screening_flags_and_leaves_areas_empty(header_folder, tmp_path, tiny_checkpoint):
    _infer(header_folder, tmp_path / "out", tiny_checkpoint)
    rows = _rows(tmp_path / "out")
    for name, reasons in EXPECTED.items():
        r = rows[name]
        assert r["status"] == "ok" and (tmp_path / "out" / header_folder.name / f"{name}.mask.png").exists()
        got = [q for q in r["qc"].split(";") if q in ("not_chest_modality", "not_chest_body_part", "lateral_view")]
        assert got == reasons, (name, r["qc"])
        measured = [r[k] for k in ("right_lung_px", "left_lung_px", "right_lung_mm2", "left_lung_mm2")]
        assert all(v == "" for v in measured) if reasons else all(v != "" for v in measured), (name, measured)


def test_header_screening_can_skip_and_resume_keeps_them_done(header_folder, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    res = _infer(header_folder, out, tiny_checkpoint, "--screen", "skip")
    assert res.exit_code == 0 and "3 skipped by header screening" in res.output, res.output
    rows = _rows(out)
    for name, reasons in EXPECTED.items():
        assert rows[name]["status"] == ("skipped" if reasons else "ok")
        assert (out / header_folder.name / f"{name}.mask.png").exists() == (not reasons)
    again = _infer(header_folder, out, tiny_checkpoint, "--screen", "skip", "--resume")
    assert "5 already done" in again.output, again.output


def test_bad_screen_choice_is_refused(header_folder, tmp_path, tiny_checkpoint):
    res = runner.invoke(
        app,
        [
            "infer",
            str(header_folder),
            "--out",
            str(tmp_path / "o"),
            "--model",
            str(tiny_checkpoint),
            "--screen",
            "maybe",
        ],
    )
    assert res.exit_code == 2 and "flag or skip" in res.output


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory, tiny_checkpoint):
    src = tmp_path_factory.mktemp("seg_in")
    for i in range(3):
        write_dicom(src / f"cxr_{i}.dcm", _phantom16(20 + i), "rle" if i == 1 else "explicit-le")
    out = tmp_path_factory.mktemp("seg_out")
    _infer(src, out, tiny_checkpoint, "--dicom-seg")
    return src, out


def _segments(seg) -> np.ndarray:
    """A binary SEG's frames as one label image (segment number per pixel), read with pydicom."""
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    labels = np.zeros((seg.Rows, seg.Columns), np.uint8)
    for frame, info in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        number = info.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        labels[frame > 0] = number
    return labels


def test_dicom_seg_references_its_source_and_holds_the_mask(seg_run):
    import pydicom

    from lungrt.data.io import read_mask

    src, out = seg_run
    rows = _rows(out)
    for i in range(3):
        source = pydicom.dcmread(src / f"cxr_{i}.dcm", stop_before_pixels=True)
        seg = pydicom.dcmread(out / src.name / f"cxr_{i}.seg.dcm")
        assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
        assert rows[f"cxr_{i}"]["dicom_seg"] == f"{src.name}/cxr_{i}.seg.dcm"
        assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.SeriesInstanceUID != source.SeriesInstanceUID
        ref = seg.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == source.SeriesInstanceUID
        assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        labels = [d.SegmentLabel for d in seg.SegmentSequence]
        assert labels == ["Right lung structure", "Left lung structure"]
        algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert "lungrt" in algo.AlgorithmName and algo.AlgorithmVersion
        pixels = _segments(seg)
        mask = read_mask(out / src.name / f"cxr_{i}.mask.png") > 0
        assert pixels.shape == mask.shape and np.array_equal(pixels > 0, mask)
        right = int(rows[f"cxr_{i}"]["right_lung_px"])
        assert int((pixels == 1).sum()) == right  # segment 1 is what results.csv measured as the right lung


@pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dciodvfy not installed: apt-get install dicom3tools")
def test_dicom_seg_passes_dciodvfy(seg_run):
    _, out = seg_run
    assert len(list(out.rglob("*.seg.dcm"))) == 3
    for seg in sorted(out.rglob("*.seg.dcm")):
        res = subprocess.run(["dciodvfy", str(seg)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
        assert not errors, (seg.name, errors)
        assert "Segmentation" in res.stdout + res.stderr  # it did recognise the IOD


def test_report_names_the_screened_out_inputs(header_folder, tmp_path, tiny_checkpoint):
    from lungrt.inference.report import write_report

    out = tmp_path / "out"
    _infer(header_folder, out, tiny_checkpoint, "--screen", "skip")
    page = write_report(out).read_text()
    assert page.count("skipped by header screening") == 3 and "failed: " not in page


@pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dciodvfy not installed: apt-get install dicom3tools")
def test_secondary_capture_with_the_outline_passes_dciodvfy(tmp_path):
    """What `lungrt serve --secondary-capture` sends: a valid SC IOD (dciodvfy: no error), RGB, marked derived and
    burned in, in the film's study, with the overlay's pixels."""
    import cv2
    import pydicom

    from lungrt.data.dicom import write_dicom
    from lungrt.inference.dicom_seg import secondary_capture_bytes

    film = tmp_path / "film.dcm"
    write_dicom(film, (make_phantom(3, 96).image * 4000).astype(np.uint16))
    overlay = np.dstack([(make_phantom(3, 96).image * 255).astype(np.uint8)] * 3)
    overlay[10:20, 10:20] = (0, 0, 255)  # red in BGR
    cv2.imwrite(str(tmp_path / "film.overlay.png"), overlay)
    sc_path = tmp_path / "film.sc.dcm"
    sc_path.write_bytes(secondary_capture_bytes(film, tmp_path / "film.overlay.png", "msag-unet"))
    res = subprocess.run(["dciodvfy", str(sc_path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors
    sc, src = pydicom.dcmread(sc_path), pydicom.dcmread(film)
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"] and sc.BurnedInAnnotation == "YES"
    assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.SeriesInstanceUID != src.SeriesInstanceUID
    assert sc.PhotometricInterpretation == "RGB" and tuple(sc.pixel_array[15, 15]) == (255, 0, 0)


@pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dciodvfy not installed: apt-get install dicom3tools")
def test_measurement_report_passes_dciodvfy_and_reads_back_in_highdicom(tmp_path):
    """`lungrt serve --sr`: a TID 1500 measurement report of the two lungs' areas and the QC verdict that dciodvfy
    finds no error in and highdicom's own SR reader gives back (areas in mm², the film referenced)."""
    import highdicom as hd
    import pydicom

    from lungrt.data.dicom import write_dicom
    from lungrt.inference.dicom_seg import report_bytes

    film = tmp_path / "film.dcm"
    write_dicom(film, (make_phantom(4, 96).image * 4000).astype(np.uint16))
    sr_path = tmp_path / "film.sr.dcm"
    sr_path.write_bytes(report_bytes(film, {"right": 10234.5, "left": None}, "msag-unet", "abc", "stops_short"))
    res = subprocess.run(["dciodvfy", str(sr_path)], capture_output=True, text=True, timeout=60)
    assert not [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
    groups = hd.sr.srread(sr_path).content.get_image_measurement_groups()
    read = {
        g.finding_type.meaning: ([(m.value, m.unit.value) for m in g.get_measurements()],
                                 [q.value.meaning for q in g.get_qualitative_evaluations()])
        for g in groups
    }  # fmt: skip
    assert read == {
        "Right lung structure": ([(10234.5, "mm2")], ["QC flagged for review"]),
        "Left lung structure": ([], ["QC flagged for review"]),  # no area where the film gave none
    }
    assert all(g.tracking_identifier.endswith("lungrt QC: stops_short") for g in groups)  # the reasons, in words
    assert pydicom.dcmread(sr_path).StudyInstanceUID == pydicom.dcmread(film).StudyInstanceUID
