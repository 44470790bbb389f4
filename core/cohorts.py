"""Cohorts: the filter model, the URL query-string codec and the one SQL compiler.

A cohort is a filter in disjunctive normal form over a store's catalogued
columns, carried in the URL so that a link bookmarks the exact view::

    ?true_label__in=cat,dog&g1.brightness__lt=0.3&g2.sharpness__lt=12&model=cnn

- ``<column>__<op>=<value>``; unprefixed filters are AND-ed; filters prefixed
  ``g1.``, ``g2.`` … form groups, each an AND, OR-ed with one another.
- Lists are comma separated. Inside one list item ``%`` and ``,`` are written
  ``%25`` and ``%2C`` *before* the URL's own percent-encoding (so a literal
  comma reads ``%252C`` in the address bar): the item boundaries survive a
  browser or Streamlit decoding the query string once.
- ``cohort=<id>`` refers to a saved cohort (``core.state``); filters next to
  it refine it, and a saved cohort's parent refines further up (hierarchy).
- View state: ``store``, ``model``, ``iou``, ``conf`` (detection score
  threshold), ``thr`` (multilabel label threshold), ``page``, ``image``, ``view``.

Parsing is strict and total: any input either gives a ``ParsedQuery`` or a
``CohortError`` naming the parameter, the bad value and the valid choices.
``to_query`` writes the canonical form (sorted, deduplicated), so
``to_query(parse_query(q))`` is a fixed point and equal cohorts give equal
strings, SQL and cache keys.

The compiler turns a cohort into ``SELECT image_id`` over a per-model *frame*
(image columns plus ``pred_label``, ``score``, ``outcome``, ``error`` and, for
detection, ``n_tp``/``n_fp``/``n_fn``, all computed live at the chosen
thresholds). Every value is a bound ``?`` parameter; every identifier comes
from the store's catalog and is quoted by ``quote_identifier``. Nothing else
in VisionLens builds a WHERE clause.

Derived columns join the frame when their data exists, and only in frames
that read them:

- ``label_issue`` (boolean) and ``label_quality_score`` (low: likely wrong)
  from the ``label_quality`` table, the model's latest run (``core.label_quality``);
- ``flip_<kind>[_<direction>]`` (e.g. ``flip_blur__lte=1.5``) from the
  ``counterfactuals`` table: the smallest strength that flips the model's
  prediction, NULL when none does within the searched bound (``core.robustness``);
- ``review_status`` (open / reviewed / fixed) from the state database: images
  nobody reviewed have none (NULL: ``review_status__isnull=true`` finds them;
  ``review_status__notin=fixed`` keeps them). ``catalog_of`` reads the statuses
  on each call and the frame binds them; ``Catalog.reviews_key`` changes with
  them, for cache keys.

Pages are cheap on big detection stores: ``cohort_rows`` aggregates detections
and matches for a page's images only, and for a cohort that filters on them
(the grid's ``outcome``), sorted by image columns, for a window of the first
images in sort order (``_windowed_page``); image-column conjuncts of a cohort
narrow the images aggregated at all, in pages and in ``cohort_outcome_counts`` (a cohort's
sizes per outcome: the explorer's sections).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import sys
import weakref
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence
from urllib.parse import quote, unquote_plus

import numpy as np
import pandas as pd

from .errors import CohortError, EvalError, VisionLensError
from .label_quality import latest_sql
from .matching import image_counts_params
from .store import Store

if TYPE_CHECKING:
    from .state import StateDB

log = logging.getLogger(__name__)

MAX_FILTERS = 256  # a URL with more conditions than this is not a cohort anyone built by hand
_SHOWN_VALUE = 60  # characters of a bad value repeated in an error message


def quote_identifier(name: str) -> str:
    """The one way an identifier enters SQL: double-quoted, inner quotes doubled."""
    return '"' + str(name).replace('"', '""') + '"'


# The selection of a cohort without filters: metrics know it means "every image".
ALL_IMAGES_SQL = f"SELECT {quote_identifier('image_id')} FROM {quote_identifier('images')}"


# --------------------------------------------------------------------------- values


_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_SMALL_INTEGER = re.compile(r"\s*[+-]?[0-9]{1,18}\s*")  # fits int64 whatever the digits
_SURROGATE = re.compile("[\ud800-\udfff]")
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ITEM_ESCAPE = re.compile("%(25|2[Cc])")
_EXACT_INT = 2 ** 53  # larger integers are kept as floats: DuckDB and JSON agree on those


def _show(text: object) -> str:
    text = str(text)
    return repr(text if len(text) <= _SHOWN_VALUE else text[:_SHOWN_VALUE] + "…")


def format_number(value: float | int) -> str:
    """Shortest text that reads back as exactly ``value``."""
    if isinstance(value, bool):
        raise TypeError("booleans are not numbers here")
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def display_number(value: float | int) -> str:
    """A number to read: whole numbers whole, others to 4 significant digits (a URL keeps
    ``format_number``'s exact text; 0.8333333333333334 reads 0.8333 on screen)."""
    value = float(value)
    if value.is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    if abs(value) >= 1e4:
        return f"{value:.1f}"
    if not math.isfinite(value) or abs(value) < 1e-3:
        return f"{value:.4g}"
    return np.format_float_positional(value, precision=4, unique=True, fractional=False, trim="-")


def parse_number(text: str) -> int | float:
    """A decimal number (ASCII digits only; no nan/inf, no ``1_000``)."""
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"{_show(text)} is not a number")
    if _INTEGER.fullmatch(text) and len(text) <= 20:  # longer digit strings are no exact integers anyway
        value = int(text)
        if abs(value) <= _EXACT_INT:
            return value
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{_show(text)} is not a finite number")
    return number


def _escape_item(text: str, *, comma: bool) -> str:
    text = text.replace("%", "%25")
    return text.replace(",", "%2C") if comma else text


def _unescape_item(text: str) -> str:
    return _ITEM_ESCAPE.sub(lambda m: "%" if m.group(1) == "25" else ",", text)


# --------------------------------------------------------------------------- operators


@dataclass(frozen=True)
class Operand:
    """A filtered column as SQL: its expression, whether it holds lists, and the
    type a parameter is cast to before comparing (FLOAT columns compare in FLOAT,
    as numpy compares a float32 array with a Python float)."""

    sql: str
    is_list: bool = False
    cast: str | None = None

    @property
    def mark(self) -> str:
        return f"CAST(? AS {self.cast})" if self.cast else "?"

    @property
    def list_mark(self) -> str:
        return f"CAST(? AS {self.cast}[])" if self.cast else "?"


@dataclass(frozen=True)
class Operator:
    """One filter operator: how many values it takes, its SQL and its sentence."""

    name: str
    arity: str  # none | one | many | two
    phrase: str  # "is less than"
    sql: Callable[[Operand, object], tuple[str, list]]  # (column, bound value) → (fragment, params)
    list_phrase: str | None = None  # wording on list columns, when it differs


def _compare(symbol: str) -> Callable[[Operand, object], tuple[str, list]]:
    return lambda col, value: (f"{col.sql} {symbol} {col.mark}", [value])


def _in(col: Operand, values: object) -> tuple[str, list]:
    if col.is_list:
        return f"list_has_any({col.sql}, {col.list_mark})", [values]
    return f"{col.sql} = ANY({col.list_mark})", [values]


def _notin(col: Operand, values: object) -> tuple[str, list]:
    inside, params = _in(col, values)
    # Missing values are "none of" the listed ones.
    return f"NOT coalesce({inside}, false)", params


def _contains(col: Operand, value: object) -> tuple[str, list]:
    if col.is_list:
        return f"list_contains({col.sql}, {col.mark})", [value]
    return f"contains({col.sql}, ?)", [value]


def _between(col: Operand, value: object) -> tuple[str, list]:
    return f"{col.sql} BETWEEN {col.mark} AND {col.mark}", list(value)


def _isnull(col: Operand, value: object) -> tuple[str, list]:
    # An empty list (an image with no labels) counts as missing.
    return (f"coalesce(len({col.sql}), 0) = 0" if col.is_list else f"{col.sql} IS NULL"), []


def _notnull(col: Operand, value: object) -> tuple[str, list]:
    return (f"coalesce(len({col.sql}), 0) > 0" if col.is_list else f"{col.sql} IS NOT NULL"), []


OPERATORS: dict[str, Operator] = {op.name: op for op in (
    Operator("eq", "one", "is", _compare("=")),
    # "is not x" keeps images where the value is missing, as a person reads it.
    Operator("ne", "one", "is not", _compare("IS DISTINCT FROM")),
    Operator("lt", "one", "is less than", _compare("<")),
    Operator("lte", "one", "is at most", _compare("<=")),
    Operator("gt", "one", "is greater than", _compare(">")),
    Operator("gte", "one", "is at least", _compare(">=")),
    Operator("in", "many", "is one of", _in, "includes any of"),
    Operator("notin", "many", "is none of", _notin, "includes none of"),
    Operator("between", "two", "is between", _between),
    Operator("contains", "one", "contains", _contains, "includes"),
    Operator("isnull", "none", "is missing", _isnull, "is empty"),
    Operator("notnull", "none", "is present", _notnull, "is not empty"),
)}

_NO_VALUE_TEXT = ("", "1", "true")
_CANONICAL_NO_VALUE = "true"


# --------------------------------------------------------------------------- filter model


def _item_key(value: object) -> tuple:
    return (1, value) if isinstance(value, str) else (0, value)


def _all_numbers(values: Iterable[object]) -> bool:
    """Whether every value is an int or float (not a flag): such values sort as they are, in C, which
    matters for a selection of a million image ids."""
    return set(map(type, values)) <= {int, float}


def _values_key(values: tuple) -> tuple:
    """A sort key of a tuple of values, comparable with any other's."""
    return (0, values) if _all_numbers(values) else (1, tuple(_item_key(v) for v in values))


