"""Data analysis charts: any two of metadata, labels, predictions and outcome, aggregated or point by point.

Aggregates are counted by DuckDB (``core.distribution``), so a chart of a
million images reads a few hundred counts; individual points are a seeded
random sample when the cohort is large, so the browser gets a few thousand
marks. Only these small results are cached.
"""

from __future__ import annotations


import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from core.cohorts import ColumnInfo
from core.distribution import COUNT, is_numeric, point_sample, value_names, with_other
from core.distribution import distribution as cohort_distribution

from . import nav
from .charts import OUTCOME_COLORS
from .explorer import open_image
from .state import View

SAMPLE_SEED = 0  # the dither's jitter
MODES = {"aggregate": "Aggregate", "points": "Individual datapoints"}
PARAM = "data."  # this view's URL parameters: data.mode, data.x, data.y, data.color, data.bins, …
BINS = (2, 60, 20)  # the bins slider: least, most, default
_NONE = ""


def axis_columns(view: View) -> dict[str, ColumnInfo]:
    """Columns one can chart: metadata, labels, predictions and outcome (model columns need a model)."""
    out = {}
    for name, info in view.catalog.columns.items():
        if info.is_identifier or info.values == "cast":
            continue
        if info.needs_model and view.model_id is None:
            continue
        out[name] = info
    order = {"model": 0, "derived": 1, "user": 2, "auto": 3}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[1].source, 4), kv[1].label.lower())))


def _names(view: View, values: pd.Series, info: ColumnInfo) -> pd.Series:
    return with_other(value_names(values, info, view.classes))


def _colour_scale(name: str, present: pd.Series) -> alt.Scale | alt.UndefinedType:
    """Outcome and error keep the app's outcome colours; other columns get Altair's palette."""
    palette = {"outcome": {"correct": "correct", "incorrect": "incorrect", "missing": "other"},
               "error": {"no": "correct", "yes": "incorrect", "missing": "other"}}.get(name)
    if palette is None:
        return alt.Undefined
    shown = [value for value in palette if value in set(present)]
    return alt.Scale(domain=shown, range=[OUTCOME_COLORS[palette[v]] for v in shown])


# --------------------------------------------------------------------------- aggregates


def aggregate_chart(view: View, table: pd.DataFrame, x: str, y: str, color: str, *, log_x: bool,
                    log_y: bool) -> alt.Chart:
    infos = axis_columns(view)
    y_title = "Images" if y == COUNT else f"Mean {infos[y].label.lower()}"
    y_scale = alt.Scale(type="symlog") if log_y else alt.Scale(zero=True)
    colour = alt.Color("color:N", title=infos[color].label, legend=alt.Legend(orient="bottom"),
                       scale=_colour_scale(color, table["color"])) if color else alt.value("#3154c8")
    tooltip = [alt.Tooltip("value:Q", title=y_title, format=",.4~f")]
    if color:
        tooltip.append(alt.Tooltip("color:N", title=infos[color].label))
    if "x_start" in table:
        x_enc = alt.X("x_start:Q", title=infos[x].label, bin="binned",
                      scale=alt.Scale(type="log") if log_x and table["x_start"].min() > 0 else alt.Scale(zero=False))
        tooltip = [alt.Tooltip("x_start:Q", title="from", format=",.4~f"),
                   alt.Tooltip("x_end:Q", title="to", format=",.4~f")] + tooltip
        if y == COUNT or not color:
            chart = alt.Chart(table).mark_bar(opacity=0.9).encode(x=x_enc, x2="x_end:Q",
                                                                  y=alt.Y("value:Q", title=y_title, scale=y_scale,
                                                                          stack=True if y == COUNT else None),
                                                                  color=colour, tooltip=tooltip)
        else:
            table = table.assign(x_mid=(table["x_start"] + table["x_end"]) / 2)
            chart = alt.Chart(table).mark_line(point=True).encode(
                x=alt.X("x_mid:Q", title=infos[x].label), y=alt.Y("value:Q", title=y_title, scale=y_scale),
                color=colour, tooltip=tooltip)
    else:
        order = list(dict.fromkeys(table.sort_values("x")["x"]))
        tooltip = [alt.Tooltip("x:N", title=infos[x].label)] + tooltip
        chart = alt.Chart(table).mark_bar(opacity=0.9).encode(
            x=alt.X("x:N", title=infos[x].label, sort=order, axis=alt.Axis(labelAngle=-30, labelLimit=140)),
            y=alt.Y("value:Q", title=y_title, scale=y_scale, stack=True if y == COUNT else None),
            xOffset=alt.XOffset("color:N") if color and y != COUNT else alt.XOffset(),
            color=colour, tooltip=tooltip)
    return chart.properties(height=380)


