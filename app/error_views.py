"""Error analysis views: the decision tree and the heat map, each node or cell one click from a cohort.

The engine (``core.error_analysis``) fits and counts; this module caches its
results per cohort selection, draws them with Altair (clickable marks:
``st.altair_chart(on_select="rerun")``) and turns the picked node or cell
into the URL's cohort.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import altair as alt
import pandas as pd
import streamlit as st

from core.cohorts import Cohort, describe, to_query
from core.error_analysis import (BINNINGS, CATEGORICAL_ENCODINGS, ErrorFrame, ErrorHeatmap, ErrorTarget, ErrorTree,
                                 TreeNode, TreeSettings, available_features, combine, error_heatmap,
                                 error_targets, fit_error_tree, load_error_frame)

from . import nav
from .state import View

RATE_SCHEME = "reds"
MAX_DEFAULT_FEATURES = 6
NODE_AREA = 1500  # px² of a tree node's circle
LEVEL_HEIGHT = 112  # px between tree levels
PARAM = "error."  # this page's URL parameters: error.target, error.features, error.columns, error.rows, …
_CLICK = "_vl_ea_click"
_NEW_COHORT = "_vl_ea_new_cohort"  # set when a node or cell became the cohort: pick afresh in the new analysis


# --------------------------------------------------------------------------- cached engine calls


def _thresholds_key(view: View) -> tuple:
    return tuple(sorted(view.thresholds.items()))


@st.cache_resource(show_spinner="Reading the cohort's features…", max_entries=2)
def _frame(_view: View, store_key: tuple, selection: tuple, model_id: str, features: tuple[str, ...],
           target: ErrorTarget, thresholds: tuple) -> ErrorFrame:
    # Held once (not copied per rerun), and only the current frame and the one before: a frame
    # of a million images takes tens of MiB, and every new cohort or feature set makes one.
    return load_error_frame(_view.store, _view.cohort, model_id, list(features), target, state=_view.state,
                            catalog=_view.catalog, **dict(thresholds))


def error_frame(view: View, features: tuple[str, ...], target: ErrorTarget) -> ErrorFrame:
    sql, params = view.selection()
    return _frame(view, view.store_key, (sql, tuple(map(str, params))), view.model_id, features, target,
                  _thresholds_key(view))


@st.cache_data(show_spinner="Fitting the decision tree…", max_entries=64)
def _tree(_frame: ErrorFrame, _view: View, frame_key: tuple, settings: TreeSettings) -> ErrorTree:
    return fit_error_tree(_frame, settings, catalog=_view.catalog)


@st.cache_data(show_spinner=False, max_entries=64)
def _tree_spec(_tree: ErrorTree, frame_key: tuple, settings: TreeSettings, selected: int) -> dict:
    # The Vega-Lite spec, built once per tree and picked node: building it through Altair costs
    # more than the rest of the page's rerun.
    return tree_chart(_tree, selected).to_dict()


@st.cache_resource(show_spinner="Binning…", max_entries=16)
def _heatmap(_frame: ErrorFrame, frame_key: tuple, x: str, y: str | None, bins: int, binning: str) -> ErrorHeatmap:
    return error_heatmap(_frame, x, y, bins=bins, binning=binning)


def _frame_key(view: View, features: tuple[str, ...], target: ErrorTarget) -> tuple:
    sql, params = view.selection()
    return (view.store_key, sql, tuple(map(str, params)), view.model_id, features, target, _thresholds_key(view))


# --------------------------------------------------------------------------- shared controls


@dataclass(frozen=True)
class Choice:
    """What the user analyses: the error target and the features."""

    target: ErrorTarget
    features: tuple[str, ...]


def default_features(view: View) -> list[str]:
    """User metadata first, then image-quality columns: the first few."""
    return [f.name for f in available_features(view.catalog)
            if f.name not in ("true_label", "pred_label", "score")][:MAX_DEFAULT_FEATURES]


def choose(view: View, *, features_label: str = "Features") -> Choice:
    """Target (where the task offers several) and feature pickers."""
    features = {f.name: f.label for f in available_features(view.catalog)}
    targets = error_targets(view.catalog)
    cols = st.columns([2, 5]) if len(targets) > 1 else [None, st.container()]
    target = targets[0]
    # The choices live in the URL (error.target, error.features): a copied link shows the same analysis.
    if len(targets) > 1:
        target = cols[0].selectbox("Error", targets, format_func=lambda t: t.describe(view.catalog).capitalize(),
                                   help="What counts as an error for an image.",
                                   **nav.bound(view, f"vl_ea_target_{view.store.name}", PARAM + "target", targets,
                                               targets[0], to_url=_target_text))
    key = f"vl_ea_features_{view.store.name}"
    on_features = nav.bind_many(view, key, PARAM + "features", list(features), default_features(view))
    picked = cols[1].multiselect(features_label, list(features), format_func=features.get, key=key,
                                 on_change=on_features, placeholder="Choose metadata features")
    return Choice(target, tuple(picked))


def _target_text(target: ErrorTarget) -> str:
    return target.kind if target.label is None else f"label-{target.label}"


def _rate(value: float) -> str:
    return "n/a" if value != value else f"{value:.1%}"


def _errors_text(target: ErrorTarget, errors: float) -> str:
    return f"{errors:,.0f} wrong objects" if target.is_rate else f"{errors:,.0f} errors"


def _cohort_panel(view: View, title: str, own: Cohort, stats: list[tuple[str, str]], key: str) -> None:
    """A picked node or cell: its conditions, numbers and the buttons that make it the cohort."""
    combined = combine(view.cohort, own)
    with st.container(border=True, key=f"{key}_panel"):
        st.markdown(f"**{title}**")
        sentences = describe(own, view.catalog) if not own.is_global else ["all images of the analysed cohort"]
        st.markdown(" ".join(f":orange-badge[{s}]" for s in sentences))
        cols = st.columns(len(stats))
        for col, (label, value) in zip(cols, stats):
            col.metric(label, value)
        if not own.is_global:
            # Inline code, not st.code: its syntax highlighter costs the browser ~0.4 s per page load.
            st.caption(f"URL query: `{to_query(own)}`")
        with st.container(horizontal=True):
            if st.button("Make it the cohort", key=f"{key}_apply", type="primary", icon=":material/filter_alt:",
                         disabled=own.is_global, help="Put these conditions in the URL: every page shows them"):
                st.session_state[_NEW_COHORT] = True
                nav.go(view, combined, page=None, image=None)
                st.rerun()
            if st.button("Open in data explorer", key=f"{key}_explore", icon=":material/photo_library:",
                         disabled=own.is_global):
                st.switch_page("pages/explorer.py", query_params=view.link_params(combined))


def _images_text(size: int, evaluated: int) -> str:
    """Images of a node or cell, and those with a prediction (the error rate's) when fewer."""
    return f"{size:,}" if evaluated == size else f"{size:,} ({evaluated:,} predicted)"


def _fit_caption(view: View, frame: ErrorFrame, tree: ErrorTree | None = None) -> None:
    known = int(frame.known.sum())
    # The rate's denominator: images without a prediction are neither right nor wrong.
    unknown = f"; {len(frame) - known:,} without a prediction left out" if known < len(frame) else ""
    text = (f"Error rate **{_rate(frame.error_rate)}** ({_errors_text(frame.kind, frame.total_errors)} "
            f"in {known:,} images{unknown}) · error: {frame.kind.describe(view.catalog)}")
    if tree is not None:
        text += (f" · fitted on a sample of **{tree.n_fitted:,}** of {known:,} images; node counts cover every image"
                 if tree.sampled else f" · fitted on all {tree.n_fitted:,} images with a prediction")
    st.caption(text)


# --------------------------------------------------------------------------- the tree


def tree_layout(tree: ErrorTree) -> pd.DataFrame:
    """Node positions: leaves side by side in tree order, a parent above the middle of its children."""
    by_id = {n.node_id: n for n in tree.nodes}
    x: dict[int, float] = {}
    next_leaf = [0]

    def place(node: TreeNode) -> float:
        if node.children is None:
            x[node.node_id] = float(next_leaf[0])
            next_leaf[0] += 1
        else:
            left, right = (place(by_id[c]) for c in node.children)
            x[node.node_id] = (left + right) / 2
        return x[node.node_id]

    place(tree.root)
    rows = []
    for node in tree.nodes:
        parent = by_id.get(node.parent_id) if node.parent_id is not None else None
        rows.append({
            "node_id": node.node_id, "x": x[node.node_id], "depth": node.depth,
            "parent_x": x[parent.node_id] if parent else None, "parent_depth": parent.depth if parent else None,
            "error_rate": node.error_rate, "size": node.size, "errors": node.errors,
            "share": node.size / max(1, tree.root.size),
            "rate_text": _rate(node.error_rate), "count_text": f"{node.errors:,.0f} / {node.evaluated:,}",
            "split": node.split or "all images", "leaf": node.is_leaf,
            "path": " · ".join(node.conditions) or "all images",
        })
    return pd.DataFrame(rows)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(1, limit - 1)] + "…"


