"""The data explorer's three views of a cohort: image grid, table and class view.

Each reads one page of rows at a time (``View.rows`` with LIMIT/OFFSET, cached),
so a view of a million images costs the same as one of a hundred.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd
import streamlit as st

from core.cohorts import Cohort, Filter, selection_cohort

from . import flyout, image_card, nav, urlsync
from .state import View

PARAM = "explorer."  # this page's URL parameters: explorer.per, explorer.rows, explorer.sort, …
SIZES = (64, 96, 128, 160, 192, 256)
GRID_PAGE_SIZES = (12, 24, 48, 96)
TABLE_PAGE_SIZES = (50, 100, 200)


def open_image(image_id: int) -> None:
    """Open the flyout on ``image_id`` (through the URL)."""
    urlsync.update({"image": str(int(image_id))})


def outcome_sections(view: View) -> list[tuple[str, Cohort, int]]:
    """The cohort split by outcome with sizes: incorrect first (what one debugs), then correct,
    then images the model has no prediction for (only when there are some)."""
    counts = view.outcome_counts()
    if view.model_id is None:
        return [("Images", view.cohort, counts[None])]
    sections = [("Incorrect", view.cohort.with_filters(Filter("outcome", "eq", "incorrect")),
                 counts.get("incorrect", 0)),
                ("Correct", view.cohort.with_filters(Filter("outcome", "eq", "correct")), counts.get("correct", 0))]
    if counts.get(None):
        sections.append(("Not predicted", view.cohort.with_filters(Filter("outcome", "isnull")), counts[None]))
    return sections


# --------------------------------------------------------------------------- grid


def grid_view(view: View) -> None:
    _grid_pages(view, outcome_sections(view))


@st.fragment
def _grid_pages(view: View, sections: list[tuple[str, Cohort, int]]) -> None:
    # A fragment: paging, the page size, the thumbnail size and opening an image's flyout redraw
    # only the grids, not the sidebar, the cohort bar and the section counts (the cohort and
    # thresholds are unchanged).
    counts = [count for _, _, count in sections]
    controls = st.columns([1.2, 5], vertical_alignment="bottom")
    on_change = nav.bind_choice(view, "vl_grid_per_page", PARAM + "per", GRID_PAGE_SIZES, GRID_PAGE_SIZES[1])
    per_page = controls[0].selectbox("Per section", GRID_PAGE_SIZES, key="vl_grid_per_page", on_change=on_change)
    with controls[1]:
        page = nav.page_number(view, math.ceil(max(counts) / per_page))
    size = st.select_slider("Thumbnail size", SIZES, value=128, key="vl_thumb_size", persist_state="session",
                            width=320)
    for title, cohort, count in sections:
        start = (page - 1) * per_page
        shown = f"{start + 1:,}–{min(start + per_page, count):,} of {count:,}" if count > start else f"{count:,}"
        st.markdown(f"**{title}** · {shown}")
        # A page past the section's end is empty: no query (on a big detection store, looking for
        # rows that are not there aggregates every image).
        cards = image_card.cards(view, view.rows(cohort, columns=image_card.card_columns(view), order_by="image_id",
                                                 limit=per_page, offset=start)) if count > start else []
        clicked = image_card.thumbnail_grid(
            cards, key=f"vl_grid_{title}", size=size, on_click=open_image,
            empty="No images here." if count else f"No {title.lower()} images in this cohort.")
        if clicked is not None:
            # From this fragment's rerun: the page is not rerun and redrawn for the drawer.
            flyout.open_flyout(view, clicked)


# --------------------------------------------------------------------------- table


def _labels(view: View, values: pd.Series) -> list[str]:
    names = np.asarray(view.classes, dtype=object)

    def one(value: object) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        ids = np.atleast_1d(value).astype(int)
        return ", ".join(names[ids[(ids >= 0) & (ids < len(names))]])

    return [one(v) for v in values]


def table_columns(view: View) -> list[str]:
    """Outcome columns first, then labels, then every catalogued image column."""
    available = view.catalog.frame_columns(with_model=view.model_id is not None)
    first = ["image_id", "outcome", "true_label", "pred_label", "score", "n_tp", "n_fp", "n_fn"]
    rest = [c for c in available if c not in first and c in view.catalog.columns]
    return [c for c in first if c in available] + rest


@st.fragment
def table_view(view: View) -> None:
    # A fragment: sorting, paging and selecting rows redraw only the table (the cohort and
    # thresholds are unchanged); saving a cohort reruns the page.
    columns = table_columns(view)
    labels = {c: view.catalog.columns[c].label if c in view.catalog.columns else c for c in columns}
    controls = st.columns([2, 1.3, 1, 4], vertical_alignment="bottom")
    orders = [f"{sign}{column}" for column in columns for sign in ("", "-")]
    on_sort = nav.bind_choice(view, "vl_table_sort", PARAM + "sort", orders, "image_id")
    order = controls[0].selectbox(
        "Sort by", orders, key="vl_table_sort", on_change=on_sort,
        format_func=lambda o: f"{labels[o.lstrip('-')]} {'↓ descending' if o.startswith('-') else '↑ ascending'}")
    on_rows = nav.bind_choice(view, "vl_table_rows", PARAM + "rows", TABLE_PAGE_SIZES, TABLE_PAGE_SIZES[0])
    per_page = controls[1].selectbox("Rows per page", TABLE_PAGE_SIZES, key="vl_table_rows", on_change=on_rows)
    total = view.count()
    with controls[2]:
        page = nav.page_number(view, math.ceil(total / per_page))
    frame = view.rows(columns=columns, order_by=order, limit=per_page, offset=(page - 1) * per_page)
    shown = frame.copy()
    for column in ("true_label", "pred_label"):
        if column in shown:
            shown[column] = _labels(view, shown[column])
    jpegs = view.thumbnails(frame["image_id"].tolist())
    shown.insert(1, "thumbnail", [image_card.data_uri(jpegs.get(int(i))) for i in frame["image_id"]])
    config = {c: st.column_config.Column(labels[c]) for c in columns}
    config["thumbnail"] = st.column_config.ImageColumn("Image", width="small")
    config["image_id"] = st.column_config.NumberColumn("Image id", format="%d")
    st.caption(f"Rows {(page - 1) * per_page + 1:,}–{min(page * per_page, total):,} of {total:,} "
               f"(page {page:,} of {max(1, math.ceil(total / per_page)):,}). "
               "Select rows to save them as a cohort or open one.")
    # A new set of rows (cohort, model, thresholds, order, page) starts with nothing selected. Not from
    # ``view.url_params()``: in this fragment's rerun those are the last full run's.
    rows = (sorted(view.link_params().items()), order, per_page, page)
    rows_key = hashlib.md5(repr(rows).encode()).hexdigest()
    event = st.dataframe(shown, key=f"vl_table_{rows_key}", hide_index=True, on_select="rerun", selection_mode="multi-row",
                         column_config=config, row_height=48, height=min(640, 39 + 48 * len(shown)), placeholder="—")
    picked = [int(frame["image_id"].iloc[i]) for i in event.selection.rows]
    if picked:
        _selection_actions(view, picked)


def _selection_actions(view: View, picked: list[int]) -> None:
    with st.container(border=True, horizontal=True, vertical_alignment="bottom"):
        st.markdown(f"**{len(picked)}** selected")
        if len(picked) == 1 and st.button("Open image", icon=":material/open_in_full:", key="vl_table_open"):
            open_image(picked[0])
            flyout.open_flyout(view, picked[0])
        name = st.text_input("Cohort name", key="vl_table_name", placeholder="Name for these images")
        if st.button("Save as cohort", icon=":material/save:", key="vl_table_save", type="primary") and nav.named(name):
            saved = view.state.create_cohort(name, selection_cohort(picked))
            nav.go(view, Cohort(parent_id=saved.id), page=None, image=None, view="table")
            st.rerun()


# --------------------------------------------------------------------------- class view

LABEL_TYPES = {"true_label": "True label", "pred_label": "Predicted label"}
SHOW = {"all": "All", "correct": "Correct only", "incorrect": "Incorrect only"}
PER_LABEL = (4, 8, 12, 16, 24, 32, 48)
DEFAULT_CLASS_GRIDS = 5  # classes shown at first: a store of up to five shows every one


def _label_ids_text(ids: list[int]) -> str:
    return ",".join(str(i) for i in sorted(ids))


def class_view(view: View) -> None:
    has_model = view.model_id is not None
    label_type, shown = "true_label", "all"
    with st.container(horizontal=True, vertical_alignment="bottom", gap="medium"):
        if has_model:
            on_type = nav.bind_choice(view, "vl_class_type", PARAM + "labels_of", list(LABEL_TYPES), "true_label")
            label_type = st.segmented_control("Label type", list(LABEL_TYPES), format_func=LABEL_TYPES.get,
                                              required=True, key="vl_class_type", on_change=on_type)
            on_show = nav.bind_choice(view, "vl_class_show", PARAM + "show", list(SHOW), "all")
            shown = st.segmented_control("Instances", list(SHOW), format_func=SHOW.get, required=True,
                                         key="vl_class_show", on_change=on_show)
        on_per = nav.bind_choice(view, "vl_class_per", PARAM + "per_label", PER_LABEL, 8)
        per_label = st.select_slider("Images per label", PER_LABEL, key="vl_class_per", on_change=on_per, width=220)
    ids = range(len(view.classes))
    default_ids = list(ids)[:DEFAULT_CLASS_GRIDS]
    wanted = nav.page_param(PARAM + "labels")
    chosen_ids = default_ids
    if wanted:
        picked = [int(t) for t in wanted.split(",") if t.isdigit() and int(t) < len(view.classes)]
        chosen_ids = picked or default_ids
    urlsync.bind("vl_class_labels", chosen_ids)
    chosen_ids = st.multiselect(
        "Labels", list(ids), key="vl_class_labels", format_func=view.class_name,
        on_change=urlsync.write_on_change("vl_class_labels", PARAM + "labels",
                                          lambda v: None if sorted(v) == default_ids else _label_ids_text(v)))
    _class_grids(view, [view.class_name(i) for i in chosen_ids], label_type, shown, per_label)


@st.fragment
def _class_grids(view: View, chosen: list[str], label_type: str, shown: str, per_label: int) -> None:
    # A fragment, as the grid's: opening an image's flyout redraws only these grids.
    size = st.session_state.get("vl_thumb_size", 128)
    column = view.catalog.column(label_type)
    op = "contains" if column.is_list else "eq"
    for label in chosen:
        with_label = view.cohort.with_filters(Filter(label_type, op, label))
        cohort = with_label if shown == "all" else with_label.with_filters(Filter("outcome", "eq", shown))
        count = view.count(cohort)
        frame = view.rows(cohort, columns=image_card.card_columns(view), order_by="image_id", limit=per_label)
        st.markdown(f"**{label}** · {len(frame)}/{count:,} examples"
                    + (f" ({SHOW[shown].lower()})" if shown != "all" else ""))
        clicked = image_card.thumbnail_grid(image_card.cards(view, frame), key=f"vl_class_grid_{label}",
                                            size=size, on_click=open_image, empty="No examples in this cohort.")
        if clicked is not None:
            flyout.open_flyout(view, clicked)
