"""Cohorts: every saved cohort with its size; create, rename, edit, duplicate, delete, import, export."""

import json

import streamlit as st

from app import cohort_bar, nav, require_view
from core.cohorts import Cohort
from core.errors import CohortError

view = require_view()
st.header("Cohorts")
flash = st.session_state.pop("vl_cohorts_flash", None)
if flash:
    st.success(flash)
saved = view.saved_cohorts()
st.caption(f"{len(saved)} saved cohort(s) in `{view.store.paths.state.name}`. "
           f"Sizes are for model `{view.model_id}` at the current thresholds. Select a row to manage it.")
chosen = cohort_bar.cohort_table(view, saved, key="vl_cohorts_table", opens=False)

own = Cohort(view.cohort.filters, view.cohort.groups)
with st.container(border=True):
    st.markdown("**Save the current filters**")
    if own.is_global:
        st.caption("The URL has no filters of its own; build one with **New** in the cohort bar.")
    else:
        st.caption("; ".join(view.describe(view.cohort)))
        with st.form("vl_create", border=False):
            name = st.text_input("Name", key="vl_create_name")
            if st.form_submit_button("Save as cohort", type="primary"):
                try:
                    created = view.state.create_cohort(name, view.cohort)
                except CohortError as error:
                    st.error(str(error))
                else:
                    nav.go(view, Cohort(parent_id=created.id))
                    st.rerun()

if chosen is not None:
    with st.container(border=True):
        st.markdown(f"**{chosen.name}** (#{chosen.id})")
        actions = st.container(horizontal=True)
        if actions.button("Open", icon=":material/open_in_new:", key="vl_cohort_open"):
            nav.go(view, Cohort(parent_id=chosen.id), page=None, image=None)
            st.rerun()
        if actions.button("Edit", icon=":material/edit:", key="vl_cohort_edit"):
            cohort_bar.open_builder(view, chosen.cohort(view.catalog), title=f"Edit '{chosen.name}'", target=chosen)
        if actions.button("Duplicate", icon=":material/content_copy:", key="vl_cohort_dup"):
            view.state.duplicate_cohort(chosen.id)
            st.rerun()
        if actions.button("Delete", icon=":material/delete:", key="vl_cohort_delete"):
            cohort_bar.confirm_delete(view, chosen)
        try:
            exported = json.dumps(view.state.export_rai(chosen.id, view.catalog), indent=2)
        except CohortError as error:
            actions.button("Export RAI JSON", disabled=True, help=str(error), key="vl_cohort_export_off")
        else:
            actions.download_button("Export RAI JSON", exported, file_name=f"{chosen.name}.json",
                                    mime="application/json", icon=":material/download:", key="vl_cohort_export")
        with st.form("vl_rename", border=False):
            new_name = st.text_input("New name", value=chosen.name, key=f"vl_rename_{chosen.id}")
            if st.form_submit_button("Rename"):
                try:
                    view.state.rename_cohort(chosen.id, new_name)
                except CohortError as error:
                    st.error(str(error))
                else:
                    st.rerun()

with st.expander("Import Azure RAI cohort JSON", icon=":material/upload:"):
    upload = st.file_uploader("Cohort JSON (one cohort or a list)", type=["json"], key="vl_import_file")
    if upload is not None and st.button("Import", key="vl_import"):
        try:
            imported = view.state.import_rai(upload.getvalue().decode("utf-8"), view.catalog)
        except (CohortError, ValueError) as error:
            st.error(f"{upload.name}: {error}")
        else:
            st.session_state["vl_cohorts_flash"] = "Imported " + ", ".join(f"'{c.name}'" for c in imported)
            st.rerun()
