"""Label review: likely label errors to triage, notes on saved cohorts, the embedding map (select → cohort),
near-duplicate pairs."""

import streamlit as st

from app import flyout, nav, require_view, review_views

view = require_view()
st.header("Label review")
if view.model_id is None:
    st.info("Label review needs a model's predictions; this store has none yet.", icon=":material/rule:")
    st.stop()
mode = nav.view_switch(view, {"labels": "Flagged labels", "cohorts": "Cohort notes", "map": "Embedding map",
                              "duplicates": "Near duplicates"})
if mode == "cohorts":
    review_views.cohort_notes(view)
elif mode == "map":
    review_views.embedding_map(view)
elif mode == "duplicates":
    review_views.near_duplicates(view)
else:
    review_views.flagged_labels(view)
flyout.show(view)
