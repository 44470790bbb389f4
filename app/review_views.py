"""Label review: flagged labels and saved cohorts with review status and notes, the embedding map,
near duplicates.

Reads the ``label_quality``, ``embeddings`` and ``near_duplicates`` parts
(``core.label_quality``, ``core.embeddings``), each model's latest run, limited
to the current cohort; review status and notes go to the state database.
"""

from __future__ import annotations

import math
from typing import Mapping

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from core.cohorts import Cohort, frame_sql
from core.label_quality import TABLE as QUALITY_TABLE
from core.label_quality import has_probabilities, latest_sql
from core.state import STATUSES

from . import image_card, nav
from .explorer import open_image
from .state import View

PER_PAGE = 12
_JUST_SAVED = "_vl_review_saved"  # (kind, target) of the review the last callback saved
MAX_POINTS = 5000  # points drawn in the map; a larger cohort is sampled (the same sample each run)
MAX_PAIRS_SHOWN = 24
BRUSH = "brush"  # the map's interval selection
KIND_NAMES = {"wrong_label": "wrong label", "missing_label": "label missing", "extra_label": "extra label",
              "missing_box": "box missing", "wrong_class": "wrong class", "poor_box": "box misplaced"}


def _has_run(view: View, table: str) -> bool:
    if not view.store.has_table(table) or "computed_at" not in view.store.table_columns(table):
        return False
    return bool(view.query(f'SELECT count(*) AS n FROM "{table}" WHERE "model_id" = ?', [view.model_id])["n"].iloc[0])


def _missing(view: View, what: str, command: str, *, reruns_model: bool = False) -> None:
    """How to compute ``what`` (``visionlens command``), or why it can't be for this model."""
    if reruns_model and not view.model_params().get("loader"):
        st.info(f"The {what} needs the model's image features: model **{view.model_id}** was stored from a "
                "predictions file, so it cannot be re-run here. Ingest it with `--model module:function` "
                "to compute them.", icon=":material/info:")
        return
    st.info(f"No {what} for model **{view.model_id}** yet. Compute it with\n\n"
            f"```\nvisionlens {command} {view.store.paths.base} --model {view.model_id}\n```\n"
            "and reload this page.", icon=":material/pending_actions:")


def _in_cohort(view: View, table_sql: str, table_params: list, columns: str, where: str = "",
               order: str = "") -> pd.DataFrame:
    selection, selection_params = view.selection()
    sql = (f"SELECT {columns} FROM ({table_sql}) AS t JOIN ({selection}) AS s USING (\"image_id\")"
           + (f" WHERE {where}" if where else "") + (f" ORDER BY {order}" if order else ""))
    return view.query(sql, [*table_params, *selection_params])


