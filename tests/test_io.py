"""X-ray reading: every supported kind decodes, every broken file fails with its own reason."""

from __future__ import annotations

import struct
from io import BytesIO
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

from lungrt.core.errors import ImageReadError
from lungrt.data.io import read_mask, read_xray, write_png


def _png_header_only(path, width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def make_dicom(
    path,
    pixels: np.ndarray,
    photometric="MONOCHROME2",
    slope=1.0,
    intercept=0.0,
    window=None,
    spacing=(0.2, 0.25),
    syntax=ExplicitVRLittleEndian,
):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelSpacing = list(spacing)
    if syntax == ExplicitVRLittleEndian:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    else:  # a compressed syntax with a frame the default install cannot decode
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 64])
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture()
def gradient():
    return np.tile(np.linspace(0, 4095, 64), (48, 1)).astype(np.uint16)


def test_8bit_png_keeps_scale(tmp_path):
    arr = np.full((40, 50), 128, np.uint8)
    write_png(tmp_path / "a.png", arr)
    xr = read_xray(tmp_path / "a.png")
    assert xr.shape == (40, 50) and xr.bits == 8
    assert xr.pixels.dtype == np.float32 and np.allclose(xr.pixels, 128 / 255)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_kept_8bit_pixels_preprocess_exactly_like_float(tmp_path, dtype):
    from lungrt.core.spec import PreprocessSpec

    rng = np.random.default_rng(0)
    raw = rng.integers(0, np.iinfo(dtype).max, (70, 90), dtype=dtype)
    write_png(tmp_path / "x.png", raw)
    xr = read_xray(tmp_path / "x.png")
    assert xr.gray8.dtype == np.uint8 and xr.pixels.dtype == np.float32
    spec = PreprocessSpec(size=64)
    assert np.array_equal(spec.apply(xr.gray8), spec.apply(xr.pixels))


def test_16bit_png_is_stretched(tmp_path, gradient):
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    xr = read_xray(tmp_path / "g16.png")
    assert xr.bits == 16 and xr.pixels.min() == 0.0 and xr.pixels.max() == 1.0
    assert np.all(np.diff(xr.pixels[0]) >= 0)  # monotone ramp survives


def test_rgba_and_palette_become_gray(tmp_path):
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 255
    rgba[:10, :, 3] = 0  # transparent band composites onto black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    xr = read_xray(tmp_path / "rgba.png")
    assert xr.shape == (30, 30)
    assert np.allclose(xr.pixels[:10], 0) and np.allclose(xr.pixels[10:], 200 / 255, atol=1 / 255)
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        tmp_path / "pal.png"
    )
    assert np.allclose(read_xray(tmp_path / "pal.png").pixels, 90 / 255, atol=2 / 255)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_gray_png_read_by_libpng_equals_pillows_pixels(tmp_path, dtype):
    """Plain gray PNGs take libpng (imagecodecs); the pixels, bits and window are Pillow's."""
    from lungrt.data import io as lio

    raw = np.random.default_rng(1).integers(0, np.iinfo(dtype).max, (61, 83), dtype=dtype)
    Image.fromarray(raw).save(tmp_path / "x.png", optimize=True)
    data = (tmp_path / "x.png").read_bytes()
    assert lio._is_plain_gray_png(data)
    fast, pillow = read_xray(tmp_path / "x.png"), lio._read_raster(tmp_path / "x.png", data, lio.MAX_PIXELS)
    assert fast.image.dtype == pillow.image.dtype == dtype and np.array_equal(fast.image, raw)
    assert np.array_equal(fast.image, pillow.image) and (fast.bits, fast.window) == (pillow.bits, pillow.window)


