"""The current view: which store, model, thresholds and cohort the URL asks for.

``load_view()`` runs once per full rerun (from the entry point): it opens the
store named by the URL (one cached ``Store`` per file, refreshed cheaply each
rerun so new parts show without a restart), parses the query string with the
store's catalog, and leaves out the parts of the cohort it cannot read (keeping
the rest), returning the problems for the page to show. Pages get the
result from ``current_view()``.

Every query a page runs goes through a ``View`` method cached with
``st.cache_data``; the keys hold the store's file signature, the model, the
thresholds and the cohort's canonical text (with its saved ancestors'), so a
new part, a new threshold or an edited saved cohort never serves stale rows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence
from urllib.parse import parse_qsl, urlencode

import pandas as pd
import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from core.cohorts import (VIEW_KEYS, Catalog, Cohort, ParsedQuery, ViewState, catalog_of, cohort_count,
                          cohort_outcome_counts, cohort_rows, compile_cohort, describe, expand, parse_query_lenient,
                          read_store_param, to_query)
from core.errors import CohortError, EvalError, StoreError, VisionLensError
from core.matching import IOU_THRESHOLDS, threshold_index
from core.state import SavedCohort, StateDB
from core.store import Store, data_dir, list_stores

from . import urlsync

# The demo stores open first, in this order, when the URL names none.
DEMO_STORES = ("demo-multiclass", "demo-multilabel", "demo-detection")
IOU_CHOICES = tuple(round(float(t), 2) for t in IOU_THRESHOLDS)

# ``<page>.<name>`` parameters belong to one page (e.g. ``robustness.metric``):
# the cohort parser never sees them, the URL keeps them while the page is open,
# and page links drop them. ``g1.``, ``g2.`` … prefixes are cohort groups, and a
# key with ``__`` is a filter (a column name may hold a dot).
_PAGE_PARAM = re.compile(r"(?!g[0-9]+\.)(?!.*__)[a-z][a-z0-9_-]*\.[A-Za-z0-9_.-]+")

_VIEW_KEY = "_vl_view"
_SHELL_KEY = "_vl_shell_running"


# --------------------------------------------------------------------------- stores


def data_folder() -> Path:
    return data_dir()


def available_stores() -> list[str]:
    return list_stores(data_folder())


def default_store(names: Sequence[str]) -> str:
    for name in DEMO_STORES:
        if name in names:
            return name
    return names[0]


@st.cache_resource(show_spinner=False)
def _open_store(path: str) -> Store:
    return Store(path)


def open_store(path: str | Path) -> Store:
    """The shared ``Store`` of ``path``, refreshed (new bases and parts show at once)."""
    store = _open_store(str(Path(path).resolve()))
    store.refresh()
    return store


# --------------------------------------------------------------------------- cached queries
# Leading underscores keep unhashable objects out of the cache key; the key
# arguments after them say everything the result depends on.


def _cohort_key(cohort: Cohort, catalog: Catalog, state: StateDB) -> tuple[str, ...]:
    """The cohort and its saved ancestors as canonical text: equal keys, equal images."""
    return tuple(to_query(part) for part in expand(cohort, catalog, state))


@st.cache_data(show_spinner=False, max_entries=4096)
def _count(_store: Store, _cohort: Cohort, _catalog: Catalog, _state: StateDB,
           store_key: tuple, cohort_key: tuple, model_id: str | None, thresholds: tuple) -> int:
    return cohort_count(_store, _cohort, model_id, state=_state, catalog=_catalog, **dict(thresholds))


@st.cache_data(show_spinner=False, max_entries=1024)
def _outcome_counts(_store: Store, _cohort: Cohort, _catalog: Catalog, _state: StateDB,
                    store_key: tuple, cohort_key: tuple, model_id: str | None, thresholds: tuple) -> dict:
    return cohort_outcome_counts(_store, _cohort, model_id, state=_state, catalog=_catalog, **dict(thresholds))


@st.cache_data(show_spinner=False, max_entries=1024)
def _rows(_store: Store, _cohort: Cohort, _catalog: Catalog, _state: StateDB,
          store_key: tuple, cohort_key: tuple, model_id: str | None, thresholds: tuple,
          columns: tuple[str, ...] | None, order_by: tuple[str, ...], limit: int | None, offset: int) -> pd.DataFrame:
    return cohort_rows(_store, _cohort, model_id, columns=list(columns) if columns is not None else None,
                       order_by=list(order_by), limit=limit, offset=offset, state=_state, catalog=_catalog,
                       **dict(thresholds))


@st.cache_data(show_spinner=False, max_entries=1024)
def _query(_store: Store, store_key: tuple, sql: str, params: tuple) -> pd.DataFrame:
    return _store.query(sql, list(params))


# --------------------------------------------------------------------------- the view


@dataclass(frozen=True)
class View:
    """What a page needs: the store, the parsed cohort and view state, cached queries."""

    store: Store
    catalog: Catalog
    state: StateDB
    cohort: Cohort
    settings: ViewState  # the URL's view state, defaults resolved: store, model, thresholds set
    stores: tuple[str, ...]
    page_params: tuple[tuple[str, str], ...] = ()  # ``<page>.<name>`` parameters, as in the URL

    # -- what is being looked at

    @property
    def task(self) -> str:
        return self.catalog.task

    @property
    def classes(self) -> tuple[str, ...]:
        return self.catalog.classes

    @property
    def model_id(self) -> str | None:
        return self.settings.model

    @property
    def iou(self) -> float:
        return self.settings.iou

    @property
    def score_threshold(self) -> float:
        return self.settings.conf

    @property
    def label_threshold(self) -> float:
        return self.settings.thr

    @property
    def thresholds(self) -> dict[str, float]:
        """Keyword arguments for the cohort compiler and the metrics."""
        return {"iou": self.iou, "score_threshold": self.score_threshold, "label_threshold": self.label_threshold}

    @property
    def store_key(self) -> tuple:
        # Review statuses live in the state database, not the store: their key refreshes cached cohorts.
        return (str(self.store.paths.base), self.store.signature, self.catalog.reviews_key)

    def model_params(self) -> dict:
        """The chosen model's ``models.params`` (empty without a model)."""
        if self.model_id is None:
            return {}
        models = self.query('SELECT params FROM "models" WHERE model_id = ?', [self.model_id])
        return json.loads(models["params"].iloc[0] or "{}") if len(models) else {}

    # -- links

    def url_params(self, cohort: Cohort | None = None, **changes: object) -> dict[str, str]:
        """Query parameters of this view with ``changes`` to the view state (None removes).

        Thresholds equal to the store's defaults are left out, so URLs stay short.
        """
        settings = replace(self.settings, **changes)
        defaults = {"iou": 0.5, "conf": self.catalog.default_score_threshold,
                    "thr": self.catalog.default_label_threshold}
        settings = replace(settings, **{k: None for k, v in defaults.items()
                                        if getattr(settings, k) is not None and abs(getattr(settings, k) - v) < 1e-12})
        params = dict(parse_qsl(to_query(self.cohort if cohort is None else cohort, settings), keep_blank_values=True))
        return {**params, **dict(self.page_params)}

    def link_params(self, cohort: Cohort | None = None) -> dict[str, str]:
        """Parameters that travel to another page: cohort, store, model, thresholds."""
        return {key: value for key, value in self.url_params(cohort, view=None, page=None, image=None).items()
                if not is_page_param(key)}

    # -- queries (cached)

    def _thresholds_key(self) -> tuple:
        return tuple(sorted(self.thresholds.items()))

    def count(self, cohort: Cohort | None = None) -> int:
        """Images in ``cohort`` (default: the current cohort) under this model and thresholds."""
        cohort = self.cohort if cohort is None else cohort
        return _count(self.store, cohort, self.catalog, self.state, self.store_key,
                      _cohort_key(cohort, self.catalog, self.state), self.model_id, self._thresholds_key())

    def total(self) -> int:
        return self.count(Cohort())

    def rows(self, cohort: Cohort | None = None, *, columns: Sequence[str] | None = None,
             order_by: str | Sequence[str] | None = None, limit: int | None = None, offset: int = 0) -> pd.DataFrame:
        """One page of the cohort's frame (image columns plus the model's outcome columns)."""
        cohort = self.cohort if cohort is None else cohort
        order = (order_by,) if isinstance(order_by, str) else tuple(order_by or ())
        return _rows(self.store, cohort, self.catalog, self.state, self.store_key,
                     _cohort_key(cohort, self.catalog, self.state), self.model_id, self._thresholds_key(),
                     tuple(columns) if columns is not None else None, order, limit, int(offset))

    def selection(self, cohort: Cohort | None = None) -> tuple[str, list]:
        """``(sql, params)`` selecting the cohort's image ids: what metrics take."""
        cohort = self.cohort if cohort is None else cohort
        return compile_cohort(cohort, self.store, model_id=self.model_id, state=self.state,
                              catalog=self.catalog, **self.thresholds)

    def cohort_key(self, cohort: Cohort | None = None) -> tuple[str, ...]:
        """A cache key of ``cohort`` (default: the current one): equal keys, equal images."""
        return _cohort_key(self.cohort if cohort is None else cohort, self.catalog, self.state)

    def outcome_counts(self, cohort: Cohort | None = None) -> dict[str | None, int]:
        """Images of the cohort per outcome ('correct', 'incorrect', None: no prediction), in one query."""
        cohort = self.cohort if cohort is None else cohort
        return _outcome_counts(self.store, cohort, self.catalog, self.state, self.store_key,
                               _cohort_key(cohort, self.catalog, self.state), self.model_id, self._thresholds_key())

    def query(self, sql: str, params: Sequence = ()) -> pd.DataFrame:
        """Any read-only query on the store, cached until the store's files change."""
        return _query(self.store, self.store_key, sql, tuple(params))

    def thumbnails(self, image_ids: Sequence[int]) -> dict[int, bytes]:
        """JPEG thumbnails of a page of images."""
        if not len(image_ids):
            return {}
        frame = self.query('SELECT image_id, jpeg FROM "thumbnails" WHERE image_id = ANY(?)',
                           [sorted(int(i) for i in image_ids)])
        return dict(zip(frame["image_id"].astype(int), frame["jpeg"]))

    # -- saved cohorts

    def saved_cohorts(self) -> list[SavedCohort]:
        return self.state.list_cohorts()

    def describe(self, cohort: Cohort | None = None) -> list[str]:
        return describe(self.cohort if cohort is None else cohort, self.catalog, self.state)

    def class_name(self, class_id: int) -> str:
        return self.classes[class_id] if 0 <= class_id < len(self.classes) else str(class_id)