def label_names(view: View, value: object) -> str:
    """A class id or list of ids as class names ("—" for none)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "—"
    ids = np.atleast_1d(np.asarray(value, dtype=np.int64))
    return ", ".join(view.class_name(int(i)) for i in ids) if len(ids) else "(none)"


def _kind_text(kinds: object) -> str:
    if kinds is None or kinds is pd.NA or (isinstance(kinds, float) and math.isnan(kinds)):
        return ""
    return ", ".join(KIND_NAMES.get(k, k) for k in str(kinds).split(","))


# --------------------------------------------------------------------------- flagged labels


def flagged_labels(view: View) -> None:
    if not _has_run(view, QUALITY_TABLE):
        if view.task != "detection" and not has_probabilities(view.store, view.model_id):
            st.info(f"Label quality needs class probabilities, and model **{view.model_id}** stored none. "
                    "Ingest its predictions with a `probs` column (one probability per class, in class "
                    "order), then run `visionlens label-quality`.", icon=":material/info:")
            return
        _missing(view, "label-quality scores", "label-quality")
        return
    sql, params = latest_sql(QUALITY_TABLE, view.model_id)
    flagged = _in_cohort(view, sql, params, 't."image_id", t."label_quality_score", t."suggested_label", '
                         't."issue_kind"', where='t."label_issue"', order='t."label_quality_score", t."image_id"')
    reviews = {r.target: r for r in view.state.list_reviews("image")}
    status = np.array([reviews[i].status if i in reviews else "open" for i in flagged["image_id"].tolist()],
                      dtype=object)
    counts = {s: int((status == s).sum()) for s in STATUSES}
    shown = st.segmented_control("Status", ("all", *STATUSES), default="open", required=True,
                                 key="vl_review_status",
                                 format_func=lambda s: f"{s} ({len(flagged) if s == 'all' else counts[s]})")
    rows = flagged if shown == "all" else flagged[status == shown]
    st.caption(f"**{len(flagged):,}** images of this cohort are flagged as likely label errors by model "
               f"**{view.model_id}**, lowest label-quality score (most likely wrong) first.")
    if not len(rows):
        st.success("Nothing to review here.", icon=":material/task_alt:")
        return
    page = nav.page_number(view, math.ceil(len(rows) / PER_PAGE))
    page_rows = rows.iloc[(page - 1) * PER_PAGE: page * PER_PAGE]
    given = view.query('SELECT "image_id", "true_label" FROM "images" WHERE "image_id" = ANY(?)',
                       [page_rows["image_id"].astype(int).tolist()]).set_index("image_id")["true_label"]
    jpegs = view.thumbnails(page_rows["image_id"].tolist())
    for row in page_rows.itertuples(index=False):
        _review_row(view, int(row.image_id), jpegs.get(int(row.image_id)), given.get(int(row.image_id)),
                    row.suggested_label, float(row.label_quality_score), row.issue_kind,
                    reviews.get(int(row.image_id)))


def _review_row(view: View, image_id: int, jpeg: bytes | None, given: object, suggested: object,
                score: float, kinds: object, review) -> None:
    with st.container(border=True):
        picture, facts, edit = st.columns([1, 2.2, 3.2], vertical_alignment="center")
        if jpeg is not None:
            picture.image(bytes(jpeg), width=96)
        facts.markdown(f"**Image {image_id}** · {_kind_text(kinds)}  \n"
                       f"Given: **{label_names(view, given)}**  \n"
                       f"Suggested: **{label_names(view, suggested)}**  \n"
                       f"Label quality: {score:.3f}")
        if facts.button("Open", key=f"vl_review_open_{image_id}", icon=":material/open_in_full:"):
            open_image(image_id)
            st.rerun()
        review_editor(view, edit, "image", image_id, review)


def review_editor(view: View, container, kind: str, target: int, review) -> None:
    """Status and note of one image or saved cohort, saved to the state database as they change.

    Saved in the widgets' callbacks, before the page runs again: the status counts and the list drawn
    above the editor then already hold the change."""
    keys = (f"vl_review_{kind}_s_{target}", f"vl_review_{kind}_n_{target}")
    container.segmented_control("Review status", STATUSES, default=review.status if review else "open",
                                required=True, key=keys[0], on_change=_save_review, args=(view, kind, target, keys))
    container.text_input("Note", value=review.note if review else "", key=keys[1],
                         placeholder="What is wrong, what was done", on_change=_save_review,
                         args=(view, kind, target, keys))
    if st.session_state.get(_JUST_SAVED) == (kind, target):
        del st.session_state[_JUST_SAVED]  # said once, after the change
        container.caption(":material/check: saved")


def _save_review(view: View, kind: str, target: int, keys: tuple[str, str]) -> None:
    status, note = (st.session_state[k] for k in keys)
    view.state.set_review(kind, target, status=status, note=note)
    st.session_state[_JUST_SAVED] = (kind, target)


# --------------------------------------------------------------------------- saved cohorts


def cohort_notes(view: View) -> None:
    """Review status and a note per saved cohort (the scorecard lists them)."""
    saved = view.state.list_cohorts()
    if not saved:
        st.info("No saved cohorts yet. Save one from the cohort bar, an error slice or a selection on the "
                "embedding map, then review it here.", icon=":material/bookmarks:")
        return
    reviews = {r.target: r for r in view.state.list_reviews("cohort")}
    st.caption(f"**{len(saved):,}** saved cohorts. Their status and notes, like those of images, appear in the "
               "PDF scorecard (`visionlens report`).")
    for cohort in saved:
        with st.container(border=True):
            facts, edit = st.columns([3.2, 3.2], vertical_alignment="center")
            facts.markdown(f"**{cohort.name}** (#{cohort.id})" + (f"  \n{cohort.description}"
                                                                    if cohort.description else ""))
            facts.page_link("pages/explorer.py", label="Open in the explorer", icon=":material/photo_library:",
                            query_params=view.link_params(Cohort(parent_id=cohort.id)))
            review_editor(view, edit, "cohort", cohort.id, reviews.get(cohort.id))


# --------------------------------------------------------------------------- embedding map


def _colour_columns(view: View) -> dict[str, str]:
    """Columns the map can colour by: labels, outcome, then catalogued scalar metadata."""
    choices = {"true_label": "True label"}
    if view.model_id is not None:
        choices["outcome"] = "Outcome"
    if _has_run(view, QUALITY_TABLE):
        choices["label_issue"] = "Flagged label"
    for name, info in view.catalog.columns.items():
        if not info.is_list and not info.needs_model and name not in choices and name != "image_id":
            choices[name] = info.label
    return choices


def embedding_map(view: View) -> None:
    from core.embeddings import EMBEDDINGS_TABLE  # imports torch

    if not _has_run(view, EMBEDDINGS_TABLE):
        _missing(view, "embedding map", "embeddings", reruns_model=True)
        return
    choices = _colour_columns(view)
    colour = st.selectbox("Colour by", list(choices), format_func=choices.get, key="vl_review_colour")
    sql, params = latest_sql(EMBEDDINGS_TABLE, view.model_id)
    points = _in_cohort(view, sql, params, 't."image_id", t."x", t."y"', order='t."image_id"')
    if not len(points):
        st.info("No image of this cohort is on the map.", icon=":material/scatter_plot:")
        return
    drawn = points
    if len(points) > MAX_POINTS:
        keep = np.sort(np.random.default_rng(0).choice(len(points), MAX_POINTS, replace=False))
        drawn = points.iloc[keep].reset_index(drop=True)
        st.caption(f"Showing a sample of {MAX_POINTS:,} of the cohort's {len(points):,} images; a selection "
                   "takes every image inside it, drawn or not.")
    drawn = drawn.assign(colour=_colour_values(view, colour, drawn["image_id"]))
    brush = alt.selection_interval(name=BRUSH)
    numeric = colour in view.catalog.columns and view.catalog.columns[colour].values == "number" \
        and colour != "true_label"
    chart = (alt.Chart(drawn).mark_circle(size=28, opacity=0.75)
             .encode(x=alt.X("x:Q", title="PC 1"), y=alt.Y("y:Q", title="PC 2"),
                     color=alt.Color(f"colour:{'Q' if numeric else 'N'}", title=choices[colour]),
                     tooltip=["image_id:Q", alt.Tooltip("colour", title=choices[colour])])
             .add_params(brush).properties(height=480))
    event = st.altair_chart(chart, on_select="rerun", selection_mode=BRUSH, key="vl_review_map", width="stretch")
    picked = brushed_ids(points, (event.get("selection") or {}).get(BRUSH))
    if picked is None:
        st.caption("Drag a rectangle over the map to select images; save them as a cohort.")
        return
    save_selection(view, picked)


def brushed_ids(points: pd.DataFrame, bounds: Mapping | None) -> list[int] | None:
    """Image ids of ``points`` (``image_id, x, y``) inside an interval selection ``{"x": [a, b],
    "y": [c, d]}`` (edges included, either order), by id; None while no rectangle is drawn."""
    if not bounds or "x" not in bounds or "y" not in bounds:
        return None
    (x0, x1), (y0, y1) = sorted(bounds["x"]), sorted(bounds["y"])
    inside = points["x"].between(x0, x1) & points["y"].between(y0, y1)
    return sorted(points.loc[inside, "image_id"].astype(int).tolist())


def save_selection(view: View, picked: list[int]) -> None:
    """The selected images: a name field and a button that saves them as a cohort (inside the current
    saved cohort, if any) and opens it in the explorer (``?cohort=<id>``)."""
    with st.container(border=True, horizontal=True, vertical_alignment="bottom"):
        st.markdown(f"**{len(picked):,}** images selected")
        name = st.text_input("Cohort name", key="vl_review_cohort_name", placeholder="Name for these images")
        if st.button("Save as cohort and open", icon=":material/save:", type="primary", key="vl_review_save",
                     disabled=not picked) and nav.named(name):
            saved = view.state.create_cohort(name, image_ids=picked, parent_id=view.cohort.parent_id,
                                             description="selected on the embedding map")
            st.switch_page("pages/explorer.py", query_params=view.link_params(Cohort(parent_id=saved.id)))


def _colour_values(view: View, colour: str, image_ids: pd.Series) -> list:
    if colour == "label_issue":
        sql, params = latest_sql(QUALITY_TABLE, view.model_id)
        issues = view.query(f'SELECT "image_id", "label_issue" FROM ({sql})', params).set_index("image_id")
        return ["flagged" if issues["label_issue"].get(i, False) else "not flagged" for i in image_ids]
    frame, frame_params = frame_sql(view.store, view.model_id, columns=["image_id", colour],
                                    catalog=view.catalog, **view.thresholds)
    values = view.query(f'SELECT * FROM ({frame})', frame_params).set_index("image_id")[colour]
    values = values.reindex(image_ids.to_numpy())
    if colour == "true_label":
        return [label_names(view, v) for v in values]
    return values.tolist()


# --------------------------------------------------------------------------- near duplicates


def near_duplicates(view: View) -> None:
    from core.embeddings import DUPLICATES_TABLE, EMBEDDINGS_TABLE  # imports torch

    if not _has_run(view, EMBEDDINGS_TABLE):
        _missing(view, "near-duplicate search", "embeddings", reruns_model=True)
        return
    pairs = pd.DataFrame()
    if view.store.has_table(DUPLICATES_TABLE):
        # The pairs of the map's run (a later run may have found none, writing an empty part).
        selection, selection_params = view.selection()
        pairs = view.query(
            f'SELECT "image_id_a", "image_id_b", "similarity" FROM "{DUPLICATES_TABLE}" '
            f'WHERE "model_id" = ? AND "computed_at" = (SELECT max("computed_at") FROM "{EMBEDDINGS_TABLE}" '
            f'WHERE "model_id" = ?) AND ("image_id_a" IN ({selection}) OR "image_id_b" IN ({selection})) '
            'ORDER BY "similarity" DESC, "image_id_a", "image_id_b"',
            [view.model_id, view.model_id, *selection_params, *selection_params])
    if not len(pairs):
        st.success("No near-duplicate pairs touch this cohort.", icon=":material/task_alt:")
        return
    st.caption(f"**{len(pairs):,}** pairs with at least one image in this cohort (cosine similarity of the "
               f"model's features), most similar first; the first {MAX_PAIRS_SHOWN} are shown.")
    shown = pairs.head(MAX_PAIRS_SHOWN)
    jpegs = view.thumbnails(sorted(set(shown["image_id_a"]) | set(shown["image_id_b"])))
    cards = []
    for a, b, similarity in shown.itertuples(index=False):
        chip = image_card.Chip(f"{similarity:.4f}", "info", "cosine similarity")
        cards += [image_card.Card(int(a), jpegs.get(int(a)), f"#{a} ≈ #{b}", (chip,)),
                  image_card.Card(int(b), jpegs.get(int(b)), f"#{b} ≈ #{a}", (chip,))]
    if image_card.thumbnail_grid(cards, key="vl_review_pairs", size=112, on_click=open_image) is not None:
        st.rerun()
