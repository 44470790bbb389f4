"""Data explorer: the cohort's images as a grid split by outcome, a table, or per class."""

import streamlit as st

from app import explorer, flyout, nav, require_view

view = require_view()
st.header("Data explorer")
mode = nav.view_switch(view, {"grid": "Image grid", "table": "Table", "classes": "Class view"})
if mode == "table":
    explorer.table_view(view)
elif mode == "classes":
    explorer.class_view(view)
else:
    explorer.grid_view(view)
flyout.show(view)
