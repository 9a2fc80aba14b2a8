"""Manifests, validation, the patient-level split, near-duplicates and the synthetic cohort (no torch)."""

from __future__ import annotations

from covidcxr.data.duplicates import find_near_duplicates, image_thumbnails
from covidcxr.data.manifest import (
    IMAGE_SUFFIXES,
    REQUIRED_COLUMNS,
    as_flags,
    both_label_mask,
    check_output_path,
    manifest_from_folder,
    read_manifest,
    summarize,
    validate_manifest,
    write_manifest,
)
from covidcxr.data.split import (
    crossval_folds,
    leave_out_folds,
    patient_groups,
    patient_split,
    select_split,
    split_balance,
)

__all__ = ["IMAGE_SUFFIXES", "REQUIRED_COLUMNS", "as_flags", "both_label_mask", "check_output_path", "crossval_folds", "find_near_duplicates", "image_thumbnails", "leave_out_folds", "manifest_from_folder", "patient_groups", "patient_split", "read_manifest", "select_split", "split_balance", "summarize", "validate_manifest", "write_manifest"]