# --------------------------------------------------------------------------- loading


def is_page_param(key: str) -> bool:
    """Whether ``key`` is a ``<page>.<name>`` parameter rather than part of the cohort or view."""
    return bool(_PAGE_PARAM.fullmatch(key))


@dataclass(frozen=True)
class Loaded:
    """``load_view``'s result: the view (None when no store exists or opens) and what went wrong."""

    view: View | None
    problems: tuple[VisionLensError, ...] = ()
    left_out: tuple[str, ...] = ()  # the URL's cohort parameters left out (``key=value``); the cohort keeps the rest
    stores: tuple[str, ...] = ()


def _resolve_settings(parsed: ParsedQuery, catalog: Catalog, store_name: str,
                      problems: list[CohortError]) -> ViewState:
    settings = replace(parsed.view, store=store_name)
    if settings.model is None and catalog.models:
        settings = replace(settings, model=catalog.models[0])
    iou = settings.iou if settings.iou is not None else 0.5
    try:
        iou = float(IOU_THRESHOLDS[threshold_index(iou)])
    except EvalError as error:
        problems.append(CohortError(error.message, field="iou", choices=list(IOU_CHOICES)))
        iou = 0.5
    thresholds = settings.thresholds(catalog)
    return replace(settings, iou=round(iou, 2), conf=thresholds["score_threshold"],
                   thr=thresholds["label_threshold"])