# --------------------------------------------------------------------------- points


def _dithered(values: pd.Series, rng: np.random.Generator) -> np.ndarray:
    """Numbers moved by up to half their smallest step, so equal values spread into a visible cloud."""
    numbers = values.to_numpy(dtype=float)
    distinct = np.unique(numbers[np.isfinite(numbers)])
    step = float(np.diff(distinct).min()) if len(distinct) > 1 else 1.0
    return numbers + rng.uniform(-0.4, 0.4, len(numbers)) * step


def points_chart(view: View, rows: pd.DataFrame, x: str, y: str, color: str, *, log_x: bool, log_y: bool,
                 dither: bool) -> alt.Chart:
    infos = axis_columns(view)
    frame = pd.DataFrame({"image_id": rows["image_id"].to_numpy()})
    rng = np.random.default_rng(SAMPLE_SEED)
    encodings = {}
    for axis, name, log in (("x", x, log_x), ("y", y, log_y)):
        info = infos[name]
        if is_numeric(info):
            frame[axis] = _dithered(rows[name], rng) if dither else rows[name].to_numpy(dtype=float)
            positive = bool((frame[axis].dropna() > 0).all())
            scale = alt.Scale(type="log") if log and positive else alt.Scale(zero=False)
            encodings[axis] = (alt.X if axis == "x" else alt.Y)(f"{axis}:Q", title=info.label, scale=scale)
        else:
            frame[axis] = _names(view, rows[name], info).to_numpy()
            order = sorted(frame[axis].unique().tolist())
            encodings[axis] = (alt.X if axis == "x" else alt.Y)(f"{axis}:N", title=info.label, sort=order)
            if dither:
                frame[f"{axis}_jitter"] = rng.uniform(-0.4, 0.4, len(frame))
                encodings[f"{axis}Offset"] = (alt.XOffset if axis == "x" else alt.YOffset)(
                    f"{axis}_jitter:Q", scale=alt.Scale(domain=[-0.5, 0.5]))
    tooltip = [alt.Tooltip("image_id:Q", title="Image", format="d"),
               alt.Tooltip("x:N" if not is_numeric(infos[x]) else "x:Q", title=infos[x].label),
               alt.Tooltip("y:N" if not is_numeric(infos[y]) else "y:Q", title=infos[y].label)]
    if color:
        info = infos[color]
        if is_numeric(info):
            frame["color"] = rows[color].to_numpy(dtype=float)
            encodings["color"] = alt.Color("color:Q", title=info.label, scale=alt.Scale(scheme="viridis"))
        else:
            frame["color"] = _names(view, rows[color], info).to_numpy()
            encodings["color"] = alt.Color("color:N", title=info.label, scale=_colour_scale(color, frame["color"]))
        tooltip.append(alt.Tooltip("color:" + ("Q" if is_numeric(info) else "N"), title=info.label))
    click = alt.selection_point(name="point", fields=["image_id"], on="click", empty=False)
    return alt.Chart(frame).mark_circle(size=36, opacity=0.7).encode(
        **encodings, tooltip=tooltip).add_params(click).properties(height=420)


# --------------------------------------------------------------------------- cached data


def _key(view: View) -> tuple:
    sql, params = view.selection()
    return view.store_key, sql, tuple(map(str, params)), view.model_id, tuple(sorted(view.thresholds.items()))


@st.cache_data(show_spinner="Aggregating…", max_entries=64)
def _aggregated(_view: View, key: tuple, x: str, y: str, color: str, bins: int, log_x: bool
                ) -> tuple[pd.DataFrame, int]:
    counted = cohort_distribution(_view.store, _view.cohort, _view.model_id, x, y, color or None, bins=bins,
                                  log_x=log_x, state=_view.state, catalog=_view.catalog, **_view.thresholds)
    return counted.table, counted.images_total


@st.cache_data(show_spinner="Sampling…", max_entries=64)
def _sampled(_view: View, key: tuple, columns: tuple[str, ...]) -> tuple[pd.DataFrame, int]:
    return point_sample(_view.store, _view.cohort, _view.model_id, list(columns), state=_view.state,
                        catalog=_view.catalog, **_view.thresholds)


# --------------------------------------------------------------------------- the view


