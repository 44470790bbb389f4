"""Saved cohorts, notes and review status: the one file the app writes.

A small SQLite database beside the store (``NAME.state.sqlite``) in WAL mode,
so readers never wait for a writer and several processes (app sessions, the
CLI) can write: each write is one ``BEGIN IMMEDIATE`` transaction on a fresh
connection with a busy timeout, so concurrent writers queue instead of failing.

A saved cohort holds its filter as a canonical query string (no view state),
an optional hand-picked list of image ids, and an optional parent: its images
are its own filter AND its parent's, recursively (``core.cohorts.expand``).
Cohorts import from and export to the Azure RAI dashboard's cohort JSON
(``name`` + ``cohort_filter_list`` of ``{method, arg, column}``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from .cohorts import (OPERATORS, Catalog, Cohort, Filter, ParsedQuery, expand, format_number, parse_filter,
                      parse_query, to_query)
from .errors import CohortError
from .store import StorePaths

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0
STATUSES = ("open", "reviewed", "fixed")
REVIEW_KINDS = ("image", "cohort")
DELETE_MODES = ("error", "reparent", "cascade")
MAX_NAME = 200
MAX_QUERY_LENGTH = 2000  # longer cohorts are saved and linked as cohort=<id>

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cohorts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    query TEXT NOT NULL DEFAULT '',
    parent_id INTEGER REFERENCES cohorts(id),
    image_ids TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cohorts_parent ON cohorts(parent_id);
CREATE TABLE IF NOT EXISTS reviews (
    kind TEXT NOT NULL CHECK (kind IN ('image', 'cohort')),
    target INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'reviewed', 'fixed')),
    note TEXT NOT NULL DEFAULT '',
    updated_at TEXT NOT NULL,
    PRIMARY KEY (kind, target)
);
"""

_KEEP = object()  # "leave this field as it is" in update_cohort


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class SavedCohort:
    """A named cohort in the state database."""

    id: int
    name: str
    description: str
    query: str  # canonical filter query string; no view state, no cohort=
    parent_id: int | None
    image_ids: tuple[int, ...] | None  # a hand-picked selection, or None
    created_at: str
    updated_at: str

    @property
    def link(self) -> str:
        """The query string that opens this cohort."""
        return f"cohort={self.id}"

    def cohort(self, catalog: Catalog) -> Cohort:
        """Its own filter (plus the hand-picked ids) with its parent as ``parent_id``."""
        own = parse_query(self.query, catalog, max_filters=None).cohort
        filters = own.filters
        if self.image_ids:
            filters += (Filter("image_id", "in", self.image_ids),)
        return Cohort(filters, own.groups, self.parent_id)


@dataclass(frozen=True)
class Review:
    """Review status and free-text note of one image or one saved cohort."""

    kind: str
    target: int
    status: str
    note: str
    updated_at: str


def _saved(row: tuple) -> SavedCohort:
    ids = tuple(json.loads(row[5])) if row[5] is not None else None
    return SavedCohort(row[0], row[1], row[2], row[3], row[4], ids, row[6], row[7])


_COHORT_COLUMNS = "id, name, description, query, parent_id, image_ids, created_at, updated_at"


def _clean_name(name: str) -> str:
    text = str(name).strip()
    if not text:
        raise CohortError("a cohort needs a name", field="name")
    if len(text) > MAX_NAME:
        raise CohortError(f"cohort names are at most {MAX_NAME} characters", field="name")
    return text


def _clean_ids(image_ids: Iterable[int] | None) -> str | None:
    if image_ids is None:
        return None
    try:
        ids = sorted({int(i) for i in image_ids})
    except (TypeError, ValueError):
        raise CohortError("image ids must be integers", field="image_ids") from None
    if not ids:
        raise CohortError("a hand-picked selection needs at least one image", field="image_ids")
    return json.dumps(ids, separators=(",", ":"))


def _filter_query(cohort: Cohort | None) -> str:
    if cohort is None:
        return ""
    return to_query(Cohort(cohort.filters, cohort.groups))


