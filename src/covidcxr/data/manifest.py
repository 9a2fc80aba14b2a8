"""Manifests, their validation, the patient-level split and the near-duplicate check.

A manifest is a CSV with at least ``image,label,patient_id`` (optional ``mask,source,view,split,study_date,...``).
Relative paths are resolved against the CSV's folder; in memory ``image``/``mask`` are absolute path strings and
the folder is kept in ``df.attrs['root']``. Rows in messages are numbered as in a spreadsheet (header = row 1).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import ConfigError, ManifestError
from covidcxr.io.files import readable_mode
from covidcxr.vocab import LABELS, SPLITS

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "label", "patient_id")
PATH_COLUMNS = ("image", "mask")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom"})
_TEXT_COLUMNS = (*REQUIRED_COLUMNS, "mask", "source", "view", "split", "study_date")
_MAX_LISTED = 20  # per kind of problem, so that one systematic mistake does not bury the others


# ---------------------------------------------------------------------------------------------------------
# Reading, writing, validating
# ---------------------------------------------------------------------------------------------------------


def _text(series: pd.Series) -> pd.Series:
    """Missing values as '' and surrounding whitespace removed."""
    return series.astype(object).where(series.notna(), "").astype(str).str.strip()


def _resolve(root: str, value: str) -> str:
    return os.path.normpath(os.path.join(root, os.path.expanduser(value))) if value else ""


_TRUTHY = frozenset({"true", "1", "1.0", "yes"})
_FALSY = frozenset({"false", "0", "0.0", "no", "nan", "none", "<na>", ""})


def as_flags(values: pd.Series, column: str = "source_has_both_labels") -> np.ndarray:
    """Boolean flags from a column that a CSV round trip may have turned into text.

    Raises:
        ConfigError: A value that is neither true nor false (``astype(bool)`` would read "False" as True).
    """
    text = values.astype(str).str.strip().str.lower()
    bad = sorted(set(text) - _TRUTHY - _FALSY)
    if bad:
        raise ConfigError(f"column {column!r} must be boolean, got {bad[:5]}")
    return text.isin(_TRUTHY).to_numpy()


def both_label_mask(
    df: pd.DataFrame, reference: pd.DataFrame | None = None, label_col: str = "label"
) -> tuple[np.ndarray | None, list[str]]:
    """Rows from sources that hold both labels, where a model cannot score by recognising the source.

    The ``source_has_both_labels`` column is used when present; otherwise a source counts when ``reference``
    (default ``df``) holds both labels for it.

    Args:
        df: Rows with ``source`` (and ``label_col``).
        reference: Rows that decide which sources hold both labels (e.g. index + queries).
        label_col: Label column (``label`` names or ``y`` 0/1).

    Returns:
        ``(boolean mask, or None without a source column, sorted source names)``.

    Raises:
        ConfigError: A ``source_has_both_labels`` value that is not boolean.
    """
    if "source_has_both_labels" in df.columns:
        flag = as_flags(df["source_has_both_labels"])
        names = sorted(df.loc[flag, "source"].astype(str).unique()) if "source" in df.columns else []
        return flag, names
    if "source" not in df.columns:
        return None, []
    ref = reference if reference is not None and "source" in reference.columns else df
    n_labels = ref.groupby(ref["source"].astype(str))[label_col].nunique()
    names = sorted(n_labels.index[n_labels >= 2].tolist())
    return df["source"].astype(str).isin(names).to_numpy(), names


def read_manifest(path: str | Path, *, validate: bool = True) -> pd.DataFrame:
    """Read a manifest CSV and resolve its image/mask paths.

    Args:
        path: The CSV file.
        validate: Run :func:`validate_manifest` (warnings are logged).

    Returns:
        The table with absolute ``image``/``mask`` path strings; ``df.attrs['root']`` is the CSV's folder and
        ``df.attrs['manifest']`` the CSV itself.

    Raises:
        ManifestError: The file is missing or unreadable, or (with ``validate``) lists every problem found.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, ["manifest file not found"])
    try:
        df = pd.read_csv(path, dtype={c: str for c in _TEXT_COLUMNS}, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ManifestError(path, [f"not a readable CSV file ({exc})"]) from exc
    df.columns = [str(c).strip() for c in df.columns]
    for col in _TEXT_COLUMNS:
        if col in df.columns:
            df[col] = _text(df[col])
    root = os.path.dirname(os.path.abspath(path))
    for col in PATH_COLUMNS:
        if col in df.columns:
            df[col] = [_resolve(root, v) for v in df[col]]
    df.attrs["root"] = root
    df.attrs["manifest"] = os.path.abspath(path)
    if validate:
        for warning in validate_manifest(df, path):
            log.warning("%s: %s", path, warning)
    return df


def _rows(positions: Sequence[int] | np.ndarray) -> str:
    listed = ", ".join(str(int(p) + 2) for p in positions[:_MAX_LISTED])
    more = len(positions) - _MAX_LISTED
    return listed + (f" (+{more} more)" if more > 0 else "")


def _capped(problems: list[str], what: str) -> list[str]:
    if len(problems) <= _MAX_LISTED:
        return problems
    return [*problems[:_MAX_LISTED], f"... and {len(problems) - _MAX_LISTED} more rows with {what}"]


def validate_manifest(df: pd.DataFrame, path: str | Path | None = None) -> list[str]:
    """Check a manifest table and report every problem at once.

    Errors: missing required columns, no rows, empty or missing image files, missing mask files, unknown labels,
    a class without images, the same image listed twice, empty ``patient_id``, unknown ``split`` values and a
    patient in several splits. Warning: one patient with both labels on the same ``study_date`` (or at all,
    when there is no date column).

    Args:
        df: A table as returned by :func:`read_manifest` (absolute paths).
        path: Named in the error message; ``df.attrs['manifest']`` when None.

    Returns:
        The warnings (also fine to ignore).

    Raises:
        ManifestError: Listing every error found.
    """
    path = path if path is not None else df.attrs.get("manifest", "<manifest>")
    problems: list[str] = []
    warnings: list[str] = []
    missing_cols = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing_cols:
        problems.append(
            f"missing required column(s): {', '.join(missing_cols)} (required: {', '.join(REQUIRED_COLUMNS)}; "
            f"found: {', '.join(map(str, df.columns))})"
        )
    if len(df) == 0:
        problems.append("manifest has no rows")
        raise ManifestError(path, problems)
    pos = np.arange(len(df))

    if "image" in df.columns:
        images = _text(df["image"]).to_numpy()
        empty = images == ""
        if empty.any():
            problems.append(f"empty image path in row(s) {_rows(pos[empty])}")
        not_found = [
            f"row {p + 2}: image file not found: {v}" for p, v in zip(pos, images) if v and not os.path.isfile(v)
        ]
        problems += _capped(not_found, "missing image files")
        dup = pd.Series(images).duplicated(keep=False).to_numpy() & ~empty
        for image, group in pd.Series(pos[dup]).groupby(images[dup], sort=False):
            problems.append(f"rows {_rows(group.to_numpy())}: the same image is listed {len(group)} times: {image}")
    if "mask" in df.columns:
        masks = _text(df["mask"])
        no_mask = [f"row {p + 2}: mask file not found: {v}" for p, v in zip(pos, masks) if v and not os.path.isfile(v)]
        problems += _capped(no_mask, "missing mask files")

    if "label" in df.columns:
        labels = _text(df["label"]).to_numpy()
        unknown = ~np.isin(labels, LABELS)
        for value, group in pd.Series(pos[unknown]).groupby(labels[unknown], sort=True):
            problems.append(
                f"unknown label {value!r} in row(s) {_rows(group.to_numpy())} (valid labels: {', '.join(LABELS)})"
            )
        for label in LABELS:
            if not (labels == label).any():
                problems.append(f"no images with label {label!r}: both classes ({', '.join(LABELS)}) are needed")

    if "patient_id" in df.columns:
        patients = _text(df["patient_id"]).to_numpy()
        if (patients == "").any():
            problems.append(f"empty patient_id in row(s) {_rows(pos[patients == ''])}")
        if "label" in df.columns:
            warnings += _conflicting_labels(df, patients)
        if "split" in df.columns:
            problems += _split_problems(df, patients)

    if problems:
        raise ManifestError(path, problems)
    return warnings


def _conflicting_labels(df: pd.DataFrame, patients: np.ndarray) -> list[str]:
    has_date = "study_date" in df.columns
    keys = pd.DataFrame({"patient_id": patients, "label": _text(df["label"]).to_numpy()})
    keys["date"] = _text(df["study_date"]).to_numpy() if has_date else ""
    keys = keys[(keys.patient_id != "") & keys.label.isin(LABELS)]
    n_labels = keys.groupby(["patient_id", "date"], sort=True).label.nunique()
    out = []
    for patient, date in n_labels.index[n_labels.to_numpy() > 1]:
        when = f"on {date}" if date else "(no study_date to tell the studies apart)"
        out.append(f"patient {patient!r} has both labels {when}")
    return out


def _split_problems(df: pd.DataFrame, patients: np.ndarray) -> list[str]:
    splits = _text(df["split"]).to_numpy()
    pos = np.arange(len(df))
    problems = []
    bad = ~np.isin(splits, SPLITS)
    for value, group in pd.Series(pos[bad]).groupby(splits[bad], sort=True):
        problems.append(f"unknown split {value!r} in row(s) {_rows(group.to_numpy())} (valid: {', '.join(SPLITS)})")
    keys = pd.DataFrame({"patient_id": patients, "split": splits})[~bad & (patients != "")]
    per_patient = keys.groupby("patient_id", sort=True).split.unique()
    leaks = [
        f"patient {p!r} is in several splits ({', '.join(sorted(s))})" for p, s in per_patient.items() if len(s) > 1
    ]
    return problems + _capped(leaks, "patients in several splits")


def check_output_path(path: str | Path, *, force: bool = False, input_manifest: str | Path | None = None) -> Path:
    """Refuse to write over the input manifest, or over an existing file without ``force``.

    Args:
        path: The file about to be written.
        force: Allow overwriting an existing file (never ``input_manifest``).
        input_manifest: The manifest the data was read from.

    Returns:
        ``path`` as a Path.

    Raises:
        ConfigError: Writing there is refused.
    """
    path = Path(path)
    if input_manifest and os.path.abspath(path) == os.path.abspath(input_manifest):
        raise ConfigError(f"{path}: refusing to overwrite the input manifest; write to another file")
    if path.exists() and not force:
        raise ConfigError(f"{path}: file exists; pass --force to overwrite it")
    return path


def write_manifest(df: pd.DataFrame, path: str | Path, *, force: bool = False) -> Path:
    """Write a manifest CSV, keeping relative paths relative.

    Image/mask paths inside the folder the table was read from (``df.attrs['root']``) are written relative to
    the new CSV's folder; other paths are written as they are.

    Args:
        df: A table as returned by :func:`read_manifest`, :func:`manifest_from_folder` or :func:`patient_split`.
        path: The CSV to write.
        force: Overwrite an existing file (never the manifest the table was read from).

    Returns:
        The written path.

    Raises:
        ConfigError: ``path`` is the input manifest, or exists and ``force`` is False.
    """
    path = check_output_path(path, force=force, input_manifest=df.attrs.get("manifest"))
    out_dir = os.path.dirname(os.path.abspath(path))
    out = df.copy()
    root = df.attrs.get("root")
    if root:
        for col in PATH_COLUMNS:
            if col in out.columns:
                out[col] = [_relocate(v, root, out_dir) for v in _text(out[col])]
    os.makedirs(out_dir, exist_ok=True)
    # Write beside the target and rename, so an interrupted run never leaves half a manifest behind.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            out.to_csv(fh, index=False)
        os.chmod(tmp, readable_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _relocate(value: str, root: str, out_dir: str) -> str:
    if not value or not os.path.isabs(value):
        return value
    if os.path.commonpath([value, root]) != root:
        return value
    return Path(os.path.relpath(value, out_dir)).as_posix()


def manifest_from_folder(folder: str | Path, *, patient_regex: str | None = None) -> pd.DataFrame:
    """Build a manifest from a folder with one sub-folder per class (``covid/``, ``non_covid/``).

    Image files (``.png .jpg .jpeg .tif .tiff .dcm .dicom``) are searched recursively in each class folder.

    Args:
        folder: The folder holding ``covid/`` and ``non_covid/``.
        patient_regex: Regular expression searched in the path relative to the class folder (e.g.
            ``covid/p01/a.png`` -> ``p01/a.png``); the patient id is its group ``patient``, else its first group,
            else the whole match. None: the file stem is the patient id.

    Returns:
        Table with absolute ``image`` paths, ``label`` and ``patient_id``; ``df.attrs['root']`` = ``folder``.

    Raises:
        ManifestError: Missing or unknown class folders, an empty class, files the regex does not match.
        ConfigError: ``patient_regex`` is not a valid regular expression.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(folder, ["not a folder"])
    regex = None
    if patient_regex is not None:
        try:
            regex = re.compile(patient_regex)
        except re.error as exc:
            raise ConfigError(f"patient regex {patient_regex!r} is not a valid regular expression: {exc}") from exc
    problems: list[str] = []
    unknown = sorted(
        p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in LABELS
    )
    if unknown:
        problems.append(
            f"unknown class folder(s): {', '.join(unknown)} (expected one sub-folder per label: {', '.join(LABELS)})"
        )
    rows: list[tuple[str, str, str]] = []
    unmatched: list[str] = []
    skipped = 0
    for label in LABELS:
        class_dir = folder / label
        if not class_dir.is_dir():
            problems.append(f"missing class folder '{label}/'")
            continue
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped += len(files) - len(images)
        if not images:
            problems.append(f"no image files in '{label}/' (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        for file in images:
            rel = file.relative_to(class_dir).as_posix()
            patient = _patient_from(rel, regex)
            if patient:
                rows.append((os.path.abspath(file), label, patient))
            else:
                unmatched.append(f"{label}/{rel}: patient regex {patient_regex!r} does not match (or matches '')")
    problems += _capped(unmatched, "no patient id")
    if skipped:
        log.warning("%s: skipped %d file(s) without an image suffix", folder, skipped)
    if problems:
        raise ManifestError(folder, problems)
    df = pd.DataFrame(rows, columns=list(REQUIRED_COLUMNS))
    df.attrs["root"] = os.path.abspath(folder)
    return df


def _patient_from(rel: str, regex: re.Pattern[str] | None) -> str:
    if regex is None:
        return Path(rel).stem
    match = regex.search(rel)
    if match is None:
        return ""
    if "patient" in regex.groupindex:
        return match.group("patient") or ""
    return (match.group(1) if regex.groups else match.group(0)) or ""


def summarize(df: pd.DataFrame, by: Sequence[str] | None = None) -> pd.DataFrame:
    """Count images per class and patients for each combination of ``by``.

    Args:
        df: A manifest table.
        by: Grouping columns; default: those of ``split``, ``source``, ``view`` present in ``df``.

    Returns:
        One row per combination plus a final ``total`` row; columns ``*by, covid, non_covid, images, patients``
        (other label values, if any, get their own column).
    """
    keys = [c for c in (by if by is not None else ("split", "source", "view")) if c in df.columns]
    work = pd.DataFrame({c: _text(df[c]) for c in [*keys, "label", "patient_id"]})
    label_cols = [lab for lab in reversed(LABELS)] + sorted(set(work["label"]) - set(LABELS))
    if keys:
        counts = work.groupby([*keys, "label"], sort=True).size().unstack("label", fill_value=0)
        counts = counts.reindex(columns=label_cols, fill_value=0)
        counts["images"] = counts.sum(axis=1)
        counts["patients"] = work.groupby(keys, sort=True).patient_id.nunique()
        counts = counts.reset_index()
        if "split" in keys:
            rank = {s: i for i, s in enumerate(SPLITS)}
            counts = counts.sort_values(keys, key=lambda c: c.map(rank) if c.name == "split" else c, kind="stable")
    else:
        counts = pd.DataFrame(columns=label_cols + ["images", "patients"])
    total = {c: "total" if i == 0 else "" for i, c in enumerate(keys)}
    total |= {lab: int((work["label"] == lab).sum()) for lab in label_cols}
    total |= {"images": len(work), "patients": work["patient_id"].nunique()}
    out = pd.concat([counts, pd.DataFrame([total])], ignore_index=True)
    out[[*label_cols, "images", "patients"]] = out[[*label_cols, "images", "patients"]].astype(int)
    out.columns.name = None
    return out


def has_path(value: Any) -> bool:
    """Whether a manifest cell holds a path (empty cells read back from CSV as "", NaN or "None" do not)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return isinstance(value, str) and value.strip() not in ("", "nan", "None")
