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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.errors import ConfigError, ImageError, ManifestError, SplitError

log = logging.getLogger(__name__)

LABELS = ("non_covid", "covid")  # index 1 = covid = the positive class
SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("image", "label", "patient_id")
PATH_COLUMNS = ("image", "mask")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom"})
_TEXT_COLUMNS = (*REQUIRED_COLUMNS, "mask", "source", "view", "split", "study_date")
_MAX_LISTED = 20  # per kind of problem, so that one systematic mistake does not bury the others
_RATIO_TOLERANCE = 0.05


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


# ---------------------------------------------------------------------------------------------------------
# Patient-level split
# ---------------------------------------------------------------------------------------------------------


def _check_fractions(val: float, test: float) -> np.ndarray:
    for name, value in (("val", val), ("test", test)):
        if not isinstance(value, int | float) or isinstance(value, bool) or not np.isfinite(value):
            raise SplitError(f"{name} fraction must be a number, got {value!r}")
        if not 0.0 <= value < 1.0:
            raise SplitError(f"{name} fraction must be in [0, 1), got {value!r}")
    if val + test >= 1.0:
        raise SplitError(f"val + test = {val + test:g} leaves no patients for training; it must be below 1")
    return np.array([1.0 - val - test, val, test])


def patient_groups(df: pd.DataFrame, group_col: str | None = None) -> np.ndarray:
    """Label each row with its linked group: patients sharing a ``group_col`` value are linked, transitively.

    Args:
        df: Table with ``patient_id`` (and ``group_col``).
        group_col: Extra grouping column; empty values link nothing.

    Returns:
        int array (one per row): rows with the same value must stay in the same split.

    Raises:
        SplitError: A column is missing.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    for col in ("patient_id", group_col):
        if col is not None and col not in df.columns:
            raise SplitError(f"column {col!r} not in manifest (columns: {', '.join(map(str, df.columns))})")
    patient_codes, patients = pd.factorize(_text(df["patient_id"]))
    n_nodes = len(patients)
    rows, cols = [patient_codes], [patient_codes]
    if group_col is not None:
        groups = _text(df[group_col])
        has_group = (groups != "").to_numpy()
        group_codes, uniques = pd.factorize(groups[has_group])
        # Patients and groups are nodes of one graph; a row is an edge between its patient and its group, so the
        # connected components are exactly the union-find closure (A~B via group g, B~C via patient -> A~C).
        rows.append(patient_codes[has_group])
        cols.append(group_codes + n_nodes)
        n_nodes += len(uniques)
    edges = coo_matrix(
        (np.ones(sum(len(r) for r in rows)), (np.concatenate(rows), np.concatenate(cols))), shape=(n_nodes, n_nodes)
    )
    _, component = connected_components(edges, directed=False)
    return component[patient_codes]


def patient_split(
    df: pd.DataFrame,
    val: float = 0.15,
    test: float = 0.15,
    group_col: str | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Split a manifest by patient (and group) into train/val/test, stratified by label.

    Linked groups (see :func:`patient_groups`) are stratified as non-covid, mixed or covid. Within each stratum,
    groups are shuffled with ``seed``, ordered largest first, and each goes to the split whose share of
    patients and of images is furthest below its target. The class mix per split is then checked and a warning
    is logged when it is more than 5 points off the whole (expected with very few patients).

    Args:
        df: A valid manifest table.
        val: Fraction of patients for validation.
        test: Fraction of patients for testing.
        group_col: Optional column whose equal values must share a split (e.g. ``split_group``).
        seed: Seed of the shuffle; the same seed and table give the same split.

    Returns:
        A copy of ``df`` with a ``split`` column in {train, val, test}.

    Raises:
        SplitError: Bad fractions, missing columns, unknown labels, empty patient ids or too few patients.
    """
    targets = _check_fractions(val, test)
    for col in ("label", "patient_id"):
        if col not in df.columns:
            raise SplitError(f"column {col!r} not in manifest (columns: {', '.join(map(str, df.columns))})")
    labels = _text(df["label"])
    bad = sorted(set(labels) - set(LABELS))
    if bad:
        raise SplitError(f"unknown label(s) {', '.join(map(repr, bad))} (valid labels: {', '.join(LABELS)})")
    patients = _text(df["patient_id"])
    if (patients == "").any():
        raise SplitError(f"empty patient_id in {(patients == '').sum()} row(s); every image needs a patient")
    component = patient_groups(df, group_col)
    table = pd.DataFrame({"component": component, "patient_id": patients.to_numpy(), "y": labels.to_numpy() == "covid"})
    per_group = table.groupby("component", sort=True).agg(
        patients=("patient_id", "nunique"), images=("y", "size"), covid_share=("y", "mean")
    )
    # Strata: groups with only non-covid, mixed (linked patients of both labels) and only covid images.
    strata = np.digitize(per_group["covid_share"].to_numpy(), [1e-9, 1.0 - 1e-9])
    needed = int((targets > 0).sum())
    if len(per_group) < needed:
        raise SplitError(
            f"too few patients: {len(per_group)} patient group(s) cannot fill {needed} splits "
            f"(train {targets[0]:g}, val {val:g}, test {test:g})"
        )

    rng = np.random.default_rng(seed)
    assigned = np.zeros(len(per_group), dtype=np.int64)
    for stratum in range(3):
        members = np.flatnonzero(strata == stratum)
        if len(members) == 0:
            continue
        members = rng.permutation(members)
        n_pat = per_group["patients"].to_numpy()[members]
        n_img = per_group["images"].to_numpy()[members]
        order = np.lexsort((-n_img, -n_pat))  # stable: equal sizes keep the seeded shuffle order
        got_pat, got_img = np.zeros(3), np.zeros(3)
        total_pat, total_img = n_pat.sum(), n_img.sum()
        for i in order:
            # Relative shortfall (share still missing / target share), so a large group goes to whichever split
            # is proportionally emptiest and big groups spread over the splits instead of piling up in train.
            with np.errstate(divide="ignore", invalid="ignore"):
                need = ((targets - got_pat / total_pat) + (targets - got_img / total_img)) / targets
            need[targets == 0] = -np.inf
            k = int(np.argmax(need))
            assigned[members[i]] = k
            got_pat[k] += n_pat[i]
            got_img[k] += n_img[i]

    split_of_component = pd.Series(np.array(SPLITS)[assigned], index=per_group.index)
    out = df.copy()
    out["split"] = split_of_component.loc[component].to_numpy()
    empty = [s for s, t in zip(SPLITS, targets) if t > 0 and not (out["split"] == s).any()]
    if empty:
        raise SplitError(f"too few patients: split(s) {', '.join(empty)} got no patients; lower the fractions")
    for warning in split_balance(out):
        log.warning("%s", warning)
    log.info(
        "split %d patients (%d linked groups): %s",
        patients.nunique(),
        len(per_group),
        ", ".join(f"{s} {out.loc[out.split == s, 'patient_id'].nunique()}" for s in SPLITS),
    )
    return out


