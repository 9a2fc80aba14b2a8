"""covidcxr.io: one contract for PNG/JPEG/TIFF/DICOM, specific errors that name the file and the reason."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid

from covidcxr.errors import ConfigError, ImageReadError, ImageTooLargeError, UnsupportedImageError
from covidcxr.io.dicom import write_dicom
from covidcxr.io.files import save_png, unique_names
from covidcxr.io.image import ImageMeta, load_image, load_image_bytes


@pytest.fixture
def gray() -> np.ndarray:
    """A smooth seeded gray image in [0, 1] (smooth so that lossy JPEG stays close)."""
    yy, xx = np.mgrid[0:48, 0:64] / 64.0
    return (0.5 + 0.4 * np.sin(3 * xx) * np.cos(2 * yy)).astype(np.float32)


def check_contract(image: np.ndarray, meta: ImageMeta, shape: tuple[int, int], fmt: str) -> None:
    assert image.dtype == np.float32 and image.shape == shape and image.flags.c_contiguous
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert meta.format == fmt and meta.original_size == shape


# ------------------------------------------------------------------------------------------ PIL formats
@pytest.mark.parametrize(
    ("suffix", "mode", "bits", "fmt", "tol"),
    [
        ("png", "L", 8, "png", 1 / 255),
        ("png", "I;16", 16, "png", 1 / 65535),
        ("tif", "L", 8, "tiff", 1 / 255),
        ("tif", "I;16", 16, "tiff", 1 / 65535),
        ("jpg", "L", 8, "jpeg", 0.03),
    ],
)
def test_pil_formats_roundtrip(tmp_path, gray, suffix, mode, bits, fmt, tol):
    top = 2**bits - 1
    stored = np.rint(gray * top).astype(np.uint8 if bits == 8 else np.uint16)
    path = tmp_path / f"img.{suffix}"
    Image.fromarray(stored).save(path)
    image, meta = load_image(path)
    check_contract(image, meta, gray.shape, fmt)
    assert meta.bit_depth == bits and meta.photometric == "MONOCHROME2" and meta.view is None
    np.testing.assert_allclose(image, stored / top, atol=tol)
    assert meta.warnings == []


def test_jpeg_exif_orientation_applied(tmp_path, gray):
    im = Image.fromarray(np.rint(gray * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    image, meta = load_image(tmp_path / "rot.jpg")
    assert image.shape == meta.original_size == gray.shape[::-1]


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_save_png_roundtrip(tmp_path, gray, bit_depth):
    image, meta = load_image(save_png(tmp_path / "a.png", gray, bit_depth=bit_depth))
    assert meta.bit_depth == bit_depth
    np.testing.assert_allclose(image, gray, atol=0.5 / (2**bit_depth - 1) + 1e-6)


def test_save_png_mask_values(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:6] = 1
    save_png(tmp_path / "m.png", mask * np.uint8(255))
    assert set(np.unique(np.asarray(Image.open(tmp_path / "m.png")))) == {0, 255}


@pytest.mark.parametrize(
    ("array", "bit_depth", "match"),
    [
        (np.full((4, 4), 1.5), 8, r"\[0, 1\]"),
        (np.full((4, 4), np.nan), 8, "finite"),
        (np.full((4, 4), 300, np.int32), 8, r"\[0, 255\]"),
        (np.zeros((4, 4)), 12, "bit_depth=12"),
        (np.zeros((4, 4, 2)), 8, "shape"),
    ],
)
def test_save_png_rejects_bad_input(tmp_path, array, bit_depth, match):
    with pytest.raises(ConfigError, match=match):
        save_png(tmp_path / "x.png", array, bit_depth=bit_depth)


def test_rgb_png_converted_with_warning(tmp_path, gray, caplog):
    rgb = np.stack([gray, gray * 0.5, gray * 0.2], -1)
    save_png(tmp_path / "rgb.png", rgb)
    with caplog.at_level(logging.WARNING, logger="covidcxr.io"):
        image, meta = load_image(tmp_path / "rgb.png")
    check_contract(image, meta, gray.shape, "png")
    expected = np.rint(rgb * 255) @ np.array([0.299, 0.587, 0.114]) / 255
    np.testing.assert_allclose(image, expected, atol=1e-5)
    assert meta.photometric == "RGB" and "grayscale" in meta.warnings[0]
    assert "rgb.png" in caplog.text and "converted to grayscale" in caplog.text


def test_gif_is_unsupported(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "a.gif")
    with pytest.raises(UnsupportedImageError, match=r"a\.gif: GIF images are not supported"):
        load_image(tmp_path / "a.gif")


def test_multipage_tiff_is_refused(tmp_path):
    frames = [Image.new("L", (8, 8), v) for v in (0, 128)]
    frames[0].save(tmp_path / "multi.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(UnsupportedImageError, match="multi-page TIFF"):
        load_image(tmp_path / "multi.tif")


def _png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR is patched to claim ``width x height`` (the pixels are never allocated)."""
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature(8) + length(4) + type(4)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize(("width", "height"), [(9000, 9000), (20000, 20000)])  # ours; PIL's bomb error
def test_huge_png_refused_before_decoding(tmp_path, width, height):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_claiming_size(width, height))
    with pytest.raises(ImageTooLargeError, match=r"huge\.png: .*refused|huge\.png: .*exceeds the limit"):
        load_image(path)