@dataclass(frozen=True)
class Filter:
    """``column op value``. ``value``: None (isnull/notnull), a scalar, a sorted
    tuple of distinct values (in/notin) or ``(lo, hi)`` (between). Class labels
    are held as class names, numbers as int or float, flags as bool."""

    column: str
    op: str
    value: object = None

    def __post_init__(self) -> None:
        operator = OPERATORS.get(self.op)
        if operator is None:
            raise CohortError(f"unknown operator {_show(self.op)}", field=self.column, choices=list(OPERATORS))
        value = self.value
        if operator.arity == "none":
            value = None
        elif operator.arity == "many":
            items = [value] if isinstance(value, (str, int, float, bool)) else list(value or ())
            if not items:
                raise CohortError(f"{self.column}__{self.op} needs at least one value", field=self.column)
            value = tuple(sorted(set(items)) if _all_numbers(items) else sorted(set(items), key=_item_key))
        elif operator.arity == "two":
            value = tuple(value)
            if len(value) != 2:
                raise CohortError(f"{self.column}__between needs two values, lo,hi", field=self.column)
        elif isinstance(value, (list, tuple, set, dict)) or value is None:
            raise CohortError(f"{self.column}__{self.op} needs one value", field=self.column)
        object.__setattr__(self, "value", value)

    @property
    def key(self) -> tuple:
        """Sort key: column, operator, value."""
        value = self.value
        values = () if value is None else (value if isinstance(value, tuple) else (value,))
        return (self.column, self.op, _values_key(values))


def _filters(items: Iterable[Filter]) -> tuple[Filter, ...]:
    return tuple(sorted(set(items), key=lambda f: f.key))


@dataclass(frozen=True)
class Cohort:
    """``filters`` AND (any of ``groups``), inside saved cohort ``parent_id`` if set.

    Held in canonical form: filters sorted and deduplicated, groups likewise,
    so equal cohorts compare equal and compile to identical SQL.
    """

    filters: tuple[Filter, ...] = ()
    groups: tuple[tuple[Filter, ...], ...] = ()
    parent_id: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "filters", _filters(self.filters))
        groups = {_filters(g) for g in self.groups}
        groups.discard(())
        object.__setattr__(self, "groups", tuple(sorted(groups, key=lambda g: [f.key for f in g])))
        if self.parent_id is not None and (isinstance(self.parent_id, bool) or int(self.parent_id) < 1):
            raise CohortError(f"saved cohort id {self.parent_id!r} must be a positive integer", field="cohort")

    @property
    def is_global(self) -> bool:
        """True for the whole dataset (no filter, no saved cohort)."""
        return not self.filters and not self.groups and self.parent_id is None

    def columns(self) -> set[str]:
        """Columns the cohort's own filters read (not its saved parent's)."""
        return {f.column for f in self.filters} | {f.column for g in self.groups for f in g}

    def with_filters(self, *filters: Filter) -> "Cohort":
        """This cohort AND ``filters`` (e.g. a click on a chart narrowing the view)."""
        return replace(self, filters=self.filters + tuple(filters))

    def without(self, column: str) -> "Cohort":
        """This cohort with the top-level filters on ``column`` removed."""
        return replace(self, filters=tuple(f for f in self.filters if f.column != column))


def selection_cohort(image_ids: Iterable[int]) -> Cohort:
    """A hand-picked set of images (save it with ``core.state`` and link ``cohort=<id>``)."""
    ids = [int(i) for i in image_ids]
    if not ids:
        raise CohortError("a selection needs at least one image", field="image_id")
    return Cohort((Filter("image_id", "in", tuple(ids)),))


VIEW_KEYS = ("store", "model", "iou", "conf", "thr", "view", "page", "image")


@dataclass(frozen=True)
class ViewState:
    """Everything in the URL that is not the cohort. None means "the default"."""

    store: str | None = None
    model: str | None = None
    iou: float | None = None
    conf: float | None = None  # detection score threshold
    thr: float | None = None  # multilabel label threshold
    view: str | None = None
    page: int | None = None
    image: int | None = None

    def thresholds(self, catalog: "Catalog") -> dict[str, float]:
        """``iou``, ``score_threshold``, ``label_threshold`` for the compiler: the URL's or the store's defaults."""
        return {
            "iou": self.iou if self.iou is not None else 0.5,
            "score_threshold": self.conf if self.conf is not None else catalog.default_score_threshold,
            "label_threshold": self.thr if self.thr is not None else catalog.default_label_threshold,
        }


@dataclass(frozen=True)
class ParsedQuery:
    """A cohort and a view, plus (lenient parsing only) what could not be read."""

    cohort: Cohort = field(default_factory=Cohort)
    view: ViewState = field(default_factory=ViewState)
    errors: tuple[CohortError, ...] = ()


# --------------------------------------------------------------------------- catalog

SPECIAL_COLUMNS = ("image_id", "true_label", "pred_label", "outcome", "error", "score", "n_tp", "n_fp", "n_fn")
MODEL_COLUMNS = ("pred_label", "score", "outcome", "error", "n_tp", "n_fp", "n_fn")
OUTCOMES = ("correct", "incorrect")

# Per-image columns from tables written after ingest (and from the state database).
# Each appears in the catalog only when its data exists; ``Catalog.derived`` maps
# the column to where it comes from.
LABEL_QUALITY = "label_quality"  # core.label_quality's table, the chosen model's latest run
COUNTERFACTUALS = "counterfactuals"  # core.robustness's table, one column per kind and direction
REVIEWS = "reviews"  # image review status in NAME.state.sqlite (core.state)
REVIEW_STATUS = "review_status"
_LABEL_QUALITY_COLUMNS = {"label_issue": "Likely label error", "label_quality_score": "Label quality score"}
# Tables the frame's joins read whose rows each belong to one image, every aggregate over
# them grouping by image: a frame for a known set of images reads only their rows.
# (label_quality is not one: its latest run is chosen over all images.)
_PER_IMAGE_TABLES = ("det_boxes", "det_matches", "gt_matches", COUNTERFACTUALS)

_NUMERIC_TYPES = re.compile(
    r"(TINYINT|SMALLINT|INTEGER|BIGINT|HUGEINT|UTINYINT|USMALLINT|UINTEGER|UBIGINT|UHUGEINT|"
    r"FLOAT|DOUBLE|REAL|DECIMAL(\(\d+,\s*\d+\))?)")
_FLOAT_TYPES = ("FLOAT", "DOUBLE", "REAL")

_SPECIAL_LABELS = {
    "image_id": "Image id", "true_label": "True label", "pred_label": "Predicted label",
    "outcome": "Outcome", "error": "Error", "score": "Score",
    "n_tp": "True positives", "n_fp": "False positives", "n_fn": "False negatives",
    REVIEW_STATUS: "Review status",
}


IDENTIFIER_COLUMNS = ("image_id", "source_id")


@dataclass(frozen=True)
class ColumnInfo:
    """A filterable column: how its values are read from a URL and bound in SQL.

    ``values`` is one of ``number``, ``text``, ``boolean``, ``class`` (class
    names, bound as ids), ``outcome`` (correct/incorrect), ``review``
    (open/reviewed/fixed) or ``cast`` (a type compared as its text, e.g.
    timestamps). ``is_list`` for array columns, whose operators test membership.
    """

    name: str
    label: str
    kind: str  # numeric | categorical | boolean | list (as in the store's `columns` table)
    values: str
    source: str  # user | auto | derived | model (needs a model) | state (the state database)
    is_list: bool = False
    nan_is_null: bool = False  # FLOAT/DOUBLE: NaN reads as missing (DuckDB orders NaN above every number)
    param_cast: str | None = None  # FLOAT columns: parameters compared as FLOAT

    @property
    def needs_model(self) -> bool:
        return self.source == "model"

    @property
    def is_identifier(self) -> bool:
        """An image's id (or its id in the source dataset): filterable, never a feature to analyse."""
        return self.name in IDENTIFIER_COLUMNS

    @property
    def ops(self) -> tuple[str, ...]:
        if self.is_list:
            return ("in", "notin", "contains", "isnull", "notnull")
        if self.values == "number":
            return ("eq", "ne", "lt", "lte", "gt", "gte", "between", "in", "notin", "isnull", "notnull")
        if self.values == "boolean":
            return ("eq", "ne", "isnull", "notnull")
        if self.values in ("text", "cast"):
            return ("eq", "ne", "in", "notin", "contains", "isnull", "notnull")
        return ("eq", "ne", "in", "notin", "isnull", "notnull")


def _review_statuses() -> tuple[str, ...]:
    from .state import STATUSES  # core.state imports this module

    return STATUSES


def _single_precision(sql_type: str) -> str | None:
    return "FLOAT" if sql_type in ("FLOAT", "REAL") else None


def _values_of_type(sql_type: str) -> str:
    if _NUMERIC_TYPES.fullmatch(sql_type):
        return "number"
    if sql_type == "BOOLEAN":
        return "boolean"
    if sql_type == "VARCHAR":
        return "text"
    return "cast"


def _column_types(store: Store, table: str) -> dict[str, str]:
    """Column name → DuckDB type of one of the store's logical tables, in table order."""
    return dict(store.rows(
        "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = 'memory' "
        "AND schema_name = 'main' AND table_name = ? ORDER BY column_index", [table]))


