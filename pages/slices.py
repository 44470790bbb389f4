"""Error slices: metadata conditions under which the model errs most (SliceLine), each one click from the explorer."""

import streamlit as st

from app import compare_views, nav, require_view
from core.errors import VisionLensError
from core.slices import MIN_LIFT

TOP_K = (5, 10, 20, 50)  # slices shown; 10 is core.slices' default
ORDERS = (1, 2, 3)  # conditions per slice at most; 3 is core.slices' default

view = require_view()
st.header("Error slices")
if view.model_id is None:
    st.info("Error slices need a model's predictions; this store has none yet.", icon=":material/view_quilt:")
    st.stop()
compare_views.slice_flash(view)
rate, errors, evaluated = compare_views.cohort_error_rate(view)
left, middle, right = st.columns([1, 1.4, 3.6], vertical_alignment="bottom")
top_k = left.selectbox("Slices", TOP_K, key="vl_slices_top_k",
                       on_change=nav.bind_choice(view, "vl_slices_top_k", "slices.top", TOP_K, 10))
max_order = middle.segmented_control("Conditions per slice", ORDERS, key="vl_slices_order", required=True,
                                     format_func=lambda k: f"up to {k}",
                                     on_change=nav.bind_choice(view, "vl_slices_order", "slices.order", ORDERS, 3))
try:
    slices = compare_views.error_slices(view, top_k=top_k, max_order=max_order)
except VisionLensError as error:
    st.error(str(error), icon=":material/error:")
    st.stop()
right.caption(f"Model **{view.model_id}** at {compare_views.thresholds_text(view)}: **{errors:,}** errors in "
              f"{evaluated:,} images" + ("" if view.cohort.is_global else " of the cohort")
              + (f" ({rate:.1%})" if rate is not None else "") + ". Slices are searched within the cohort and "
              "ranked by SliceLine's score, which weighs how far a slice's error rate exceeds the cohort's against "
              f"how small the slice is; a slice is listed when its rate is at least {MIN_LIFT:g}× the cohort's.")
if not slices:
    st.info("No slice stands out: the model's errors are spread evenly over the metadata, or too few images err.",
            icon=":material/check_circle:")
    st.stop()
compare_views.slice_rows(view, slices, rate)
st.subheader("Error rate per slice")
st.caption("The dashed line is the cohort's error rate.")
compare_views.slice_chart(slices, rate)