class StateDB:
    """Saved cohorts and reviews of one store. Safe from several threads and processes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._ready = False

    @classmethod
    def for_store(cls, store_path: str | os.PathLike) -> "StateDB":
        return cls(StorePaths.of(store_path).state)

    # -- connections

    def _open(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        con.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        con.execute("PRAGMA foreign_keys = ON")
        # WAL with synchronous NORMAL: a commit is atomic and never blocks readers; only
        # a power cut can drop the last commits (a saved cohort, a note), never corrupt.
        con.execute("PRAGMA synchronous = NORMAL")
        if not self._ready:
            self._prepare(con)
        return con

    def _prepare(self, con: sqlite3.Connection) -> None:
        if con.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            # Switching to WAL needs a moment alone with the file: retry while
            # another process is creating the same database.
            for attempt in range(20):
                try:
                    mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                except sqlite3.OperationalError:
                    mode = None
                if mode == "wal":
                    break
                time.sleep(0.05 * (attempt + 1))
            else:
                log.warning("state database %s stays out of WAL mode: writers may wait for readers", self.path)
            con.execute("BEGIN IMMEDIATE")
            try:
                if con.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            con.execute(statement)
                    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        self._ready = True

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = self._open()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection | None]:
        if not self.path.exists():
            yield None  # nothing saved yet; reading never creates the file
            return
        con = self._open()
        try:
            yield con
        finally:
            con.close()

    # -- saved cohorts

    def _get(self, con: sqlite3.Connection | None, cohort_id: int) -> SavedCohort:
        row = None
        if con is not None:
            row = con.execute(f"SELECT {_COHORT_COLUMNS} FROM cohorts WHERE id = ?", (int(cohort_id),)).fetchone()
        if row is None:
            known = [r[0] for r in con.execute("SELECT id FROM cohorts ORDER BY id")] if con is not None else []
            raise CohortError(f"no saved cohort #{cohort_id}", field="cohort", choices=known)
        return _saved(row)

    def get_cohort(self, cohort_id: int) -> SavedCohort:
        with self._read() as con:
            return self._get(con, cohort_id)

    def list_cohorts(self) -> list[SavedCohort]:
        with self._read() as con:
            if con is None:
                return []
            return [_saved(r) for r in con.execute(f"SELECT {_COHORT_COLUMNS} FROM cohorts ORDER BY id")]

    def children(self, cohort_id: int) -> list[SavedCohort]:
        with self._read() as con:
            if con is None:
                return []
            return [_saved(r) for r in con.execute(
                f"SELECT {_COHORT_COLUMNS} FROM cohorts WHERE parent_id = ? ORDER BY id", (int(cohort_id),))]

    def _check_parent(self, con: sqlite3.Connection, cohort_id: int | None, parent_id: int | None) -> None:
        """The parent exists and is not the cohort itself nor one of its descendants."""
        seen = set()
        current = parent_id
        while current is not None:
            if current == cohort_id:
                raise CohortError(f"saved cohort #{cohort_id} cannot sit inside itself (via #{parent_id})",
                                  field="parent_id")
            if current in seen:
                raise CohortError(f"saved cohorts refer to each other in a cycle at #{current}", field="parent_id")
            seen.add(current)
            current = self._get(con, current).parent_id

    def create_cohort(self, name: str, cohort: Cohort | None = None, *, description: str = "",
                      parent_id: int | None = None, image_ids: Iterable[int] | None = None) -> SavedCohort:
        """Save ``cohort``'s filter (and/or hand-picked ``image_ids``) under ``name``.

        The parent is ``parent_id``, else the cohort's own ``parent_id`` (a
        refinement of a saved cohort stays inside it).
        """
        name = _clean_name(name)
        if cohort is not None and cohort.parent_id is not None:
            if parent_id is not None and parent_id != cohort.parent_id:
                raise CohortError(f"cohort refines #{cohort.parent_id} but parent_id is #{parent_id}",
                                  field="parent_id")
            parent_id = cohort.parent_id
        ids = _clean_ids(image_ids)
        stamp = _now()
        with self._write() as con:
            self._check_parent(con, None, parent_id)
            cursor = con.execute(
                "INSERT INTO cohorts (name, description, query, parent_id, image_ids, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, str(description), _filter_query(cohort), parent_id, ids, stamp, stamp))
            return self._get(con, cursor.lastrowid)

    def update_cohort(self, cohort_id: int, *, name: object = _KEEP, description: object = _KEEP,
                      cohort: object = _KEEP, parent_id: object = _KEEP, image_ids: object = _KEEP
                      ) -> SavedCohort:
        """Change any of the fields; the others stay. ``image_ids=None`` drops a hand-picked list."""
        with self._write() as con:
            current = self._get(con, cohort_id)
            fields = {
                "name": current.name if name is _KEEP else _clean_name(name),
                "description": current.description if description is _KEEP else str(description),
                "query": current.query if cohort is _KEEP else _filter_query(cohort),
                "parent_id": current.parent_id if parent_id is _KEEP else parent_id,
                "image_ids": (json.dumps(list(current.image_ids), separators=(",", ":"))
                              if current.image_ids is not None else None)
                if image_ids is _KEEP else _clean_ids(image_ids),
            }
            if parent_id is not _KEEP:
                self._check_parent(con, current.id, fields["parent_id"])
            con.execute("UPDATE cohorts SET name = ?, description = ?, query = ?, parent_id = ?, image_ids = ?, "
                        "updated_at = ? WHERE id = ?",
                        (*fields.values(), _now(), current.id))
            return self._get(con, current.id)

    def rename_cohort(self, cohort_id: int, name: str) -> SavedCohort:
        return self.update_cohort(cohort_id, name=name)

    def duplicate_cohort(self, cohort_id: int, name: str | None = None) -> SavedCohort:
        """A copy with the same filter, selection and parent (its children stay with the original)."""
        stamp = _now()
        with self._write() as con:
            source = self._get(con, cohort_id)
            new_name = _clean_name(name if name is not None else f"{source.name} (copy)"[:MAX_NAME])
            cursor = con.execute(
                "INSERT INTO cohorts (name, description, query, parent_id, image_ids, created_at, updated_at) "
                "SELECT ?, description, query, parent_id, image_ids, ?, ? FROM cohorts WHERE id = ?",
                (new_name, stamp, stamp, source.id))
            return self._get(con, cursor.lastrowid)

    def delete_cohort(self, cohort_id: int, children: str = "error") -> list[int]:
        """Delete a saved cohort; what happens to its children is the caller's choice.

        ``error`` (default): refuse while it has children. ``reparent``: its
        children move up to its own parent. ``cascade``: its descendants go too.
        Returns the ids deleted. Their reviews go with them.
        """
        if children not in DELETE_MODES:
            raise CohortError(f"unknown delete mode {children!r}", field="children", choices=list(DELETE_MODES))
        with self._write() as con:
            target = self._get(con, cohort_id)
            kids = [r[0] for r in con.execute("SELECT id FROM cohorts WHERE parent_id = ? ORDER BY id", (target.id,))]
            doomed = [target.id]
            if kids and children == "error":
                raise CohortError(f"saved cohort '{target.name}' (#{target.id}) has {len(kids)} child cohort(s) "
                                  f"({', '.join(f'#{k}' for k in kids)}); delete them too or move them up",
                                  field="children", choices=["reparent", "cascade"])
            if children == "reparent":
                con.execute("UPDATE cohorts SET parent_id = ?, updated_at = ? WHERE parent_id = ?",
                            (target.parent_id, _now(), target.id))
            elif children == "cascade":
                doomed = [r[0] for r in con.execute(
                    "WITH RECURSIVE tree(id) AS (SELECT ? UNION SELECT c.id FROM cohorts c JOIN tree "
                    "ON c.parent_id = tree.id) SELECT id FROM tree", (target.id,))]
            marks = ",".join("?" * len(doomed))
            con.execute(f"DELETE FROM cohorts WHERE id IN ({marks})", doomed)
            con.execute(f"DELETE FROM reviews WHERE kind = 'cohort' AND target IN ({marks})", doomed)
            return sorted(doomed)

    def short_query(self, parsed: ParsedQuery, *, name: str | None = None, limit: int = MAX_QUERY_LENGTH) -> str:
        """``parsed``'s query string, or, past ``limit`` characters, one that links a saved copy
        of its cohort (``cohort=<id>`` plus the view), so a link stays short. A cohort that is
        only a list of image ids is saved as a hand-picked selection."""
        query = to_query(parsed)
        if len(query) <= limit:
            return query
        cohort = parsed.cohort
        picked = cohort.filters[0].value if (not cohort.groups and len(cohort.filters) == 1 and
                                             cohort.filters[0].column == "image_id" and
                                             cohort.filters[0].op in ("in", "eq")) else None
        if picked is not None:
            ids = picked if isinstance(picked, tuple) else (picked,)
            if all(isinstance(i, int) for i in ids):
                saved = self.create_cohort(name or f"{len(ids)} picked images", image_ids=ids,
                                           parent_id=cohort.parent_id)
                return to_query(Cohort(parent_id=saved.id), parsed.view)
        saved = self.create_cohort(name or f"Saved view {_now()[:19]}", cohort)
        return to_query(Cohort(parent_id=saved.id), parsed.view)

    # -- reviews

    def set_review(self, kind: str, target: int, *, status: str | None = None, note: str | None = None) -> Review:
        """Set the status and/or note of an image (by image id) or a saved cohort (by id)."""
        if kind not in REVIEW_KINDS:
            raise CohortError(f"unknown review kind {kind!r}", field="kind", choices=list(REVIEW_KINDS))
        if status is not None and status not in STATUSES:
            raise CohortError(f"unknown review status {status!r}", field="status", choices=list(STATUSES))
        with self._write() as con:
            if kind == "cohort":
                self._get(con, target)
            con.execute(
                "INSERT INTO reviews (kind, target, status, note, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (kind, target) DO UPDATE SET status = coalesce(?, status), "
                "note = coalesce(?, note), updated_at = excluded.updated_at",
                (kind, int(target), status or "open", note or "", _now(), status, note))
            row = con.execute("SELECT kind, target, status, note, updated_at FROM reviews WHERE kind = ? "
                              "AND target = ?", (kind, int(target))).fetchone()
            return Review(*row)

    def get_review(self, kind: str, target: int) -> Review | None:
        with self._read() as con:
            if con is None:
                return None
            row = con.execute("SELECT kind, target, status, note, updated_at FROM reviews WHERE kind = ? "
                              "AND target = ?", (kind, int(target))).fetchone()
            return Review(*row) if row else None

    def list_reviews(self, kind: str | None = None, status: str | None = None) -> list[Review]:
        with self._read() as con:
            if con is None:
                return []
            rows = con.execute(
                "SELECT kind, target, status, note, updated_at FROM reviews "
                "WHERE (? IS NULL OR kind = ?) AND (? IS NULL OR status = ?) ORDER BY kind, target",
                (kind, kind, status, status))
            return [Review(*r) for r in rows]

    # -- Azure RAI cohort JSON

    def export_rai(self, cohort_id: int, catalog: Catalog) -> dict:
        """One saved cohort as RAI cohort JSON, its parents' filters folded in."""
        saved = self.get_cohort(cohort_id)
        chain = expand(saved.cohort(catalog), catalog, self)
        return cohort_to_rai(saved.name, chain, catalog)

    def import_rai(self, data: str | Mapping | list, catalog: Catalog, *,
                   parent_id: int | None = None) -> list[SavedCohort]:
        """Save every cohort in RAI cohort JSON (one object or a list). All or nothing is checked first."""
        items = json.loads(data) if isinstance(data, str) else data
        items = [items] if isinstance(items, Mapping) else list(items)
        converted = [rai_to_cohort(item, catalog, index=i) for i, item in enumerate(items)]
        return [self.create_cohort(name, cohort, parent_id=parent_id) for name, cohort in converted]


