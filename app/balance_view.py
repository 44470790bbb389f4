"""Data balance of the current cohort: classes per metadata group and how unequal they are.

``render_balance(view)`` draws it (the Data analysis page calls it); the
measures come from ``core.balance``. The chosen feature, bins and reference
live in the URL (``balance.feature``, ``balance.bins``, ``balance.reference``).
"""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from core import balance as B
from core.errors import VisionLensError

from . import nav
from .state import View

PREFIX = "balance."
DEFAULT_BINS = 4
MAX_GAP_ROWS = 60
_KEY = "vl_bal_"


def features(view: View) -> dict[str, str]:
    """Image columns one can group by (metadata, not labels or model outputs): name → label."""
    out = {}
    for name, info in view.catalog.columns.items():
        if info.is_identifier or name == "true_label" or info.needs_model or info.is_list or info.values == "cast":
            continue
        out[name] = info.label
    user_first = sorted(out, key=lambda n: (view.catalog.columns[n].source != "user", out[n].lower()))
    return {name: out[name] for name in user_first}


def _choice(view: View, label: str, name: str, options: list, default, format_func=str):
    key = _KEY + name
    on_change = nav.bind_choice(view, key, PREFIX + name, options, default)
    return st.selectbox(label, options, key=key, format_func=format_func, on_change=on_change)


@st.cache_data(show_spinner="Measuring balance…", max_entries=64)
def _measures(_frame: pd.DataFrame, cohort_key: tuple, feature: str, classes: tuple[str, ...], bins: int,
              reference: str) -> dict:
    frame = _frame
    return {
        "distribution": B.class_distribution(frame, feature, classes, bins=bins),
        "groups": B.distribution_balance(frame, feature, classes, reference=reference, bins=bins),
        "whole": B.distribution_balance(frame, None, classes, reference="uniform"),
        "gaps": B.feature_balance(frame, feature, classes, bins=bins),
        "aggregate": B.aggregate_balance(frame, feature, bins=bins),
    }


def _share_chart(distribution: pd.DataFrame) -> alt.Chart:
    groups = [str(g) for g in distribution["group"].cat.categories if g in set(distribution["group"])]
    classes = [str(c) for c in distribution["class"].cat.categories]
    data = distribution.assign(group=distribution["group"].astype(str), **{"class": distribution["class"].astype(str)})
    return alt.Chart(data).mark_bar().encode(
        y=alt.Y("group:N", sort=groups, title=None),
        x=alt.X("images:Q", stack="normalize", title="Share of the group's class occurrences"),
        color=alt.Color("class:N", sort=classes, title="Class"),
        tooltip=[alt.Tooltip("group:N"), alt.Tooltip("class:N"), alt.Tooltip("images:Q", title="Images"),
                 alt.Tooltip("share:Q", format=".1%", title="Of the group's images"),
                 alt.Tooltip("overall_share:Q", format=".1%", title="Overall")],
    ).properties(height=max(40 + 28 * len(groups), 20 + 16 * len(classes)))  # room for the legend


def render_balance(view: View) -> None:
    """Class distribution per group of a feature, distribution and feature balance measures."""
    choices = features(view)
    if not choices:
        st.info("This store has no metadata columns to group images by.", icon=":material/info:")
        return
    controls = st.columns([2, 1, 1.4])
    with controls[0]:
        feature = _choice(view, "Group by", "feature", list(choices), next(iter(choices)), choices.get)
    with controls[1]:
        bins = _choice(view, "Bins (numbers)", "bins", [2, 3, 4, 5, 6, 8, 10], DEFAULT_BINS)
    with controls[2]:
        reference = _choice(view, "Compare each group with", "reference", list(B.REFERENCES), "uniform",
                            {"uniform": "Uniform classes", "overall": "The whole cohort"}.get)
    frame = view.rows(columns=["image_id", "true_label", feature])
    if frame.empty:
        st.info("The cohort holds no images.", icon=":material/info:")
        return
    try:
        sql, params = view.selection()
        key = (view.store_key, sql, tuple(map(str, params)))
        measures = _measures(frame, key, feature, tuple(view.classes), int(bins), reference)
    except VisionLensError as error:
        st.error(str(error))
        return
    whole = measures["whole"].iloc[0]
    aggregate = measures["aggregate"]
    cols = st.columns(4)
    cols[0].metric("Class imbalance", f"{whole['total_variation']:.3f}",
                   help="Total variation distance of the cohort's class distribution from uniform classes: "
                        "0 when every class occurs equally often.")
    cols[1].metric("Chi-square p-value vs uniform", f"{whole['chi_square_pvalue']:.3g}")
    cols[2].metric("Group sizes (Atkinson)", f"{aggregate['atkinson']:.3f}",
                   help="Atkinson index of the group sizes: 0 when every group holds as many images.")
    cols[3].metric("Theil T / L", f"{aggregate['theil_t']:.3f} / {aggregate['theil_l']:.3f}")
    st.subheader(f"Classes by {choices[feature]}")
    st.altair_chart(_share_chart(measures["distribution"]), width="stretch")
    st.subheader("Distribution balance")
    st.caption("How far each group's class distribution lies from "
               + ("uniform classes." if reference == "uniform" else "the cohort's own distribution."))
    groups = measures["groups"].rename(columns={"group": "Group", "images": "Images",
                                                "occurrences": "Class occurrences", **B.MEASURE_LABELS})
    st.dataframe(groups, hide_index=True, width="stretch",
                 column_config={label: st.column_config.NumberColumn(format="%.4f")
                                for label in B.MEASURE_LABELS.values()})
    st.subheader("Feature balance")
    st.caption("For each class, gaps between two groups of the share of images carrying it (statistical "
               "parity difference) and related association measures, largest first.")
    gaps = measures["gaps"]
    if gaps.empty:
        st.caption("Needs at least two groups.")
        return
    gaps = gaps.reindex(gaps["dp"].abs().sort_values(ascending=False).index).head(MAX_GAP_ROWS)
    gaps = gaps.drop(columns="feature").rename(columns={"class": "Class", "group_a": "Group A", "group_b": "Group B",
                                                        **B.MEASURE_LABELS})
    st.dataframe(gaps, hide_index=True, width="stretch",
                 column_config={label: st.column_config.NumberColumn(format="%.4f")
                                for label in B.MEASURE_LABELS.values()})