def _png_of_rows(rows: np.ndarray, width: int, depth: int) -> bytes:
    """A gray PNG from its filtered rows (filter byte first), zlib-compressed as one IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, rows.shape[0], depth, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes()))
        + chunk(b"IEND", b"")
    )


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_only_plain_gray_pngs_skip_pillow(tmp_path):
    """Transparency, colour, interlacing and low bit depths stay on Pillow's route."""
    from lungrt.data.io import _is_plain_gray_png

    gray = np.zeros((20, 30), np.uint8)
    Image.fromarray(gray).save(tmp_path / "plain.png")
    Image.fromarray(gray).save(tmp_path / "trns.png", transparency=0)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(gray > 0).save(tmp_path / "one_bit.png")
    plain = (tmp_path / "plain.png").read_bytes()
    interlaced = plain[:28] + b"\x01" + plain[29:]  # IHDR's interlace method (routing only: CRC not fixed)
    assert _is_plain_gray_png(plain) and not _is_plain_gray_png(interlaced)
    for name in ("trns", "rgb", "one_bit"):
        assert not _is_plain_gray_png((tmp_path / f"{name}.png").read_bytes()), name


def test_png_exif_orientation_is_honoured(tmp_path):
    """A PNG with an eXIf chunk is not plain: Pillow's route turns it as displayed."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "r.png", exif=exif)
    assert read_xray(tmp_path / "r.png").shape == (30, 20)


@pytest.mark.parametrize("ext", ["jpg", "bmp", "tif"])
def test_other_raster_formats(tmp_path, ext):
    Image.fromarray(np.full((32, 40), 100, np.uint8)).save(tmp_path / f"x.{ext}")
    xr = read_xray(tmp_path / f"x.{ext}")
    assert xr.shape == (32, 40) and abs(float(xr.pixels.mean()) - 100 / 255) < 0.02


def test_monochrome1_dicom_is_inverted_with_spacing(tmp_path, gradient):
    m2 = read_xray(make_dicom(tmp_path / "m2.dcm", gradient))
    m1 = read_xray(make_dicom(tmp_path / "m1.dcm", gradient, photometric="MONOCHROME1"))
    assert m1.spacing_mm == (0.2, 0.25)
    assert np.allclose(m1.pixels, 1.0 - m2.pixels)
    assert m2.pixels[0, 0] < m2.pixels[0, -1] and m1.pixels[0, 0] > m1.pixels[0, -1]


def test_dicom_bits_above_bits_stored_are_ignored(tmp_path, gradient):
    # 12 bits stored in 16: an old overlay plane in bit 15 of some pixels must not become image
    clean = read_xray(make_dicom(tmp_path / "clean.dcm", gradient))
    dirty = gradient.copy()
    dirty[10:20, 5:30] |= 1 << 15
    xr = read_xray(make_dicom(tmp_path / "dirty.dcm", dirty))
    assert xr.window == clean.window == (0, 4095, False)
    assert np.array_equal(xr.gray8, clean.gray8)
    assert np.array_equal(xr.image, pydicom.dcmread(tmp_path / "dirty.dcm").pixel_array)  # pydicom's own correction


def test_dicom_window_is_applied(tmp_path, gradient):
    # a window over the lower quarter saturates everything above it
    xr = read_xray(make_dicom(tmp_path / "w.dcm", gradient, window=(512, 1024)))
    assert np.isclose(xr.pixels.max(), 1.0) and (xr.pixels[0] >= 0.999).mean() > 0.7


def test_dicom_without_extension_is_sniffed(tmp_path, gradient):
    p = make_dicom(tmp_path / "IM0001", gradient)
    assert read_xray(p).shape == gradient.shape


def test_dicom_rescale_slope_intercept(tmp_path, gradient):
    # a negative slope flips the ramp before min-max scaling; proves modality LUT is applied
    xr = read_xray(make_dicom(tmp_path / "s.dcm", gradient, slope=-1.0, intercept=4095.0))
    assert xr.pixels[0, 0] > xr.pixels[0, -1]


BROKEN = {
    "empty.png": "empty",
    "truncated.png": "truncated",
    "text.png": "not a recognised image",
    "bomb.png": "absurd dimensions",
    "tiny.png": "too small",
    "compressed.dcm": "corrupt JPEG 2000",
    "notdicom.dcm": "DICOM",
}


@pytest.fixture()
def broken_folder(tmp_path, gradient):
    (tmp_path / "empty.png").write_bytes(b"")
    write_png(tmp_path / "good.png", np.full((64, 64), 7, np.uint8))
    data = (tmp_path / "good.png").read_bytes()
    big = np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8)
    write_png(tmp_path / "big.png", big)
    (tmp_path / "truncated.png").write_bytes((tmp_path / "big.png").read_bytes()[:2000])
    (tmp_path / "text.png").write_text("this is not an image\n" * 20)
    _png_header_only(tmp_path / "bomb.png", 60000, 60000)
    write_png(tmp_path / "tiny.png", np.zeros((4, 4), np.uint8))
    make_dicom(tmp_path / "compressed.dcm", gradient, syntax=JPEG2000Lossless)
    (tmp_path / "notdicom.dcm").write_bytes(data)
    return tmp_path


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_files_fail_with_reason(broken_folder, name):
    with pytest.raises(ImageReadError) as e:
        read_xray(broken_folder / name)
    assert e.value.path.endswith(name)
    assert BROKEN[name].lower() in e.value.reason.lower(), e.value.reason
    assert name in str(e.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist"):
        read_xray(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="directory"):
        read_xray(tmp_path)


def test_masks_binarise_pictures_and_label_maps(tmp_path):
    soft = np.array([[0, 100, 128, 200, 255] * 4] * 20, np.uint8)
    write_png(tmp_path / "soft.png", soft)
    assert read_mask(tmp_path / "soft.png")[0, :5].tolist() == [False, False, True, True, True]
    labels = np.zeros((20, 20), np.uint8)
    labels[5:10, 5:10], labels[12:15, 12:15] = 1, 2
    write_png(tmp_path / "labels.png", labels)
    assert read_mask(tmp_path / "labels.png").sum() == 25 + 9


@pytest.mark.parametrize("kind", ["png", "dicom", "dicom-mono1"])
def test_16_bit_images_decode_to_the_same_gray8_without_full_size_float_work(tmp_path, kind):
    """Deep integer images keep their raw uint16 pixels plus the window; gray8 comes from a
    65536-entry table, bit-identical to windowing in float and rounding."""
    import cv2

    from lungrt.data.io import to_gray8

    rng = np.random.default_rng(3)
    raw = np.clip(rng.normal(1800, 500, (300, 260)), 37, 4000).astype(np.uint16)
    if kind == "png":
        path = tmp_path / "x.png"
        cv2.imwrite(str(path), raw)
    else:
        path = make_dicom(
            tmp_path / "x.dcm", raw, photometric="MONOCHROME1" if kind == "dicom-mono1" else "MONOCHROME2"
        )
    xr = read_xray(path)
    assert xr.image.dtype == np.uint16 and xr.shape == raw.shape
    unit = (raw.astype(np.float64) - raw.min()) / (raw.max() - raw.min())
    unit = unit.astype(np.float32)
    if kind == "dicom-mono1":
        unit = 1.0 - unit
    assert np.array_equal(xr.gray8, to_gray8(unit))
    assert np.allclose(xr.pixels, unit, atol=1e-6) and xr.pixels.dtype == np.float32


@pytest.mark.parametrize("syntax", ["explicit-le", "implicit-le"])
def test_native_detector_dicom_is_read_straight_from_the_file(tmp_path, syntax):
    """The common 16-bit file skips pydicom's pixel_array (copies, ~8 ms at 5 MP) and reads the very
    same values from the file; one cut inside its pixel data says so."""
    import pydicom

    from lungrt.data.dicom import write_dicom

    pixels = (np.random.default_rng(3).random((700, 520)) * 4095).astype(np.uint16)  # > the deferral size
    path = write_dicom(tmp_path / "d.dcm", pixels, syntax)
    xr = read_xray(path)
    assert xr.image.dtype == np.uint16 and np.array_equal(xr.image, pydicom.dcmread(path).pixel_array)
    data = Path(path).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 100_000])
    with pytest.raises(ImageReadError, match="cut short"):
        read_xray(tmp_path / "cut.dcm")


def test_window_table_equals_the_window_formula_for_every_raw_value():
    """The 16-bit -> 8-bit table is computed over the window only, each side beyond filled with the
    clipped value: all 65536 entries must equal the formula applied to every value."""
    from lungrt.core.spec import to_gray8
    from lungrt.data.io import _window_table, _window_unit

    for window in (
        (0, 65535, False),
        (5, 4095, True),
        (100, 100, False),
        (100, 99, True),
        (65535, 65535, True),
        (0, 0, False),
        (1200, 3071, False),
        (1200, 3071, True),
    ):
        full = to_gray8(_window_unit(np.arange(65536, dtype=np.uint16), window))
        assert np.array_equal(_window_table.__wrapped__(window), full), window


@pytest.mark.parametrize("zlib_ng", [True, False])
def test_one_bit_mask_png_decodes_to_the_mask(monkeypatch, zlib_ng):
    """zlib-ng's stream where imagecodecs has it, zlib's otherwise: the same pixels for PNG readers."""
    import cv2
    import imagecodecs

    from lungrt.data.io import encode_mask_png1

    monkeypatch.setattr(imagecodecs.ZLIBNG, "available", zlib_ng and imagecodecs.ZLIBNG.available)
    mask = np.zeros((1203, 997), np.uint8)
    cv2.ellipse(mask, (300, 600), (200, 450), 0, 0, 360, 255, -1)
    mask[::97, ::13] = 255  # odd pixels, and a width that is not a multiple of 8
    data = encode_mask_png1(mask)
    assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), mask)
    with Image.open(BytesIO(data)) as im:
        assert im.mode == "1" and np.array_equal(np.array(im.convert("L")), mask)


def test_native_dicom_reduced_while_read_gives_the_same_network_input(tmp_path):
    """`read_xray(reduce_for=spec)` (infer without overlays): a native detector file that the spec
    area-resizes is reduced band by band as it is read; the network input, window and facts are
    those of the whole image, and the full-size pixels are refused rather than faked. Set high
    bits, and images the spec resizes otherwise, come back whole."""
    import cv2

    from lungrt.core.spec import PreprocessSpec
    from lungrt.data.dicom import write_dicom

    spec = PreprocessSpec(size=128)
    rng = np.random.default_rng(5)
    film = cv2.GaussianBlur(rng.random((1531, 1373)), (0, 0), 40)
    film = (
        ((film - film.min()) / np.ptp(film) * 3000 + 500 + rng.normal(0, 30, film.shape))
        .clip(0, 4095)
        .astype(np.uint16)
    )
    dirty = film.copy()
    dirty[7:9, 40:90] |= 1 << 15
    cases = {
        "m2": (film, "MONOCHROME2", True),
        "m1": (film, "MONOCHROME1", True),
        "dirty": (dirty, "MONOCHROME2", False),
        "small": (film[:400, :300], "MONOCHROME2", False),
    }
    for name, (pixels, photometric, reduced) in cases.items():
        path = write_dicom(tmp_path / f"{name}.dcm", pixels, photometric=photometric)
        whole, part = read_xray(path), read_xray(path, reduce_for=spec)
        assert (part.reduced_from is not None) == reduced, name
        assert part.facts() == whole.facts() and part.window == whole.window and part.shape == pixels.shape
        assert np.array_equal(spec.apply_xray(part), spec.apply_xray(whole)), name
        if reduced:
            assert part.image.shape == (128, 128)
            with pytest.raises(ValueError, match="not kept"):
                part.gray8
    from lungrt.data.io import _native_uint16_reduced

    data = (tmp_path / "m2.dcm").read_bytes()
    (tmp_path / "short.dcm").write_bytes(data[: len(data) - 5000])  # cut after its header was read
    with pytest.raises(ImageReadError, match="cut short"):
        _native_uint16_reduced(tmp_path / "short.dcm", len(data) - film.size * 2, *film.shape, 128)