def split_balance(df: pd.DataFrame, tolerance: float = _RATIO_TOLERANCE) -> list[str]:
    """Compare the covid share of images and of patients in each split with the whole table.

    Args:
        df: Table with ``split``, ``label`` and ``patient_id``.
        tolerance: Largest acceptable difference (0.05 = 5 points).

    Returns:
        One message per split and measure that is off by more than ``tolerance``.
    """
    y = _text(df["label"]) == "covid"
    patient_y = y.groupby([df["split"], df["patient_id"]]).any()
    whole_img, whole_pat = y.mean(), y.groupby(df["patient_id"]).any().mean()
    out = []
    for split in SPLITS:
        part = df["split"] == split
        if not part.any():
            continue
        for what, share, whole in (
            ("images", y[part].mean(), whole_img),
            ("patients", patient_y.loc[split].mean(), whole_pat),
        ):
            if abs(share - whole) > tolerance:
                out.append(
                    f"split {split!r}: covid share of {what} {share:.1%} vs {whole:.1%} overall "
                    f"(more than {tolerance:.0%} off)"
                )
    return out


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


# ---------------------------------------------------------------------------------------------------------
# Near-duplicate check
# ---------------------------------------------------------------------------------------------------------


def _thumbnail(path: str, size: int) -> np.ndarray:
    from PIL import Image

    from covidcxr.io import load_image

    image, _ = load_image(path)
    # Area averaging (BOX) like the data build's check; the aspect ratio is squashed on purpose so that copies
    # saved at another resolution still line up.
    thumb = np.asarray(Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize((size, size), Image.BOX))
    thumb = thumb.ravel().astype(np.float64)
    thumb -= thumb.mean()
    norm = np.linalg.norm(thumb)
    return (thumb / norm if norm > 0 else thumb).astype(np.float32)


