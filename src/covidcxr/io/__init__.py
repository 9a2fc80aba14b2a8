"""Reading and writing files: images (PNG/JPEG/TIFF/DICOM) into one float32 array in [0, 1], PNGs, JSON, hashes.

The package exports the public functions; ``image``, ``dicom`` and ``files`` own them. No torch here."""

from __future__ import annotations

from covidcxr.io.dicom import write_dicom
from covidcxr.io.files import file_sha256, json_safe, save_png, write_json
from covidcxr.io.image import MAX_PIXELS, ImageMeta, load_image, load_image_bytes, read_mask, sniff_format

__all__ = ["MAX_PIXELS", "ImageMeta", "file_sha256", "json_safe", "load_image", "load_image_bytes", "read_mask", "save_png", "sniff_format", "write_dicom", "write_json"]