@dataclass(frozen=True)
class Catalog:
    """What a store lets a cohort filter on: columns, classes, task, models."""

    task: str
    classes: tuple[str, ...]
    columns: Mapping[str, ColumnInfo]
    models: tuple[str, ...] = ()
    image_columns: tuple[str, ...] = ()  # every column of `images`, in table order (frames show them)
    prediction_types: Mapping[str, str] = field(default_factory=dict)  # column → DuckDB type
    default_score_threshold: float = 0.5
    default_label_threshold: float = 0.5
    derived: Mapping[str, str] = field(default_factory=dict)  # column → LABEL_QUALITY | COUNTERFACTUALS | REVIEWS
    reviews: tuple[tuple[int, str], ...] = ()  # (image_id, status) of reviewed images, as read by catalog_of

    @property
    def reviews_key(self) -> str:
        """Changes whenever an image's review status does ("" without reviews): cached results of
        frames that read ``review_status`` must be keyed by it as well as by ``Store.signature``."""
        if not self.reviews:
            return ""
        return hashlib.sha1(repr(self.reviews).encode()).hexdigest()

    def with_reviews(self, reviews: Iterable[tuple[int, str]]) -> "Catalog":
        """This catalog with the state database's image review statuses (``review_status`` is
        catalogued only when some image has one)."""
        reviews = tuple(sorted((int(i), str(s)) for i, s in reviews))
        columns = {k: v for k, v in self.columns.items() if self.derived.get(k) != REVIEWS}
        derived = {k: v for k, v in self.derived.items() if v != REVIEWS}
        if reviews:
            if REVIEW_STATUS in self.image_columns:
                log.warning("image column %r is shadowed by the review status of that name", REVIEW_STATUS)
            columns[REVIEW_STATUS] = ColumnInfo(REVIEW_STATUS, _SPECIAL_LABELS[REVIEW_STATUS], "categorical",
                                                "review", "state")
            derived[REVIEW_STATUS] = REVIEWS
        return replace(self, columns=columns, derived=derived, reviews=reviews)

    @classmethod
    def from_store(cls, store: Store) -> "Catalog":
        types = _column_types(store, "images")
        task = store.task
        classes = tuple(str(c) for c in store.classes)
        columns: dict[str, ColumnInfo] = {}
        for name, kind, source, label in store.columns().itertuples(index=False):
            if name in SPECIAL_COLUMNS:
                if name not in ("image_id", "true_label"):
                    log.warning("image column %r is shadowed by the cohort column of that name", name)
                continue
            sql_type = types.get(name)
            if sql_type is None:
                log.warning("catalogued column %r is not in the images table; not filterable", name)
                continue
            if re.search(r"\[\d+\]$", sql_type):
                log.warning("column %r has fixed-size array type %s; not filterable", name, sql_type)
                continue
            is_list = sql_type.endswith("[]")
            element = sql_type[:-2] if is_list else sql_type
            values = _values_of_type(element)
            columns[name] = ColumnInfo(
                name, str(label or name), str(kind or ""), values, str(source or "user"), is_list,
                nan_is_null=not is_list and element in _FLOAT_TYPES, param_cast=_single_precision(element))
        labels_are_lists = task in ("multilabel", "detection")
        columns["image_id"] = ColumnInfo("image_id", _SPECIAL_LABELS["image_id"], "numeric", "number", "derived")
        if "true_label" in types:
            columns["true_label"] = ColumnInfo("true_label", _SPECIAL_LABELS["true_label"],
                                               "list" if labels_are_lists else "categorical", "class",
                                               "derived", labels_are_lists)
        models = tuple(store.model_ids())
        prediction_types = _column_types(store, "predictions")
        score_type = {"multiclass": prediction_types.get("score", ""),
                      "multilabel": prediction_types.get("probs", "")[:-2]}.get(task, "DOUBLE")
        if models:
            columns["pred_label"] = ColumnInfo("pred_label", _SPECIAL_LABELS["pred_label"],
                                               "list" if labels_are_lists else "categorical", "class",
                                               "model", labels_are_lists)
            columns["outcome"] = ColumnInfo("outcome", _SPECIAL_LABELS["outcome"], "categorical", "outcome", "model")
            columns["error"] = ColumnInfo("error", _SPECIAL_LABELS["error"], "boolean", "boolean", "model")
            columns["score"] = ColumnInfo("score", _SPECIAL_LABELS["score"], "numeric", "number", "model",
                                          nan_is_null=True, param_cast=_single_precision(score_type))
            if task == "detection":
                for name in ("n_tp", "n_fp", "n_fn"):
                    columns[name] = ColumnInfo(name, _SPECIAL_LABELS[name], "numeric", "number", "model")
        derived = _part_columns(store) if models else {}
        for name in derived:
            if name in types:
                log.warning("image column %r is shadowed by the derived cohort column of that name", name)
        columns.update({name: info for name, (info, _) in derived.items()})
        meta = store.meta()
        return cls(task=task, classes=classes, columns=columns, models=models,
                   image_columns=tuple(types), prediction_types=prediction_types,
                   default_score_threshold=float(meta.get("score_threshold", 0.5)),
                   default_label_threshold=float(meta.get("label_threshold", 0.5)),
                   derived={name: source for name, (_, source) in derived.items()})

    def column(self, name: str, *, field_name: str | None = None) -> ColumnInfo:
        info = self.columns.get(name)
        if info is None:
            raise CohortError(f"unknown column {_show(name)}", field=field_name or name,
                              choices=sorted(self.columns))
        return info

    def class_id(self, name: str) -> int:
        try:
            return self.classes.index(name)
        except ValueError:
            raise CohortError(f"{_show(name)} is not a class", field="class", choices=list(self.classes)) from None

    def frame_columns(self, with_model: bool = True) -> tuple[str, ...]:
        """Columns of a frame: every image column, then the model's columns, then the derived ones
        (those of the model's part tables only with a model)."""
        base = tuple(c for c in self.image_columns if self.is_image_column(c))
        derived = tuple(c for c in self.derived if with_model or not self.columns[c].needs_model)
        if not with_model:
            return base + derived
        return base + tuple(c for c in MODEL_COLUMNS if c in self.columns) + derived

    def is_image_column(self, name: str) -> bool:
        """Whether a frame reads ``name`` from the ``images`` table alone (no join)."""
        return name in self.image_columns and name not in MODEL_COLUMNS and name not in self.derived


def _part_columns(store: Store) -> dict[str, tuple[ColumnInfo, str]]:
    """Cohort columns of the per-model tables written after ingest, when the store has them."""
    out: dict[str, tuple[ColumnInfo, str]] = {}
    if store.has_table(LABEL_QUALITY):
        types = _column_types(store, LABEL_QUALITY)
        if "image_id" in types and "model_id" in types:
            for name, label in _LABEL_QUALITY_COLUMNS.items():
                sql_type = types.get(name)
                if sql_type is None or sql_type.endswith("]"):
                    continue
                values = _values_of_type(sql_type)
                kind = {"number": "numeric", "boolean": "boolean"}.get(values, "categorical")
                out[name] = (ColumnInfo(name, label, kind, values, "model", nan_is_null=sql_type in _FLOAT_TYPES,
                                        param_cast=_single_precision(sql_type)), LABEL_QUALITY)
    if store.has_table(COUNTERFACTUALS):
        from .robustness import counterfactual_columns

        cast = _single_precision(_column_types(store, COUNTERFACTUALS).get("flip_strength", ""))
        for name, label in counterfactual_columns(store):
            out[name] = (ColumnInfo(name, label, "numeric", "number", "model", param_cast=cast), COUNTERFACTUALS)
    return out


def _image_reviews(state: "StateDB") -> tuple[tuple[int, str], ...]:
    return tuple((int(r.target), r.status) for r in state.list_reviews(kind="image"))


_CATALOGS: "weakref.WeakKeyDictionary[Store, tuple[tuple, Catalog, Catalog]]" = weakref.WeakKeyDictionary()


def catalog_of(store: Store, state: "StateDB | None" = None) -> Catalog:
    """The store's catalog with the image review statuses of ``state`` (default: the store's
    state database), rebuilt only when the store's files change; reviews are read each call
    (one small SQLite query), so a status set in the app shows on the next call."""
    store.refresh()
    reviews = _image_reviews(state if state is not None else _open_state(store))
    cached = _CATALOGS.get(store)
    if cached is not None and cached[0] == (store.signature, reviews):
        return cached[1]
    base = cached[2] if cached is not None and cached[0][0] == store.signature else Catalog.from_store(store)
    catalog = base.with_reviews(reviews)
    _CATALOGS[store] = ((store.signature, reviews), catalog, base)
    return catalog


# --------------------------------------------------------------------------- parsing


def _parse_value(info: ColumnInfo, text: str, catalog: Catalog, key: str) -> object:
    try:
        if _SURROGATE.search(text):
            raise ValueError(f"{_show(text)} is not valid text")
        if info.values == "number":
            return parse_number(text)
        if info.values == "boolean":
            lowered = text.strip().lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError(f"{_show(text)} is not true or false")
        if info.values == "class":
            if text in catalog.classes:
                return text
            if _SMALL_INTEGER.fullmatch(text) and 0 <= int(text) < len(catalog.classes):
                return catalog.classes[int(text)]
            raise CohortError(f"{_show(text)} is not a class name or class id", field=key,
                              choices=list(catalog.classes))
        if info.values == "outcome":
            lowered = text.strip().lower()
            if lowered in OUTCOMES:
                return lowered
            raise CohortError(f"{_show(text)} is not an outcome", field=key, choices=list(OUTCOMES))
        if info.values == "review":
            lowered = text.strip().lower()
            if lowered in _review_statuses():
                return lowered
            raise CohortError(f"{_show(text)} is not a review status", field=key, choices=list(_review_statuses()))
        return text
    except ValueError as exc:
        raise CohortError(str(exc), field=key) from None


def parse_filter(column: str, op: str, values: Sequence[str], catalog: Catalog, *,
                 key: str | None = None) -> Filter:
    """A filter from its column, operator and value texts (already split into items)."""
    key = key or f"{column}__{op}"
    info = catalog.column(column, field_name=key)
    operator = OPERATORS.get(op)
    if operator is None:
        raise CohortError(f"unknown operator {_show(op)}", field=key, choices=list(info.ops))
    if op not in info.ops:
        kind = "list" if info.is_list else info.values
        raise CohortError(f"operator {op!r} does not apply to {column} ({kind})", field=key, choices=list(info.ops))
    if operator.arity == "none":
        if len(values) != 1 or values[0].strip().lower() not in _NO_VALUE_TEXT:
            raise CohortError(f"{op} takes no value (write {key}={_CANONICAL_NO_VALUE})", field=key)
        return Filter(column, op)
    parsed = [_parse_value(info, v, catalog, key) for v in values]
    if operator.arity == "one":
        if len(parsed) != 1:
            raise CohortError(f"{op} takes one value", field=key)
        return Filter(column, op, parsed[0])
    if operator.arity == "two":
        if len(parsed) != 2:
            raise CohortError(f"between takes two values lo,hi; got {len(parsed)}", field=key)
        if parsed[0] > parsed[1]:
            raise CohortError(f"between: lower bound {format_number(parsed[0])} is above upper bound "
                              f"{format_number(parsed[1])}", field=key)
        return Filter(column, op, tuple(parsed))
    return Filter(column, op, tuple(parsed))


