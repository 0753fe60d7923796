"""A corpus of real DICOM files that nobody here wrote: pydicom's bundled test files and the `pydicom-data`
package (CR chest and extremity, CT, MR, US, NM, RT, SEG, SR, multi-frame, color, palette, big-endian,
truncated J2K, bad sequences), plus edited-header copies of the real chest CR (RG1: a 1955 x 1841 CR
whose PixelSpacing reads 0\\0) for what real archives hold: spacing NaN / negative, no Photometric
Interpretation, Rows/Columns that lie, a 10,000-item private sequence, no Part-10 header, a
storescp-style file name, and a study that already holds a SEG, SR and presentation state.

Shared by tests/test_real_dicom.py and tests/test_pacs.py; skipped where pydicom-data is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHEST_CR = "RG1_UNCR.dcm"  # real chest CR (PA), uncompressed; RG1_J2K*: the same film in JPEG 2000


def pydicom_data_folder() -> Path | None:
    try:
        import data_store  # the `pydicom-data` package's module
    except ImportError:
        return None
    folder = Path(data_store.__file__).parent / "data"
    return folder if (folder / CHEST_CR).is_file() else None


def bundled_folder() -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"


def chest_cr() -> Path:
    folder = pydicom_data_folder()
    if folder is None:
        pytest.skip("pip install pydicom-data (the test set-up installs it)")
    return folder / CHEST_CR


def write_edited_copies(folder: Path) -> dict[str, Path]:
    """Edited-header copies of the real chest CR, by what was edited."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    source = chest_cr()

    def edited(name: str, edit) -> Path:
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        edit(ds)
        path = folder / name
        ds.save_as(
            path, enforce_file_format=getattr(ds, "file_meta", None) is not None and "TransferSyntaxUID" in ds.file_meta
        )
        return path

    def private_sequence(ds):
        ds.private_block(0x0099, "LUNGRT TEST", create=True).add_new(
            0x01, "SQ", Sequence([Dataset() for _ in range(10_000)])
        )
        for item in ds[0x00991001].value[:50]:
            item.PatientComments = "x"

    def no_meta(ds):
        del ds.file_meta
        ds.preamble = None

    def lying_size(ds):
        ds.Rows = 4000

    paths = {
        "spacing_nan": edited("spacing_nan.dcm", lambda ds: setattr(ds, "PixelSpacing", ["NaN", "NaN"])),
        "spacing_negative": edited("spacing_negative.dcm", lambda ds: setattr(ds, "PixelSpacing", ["-0.2", "-0.2"])),
        "spacing_valid": edited("spacing_valid.dcm", lambda ds: setattr(ds, "PixelSpacing", ["0.175", "0.175"])),
        "no_photometric": edited("no_photometric.dcm", lambda ds: delattr(ds, "PhotometricInterpretation")),
        "rows_lie": edited("rows_lie.dcm", lying_size),
        "private_sequence": edited("private_sequence.dcm", private_sequence),
    }
    bare = pydicom.dcmread(source)
    bare.SOPInstanceUID = generate_uid()
    no_meta(bare)
    paths["no_part10"] = folder / "no_part10_header.dcm"
    pydicom.dcmwrite(paths["no_part10"], bare, enforce_file_format=False)
    storescp = pydicom.dcmread(source)
    storescp.SOPInstanceUID = storescp.file_meta.MediaStorageSOPInstanceUID = "1.2.840.99.5457.1"
    paths["storescp_name"] = folder / "CR.1.2.840.99.5457.1"
    storescp.save_as(paths["storescp_name"], enforce_file_format=True)
    return paths


def write_corpus(folder: Path) -> Path:
    """Every real DICOM file of pydicom and pydicom-data under folder/real, the edited copies under folder/edited."""
    real = folder / "real"
    real.mkdir(parents=True, exist_ok=True)
    for source in (bundled_folder(), pydicom_data_folder()):
        for f in sorted(source.glob("*.dcm")) if source else []:
            shutil.copy(f, real / f.name)
    write_edited_copies(folder / "edited")
    return folder
