"""Case metadata of an index: checks, the SQLite table (indexed by case_id and patient_id) and patient exclusion.

No torch here (see :mod:`covidcxr.retrieval.index`).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import CaseIndexError, ConfigError
from covidcxr.retrieval.storage import REQUIRED_COLUMNS, _fsync_file
from covidcxr.vocab import LABELS

logger = logging.getLogger(__name__)


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
        con.execute("CREATE UNIQUE INDEX cases_row_id ON cases(row_id)")  # row lookups of SqliteCases
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


# ---------------------------------------------------------------------- case lookup during search


class FrameCases:
    """Case metadata held in memory (indexes up to a few million cases): the lookups a search needs."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self._frame = frame
        self._case_ids = frame["case_id"].to_numpy(dtype=object)
        self._patient_ids = frame["patient_id"].to_numpy(dtype=object)
        self._labels = frame["label"].to_numpy(dtype=object)
        self._extra = {str(c): frame[c].to_numpy(dtype=object) for c in frame.columns if c not in REQUIRED_COLUMNS}
        self._case_id_set = set(self._case_ids.tolist())
        self._patient_counts = Counter(self._patient_ids.tolist())

    read_only = False

    def __len__(self) -> int:
        return len(self._frame)

    def frame(self) -> pd.DataFrame:
        """All metadata as a DataFrame (row i = FAISS id i)."""
        return self._frame

    def patient_count(self, patients: Iterable[str]) -> int:
        """Number of cases that belong to any of ``patients``."""
        return sum(self._patient_counts.get(p, 0) for p in patients)

    def patients(self, rows: Sequence[int]) -> list[str]:
        """Patient id of each row (``rows`` >= 0)."""
        return [self._patient_ids[r] for r in rows]

    def records(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        """``case_id``, ``patient_id``, ``label`` and the other columns (``None`` for missing) of each row."""
        out = []
        for r in rows:
            extra = {name: (None if _is_missing(v[r]) else v[r]) for name, v in self._extra.items()}
            out.append({"case_id": self._case_ids[r], "patient_id": self._patient_ids[r], "label": self._labels[r],
                        "metadata": extra})
        return out

    def existing(self, case_ids: Iterable[str]) -> set[str]:
        """Those of ``case_ids`` already in the index."""
        return set(case_ids) & self._case_id_set

    def label_counts(self) -> dict[str, int]:
        """Cases per label."""
        return dict(Counter(self._labels.tolist()))

    def n_patients(self) -> int:
        """Distinct patients."""
        return len(self._patient_counts)


class SqliteCases:
    """Case metadata left in the index's SQLite table, looked up per search (archives of 10-100 M cases).

    Only the rows a search returns are read (by ``row_id``, the table's primary key); patient exclusion counts a
    patient's cases with the ``patient_id`` index. Connections are per thread (the web app searches from a pool).
    """

    read_only = True

    def __init__(self, path: Path, count: int | None = None) -> None:
        self.path = Path(path)
        self._local = threading.local()
        try:
            con = self._con()
            cols = [r[1] for r in con.execute("PRAGMA table_info(cases)")]
            n = con.execute("SELECT max(row_id) + 1 FROM cases").fetchone()[0] or 0
        except sqlite3.Error as exc:
            raise CaseIndexError(f"{self.path}: cannot read the metadata table ({exc})") from exc
        missing = [c for c in ("row_id", *REQUIRED_COLUMNS) if c not in cols]
        if missing:
            raise CaseIndexError(f"{self.path}: metadata table lacks column(s) {missing}")
        if count is not None and n != count:
            raise CaseIndexError(f"{self.path}: metadata has {n} rows but the index holds {count} cases")
        self._n = int(n)
        self._extra = [c for c in cols if c not in ("row_id", *REQUIRED_COLUMNS)]

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            self._local.con = con
        return con

    def __len__(self) -> int:
        return self._n

    def frame(self) -> pd.DataFrame:
        """All metadata as a DataFrame (reads the whole table: avoid on archive-scale indexes)."""
        if self._n > 1_000_000:
            logger.warning("%s: reading all %d metadata rows into memory", self.path, self._n)
        return _read_metadata(self.path)

    def _in(self, sql: str, values: Sequence[Any]) -> Iterator[tuple]:
        """Rows of ``sql`` (with ``{marks}`` for an ``IN (...)`` list) over ``values``, in chunks of 900.

        SQLite's default limit on bound parameters is 999.
        """
        con = self._con()
        for i in range(0, len(values), 900):
            part = list(values[i:i + 900])
            yield from con.execute(sql.format(marks=",".join("?" * len(part))), part)

    def patient_count(self, patients: Iterable[str]) -> int:
        """Number of cases that belong to any of ``patients`` (uses the ``patient_id`` index)."""
        return int(sum(r[0] for r in self._in("SELECT count(*) FROM cases WHERE patient_id IN ({marks})",
                                              list(patients))))

    def patients(self, rows: Sequence[int]) -> list[str]:
        """Patient id of each row."""
        found = dict(self._in("SELECT row_id, patient_id FROM cases WHERE row_id IN ({marks})",
                              [int(r) for r in rows]))
        return [str(found[int(r)]) for r in rows]

    def records(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        """``case_id``, ``patient_id``, ``label`` and the other columns of each row."""
        cols = ", ".join(_quote(c) for c in (*REQUIRED_COLUMNS, *self._extra))
        found = {rec[0]: rec[1:] for rec in self._in(f"SELECT row_id, {cols} FROM cases WHERE row_id IN ({{marks}})",
                                                     [int(r) for r in rows])}
        out = []
        for r in rows:
            rec = found[int(r)]
            out.append({"case_id": str(rec[0]), "patient_id": str(rec[1]), "label": str(rec[2]),
                        "metadata": dict(zip(self._extra, rec[3:], strict=True))})
        return out

    def existing(self, case_ids: Iterable[str]) -> set[str]:
        """Those of ``case_ids`` already in the index (uses the ``case_id`` index)."""
        return {r[0] for r in self._in("SELECT case_id FROM cases WHERE case_id IN ({marks})", list(case_ids))}

    def label_counts(self) -> dict[str, int]:
        """Cases per label (one SQL aggregate)."""
        return {str(k): int(v) for k, v in self._con().execute("SELECT label, count(*) FROM cases GROUP BY label")}

    def n_patients(self) -> int:
        """Distinct patients (walks the ``patient_id`` index)."""
        return int(self._con().execute("SELECT count(DISTINCT patient_id) FROM cases").fetchone()[0])


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class MetadataWriter:
    """Append case metadata to a new SQLite table in chunks (archive builds never hold all rows in memory).

    The table has ``row_id INTEGER PRIMARY KEY`` (= FAISS id) and the indexes on ``case_id`` (unique) and
    ``patient_id`` are created by :meth:`close`, which is faster than maintaining them while inserting.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._con = sqlite3.connect(self.path)
        self._con.execute("PRAGMA journal_mode=OFF")  # a new file: a crash means rebuilding, not recovering
        self._con.execute("PRAGMA synchronous=OFF")
        self._columns: list[str] | None = None
        self.count = 0

    def append(self, metadata: pd.DataFrame) -> None:
        """Check (as :meth:`CaseIndex.fit` does) and append rows; their row ids continue from the last chunk.

        Raises:
            ConfigError: bad metadata, or columns that differ from the first chunk's.
        """
        meta = _check_metadata(metadata, len(metadata))
        cols = [str(c) for c in meta.columns]
        if self._columns is None:
            self._columns = cols
            spec = ", ".join(f"{_quote(c)}" for c in cols)
            self._con.execute(f"CREATE TABLE cases (row_id INTEGER PRIMARY KEY, {spec})")
        elif cols != self._columns:
            raise ConfigError(f"metadata columns {cols} differ from the first chunk's {self._columns}")
        marks = ",".join("?" * (len(cols) + 1))
        rows = ((self.count + i, *rec) for i, rec in enumerate(meta.itertuples(index=False, name=None)))
        self._con.executemany(f"INSERT INTO cases VALUES ({marks})", rows)
        self.count += len(meta)

    def close(self) -> None:
        """Create the indexes, commit and fsync.

        Raises:
            CaseIndexError: a case_id occurs twice across chunks.
        """
        try:
            self._con.execute("CREATE UNIQUE INDEX cases_case_id ON cases(case_id)")
        except sqlite3.IntegrityError as exc:
            dupes = [r[0] for r in self._con.execute(
                "SELECT case_id FROM cases GROUP BY case_id HAVING count(*) > 1 LIMIT 20")]
            self._con.close()
            raise CaseIndexError(f"{self.path}: duplicate case_id(s) across chunks: {dupes}") from exc
        self._con.execute("CREATE INDEX cases_patient_id ON cases(patient_id)")
        self._con.commit()
        self._con.close()
        _fsync_file(self.path)