# ------------------------------------------------------------------------------------------ bad files
def _truncated_png(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.rint(gray * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()[:-40]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.png", lambda g: b"", "empty file"),
        ("random.png", lambda g: np.random.default_rng(0).bytes(4096), "not a recognised image"),
        ("notes.txt", lambda g: b"patient notes, not an image\n" * 20, "not a recognised image"),
        ("trunc.png", _truncated_png, "truncated or corrupt PNG"),
        pytest.param(
            "junk.dcm",
            lambda g: b"\0" * 128 + b"DICM" + b"\x02\x00\x10" * 7,
            "corrupt",
            marks=pytest.mark.filterwarnings("ignore::UserWarning"),  # pydicom warns while parsing the junk
        ),
    ],
)
def test_unreadable_files_raise_image_read_error(tmp_path, gray, name, content, match):
    path = tmp_path / name
    path.write_bytes(content(gray))
    with pytest.raises(ImageReadError, match=match) as err:
        load_image(path)
    assert str(path) in str(err.value) and err.value.path == str(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageReadError, match=r"nope\.png: file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="not a regular file"):
        load_image(tmp_path)


def test_truncated_dicom(tmp_path, gray):
    data = write_dicom(tmp_path / "full.dcm", gray).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ImageReadError, match=r"cut\.dcm: (corrupt or truncated DICOM|cannot decode pixel data)"):
        load_image(tmp_path / "cut.dcm")


def test_load_image_bytes_uses_name(gray):
    buf = io.BytesIO()
    Image.fromarray(np.rint(gray * 255).astype(np.uint8)).save(buf, format="PNG")
    image, meta = load_image_bytes(buf.getvalue(), "upload.png")
    check_contract(image, meta, gray.shape, "png")
    assert meta.path == "upload.png"
    with pytest.raises(ImageReadError, match=r"^upload\.png: empty file"):
        load_image_bytes(b"", "upload.png")


# ------------------------------------------------------------------------------------------ DICOM
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"bits_stored": 12},
        {"bits_stored": 8},
        {"photometric": "MONOCHROME1"},
        {"rescale": (2.0, -1024.0), "bits_stored": 12},
        {"rescale": (0.5, 100.0), "photometric": "MONOCHROME1"},
        {"rescale": (1.0, -1024.0), "window": (2048 - 1024, 4096), "bits_stored": 12},  # full-range window
    ],
)
def test_dicom_roundtrip(tmp_path, gray, kwargs, caplog):
    path = write_dicom(tmp_path / "x.dcm", gray, view="AP", **kwargs)
    with caplog.at_level(logging.WARNING, logger="covidcxr.io"):
        image, meta = load_image(path)
    check_contract(image, meta, gray.shape, "dicom")
    bits = kwargs.get("bits_stored", 16)
    np.testing.assert_allclose(image, gray, atol=0.5 / (2**bits - 1) + 1e-5)
    assert (meta.bit_depth, meta.view, meta.modality) == (bits, "AP", "DX")
    inverted = kwargs.get("photometric") == "MONOCHROME1"
    assert meta.photometric == kwargs.get("photometric", "MONOCHROME2")
    assert ("MONOCHROME1" in caplog.text) == inverted and bool(meta.warnings) == inverted


