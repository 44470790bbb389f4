"""Pages, the sidebar (dataset, model, thresholds, menu) and moving between views.

Streamlit's own page menu drops the query string, so navigation is hidden and
the menu is drawn with ``st.page_link(..., query_params=...)``: the cohort,
store, model and thresholds travel with every click. A page appears once its
file exists and the store suits it (task, number of models).
"""

from __future__ import annotations

import functools
import gc
import json
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
from PIL import Image, ImageDraw

from core.cohorts import Cohort, format_number

from . import home, urlsync
from .state import IOU_CHOICES, Loaded, View

ROOT = Path(__file__).resolve().parent.parent
ALL_TASKS = ("multiclass", "multilabel", "detection")


@dataclass(frozen=True)
class PageSpec:
    """One dashboard page: its file, URL path, title, icon and what it needs."""

    file: str  # relative to the repository root
    url_path: str
    title: str
    icon: str
    tasks: tuple[str, ...] = ALL_TASKS
    min_models: int = 0

    def suits(self, view: View | None) -> bool:
        if view is None:
            return False
        return view.task in self.tasks and len(view.catalog.models) >= self.min_models

    @property
    def path(self) -> Path:
        return ROOT / self.file


PAGES: tuple[PageSpec, ...] = (
    PageSpec("pages/model-overview.py", "model-overview", "Model overview", ":material/monitoring:", min_models=1),
    PageSpec("pages/explorer.py", "explorer", "Data explorer", ":material/photo_library:"),
    PageSpec("pages/error-analysis.py", "error-analysis", "Error analysis", ":material/troubleshoot:",
             min_models=1),
    PageSpec("pages/data-analysis.py", "data-analysis", "Data analysis", ":material/bar_chart:"),
    PageSpec("pages/slices.py", "slices", "Error slices", ":material/view_quilt:", min_models=1),
    PageSpec("pages/compare.py", "compare", "Compare models", ":material/compare_arrows:"),
    PageSpec("pages/review.py", "review", "Label review", ":material/rule:", min_models=1),
    PageSpec("pages/cohorts.py", "cohorts", "Cohorts", ":material/filter_alt:"),
    PageSpec("pages/robustness.py", "robustness", "Robustness", ":material/blur_on:", min_models=1),
)


@st.cache_resource(show_spinner=False)
@functools.cache
def freeze_imports() -> None:
    """Leave what is imported by now (it lives as long as the process) out of the garbage
    collector's full passes, which otherwise walk every one of its objects: once per process."""
    gc.freeze()


# Streamlit's browser code fetches and compiles each element type's code on its first use in a
# tab (React.lazy): the first chart or table after a page switch shows skeletons for 0.3-0.6 s
# meanwhile. These are the types the pages use, with vega-embed (which the chart loads on its
# first draw).
PRELOADED_CHUNKS = ("ArrowVegaLiteChart", "embed", "vega-interpreter", "DataFrame", "Metric", "ImageList",
                    "ButtonGroup", "Multiselect", "Selectbox", "Slider", "Checkbox", "Radio", "Pagination")

_PRELOAD_SCRIPT = """<script>
(() => {
  if (window.vlPreloaded) return;
  window.vlPreloaded = true;
  const entry = document.querySelector('script[src*="/static/js/index."]');
  if (!entry) return;
  const load = () => %s.forEach((name) => import(new URL(name, entry.src).href).catch(() => {}));
  (window.requestIdleCallback || setTimeout)(load, {timeout: 5000});
})();
</script>"""


@functools.cache
def preloaded_files() -> tuple[str, ...]:
    """This Streamlit's file names for ``PRELOADED_CHUNKS`` (``NAME.HASH.js``; none if it names them otherwise)."""
    folder = Path(st.__file__).parent / "static" / "static" / "js"
    return tuple(sorted(path.name for name in PRELOADED_CHUNKS for path in folder.glob(f"{name}.*.js")
                        if len(path.name.split(".")) == 3))


def preload_elements(container) -> None:
    """Load the element code a later page needs while the browser is idle (once per tab)."""
    files = preloaded_files()
    if files:
        container.html(_PRELOAD_SCRIPT % json.dumps(files), unsafe_allow_javascript=True)


def app_icon() -> Image.Image:
    """The browser-tab icon, drawn here: a Material icon as favicon would be fetched from Google."""
    icon = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    draw = ImageDraw.Draw(icon)
    draw.rounded_rectangle([2, 2, 61, 61], radius=14, fill="#3154c8")
    for x, y, dx, dy in ((14, 14, 1, 1), (50, 14, -1, 1), (14, 50, 1, -1), (50, 50, -1, -1)):
        draw.line([(x, y), (x + 10 * dx, y)], fill="white", width=5)
        draw.line([(x, y), (x, y + 10 * dy)], fill="white", width=5)
    draw.ellipse([25, 25, 39, 39], fill="white")
    return icon