def chart_view(view: View) -> None:
    infos = axis_columns(view)
    names = list(infos)
    label = lambda n: {COUNT: "Number of images", _NONE: "—"}.get(n) or infos[n].label  # noqa: E731
    # Every choice lives in the URL (data.mode, data.x, …): a copied link shows the same chart.
    def bound(key: str, name: str, options, default) -> dict:
        return nav.bound(view, key, PARAM + name, options, default)

    mode = st.segmented_control("Chart", list(MODES), format_func=MODES.get, required=True,
                                **bound("vl_da_mode", "mode", MODES, "aggregate"))
    cols = st.columns(3)
    if mode == "aggregate":
        x_choices = names
        x_default = _first(view, infos)
        y_choices_of = lambda x: [COUNT] + [n for n in names if is_numeric(infos[n])]  # noqa: E731
    else:
        x_choices = [n for n in names if not infos[n].is_list]
        x_default = _first(view, infos, numeric=True)
        y_choices_of = lambda x: [n for n in x_choices if n != x]  # noqa: E731
    x = cols[0].selectbox("X axis", x_choices, format_func=label,
                          **bound(f"vl_da_x_{mode}_{view.store.name}", "x", x_choices, x_default))
    y_choices = y_choices_of(x)
    y = cols[1].selectbox("Y axis", y_choices, format_func=label, **bound(
        f"vl_da_y_{mode}_{view.store.name}", "y", y_choices, y_choices[_second(view, infos, y_choices, x)]))
    colour_choices = [_NONE] + [n for n in names if n not in (x, y) and not infos[n].is_list]
    color = cols[2].selectbox("Colour by", colour_choices, format_func=label, **bound(
        f"vl_da_color_{mode}_{view.store.name}", "color", colour_choices,
        "outcome" if "outcome" in colour_choices else _NONE))
    numeric_x = is_numeric(infos[x])
    with st.container(horizontal=True, vertical_alignment="center", gap="medium"):
        # Bins and a log scale apply to a numeric x only.
        least, most, default_bins = BINS
        bins = st.slider("Bins", least, most, width=260,
                         **bound("vl_da_bins", "bins", range(least, most + 1), default_bins)) \
            if mode == "aggregate" and numeric_x else default_bins
        log_x = st.toggle("Log scale X", **bound("vl_da_log_x", "log_x", (False, True), False)) \
            if numeric_x else False
        log_y = st.toggle("Log scale Y", **bound("vl_da_log_y", "log_y", (False, True), False))
        dither = st.toggle("Dither", help="Spread points that share a value, so overlaps show",
                           **bound("vl_da_dither", "dither", (True, False), True)) if mode == "points" else False
    if mode == "aggregate":
        table, total = _aggregated(view, _key(view), x, y, color, bins, log_x)
        if not total:
            st.info("The cohort holds no images.")
            return
        st.altair_chart(aggregate_chart(view, table, x, y, color, log_x=log_x, log_y=log_y), width="stretch")
        st.caption(f"{total:,} images, " + ("counted" if y == COUNT else f"mean {label(y).lower()}")
                   + (f" per bin of {label(x).lower()}" if is_numeric(infos[x]) else f" per {label(x).lower()}")
                   + (f", split by {label(color).lower()}." if color else "."))
        return
    shown, total = _sampled(view, _key(view), tuple(dict.fromkeys(["image_id", x, y, *([color] if color else [])])))
    if not total:
        st.info("The cohort holds no images.")
        return
    event = st.altair_chart(points_chart(view, shown, x, y, color, log_x=log_x, log_y=log_y, dither=dither),
                            key="vl_da_points", on_select="rerun", selection_mode="point", width="stretch")
    sampled = len(shown) < total
    st.caption((f"A random sample of **{len(shown):,}** of {total:,} images is drawn. " if sampled
                else f"All {total:,} images. ")
               + ("Dithered: points are moved a little so equal values spread out. " if dither else "")
               + "Click a point to open the image.")
    points = (event.selection.get("point") if event is not None and event.selection else None) or []
    if points and points[0].get("image_id") is not None and \
            points[0]["image_id"] != st.session_state.get("_vl_da_click"):
        st.session_state["_vl_da_click"] = points[0]["image_id"]
        open_image(int(points[0]["image_id"]))
        st.rerun()


def _first(view: View, infos: dict[str, ColumnInfo], numeric: bool = False) -> str:
    """A sensible first x axis: brightness if there, else the first numeric (or any) column."""
    for name in ("brightness", "score"):
        if name in infos:
            return name
    for name, info in infos.items():
        if is_numeric(info) or not numeric and not info.is_list:
            return name
    return next(iter(infos))


def _second(view: View, infos: dict[str, ColumnInfo], choices: list[str], x: str) -> int:
    for name in (COUNT, "score", "contrast", "sharpness"):
        if name in choices and name != x:
            return choices.index(name)
    return 0
