"""A DICOM Segmentation instance for one DICOM input (`lungrt infer --dicom-seg`), with highdicom.

Binary, at the source image's geometry, referencing the source SOP instance (and through it its
series and study: the SEG joins the source's study as a new series). One segment per lung, the
patient's right lung and left lung (SNOMED CT "Right lung structure" / "Left lung structure"), as
the areas in results.csv were measured; a side with no pixels has no segment. The algorithm
identification names lungrt, the model and the content hash of the weights or artifact that ran; the
series description names the mask convention, and a film that QC flagged says so in the content description.

Projection radiographs (CR/DX without a frame of reference) get no Pixel Measures: the SEG shares the source's
pixel grid by reference, the spacing is the source's to give, and a 2-D Pixel Measures item without a
slice thickness is what highdicom's own reader refuses (a copied 0\\0 or NaN spacing was invalid besides).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from lungrt._version import __version__

RIGHT_LUNG = ("3341006", "SCT", "Right lung structure")
LEFT_LUNG = ("44029006", "SCT", "Left lung structure")
# all SEGs of one run form one series per source series: the UID is derived, not random, so that a
# resumed run adds to the same series
_SERIES_ROOT = "lungrt-seg-series"


CONVENTION_WORDS = {"lung-field": "lung fields", "whole-lung": "whole lungs"}


def _source_for_seg(source: str | Path):
    """The source's header as highdicom should see it: without spacing or a slice thickness when it has
    no frame of reference (a projection radiograph; see the module's docstring)."""
    from lungrt.data.io import read_dicom_dataset

    src = read_dicom_dataset(source, stop_before_pixels=True)
    if "FrameOfReferenceUID" not in src:
        for keyword in ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"):
            if keyword in src:
                delattr(src, keyword)
    return src


def segmentation_bytes(
    source: str | Path,
    labels: np.ndarray,
    model: str,
    artifact: str | None,
    convention: str = "lung-field",
    qc: str = "ok",
) -> bytes:
    """Part-10 bytes of the SEG for `source` (a DICOM file) from `labels` (0 background, 1 the
    patient's right lung, 2 the left, at the source's size); `qc`: the film's QC verdict."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    src = _source_for_seg(source)
    if labels.shape != (int(src.Rows), int(src.Columns)):
        raise ValueError(f"mask {labels.shape} is not the source's {int(src.Rows)}x{int(src.Columns)}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"lungrt {model}",
        version=(artifact or __version__)[:64],
        family=codes.cid7162.ArtificialIntelligence,
        source="lungrt",
        parameters={"lungrt": __version__, "artifact_sha256": artifact or "n/a"},
    )
    segments, remapped = [], np.zeros(labels.shape, np.uint8)
    for value, (code, scheme, meaning) in ((1, RIGHT_LUNG), (2, LEFT_LUNG)):
        if not (labels == value).any():
            continue
        number = len(segments) + 1
        remapped[labels == value] = number
        segments.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=meaning,
                segmented_property_category=codes.SCT.AnatomicalStructure,
                segmented_property_type=hd.sr.CodedConcept(code, scheme, meaning),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    if not segments:
        raise ValueError("the mask is empty: no segment to write")
    seg = hd.seg.Segmentation(
        source_images=[src],
        pixel_array=remapped,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=generate_uid(
            entropy_srcs=[_SERIES_ROOT, str(src.SeriesInstanceUID), model]
            + ([convention] if convention != "lung-field" else [])
        ),
        series_number=9000,
        sop_instance_uid=generate_uid(entropy_srcs=[_SERIES_ROOT, str(src.SOPInstanceUID), model, artifact or ""]),
        instance_number=int(src.get("InstanceNumber", 1) or 1),
        manufacturer="lungrt",
        manufacturer_model_name=model[:64],
        software_versions=__version__,
        device_serial_number="lungrt",
        series_description=f"lungrt {model} {CONVENTION_WORDS.get(convention, convention)}"[:64],
        content_label="LUNGS",
        content_description=("QC ok" if qc == "ok" else f"QC flagged: {qc}")[:64],
        content_creator_name="lungrt^",
    )
    if "FrameOfReferenceUID" not in src:
        # General Image module, type 2C without a frame of reference (projection radiographs): the
        # SEG shares the source's pixel grid, so its orientation too (empty when the source has none)
        seg.PatientOrientation = src.get("PatientOrientation", "")
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def secondary_capture_bytes(source: str | Path, overlay_png: str | Path, model: str) -> bytes:
    """Part-10 bytes of a Secondary Capture of `source` showing lungrt's outline burned in (RGB, from infer's
    overlay PNG): what most PACS viewers draw for a projection radiograph. Marked DERIVED\\SECONDARY, burned-in
    annotation YES, made by lungrt; it joins the source's study as a series of its own (UIDs derived, so a
    re-send after a restart is the same instance)."""
    import cv2
    import highdicom as hd
    from pydicom.uid import generate_uid

    from lungrt.data.io import read_dicom_dataset

    src = read_dicom_dataset(source, stop_before_pixels=True)
    rgb = cv2.cvtColor(cv2.imread(str(overlay_png), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=src,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=generate_uid(entropy_srcs=[_SERIES_ROOT, "sc", str(src.SeriesInstanceUID), model]),
        series_number=9001,
        sop_instance_uid=generate_uid(entropy_srcs=[_SERIES_ROOT, "sc", str(src.SOPInstanceUID), model]),
        instance_number=int(src.get("InstanceNumber", 1) or 1),
        manufacturer="lungrt",
        patient_orientation=tuple(src.get("PatientOrientation", None) or ("L", "F")),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.Laterality = src.get("Laterality", "")  # General Series, type 2C: empty for a film of both lungs
    sc.SeriesDescription = f"lungrt {model} outline (not for diagnosis alone)"[:64]
    sc.DerivationDescription = "lung outline drawn by lungrt over the source radiograph"
    buf = io.BytesIO()
    sc.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


QC_CONCEPT = ("QC", "99LUNGRT", "lungrt segmentation quality control")
QC_VALUES = {"ok": ("OK", "99LUNGRT", "QC ok"), "flagged": ("FLAGGED", "99LUNGRT", "QC flagged for review")}
AREA = ("42798000", "SCT", "Area")


def report_bytes(
    source: str | Path, areas_mm2: dict[str, float | None], model: str, artifact: str | None, qc: str
) -> bytes:
    """Part-10 bytes of a DICOM SR measurement report (TID 1500, highdicom) for `source`: one measurement group per
    lung ("right"/"left" in `areas_mm2`) with its area in mm² where the film gives a pixel spacing, and the QC
    verdict as a qualitative evaluation (ok, or flagged with the reasons in the group's tracking identifier). In
    the film's study, a series of its own; UIDs derived from the film and the artifact."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from lungrt.data.io import read_dicom_dataset

    src = read_dicom_dataset(source, stop_before_pixels=True)
    verdict = hd.sr.CodedConcept(*QC_VALUES["ok" if qc == "ok" else "flagged"])
    groups = []
    for side, site in (("right", RIGHT_LUNG), ("left", LEFT_LUNG)):
        area = areas_mm2.get(side)
        measurements = [] if area is None else [
            hd.sr.Measurement(name=hd.sr.CodedConcept(*AREA), value=float(area), unit=codes.UCUM.SquareMillimeter)
        ]  # fmt: skip
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=generate_uid(entropy_srcs=[_SERIES_ROOT, "sr", side, str(src.SOPInstanceUID), artifact or ""]),
                    identifier=(f"{site[2]}; lungrt QC: {qc}")[:64],
                ),
                finding_type=hd.sr.CodedConcept(*site),
                finding_sites=[hd.sr.FindingSite(anatomic_location=hd.sr.CodedConcept(*site))],
                measurements=measurements or None,
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(hd.sr.CodedConcept(*QC_CONCEPT), verdict)],
                source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(src)],
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=generate_uid(entropy_srcs=[_SERIES_ROOT, "device", model]), name=f"lungrt {model}"[:64]
                ),
            )
        ),
        procedure_reported=hd.sr.CodedConcept("168731009", "SCT", "Chest X-ray"),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[src],
        content=report,
        series_instance_uid=generate_uid(entropy_srcs=[_SERIES_ROOT, "sr", str(src.SeriesInstanceUID), model]),
        series_number=9002,
        sop_instance_uid=generate_uid(
            entropy_srcs=[_SERIES_ROOT, "sr", str(src.SOPInstanceUID), model, artifact or ""]
        ),
        instance_number=int(src.get("InstanceNumber", 1) or 1),
        manufacturer="lungrt",
        series_description=f"lungrt {model} lung areas and QC"[:64],
    )
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
