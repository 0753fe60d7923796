"""Reading chest X-rays (PNG, JPEG, BMP, TIFF, DICOM) into one gray float image, and atomic writes.

Every failure raises ImageReadError naming the file and the reason, so a batch job can record it
and go on.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lungrt.core.errors import ImageReadError, LungrtError, NotARadiograph
from lungrt.core.spec import PreprocessSpec, area_downsize_bands, to_gray8

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
# A 4020x4892 Montgomery original is 20 MP; anything far past that is a bomb or not an X-ray.
MAX_PIXELS = 100_000_000
MIN_SIDE = 16
MAX_FILE_BYTES = 2**30  # read whole into memory: refuse files no radiograph comes near
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_CHUNKS = 4096  # a 5 MP 16-bit PNG in 8 KB IDAT chunks has ~700
TEMP_SUFFIX = ".lungrt-tmp"  # only lungrt makes such names: a restart may delete them safely

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode half-grey
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # our own check refuses larger images before Pillow would warn


@dataclass(frozen=True)
class XRayFacts:
    """An X-ray without its pixels: what measuring and writing a mask need of it (its size,
    spacing, DICOM header facts). What a helper process sends back instead of megabytes of pixels."""

    path: str
    shape: tuple[int, int]
    spacing_mm: tuple[float, float] | None = None
    bits: int = 8
    header: dict | None = None


@dataclass
class XRay:
    """A decoded X-ray, 2-D, bright = dense (MONOCHROME2). `image` is what was decoded: uint8 for
    8-bit files, raw uint16 plus its `window` for 16-bit integer files, float32 in [0, 1] for the
    rest. Nothing is converted to float at full size on the inference hot path: 8-bit pixels are
    used as they are, 16-bit ones map to 8 bits through a table (a 5-megapixel detector image
    spent 45 ms in float conversions, more than its PNG decoding). Read with `reduce_for`, a native
    detector DICOM's `image` is its raw values already reduced to the network's size
    (`reduced_from` holds the film's size, which `shape` reports; `pixels` and `gray8` refuse)."""

    path: str
    image: np.ndarray
    spacing_mm: tuple[float, float] | None = None  # (row, column) pixel spacing when known
    bits: int = 8
    window: tuple[int, int, bool] | None = None  # uint16 images: (lowest, highest value, inverted)
    header: dict | None = None  # DICOM: Modality, BodyPartExamined, ViewPosition (`dicom.header_facts`)
    reduced_from: tuple[int, int] | None = None  # read with `reduce_for`: `image` is the network-size reduction

    @property
    def shape(self) -> tuple[int, int]:
        return self.reduced_from or self.image.shape  # type: ignore[return-value]

    def facts(self) -> "XRayFacts":
        return XRayFacts(self.path, self.shape, self.spacing_mm, self.bits, self.header)

    @property
    def pixels(self) -> np.ndarray:
        """float32 in [0, 1]."""
        self._check_full_size()
        if self.image.dtype == np.uint8:
            return self.image.astype(np.float32) / 255.0
        if self.window is not None:
            return _window_unit(self.image, self.window)
        return self.image

    @property
    def gray8(self) -> np.ndarray:
        """uint8, exactly what `PreprocessSpec.prepare` makes of `pixels`."""
        self._check_full_size()
        if self.image.dtype == np.uint8:
            return self.image
        if self.window is not None:
            return self.to_gray8(self.image)
        return to_gray8(self.image)

    def _check_full_size(self) -> None:
        if self.reduced_from is not None:
            raise ValueError(f"{self.path}: read reduced to the network's size; its full-size pixels were not kept")

    def to_gray8(self, values: np.ndarray) -> np.ndarray:
        """Raw uint16 values of this image -> uint8 through its window: the same arithmetic as
        windowing in float, done once per possible value instead of once per pixel."""
        return _window_table(self.window)[values]


@functools.lru_cache(maxsize=64)
def _window_table(window: tuple[int, int, bool]) -> np.ndarray:
    """uint8 for each of the 65536 raw values under `window`. The window is an image's own lowest
    and highest value, so nearly every image has its own table: the formula runs over lowest..highest
    only (a 12-bit detector's 4096 values, not 65536: 1.2 -> ~0.1 ms), each side beyond takes the
    value just past the edge (the formula is clipped there: one constant per side)."""
    lo, hi, _ = window
    lo, hi = max(0, lo), min(65535, max(lo, hi))
    table = np.empty(65536, np.uint8)
    table[lo : hi + 1] = to_gray8(_window_unit(np.arange(lo, hi + 1, dtype=np.uint16), window))
    edges = to_gray8(_window_unit(np.array([max(lo - 1, 0), min(hi + 1, 65535)], np.uint16), window))
    table[:lo], table[hi + 1 :] = edges
    table.flags.writeable = False
    return table


def _window_unit(values: np.ndarray, window: tuple[int, int, bool]) -> np.ndarray:
    """uint16 values -> float32 [0, 1] stretched lowest..highest (as `_to_unit`), inverted if asked."""
    lo, hi, inverted = window
    unit = (
        np.zeros(values.shape, np.float32)
        if hi <= lo
        else ((values.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)
    )
    return 1.0 - unit if inverted else unit


def _windowed(path: Path, raw: np.ndarray, spacing, bits: int, inverted: bool = False) -> XRay:
    """A 16-bit integer image kept raw, with the min..max window `_to_unit` would stretch."""
    if raw.ndim != 2:
        raise ImageReadError(path, f"expected a 2-D gray image, got shape {raw.shape}")
    lo, hi, _, _ = cv2.minMaxLoc(raw)
    return XRay(str(path), raw, spacing, bits, (int(lo), int(hi), inverted))


def is_special_file(path: str | Path) -> bool:
    """A FIFO, socket or device: opening or reading one can block forever, so lungrt never does."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if is_special_file(path):
        return False
    try:
        with open(path, "rb") as f:
            return _has_dicom_magic(f.read(132))
    except OSError:
        return False


def _has_dicom_magic(head: bytes) -> bool:
    """DICOM Part 10: a 128-byte preamble, then 'DICM' (files need no extension); or a bare data
    set without preamble and File Meta, as older archives keep them (`_looks_like_bare_dataset`)."""
    return head[128:132] == b"DICM" or _looks_like_bare_dataset(head)


_EXPLICIT_VRS = {
    b"AE",
    b"AS",
    b"AT",
    b"CS",
    b"DA",
    b"DS",
    b"DT",
    b"FL",
    b"FD",
    b"IS",
    b"LO",
    b"LT",
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"PN",
    b"SH",
    b"SL",
    b"SQ",
    b"SS",
    b"ST",
    b"SV",
    b"TM",
    b"UC",
    b"UI",
    b"UL",
    b"UN",
    b"UR",
    b"US",
    b"UT",
    b"UV",
}


def _looks_like_bare_dataset(head: bytes) -> bool:
    """A little-endian data set starting at byte 0 with a group 0008 element (SOP Class, Specific
    Character Set, ...) in explicit VR (a known VR next) or implicit VR (a small even length next)."""
    if len(head) < 8 or head[:2] != b"\x08\x00" or struct.unpack_from("<H", head, 2)[0] > 0x0100:
        return False
    if head[4:6] in _EXPLICIT_VRS:
        return True
    length = struct.unpack_from("<I", head, 4)[0]
    return length < 1024 and length % 2 == 0


def is_supported(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(path)


def read_xray(path: str | Path, max_pixels: int = MAX_PIXELS, reduce_for: PreprocessSpec | None = None) -> XRay:
    """Read any supported X-ray file; raises ImageReadError with the reason on any failure.
    `reduce_for`: only the network input of this spec is wanted (infer without overlays): a
    common detector DICOM that the spec area-resizes is reduced while it is read, in cache-sized
    bands, and comes back reduced (`XRay.reduced_from`; the same network input, without ever
    holding its megapixels). Anything else comes back whole, as without it."""
    path = Path(path)
    try:
        size = _regular_file_size(path)
        if size > MAX_FILE_BYTES:
            raise ImageReadError(path, f"file of {size / 2**30:.1f} GiB is far larger than any radiograph")
        if size and path.suffix.lower() in DICOM_SUFFIXES:
            return _read_dicom(
                path, max_pixels, size, reduce_for
            )  # pydicom reads the file itself, faster than from bytes
        data = path.read_bytes()  # one read: the format check and the decoder share it
        if _is_plain_gray_png(data):
            return _read_gray_png(path, data, max_pixels)
    except FileNotFoundError:
        raise ImageReadError(path, "file does not exist") from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a directory, not an image") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot read ({e.strerror or e})") from None
    if not data:
        raise ImageReadError(path, "file is empty")
    if _has_dicom_magic(data):  # DICOM without its suffix (rare): pydicom reads it again
        return _read_dicom(path, max_pixels, len(data), reduce_for)
    return _read_raster(path, data, max_pixels)


def _regular_file_size(path: Path) -> int:
    """The size of a regular file, else ImageReadError: opened without blocking (a FIFO with no
    writer would block a plain open forever) and checked on the open file itself."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(path)
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(path, "not a regular file (a FIFO, socket or device); never read")
    return st.st_size


def _check_dimensions(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageReadError(
            path, f"absurd dimensions {width}x{height} (over {max_pixels:,} pixels; decompression bomb?)"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageReadError(path, f"image too small ({width}x{height}, need at least {MIN_SIDE} px a side)")


def _is_plain_gray_png(data: bytes) -> bool:
    """A non-interlaced 8- or 16-bit grayscale PNG (the common X-ray export) with nothing Pillow's
    route would act on: no transparency (tRNS) and no EXIF orientation (eXIf). The chunk headers are
    walked, not the whole file searched (~20 headers where a search of 140 KB took 0.16 ms); a file
    of more than MAX_PNG_CHUNKS chunks goes to Pillow, never a long walk here."""
    ihdr = data[12:29]
    if (
        data[:8] != PNG_SIGNATURE
        or len(ihdr) < 17
        or ihdr[:4] != b"IHDR"
        or ihdr[12] not in (8, 16)
        or ihdr[13]
        or ihdr[16]
    ):
        return False  # not PNG; or bit depth, colour type (0 = gray), interlace (0 = none) otherwise
    return not any(
        kind in (b"tRNS", b"eXIf", None) for _, _, kind in _png_chunk_headers(data)
    )  # truncated: libpng says so


def _png_chunk_headers(data: bytes):
    """(offset, length, type) of each chunk up to IEND or the end of the data, walking the headers;
    past MAX_PNG_CHUNKS one last (offset, 0, None)."""
    at = 8
    for _ in range(MAX_PNG_CHUNKS):
        if at + 8 > len(data):
            return
        length, kind = struct.unpack_from(">I4s", data, at)
        yield at, length, kind
        if kind == b"IEND":
            return
        at += 12 + length
    yield at, 0, None


def _read_gray_png(path: Path, data: bytes, max_pixels: int) -> XRay:
    """libpng through imagecodecs: the same pixels as Pillow's route, without feeding the decoder one chunk
    at a time from Python and two copies on the way into NumPy (decode stage 2.1 -> 1.9 ms at 512 px). A
    hand-written zlib-ng route for Sub-filtered rows bought 1.14x on this stage (0.3 ms per 512 px film,
    benchmarks/results/codec_paths.json) and was removed: not worth its code."""
    width, height = struct.unpack(">II", data[16:24])
    _check_dimensions(path, width, height, max_pixels)
    try:
        arr = imagecodecs.png_decode(data)
    except Exception as e:  # imagecodecs.PngError and the like: libpng's own reason
        raise ImageReadError(path, f"corrupt or truncated image ({e})") from None
    if arr.dtype == np.uint16:
        return _windowed(path, arr, None, 16)
    return XRay(str(path), arr, None, 8)


def _read_raster(path: Path, data: bytes, max_pixels: int) -> XRay:
    try:
        with Image.open(io.BytesIO(data)) as im:  # parses the header only
            _check_dimensions(path, im.width, im.height, max_pixels)
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)  # multi-page TIFF: the first page is the radiograph
            im.load()
            # as displayed: a phone or scanner JPEG may store rotated pixels plus an EXIF orientation
            arr, bits = _pil_to_gray(ImageOps.exif_transpose(im))
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image (content is not PNG/JPEG/BMP/TIFF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(path, f"absurd dimensions, decompression bomb refused ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(path, f"corrupt or truncated image ({e})") from None
    if arr.dtype == np.uint16:
        return _windowed(path, arr, None, bits)
    try:
        return XRay(str(path), arr if bits == 8 else _to_unit(arr, bits), None, bits)
    except ValueError as e:
        raise ImageReadError(path, str(e)) from None


def _pil_to_gray(im: Image.Image) -> tuple[np.ndarray, int]:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im, dtype=np.uint16), 16
    if mode == "I":
        return np.asarray(im, dtype=np.int64), 32
    if mode == "F":
        return np.asarray(im, dtype=np.float32), 32
    if mode == "L":
        return np.asarray(im, dtype=np.uint8), 8
    if mode in ("1",):
        return np.asarray(im.convert("L"), dtype=np.uint8), 8
    # RGB, RGBA, LA, P, CMYK, YCbCr...: composite on black for alpha, then luminance
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(bg, im)
    return np.asarray(im.convert("L"), dtype=np.uint8), 8


def _to_unit(arr: np.ndarray, bits: int) -> np.ndarray:
    """Map stored values to [0, 1]. 8-bit keeps its scale; deeper images are stretched min..max
    because 12-bit detectors stored in 16-bit containers would otherwise look black."""
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D gray image, got shape {arr.shape}")
    if bits == 8:
        return arr.astype(np.float32) / 255.0
    a = arr.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.all():  # NaN/inf pixels (float TIFFs): left out of the window, shown as its minimum
        if not finite.any():
            raise ValueError("no finite pixel value (all NaN or infinite)")
        a = np.where(finite, a, a[finite].min())
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def _read_dicom(path: Path, max_pixels: int, size: int, reduce_for: PreprocessSpec | None = None) -> XRay:
    from lungrt.data.dicom import decoding_plugin, header_facts, missing_decoder
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = read_dicom_dataset(path, defer_size=_DEFER_BYTES)  # pixel data read below, once, without copies
    if not_image := not_a_radiograph(ds):
        raise NotARadiograph(path, not_image)
    if "PixelData" not in ds:
        if _PIXEL_DATA_TAG in path.read_bytes():  # the tag is there but pydicom stopped before it
            raise ImageReadError(path, "DICOM is cut short (truncated inside its pixel data)")
        raise ImageReadError(path, "DICOM has no pixel data")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    pixel_bytes = _pixel_data_in_file(ds, tsyntax)
    if pixel_bytes is not None and size < sum(pixel_bytes):
        raise ImageReadError(path, "DICOM is cut short (truncated inside its pixel data)")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    _check_dimensions(path, cols, rows, max_pixels)
    if (frames := int(ds.get("NumberOfFrames", 1) or 1)) > 1:  # cine, volumes: a study may hold them beside its films
        raise NotARadiograph(path, f"not a radiograph: multi-frame DICOM ({frames} frames); skipped")
    if tsyntax is not None and (missing := missing_decoder(tsyntax)):
        raise ImageReadError(path, missing)
    identity = (
        float(ds.get("RescaleSlope", 1) or 1) == 1
        and float(ds.get("RescaleIntercept", 0) or 0) == 0
        and "ModalityLUTSequence" not in ds
        and "VOILUTSequence" not in ds
        and "WindowCenter" not in ds
    )
    stored = int(ds.get("BitsStored", 16) or 16)
    unsigned16 = int(ds.get("BitsAllocated", 0) or 0) == 16 and int(ds.get("PixelRepresentation", 0) or 0) == 0
    options = {}
    if identity and unsigned16:
        # pydicom clears the unused high bits with two full-size shifts (2 ms at 12 MP); they are
        # almost always zero already, so they are checked below and cleared only when set
        options["correct_unused_bits"] = False
    if tsyntax is not None and (plugin := decoding_plugin(tsyntax)):
        options["decoding_plugin"] = plugin
    native = identity and unsigned16 and _is_native_uint16(ds, tsyntax, pixel_bytes, rows, cols)
    header = header_facts(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if native and reduce_for is not None and reduce_for.resizes_in_bands(rows, cols):
        small, lo, hi = _native_uint16_reduced(path, pixel_bytes[0], rows, cols, reduce_for.size)
        if not hi >> stored:  # set high bits (an old overlay plane) are cleared on the whole image, below
            return XRay(
                str(path),
                small,
                _dicom_spacing(ds),
                stored,
                (lo, hi, photometric == "MONOCHROME1"),
                header,
                reduced_from=(rows, cols),
            )
    try:
        if native:
            raw = np.fromfile(path, dtype="<u2", count=rows * cols, offset=pixel_bytes[0]).reshape(rows, cols)
        else:
            if options:
                ds.pixel_array_options(**options)
            raw = ds.pixel_array
    except Exception as e:
        name = getattr(tsyntax, "name", str(tsyntax))
        raise ImageReadError(path, f"corrupt {name} pixel data ({type(e).__name__}: {e})") from None
    if raw.ndim == 3 and photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        raw = raw.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if raw.ndim != 2:
        raise ImageReadError(path, f"DICOM pixel data of shape {raw.shape} is not a 2-D radiograph")
    if identity and raw.dtype == np.uint16:  # the common detector file: no float work at full size
        xray = _windowed(path, raw, _dicom_spacing(ds), stored, photometric == "MONOCHROME1")
        if unsigned16 and xray.window[1] >> stored:  # set high bits (an old overlay plane): clear them as pydicom would
            xray = _windowed(
                path, np.bitwise_and(raw, (1 << stored) - 1), xray.spacing_mm, stored, photometric == "MONOCHROME1"
            )
        xray.header = header
        return xray
    values = apply_modality_lut(raw, ds)  # Rescale Slope/Intercept
    values = apply_voi_lut(values, ds)  # VOI LUT sequence or Window Center/Width
    values = _to_unit(np.asarray(values, dtype=np.float64), 16)
    if photometric == "MONOCHROME1":  # low values are bright in MONOCHROME1
        values = 1.0 - values
    return XRay(str(path), values, _dicom_spacing(ds), stored, header=header)


# SOP classes that hold no radiograph: segmentation/registration, structured reports, presentation
# states, encapsulated documents, key object selection, raw data, waveforms
NOT_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66": "a segmentation, registration or other derived non-image object",
    "1.2.840.10008.5.1.4.1.1.88.": "a structured report",
    "1.2.840.10008.5.1.4.1.1.11.": "a presentation state",
    "1.2.840.10008.5.1.4.1.1.104.": "an encapsulated document",
    "1.2.840.10008.5.1.4.1.1.9.": "a waveform",
    "1.2.840.10008.5.1.4.1.1.481.": "a radiotherapy object",
}


def not_a_radiograph(ds) -> str:
    """Why a DICOM data set is not a radiograph to segment, by its SOP Class ('' when it may be one)."""
    sop_class = str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    for prefix, what in NOT_IMAGE_SOP_CLASSES.items():
        if sop_class.startswith(prefix):
            return f"not a radiograph: {what} (SOP Class {sop_class}); skipped"
    return ""


def read_dicom_dataset(path: str | Path, **kwargs):
    """pydicom's data set of `path`, also for a file without preamble and File Meta (read when it parses as
    DICOM, the transfer syntax inferred as pydicom does); ImageReadError with the reason otherwise."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        try:
            return pydicom.dcmread(path, **kwargs)
        except InvalidDicomError:
            ds = pydicom.dcmread(path, force=True, **kwargs)
            if "SOPClassUID" not in ds and "Rows" not in ds:
                raise InvalidDicomError("neither a Part-10 header nor a data set with an SOP Class or image size")
            _infer_transfer_syntax(ds)
            return ds
    except (PermissionError, FileNotFoundError, IsADirectoryError):
        raise  # read_xray names these
    except InvalidDicomError as e:
        raise ImageReadError(path, f"not a valid DICOM file ({e})") from None
    except Exception as e:  # pydicom raises many kinds on truncated headers
        raise ImageReadError(path, f"corrupt DICOM ({type(e).__name__}: {e})") from None


def _infer_transfer_syntax(ds) -> None:
    """A bare data set read with force: the transfer syntax it was parsed in, so its pixels decode."""
    from pydicom import uid
    from pydicom.dataset import FileMetaDataset

    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit = ds.original_encoding[0] if getattr(ds, "original_encoding", None) else True
        little = ds.original_encoding[1] if getattr(ds, "original_encoding", None) else True
        meta.TransferSyntaxUID = (
            uid.ImplicitVRLittleEndian
            if implicit
            else uid.ExplicitVRLittleEndian
            if little
            else uid.ExplicitVRBigEndian
        )
    ds.file_meta = meta


_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
_DEFER_BYTES = 64 * 1024  # header elements are read; larger values (the pixel data) when asked


def _pixel_data_in_file(ds, tsyntax) -> tuple[int, int] | None:
    """(offset, length) in the file of pixel data pydicom deferred (read with `defer_size`), when
    its length is defined; None otherwise, and for a deflated file (offsets in the inflated stream)."""
    from pydicom import uid

    if str(tsyntax) == uid.DeflatedExplicitVRLittleEndian:
        return None
    element = ds.get_item(0x7FE00010, keep_deferred=True)
    offset, length = getattr(element, "value_tell", None), getattr(element, "length", 0xFFFFFFFF)
    if offset is None or getattr(element, "value", None) is not None or length == 0xFFFFFFFF:
        return None
    return offset, length


def _is_native_uint16(ds, tsyntax, pixel_bytes: tuple[int, int] | None, rows: int, cols: int) -> bool:
    """The common detector file (uncompressed little-endian, 16 bits allocated, one sample, one
    frame), read straight from the file: pydicom's pixel_array spends ~8 ms per 5 MP image on
    copies and checks for the same bytes, np.fromfile ~1 ms. Not for pixel data shorter than Rows x
    Columns (pydicom's path then says what is wrong)."""
    from pydicom import uid

    return (
        str(tsyntax) in (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian)
        and int(ds.get("SamplesPerPixel", 1)) == 1
        and pixel_bytes is not None
        and pixel_bytes[1] >= rows * cols * 2
    )


READ_BAND_ROWS = 64  # ~0.3 MB of a 2,500 px wide film: read, measured and reduced while in the core's cache


def _native_uint16_reduced(path: Path, offset: int, rows: int, cols: int, size: int) -> tuple[np.ndarray, int, int]:
    """A native detector file's pixels reduced to size x size by `area_downsize_bands` as they are
    read, band by band into one small buffer, with their lowest and highest value (the window):
    the megapixels are read once and never held whole (~1 ms and a 13 MB array less per 5 MP film)."""
    extremes = [65535, 0]

    def bands():
        buffer = np.empty((READ_BAND_ROWS, cols), "<u2")
        with open(path, "rb") as f:  # buffered: readinto fills the band (a band is larger than the buffer: no copy)
            f.seek(offset)
            for top in range(0, rows, READ_BAND_ROWS):
                band = buffer[: min(READ_BAND_ROWS, rows - top)]
                if f.readinto(memoryview(band).cast("B")) != band.nbytes:
                    raise ImageReadError(path, "DICOM is cut short (truncated inside its pixel data)")
                lo, hi, _, _ = cv2.minMaxLoc(band)
                extremes[:] = min(extremes[0], int(lo)), max(extremes[1], int(hi))
                yield band

    try:
        small = area_downsize_bands(bands(), rows, cols, size, np.uint16)
    except OSError as e:
        raise ImageReadError(path, f"cannot read ({e.strerror or e})") from None
    return small, extremes[0], extremes[1]


def _dicom_spacing(ds) -> tuple[float, float] | None:
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        v = ds.get(tag)
        if v is not None and len(v) == 2:
            try:
                r, c = float(v[0]), float(v[1])
            except (TypeError, ValueError):
                continue
            if r > 0 and c > 0 and np.isfinite(r) and np.isfinite(c):  # NaN\NaN, 0\0 and negatives are no spacing
                return (r, c)
    return None


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask as bool: value > 127 for 0/255 masks, non-zero for small label maps."""
    xr = read_xray(path)
    raw = xr.gray8
    if raw.max() <= 16:  # label map (0/1, 0/1/2...) rather than a 0/255 picture
        return raw > 0
    return raw > 127


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    """Write via a temp file + rename in the same folder, so a crash never leaves half a file.
    `durable=False` skips the fsync: still atomic for a killed process; callers that write many
    small files check sizes on resume and sync once at the end instead (power loss)."""
    with _atomic_file(path, "wb", durable) as f:
        f.write(data)


def atomic_text_file(path: str | Path):
    """A UTF-8 text file written as a stream (`with atomic_text_file(p) as f: ...`) and renamed into
    place, durable, when the block ends; on an error `path` is left as it was."""
    return _atomic_file(path, "w", True, encoding="utf-8", newline="")


@contextlib.contextmanager
def _atomic_file(path: str | Path, mode: str, durable: bool, **text):
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        fd = _create_new(tmp)
    except FileNotFoundError:  # the first file of its folder
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _create_new(tmp)
    try:
        with os.fdopen(fd, mode, **text) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_new(path: Path) -> int:
    """Open a file that must not exist yet; mode 0666 less the umask, like any file the user makes
    (one system call, where mkstemp's 0600 needed a chmod and a lookup of the umask)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)


def sync_filesystem(path: str | Path) -> None:
    """Flush the filesystem that holds `path` (Linux syncfs), not every filesystem of the host as
    os.sync would; os.sync where syncfs is unavailable."""
    import ctypes

    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def temp_path_for(path: str | Path) -> Path:
    """A temp name beside `path`, unique to this process and call: two processes making the same
    cached file never write into one temp file; the rename that follows is atomic."""
    path = Path(path)
    return path.with_name(f".{path.name[:200]}.{os.getpid()}-{os.urandom(4).hex()}{TEMP_SUFFIX}")


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 gray or RGB array."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def encode_mask_png1(mask: np.ndarray) -> bytes:
    """A 1-bit grayscale PNG of a mask (non-zero = 1, read back as 0/255 by OpenCV and as mode "1"
    by Pillow): an eighth of the bytes to compress. OpenCV's PNG_BILEVEL and Pillow's mode "1" both
    convert pixel by pixel (7-9 ms for a 5-megapixel mask); np.packbits and zlib-ng make the same
    pixels in ~0.5 ms. Rows are unfiltered (filter byte 0), as PNG allows."""
    h, w = mask.shape
    rows = np.packbits(mask if mask.dtype in (np.uint8, np.bool_) else mask != 0, axis=1)
    raw = np.empty((h, rows.shape[1] + 1), np.uint8)
    raw[:, 0] = 0
    raw[:, 1:] = rows
    idat = _deflate_fast(raw)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # bit depth 1, grayscale, no interlace
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _deflate_fast(data: np.ndarray) -> bytes:
    """A zlib stream of `data`, fast: zlib-ng's level 1 (a 5-megapixel mask's 0.7 MB of packed rows
    in ~0.2 ms, where the system zlib's run-length level 1 took 1.4; the stream is a few KB larger).
    zlib itself where imagecodecs was built without zlib-ng."""
    if imagecodecs.ZLIBNG.available:
        return imagecodecs.zlibng_encode(data, level=1)
    packer = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    return packer.compress(data.tobytes()) + packer.flush()


def write_png(path: str | Path, array: np.ndarray) -> None:
    atomic_write_bytes(path, encode_png(array))


def array_xray(a: np.ndarray) -> XRay:
    """A 2-D array as an X-ray: uint8 kept as is, deeper integer or float values stretched like
    16-bit files. Refused as the CLI refuses a file: too small, or not a gray image's numbers
    (bool: most likely a mask passed by mistake; complex; objects)."""
    a = np.asarray(a)
    if a.ndim != 2:
        raise LungrtError(f"predict: an array must be 2-D (H, W), got shape {a.shape}")
    if a.dtype == bool:
        raise LungrtError("predict: a bool array looks like a mask, not an X-ray; pass the image's gray values")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise LungrtError(f"predict: an array of {a.dtype} is not a gray image; pass integer or float values")
    if min(a.shape) < MIN_SIDE:
        raise LungrtError(f"predict: image too small ({a.shape[1]}x{a.shape[0]}, need at least {MIN_SIDE} px a side)")
    if a.dtype == np.uint8:
        return XRay("", a)
    try:
        return XRay("", _to_unit(a, 16), None, 16)
    except ValueError as e:
        raise LungrtError(f"predict: {e}") from None
