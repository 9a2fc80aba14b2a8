"""The patient-level split and its balance."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.data.manifest import _text
from covidcxr.errors import ConfigError, SplitError
from covidcxr.vocab import LABELS, SPLITS

log = logging.getLogger(__name__)

_RATIO_TOLERANCE = 0.05


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


def select_split(df: pd.DataFrame, split: str | None, source: str | Path | None = None) -> pd.DataFrame:
    """Rows of one split (``None`` or ``'all'`` = every row).

    Raises:
        ConfigError: No ``split`` column or no row in that split.
    """
    if split in (None, "all"):
        return df
    name = source or df.attrs.get("manifest", "manifest")
    if "split" not in df.columns:
        raise ConfigError(f"{name}: no 'split' column; use --split all or split it first (covidcxr data split)")
    out = df[df["split"].astype(str) == split]
    if out.empty:
        raise ConfigError(f"{name}: no rows with split {split!r} (splits: {sorted(df['split'].astype(str).unique())})")
    out = out.reset_index(drop=True)
    out.attrs = dict(df.attrs)
    return out


# ---------------------------------------------------------------------------------------------------------
# Cross-validation folds
# ---------------------------------------------------------------------------------------------------------


def crossval_folds(
    df: pd.DataFrame,
    k: int = 5,
    group_col: str | None = None,
    stratify_cols: tuple[str, ...] = ("label", "source"),
    seed: int = 0,
) -> np.ndarray:
    """Assign every row to one of ``k`` folds; linked patient groups never straddle folds.

    Folds are stratified by the combination of ``stratify_cols`` (label x source by default, columns that are
    missing are skipped) with scikit-learn's ``StratifiedGroupKFold`` over the groups of :func:`patient_groups`.

    Args:
        df: Manifest table with ``patient_id`` and ``label``.
        k: Number of folds (>= 2).
        group_col: Extra grouping column (e.g. ``split_group``) whose equal values share a fold.
        stratify_cols: Columns whose joint value is spread evenly over the folds.
        seed: Shuffle seed; the same table and seed give the same folds.

    Returns:
        int array (one per row) of fold numbers in ``[0, k)``.

    Raises:
        SplitError: ``k`` below 2, or fewer linked groups than folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 2:
        raise SplitError(f"k must be an integer >= 2, got {k!r}")
    groups = patient_groups(df, group_col)
    n_groups = len(np.unique(groups))
    if n_groups < k:
        raise SplitError(f"too few patients: {n_groups} linked patient group(s) cannot fill {k} folds")
    cols = [c for c in stratify_cols if c in df.columns]
    strata = _text(df[cols[0]]) if cols else pd.Series([""] * len(df), index=df.index)
    for c in cols[1:]:
        strata = strata + "|" + _text(df[c])
    codes = pd.factorize(strata)[0]
    fold = np.full(len(df), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=int(k), shuffle=True, random_state=int(seed))
    for f, (_, test_idx) in enumerate(splitter.split(np.zeros(len(df)), codes, groups)):
        fold[test_idx] = f
    return fold


def leave_out_folds(df: pd.DataFrame, col: str) -> tuple[np.ndarray, list[str]]:
    """One fold per distinct non-empty value of ``col`` (leave-one-group-out: a site, a ``location``).

    Rows with an empty ``col`` are never held out (fold -1: they are always trained on).

    Returns:
        (fold per row, the held-out value of each fold).

    Raises:
        SplitError: ``col`` missing or holding fewer than two distinct values.
    """
    if col not in df.columns:
        raise SplitError(f"column {col!r} not in manifest (columns: {', '.join(map(str, df.columns))})")
    values = _text(df[col])
    names = sorted(set(values) - {""})
    if len(names) < 2:
        raise SplitError(f"column {col!r} has {len(names)} distinct non-empty value(s); leave-one-out needs >= 2")
    index = {v: i for i, v in enumerate(names)}
    return np.array([index.get(v, -1) for v in values], dtype=np.int64), names