def _pairs(query: str | Mapping[str, object]) -> list[tuple[str, str]]:
    """(key, value) pairs with the URL's percent-encoding undone once."""
    if isinstance(query, str):
        text = query[1:] if query.startswith("?") else query
        pairs = []
        for piece in text.split("&"):
            if piece:
                key, _, value = piece.partition("=")
                pairs.append((unquote_plus(key), unquote_plus(value)))
        return pairs
    pairs = []
    for key, value in query.items():
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            pairs.append((str(key), "" if item is None else str(item)))
    return pairs


def _parse_view_value(key: str, text: str, catalog: Catalog | None) -> object:
    if key in ("iou", "conf", "thr"):
        try:
            number = float(parse_number(text))
        except ValueError as exc:
            raise CohortError(str(exc), field=key) from None
        low_ok = number > 0 if key == "iou" else number >= 0
        if not (low_ok and number <= 1):
            raise CohortError(f"{key} must be in {'(0, 1]' if key == 'iou' else '[0, 1]'}, got {_show(text)}",
                              field=key)
        return number
    if key in ("page", "image"):
        low = 1 if key == "page" else 0
        if not _SMALL_INTEGER.fullmatch(text) or not low <= int(text) < 2 ** 31:
            raise CohortError(f"{key} must be an integer ≥ {low}, got {_show(text)}", field=key)
        return int(text)
    if not _TOKEN.fullmatch(text):
        raise CohortError(f"{key} {_show(text)} is not a valid name (letters, digits, . _ -)", field=key)
    if key == "model" and catalog is not None and catalog.models and text not in catalog.models:
        raise CohortError(f"unknown model {_show(text)}", field=key, choices=list(catalog.models))
    return text


def _parse(query: str | Mapping[str, object], catalog: Catalog, errors: list[CohortError] | None,
           max_filters: int | None = MAX_FILTERS) -> ParsedQuery:
    """Shared by the strict (errors is None: raise) and lenient parsers."""
    view: dict[str, object] = {}
    top: list[Filter] = []
    groups: dict[int, list[Filter]] = {}
    parent_id: int | None = None
    seen_cohort = False
    n_filters = 0

    def fail(error: CohortError) -> None:
        if errors is None:
            raise error
        errors.append(error)

    for key, raw in _pairs(query):
        try:
            if key == "cohort":
                if seen_cohort:
                    raise CohortError("cohort is given more than once", field=key)
                seen_cohort = True
                if not _SMALL_INTEGER.fullmatch(raw) or int(raw) < 1:
                    raise CohortError(f"cohort must be a saved cohort id (a positive integer), got {_show(raw)}",
                                      field=key)
                parent_id = int(raw)
                continue
            if key in VIEW_KEYS:
                if key in view:
                    raise CohortError(f"{key} is given more than once", field=key)
                view[key] = _parse_view_value(key, raw, catalog)
                continue
        except CohortError as error:
            fail(error)
            continue
        try:
            column_part, sep, op = key.rpartition("__")
            if not sep:
                raise CohortError(f"unknown parameter {_show(key)}; filters read <column>__<op>=<value>",
                                  field=key, choices=list(VIEW_KEYS) + ["cohort"])
            group = None
            match = re.fullmatch(r"g([1-9][0-9]{0,5})\.(.*)", column_part, flags=re.S)
            if match:
                group, column_part = int(match.group(1)), match.group(2)
            n_filters += 1
            if max_filters is not None and n_filters > max_filters:
                raise CohortError(f"more than {max_filters} filters; save the cohort and link it as cohort=<id>",
                                  field=key)
            operator = OPERATORS.get(op)
            if operator is not None and operator.arity in ("many", "two"):
                items = [_unescape_item(v) for v in raw.split(",")]
            else:
                items = [_unescape_item(raw)]
            parsed = parse_filter(column_part, op, items, catalog, key=key)
        except CohortError as error:
            fail(error)
            if max_filters is not None and n_filters > max_filters:
                break
            continue
        (top if group is None else groups.setdefault(group, [])).append(parsed)
    cohort = Cohort(tuple(top), tuple(tuple(g) for g in groups.values()), parent_id)
    return ParsedQuery(cohort, ViewState(**view), tuple(errors or ()))


def parse_query(query: str | Mapping[str, object], catalog: Catalog, *,
                max_filters: int | None = MAX_FILTERS) -> ParsedQuery:
    """Strict: a ParsedQuery, or CohortError naming the parameter, value and valid choices.

    ``max_filters`` bounds what a URL may carry (None: no bound, for saved cohorts)."""
    return _parse(query, catalog, None, max_filters)


def parse_query_lenient(query: str | Mapping[str, object], catalog: Catalog) -> ParsedQuery:
    """Never raises for bad input: ``errors`` lists every problem, each naming its parameter. A bad
    filter or cohort id is left out and the cohort keeps the others; valid view settings are kept."""
    return _parse(query, catalog, [])


def read_store_param(query: str | Mapping[str, object]) -> str | None:
    """The ``store`` parameter alone (needed to open the store whose catalog parses the rest)."""
    values = [v for k, v in _pairs(query) if k == "store"]
    if not values:
        return None
    if len(values) > 1:
        raise CohortError("store is given more than once", field="store")
    return _parse_view_value("store", values[0], None)


# --------------------------------------------------------------------------- writing


def _value_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return format_number(value)
    return str(value)


def _filter_value(f: Filter) -> str:
    """The parameter value as it reads once the URL's percent-encoding is undone."""
    arity = OPERATORS[f.op].arity
    if arity == "none":
        return _CANONICAL_NO_VALUE
    if arity == "one":
        return _escape_item(_value_text(f.value), comma=False)
    return ",".join(_escape_item(_value_text(v), comma=True) for v in f.value)


def _param_pairs(cohort: Cohort, view: ViewState | None) -> list[tuple[str, str]]:
    """Canonical (key, value) pairs: saved cohort, filters, groups, then the view."""
    pairs = [] if cohort.parent_id is None else [("cohort", str(cohort.parent_id))]
    pairs += [(f"{f.column}__{f.op}", _filter_value(f)) for f in cohort.filters]
    for number, group in enumerate(cohort.groups, start=1):
        pairs += [(f"g{number}.{f.column}__{f.op}", _filter_value(f)) for f in group]
    for key in VIEW_KEYS:
        value = getattr(view, key) if view is not None else None
        if value is not None:
            pairs.append((key, format_number(value) if isinstance(value, (int, float)) else str(value)))
    return pairs


def _split(parsed: ParsedQuery | Cohort, view: ViewState | None) -> tuple[Cohort, ViewState | None]:
    if isinstance(parsed, ParsedQuery):
        return parsed.cohort, view if view is not None else parsed.view
    return parsed, view


def to_query(parsed: ParsedQuery | Cohort, view: ViewState | None = None) -> str:
    """The canonical query string (no leading ``?``): saved cohort, filters, groups, view."""
    return "&".join(f"{quote(k, safe='')}={quote(v, safe=',')}" for k, v in _param_pairs(*_split(parsed, view)))


