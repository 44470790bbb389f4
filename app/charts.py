"""Shared Altair charts, drawn with the app's colours (no external fonts or data URLs).

Give a chart's height to ``st.altair_chart(chart, height=...)`` (or
``st.vega_lite_chart``), not to ``chart.properties(height=...)``: with Streamlit's
theme (1.67) a fixed height in the spec squeezes the plot to a few pixels.
"""

from __future__ import annotations

from typing import Sequence

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

# Okabe-Ito, as core.heatmap draws boxes: distinguishable with colour-vision deficiencies.
OUTCOME_COLORS = {"correct": "#009E73", "incorrect": "#D55E00", "missed": "#0072B2", "other": "#9aa3b5"}


def probability_frame(probs: Sequence[float], classes: Sequence[str], *, truth: Sequence[int] = (),
                      predicted: Sequence[int] = (), top: int = 10) -> pd.DataFrame:
    """The ``top`` most probable classes (plus any true class outside them) with their status:
    ``correct`` (predicted and true), ``incorrect`` (predicted, not true), ``missed`` (true, not
    predicted) or ``other``."""
    values = np.asarray(probs, dtype=float)
    order = np.argsort(-values, kind="stable")[:top]
    truth_set, predicted_set = set(int(t) for t in truth), set(int(p) for p in predicted)
    # A true class outside the top is appended so a miss is always visible.
    extra = [t for t in sorted(truth_set) if t not in set(order.tolist()) and t < len(values)]
    order = np.concatenate([order, np.asarray(extra, dtype=int)]).astype(int)

    def status(k: int) -> str:
        if k in predicted_set:
            return "correct" if k in truth_set else "incorrect"
        return "missed" if k in truth_set else "other"

    return pd.DataFrame({
        "class": [classes[k] if k < len(classes) else str(k) for k in order],
        "probability": values[order],
        "status": [status(int(k)) for k in order],
        "true": ["yes" if int(k) in truth_set else "" for k in order],
    })


def probability_bars(frame: pd.DataFrame, *, threshold: float | None = None) -> alt.Chart:
    """Horizontal bars of a ``probability_frame``, coloured by status; ``threshold`` draws the
    multilabel decision line. Height: ``bars_height(len(frame))``."""
    scale = alt.Scale(domain=list(OUTCOME_COLORS), range=list(OUTCOME_COLORS.values()))
    bars = alt.Chart(frame).mark_bar().encode(
        x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), title="Probability"),
        y=alt.Y("class:N", sort=None, title=None),
        color=alt.Color("status:N", scale=scale, legend=alt.Legend(orient="bottom", title=None)),
        tooltip=[alt.Tooltip("class:N"), alt.Tooltip("probability:Q", format=".4f"), alt.Tooltip("true:N")],
    )
    if threshold is None:
        return bars
    rule = alt.Chart(pd.DataFrame({"threshold": [threshold]})).mark_rule(strokeDash=[4, 3]).encode(
        x="threshold:Q", tooltip=[alt.Tooltip("threshold:Q", format=".2f")])
    return bars + rule


@st.cache_data(show_spinner=False, max_entries=256)
def probability_spec(frame: pd.DataFrame, threshold: float | None = None) -> dict:
    """``probability_bars`` as a Vega-Lite spec for ``st.vega_lite_chart``, built once per frame:
    building it through Altair costs more than the rest of the flyout's run."""
    return probability_bars(frame, threshold=threshold).to_dict()


def bars_height(n_bars: int) -> int:
    """Pixels for a horizontal bar chart of ``n_bars`` bars with its axis and a legend below."""
    return 100 + 28 * n_bars