def image_thumbnails(
    paths: Sequence[str], size: int = 32, *, workers: int | None = None, progress: bool = True
) -> np.ndarray:
    """Load images and turn each into a centred, unit-norm ``size*size`` thumbnail (dot product = Pearson r).

    Args:
        paths: Image files.
        size: Thumbnail side.
        workers: Loader threads; default ``min(8, cpu count)``.
        progress: Show a progress bar (only on a terminal).

    Returns:
        float32 array (len(paths), size*size); an image of constant grey gives a zero row.

    Raises:
        ManifestError: Listing every image that could not be read.
    """
    from tqdm.auto import tqdm

    def load(path: str) -> np.ndarray | str:
        try:
            return _thumbnail(path, size)
        except ImageError as exc:
            return str(exc)

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            tqdm(
                pool.map(load, paths),
                total=len(paths),
                desc="thumbnails",
                unit="img",
                disable=None if progress else True,
            )
        )
    failed = [r for r in results if isinstance(r, str)]
    if failed:
        raise ManifestError(
            "near-duplicate check", _capped([f"unreadable image: {f}" for f in failed], "unreadable images")
        )
    return np.stack(results) if results else np.zeros((0, size * size), np.float32)


def find_near_duplicates(
    df: pd.DataFrame,
    *,
    threshold: float = 0.97,
    size: int = 32,
    thumbnails: np.ndarray | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Find pairs of near-identical images that belong to different patients.

    Each image is loaded with :func:`covidcxr.io.load_image`, reduced to a ``size`` x ``size`` thumbnail, and pairs
    whose thumbnails correlate with Pearson r >= ``threshold`` are reported. Public COVID collections hold such
    copies under different patient ids; across splits they leak test images into training.

    Args:
        df: Manifest table (absolute ``image`` paths, ``patient_id``; ``split`` and ``label`` used if present).
        threshold: Smallest correlation reported.
        size: Thumbnail side.
        thumbnails: Precomputed :func:`image_thumbnails` of ``df.image`` (skips loading).
        workers: Loader threads.
        progress: Show a progress bar.

    Returns:
        Pairs sorted by decreasing ``corr``: ``image_a, image_b, patient_a, patient_b`` (+ ``label_*``,
        ``split_*`` and ``cross_split`` when those columns exist) and ``corr``.

    Raises:
        ManifestError: Some images could not be read.
        ConfigError: ``threshold`` is not in (0, 1] or ``thumbnails`` does not match ``df``.
    """
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"near-duplicate threshold must be in (0, 1], got {threshold!r}")
    images = _text(df["image"]).to_numpy()
    if thumbnails is None:
        thumbnails = image_thumbnails(list(images), size, workers=workers, progress=progress)
    elif len(thumbnails) != len(df):
        raise ConfigError(f"{len(thumbnails)} thumbnails given for {len(df)} images")
    patients = _text(df["patient_id"]).to_numpy()
    a_idx, b_idx, corr = [], [], []
    block = 2048  # bounds memory at block x N floats for large manifests
    for start in range(0, len(thumbnails), block):
        sims = thumbnails[start : start + block] @ thumbnails[start:].T
        i, j = np.nonzero(sims >= threshold - 1e-6)
        keep = (j > i) & (patients[start + i] != patients[start + j])
        a_idx.append(start + i[keep])
        b_idx.append(start + j[keep])
        corr.append(np.minimum(sims[i[keep], j[keep]], 1.0))
    a = np.concatenate(a_idx) if a_idx else np.zeros(0, int)
    b = np.concatenate(b_idx) if b_idx else np.zeros(0, int)
    out = pd.DataFrame({"image_a": images[a], "image_b": images[b], "patient_a": patients[a], "patient_b": patients[b]})
    for col in ("label", "split"):
        if col in df.columns:
            values = _text(df[col]).to_numpy()
            out[f"{col}_a"], out[f"{col}_b"] = values[a], values[b]
    if "split" in df.columns:
        out["cross_split"] = out["split_a"] != out["split_b"]
    out["corr"] = np.round((np.concatenate(corr) if corr else np.zeros(0)).astype(np.float64), 4)
    return out.sort_values("corr", ascending=False, kind="stable").reset_index(drop=True)


__all__ = [
    "IMAGE_SUFFIXES",
    "LABELS",
    "PATH_COLUMNS",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "check_output_path",
    "find_near_duplicates",
    "image_thumbnails",
    "manifest_from_folder",
    "patient_groups",
    "patient_split",
    "read_manifest",
    "split_balance",
    "summarize",
    "validate_manifest",
    "write_manifest",
]
