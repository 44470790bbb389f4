"""Model overview: the model's metrics across cohorts and feature groups, and the charts behind them."""

import streamlit as st

from app import flyout, nav, overview, require_view

view = require_view()
st.header("Model overview")
mode = nav.view_switch(view, {"cohorts": "Dataset cohorts", "features": "Feature cohorts"})
cohorts = overview.named_cohorts(view)
if mode == "features":
    overview.feature_cohorts_view(view)
else:
    overview.dataset_cohorts_view(view, cohorts)
st.subheader("Visualisations")
overview.visualisations(view, cohorts)
flyout.show(view)
