"""VisionLens app entry point: load the URL's view, draw the shell, route to the page.

Run with ``streamlit run streamlit_app.py`` (``make run``). Pages live in
``pages/``; the helpers they use are documented in ``app/__init__.py``. With no
store in the data folder, the app builds the demo stores first (``app/first_run.py``).
"""

import streamlit as st

from app import cohort_bar, first_run, nav, state

nav.freeze_imports()
st.set_page_config(page_title="VisionLens", page_icon=nav.app_icon(), layout="wide")

if first_run.needed():
    st.navigation([st.Page(first_run.render, title="VisionLens", default=True)], position="hidden").run()
    st.stop()

loaded = state.load_view()
try:
    page = nav.navigation(loaded.view)
    nav.sidebar(loaded)
    nav.show_problems(loaded)
    if loaded.view is not None:
        cohort_bar.render(loaded.view)
    page.run()
finally:
    state.end_run()
