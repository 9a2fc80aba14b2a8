"""Limits on what a decoded file can carry into the service: closed header vocabulary, bounded decoded size."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from covidcxr.errors import ConfigError, UnsupportedImageError
from covidcxr.io.dicom import write_dicom
from covidcxr.io.image import MAX_DECODED_SIDE, _block_mean, load_image, load_image_bytes
from covidcxr.vocab import MODALITIES, VIEWS, modality_from_header, view_from_header

MARKER = "<script>XSS-MARKER"
# write_dicom passes the test's malformed header values on to pydicom, which warns about them
pytestmark = pytest.mark.filterwarnings("ignore:(Invalid value|The value length).*VR CS")


@pytest.fixture
def gray() -> np.ndarray:
    yy, xx = np.mgrid[0:40, 0:56] / 56.0
    return (0.5 + 0.4 * np.sin(3 * xx) * np.cos(2 * yy)).astype(np.float32)


# ------------------------------------------------------------------------------------ closed vocabulary
@pytest.mark.parametrize(
    ("raw", "view"),
    [
        ("PA", "PA"), ("pa", "PA"), (" PA ", "PA"), ("AP", "AP"),
        ("AP SUPINE", "AP supine"), ("APS", "AP supine"), ("SUPINE AP", "AP supine"), ("ap  supine", "AP supine"),
        ("LL", "lateral"), ("RL", "lateral"), ("LATERAL", "lateral"), ("LAT", "lateral"),
        ("", "unknown"), ("OBLIQUE", "unknown"), (MARKER, "unknown"),
    ],
)
def test_dicom_view_mapped_to_closed_vocabulary(tmp_path, gray, raw, view):
    _, meta = load_image(write_dicom(tmp_path / "v.dcm", gray, view=raw or None, modality="DX"))
    assert meta.view == view and meta.view in VIEWS
    assert meta.modality == "DX"
    assert view_from_header(raw) == view


@pytest.mark.parametrize(("raw", "modality"), [("CR", "CR"), ("DX", "DX"), ("DR", "other"), ("RG", "other"),
                                                ("OT", "other")])
def test_dicom_modality_mapped_to_closed_vocabulary(tmp_path, gray, raw, modality):
    _, meta = load_image(write_dicom(tmp_path / "m.dcm", gray, view="PA", modality=raw))
    assert meta.modality == modality and meta.modality in MODALITIES and meta.view == "PA"


def test_header_marker_never_reaches_meta(tmp_path, gray, caplog):
    path = write_dicom(tmp_path / "x.dcm", gray, view=MARKER, modality="OT")
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="covidcxr"):
        image, meta = load_image(path)
    assert (meta.view, meta.modality) == ("unknown", "other")
    assert "XSS-MARKER" not in repr(meta).upper() and "<SCRIPT" not in repr(meta).upper()
    assert "XSS-MARKER" not in caplog.text.upper()  # the debug log names the length, not the text
    assert image.shape == gray.shape


def test_refused_modality_marker_not_echoed(tmp_path, gray):
    path = write_dicom(tmp_path / "x.dcm", gray, view=MARKER, modality=MARKER)
    with pytest.raises(UnsupportedImageError, match="not a projection radiograph") as info:
        load_image(path)
    assert "XSS-MARKER" not in str(info.value).upper()


def test_unknown_photometric_not_echoed(tmp_path, gray):
    import pydicom

    path = write_dicom(tmp_path / "x.dcm", gray, bits_stored=8)
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "<B>XSS"
    ds.save_as(path)
    with pytest.raises(UnsupportedImageError, match="photometric interpretation") as info:
        load_image(path)
    assert "XSS" not in str(info.value).upper()


def test_vocabulary_functions_only_return_vocabulary():
    for raw in ["PA", "x" * 200, "AP\\LL", None, 3, MARKER]:
        assert view_from_header(raw) in VIEWS
        assert modality_from_header(raw) in MODALITIES


def test_png_view_and_modality_stay_none(tmp_path, gray):
    Image.fromarray(np.rint(gray * 255).astype(np.uint8)).save(tmp_path / "a.png")
    _, meta = load_image(tmp_path / "a.png")
    assert meta.view is None and meta.modality is None


# ------------------------------------------------------------------------------------ bounded decode
def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def test_large_png_decoded_reduced(tmp_path):
    yy, xx = np.mgrid[0:5000, 0:6000]
    stored = ((xx // 7 + yy // 5) % 256).astype(np.uint8)
    image, meta = load_image_bytes(_png(stored), "big.png")
    assert max(image.shape) <= MAX_DECODED_SIDE and image.shape == (2500, 3000)
    assert image.dtype == np.float32 and image.flags.c_contiguous
    assert meta.original_size == (5000, 6000)
    assert any("reduced from 6000 x 5000 to 3000 x 2500" in w for w in meta.warnings)
    expected = stored.reshape(2500, 2, 3000, 2).mean(axis=(1, 3)) / 255.0
    np.testing.assert_allclose(image, expected, atol=1 / 255 + 1e-6)  # Pillow rounds the block means


@pytest.mark.parametrize("kind", ["L", "I;16", "jpeg"])
def test_max_side_reduces_every_pil_kind(kind):
    rng = np.random.default_rng(0)
    if kind == "I;16":
        data = _png((rng.random((90, 130)) * 65535).astype(np.uint16))
    elif kind == "L":
        data = _png((rng.random((90, 130)) * 255).astype(np.uint8))
    else:
        buf = io.BytesIO()
        Image.fromarray(np.full((90, 130), 128, np.uint8)).save(buf, "JPEG")
        data = buf.getvalue()
    full, _ = load_image_bytes(data, "x", max_side=None)
    small, meta = load_image_bytes(data, "x", max_side=50)
    assert small.shape == (30, 44) and meta.original_size == (90, 130)  # factor 3, partial edge blocks kept
    assert abs(float(small.mean()) - float(full.mean())) < 0.01


def test_jpeg_exif_orientation_kept_when_reduced():
    im = Image.fromarray(np.zeros((60, 100), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    full, m0 = load_image_bytes(buf.getvalue(), "r.jpg", max_side=None)
    small, m1 = load_image_bytes(buf.getvalue(), "r.jpg", max_side=50)
    assert full.shape == m0.original_size == m1.original_size == (100, 60)
    assert small.shape == (50, 30)


def test_small_image_untouched(tmp_path, gray):
    stored = np.rint(gray * 65535).astype(np.uint16)
    data = _png(stored)
    image, meta = load_image_bytes(data, "a.png")
    unlimited, _ = load_image_bytes(data, "a.png", max_side=None)
    assert np.array_equal(image, unlimited) and np.array_equal(image, stored.astype(np.float32) / 65535)
    assert meta.warnings == [] and meta.original_size == gray.shape


def test_large_dicom_decoded_reduced(tmp_path):
    yy, xx = np.mgrid[0:900, 0:1200]
    stored = ((xx * 3 + yy) % 4096).astype(np.uint16)
    path = write_dicom(tmp_path / "big.dcm", stored, bits_stored=12, window=(2048, 4096))
    full, _ = load_image(path, max_side=None)
    image, meta = load_image(path, max_side=400)
    assert image.shape == (300, 400) and meta.original_size == (900, 1200)
    assert any("reduced from 1200 x 900 to 400 x 300" in w for w in meta.warnings)
    np.testing.assert_allclose(image, full.reshape(300, 3, 400, 3).mean(axis=(1, 3)), atol=2e-3)


def test_block_mean_keeps_dtype_and_edges():
    arr = np.arange(7 * 5, dtype=np.uint16).reshape(7, 5)
    out = _block_mean(arr, 2)
    assert out.dtype == np.uint16 and out.shape == (4, 3)
    assert out[0, 0] == np.rint(arr[:2, :2].mean()) and out[3, 2] == arr[6, 4]
    rgb = np.dstack([arr, arr, arr]).astype(np.uint8)
    assert _block_mean(rgb, 3).shape == (3, 2, 3)


@pytest.mark.parametrize("bad", [0, -5, 2.5, "big", True])
def test_bad_max_side(gray, bad):
    with pytest.raises(ConfigError, match="max_side"):
        load_image_bytes(_png(np.rint(gray * 255).astype(np.uint8)), "a.png", max_side=bad)