def _pages(view: View | None) -> tuple[list[st.Page], list[st.Page]]:
    """(the pages the menu lists, and pages that need more models than the store has: a link to one
    says so rather than Streamlit's "Page not found")."""
    pages = [st.Page(home.render, title="Overview", icon=":material/home:", url_path="overview", default=True)]
    pages += [st.Page(spec.path, title=spec.title, icon=spec.icon, url_path=spec.url_path)
              for spec in PAGES if spec.suits(view) and spec.path.is_file()]
    lacking = [st.Page(_needs_models(spec, view), title=spec.title, icon=spec.icon, url_path=spec.url_path)
               for spec in PAGES if view is not None and view.task in spec.tasks and not spec.suits(view)]
    return pages, lacking


def _needs_models(spec: PageSpec, view: View):
    def render() -> None:
        st.header(spec.title)
        have = len(view.catalog.models)
        needed = "a model's predictions" if spec.min_models == 1 else f"{spec.min_models} models' predictions"
        st.info(f"{spec.title} needs {needed}; this store has {have or 'none'}. Add one with `visionlens ingest "
                f"--task {view.task} --predictions FILE --out {view.store.paths.base}` (or `--model "
                "module:function`).", icon=":material/info:")
    return render


def navigation(view: View | None) -> st.Page:
    """Register the pages for this store (menu hidden) and return the one to run."""
    pages, lacking = _pages(view)
    st.session_state["_vl_pages"] = pages
    return st.navigation(pages + lacking, position="hidden")


def page_links(view: View | None, container=None, *, with_home: bool = True) -> None:
    """The menu: one link per page, carrying the cohort and the view's settings."""
    target = container or st
    params = view.link_params() if view is not None else None
    for page in st.session_state.get("_vl_pages", []):
        if with_home or page.url_path:
            target.page_link(page, query_params=params, width="stretch")


def enter_shell() -> None:
    """Rerun through the entry point when Streamlit ran a page file alone.

    With a ``pages/`` folder beside the entry point, Streamlit runs a URL such
    as ``/explorer`` as that file alone until some session has called
    ``st.navigation`` (checked with streamlit 1.67): a bookmarked URL opened
    first after a restart would miss the sidebar, the cohort and the store.
    Streamlit leaves that mode by clearing this flag in ``st.navigation``; we
    clear it the same way and rerun, and the URL resolves to the same page.
    """
    from streamlit.runtime.pages_manager import PagesManager

    PagesManager.uses_pages_directory = False
    st.rerun()


def go(current: View, cohort: Cohort | None = None, **changes: object) -> None:
    """Point the URL at ``cohort`` (default: the current one) with view-state ``changes``
    (``page=None`` drops the page number, ``view="table"`` switches the explorer)."""
    urlsync.replace(current.url_params(cohort, **changes))


# --------------------------------------------------------------------------- sidebar


def _switch_store() -> None:
    urlsync.replace({"store": st.session_state["vl_store"]})


def _threshold_text(default: float):
    return lambda value: None if abs(value - default) < 1e-12 else format_number(round(float(value), 4))


def sidebar(loaded: Loaded) -> None:
    """Dataset and model pickers, live thresholds and the page menu."""
    view = loaded.view
    bar = st.sidebar
    bar.markdown("### :material/center_focus_weak: VisionLens")
    if not loaded.stores:
        return
    current = view.settings.store if view is not None else None
    urlsync.bind("vl_store", current if current in loaded.stores else loaded.stores[0])
    bar.selectbox("Dataset", loaded.stores, key="vl_store", on_change=_switch_store,
                  help="Stores found in the data folder ($VISIONLENS_DATA or ./data)")
    if view is None:
        return
    bar.caption(f"{view.task} · {view.total():,} images · {len(view.classes)} classes")
    if view.catalog.models:
        names = dict(view.query('SELECT model_id, name FROM "models"').itertuples(index=False))
        urlsync.bind("vl_model", view.model_id)
        bar.selectbox("Model", view.catalog.models, key="vl_model",
                      format_func=lambda m: m if names.get(m) in (None, "", m) else f"{names[m]} ({m})",
                      on_change=urlsync.write_on_change("vl_model", "model", reset=("page",)))
    else:
        bar.caption("This store has no model predictions yet.")
    _thresholds(view, bar)
    bar.divider()
    page_links(view, bar)
    if view.catalog.models:
        from . import compare_views  # imported here: compare_views uses nav.page_param
        # Drawn only while open: the sidebar is on every page.
        scorecard = bar.expander("PDF scorecard", icon=":material/picture_as_pdf:", key="vl_sc_side_open",
                                 on_change="rerun")
        with scorecard:
            if scorecard.open:
                compare_views.scorecard_panel(view, model_id=view.model_id, key="vl_sc_side")
    preload_elements(bar)


