"""Error analysis: where the model fails, as a decision tree or a heat map over metadata.

Any node or cell becomes the URL's cohort, so every other page follows it.
"""

import streamlit as st

from app import error_views, flyout, nav, require_view

view = require_view()
st.header("Error analysis")
mode = nav.view_switch(view, {"tree": "Tree map", "heatmap": "Heat map"})
choice = error_views.choose(view)
if mode == "heatmap":
    error_views.heatmap_view(view, choice)
else:
    error_views.tree_view(view, choice)
flyout.show(view)
