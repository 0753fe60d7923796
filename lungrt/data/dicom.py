"""DICOM specifics beyond the pixels: which transfer syntaxes decode here (and what to install for
the rest), which decoder each uses, and what the header says an image is (header screening).

The decoders are the plugins pydicom is made for: pylibjpeg (with pylibjpeg-libjpeg for JPEG and
JPEG-LS, pylibjpeg-openjpeg for JPEG 2000, pylibjpeg-rle for RLE) and python-gdcm, installed by
`lungrt[dicom]`. Where several can decode a syntax, `PREFERRED_DECODER` names the fastest measured
on a 5.4-megapixel 16-bit image (`benchmarks/dicom_decoders.py`; README, DICOM section).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import uid as _uid

INSTALL_DECODERS = "pip install 'lungrt[dicom]'"


@dataclass(frozen=True)
class Syntax:
    uid: str
    lossless: bool
    packages: str  # what decodes it, for the one-line error where nothing does


SYNTAXES = {
    "explicit-le": Syntax(_uid.ExplicitVRLittleEndian, True, "pydicom"),
    "implicit-le": Syntax(_uid.ImplicitVRLittleEndian, True, "pydicom"),
    "deflated": Syntax(_uid.DeflatedExplicitVRLittleEndian, True, "pydicom"),
    "jpeg-baseline": Syntax(_uid.JPEGBaseline8Bit, False, "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"),
    "jpeg-extended": Syntax(_uid.JPEGExtended12Bit, False, "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"),
    "jpeg-lossless": Syntax(_uid.JPEGLossless, True, "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"),
    "jpeg-lossless-sv1": Syntax(_uid.JPEGLosslessSV1, True, "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"),
    "jpeg-ls": Syntax(_uid.JPEGLSLossless, True, "pylibjpeg pylibjpeg-libjpeg (or pyjpegls, python-gdcm)"),
    "jpeg-ls-near": Syntax(_uid.JPEGLSNearLossless, False, "pylibjpeg pylibjpeg-libjpeg (or pyjpegls, python-gdcm)"),
    "j2k-lossless": Syntax(_uid.JPEG2000Lossless, True, "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"),
    "j2k": Syntax(_uid.JPEG2000, False, "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"),
    "rle": Syntax(_uid.RLELossless, True, "pydicom (pylibjpeg-rle is faster)"),
}

# the fastest decoder per syntax where several are installed, measured on a 5.4 MP 16-bit image
# (benchmarks/dicom_decoders.py, AMD EPYC, one core; ms): pydicom's own order otherwise tries gdcm first
PREFERRED_DECODER: dict[str, str] = {
    _uid.JPEGBaseline8Bit: "pillow",  # 41 (gdcm 97, pylibjpeg 190)
    _uid.JPEGExtended12Bit: "gdcm",  # not encodable here to measure; gdcm decodes 12-bit lossy JPEG
    _uid.JPEGLossless: "gdcm",  # 192 (pylibjpeg 245)
    _uid.JPEGLosslessSV1: "pylibjpeg",  # 213 (gdcm 232)
    _uid.JPEGLSLossless: "pyjpegls",  # 138 (gdcm 259, pylibjpeg 539)
    _uid.JPEGLSNearLossless: "pyjpegls",  # 152 (gdcm 260, pylibjpeg 594)
    _uid.JPEG2000Lossless: "gdcm",  # 667 (pillow 878, pylibjpeg 899)
    _uid.JPEG2000: "pylibjpeg",  # 79 (pillow 114, gdcm 218)
    _uid.RLELossless: "pylibjpeg",  # 21 (pydicom's own 167)
}


def decoding_plugin(transfer_syntax) -> str | None:
    """The plugin to ask pydicom for, when the preferred one is installed (None: pydicom's choice)."""
    plugin = PREFERRED_DECODER.get(str(transfer_syntax))
    if plugin is None:
        return None
    from pydicom.pixels import get_decoder

    decoder = get_decoder(transfer_syntax)
    return plugin if plugin in decoder.available_plugins else None


def missing_decoder(transfer_syntax) -> str | None:
    """The one-line reason when no installed plugin decodes this syntax: its name and what to install."""
    from pydicom.pixels import get_decoder

    ts = _uid.UID(str(transfer_syntax))
    if not ts.is_compressed:
        return None
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return f"transfer syntax {ts.name} ({ts}) has no decoder in pydicom"
    if decoder.is_available:
        return None
    packages = next(
        (s.packages for s in SYNTAXES.values() if s.uid == ts), "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
    )
    return f"no decoder installed for {ts.name}: {INSTALL_DECODERS} (or pip install {packages.split(' (')[0]})"


# Header screening: what the header says the image is. A frontal chest film is CR/DX (DR: some vendors'
# own word for DX); BodyPartExamined, where present, CHEST (THORAX and LUNG are written by some); a
# lateral ViewPosition is not what the models segment.
CHEST_MODALITIES = {"CR", "DX", "DR"}
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG"}
LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "LLD", "RLD"}
SCREEN_REASONS = ("not_chest_modality", "not_chest_body_part", "lateral_view")


