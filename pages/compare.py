"""Compare models: a baseline and a candidate on every cohort, the images that changed, and the PDF scorecard."""

import streamlit as st

from app import compare_views, require_view
from core.errors import VisionLensError

view = require_view()
st.header("Compare models")
if len(view.catalog.models) < 2:
    st.info(f"Comparing needs two models; this store has {len(view.catalog.models)}. Add another model's "
            "predictions with `visionlens ingest --predictions FILE --out STORE`.", icon=":material/compare_arrows:")
    st.stop()
baseline, candidate = compare_views.pick_models(view)
left, right = st.columns([3, 1.4], vertical_alignment="bottom")
with left:
    cohorts = compare_views.choose_cohorts(view, "vl_cmp_cohorts", "Cohorts to compare",
                                           "Saved cohorts and the URL's cohort; all images always come first.")
try:
    result = compare_views.comparison(view, baseline, candidate, cohorts)
except VisionLensError as error:
    st.error(str(error), icon=":material/error:")
    st.stop()
with right:
    focus = compare_views.focus_cohort(view, result)
st.caption(f"Candidate **{candidate}** against baseline **{baseline}** at {compare_views.thresholds_text(view)}; "
           "green changes favour the candidate.")
compare_views.model_defined(cohorts, baseline)
compare_views.summary(result, focus)
compare_views.changed_images(view, result, focus)
# Only the open tab runs: the page opens on the metrics, the rest is drawn when asked for.
metrics_tab, compatibility_tab, scorecard_tab = st.tabs(
    ["Metrics per cohort", "Backward compatibility", "PDF scorecard"], key="vl_cmp_tab", on_change="rerun")
with metrics_tab:
    if metrics_tab.open:
        compare_views.show_metrics(result)
        st.subheader(f"Change per metric · {focus}")
        compare_views.delta_chart(result, focus)
        if result.objects is not None:
            st.subheader("Objects · all images")
            compare_views.show_objects(view, result)
with compatibility_tab:
    if compatibility_tab.open:
        compare_views.show_compatibility(result)
with scorecard_tab:
    if scorecard_tab.open:
        st.caption(f"A report on the candidate **{candidate}**, with this comparison against **{baseline}**.")
        compare_views.scorecard_panel(view, model_id=candidate, baseline=baseline,
                                      default_targets=result.overall.baseline)