def tree_chart(tree: ErrorTree, selected: int | None, width: int = 1000) -> alt.LayerChart:
    """The tree: nodes filled by error rate with rate and errors / size, edges as thick as their share."""
    layout = tree_layout(tree)
    leaves = max(1, int(layout["leaf"].sum()))
    # An edge label may use the room to the nearest node of its level (px per leaf × leaves apart).
    room = []
    for node_x, depth in zip(layout["x"], layout["depth"]):
        others = layout.loc[(layout["depth"] == depth) & (layout["x"] != node_x), "x"]
        apart = float((others - node_x).abs().min()) if len(others) else float(leaves)
        room.append(int(apart * width / leaves / 6.4))  # ~6.4 px per character at 10 px
    layout["edge_text"] = [_short(text, max(6, chars)) if node != tree.root.node_id else ""
                           for text, chars, node in zip(layout["split"], room, layout["node_id"])]
    layout["selected"] = layout["node_id"] == selected
    rates = layout["error_rate"].dropna()
    low, peak = (float(rates.min()), float(rates.max())) if len(rates) else (0.0, 1.0)
    if peak - low < 0.02:
        low, peak = max(0.0, low - 0.01), peak + 0.01
    x = alt.X("x:Q", axis=None, scale=alt.Scale(domain=[-0.5, leaves - 0.5]))
    y = alt.Y("depth:Q", axis=None, scale=alt.Scale(domain=[-0.6, int(layout["depth"].max()) + 0.6], reverse=True))
    base = alt.Chart(layout).encode(x=x, y=y)
    edges = alt.Chart(layout.dropna(subset=["parent_x"])).mark_rule(color="#b9c0cc").encode(
        x=x, y=y, x2="parent_x:Q", y2="parent_depth:Q",
        strokeWidth=alt.StrokeWidth("share:Q", scale=alt.Scale(domain=[0, 1], range=[1, 12]), legend=None))
    click = alt.selection_point(name="node", fields=["node_id"], on="click", empty=False)
    tooltip = [alt.Tooltip("path:N", title="Conditions"), alt.Tooltip("size:Q", title="Images", format=","),
               alt.Tooltip("errors:Q", title="Errors", format=",.0f"),
               alt.Tooltip("error_rate:Q", title="Error rate", format=".1%")]
    nodes = base.mark_circle(size=NODE_AREA, opacity=1).encode(
        color=alt.Color("error_rate:Q", title="Error rate",
                        scale=alt.Scale(scheme=RATE_SCHEME, domain=[low, peak]),
                        legend=alt.Legend(format=".0%", orient="right", gradientLength=120)),
        stroke=alt.condition("datum.selected", alt.value("#3154c8"), alt.value("#5b6773")),
        strokeWidth=alt.condition("datum.selected", alt.value(4), alt.value(1)),
    )
    # An invisible circle over each node takes the clicks, so a click on the node's text counts too.
    hits = base.mark_circle(size=NODE_AREA, opacity=0.001, cursor="pointer").encode(
        tooltip=tooltip).add_params(click)
    rate = base.mark_text(fontSize=11, fontWeight="bold").encode(
        text="rate_text:N",
        color=alt.condition(f"datum.error_rate > {low + (peak - low) * 0.55}", alt.value("white"),
                            alt.value("#1d2433")),
        tooltip=tooltip)
    counts = base.mark_text(fontSize=10, dy=31, color="#5b6773").encode(text="count_text:N", tooltip=tooltip)
    splits = base.mark_text(fontSize=10, dy=-31, color="#1d2433").encode(text="edge_text:N", tooltip=tooltip)
    height = LEVEL_HEIGHT * (int(layout["depth"].max()) + 1) + 30
    return alt.layer(edges, nodes, rate, counts, splits, hits).properties(height=height).configure_view(stroke=None)