def header_facts(ds) -> dict:
    """Modality, BodyPartExamined and ViewPosition as written (upper case, '' when absent)."""
    return {
        key: str(ds.get(tag, "") or "").strip().upper()
        for key, tag in (("modality", "Modality"), ("body_part", "BodyPartExamined"), ("view", "ViewPosition"))
    }


def screen(facts: dict | None) -> list[str]:
    """QC reasons from the header: not a chest modality, not the chest, a lateral view."""
    if not facts:
        return []
    reasons = []
    if facts.get("modality") and facts["modality"] not in CHEST_MODALITIES:
        reasons.append("not_chest_modality")
    if facts.get("body_part") and facts["body_part"] not in CHEST_BODY_PARTS:
        reasons.append("not_chest_body_part")
    if facts.get("view") in LATERAL_VIEWS:
        reasons.append("lateral_view")
    return reasons


def seg_refusal(facts: dict | None) -> list[str]:
    """Why a film gets no lung SEG: what `screen` flags, and a header that does not name a chest film's
    modality at all (a secondary capture or a bare data set of unknown origin: a mask, never a SEG)."""
    if not facts:
        return ["no_dicom_header"]
    return screen(facts) or ([] if facts.get("modality") in CHEST_MODALITIES else ["no_chest_modality_stated"])


def write_dicom(
    path,
    pixels,
    syntax: str = "explicit-le",
    *,
    modality: str = "DX",
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    spacing_mm: tuple[float, float] | None = (0.2, 0.2),
    bits_stored: int = 12,
    study_uid: str | None = None,
    series_uid: str | None = None,
    photometric: str = "MONOCHROME2",
) -> str:
    """A DICOM file of `pixels` (uint16, or uint8 for JPEG baseline) in transfer syntax `syntax` (a
    key of SYNTAXES), with a chest film's header unless told otherwise: for phantoms, tests and
    benchmarks (lungrt reads DICOM; it writes images only to make test data and SEG/SR results).
    pydicom encodes RLE, JPEG-LS and JPEG 2000; JPEG lossless and baseline come from python-gdcm."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    pixels = np.ascontiguousarray(pixels)
    eight = pixels.dtype == np.uint8
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1" if modality != "CR" else "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = _uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), series_uid or generate_uid()
    ds.PatientName, ds.PatientID, ds.StudyID, ds.AccessionNumber = "Phantom^Lungrt", "LUNGRT-PHANTOM", "1", ""
    ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "", "O", ""
    ds.StudyDate, ds.StudyTime, ds.SeriesNumber, ds.InstanceNumber = "20260101", "120000", 1, 1
    ds.Modality, ds.Manufacturer = modality, "lungrt phantom"
    if body_part:
        ds.BodyPartExamined = body_part
    if view:
        ds.ViewPosition = view
    ds.PatientOrientation = ["L", "F"] if not view or view.upper() not in ("LL", "RL", "LATERAL") else ["A", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType, ds.ImageLaterality, ds.ConversionType = "FOR PRESENTATION", "U", "DI"
    if spacing_mm:
        ds.PixelSpacing = ds.ImagerPixelSpacing = [f"{spacing_mm[0]:g}", f"{spacing_mm[1]:g}"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if eight else 16
    ds.BitsStored = 8 if eight else bits_stored
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    ds.PixelData = pixels.tobytes()
    ts = SYNTAXES[syntax].uid
    if syntax == "deflated":
        ds.file_meta.TransferSyntaxUID = ts
    elif syntax == "jpeg-ls-near":
        ds.compress(ts, encoding_plugin="pyjpegls", jls_error=2)
    elif syntax == "j2k":
        ds.compress(ts, j2k_cr=[20])
    elif syntax in ("rle", "jpeg-ls", "j2k-lossless"):
        ds.compress(ts)
    elif syntax in ("jpeg-lossless", "jpeg-lossless-sv1", "jpeg-baseline"):
        ds.save_as(path, enforce_file_format=True)
        return _gdcm_transcode(str(path), ts)
    elif syntax not in ("explicit-le", "implicit-le"):
        raise ValueError(f"cannot encode {syntax!r}")
    if syntax == "implicit-le":
        ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def _gdcm_transcode(path: str, ts) -> str:
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(path)
    if not reader.Read():
        raise ValueError(f"{path}: gdcm cannot read it back")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(ts))))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise ValueError(f"{path}: gdcm cannot encode {_uid.UID(str(ts)).name}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(path)
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise ValueError(f"{path}: gdcm cannot write it")
    return path
