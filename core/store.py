"""The one place that opens a store.

A dataset ``NAME`` lives in a folder as:

- ``NAME.duckdb``: the base, built once into a temporary file beside it and
  renamed into place (atomic). Nothing writes into it afterwards.
- ``NAME.parts/<table>/<generation>--<stamp>.parquet``: everything added later
  (a second model, explanations, ...). Each part is written under a name that
  does not end in ``.parquet`` and renamed, so readers never see half a part.
  ``generation`` ties a part to the base it extends: a rebuilt or compacted
  base gets a new generation and older parts stop counting.
- ``NAME.state.sqlite``: saved cohorts and notes (see ``core.state``).

Readers use an in-memory DuckDB connection with the base ``ATTACH``ed
``READ_ONLY`` and one view per logical table that unions the base table with
its parts. ``Store.refresh()`` notices a renamed base or new parts by file
identity and part listing only (no data read) and rebuilds the views.
Writers take ``NAME.lock`` (never readers): part writers briefly, ``compact``
for the whole fold, so no part is lost between reading and replacing the base.

A reader also keeps a few derived tables (``Store.derived``): the rows of a
query that several pages join, held in its in-memory connection (so a refresh
drops them with the rest) and computed on first use.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StoreError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BASE_SUFFIX = ".duckdb"
PARTS_SUFFIX = ".parts"
STATE_SUFFIX = ".state.sqlite"
LOCK_SUFFIX = ".lock"
PART_SUFFIX = ".parquet"
# Parts of one table up to this size are held in memory after each refresh.
PARTS_IN_MEMORY_BYTES = 64 * 1024 * 1024  # of Parquet, over every table (a few times that in memory)
# DuckDB keeps the blocks a reader has scanned cached up to its memory limit (80% of RAM by
# default): over a gigabyte after a few pages of a 3 GB store. Readers get a smaller limit and
# spill joins, aggregates and sorts past it to a temporary folder of their own.
READ_MEMORY_LIMIT = "128MB"
READ_MEMORY_LIMIT_ENV = "VISIONLENS_MEMORY_LIMIT"
# Derived tables a reader keeps, least recently asked for dropped first (a detection model's
# per-image counts at one pair of thresholds: about 16 MB at a million images).
DERIVED_TABLES_KEPT = 6
DERIVED_DEFINITIONS_KEPT = 256
DERIVED_SCHEMA = "derived"

# Columns every store has, so views exist before any part is written. Builders
# may add columns (metadata fields, per-task prediction columns).
TABLE_SCHEMAS: dict[str, dict[str, str]] = {
    "meta": {"key": "VARCHAR", "value": "VARCHAR"},
    "images": {"image_id": "INTEGER", "uri": "VARCHAR", "width": "INTEGER", "height": "INTEGER"},
    "columns": {"name": "VARCHAR", "kind": "VARCHAR", "source": "VARCHAR", "label": "VARCHAR"},
    "models": {"model_id": "VARCHAR", "name": "VARCHAR", "task": "VARCHAR", "params": "VARCHAR"},
    "predictions": {"model_id": "VARCHAR", "image_id": "INTEGER", "pred_label": "INTEGER",
                    "score": "FLOAT", "pred_labels": "INTEGER[]", "probs": "FLOAT[]"},
    "gt_boxes": {"image_id": "INTEGER", "gt_id": "INTEGER", "class_id": "INTEGER",
                 "xmin": "DOUBLE", "ymin": "DOUBLE", "xmax": "DOUBLE", "ymax": "DOUBLE",
                 "area": "DOUBLE", "iscrowd": "BOOLEAN"},
    "det_boxes": {"model_id": "VARCHAR", "image_id": "INTEGER", "det_id": "INTEGER",
                  "class_id": "INTEGER", "score": "DOUBLE", "xmin": "DOUBLE", "ymin": "DOUBLE",
                  "xmax": "DOUBLE", "ymax": "DOUBLE", "area": "DOUBLE"},
    "det_matches": {"model_id": "VARCHAR", "image_id": "INTEGER", "det_id": "INTEGER"},
    "gt_matches": {"model_id": "VARCHAR", "image_id": "INTEGER", "gt_id": "INTEGER"},
    "outcomes": {"model_id": "VARCHAR", "image_id": "INTEGER", "correct": "BOOLEAN"},
    "explanations": {"model_id": "VARCHAR", "image_id": "INTEGER", "method": "VARCHAR",
                     "target": "INTEGER", "height": "INTEGER", "width": "INTEGER",
                     "scale": "FLOAT", "offset": "FLOAT", "data": "BLOB", "params": "VARCHAR"},
    "thumbnails": {"image_id": "INTEGER", "jpeg": "BLOB"},
}


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


@dataclass(frozen=True)
class StorePaths:
    """Where the files of dataset ``name`` live inside ``folder``."""

    folder: Path
    name: str

    @classmethod
    def of(cls, path: str | os.PathLike) -> "StorePaths":
        """Accept ``dir/NAME.duckdb`` or ``dir/NAME``."""
        p = Path(path)
        name = p.name[: -len(BASE_SUFFIX)] if p.name.endswith(BASE_SUFFIX) else p.name
        if not name:
            raise StoreError("empty store name", file=str(path))
        return cls(p.parent.resolve(), name)

    @property
    def base(self) -> Path:
        return self.folder / f"{self.name}{BASE_SUFFIX}"

    @property
    def parts(self) -> Path:
        return self.folder / f"{self.name}{PARTS_SUFFIX}"

    @property
    def state(self) -> Path:
        return self.folder / f"{self.name}{STATE_SUFFIX}"

    @property
    def lock(self) -> Path:
        return self.folder / f"{self.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def writer_lock(paths: StorePaths) -> Iterator[None]:
    """Serialise writers of one dataset (readers never take it)."""
    paths.folder.mkdir(parents=True, exist_ok=True)
    with open(paths.lock, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def list_stores(folder: str | os.PathLike) -> list[str]:
    """Dataset names with a base file in ``folder``, sorted."""
    f = Path(folder)
    if not f.is_dir():
        return []
    return sorted(p.name[: -len(BASE_SUFFIX)] for p in f.glob(f"*{BASE_SUFFIX}") if p.is_file())


def data_dir() -> Path:
    """The folder the app serves: ``$VISIONLENS_DATA`` or ``./data``."""
    return Path(os.environ.get("VISIONLENS_DATA") or "data")


# --------------------------------------------------------------------------- writing


def _as_arrow(frame: pd.DataFrame | pa.Table | pa.RecordBatchReader) -> pa.Table | pa.RecordBatchReader:
    # A RecordBatchReader streams into DuckDB batch by batch: bases larger than memory.
    if isinstance(frame, (pa.Table, pa.RecordBatchReader)):
        return frame
    return pa.Table.from_pandas(frame, preserve_index=False)


def build_base(path: str | os.PathLike, tables: dict[str, pd.DataFrame | pa.Table | pa.RecordBatchReader],
               meta: dict[str, object]) -> StorePaths:
    """Write a complete base into a temporary file and rename it over ``path``.

    ``tables`` maps logical table names to frames; tables not given are created
    empty from ``TABLE_SCHEMAS``. ``meta`` values that are not strings are stored
    as JSON. A reader holding the old base keeps reading it until it refreshes.
    On any error the temporary file is removed and the old base stays.
    """
    paths = StorePaths.of(path)
    paths.folder.mkdir(parents=True, exist_ok=True)
    if "meta" in tables:
        raise StoreError("pass meta as the meta argument, not as a table")
    tmp = paths.folder / f".{paths.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.building"
    generation = uuid.uuid4().hex[:12]
    meta_rows = {"schema_version": str(SCHEMA_VERSION), "generation": generation,
                 "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for key, value in meta.items():
        meta_rows[key] = value if isinstance(value, str) else json.dumps(value)
    try:
        con = duckdb.connect(str(tmp))
        try:
            for table, schema in TABLE_SCHEMAS.items():
                if table == "meta":
                    continue
                if table in tables:
                    arrow = _as_arrow(tables[table])  # noqa: F841 (read by DuckDB's replacement scan)
                    con.execute(f"CREATE TABLE {_quote(table)} AS SELECT * FROM arrow")
                else:
                    cols = ", ".join(f"{_quote(c)} {t}" for c, t in schema.items())
                    con.execute(f"CREATE TABLE {_quote(table)} ({cols})")
            for table in sorted(set(tables) - set(TABLE_SCHEMAS)):
                arrow = _as_arrow(tables[table])  # noqa: F841
                con.execute(f"CREATE TABLE {_quote(table)} AS SELECT * FROM arrow")
            con.execute('CREATE TABLE "meta" (key VARCHAR, value VARCHAR)')
            con.executemany('INSERT INTO "meta" VALUES (?, ?)', list(meta_rows.items()))
            con.execute("CHECKPOINT")
        finally:
            con.close()
        with writer_lock(paths):
            os.replace(tmp, paths.base)
            _drop_stale_parts(paths, keep={generation, _previous_generation(paths, generation)})
    finally:
        for leftover in (tmp, Path(str(tmp) + ".wal")):
            leftover.unlink(missing_ok=True)
    return paths


def _previous_generation(paths: StorePaths, current: str) -> str:
    # The generation of the parts still on disk that are newest, besides ``current``:
    # readers of the old base keep those for one more refresh.
    newest: tuple[int, str] = (0, "")
    if paths.parts.is_dir():
        for f in paths.parts.glob(f"*/*{PART_SUFFIX}"):
            gen = f.name.split("--", 1)[0]
            if gen != current:
                newest = max(newest, (f.stat().st_mtime_ns, gen))
    return newest[1]


def _drop_stale_parts(paths: StorePaths, keep: set[str]) -> None:
    if not paths.parts.is_dir():
        return
    for f in paths.parts.glob(f"*/*{PART_SUFFIX}"):
        if f.name.split("--", 1)[0] not in keep:
            f.unlink(missing_ok=True)


def _base_generation(paths: StorePaths) -> str:
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"ATTACH '{_sql_string(str(paths.base))}' AS base (READ_ONLY)")
        row = con.execute("SELECT value FROM base.meta WHERE key = 'generation'").fetchone()
    finally:
        con.close()
    if row is None:
        raise StoreError("store has no generation", file=str(paths.base))
    return row[0]


def _sql_string(text: str) -> str:
    return text.replace("'", "''")


def write_part(path: str | os.PathLike, table: str, frame: pd.DataFrame | pa.Table) -> Path:
    """Add ``frame`` to logical ``table`` of the store as one immutable Parquet part."""
    paths = StorePaths.of(path)
    if not paths.base.exists():
        raise StoreError("no store to add to; build it first", file=str(paths.base))
    if not table.replace("_", "").isalnum():
        raise StoreError(f"bad table name {table!r}")
    arrow = _as_arrow(frame)
    folder = paths.parts / table
    folder.mkdir(parents=True, exist_ok=True)
    with writer_lock(paths):
        generation = _base_generation(paths)
        stamp = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        tmp = folder / f".{stamp}.writing"
        final = folder / f"{generation}--{stamp}{PART_SUFFIX}"
        try:
            pq.write_table(arrow, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    return final


def compact(path: str | os.PathLike) -> StorePaths:
    """Fold every part into a new base (atomic rename; safe while readers run)."""
    paths = StorePaths.of(path)
    with writer_lock(paths):
        store = Store(paths.base)
        tables = {t: store.arrow(f"SELECT * FROM {_quote(t)}") for t in store.tables() if t != "meta"}
        meta = {k: v for k, v in store.meta().items() if k not in ("schema_version", "generation", "built_at")}
        store.close()
    # build_base takes the lock itself for the rename; parts written meanwhile
    # belong to the old generation and are kept for one refresh.
    return build_base(paths.base, tables, meta)


# --------------------------------------------------------------------------- reading


class Store:
    """A read-only view of one dataset: base plus parts, refreshed cheaply."""

    def __init__(self, path: str | os.PathLike):
        self.paths = StorePaths.of(path)
        if not self.paths.base.exists():
            raise StoreError("store not found", file=str(self.paths.base))
        self._lock = threading.RLock()
        self._con: duckdb.DuckDBPyConnection | None = None
        # Derived tables: name -> (sql, params), most recently asked for last; the names
        # materialised in the current connection, most recently used last; one at a time.
        self._derived: OrderedDict[str, tuple[str, list]] = OrderedDict()
        self._materialized: OrderedDict[str, None] = OrderedDict()
        self._derive_lock = threading.Lock()
        self._signature: tuple = ()
        self._meta: dict[str, str] = {}
        self.refresh()

    # -- identity and refresh

    @property
    def name(self) -> str:
        return self.paths.name

    @property
    def signature(self) -> tuple:
        """Changes whenever the base is replaced or a part appears: use it in cache keys."""
        return self._signature

    def _disk_signature(self) -> tuple:
        st = os.stat(self.paths.base)
        parts = ()
        if self.paths.parts.is_dir():
            parts = tuple(sorted(
                (entry.name, f.name)
                for entry in os.scandir(self.paths.parts) if entry.is_dir()
                for f in os.scandir(entry.path) if f.name.endswith(PART_SUFFIX)
            ))
        return (st.st_ino, st.st_mtime_ns, st.st_size, parts)

    def refresh(self) -> bool:
        """Re-read the file listing; rebuild views if anything changed. True if it did."""
        with self._lock:
            try:
                disk = self._disk_signature()
            except FileNotFoundError as exc:
                raise StoreError("store disappeared", file=str(self.paths.base)) from exc
            if disk == self._signature:
                return False
            con = duckdb.connect(":memory:")
            try:
                # DuckDB's allocator keeps what a query freed (over 100 MiB after a million-row
                # result) until a background thread hands it back to the system, within a second.
                con.execute("SET allocator_background_threads = true")
                self._limit_memory(con)
                con.execute(f"ATTACH '{_sql_string(str(self.paths.base))}' AS base (READ_ONLY)")
                meta = dict(con.execute("SELECT key, value FROM base.meta").fetchall())
                version = int(meta.get("schema_version", "0"))
                if version != SCHEMA_VERSION:
                    raise StoreError(
                        f"store has schema version {version}, this VisionLens reads version "
                        f"{SCHEMA_VERSION}; rebuild it with `visionlens ingest` or `visionlens demo`",
                        file=str(self.paths.base))
                generation = meta.get("generation", "")
                base_tables = {r[0] for r in con.execute(
                    "SELECT table_name FROM duckdb_tables() WHERE database_name = 'base'").fetchall()}
                part_files: dict[str, list[str]] = {}
                for table, fname in disk[3]:
                    if fname.split("--", 1)[0] == generation:
                        part_files.setdefault(table, []).append(str(self.paths.parts / table / fname))
                parts_sql = self._load_parts(con, part_files)
                for table in sorted(base_tables | set(part_files)):
                    selects = []
                    if table in base_tables:
                        selects.append(f"SELECT * FROM base.{_quote(table)}")
                    if table in part_files:
                        selects.append(parts_sql[table])
                    body = " UNION ALL BY NAME ".join(selects)
                    con.execute(f"CREATE VIEW main.{_quote(table)} AS {body}")
                con.execute(f"CREATE SCHEMA {DERIVED_SCHEMA}")
            except duckdb.Error as exc:
                con.close()
                raise StoreError(f"cannot open store: {exc}", file=str(self.paths.base)) from exc
            except Exception:
                con.close()
                raise
            self._con, self._meta, self._signature = con, meta, disk
            self._materialized = OrderedDict()
            self._tables = tuple(sorted(base_tables | set(part_files)))
            return True

    def _limit_memory(self, con: duckdb.DuckDBPyConnection) -> None:
        limit = os.environ.get(READ_MEMORY_LIMIT_ENV) or READ_MEMORY_LIMIT
        try:
            con.execute(f"SET memory_limit = '{_sql_string(limit)}'")
        except duckdb.Error as exc:
            raise StoreError(f"{READ_MEMORY_LIMIT_ENV}={limit!r} is not a memory size such as 512MB or 2GB",
                             field=READ_MEMORY_LIMIT_ENV) from exc
        # A folder per connection that does not exist yet: DuckDB creates it when it first spills
        # and removes it on close (the default, ./.tmp, is shared by every process in the folder).
        spill = Path(tempfile.gettempdir()) / f"visionlens-spill-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        con.execute(f"SET temp_directory = '{_sql_string(str(spill))}'")

    @staticmethod
    def _load_parts(con: duckdb.DuckDBPyConnection, part_files: dict[str, list[str]]) -> dict[str, str]:
        """SQL that reads each table's parts.

        Parts are loaded into memory once per change of the listing: scanning
        many small Parquet files on every query costs far more than this one
        read. The smallest part sets go first, up to ``PARTS_IN_MEMORY_BYTES`` of
        Parquet in all; the rest, and any that would not fit under the memory
        limit, stay on disk and are scanned instead.
        """
        con.execute("CREATE SCHEMA parts")
        sizes = {table: sum(os.path.getsize(f) for f in files) for table, files in part_files.items()}
        budget, sql = PARTS_IN_MEMORY_BYTES, {}
        for table in sorted(part_files, key=lambda t: (sizes[t], t)):
            listing = ", ".join(f"'{_sql_string(f)}'" for f in part_files[table])
            scan = f"SELECT * FROM read_parquet([{listing}], union_by_name = true)"
            sql[table] = scan
            if sizes[table] > budget:
                continue
            try:
                con.execute(f"CREATE TABLE parts.{_quote(table)} AS {scan}")
            except duckdb.OutOfMemoryException:
                con.execute(f"DROP TABLE IF EXISTS parts.{_quote(table)}")
                continue
            budget -= sizes[table]
            sql[table] = f"SELECT * FROM parts.{_quote(table)}"
        return sql

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    # -- queries (a cursor per query: safe from several threads)

    def cursor(self) -> duckdb.DuckDBPyConnection:
        return self._cursor_for("")

    @staticmethod
    def _execute(con: duckdb.DuckDBPyConnection, sql: str, params: list | tuple = ()) -> None:
        cur = con.cursor()
        try:
            cur.execute(sql, list(params))
        finally:
            cur.close()

    def derived(self, key: tuple, sql: str, params: list | tuple = ()) -> str:
        """The name (schema-qualified, quoted) of a table holding ``sql``'s rows, for this store's
        own queries to join.

        The table is computed when a query first names it, once per refresh of the store (new
        parts or a new base start afresh); only the ``DERIVED_TABLES_KEPT`` most recently
        computed are held, an older one is computed again when named again. ``key``
        identifies the rows: the same key must mean the same ``sql`` and ``params``.
        """
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:24]
        name = f"{DERIVED_SCHEMA}.{_quote('t' + digest)}"
        with self._lock:
            self._derived[name] = (sql, list(params))
            self._derived.move_to_end(name)
            while len(self._derived) > DERIVED_DEFINITIONS_KEPT:
                self._derived.popitem(last=False)
        return name

    def _materialize(self, con: duckdb.DuckDBPyConnection, name: str) -> None:
        with self._lock:
            if name not in self._derived:
                return  # forgotten: the query naming it fails as for any unknown table
            body, params = self._derived[name]
        self._execute(con, f"CREATE TABLE IF NOT EXISTS {name} AS {body}", params)
        with self._lock:
            if self._con is not con:
                return
            self._materialized[name] = None
            while len(self._materialized) > DERIVED_TABLES_KEPT:
                oldest, _ = self._materialized.popitem(last=False)
                self._execute(con, f"DROP TABLE IF EXISTS {oldest}")

    def _cursor_for(self, sql: str) -> duckdb.DuckDBPyConnection:
        """A cursor on the current connection, with every derived table ``sql`` names in it."""
        with self._lock:
            if self._con is None:
                raise StoreError("store is closed", file=str(self.paths.base))
            con = self._con
            wanted = [name for name in self._derived if name in sql]
            for name in wanted:
                if name in self._materialized:
                    self._materialized.move_to_end(name)
        for name in wanted:
            with self._derive_lock:
                with self._lock:
                    held = self._con is con and name in self._materialized
                if not held:
                    self._materialize(con, name)
        return con.cursor()

    def _run(self, sql: str, params: list | tuple | None, fetch):
        for attempt in range(2):
            cur = self._cursor_for(sql)
            try:
                return fetch(cur, list(params or []))
            except duckdb.CatalogException:
                # A derived table this query names may have been dropped for a newer one meanwhile:
                # compute the ones it names again, once.
                with self._lock:
                    named = [name for name in self._derived if name in sql]
                    for name in named:
                        self._materialized.pop(name, None)
                if attempt or not named:
                    raise
            finally:
                cur.close()

    def query(self, sql: str, params: list | tuple | None = None) -> pd.DataFrame:
        return self._run(sql, params, lambda cur, values: cur.execute(sql, values).df())

    def arrow(self, sql: str, params: list | tuple | None = None) -> pa.Table:
        return self._run(sql, params, lambda cur, values: cur.sql(sql, params=values).to_arrow_table())

    def rows(self, sql: str, params: list | tuple | None = None) -> list[tuple]:
        return self._run(sql, params, lambda cur, values: cur.execute(sql, values).fetchall())

    def scalar(self, sql: str, params: list | tuple | None = None):
        rows = self.rows(sql, params)
        return rows[0][0] if rows else None

    # -- catalog

    def tables(self) -> tuple[str, ...]:
        return self._tables

    def has_table(self, table: str) -> bool:
        return table in self._tables

    def table_columns(self, table: str) -> list[str]:
        if table not in self._tables:
            return []
        return [r[0] for r in self.rows(
            "SELECT column_name FROM duckdb_columns() WHERE database_name = 'memory' "
            "AND schema_name = 'main' AND table_name = ? ORDER BY column_index", [table])]

    def meta(self) -> dict[str, str]:
        return dict(self._meta)

    @property
    def task(self) -> str:
        return self._meta.get("task", "")

    @property
    def classes(self) -> list[str]:
        return json.loads(self._meta.get("classes", "[]"))

    def columns(self) -> pd.DataFrame:
        """The filterable-column whitelist (name, kind, source, label)."""
        return self.query('SELECT name, kind, source, label FROM "columns" ORDER BY name')

    def models(self) -> pd.DataFrame:
        return self.query('SELECT model_id, name, task, params FROM "models" ORDER BY model_id')

    def model_ids(self) -> list[str]:
        """Model ids in the order they were added, the first being every page's default: adding a model keeps
        what links without ``model=`` show. The view reads the base (rows in build order), then the parts
        (files named by time); DuckDB keeps that order (``preserve_insertion_order``, its default)."""
        return [r[0] for r in self.rows('SELECT model_id FROM "models"')]

    def image_count(self) -> int:
        return int(self.scalar('SELECT count(*) FROM "images"'))


def open_store(path: str | os.PathLike) -> Store:
    return Store(path)


def memory_connection() -> duckdb.DuckDBPyConnection:
    """A private in-memory DuckDB for engine work that has no store (e.g. eval-coco)."""
    return duckdb.connect(":memory:")
