"""Case metadata of an index: checks, the SQLite table (indexed by case_id and patient_id) and patient exclusion.

No torch here (see :mod:`covidcxr.retrieval.index`).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import CaseIndexError, ConfigError
from covidcxr.retrieval.storage import REQUIRED_COLUMNS, _fsync_file
from covidcxr.vocab import LABELS


def _normalise_label(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return LABELS[int(value)]
    if isinstance(value, int | np.integer | float | np.floating) and value in (0, 1):
        return LABELS[int(value)]
    return str(value)


def _to_storable(value: Any) -> Any:
    """Map a metadata value to a type SQLite stores and returns unchanged (str, int, float or None)."""
    if _is_missing(value):
        return None
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, str | int | float):
        return value
    if isinstance(value, _dt.date):  # includes datetime and pd.Timestamp
        return value.isoformat()
    if isinstance(value, np.datetime64):
        return None if np.isnat(value) else pd.Timestamp(value).isoformat()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise ConfigError(f"metadata value {value!r} of type {type(value).__name__} cannot be stored; use str, int, "
                      "float, dates or None")


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float | np.floating) and math.isnan(value)


def _check_metadata(metadata: Any, n: int) -> pd.DataFrame:
    if isinstance(metadata, pd.DataFrame):
        df = metadata.reset_index(drop=True)
    elif isinstance(metadata, Sequence) and not isinstance(metadata, str) and all(
        isinstance(r, Mapping) for r in metadata
    ):
        df = pd.DataFrame.from_records(list(metadata)) if len(metadata) else pd.DataFrame()
    else:
        raise ConfigError(f"metadata must be a pandas DataFrame or a list of dicts, got {type(metadata).__name__}")
    if len(df) != n:
        raise ConfigError(f"metadata has {len(df)} row(s) but there are {n} embedding(s)")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"metadata lacks required column(s) {missing}; has {list(map(str, df.columns))}")
    if "row_id" in df.columns:
        raise ConfigError("metadata column 'row_id' is reserved (it stores the FAISS id)")
    out: dict[str, list[Any]] = {}
    for col in df.columns:
        values = [_to_storable(v) for v in df[col].tolist()]
        if col in REQUIRED_COLUMNS:
            empty = [i for i, v in enumerate(values) if v is None or v == ""]
            if empty:
                raise ConfigError(f"metadata column {col!r} is empty in {len(empty)} row(s), e.g. rows {empty[:10]}")
            values = [_normalise_label(v) for v in values] if col == "label" else [str(v) for v in values]
        out[str(col)] = values
    dupes = sorted(k for k, c in Counter(out["case_id"]).items() if c > 1)
    if dupes:
        shown = ", ".join(repr(d) for d in dupes[:20]) + (" ..." if len(dupes) > 20 else "")
        raise ConfigError(f"metadata has {len(dupes)} duplicate case_id(s): {shown}")
    return pd.DataFrame({c: pd.Series(v, dtype=object) for c, v in out.items()})


def _exclusion_sets(exclude_patients: Any, n_queries: int) -> list[frozenset]:
    if exclude_patients is None:
        return [frozenset()] * n_queries
    if isinstance(exclude_patients, str | int | np.integer):
        return [frozenset({str(exclude_patients)})] * n_queries
    if not isinstance(exclude_patients, Iterable):
        raise ConfigError(f"exclude_patients must be None, a patient id or a list with one entry per query; got "
                          f"{type(exclude_patients).__name__}")
    items = list(exclude_patients)
    if len(items) != n_queries:
        raise ConfigError(f"exclude_patients has {len(items)} entries but there are {n_queries} queries; pass one "
                          "patient id for all queries or one entry per query")
    sets = []
    for item in items:
        if item is None:
            sets.append(frozenset())
        elif isinstance(item, str | int | np.integer):
            sets.append(frozenset({str(item)}))
        else:
            sets.append(frozenset(str(p) for p in item))
    return sets


def _write_metadata(path: Path, metadata: pd.DataFrame) -> None:
    con = sqlite3.connect(path)
    try:
        frame = metadata.copy()
        frame.insert(0, "row_id", np.arange(len(frame), dtype=np.int64))
        frame.to_sql("cases", con, index=False, chunksize=50_000)
        con.execute("CREATE UNIQUE INDEX cases_case_id ON cases(case_id)")
        con.execute("CREATE INDEX cases_patient_id ON cases(patient_id)")
        con.commit()
    finally:
        con.close()
    _fsync_file(path)


def _read_metadata(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise CaseIndexError(f"{path}: metadata table is missing")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            cur = con.execute("SELECT * FROM cases ORDER BY row_id")
            columns = [c[0] for c in cur.description]
            rows = cur.fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise CaseIndexError(f"{path}: cannot read the metadata table ({exc})") from exc
    missing = [c for c in ("row_id", *REQUIRED_COLUMNS) if c not in columns]
    if missing:
        raise CaseIndexError(f"{path}: metadata table lacks column(s) {missing}")
    cols = list(zip(*rows, strict=True)) if rows else [() for _ in columns]
    frame = pd.DataFrame({c: pd.Series(list(v), dtype=object) for c, v in zip(columns, cols, strict=True)})
    if not np.array_equal(frame["row_id"].to_numpy(dtype=np.int64), np.arange(len(frame))):
        raise CaseIndexError(f"{path}: metadata row_id values are not 0..{len(frame) - 1}")
    return frame.drop(columns="row_id")