def _node_label(node: TreeNode) -> str:
    where = node.split or "root (all images)"
    return f"#{node.node_id} · {where} · {_rate(node.error_rate)} ({node.errors:,.0f}/{node.evaluated:,})"


def _default_node(tree: ErrorTree) -> int:
    """The node shown until one is picked: the worst leaf holding evaluated images."""
    leaves = [n for n in tree.leaves() if n.evaluated]
    return (max(leaves, key=lambda n: (n.error_rate, n.size)) if leaves else tree.root).node_id


def _new_click(chart_key: str, param: str, fields: tuple[str, ...], memory: str) -> tuple | None:
    """The point last clicked on the keyed chart, if not handled yet (None if none).

    Read from the chart's widget state before the chart is drawn, so the same
    run can already highlight the clicked mark.
    """
    state = st.session_state.get(chart_key)
    selection = (state.get("selection") if isinstance(state, Mapping) else getattr(state, "selection", None)) or {}
    points = selection.get(param) or []
    if not points or any(points[0].get(f) is None for f in fields):
        return None
    clicked = tuple(int(points[0][f]) for f in fields)
    if clicked == st.session_state.get(memory):
        return None
    st.session_state[memory] = clicked
    return clicked


def tree_settings(view: View) -> TreeSettings:
    n = view.count()
    with st.popover("Tree settings", icon=":material/tune:"):
        depth = st.slider("Maximum depth", 1, 10, 4, key="vl_ea_depth")
        leaves = st.slider("Number of leaves", 2, 64, 16, key="vl_ea_leaves",
                           help="At most this many leaves; the most useful splits are kept.")
        min_leaf = st.number_input("Minimum images per leaf", 1, 100_000, max(1, min(20, n // 20)),
                                   key=f"vl_ea_min_leaf_{view.store.name}",
                                   help="A split is only made when both sides keep at least this many "
                                        "fitted images.")
        encoding = st.radio("Categories", CATEGORICAL_ENCODINGS, key="vl_ea_encoding", horizontal=True,
                            format_func={"onehot": "One value per split", "ordinal":
                                         "Groups of values"}.get,
                            help="Split on one category at a time (site = lab), or on groups of categories "
                                 "ordered by error rate (site ∈ {lab, office}).")
    return TreeSettings(max_depth=depth, max_leaves=leaves, min_samples_leaf=int(min_leaf), categorical=encoding)


def _forget_picks() -> None:
    """After a node or cell became the cohort, the old pick means nothing in the new tree or map."""
    if st.session_state.pop(_NEW_COHORT, False):
        for key in ("vl_ea_node", "vl_hm_cell"):
            st.session_state.pop(key, None)


def tree_view(view: View, choice: Choice) -> None:
    _forget_picks()
    if not choice.features:
        st.info("Choose at least one feature to grow the tree on.")
        return
    settings = tree_settings(view)
    frame = error_frame(view, choice.features, choice.target)
    if not len(frame):
        st.info("The cohort holds no images.")
        return
    frame_key = _frame_key(view, choice.features, choice.target)
    tree = _tree(frame, view, frame_key, settings)
    _fit_caption(view, frame, tree)
    options = [n.node_id for n in tree.nodes]
    clicked = _new_click("vl_ea_tree", "node", ("node_id",), _CLICK)
    if clicked is not None and clicked[0] in options:
        st.session_state["vl_ea_node"] = clicked[0]
    if st.session_state.get("vl_ea_node") not in options:
        st.session_state["vl_ea_node"] = _default_node(tree)
    st.vega_lite_chart(_tree_spec(tree, frame_key, settings, st.session_state["vl_ea_node"]), key="vl_ea_tree",
                       on_select="rerun", selection_mode="node", width="stretch")
    labels = {n.node_id: _node_label(n) for n in tree.nodes}
    st.selectbox("Node", options, key="vl_ea_node", format_func=labels.get,
                 help="Click a node in the tree, or choose it here.")
    node = tree.node(st.session_state["vl_ea_node"])
    stats = [("Images", _images_text(node.size, node.evaluated)),
             ("Errors" if not tree.target.is_rate else "Wrong objects", f"{node.errors:,.0f}"),
             ("Error rate", _rate(node.error_rate)), ("Share of the cohort's errors", f"{node.error_share:.1%}")]
    _cohort_panel(view, f"Node #{node.node_id}" + ("" if node.is_leaf else " (inner node)"), node.cohort, stats,
                  "vl_ea_node_actions")
    if tree.importances:
        shown = {k: v for k, v in sorted(tree.importances.items(), key=lambda kv: -kv[1]) if v > 0}
        if shown:
            labels = {f.name: f.label for f in tree.features}
            st.caption("Features the tree split on, by importance: "
                       + ", ".join(f"{labels[k]} {v:.0%}" for k, v in shown.items()))


# --------------------------------------------------------------------------- the heat map


def heatmap_chart(heat: ErrorHeatmap, selected: tuple[int, int] | None) -> alt.LayerChart:
    cells = heat.cells.drop(columns=["cohort"]).copy()
    cells["rate_text"] = [_rate(r) for r in cells["error_rate"]]
    cells["count_text"] = [f"{e:,.0f} / {n:,}" for e, n in zip(cells["errors"], cells["size"])]
    cells["selected"] = [(x, y) == selected for x, y in zip(cells["x"], cells["y"])]
    x_title = heat.x.feature.label
    y_title = heat.y.feature.label if heat.y is not None else ""
    angle = 0 if len(heat.x.labels) <= 6 else -30
    x = alt.X("x_label:N", sort=list(heat.x.labels), title=x_title, axis=alt.Axis(labelAngle=angle, labelLimit=140))
    y = alt.Y("y_label:N", sort=list(heat.y.labels) if heat.y is not None else None, title=y_title or None,
              axis=alt.Axis(labelLimit=160) if heat.y is not None else None)
    rates = cells["error_rate"].dropna()
    low, peak = (float(rates.min()), float(rates.max())) if len(rates) else (0.0, 1.0)
    if peak - low < 0.02:
        low, peak = max(0.0, low - 0.01), peak + 0.01
    click = alt.selection_point(name="cell", fields=["x", "y"], on="click", empty=False)
    tooltip = [alt.Tooltip("x_label:N", title=x_title)] + \
        ([alt.Tooltip("y_label:N", title=y_title)] if heat.y is not None else []) + \
        [alt.Tooltip("size:Q", title="Images", format=","), alt.Tooltip("errors:Q", title="Errors", format=",.0f"),
         alt.Tooltip("error_rate:Q", title="Error rate", format=".1%")]
    base = alt.Chart(cells).encode(x=x, y=y)
    rects = base.mark_rect(cornerRadius=3).encode(
        color=alt.Color("error_rate:Q", title="Error rate", scale=alt.Scale(scheme=RATE_SCHEME, domain=[low, peak]),
                        legend=alt.Legend(format=".0%", orient="right", gradientLength=120)),
        stroke=alt.condition("datum.selected", alt.value("#3154c8"), alt.value("white")),
        strokeWidth=alt.condition("datum.selected", alt.value(4), alt.value(1)),
    )
    hits = base.mark_rect(opacity=0.001, cursor="pointer").encode(tooltip=tooltip).add_params(click)
    light = alt.condition(f"datum.error_rate > {low + (peak - low) * 0.55}", alt.value("white"),
                          alt.value("#1d2433"))
    rate = base.mark_text(fontSize=12, fontWeight="bold", dy=-7).encode(text="rate_text:N", color=light,
                                                                          tooltip=tooltip)
    counts = base.mark_text(fontSize=10, dy=8).encode(text="count_text:N", color=light, tooltip=tooltip)
    return alt.layer(rects, rate, counts, hits).properties(height=alt.Step(46)).configure_view(stroke=None)


def heatmap_view(view: View, choice: Choice) -> None:
    _forget_picks()
    features = {f.name: f.label for f in available_features(view.catalog)}
    options = list(choice.features) or list(features)
    cols = st.columns([2, 2, 1.2, 1.4], vertical_alignment="bottom")

    def bound(key: str, name: str, choices, default, to_url=str) -> dict:
        return nav.bound(view, key, PARAM + name, choices, default, to_url)

    x = cols[0].selectbox("Feature 1 (columns)", options, format_func=features.get,
                          **bound(f"vl_hm_x_{view.store.name}", "columns", options, options[0]))
    y_options = [None] + [f for f in options if f != x]
    y_default = y_options[min(1, len(y_options) - 1)]
    y = cols[1].selectbox("Feature 2 (rows)", y_options, format_func=lambda f: "—" if f is None else features[f],
                          **bound(f"vl_hm_y_{view.store.name}", "rows", y_options, y_default,
                                  to_url=lambda f: "none" if f is None else f))
    bins = int(cols[2].number_input("Bins", 2, 20, help="Bins per numeric feature",
                                    **bound("vl_hm_bins", "bins", range(2, 21), 4)))
    binning = cols[3].selectbox("Binning", BINNINGS, format_func={"equal": "Equal width", "quantile": "Quantiles"}.get,
                                **bound("vl_hm_binning", "binning", BINNINGS, BINNINGS[0]))
    used = tuple(f for f in (x, y) if f is not None)
    frame = error_frame(view, used, choice.target)
    if not len(frame):
        st.info("The cohort holds no images.")
        return
    _fit_caption(view, frame)
    heat = _heatmap(frame, _frame_key(view, used, choice.target), x, y, bins, binning)
    cells = heat.cells
    keys = list(zip(cells["x"].astype(int), cells["y"].astype(int)))
    clicked = _new_click("vl_hm_chart", "cell", ("x", "y"), "_vl_hm_click")
    if clicked is not None and clicked in keys:
        st.session_state["vl_hm_cell"] = clicked
    if st.session_state.get("vl_hm_cell") not in keys:
        worst = cells.sort_values(["error_rate", "size"], ascending=False).iloc[0]
        st.session_state["vl_hm_cell"] = (int(worst["x"]), int(worst["y"]))
    st.altair_chart(heatmap_chart(heat, st.session_state["vl_hm_cell"]), key="vl_hm_chart", on_select="rerun",
                    selection_mode="cell", width="stretch")
    labels = {k: _cell_label(row) for k, row in zip(keys, cells.itertuples())}
    st.selectbox("Cell", keys, key="vl_hm_cell", format_func=labels.get,
                 help="Click a cell in the heat map, or choose it here.")
    row = cells.iloc[keys.index(st.session_state["vl_hm_cell"])]
    stats = [("Images", _images_text(row["size"], row["evaluated"])),
             ("Errors" if not heat.target.is_rate else "Wrong objects", f"{row['errors']:,.0f}"),
             ("Error rate", _rate(row["error_rate"]))]
    _cohort_panel(view, labels[st.session_state["vl_hm_cell"]].split(" · ")[0], row["cohort"], stats,
                  "vl_hm_actions")


def _cell_label(row) -> str:
    where = row.x_label + (f" × {row.y_label}" if row.y_label else "")
    return f"{where} · {_rate(row.error_rate)} ({row.errors:,.0f}/{row.evaluated:,})"