def to_query_params(parsed: ParsedQuery | Cohort, view: ViewState | None = None) -> dict[str, str | list[str]]:
    """The canonical parameters as ``st.query_params`` holds them (decoded once; a key
    given twice maps to a list). ``parse_query`` reads this mapping back."""
    out: dict[str, str | list[str]] = {}
    for key, value in _param_pairs(*_split(parsed, view)):
        if key in out:
            previous = out[key]
            out[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- sentences


def _value_words(value: object, info: ColumnInfo | None) -> str:
    if isinstance(value, str) and (info is None or info.values in ("text", "cast") or "," in value):
        return f"'{value}'"  # free text, and class names that would blur a list
    return _value_text(value)


def _list_words(values: tuple, info: ColumnInfo | None, shown: int = 8) -> str:
    words = [_value_words(v, info) for v in values[:shown]]
    if len(values) > shown:
        words.append(f"… ({len(values)} values)")
    return ", ".join(words)


def filter_sentence(f: Filter, catalog: Catalog | None = None) -> str:
    """"brightness is less than 0.3" (the column's catalog label when given a catalog)."""
    info = catalog.columns.get(f.column) if catalog is not None else None
    label = info.label if info is not None else f.column.replace("_", " ")
    operator = OPERATORS[f.op]
    phrase = operator.list_phrase if (info is not None and info.is_list and operator.list_phrase) else operator.phrase
    if operator.arity == "none":
        return f"{label} {phrase}"
    if operator.arity == "two":
        lo, hi = f.value
        return f"{label} {phrase} {_value_words(lo, info)} and {_value_words(hi, info)}"
    if operator.arity == "many":
        return f"{label} {phrase} {_list_words(f.value, info)}"
    return f"{label} {phrase} {_value_words(f.value, info)}"


def describe(cohort: Cohort | ParsedQuery, catalog: Catalog | None = None,
             state: "StateDB | None" = None) -> list[str]:
    """Human sentences, one per condition; ["all images"] for the whole dataset."""
    if isinstance(cohort, ParsedQuery):
        cohort = cohort.cohort
    sentences = []
    if cohort.parent_id is not None:
        name = None
        if state is not None:
            try:
                name = state.get_cohort(cohort.parent_id).name
            except CohortError:
                name = None
        sentences.append(f"in saved cohort '{name}' (#{cohort.parent_id})" if name
                         else f"in saved cohort #{cohort.parent_id}")
    sentences += [filter_sentence(f, catalog) for f in cohort.filters]
    if cohort.groups:
        alternatives = [" and ".join(filter_sentence(f, catalog) for f in g) for g in cohort.groups]
        if len(alternatives) == 1:
            sentences.append(alternatives[0])
        else:
            sentences.append("either " + " or ".join(f"({a})" for a in alternatives))
    return sentences or ["all images"]


# --------------------------------------------------------------------------- frame SQL


@dataclass
class _Sql:
    """SQL text and its parameters, appended in the order the ``?`` appear."""

    text: str = ""
    params: list = field(default_factory=list)

    def add(self, text: str, params: Sequence = ()) -> "_Sql":
        self.text += text
        self.params.extend(params)
        return self


def _counts_join(store: Store, model_id: str, iou: float, score_threshold: float) -> tuple[str, list]:
    """Per-image TP/FP/FN of a detection model from the stored matches (``core.matching``): a derived
    table of the store, as computing them aggregates every match of the model."""
    try:
        counts_sql, counts_params = image_counts_params(model_id, iou, score_threshold)
    except EvalError as error:
        raise CohortError(error.message, field="iou", choices=error.choices) from None
    counts = store.derived(("detection image counts", model_id, *counts_params), counts_sql, counts_params)
    return f"LEFT JOIN {counts} AS c ON c.{quote_identifier('image_id')} = i.{quote_identifier('image_id')}", []


def _classes_join(store: Store, model_id: str, score_threshold: float) -> tuple[str, list]:
    """Per image: a detection model's best score and its classes detected at ``score_threshold``."""
    q = quote_identifier
    classes = store.derived(
        ("detection image classes", model_id, str(score_threshold)),
        f"SELECT {q('image_id')}, max({q('score')}) AS {q('score')}, "
        f"list_sort(list_distinct(list({q('class_id')}) FILTER (WHERE {q('score')} >= ?))) AS {q('classes')} "
        f"FROM {q('det_boxes')} WHERE {q('model_id')} = ? GROUP BY {q('image_id')}", [score_threshold, model_id])
    return f"LEFT JOIN {classes} AS d ON d.{q('image_id')} = i.{q('image_id')}", []


def _model_expressions(store: Store, catalog: Catalog, model_id: str, iou: float, score_threshold: float,
                       label_threshold: float) -> tuple[dict, dict, dict]:
    """Per task: level-1 expressions, level-2 (derived) expressions and the joins they need.

    level-1: name → (sql over ``i`` and the joins, params, joins); level-2:
    name → (sql over the level-1 frame ``b``, level-1 names it reads).
    """
    q = quote_identifier
    level1: dict[str, tuple[str, list, tuple]] = {}
    level2: dict[str, tuple[str, tuple[str, ...]]] = {}
    joins: dict[str, Callable[[], tuple[str, list]]] = {
        "p": lambda: (f"LEFT JOIN (SELECT * FROM {q('predictions')} WHERE {q('model_id')} = ?) AS p "
                      f"ON p.{q('image_id')} = i.{q('image_id')}", [model_id])}
    has_probs = "probs" in catalog.prediction_types
    if catalog.task == "multiclass":
        level1["pred_label"] = (f"p.{q('pred_label')}", [], ("p",))
        level1["score"] = (f"nullif(p.{q('score')}, 'NaN')", [], ("p",))
        level1["outcome"] = (
            f"CASE WHEN p.{q('pred_label')} IS NULL OR i.{q('true_label')} IS NULL THEN NULL "
            f"WHEN p.{q('pred_label')} = i.{q('true_label')} THEN 'correct' ELSE 'incorrect' END", [], ("p",))
        level1["error"] = (f"p.{q('pred_label')} <> i.{q('true_label')}", [], ("p",))
    elif catalog.task == "multilabel":
        stored = f"list_sort(list_distinct(p.{q('pred_labels')}))"
        if has_probs:
            # Compared in the probabilities' own type, as numpy compares the stored array.
            element = catalog.prediction_types["probs"].removesuffix("[]")
            live = f"[CAST(k - 1 AS INTEGER) for x, k in p.{q('probs')} if x >= CAST(? AS {element})]"
            pred = live if "pred_labels" not in catalog.prediction_types else \
                f"CASE WHEN p.{q('probs')} IS NULL THEN {stored} ELSE {live} END"
            level1["pred_label"] = (pred, [label_threshold], ("p",))
            level1["score"] = (f"list_max(p.{q('probs')})", [], ("p",))
        else:
            level1["pred_label"] = (stored, [], ("p",))
            level1["score"] = ("CAST(NULL AS FLOAT)", [], ())
        level1["__true_set"] = (f"list_sort(list_distinct(i.{q('true_label')}))", [], ())
        level2["outcome"] = (
            f"CASE WHEN b.{q('pred_label')} IS NULL OR b.{q('__true_set')} IS NULL THEN NULL "
            f"WHEN b.{q('pred_label')} = b.{q('__true_set')} THEN 'correct' ELSE 'incorrect' END",
            ("pred_label", "__true_set"))
        level2["error"] = (f"b.{q('pred_label')} <> b.{q('__true_set')}", ("pred_label", "__true_set"))
    elif catalog.task == "detection":
        joins["d"] = lambda: _classes_join(store, model_id, score_threshold)
        joins["c"] = lambda: _counts_join(store, model_id, iou, score_threshold)
        level1["pred_label"] = (f"coalesce(d.{q('classes')}, CAST([] AS INTEGER[]))", [], ("d",))
        level1["score"] = (f"d.{q('score')}", [], ("d",))
        for name in ("n_tp", "n_fp", "n_fn"):
            level1[name] = (f"CAST(coalesce(c.{q(name)}, 0) AS INTEGER)", [], ("c",))
        wrong = f"(coalesce(c.{q('n_fp')}, 0) + coalesce(c.{q('n_fn')}, 0) > 0)"
        level1["outcome"] = (f"CASE WHEN {wrong} THEN 'incorrect' ELSE 'correct' END", [], ("c",))
        level1["error"] = (wrong, [], ("c",))
    return level1, level2, joins


def _derived_expressions(store: Store, catalog: Catalog, model_id: str | None,
                         wanted: Sequence[str]) -> tuple[dict, dict]:
    """Level-1 expressions and joins of the wanted derived columns (``Catalog.derived``)."""
    q = quote_identifier
    level1: dict[str, tuple[str, list, tuple]] = {}
    joins: dict[str, Callable[[], tuple[str, list]]] = {}
    sources = {catalog.derived[c] for c in wanted if c in catalog.derived}
    if LABEL_QUALITY in sources and model_id is not None:
        joins["lq"] = lambda: _derived_join("lq", *latest_sql(LABEL_QUALITY, model_id))
    if COUNTERFACTUALS in sources and model_id is not None:
        def flips() -> tuple[str, list]:
            from .robustness import counterfactual_frame_sql

            sql, params, _ = counterfactual_frame_sql(store, model_id)
            return _derived_join("cf", sql, params)
        joins["cf"] = flips
    if REVIEWS in sources:
        # The statuses are the catalog's snapshot, bound as two parallel lists.
        ids = [i for i, _ in catalog.reviews]
        statuses = [status for _, status in catalog.reviews]
        joins["rv"] = lambda: _derived_join(
            "rv", f"SELECT unnest(CAST(? AS BIGINT[])) AS {q('image_id')}, "
                  f"unnest(CAST(? AS VARCHAR[])) AS {q(REVIEW_STATUS)}", [ids, statuses])
    alias = {LABEL_QUALITY: "lq", COUNTERFACTUALS: "cf", REVIEWS: "rv"}
    for name in wanted:
        source = catalog.derived.get(name)
        if source is None or alias[source] not in joins:
            continue
        expr = f"{alias[source]}.{q(name)}"
        if catalog.columns[name].nan_is_null:
            expr = f"nullif({expr}, 'NaN')"
        level1[name] = (expr, [], (alias[source],))
    return level1, joins


def _derived_join(alias: str, sql: str, params: Sequence) -> tuple[str, list]:
    q = quote_identifier
    return f"LEFT JOIN ({sql}) AS {alias} ON {alias}.{q('image_id')} = i.{q('image_id')}", list(params)


def frame_sql(store: Store, model_id: str | None, *, iou: float = 0.5, score_threshold: float = 0.5,
              label_threshold: float = 0.5, columns: Sequence[str] | None = None,
              catalog: Catalog | None = None) -> tuple[str, list]:
    """One row per image: image columns plus the model's per-image columns, at the given thresholds.

    ``columns`` (default: all of ``catalog.frame_columns``) also decides which
    joins are made, so a frame of metadata columns reads ``images`` alone.
    """
    return _frame(store, model_id, iou=iou, score_threshold=score_threshold, label_threshold=label_threshold,
                  columns=columns, catalog=catalog)


def _frame(store: Store, model_id: str | None, *, iou: float = 0.5, score_threshold: float = 0.5,
           label_threshold: float = 0.5, columns: Sequence[str] | None = None, catalog: Catalog | None = None,
           only: tuple[str, list] | None = None) -> tuple[str, list]:
    """``frame_sql``, optionally for just the images whose ids ``only`` (a SELECT image_id) lists.

    With ``only``, the per-image aggregates (detections, matches, flips) read only
    those images' rows: each table of ``_PER_IMAGE_TABLES`` is shadowed by a CTE of
    the same name holding just their rows, which the aggregates' SQL (here and in
    ``core.matching``) then reads. A page of a big detection store costs a page.
    """
    catalog = catalog or catalog_of(store)
    available = catalog.frame_columns(with_model=model_id is not None)
    wanted = list(dict.fromkeys(columns if columns is not None else available))
    for name in wanted:
        if name not in available:
            if name in catalog.columns and catalog.columns[name].needs_model and model_id is None:
                raise CohortError(f"{name} needs a model; choose one", field="model", choices=list(catalog.models))
            raise CohortError(f"unknown column {_show(name)}", field=name, choices=list(available))
    if model_id is not None and model_id not in catalog.models:
        raise CohortError(f"unknown model {_show(model_id)}", field="model", choices=list(catalog.models))
    q = quote_identifier
    model_wanted = [c for c in wanted if c in MODEL_COLUMNS]
    level1, level2, joins = (_model_expressions(store, catalog, model_id, iou, score_threshold, label_threshold)
                             if model_wanted else ({}, {}, {}))
    derived1, derived_joins = _derived_expressions(store, catalog, model_id, wanted)
    level1.update(derived1)
    joins.update(derived_joins)
    inner: list[str] = [c for c in wanted if c not in level2]
    for name in wanted:
        inner.extend(level2.get(name, ("", ()))[1])
    inner = list(dict.fromkeys(inner))
    used_joins: list[str] = []
    items = []
    for name in inner:
        if name in level1:
            expr, params, needs = level1[name]
            used_joins.extend(j for j in needs if j not in used_joins)
            items.append((f"{expr} AS {q(name)}", params))
        else:
            info = catalog.columns.get(name)
            expr = f"i.{q(name)}"
            if info is not None and info.nan_is_null:
                expr = f"nullif({expr}, 'NaN')"
            items.append((f"{expr} AS {q(name)}", []))
    sql = _Sql()
    if only is not None:
        sql.add(f"WITH {q('vl_only')} AS MATERIALIZED ({only[0]})", only[1])
        for table in (t for t in _PER_IMAGE_TABLES if used_joins and store.has_table(t)):
            sql.add(f", {q(table)} AS (SELECT * FROM main.{q(table)} WHERE {q('image_id')} IN "
                    f"(SELECT {q('image_id')} FROM {q('vl_only')}))")
        sql.add(" ")
    sql.add("SELECT ")
    for index, (text, params) in enumerate(items):
        sql.add((", " if index else "") + text, params)
    if only is None:
        sql.add(f" FROM {q('images')} AS i")
    else:
        sql.add(f" FROM (SELECT i0.* FROM {q('images')} AS i0 SEMI JOIN {q('vl_only')} AS o "
                f"ON o.{q('image_id')} = i0.{q('image_id')}) AS i")
    for alias in used_joins:
        join_text, join_params = joins[alias]()
        sql.add(" " + join_text, join_params)
    if not any(name in level2 for name in wanted):
        return sql.text, sql.params
    outer = ", ".join(f"{level2[c][0]} AS {q(c)}" if c in level2 else f"b.{q(c)}" for c in wanted)
    return f"SELECT {outer} FROM ({sql.text}) AS b", sql.params


# --------------------------------------------------------------------------- compiling


def _column_sql(info: ColumnInfo) -> str:
    column = quote_identifier(info.name)
    return f"CAST({column} AS VARCHAR)" if info.values == "cast" else column


def _bound(info: ColumnInfo, value: object, catalog: Catalog) -> object:
    if info.values == "class":
        # Parsed filters hold class names; filters built in code may hold ids.
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(catalog.classes):
            return value
        return catalog.class_id(value)
    if info.param_cast == "FLOAT" and isinstance(value, (int, float)) and not isinstance(value, bool):
        # Beyond FLOAT's range DuckDB's cast fails; numpy rounds to ±inf, which compares the same.
        with np.errstate(over="ignore"):
            if np.isinf(np.float32(value)):
                return math.copysign(math.inf, value)
    return value


def _bound_list(info: ColumnInfo, values: tuple, catalog: Catalog) -> list:
    # Only class names and numbers compared as FLOAT change when bound.
    changes = info.values == "class" or info.param_cast == "FLOAT"
    bound = [_bound(info, v, catalog) for v in values] if changes else list(values)
    if info.values == "number" and any(issubclass(t, float) for t in set(map(type, bound))):
        bound = [float(v) for v in bound]  # one element type per list parameter
    return bound


# An in/notin filter with more values than this, compiled for a store, reads them from a derived table
# of the store: a million-element list bound to every query took 1.7 s, the table's semi-join 0.2 s.
LARGE_VALUE_SET = 4096


def filter_sql(f: Filter, catalog: Catalog, store: Store | None = None) -> tuple[str, list]:
    """``(fragment, params)`` of one filter over a frame (its column quoted from the catalog); with
    ``store``, a large value set (e.g. a saved selection of images) as a table of the store."""
    info = catalog.column(f.column)
    operator = OPERATORS[f.op]
    if f.op not in info.ops:
        raise CohortError(f"operator {f.op!r} does not apply to {f.column}", field=f.column, choices=list(info.ops))
    if operator.arity == "many":
        value: object = _bound_list(info, f.value, catalog)
        if store is not None and f.op in ("in", "notin") and not info.is_list and len(value) > LARGE_VALUE_SET:
            return _value_set_sql(f.op, Operand(_column_sql(info), False, info.param_cast), value, store)
    elif operator.arity == "two":
        value = tuple(_bound(info, v, catalog) for v in f.value)
    elif operator.arity == "one":
        value = _bound(info, f.value, catalog)
    else:
        value = None
    return operator.sql(Operand(_column_sql(info), info.is_list, info.param_cast), value)


def _value_set_sql(op: str, col: Operand, values: list, store: Store) -> tuple[str, list]:
    """``col`` in (or not in) ``values``, held as a derived table: bound and hashed once per store."""
    try:  # a million ids: their bytes hash in milliseconds, their JSON text in a tenth of a second
        data = np.array(values, dtype=np.int64).tobytes() if set(map(type, values)) == {int} else None
    except OverflowError:
        data = None
    digest = hashlib.sha1(data if data is not None else json.dumps(values).encode()).hexdigest()
    table = store.derived(("value set", col.cast, data is None, digest), f"SELECT unnest({col.list_mark}) AS v",
                          [values])
    inside = f"{col.sql} IN (SELECT v FROM {table})"
    return (inside if op == "in" else f"NOT coalesce({inside}, false)"), []


def where_sql(cohort: Cohort, catalog: Catalog) -> tuple[str, list]:
    """``(condition, params)`` of a cohort's own filters over frame columns (its saved parent not
    included): the text that follows WHERE; empty for the whole dataset."""
    clause = _cohort_where(cohort, catalog)
    return clause.text, clause.params


def _cohort_where(cohort: Cohort, catalog: Catalog, store: Store | None = None) -> _Sql:
    sql = _Sql()
    parts: list[tuple[str, list]] = [filter_sql(f, catalog, store) for f in cohort.filters]
    if cohort.groups:
        alternatives = _Sql()
        for index, group in enumerate(cohort.groups):
            fragments = [filter_sql(f, catalog, store) for f in group]
            alternatives.add(" OR " if index else "")
            alternatives.add("(" + " AND ".join(t for t, _ in fragments) + ")",
                             [p for _, ps in fragments for p in ps])
        parts.append(("(" + alternatives.text + ")", alternatives.params))
    for index, (text, params) in enumerate(parts):
        sql.add((" AND " if index else "") + text, params)
    return sql


def _open_state(store: Store) -> "StateDB":
    from .state import StateDB

    return StateDB.for_store(store.paths.base)


def expand(cohort: Cohort, catalog: Catalog, state: "StateDB | None" = None,
           store: Store | None = None) -> list[Cohort]:
    """The cohort and its saved ancestors (each without parent), outermost last.

    Their conjunction is the cohort's images. Saved cohorts that refer to one
    another in a cycle raise CohortError.
    """
    chain = [replace(cohort, parent_id=None)]
    parent_id, seen = cohort.parent_id, []
    while parent_id is not None:
        if parent_id in seen:
            path = " → ".join(f"#{i}" for i in seen + [parent_id])
            raise CohortError(f"saved cohorts refer to each other in a cycle: {path}", field="cohort")
        seen.append(parent_id)
        if state is None:
            if store is None:
                raise CohortError("a saved cohort needs the store's state database", field="cohort")
            state = _open_state(store)
        saved = state.get_cohort(parent_id)
        try:
            parent = saved.cohort(catalog)
        except CohortError as error:
            raise CohortError(f"saved cohort '{saved.name}' (#{saved.id}) no longer fits this store: "
                              f"{error.message}", field=error.field, choices=error.choices) from None
        chain.append(replace(parent, parent_id=None))
        parent_id = parent.parent_id
    return chain


def _as_cohort(cohort: Cohort | ParsedQuery) -> Cohort:
    return cohort.cohort if isinstance(cohort, ParsedQuery) else cohort


@dataclass
class _Where:
    """A cohort (with its saved ancestors) compiled: the condition over frame columns, the
    columns it reads, and ``images_only``: the conjuncts that read image columns alone."""

    sql: _Sql
    needed: set[str]
    images_only: _Sql


def _where(cohort: Cohort | ParsedQuery, catalog: Catalog, state: "StateDB | None", store: Store) -> _Where:
    chain = [c for c in expand(_as_cohort(cohort), catalog, state, store) if not c.is_global]
    where = _Sql()
    needed: set[str] = set()
    conjuncts: list[Cohort] = []
    for index, part in enumerate(chain):
        clause = _cohort_where(part, catalog, store)
        where.add((" AND " if index else "") + (f"({clause.text})" if len(chain) > 1 else clause.text),
                  clause.params)
        needed |= part.columns()
        groups_on_images = all(catalog.is_image_column(f.column) for g in part.groups for f in g)
        conjuncts.append(Cohort(tuple(f for f in part.filters if catalog.is_image_column(f.column)),
                                part.groups if groups_on_images else ()))
    images_only = _Sql()
    for part in (c for c in conjuncts if not c.is_global):
        clause = _cohort_where(part, catalog, store)
        images_only.add((" AND " if images_only.text else "") + f"({clause.text})", clause.params)
    return _Where(where, needed, images_only)


def _frame_for(store: Store, catalog: Catalog, model_id: str | None, columns: Iterable[str],
               thresholds: dict, only: tuple[str, list] | None = None,
               where: _Where | None = None) -> tuple[str, list]:
    """The frame of ``columns``; for ``only``'s images, else (when ``where`` is given and the frame
    aggregates detections or flips) for the images that pass ``where``'s image-column conjuncts:
    the aggregates then skip images the cohort cannot hold (the caller still applies all of ``where``)."""
    needed = list(dict.fromkeys(columns))
    if model_id is None:
        missing = [c for c in needed if c in catalog.columns and catalog.columns[c].needs_model]
        if missing:
            raise CohortError(f"{missing[0]} needs a model; choose one", field="model", choices=list(catalog.models))
    if only is None and where is not None and where.images_only.text and _aggregates(catalog, needed):
        image_columns = sorted(c for c in where.needed if catalog.is_image_column(c))
        images, params = _frame(store, None, columns=["image_id", *image_columns], catalog=catalog)
        only = (f"SELECT {quote_identifier('image_id')} FROM ({images}) AS f WHERE {where.images_only.text}",
                params + where.images_only.params)
    return _frame(store, model_id, columns=needed, catalog=catalog, only=only, **thresholds)


class Selection(tuple):
    """``(sql, params)`` of ``SELECT image_id`` for a cohort: what metrics take.

    It unpacks like the plain tuple it is. It also keeps the compiled filter
    (SQL over frame columns, already resolved against the catalog and saved
    parents), so a metric can read the cohort's frame rows in one pass
    (``frame_query``) instead of joining the image ids back to the tables.
    """

    def __new__(cls, sql: str, params: Sequence, *, model_id: str | None = None,
                thresholds: Mapping[str, float] | None = None, where: str = "", where_params: Sequence = (),
                columns: Sequence[str] = ()):
        selection = super().__new__(cls, (sql, list(params)))
        selection.model_id = model_id
        selection.thresholds = dict(thresholds or {})
        selection.where = where
        selection.where_params = list(where_params)
        selection.filter_columns = tuple(columns)
        return selection

    def __getnewargs__(self) -> tuple:
        return (self[0], self[1])  # pickling restores the rest from __dict__

    def frame_query(self, store: Store, model_id: str | None, columns: Sequence[str]) -> tuple[str, list] | None:
        """``SELECT columns`` of the cohort's frame rows for ``model_id``, or None when
        the filter reads another model's columns (then join on the image ids)."""
        catalog = catalog_of(store)
        if self._reads_another_model(catalog, model_id):
            return None
        frame, params = _frame_for(store, catalog, model_id, [*columns, *self.filter_columns], self.thresholds)
        q = quote_identifier
        sql = f"SELECT {', '.join(q(c) for c in columns)} FROM ({frame}) AS f"
        if self.where:
            return f"{sql} WHERE {self.where}", params + self.where_params
        return sql, params

    def reads_model(self, catalog: Catalog) -> bool:
        """Whether the filter (saved parents included) reads a model's columns (outcome, error, predictions):
        then which images it holds depends on ``model_id`` and the thresholds."""
        return any(catalog.columns[c].needs_model for c in self.filter_columns if c in catalog.columns)

    def _reads_another_model(self, catalog: Catalog, model_id: str | None) -> bool:
        """Whether the filter reads the columns of a model other than ``model_id``."""
        return self.reads_model(catalog) and model_id != self.model_id


def shared_frame(store: Store, model_id: str | None, selections: Sequence[Selection | None],
                 columns: Sequence[str]) -> tuple[str, list, list[tuple[str, list]]] | None:
    """One frame of ``columns`` for several cohorts, and each one's condition over its rows
    (``TRUE`` for None, every image): one scan then aggregates them all, a ``FILTER`` per cohort.

    Returns ``(frame sql, params, [(condition, params), ...])``, or None when the cohorts can't
    share a frame: one filters on another model's columns, or they differ in thresholds.
    """
    catalog = catalog_of(store)
    chosen = [s for s in selections if s is not None]
    if not all(isinstance(s, Selection) and not s._reads_another_model(catalog, model_id) for s in chosen):
        return None
    if len({tuple(sorted(s.thresholds.items())) for s in chosen}) > 1:
        return None
    filter_columns = [c for s in chosen for c in s.filter_columns]
    frame, params = _frame_for(store, catalog, model_id, [*columns, *filter_columns],
                               chosen[0].thresholds if chosen else {})
    conditions = [(s.where, list(s.where_params)) if s is not None and s.where else ("TRUE", [])
                  for s in selections]
    return frame, params, conditions


def compile_cohort(cohort: Cohort | ParsedQuery, store: Store, *, model_id: str | None,
                   iou: float = 0.5, score_threshold: float = 0.5, label_threshold: float = 0.5,
                   state: "StateDB | None" = None, catalog: Catalog | None = None) -> Selection:
    """``(sql, params)`` of ``SELECT image_id`` for the cohort's images (the metrics' selection)."""
    catalog = catalog or catalog_of(store, state)
    thresholds = {"iou": iou, "score_threshold": score_threshold, "label_threshold": label_threshold}
    compiled = _where(cohort, catalog, state, store)
    where, columns = compiled.sql, sorted(compiled.needed)
    context = {"model_id": model_id, "thresholds": thresholds, "where": where.text,
               "where_params": where.params, "columns": columns}
    if not where.text:
        return Selection(ALL_IMAGES_SQL, [], **context)
    frame, params = _frame_for(store, catalog, model_id, ["image_id", *columns], thresholds, where=compiled)
    return Selection(f"SELECT {quote_identifier('image_id')} FROM ({frame}) AS f WHERE {where.text}",
                     params + where.params, **context)


def _order_terms(order_by: str | Sequence[str] | None, available: Sequence[str]) -> list[tuple[str, bool]]:
    terms = [order_by] if isinstance(order_by, str) else list(order_by or [])
    out = []
    for term in terms:
        descending = term.startswith("-")
        name = term[1:] if descending else term
        if name not in available:
            raise CohortError(f"cannot sort by {_show(name)}", field="order_by", choices=list(available))
        out.append((name, descending))
    if "image_id" not in [n for n, _ in out]:
        out.append(("image_id", False))  # ties broken by image id: pages never overlap
    return out


def _count_arg(value: int | None, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise CohortError(f"{name} must be a non-negative integer, got {value!r}", field=name)
    return int(value)


FIRST_WINDOW = 1024  # images a windowed page looks at first (``_windowed_page``)


def _aggregates(catalog: Catalog, columns: Iterable[str]) -> bool:
    """Whether a frame of ``columns`` aggregates many rows per image (detections, matches, flips),
    the cost a windowed page saves; classification columns are one joined row per image."""
    return any((c in MODEL_COLUMNS and catalog.task == "detection") or catalog.derived.get(c) == COUNTERFACTUALS
               for c in columns)


def _windowed_page(store: Store, catalog: Catalog, model_id: str | None, thresholds: dict, compiled: _Where,
                   wanted: list[str], order: list[tuple[str, bool]], limit: int, offset: int) -> pd.DataFrame:
    """A page sorted by image columns of a cohort that filters on joined columns (e.g. the grid's
    ``outcome``), from the first images in sort order alone.

    The cohort's rows in sort order are the images in that order that pass its filter, so
    the first ``offset + limit`` of them lie among the first images in that order (those
    passing the image-column conjuncts): the frame aggregates a window of those, and
    widens it (by the share of matches seen) until it holds the page or every image.
    """
    q = quote_identifier
    order_names = [n for n, _ in order]

    def terms(prefix: str) -> str:
        return ", ".join(f"{prefix}{q(n)} {'DESC' if d else 'ASC'} NULLS LAST" for n, d in order)

    image_columns = sorted({*order_names, *(c for c in compiled.needed if catalog.is_image_column(c))} - {"image_id"})
    images, image_params = _frame(store, None, columns=["image_id", *image_columns], catalog=catalog)
    window_where = f" WHERE {compiled.images_only.text}" if compiled.images_only.text else ""
    frame, frame_params = _frame(store, model_id, columns=list(dict.fromkeys(
        ["image_id", *wanted, *sorted(compiled.needed), *order_names])), catalog=catalog,
        only=(f"SELECT {q('image_id')} FROM vl_window", []), **thresholds)
    n_window, n_matched = (name + "_" * next(k for k in range(len(wanted) + 1) if name + "_" * k not in wanted)
                           for name in ("vl_window", "vl_matched"))
    page_columns = list(dict.fromkeys([*wanted, *order_names]))
    sql = (f"WITH vl_window AS MATERIALIZED (SELECT {q('image_id')} FROM ({images}) AS f{window_where} "
           f"ORDER BY {terms('')} LIMIT ?), "
           f"vl_matches AS MATERIALIZED (SELECT {', '.join(q(c) for c in page_columns)} FROM ({frame}) AS f "
           f"WHERE {compiled.sql.text}), "
           f"vl_page AS (SELECT * FROM vl_matches ORDER BY {terms('')} LIMIT ? OFFSET ?) "
           f"SELECT {', '.join('p.' + q(c) for c in wanted)}, s.{q(n_window)}, s.{q(n_matched)} "
           f"FROM (SELECT (SELECT count(*) FROM vl_window) AS {q(n_window)}, "
           f"(SELECT count(*) FROM vl_matches) AS {q(n_matched)}) AS s "
           f"LEFT JOIN vl_page AS p ON true ORDER BY {terms('p.')}")
    size = max(FIRST_WINDOW, 2 * (offset + limit))
    while True:
        params = [*image_params, *compiled.images_only.params, size, *frame_params, *compiled.sql.params,
                  limit, offset]
        result = store.query(sql, params)
        window, matched = int(result[n_window].iloc[0]), int(result[n_matched].iloc[0])
        if matched >= offset + limit or window < size:
            break
        size = max(2 * size, math.ceil(size * (offset + limit) / max(matched, 1) * 1.25))
    if matched > offset:
        return result.iloc[:min(matched - offset, limit)].drop(columns=[n_window, n_matched])
    # Past the last row the LEFT JOIN gave one row of NULLs (and the counts): the empty page,
    # with the column types a page with rows has, is the frame of no image.
    empty, empty_params = _frame(store, model_id, columns=wanted, catalog=catalog,
                                 only=(f"SELECT {q('image_id')} FROM {q('images')} WHERE false", []), **thresholds)
    return store.query(empty, empty_params)


def cohort_rows(store: Store, cohort: Cohort | ParsedQuery, model_id: str | None, *, iou: float = 0.5,
                score_threshold: float = 0.5, label_threshold: float = 0.5,
                columns: Sequence[str] | None = None, order_by: str | Sequence[str] | None = None,
                limit: int | None = None, offset: int | None = None, state: "StateDB | None" = None,
                catalog: Catalog | None = None) -> pd.DataFrame:
    """One page of the cohort's frame rows.

    ``columns``: frame columns to return (default all); ``order_by``: a column
    or list of columns, ``-name`` for descending (missing values last, ties by
    image id); ``limit``/``offset`` page through the result.
    """
    catalog = catalog or catalog_of(store, state)
    available = catalog.frame_columns(with_model=model_id is not None)
    wanted = list(dict.fromkeys(columns if columns is not None else available))
    if not wanted:
        raise CohortError("choose at least one column", field="columns", choices=list(available))
    order = _order_terms(order_by, available)
    compiled = _where(cohort, catalog, state, store)
    where, needed = compiled.sql, compiled.needed
    thresholds = {"iou": iou, "score_threshold": score_threshold, "label_threshold": label_threshold}
    limit, offset = _count_arg(limit, "limit"), _count_arg(offset, "offset")
    q = quote_identifier
    order_names = [n for n, _ in order]

    def ordering(prefix: str) -> str:
        return " ORDER BY " + ", ".join(f"{prefix}{q(n)} {'DESC' if d else 'ASC'} NULLS LAST" for n, d in order)

    # The page's image ids first, from only the columns that filter and sort; then the
    # wanted columns for those rows alone (a deep page of a big cohort sorts narrow rows).
    keys, key_params = _frame_for(store, catalog, model_id, ["image_id", *sorted(needed), *order_names], thresholds,
                                  where=compiled)
    page = _Sql(f"SELECT {', '.join(q(c) for c in dict.fromkeys(['image_id', *order_names]))} "
                f"FROM ({keys}) AS f", key_params)
    if where.text:
        page.add(f" WHERE {where.text}", where.params)
    page.add(ordering(""))
    if limit is not None:
        page.add(" LIMIT ?", [limit])
    if offset:
        page.add(" OFFSET ?", [offset])
    if limit is None:
        sql = _rows_sql(store, catalog, model_id, wanted, thresholds, compiled, order_names)
        sql.add(ordering(""))
        if offset:
            sql.add(" OFFSET ?", [offset])
        return store.query(sql.text, sql.params)
    if all(catalog.is_image_column(n) for n in order_names) and _aggregates(catalog, needed):
        return _windowed_page(store, catalog, model_id, thresholds, compiled, wanted, order, limit, offset or 0)
    frame, params = _frame_for(store, catalog, model_id, ["image_id", *wanted], thresholds,
                               only=(f"SELECT {q('image_id')} FROM pg", []))
    sql = _Sql(f"WITH pg AS MATERIALIZED ({page.text}) SELECT {', '.join('f.' + q(c) for c in wanted)} "
               f"FROM ({frame}) AS f JOIN pg ON f.{q('image_id')} = pg.{q('image_id')}", page.params + params)
    sql.add(ordering("pg."))
    return store.query(sql.text, sql.params)


def cohort_rows_sql(store: Store, cohort: Cohort | ParsedQuery, model_id: str | None, columns: Sequence[str], *,
                    iou: float = 0.5, score_threshold: float = 0.5, label_threshold: float = 0.5,
                    state: "StateDB | None" = None, catalog: Catalog | None = None) -> tuple[str, list]:
    """``(sql, params)`` of all the cohort's frame rows, ``columns`` only, in no set order: for
    queries that aggregate the rows themselves (``core.distribution``)."""
    catalog = catalog or catalog_of(store, state)
    thresholds = {"iou": iou, "score_threshold": score_threshold, "label_threshold": label_threshold}
    sql = _rows_sql(store, catalog, model_id, list(dict.fromkeys(columns)), thresholds,
                    _where(cohort, catalog, state, store))
    return sql.text, sql.params


def _rows_sql(store: Store, catalog: Catalog, model_id: str | None, wanted: list[str], thresholds: dict,
              compiled: _Where, extra: Sequence[str] = ()) -> _Sql:
    frame, params = _frame_for(store, catalog, model_id, [*wanted, *sorted(compiled.needed), *extra], thresholds,
                               where=compiled)
    sql = _Sql(f"SELECT {', '.join(quote_identifier(c) for c in wanted)} FROM ({frame}) AS f", params)
    if compiled.sql.text:
        sql.add(f" WHERE {compiled.sql.text}", compiled.sql.params)
    return sql


def cohort_count(store: Store, cohort: Cohort | ParsedQuery, model_id: str | None, *, iou: float = 0.5,
                 score_threshold: float = 0.5, label_threshold: float = 0.5,
                 state: "StateDB | None" = None, catalog: Catalog | None = None) -> int:
    """Number of images in the cohort."""
    sql, params = compile_cohort(cohort, store, model_id=model_id, iou=iou, score_threshold=score_threshold,
                                 label_threshold=label_threshold, state=state, catalog=catalog)
    return int(store.scalar(f"SELECT count(*) FROM ({sql}) AS s", params))


def cohort_outcome_counts(store: Store, cohort: Cohort | ParsedQuery, model_id: str | None, *, iou: float = 0.5,
                          score_threshold: float = 0.5, label_threshold: float = 0.5,
                          state: "StateDB | None" = None, catalog: Catalog | None = None) -> dict[str | None, int]:
    """Images of the cohort per outcome: ``'correct'``, ``'incorrect'`` and ``None`` (no prediction,
    or no model), in one pass. Outcomes absent from the cohort are absent from the result.

    Like a page of ``cohort_rows``, the frame aggregates detections and matches only for the
    images that pass the cohort's image-column conjuncts: a metadata cohort of a big
    detection store counts its own images, not every image's boxes.
    """
    catalog = catalog or catalog_of(store, state)
    if model_id is None:
        return {None: cohort_count(store, cohort, None, state=state, catalog=catalog)}
    thresholds = {"iou": iou, "score_threshold": score_threshold, "label_threshold": label_threshold}
    compiled = _where(cohort, catalog, state, store)
    frame, params = _frame_for(store, catalog, model_id, ["image_id", "outcome", *sorted(compiled.needed)],
                               thresholds, where=compiled)
    sql = _Sql(f"SELECT {quote_identifier('outcome')} AS outcome, count(*) AS n FROM ({frame}) AS f", params)
    if compiled.sql.text:
        sql.add(f" WHERE {compiled.sql.text}", compiled.sql.params)
    sql.add(" GROUP BY 1")
    counts = store.query(sql.text, sql.params)
    return {(None if pd.isna(o) else str(o)): int(n) for o, n in zip(counts["outcome"], counts["n"])}


# --------------------------------------------------------------------------- summary and CLI


def _json_number(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _json_number(value.item())
    return value


def _metrics(store: Store, catalog: Catalog, model_id: str, selection: "Selection", view: ViewState) -> dict:
    from .metrics import classification

    if catalog.task == "multiclass":
        result = classification.classification_metrics(store, model_id, selection)
        keys = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_micro", "recall_micro",
                "f1_micro", "precision_weighted", "recall_weighted", "f1_weighted", "n_evaluated", "n_missing")
    elif catalog.task == "multilabel":
        result = classification.multilabel_metrics(store, model_id, selection,
                                                   label_threshold=view.thresholds(catalog)["label_threshold"])
        keys = ("exact_match", "hamming_loss", "precision_macro", "recall_macro", "f1_macro", "precision_micro",
                "recall_micro", "f1_micro", "n_evaluated", "n_missing")
    elif catalog.task == "detection":
        from .metrics.detection import detection_metrics

        thresholds = view.thresholds(catalog)
        result = detection_metrics(store, model_id, selection, iou=thresholds["iou"],
                                   score_threshold=thresholds["score_threshold"])
        result.update({k: v for k, v in result["aggregates"][result["average"]].items()
                       if k in ("precision", "recall", "f1")})
        keys = tuple(k for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    else:
        raise CohortError(f"store has unknown task {catalog.task!r}", field="task")
    return {k: _json_number(result[k]) for k in keys if k in result}


def cohort_summary(store: Store | str, query: str | Mapping[str, object], model_id: str | None = None,
                   state: "StateDB | None" = None) -> dict:
    """Count and headline metrics of a cohort query string for one model.

    The model is ``model_id``, else the query's ``model``, else the store's
    first model; thresholds come from the query (``iou``, ``conf``, ``thr``) or
    the store's defaults.
    """
    if not isinstance(store, Store):
        store = Store(store)
    catalog = catalog_of(store, state)
    parsed = parse_query(query, catalog)
    model = model_id or parsed.view.model or (catalog.models[0] if catalog.models else None)
    if model is not None and model not in catalog.models:
        raise CohortError(f"unknown model {_show(model)}", field="model", choices=list(catalog.models))
    thresholds = parsed.view.thresholds(catalog)
    selection = compile_cohort(parsed.cohort, store, model_id=model, state=state, catalog=catalog, **thresholds)
    count = int(store.scalar(f"SELECT count(*) FROM ({selection[0]}) AS s", selection[1]))
    metrics = _metrics(store, catalog, model, selection, parsed.view) if model is not None else {}
    return {
        "store": store.name, "task": catalog.task, "model": model,
        "query": to_query(parsed.cohort), "description": describe(parsed.cohort, catalog, state),
        "thresholds": thresholds, "count": count, "metrics": metrics,
    }


def cohort_main(argv: list[str] | None = None) -> int:
    """``visionlens cohort STORE "QUERY" [--model M] [--json]``."""
    parser = argparse.ArgumentParser(prog="visionlens cohort",
                                     description="count and metrics of a cohort query string")
    parser.add_argument("store", help="path to NAME.duckdb")
    parser.add_argument("query", help='cohort query string, e.g. "brightness__lt=0.3&true_label__in=cat,dog"')
    parser.add_argument("--model", help="model id (default: the query's model, else the model added to the "
                                         "store first)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        summary = cohort_summary(args.store, args.query, args.model)
    except VisionLensError as error:
        sys.stderr.write(f"visionlens cohort: error: {error}\n")
        return 2
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return 0
    lines = [f"store:  {summary['store']} ({summary['task']})",
             f"cohort: {'; '.join(summary['description'])}",
             f"images: {summary['count']}"]
    if summary["model"] is not None:
        lines.append(f"model:  {summary['model']}")
        width = max((len(k) for k in summary["metrics"]), default=0)
        for name, value in summary["metrics"].items():
            shown = "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
            lines.append(f"  {name.ljust(width)}  {shown}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
