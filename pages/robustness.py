"""Robustness: the model's metric against perturbation strength, one line per cohort, with flip rates.

Sweeps come from ``visionlens robustness`` (or the button below, for the current
cohort); everything shown is read from the stored ``robustness`` parts. The
perturbation, metric and target live in the URL (``robustness.perturbation``,
``robustness.metric``, ``robustness.target``).
"""

import altair as alt
import pandas as pd
import streamlit as st

from app import explorer, flyout, nav, overview, require_view, urlsync
from core import perturbation_kinds as P
from core import robustness as R
from core.cohorts import format_number, to_query
from core.errors import VisionLensError

PREFIX = "robustness."


def bound_choice(view, label: str, name: str, options: list, default, format_func=str):
    key = f"vl_rb_{name}"
    on_change = nav.bind_choice(view, key, PREFIX + name, options, default)
    return st.selectbox(label, options, key=key, format_func=format_func, on_change=on_change)


@st.cache_data(show_spinner="Reading the sweep…", max_entries=64)
def curves(_store, store_key: tuple, model_id: str, perturbation: str, selections: tuple, thresholds: tuple):
    cohorts = {name: (sql, list(params)) for name, sql, params in selections}
    return R.robustness_curves(_store, model_id, perturbation, cohorts, **dict(thresholds))


def run_here(view, kinds: list[str]) -> None:
    """Sweep the current cohort from the page (resumable; the CLI does the same for any cohort)."""
    with st.expander("Run a sweep on the current cohort"):
        cols = st.columns([1, 2, 1], vertical_alignment="bottom")
        kind = cols[0].selectbox("Perturbation", kinds, format_func=lambda k: P.KINDS[k].label, key="vl_rb_run_kind")
        levels = cols[1].text_input("Strengths", ", ".join(format_number(v) for v in P.KINDS[kind].levels),
                                    key=f"vl_rb_run_levels_{kind}", help=f"{P.KINDS[kind].label}: {P.KINDS[kind].unit}")
        query = to_query(view.cohort)
        st.caption(f"{view.count():,} images; the same as `visionlens robustness {view.store.paths.base} "
                   f"--perturb {kind} --levels {levels.replace(' ', '')}"
                   + (f" --cohort '{query}'" if query else "") + f" --model {view.model_id}`")
        if cols[2].button("Run", icon=":material/play_arrow:", key="vl_rb_run"):
            from core.rerun import run_sweep  # torch: only once a sweep runs

            bar = st.progress(0.0, text="Sweeping…")

            def progress(done: int, total: int) -> None:
                bar.progress(done / max(total, 1), text=f"{done}/{total} images")
            try:
                run_sweep(view.store.paths.base, kind, R.parse_levels(levels), model_id=view.model_id,
                          cohorts=[query] if query else [], progress=progress)
            except VisionLensError as error:
                st.error(str(error))
                return
            view.store.refresh()
            urlsync.update({PREFIX + "perturbation": kind})
            st.rerun()


view = require_view()
st.header("Robustness")
if view.model_id is None or not view.model_params().get("loader"):
    st.info("Robustness needs a model the store can re-run (ingested with `--model module:function`).",
            icon=":material/info:")
    st.stop()
stored = R.swept(view.store, view.model_id)
kinds = [k for k in P.KINDS if k in set(stored["perturbation"])]
run_here(view, list(P.KINDS))
if not kinds:
    st.info(f"No sweep stored for model `{view.model_id}` yet. Run one above or with "
            f"`visionlens robustness {view.store.paths.base} --perturb blur`.", icon=":material/info:")
    flyout.show(view)
    st.stop()

cols = st.columns([1.2, 1.2, 1])
with cols[0]:
    kind = bound_choice(view, "Perturbation", "perturbation", kinds, kinds[0], lambda k: P.KINDS[k].label)
with cols[1]:
    metric = bound_choice(view, "Metric", "metric", list(R.METRICS[view.task]), R.METRICS[view.task][0],
                          R.METRIC_LABELS.get)