def test_dicom_monochrome1_stores_inverted_pixels(tmp_path, gray):
    ds = pydicom.dcmread(write_dicom(tmp_path / "m1.dcm", gray, photometric="MONOCHROME1"))
    assert ds.pixel_array[0, 0] == 65535 - round(float(gray[0, 0]) * 65535)


def test_dicom_voi_window(tmp_path, gray):
    center, width = 45000.0, 16000.0
    image, _ = load_image(write_dicom(tmp_path / "w.dcm", gray, window=(center, width)))
    stored = np.rint(gray.astype(np.float64) * 65535)
    expected = np.clip((stored - (center - 0.5)) / (width - 1) + 0.5, 0, 1)  # DICOM LINEAR window
    np.testing.assert_allclose(image, expected, atol=1e-5)
    assert image.min() == 0.0 and image.max() == 1.0  # the window clips both ends of this image


def test_dicom_invalid_window(tmp_path, gray):
    path = write_dicom(tmp_path / "badwin.dcm", gray, window=(100.0, 0.0))
    with pytest.raises(ImageReadError, match=r"badwin\.dcm: invalid Modality/VOI LUT or window"):
        load_image(path)


def test_dicom_detected_by_magic_not_name(tmp_path, gray):
    path = write_dicom(tmp_path / "really_dicom.png", gray, view="PA")
    image, meta = load_image(path)
    assert meta.format == "dicom" and meta.view == "PA"
    np.testing.assert_allclose(image, gray, atol=1e-5)


def _encoder_available(tsyntax: str) -> bool:
    from pydicom.pixels import get_encoder

    try:
        return get_encoder(tsyntax).is_available
    except NotImplementedError:
        return False


@pytest.mark.parametrize(
    "tsyntax", [uid.RLELossless, uid.JPEG2000Lossless, uid.JPEGLSLossless, uid.HTJ2KLossless, uid.JPEGLosslessSV1]
)
def test_dicom_compressed_lossless(tmp_path, gray, tsyntax):
    if not _encoder_available(tsyntax):
        pytest.skip(f"no installed pydicom encoder for {tsyntax.name}")
    path = write_dicom(tmp_path / "c.dcm", gray, transfer_syntax=tsyntax, photometric="MONOCHROME1")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == tsyntax
    image, meta = load_image(path)
    np.testing.assert_allclose(image, gray, atol=1e-5)
    assert meta.photometric == "MONOCHROME1"


