"""The journal: a SQLite database beside the output that is the truth about a run.

Schema::

    meta(key TEXT PRIMARY KEY, value TEXT)          -- JSON values: options, input fingerprint
    results(seq INTEGER PRIMARY KEY,                -- order the rows were committed
            idx INTEGER NOT NULL UNIQUE,            -- record index: at most one row each
            ok  INTEGER NOT NULL,
            line TEXT NOT NULL)                     -- the exact output line, no newline

Each finished record becomes one row holding its exact output line; rows are
committed in batches (one transaction each), and the output file is written
only from committed rows, after the commit. The file is therefore always a
prefix of what the journal can reproduce (:meth:`Journal.projection`), give or
take a torn last write; ``--resume`` compares the two and repairs the file. A
UNIQUE index makes a duplicate record impossible at the database level.

WAL mode with ``synchronous=NORMAL``: a commit survives the process being
killed at any moment (SIGKILL, OOM); only an operating-system crash can lose
the last commits, and then those records are simply done again. The
connection holds an exclusive lock for its whole life, so two runs cannot
write one journal, and SQLite never needs its shared-memory file.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Journal", "JournalError"]

SCHEMA_VERSION = 1

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE results (seq INTEGER PRIMARY KEY, idx INTEGER NOT NULL UNIQUE,"
    " ok INTEGER NOT NULL, line TEXT NOT NULL)",
)

Row = tuple[int, bool, str]


class JournalError(Exception):
    """The journal cannot be used: locked by another run, unreadable, or not a journal."""


def journal_files(path: str) -> list[str]:
    """The journal and the side files SQLite may leave beside it."""
    return [path, path + "-wal", path + "-shm", path + "-journal"]


class Journal:
    """An open journal; see the module docstring. Not thread-safe: one owner."""

    def __init__(self, path: str, conn: sqlite3.Connection, meta: dict[str, Any]) -> None:
        self.path = path
        self._conn = conn
        self.meta = meta

    # ------------------------------------------------------------ opening

    @classmethod
    def create(cls, path: str, meta: dict[str, Any]) -> Journal:
        """Start a new journal at ``path``, replacing any old one, with ``meta``.

        Schema and meta are one transaction: a run killed while creating leaves
        either no usable journal or a complete empty one.

        Raises:
            JournalError: if the file cannot be created or is locked by another run.
        """
        for name in journal_files(path):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise JournalError(f"cannot remove the old journal {name}: {exc.strerror}") from exc
        conn = _connect(path)
        meta = {**meta, "schema": SCHEMA_VERSION}
        try:
            with _transaction(conn):
                for statement in _SCHEMA:  # not executescript(): it would commit early
                    conn.execute(statement)
                conn.executemany(
                    "INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()]
                )
        except sqlite3.Error as exc:
            conn.close()
            raise JournalError(f"cannot create the journal {path}: {exc}") from exc
        return cls(path, conn, meta)

    @classmethod
    def open(cls, path: str) -> Journal | None:
        """Open an existing journal, or return None if there is none worth resuming.

        None means: no file, or a file whose creation never committed (the
        run was killed before any state existed).

        Raises:
            JournalError: if it is locked by another run, is not a procpool
                journal, or was written by an incompatible version.
        """
        if not os.path.exists(path):
            return None
        conn = _connect(path)
        try:
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if not tables:
                conn.close()
                return None
            if not {"meta", "results"} <= tables:
                raise JournalError(f"{path} is a SQLite database but not a procpool journal")
            meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise JournalError(f"{path} is not a procpool journal ({exc})") from exc
        except JournalError:
            conn.close()
            raise
        if meta.get("schema") != SCHEMA_VERSION:
            conn.close()
            raise JournalError(
                f"{path} was written by another version of procpool (journal schema "
                f"{meta.get('schema')}, this version reads {SCHEMA_VERSION})"
            )
        return cls(path, conn, meta)

    # ------------------------------------------------------------ reading

    def done(self) -> Iterator[tuple[int, bool]]:
        """``(index, ok)`` of every record recorded."""
        for idx, ok in self._conn.execute("SELECT idx, ok FROM results"):
            yield idx, bool(ok)

    def projection(self, *, ordered: bool) -> Iterator[str]:
        """The output lines the journal vouches for, in output order.

        Unordered: every row, in commit order. Ordered: rows in index order up
        to the first missing index (later rows are written once the gap fills).
        """
        if not ordered:
            for (line,) in self._conn.execute("SELECT line FROM results ORDER BY seq"):
                yield line
            return
        rows = self._conn.execute("SELECT idx, line FROM results ORDER BY idx")
        for expected, (idx, line) in enumerate(rows):
            if idx != expected:
                return
            yield line

    def lines_from(self, start: int, limit: int) -> list[tuple[int, str]]:
        """Up to ``limit`` ``(index, line)`` rows with index >= ``start``, in index order."""
        return self._conn.execute(
            "SELECT idx, line FROM results WHERE idx >= ? ORDER BY idx LIMIT ?", (start, limit)
        ).fetchall()

    # ------------------------------------------------------------ writing

    def add(self, rows: Iterable[Row], meta: dict[str, Any] | None = None) -> None:
        """Commit ``rows`` (and meta updates) as one transaction.

        Raises:
            sqlite3.IntegrityError: if a row's index is already recorded (a bug
                upstream: the caller filters duplicates).
        """
        with _transaction(self._conn):
            self._conn.executemany(
                "INSERT INTO results (idx, ok, line) VALUES (?, ?, ?)",
                ((idx, int(ok), line) for idx, ok, line in rows),
            )
            if meta:
                self._put_meta(meta)

    def set_meta(self, **meta: Any) -> None:
        with _transaction(self._conn):
            self._put_meta(meta)

    def forget_failed(self) -> int:
        """Delete the rows of failed records (so they run again); returns how many."""
        with _transaction(self._conn):
            return self._conn.execute("DELETE FROM results WHERE ok = 0").rowcount

    def _put_meta(self, meta: dict[str, Any]) -> None:
        self._conn.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [(k, json.dumps(v)) for k, v in meta.items()],
        )
        self.meta.update(meta)

    def close(self) -> None:
        """Close the connection (checkpointing the WAL into the database). Safe twice."""
        try:
            self._conn.close()
        except sqlite3.Error:
            pass


def _connect(path: str) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=0, check_same_thread=False)
    except sqlite3.Error as exc:
        raise JournalError(f"cannot open the journal {path}: {exc}") from exc
    try:
        # EXCLUSIVE before WAL: SQLite then keeps its WAL index in private
        # memory (no -shm file) and the lock is held until close.
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        conn.execute("PRAGMA synchronous = NORMAL")
        # Take the lock now, so a second run fails here, before doing any work.
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        conn.close()
        if "locked" in str(exc) or "busy" in str(exc):
            raise JournalError(
                f"another procpool run is using the journal {path} (it is locked)"
            ) from exc
        raise JournalError(f"cannot use the journal {path}: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise JournalError(f"{path} is not a procpool journal ({exc})") from exc
    if str(mode).lower() != "wal":
        conn.close()
        raise JournalError(f"cannot put the journal {path} in WAL mode (got {mode!r})")
    return conn


class _transaction:
    """BEGIN ... COMMIT, or ROLLBACK if the body raises."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self._conn.execute("COMMIT")
        else:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