cohorts = overview.named_cohorts(view)
selections = tuple((c.name, sql, tuple(params)) for c in cohorts for sql, params in [view.selection(c.cohort)])
frame = curves(view.store, view.store_key, view.model_id, kind, selections, tuple(sorted(view.thresholds.items())))
if frame.empty:
    st.info("The stored sweep covers none of these cohorts' images.", icon=":material/info:")
    st.stop()
start = frame[frame["level"] == 0]
default_target = round(0.9 * float(start[metric].max()), 2) if len(start) else 0.5
with cols[2]:
    try:
        target_default = min(max(float(nav.page_param(PREFIX + "target")), 0.0), 1.0)
    except (TypeError, ValueError):  # absent or not a number: the default
        target_default = default_target
    urlsync.bind("vl_rb_target", target_default)
    target = st.number_input("Target", 0.0, 1.0, step=0.01, key="vl_rb_target",
                             help="The strength at which each cohort falls below this is listed below.",
                             on_change=urlsync.write_on_change("vl_rb_target", PREFIX + "target",
                                                               lambda v: format_number(round(float(v), 4))))

unit = f"{P.KINDS[kind].label} ({P.KINDS[kind].unit})"
base = alt.Chart(frame).encode(x=alt.X("level:Q", title=unit), color=alt.Color("cohort:N", sort=None, title=None))
metric_chart = base.mark_line(point=True).encode(
    y=alt.Y(f"{metric}:Q", title=R.METRIC_LABELS[metric], scale=alt.Scale(domain=[0, 1])),
    tooltip=["cohort", "level", alt.Tooltip(f"{metric}:Q", format=".4f"), "images"])
rule = alt.Chart(pd.DataFrame({"target": [target]})).mark_rule(strokeDash=[5, 4]).encode(y="target:Q")
flip_chart = base.mark_line(point=True).encode(
    y=alt.Y("flip_rate:Q", title="Predictions changed", axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1])),
    tooltip=["cohort", "level", alt.Tooltip("flip_rate:Q", format=".1%"), "images"])
left, right = st.columns(2)
left.altair_chart((metric_chart + rule).properties(height=320), width="stretch")
right.altair_chart(flip_chart.properties(height=320), width="stretch")

points = R.breaking_points(frame, metric, target).set_index("cohort")["strength"]
summary = frame.groupby("cohort", sort=False).agg(images=("images", "max"), levels=("level", "count")).reset_index()
summary["Below target from"] = [
    "never (in the swept range)" if pd.isna(points[c]) else "already" if points[c] == 0 else f"{points[c]:.3g}"
    for c in summary["cohort"]]
summary["Unperturbed"] = summary["cohort"].map(start.set_index("cohort")[metric])
st.dataframe(summary.rename(columns={"cohort": "Cohort", "images": "Images swept", "levels": "Levels"}),
             hide_index=True, width="stretch",
             column_config={"Unperturbed": st.column_config.NumberColumn(format="%.4f")})

flips = R.counterfactuals(view.store, view.model_id)
columns = [c for c in flips.columns if c.startswith(f"flip_{kind}")]
if columns:
    st.subheader("Most fragile images")
    sql, params = view.selection()
    in_cohort = set(view.query(f"SELECT image_id FROM ({sql}) AS s", params)["image_id"].tolist())
    fragile = flips[flips["image_id"].isin(in_cohort)][["image_id", *columns]].dropna(how="all", subset=columns)
    fragile = fragile.sort_values(columns[0]).head(50)
    if fragile.empty:
        st.caption(f"No image of the cohort changes its prediction within the searched {unit} range.")
    else:
        st.caption("The smallest strength that changes each image's prediction (bisection); pick one to open it.")
        directions = {c: c.removeprefix(f"flip_{kind}").strip("_") for c in columns}  # "", "up" or "down"
        labels = {c: "Flip strength" + (f" ({d})" if d else "") for c, d in directions.items()}
        picked = st.dataframe(fragile.rename(columns={"image_id": "Image", **labels}), hide_index=True,
                              width="stretch", on_select="rerun", selection_mode="single-row", key="vl_rb_fragile")
        if picked.selection.rows:
            explorer.open_image(int(fragile["image_id"].iloc[picked.selection.rows[0]]))
            st.rerun()
flyout.show(view)
