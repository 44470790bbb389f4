"""Data analysis: the cohort as a paged table, or charted by any two of metadata, labels, predictions, outcome."""

import streamlit as st

from app import balance_view, data_views, explorer, flyout, nav, require_view

view = require_view()
st.header("Data analysis")
mode = nav.view_switch(view, {"chart": "Chart view", "table": "Table view", "balance": "Data balance"})
if mode == "table":
    explorer.table_view(view)
elif mode == "balance":
    balance_view.render_balance(view)
else:
    data_views.chart_view(view)
flyout.show(view)
