"""Altair chart builders shared by the PDF scorecard and the app.

Each builder takes a tidy DataFrame and returns an ``alt.Chart`` (no data is
fetched here). ``render_png`` turns a chart into PNG bytes with vl-convert, so
the scorecard needs no browser. Colours: the baseline is grey, the chosen
model blue; met / worse / better use one green and one red throughout.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

MODEL_BLUE = "#1f5fa8"
BASELINE_GREY = "#9aa3ad"
GOOD_GREEN = "#2e8540"
BAD_RED = "#c0392b"
INK = "#1d2733"
MUTED = "#5b6773"
# A list: vl-convert draws text only in a font it finds on the machine (no downloads).
FONT = "Helvetica, Arial, Liberation Sans, DejaVu Sans, sans-serif"


def _style(chart: alt.TopLevelMixin) -> alt.TopLevelMixin:
    """Quiet grids, one font, no border: reads well printed at small sizes."""
    return (chart.configure(font=FONT, background="white")
            .configure_view(stroke=None)
            .configure_axis(labelColor=MUTED, titleColor=INK, gridColor="#e6e9ed", domainColor="#c4cad1",
                            tickColor="#c4cad1", labelFontSize=11, titleFontSize=11, titleFontWeight="normal")
            .configure_legend(labelColor=INK, titleColor=INK, labelFontSize=11, titleFontSize=11,
                              orient="bottom")
            .configure_title(color=INK, fontSize=13, anchor="start", fontWeight="bold"))


def render_png(chart: alt.TopLevelMixin, *, scale: float = 2.0) -> bytes:
    """PNG bytes of a chart (vl-convert: no browser, no network)."""
    import vl_convert

    return vl_convert.vegalite_to_png(_style(chart).to_dict(), scale=scale)


def class_distribution(counts: pd.DataFrame, *, width: int = 480, top: int = 20,
                       title: str | None = "Images per class") -> alt.Chart:
    """Horizontal bars of images per class; ``counts`` has ``class`` and ``images``."""
    frame = counts.sort_values("images", ascending=False).head(top)
    return alt.Chart(frame, title=title or alt.Undefined).mark_bar(color=MODEL_BLUE).encode(
        x=alt.X("images:Q", title="images"),
        y=alt.Y("class:N", sort="-x", title=None),
        tooltip=["class:N", "images:Q"],
    ).properties(width=width, height=max(60, 16 * len(frame)))


def histogram(bins: pd.DataFrame, title: str, *, width: int = 220, height: int = 110) -> alt.Chart:
    """Distribution of one numeric column from pre-computed bins (``start``, ``end``, ``images``).

    Binning happens before charting (``histogram_bins``) so a chart of a
    million images carries a few dozen rows, not the values.
    """
    return alt.Chart(bins, title=title).mark_bar(color=MODEL_BLUE, opacity=0.85, binSpacing=0).encode(
        x=alt.X("start:Q", bin="binned", title=None),
        x2="end:Q",
        y=alt.Y("images:Q", title="images"),
        tooltip=[alt.Tooltip("start:Q", format=".3g"), alt.Tooltip("end:Q", format=".3g"), "images:Q"],
    ).properties(width=width, height=height)


def histogram_bins(values, bins: int = 20) -> pd.DataFrame:
    """Equal-width bins of the finite values: ``start``, ``end``, ``images``."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return pd.DataFrame({"start": [], "end": [], "images": []})
    counts, edges = np.histogram(values, bins=bins)
    return pd.DataFrame({"start": edges[:-1], "end": edges[1:], "images": counts})


def category_bars(counts: pd.DataFrame, title: str, *, width: int = 220, height: int = 110,
                  top: int = 8) -> alt.Chart:
    """Images per value of one categorical column (``value``, ``images``), in the given order.

    Only the ``top`` most frequent values are drawn, keeping their order.
    """
    frame = counts[counts["images"].rank(method="first", ascending=False) <= top]
    return alt.Chart(frame, title=title).mark_bar(color=MODEL_BLUE, opacity=0.85).encode(
        x=alt.X("images:Q", title="images"),
        y=alt.Y("value:N", sort=None, title=None),
    ).properties(width=width, height=height)


def metric_by_group(frame: pd.DataFrame, metric: str, *, group_title: str = "cohort", width: int = 420,
                    target: float | None = None) -> alt.LayerChart | alt.Chart:
    """One metric per group (cohort or feature value), grouped by model when ``model`` is a column.

    ``frame`` has ``group``, ``value`` and optionally ``model``; a dashed
    rule marks the target when one is set.
    """
    has_model = "model" in frame.columns and frame["model"].nunique() > 1
    bars = alt.Chart(frame).mark_bar().encode(
        x=alt.X("value:Q", title=metric, scale=alt.Scale(domainMin=0)),
        y=alt.Y("group:N", sort=None, title=group_title),
        tooltip=["group:N", alt.Tooltip("value:Q", format=".4f")] + (["model:N"] if has_model else []),
    )
    if has_model:
        models = list(dict.fromkeys(frame["model"]))
        palette = [BASELINE_GREY, MODEL_BLUE] if len(models) == 2 else None
        bars = bars.encode(
            color=alt.Color("model:N", sort=models, title="model",
                            scale=alt.Scale(domain=models, range=palette) if palette else alt.Undefined),
            yOffset=alt.YOffset("model:N", sort=models),
        )
    else:
        bars = bars.encode(color=alt.value(MODEL_BLUE))
    labels = bars.mark_text(align="left", dx=3, fontSize=10, color=INK).encode(
        text=alt.Text("value:Q", format=".3f"), color=alt.value(INK))
    layers = [bars, labels]
    if target is not None:
        layers.append(alt.Chart(pd.DataFrame({"target": [target]})).mark_rule(
            color=BAD_RED, strokeDash=[4, 3]).encode(x="target:Q"))
    n_rows = frame["group"].nunique() * (frame["model"].nunique() if has_model else 1)
    return alt.layer(*layers).properties(width=width, height=max(50, 18 * n_rows))


def slice_error_rates(slices: pd.DataFrame, overall_error: float, *, width: int = 420) -> alt.LayerChart:
    """Error rate of each slice (``description``, ``error_rate``, ``size``) against the overall rate."""
    bars = alt.Chart(slices).mark_bar(color=BAD_RED, opacity=0.85).encode(
        x=alt.X("error_rate:Q", title="error rate", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("description:N", sort=None, title=None, axis=alt.Axis(labelLimit=260)),
        tooltip=["description:N", "size:Q", alt.Tooltip("error_rate:Q", format=".1%")],
    )
    rule = alt.Chart(pd.DataFrame({"overall": [overall_error]})).mark_rule(
        color=INK, strokeDash=[4, 3]).encode(x="overall:Q")
    return alt.layer(bars, rule).properties(width=width, height=max(50, 20 * len(slices)))


def metric_deltas(frame: pd.DataFrame, *, width: int = 420) -> alt.Chart:
    """Candidate − baseline per metric and cohort (``label``, ``delta``, ``better`` bool)."""
    return alt.Chart(frame).mark_bar().encode(
        x=alt.X("delta:Q", title="candidate − baseline"),
        y=alt.Y("label:N", sort=None, title=None, axis=alt.Axis(labelLimit=260)),
        color=alt.condition("datum.better", alt.value(GOOD_GREEN), alt.value(BAD_RED)),
        tooltip=["label:N", alt.Tooltip("delta:Q", format="+.4f")],
    ).properties(width=width, height=max(50, 18 * len(frame)))