# --------------------------------------------------------------------------- RAI mapping

RAI_COLUMNS = {"True Y": "true_label", "true_y": "true_label", "Predicted Y": "pred_label",
               "pred_y": "pred_label", "Index": "image_id"}
_RAI_EXPORT_COLUMNS = {"true_label": "True Y", "pred_label": "Predicted Y", "image_id": "Index"}
RAI_METHODS = {"less": "lt", "less and equal": "lte", "greater": "gt", "greater and equal": "gte",
               "equal": "eq", "includes": "in", "excludes": "notin", "in the range of": "between"}
_RAI_EXPORT_METHODS = {"lt": "less", "lte": "less and equal", "gt": "greater", "gte": "greater and equal",
                       "in": "includes", "notin": "excludes", "between": "in the range of"}


def _rai_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return format_number(value)
    if isinstance(value, str):
        return value
    raise CohortError(f"RAI filter argument {value!r} is not a number or text")


def cohort_to_rai(name: str, chain: list[Cohort], catalog: Catalog) -> dict:
    """RAI cohort JSON of the conjunction of ``chain`` (a cohort and its ancestors)."""
    filters = []
    for part in chain:
        if part.groups:
            raise CohortError(f"cohort '{name}' has OR groups, which RAI cohort JSON cannot express",
                              field="groups")
        for f in part.filters:
            info = catalog.column(f.column)
            if info.needs_model and f.column != "pred_label":
                raise CohortError(f"{f.column} has no RAI cohort equivalent", field=f.column)
            column = _RAI_EXPORT_COLUMNS.get(f.column, f.column)
            if f.op in ("eq", "ne"):
                numeric = info.values == "number" and f.op == "eq"
                method = "equal" if numeric else ("includes" if f.op == "eq" else "excludes")
                arg = [f.value]
            elif f.op == "contains" and info.is_list:
                method, arg = "includes", [f.value]
            elif f.op in _RAI_EXPORT_METHODS:
                method = _RAI_EXPORT_METHODS[f.op]
                arg = list(f.value) if isinstance(f.value, tuple) else [f.value]
            else:
                raise CohortError(f"{f.column}__{f.op} has no RAI cohort equivalent", field=f.column)
            filters.append({"method": method, "arg": arg, "column": column})
    return {"name": name, "cohort_filter_list": filters}


