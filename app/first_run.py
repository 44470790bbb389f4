"""The demo's background steps in the app: the first-run build and the explanation sample.

First run: Streamlit Community Cloud runs only ``streamlit run streamlit_app.py``, so
when the data folder holds no store the app builds the demo stores itself. The first
session to arrive starts ``visionlens demo --then-explain`` in a child process that holds
a lock file in the data folder until it ends (its memory goes back to the system before
the app opens a store); every session, in any browser, sees the lock and polls the
build's status file instead of starting another. A failed build shows its error, the end
of its log and a retry button. ``VISIONLENS_DEMO_ARGS`` adds ``visionlens demo`` options
to that build, e.g. ``--images 20 --train-scenes 100 --workers 1`` for a quick one.

Explanations: the home page says how many maps of the demo's explanation sample are
stored (counted in the stores against the plan the background step wrote), and polls
while that step runs.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import streamlit as st

from core import demo_jobs
from core.store import list_stores

from .state import View, data_folder, open_store

DEMO_ARGS_ENV = "VISIONLENS_DEMO_ARGS"
BUILD_POLL_S = 1.0
EXPLAIN_POLL_S = 2.0
LOG_TAIL_LINES = 25


def needed() -> bool:
    """Whether this run shows the first-run page: a demo build runs, or there is no store."""
    folder = data_folder()
    return demo_jobs.lock_held(folder / demo_jobs.BUILD_LOCK) or not list_stores(folder)


def render() -> None:
    """The first-run page: start the build unless one runs or failed; show its progress or error."""
    folder = data_folder()
    st.title("VisionLens")
    if not demo_jobs.lock_held(folder / demo_jobs.BUILD_LOCK):
        if list_stores(folder):
            st.rerun()  # a build ended between ``needed`` and here: open its stores
        status = demo_jobs.read_status(folder / demo_jobs.BUILD_STATUS)
        if status.state in ("failed", "running"):  # running, yet no lock: the process died
            _failure(folder, status)
            return
        if not _start(folder):
            return
    st.subheader("Building the demo stores")
    st.markdown(f"There is no dataset in `{folder}` yet, so VisionLens is building its three demo "
                "stores (multiclass, multilabel and object detection; two models each). "
                "The app opens on them when they are ready; other browsers see this same build.")
    _progress(folder)


def _start(folder: Path) -> bool:
    """Start the build; False (with the error shown) when it cannot start."""
    lock = demo_jobs.DemoLock(folder / demo_jobs.BUILD_LOCK)
    try:
        if not lock.acquire():
            return True  # another session started it a moment ago: show that one
        demo_jobs.start_build_process(folder, lock, shlex.split(os.environ.get(DEMO_ARGS_ENV, "")))
    except (OSError, ValueError) as error:
        st.error(f"The demo build could not start in `{folder}`: {error}", icon=":material/error:")
        return False
    finally:
        lock.release()
    return True


@st.fragment(run_every=BUILD_POLL_S)
def _progress(folder: Path) -> None:
    if not demo_jobs.lock_held(folder / demo_jobs.BUILD_LOCK):
        st.rerun()  # done (the app opens) or failed (the error shows)
    status = demo_jobs.read_status(folder / demo_jobs.BUILD_STATUS)
    stages = status.stages or {}
    doing = " · ".join(f"{task}: {stage}" for task, (stage, _, _) in stages.items()) or "starting…"
    st.progress(status.build_fraction(), text=f"{doing} ({status.elapsed:.0f} s)")


def _failure(folder: Path, status: demo_jobs.StepStatus) -> None:
    reason = status.error or "the build process stopped without saying why (was it out of memory?)"
    st.error(f"Building the demo stores in `{folder}` failed: {reason}", icon=":material/error:")
    log = _tail(folder / demo_jobs.BUILD_LOG)
    if log:
        with st.expander("End of the build log"):
            st.code(log, language=None)
    if st.button("Retry", icon=":material/refresh:", type="primary"):
        _start(folder)
        st.rerun()
    st.caption(f"Or build them yourself with `visionlens demo --out {folder}` and reload this page.")


def _tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- explanation sample


def explanation_status(view: View) -> None:
    """A line on the home page: stored maps of the demo's explanation sample, live while computing."""
    folder = data_folder()
    polling = demo_jobs.lock_held(folder / demo_jobs.EXPLAIN_LOCK)
    if not polling and demo_jobs.read_plan(folder) is None:
        status = demo_jobs.read_status(folder / demo_jobs.EXPLAIN_STATUS)
        if status.state == "failed":
            st.warning(f"Computing the demo's explanations failed: {status.error}", icon=":material/warning:")
        return
    st.fragment(_explanation_line, run_every=EXPLAIN_POLL_S if polling else None)(view, polling)


def _explanation_line(view: View, polling: bool) -> None:
    folder = data_folder()
    if polling and not demo_jobs.lock_held(folder / demo_jobs.EXPLAIN_LOCK):
        st.rerun()  # the background step ended: redraw without polling
    progress = demo_jobs.explanation_progress(folder, open_store)
    if progress is None:
        st.markdown(":material/auto_awesome: Explanations of the demo sample: planning…")
        return
    line = f":material/auto_awesome: Explanations of the demo sample: **{progress.done:,} of {progress.planned:,}** computed"
    if progress.running:
        line += " · computing in the background…"
    cols = st.columns([3, 1], vertical_alignment="center")
    cols[0].markdown(line)
    plan = demo_jobs.read_plan(folder) or {"stores": {}}
    spec = plan["stores"].get(view.store.name)
    if spec and spec["image_ids"]:
        # The sample is the store's first images: a cohort of image ids below their count.
        params = {**view.link_params(), "image_id__lt": str(len(spec["image_ids"]))}
        cols[1].page_link("pages/explorer.py", label="Explained images", icon=":material/photo_library:",
                          query_params=params)
    if progress.error:
        st.warning(f"Computing the explanations stopped: {progress.error}", icon=":material/warning:")
    if not progress.running and progress.done < progress.planned:
        if st.button("Compute the rest", icon=":material/play_arrow:", key="vl_demo_explain_resume"):
            demo_jobs.start_explaining(folder, plan.get("images", demo_jobs.EXPLAIN_IMAGES))
            st.rerun()