def _encapsulated_jpeg(tmp_path: Path, gray: np.ndarray) -> Path:
    """8-bit JPEG baseline DICOM: encode with PIL and encapsulate (pydicom has no JPEG baseline encoder)."""
    from pydicom.encaps import encapsulate

    buf = io.BytesIO()
    Image.fromarray(np.rint(gray * 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    ds = pydicom.dcmread(write_dicom(tmp_path / "raw.dcm", gray, bits_stored=8))
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    ds.save_as(tmp_path / "jpeg.dcm", enforce_file_format=True)
    return tmp_path / "jpeg.dcm"


def test_dicom_jpeg_baseline(tmp_path, gray):
    image, meta = load_image(_encapsulated_jpeg(tmp_path, gray))
    check_contract(image, meta, gray.shape, "dicom")
    np.testing.assert_allclose(image, gray, atol=0.03)


def test_dicom_missing_plugin_names_it(tmp_path, gray, monkeypatch):
    from pydicom.pixels.decoders.base import Decoder

    path = write_dicom(tmp_path / "j2k.dcm", gray, transfer_syntax=uid.JPEG2000Lossless)
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    with pytest.raises(UnsupportedImageError, match=r"j2k\.dcm: no installed plugin .*pylibjpeg-openjpeg"):
        load_image(path)


def test_dicom_unknown_transfer_syntax(tmp_path, gray):
    ds = pydicom.dcmread(write_dicom(tmp_path / "a.dcm", gray))
    ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
    ds.PixelData = pydicom.encaps.encapsulate([b"\0" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "mpeg.dcm", enforce_file_format=True)
    with pytest.raises(UnsupportedImageError, match="cannot decode transfer syntax 'MPEG2"):
        load_image(tmp_path / "mpeg.dcm")


def test_dicom_rgb_converted_with_warning(tmp_path, gray, caplog):
    rgb = np.rint(np.stack([gray, gray, gray * 0.5], -1) * 255).astype(np.uint8)
    ds = pydicom.dcmread(write_dicom(tmp_path / "a.dcm", gray, bits_stored=8, modality="OT"))
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    ds.save_as(tmp_path / "rgb.dcm", enforce_file_format=True)
    with caplog.at_level(logging.WARNING, logger="covidcxr.io"):
        image, meta = load_image(tmp_path / "rgb.dcm")
    check_contract(image, meta, gray.shape, "dicom")
    np.testing.assert_allclose(image, rgb @ np.array([0.299, 0.587, 0.114]) / 255, atol=1e-5)
    assert "RGB colour DICOM converted to grayscale" in caplog.text


def test_dicom_multiframe_refused(tmp_path, gray):
    path = write_dicom(tmp_path / "mf.dcm", np.stack([gray, gray, gray]))
    with pytest.raises(UnsupportedImageError, match=r"mf\.dcm: multi-frame DICOM \(3 frames\)"):
        load_image(path)


def test_dicom_ct_refused(tmp_path, gray):
    path = write_dicom(tmp_path / "ct.dcm", gray, modality="CT")
    with pytest.raises(UnsupportedImageError, match="modality CT is not a projection radiograph"):
        load_image(path)


def test_dicom_structured_report_refused(tmp_path):
    from pydicom.dataset import FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    with pytest.raises(UnsupportedImageError, match=r"report\.dcm: DICOM object has no pixel data \(Basic Text SR"):
        load_image(tmp_path / "report.dcm")


def test_dicom_huge_header_refused_before_decoding(tmp_path, gray):
    ds = pydicom.dcmread(write_dicom(tmp_path / "a.dcm", gray))
    ds.Rows, ds.Columns = 9000, 9000  # pixel data stays tiny: decoding it would fail, so refusal comes first
    ds.save_as(tmp_path / "huge.dcm", enforce_file_format=True)
    with pytest.raises(ImageTooLargeError, match=r"huge\.dcm: 9000 x 9000 = 81,000,000 pixels exceeds"):
        load_image(tmp_path / "huge.dcm")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"photometric": "RGB"}, "photometric='RGB'"),
        ({"bits_stored": 17}, "bits_stored=17"),
    ],
)
def test_write_dicom_rejects_bad_settings(tmp_path, gray, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        write_dicom(tmp_path / "x.dcm", gray, **kwargs)


@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["in_range", "min_max_scaled"])
def test_float_tiff_nan_becomes_zero(tmp_path: Path, gray: np.ndarray, scale: float) -> None:
    """NaN pixels read as 0 and the result stays in [0, 1], whether the decoder's array is reused or copied."""
    data = gray * np.float32(scale)
    data[3, 5] = np.nan
    path = tmp_path / "f.tif"
    Image.fromarray(data, mode="F").save(path)
    image, meta = load_image(path)
    check_contract(image, meta, gray.shape, "tiff")
    assert image[3, 5] == 0.0 and np.isfinite(image).all()
    if scale == 1.0:
        keep = np.isfinite(data)
        np.testing.assert_array_equal(image[keep], data[keep])


@pytest.mark.parametrize(("names", "first", "expected"), [
    (["a", "b", "a", "a"], 2, ["a", "b", "a_2", "a_3"]),
    (["a", "a", "a_2"], 2, ["a", "a_2", "a_2_2"]),  # a later plain name that a renamed one took
    (["scan", "scan", "scan_1"], 1, ["scan", "scan_1", "scan_1_1"]),
])
def test_unique_names_never_repeat(names: list[str], first: int, expected: list[str]) -> None:
    got = unique_names(names, first=first)
    assert got == expected and len(set(got)) == len(got)