def _rai_filter(entry: object, catalog: Catalog) -> Filter:
    if not isinstance(entry, Mapping):
        raise CohortError("filter is not an object")
    method, column, args = entry.get("method"), entry.get("column"), entry.get("arg")
    op = RAI_METHODS.get(method)
    if op is None:
        raise CohortError(f"unknown RAI method {method!r}", choices=list(RAI_METHODS))
    if not isinstance(args, list) or not args:
        raise CohortError("'arg' must be a non-empty list")
    ours = RAI_COLUMNS.get(column, column)
    if not isinstance(ours, str):
        raise CohortError(f"column {column!r} is not a name")
    info = catalog.column(ours)
    if op == "eq" and info.values != "number":
        op = "in"  # RAI's "equal" is numeric; a text value reads as a one-item includes
    if OPERATORS[op].arity == "one" and len(args) != 1:
        raise CohortError(f"RAI method {method!r} takes one value")
    return parse_filter(ours, op, [_rai_text(a) for a in args], catalog, key=f"{ours}__{op}")


def rai_to_cohort(item: Mapping, catalog: Catalog, *, index: int = 0) -> tuple[str, Cohort]:
    """(name, cohort) from one RAI cohort object; every filter checked like a URL's."""
    if not isinstance(item, Mapping) or "cohort_filter_list" not in item:
        raise CohortError("RAI cohort needs 'name' and 'cohort_filter_list'", row=index, field="cohort_filter_list")
    name = _clean_name(item.get("name") or f"Imported cohort {index + 1}")
    filters = []
    for position, entry in enumerate(item["cohort_filter_list"] or []):
        where = f"cohort_filter_list[{position}]"
        try:
            filters.append(_rai_filter(entry, catalog))
        except CohortError as error:
            raise CohortError(error.message, row=index, field=where, choices=error.choices) from None
    return name, Cohort(tuple(filters))
