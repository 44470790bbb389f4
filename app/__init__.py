"""Streamlit helpers for VisionLens pages (``core`` does the work; this draws it).

A page is a short script: get the view, call the engine, render::

    import streamlit as st
    from app import flyout, require_view
    from core.metrics.classification import classification_metrics

    view = require_view()                       # store, catalog, cohort, model, thresholds
    st.header("Model overview")
    metrics = classification_metrics(view.store, view.model_id, view.selection())
    ...
    flyout.show(view)                           # the image drawer, when the URL says image=<id>

The entry point (``streamlit_app.py``) has already parsed the URL, drawn the
sidebar (dataset, model, thresholds, page menu) and the cohort bar, and
reported any bad part of the URL, before the page runs. To add a page, write
``pages/<name>.py`` and list it in ``app.nav.PAGES`` (file, URL path, title,
icon, the tasks and number of models it needs); it shows in the menu once the
file exists.

URL
    The URL holds the whole view: the cohort (``core.cohorts`` grammar),
    ``store``, ``model``, ``iou``, ``conf``, ``thr``, ``view``, ``page``,
    ``image``, and page parameters ``<page>.<name>`` (e.g.
    ``explorer.sort=-score``): these never reach the cohort parser, stay in
    the URL while their page is open and are dropped by page links. Only
    ``app.urlsync`` touches ``st.query_params``: ``params()``,
    ``query_string()``, ``replace(...)``, ``update({...})`` (None removes),
    ``bind(key, url_value)`` before a keyed widget and
    ``write_on_change(key, param, to_url, reset)`` as its ``on_change``.
    ``app.nav.bind_choice(view, key, param, options, default)`` does both
    for a choice widget; ``app.nav.page_param(param)`` reads one.

``app.state.View`` (what ``require_view()`` returns)
    ``store`` (``core.store.Store``), ``catalog`` (``core.cohorts.Catalog``),
    ``state`` (``core.state.StateDB``), ``cohort`` (``core.cohorts.Cohort``),
    ``settings`` (``core.cohorts.ViewState``, store, model and thresholds
    resolved), ``page_params``, ``task``, ``classes``, ``class_name(id)``,
    ``model_id``, ``iou``, ``score_threshold``, ``label_threshold``,
    ``thresholds`` (keyword arguments for the compiler and the metrics),
    ``store_key`` (cache key: changes when a part or a new base appears).
    Cached queries: ``count(cohort=None)``, ``total()``,
    ``outcome_counts(cohort=None)``, ``rows(cohort=None, columns=,
    order_by=, limit=, offset=)`` (one page of the cohort's frame),
    ``selection(cohort=None)`` (``(sql, params)`` for ``core.metrics``),
    ``query(sql, params)`` (any read), ``thumbnails(ids)``,
    ``model_params()``, ``saved_cohorts()``, ``describe(cohort=None)``.
    Links: ``url_params(cohort=None, **view_changes)``,
    ``link_params(cohort=None)``. For a page's own cache of engine results,
    key ``st.cache_data`` on ``view.store_key``, the model, ``view.thresholds``
    and ``core.cohorts.to_query`` of the cohort, passing the store as ``_store``.

``app.nav``
    ``go(view, cohort=None, **view_changes)`` points the URL at another cohort
    or view (a chart click: ``go(view, view.cohort.with_filters(f),
    page=None)``); ``view_switch(view, {value: label})`` (URL ``view``);
    ``page_number(view, pages)`` (URL ``page``); ``PAGES``; ``page_links``.

Others
    ``app.image_card``: ``thumbnail_grid(cards, key=, size=, on_click=)``
    draws a page of thumbnails as one element; ``cards(view, frame)`` builds
    cards with outcome chips from ``view.rows(columns=card_columns(view))``.
    ``app.explorer``: the explorer's views, ``open_image(id)``,
    ``outcome_sections(view)``. ``app.flyout.show(view)``: the image drawer;
    ``app.flyout.open_flyout(view, image_id)`` opens it from a fragment's rerun
    (the URL already naming the image) without rerunning the page.
    ``app.cohort_bar``: ``render(view)``, ``open_builder(view, cohort,
    title=, target=)``, ``confirm_delete(view, saved)``, ``cohort_table(view,
    cohorts, key=, opens=)``, ``cohort_sizes(view, cohorts)``.
    ``app.charts``: ``probability_frame``, ``probability_bars``,
    ``probability_spec`` (its Vega-Lite spec, cached: building charts through
    Altair costs more than most reruns; draw specs with ``st.vega_lite_chart``),
    ``bars_height``, ``OUTCOME_COLORS`` (give heights to the ``st`` call,
    not to the chart spec).
"""

from __future__ import annotations

import streamlit as st

from .state import View, current_view, shell_ran


def require_view() -> View:
    """The current view; without a store, say how to build one and stop the page."""
    if not shell_ran():
        from .nav import enter_shell

        enter_shell()
    view = current_view()
    if view is None:
        st.info("No dataset is open. Build the demo stores with `visionlens demo`, or choose another dataset.",
                icon=":material/database:")
        st.stop()
    return view


__all__ = ["View", "current_view", "require_view"]