def load_view() -> Loaded:
    """Open the URL's store and parse its cohort, leaving out the parts that cannot be read.

    Also rewrites the URL into its canonical form (store and model made
    explicit), so a copied URL opens exactly this view even after a new model
    or store is added.
    """
    st.session_state[_SHELL_KEY] = True
    names = tuple(available_stores())
    st.session_state[_VIEW_KEY] = None
    if not names:
        return Loaded(None)
    pairs = urlsync.params()
    page_params = tuple((k, v) for k, v in pairs if is_page_param(k))
    query = urlencode([(k, v) for k, v in pairs if not is_page_param(k)])
    problems: list[CohortError] = []
    try:
        wanted = read_store_param(query)
    except CohortError as error:
        problems.append(error)
        wanted = None
    if wanted is not None and wanted not in names:
        problems.append(CohortError(f"no store {wanted!r} in {data_folder()}", field="store", choices=names))
        wanted = None
    name = wanted or default_store(names)
    try:
        store = open_store(data_folder() / name)
    except StoreError as error:
        return Loaded(None, (*problems, error), stores=names)
    catalog = catalog_of(store)
    state = StateDB.for_store(store.paths.base)
    parsed = parse_query_lenient(query, catalog)
    problems.extend(e for e in parsed.errors if e.field != "store")  # read_store_param told it already
    left_out = [e.field for e in parsed.errors if e.field not in VIEW_KEYS]
    cohort = parsed.cohort
    try:
        expand(cohort, catalog, state)
    except CohortError as error:  # the saved cohort is gone or no longer fits: the URL's own filters stay
        problems.append(error)
        cohort = replace(cohort, parent_id=None)
        left_out.append("cohort")
    settings = _resolve_settings(parsed, catalog, name, problems)
    if settings.image is not None and settings.image >= store.image_count():
        problems.append(CohortError(f"no image {settings.image} in store {name!r}", field="image"))
        settings = replace(settings, image=None)
    view = View(store, catalog, state, cohort, settings, names, page_params)
    canonical = view.url_params()
    if canonical != dict(pairs):
        urlsync.replace(canonical)
    st.session_state[_VIEW_KEY] = view
    given = dict(reversed(pairs))  # each key's first value
    return Loaded(view, tuple(problems), tuple(dict.fromkeys(_shown_param(k, given.get(k)) for k in left_out)), names)


def _shown_param(key: str, value: str | None, limit: int = 60) -> str:
    """``key=value`` as the URL had it, a long value cut: what the user retypes to fix it."""
    if value is None:
        return key
    value = value.replace("`", "'")  # shown in a code span
    return f"{key}={value if len(value) <= limit else value[:limit] + '…'}"


def end_run() -> None:
    """Called by the entry point after the page ran (also when it stopped or reran)."""
    st.session_state.pop(_SHELL_KEY, None)


def shell_ran() -> bool:
    """Whether this run went through the entry point (see ``app.nav.enter_shell``)."""
    return bool(st.session_state.get(_SHELL_KEY))


def current_view() -> View | None:
    """The view the entry point loaded in this run (None when no store exists)."""
    return st.session_state.get(_VIEW_KEY)


def claim_dialog() -> bool:
    """Whether a dialog may open now: Streamlit allows one per run. Open it straight after.

    A fragment's own rerun is a run of its own (the page's dialog is not reopened in it), so
    this asks Streamlit's run context rather than counting full reruns (checked with 1.67)."""
    ctx = get_script_run_ctx()
    return ctx is None or not ctx.has_dialog_opened