def _thresholds(view: View, bar) -> None:
    if not view.catalog.models:
        return
    if view.task == "detection":
        urlsync.bind("vl_iou", view.iou)
        bar.select_slider("IoU threshold", IOU_CHOICES, key="vl_iou", format_func=lambda v: f"{v:.2f}",
                          help="A detection is a true positive when it overlaps a ground-truth box of its class "
                               "at least this much (COCO matching, stored for all ten thresholds).",
                          on_change=urlsync.write_on_change("vl_iou", "iou", _threshold_text(0.5), reset=("page",)))
        urlsync.bind("vl_conf", view.score_threshold)
        bar.slider("Score threshold", 0.0, 1.0, step=0.01, key="vl_conf",
                   help="Detections scoring below this are ignored.",
                   on_change=urlsync.write_on_change("vl_conf", "conf",
                                                     _threshold_text(view.catalog.default_score_threshold),
                                                     reset=("page",)))
    elif view.task == "multilabel":
        urlsync.bind("vl_thr", view.label_threshold)
        bar.slider("Label threshold", 0.0, 1.0, step=0.01, key="vl_thr",
                   help="A label is predicted when its probability is at least this.",
                   on_change=urlsync.write_on_change("vl_thr", "thr",
                                                     _threshold_text(view.catalog.default_label_threshold),
                                                     reset=("page",)))


def named(name: str) -> bool:
    """Whether a save whose button was clicked can go ahead: a name is given (else it says so). Save buttons stay
    enabled: a name typed but not committed yet (its field still focused) arrives with the click."""
    if name.strip():
        return True
    st.warning("Type a name to save it under first.", icon=":material/edit:")
    return False


def show_problems(loaded: Loaded) -> None:
    """What the URL got wrong, in words, and what is shown instead."""
    for problem in loaded.problems:
        st.error(f"Cannot use this part of the URL: {problem}", icon=":material/link_off:")
    if loaded.left_out:
        kept = loaded.view is not None and loaded.view.cohort != Cohort()
        st.info("Left out of the cohort: " + ", ".join(f"`{p}`" for p in loaded.left_out) + ". "
                + ("The cohort keeps the URL's other conditions." if kept else "Showing all images."),
                icon=":material/info:")


# --------------------------------------------------------------------------- view controls


def view_switch(view: View, choices: dict[str, str], *, key: str = "vl_view") -> str:
    """A segmented control for the URL's ``view`` (the first choice is the default)."""
    default = next(iter(choices))
    asked = view.settings.view
    current = asked if asked in choices else default
    if asked is not None and asked not in choices:
        st.error(f"Cannot use this part of the URL: view {asked!r} is not one of this page's views "
                 f"({', '.join(choices)}); showing {choices[default].lower()}.", icon=":material/link_off:")
        urlsync.update({"view": None})
    urlsync.bind(key, current)
    st.segmented_control("View", list(choices), key=key, format_func=choices.get, required=True,
                         label_visibility="collapsed",
                         on_change=urlsync.write_on_change(key, "view", lambda v: None if v == default else v,
                                                           reset=("page",)))
    return st.session_state[key]


def page_number(view: View, pages: int, *, key: str = "vl_page") -> int:
    """A pager for the URL's ``page`` (1-based), clamped to ``pages``; returns the page shown."""
    pages = max(1, pages)
    # Read from the URL itself, not ``view``: in a fragment's rerun ``view`` is the last full
    # run's, and the pager has just written the page it moved to.
    text = dict(urlsync.params()).get("page", "")
    current = int(text) if text.isdigit() else view.settings.page or 1
    urlsync.bind(key, min(max(1, current), pages))
    shown = min(max(1, int(st.session_state[key])), pages)
    st.session_state[key] = shown
    if pages > 1:
        st.pagination(pages, key=key, max_visible_pages=9,
                      on_change=urlsync.write_on_change(key, "page", lambda p: None if p == 1 else str(p)))
    return shown


def page_param(name: str) -> str | None:
    """The URL value of this page's parameter ``name`` (a ``<page>.<name>`` key), if any.

    Read from the URL itself: in a fragment's rerun ``view.page_params`` are the last full
    run's, while the fragment's own widgets may have written a new value since."""
    return dict(urlsync.params()).get(name)


def bind_many(view: View, key: str, name: str, options, default: list):
    """``bind_choice`` for a multiselect: page parameter ``name`` holds the chosen options, comma-separated
    (unknown ones are dropped; ``default`` when absent)."""
    text = page_param(name)
    current = default if text is None else [o for o in text.split(",") if o in set(options)]
    urlsync.bind(key, current)
    return urlsync.write_on_change(key, name, lambda value: None if list(value) == list(default) else ",".join(value))


def bound(view: View, key: str, name: str, options, default, to_url=str) -> dict:
    """The ``key`` and ``on_change`` of a widget bound to page parameter ``name`` (``bind_choice``)."""
    return {"key": key, "on_change": bind_choice(view, key, name, list(options), default, to_url)}


def bind_choice(view: View, key: str, name: str, options, default, to_url=str):
    """Bind widget ``key`` to page parameter ``name``: the URL picks the option (``default`` when
    absent or unknown); returns the ``on_change`` that writes the choice back (the default
    leaves the URL)."""
    text = page_param(name)
    current = next((option for option in options if to_url(option) == text), default)
    urlsync.bind(key, current)
    return urlsync.write_on_change(key, name, lambda value: None if value == default else to_url(value))
