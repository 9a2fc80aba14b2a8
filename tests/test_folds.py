"""Cross-validation folds: groups never split, every row in exactly one fold, strata spread."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from covidcxr.data import crossval_folds, leave_out_folds
from covidcxr.errors import SplitError


def _table(seed: int = 0, n_patients: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        source = f"S{p % 3}"
        label = "covid" if (source == "S0" or (source == "S1" and rng.random() < 0.5)) else "non_covid"
        for k in range(int(rng.integers(1, 4))):
            rows.append({"image": f"p{p}_{k}.png", "patient_id": f"P{p}", "label": label, "source": source,
                         "split_group": f"G{p // 2}" if p % 5 == 0 else "", "site": f"L{p % 4}" if p % 7 else ""})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("group_col", [None, "split_group"])
@pytest.mark.parametrize("k", [2, 5])
def test_folds_never_split_a_group_and_cover_every_row(k: int, group_col: str | None) -> None:
    df = _table()
    fold = crossval_folds(df, k, group_col=group_col, seed=3)
    assert fold.shape == (len(df),) and set(fold) == set(range(k))
    assert (df.assign(f=fold).groupby("patient_id")["f"].nunique() == 1).all()
    if group_col:
        linked = df[df[group_col] != ""].assign(f=fold[df[group_col] != ""])
        assert (linked.groupby(group_col)["f"].nunique() == 1).all()
    # Stratified: each fold holds some of each label x source stratum that has >= k groups.
    table = pd.crosstab([df["source"], df["label"]], fold)
    assert (table.to_numpy() > 0).all()


def test_folds_are_seeded() -> None:
    df = _table()
    assert np.array_equal(crossval_folds(df, 4, seed=1), crossval_folds(df, 4, seed=1))
    assert not np.array_equal(crossval_folds(df, 4, seed=1), crossval_folds(df, 4, seed=2))


@pytest.mark.parametrize("k, match", [(1, "k must be an integer >= 2"), (500, "too few patients")])
def test_folds_refuse_bad_k(k: int, match: str) -> None:
    with pytest.raises(SplitError, match=match):
        crossval_folds(_table(), k)


def test_leave_out_folds_one_per_value() -> None:
    df = _table()
    fold, names = leave_out_folds(df, "site")
    assert names == ["L0", "L1", "L2", "L3"]
    assert (fold[df["site"].to_numpy() == ""] == -1).all()
    for i, name in enumerate(names):
        assert set(df.loc[fold == i, "site"]) == {name}
    with pytest.raises(SplitError, match="not in manifest"):
        leave_out_folds(df, "nope")
    with pytest.raises(SplitError, match="distinct non-empty"):
        leave_out_folds(df.assign(site="L0"), "site")
