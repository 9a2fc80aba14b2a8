"""The local SQLite ledger of processed instances: what makes PACS runs idempotent and resumable.

One row per (SOP Instance UID, model weights hash). Before an image is analysed its row says ``pending`` with the
generation of its results; the result UIDs are derived from (source UID, model hash, generation), so a run killed
between storing and recording re-sends the very same objects on restart and the PACS files them once. Final
statuses (:data:`FINAL`) are not processed again unless asked (``reprocess``, which bumps the generation so new
results get new UIDs); ``pending`` and ``failed`` (transient errors) are processed again by the next run.

Schema (version 1)::

    instances(sop_instance_uid TEXT, model_hash TEXT, study_instance_uid TEXT, status TEXT, reason TEXT,
              result_uids TEXT /* JSON list */, generation INTEGER, attempts INTEGER, updated_at TEXT,
              PRIMARY KEY (sop_instance_uid, model_hash))
    meta(key TEXT PRIMARY KEY, value TEXT)      -- schema_version

No patient identifier is stored: UIDs, statuses and reasons only.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from covidcxr.errors import ConfigError

SCHEMA_VERSION = "1"
STATUSES = ("pending", "stored", "no_result", "skipped", "refused", "failed")
FINAL = ("stored", "no_result", "skipped", "refused")
"""Statuses a rerun leaves alone: results stored, no verdict (SR stored), not a frontal chest image, unreadable."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT NOT NULL,
    model_hash TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    result_uids TEXT NOT NULL DEFAULT '[]',
    generation INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (sop_instance_uid, model_hash)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class LedgerEntry:
    """One ledger row."""

    sop_instance_uid: str
    model_hash: str
    study_instance_uid: str
    status: str
    reason: str = ""
    result_uids: list[str] = field(default_factory=list)
    generation: int = 0
    attempts: int = 0
    updated_at: str = ""

    @property
    def final(self) -> bool:
        """Whether a rerun leaves this instance alone."""
        return self.status in FINAL


def default_ledger_path() -> Path:
    """``$XDG_STATE_HOME/covidcxr/pacs-ledger.sqlite`` (``~/.local/state/...`` when unset)."""
    import os

    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "covidcxr" / "pacs-ledger.sqlite"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Ledger:
    """The SQLite ledger (one connection, autocommit per change: a kill never loses a recorded step).

    Args:
        path: Database file (created with its folder).

    Raises:
        ConfigError: The file is not a ledger of this schema version or cannot be opened.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"ledger {self.path}: cannot open it ({exc})") from exc
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise ConfigError(f"ledger {self.path}: schema version {row[0]}, expected {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, sop_uid: str, model_hash: str) -> LedgerEntry | None:
        """The row of one instance and model, or None."""
        row = self._db.execute(
            "SELECT sop_instance_uid, model_hash, study_instance_uid, status, reason, result_uids, generation, "
            "attempts, updated_at FROM instances WHERE sop_instance_uid = ? AND model_hash = ?",
            (sop_uid, model_hash)).fetchone()
        if row is None:
            return None
        return LedgerEntry(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), int(row[6]), int(row[7]),
                           row[8])

    def begin(self, sop_uid: str, model_hash: str, study_uid: str, generation: int) -> None:
        """Mark an instance ``pending`` (before its results are stored), counting the attempt."""
        self._db.execute(
            "INSERT INTO instances (sop_instance_uid, model_hash, study_instance_uid, status, generation, attempts, "
            "updated_at) VALUES (?, ?, ?, 'pending', ?, 1, ?) ON CONFLICT (sop_instance_uid, model_hash) DO UPDATE "
            "SET status = 'pending', reason = '', generation = excluded.generation, attempts = attempts + 1, "
            "updated_at = excluded.updated_at",
            (sop_uid, model_hash, study_uid, int(generation), _now()))

    def finish(self, sop_uid: str, model_hash: str, study_uid: str, status: str, *, reason: str = "",
               result_uids: list[str] | None = None, generation: int = 0) -> None:
        """Record the outcome of an instance.

        Raises:
            ConfigError: Unknown status.
        """
        if status not in STATUSES:
            raise ConfigError(f"ledger status {status!r}: expected one of {STATUSES}")
        self._db.execute(
            "INSERT INTO instances (sop_instance_uid, model_hash, study_instance_uid, status, reason, result_uids, "
            "generation, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sop_instance_uid, model_hash) "
            "DO UPDATE SET status = excluded.status, reason = excluded.reason, result_uids = excluded.result_uids, "
            "generation = excluded.generation, updated_at = excluded.updated_at",
            (sop_uid, model_hash, study_uid, status, reason, json.dumps(list(result_uids or [])), int(generation),
             _now()))

    def entries(self, status: str | None = None) -> list[LedgerEntry]:
        """Every row (of one status when given), oldest first."""
        query = "SELECT sop_instance_uid, model_hash FROM instances"
        args: tuple[str, ...] = ()
        if status is not None:
            query, args = query + " WHERE status = ?", (status,)
        rows = self._db.execute(query + " ORDER BY updated_at", args).fetchall()
        return [e for e in (self.get(r[0], r[1]) for r in rows) if e is not None]
