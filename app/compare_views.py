"""Model comparison, the PDF scorecard and error slices: what ``pages/compare.py`` and ``pages/slices.py`` draw.

The numbers come from ``core.compare``, ``core.report`` and ``core.slices``;
this module picks the models and cohorts from the view, caches the engine's
results on the store's signature, and draws them.

The URL holds both models of a comparison: ``model`` is the **baseline** (the
model every other page shows, so a cohort means the same images here as
there) and the page parameter ``compare.candidate`` the **candidate**; both
are always written, so a copied URL keeps its pair when models are added. A
link to a changed-image set opens the explorer with the model whose errors
the set is about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import altair as alt
import pandas as pd
import streamlit as st

from core.cohorts import Cohort, ViewState, parse_query, to_query
from core.compare import (LOWER_IS_BETTER, ComparisonResult, ImageSet, compare_models, image_set_query,
                          metric_names)
from core.errors import CohortError, VisionLensError
from core.report import PRIMARY_METRICS, metric_label, pdf_bytes, scorecard
from core.report_charts import metric_deltas, slice_error_rates
from core.slices import Slice, find_slices

from . import nav, urlsync
from .overview import NamedCohort, current_cohort_name, detection_evaluation, metric_specs, named_cohorts
from .state import View, is_page_param

EXPLORER = "pages/explorer.py"
PARAM = "compare."  # this page's URL parameters: compare.candidate
CANDIDATE = PARAM + "candidate"
GOOD = ("#e3f1e6", "#1e6b34")  # background, text
BAD = ("#fbe4e1", "#a3281b")
_BASELINE_KEY, _CANDIDATE_KEY = "vl_cmp_baseline", "vl_cmp_candidate"


# --------------------------------------------------------------------------- labels


def label(task: str, metric: str) -> str:
    """The metric's name as the model overview shows it."""
    spec = metric_specs(task).get(metric)
    return spec.label if spec is not None else metric_label(metric)


def _images(count: int) -> str:
    return f"{count:,} image" + ("" if count == 1 else "s")


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def thresholds_text(view: View) -> str:
    if view.task == "detection":
        return f"IoU {view.iou:g}, score ≥ {view.score_threshold:g}"
    if view.task == "multilabel":
        return f"label threshold {view.label_threshold:g}"
    return "top-1 prediction"


# --------------------------------------------------------------------------- the two models


def model_pair(models: Sequence[str], baseline: str, wanted: str | None) -> tuple[str, str]:
    """Baseline and candidate: the URL's candidate when it names another model, else the first other one."""
    others = [m for m in models if m != baseline]
    return baseline, wanted if wanted in others else others[0]


def _pick(key: str, this: str, other: str, current: dict[str, str]) -> None:
    """A picker's callback: choosing the other role's model swaps the two."""
    chosen = st.session_state[key]
    changes = {this: chosen}
    if chosen == current[other]:
        changes[other] = current[this]
    urlsync.update(changes)


def _swap(baseline: str, candidate: str) -> None:
    urlsync.update({"model": candidate, CANDIDATE: baseline})


def pick_models(view: View) -> tuple[str, str]:
    """Baseline and candidate pickers bound to the URL (``model`` and ``compare.candidate``); returns the pair."""
    wanted = nav.page_param(CANDIDATE)
    baseline, candidate = model_pair(view.catalog.models, view.model_id, wanted)
    if wanted != candidate:
        urlsync.update({CANDIDATE: candidate})  # the URL always names both models
    current = {"model": baseline, CANDIDATE: candidate}
    urlsync.bind(_BASELINE_KEY, baseline)
    urlsync.bind(_CANDIDATE_KEY, candidate)
    models = list(view.catalog.models)
    left, middle, right = st.columns([5, 1, 5], vertical_alignment="bottom")
    left.selectbox("Baseline", models, key=_BASELINE_KEY, on_change=_pick,
                   args=(_BASELINE_KEY, "model", CANDIDATE, current),
                   help="The model in use today (the sidebar's model: cohorts mean the same images on every page).")
    middle.button("", icon=":material/swap_horiz:", key="vl_cmp_swap", help="Swap baseline and candidate",
                  on_click=_swap, args=(baseline, candidate), width="stretch")
    right.selectbox("Candidate", models, key=_CANDIDATE_KEY, on_change=_pick,
                    args=(_CANDIDATE_KEY, CANDIDATE, "model", current), help="The model that would replace it.")
    return baseline, candidate


# --------------------------------------------------------------------------- cohorts


@dataclass(frozen=True)
class CohortChoice:
    """A cohort to compare or report on: its name, URL query, and its compiled selection (the cache key)."""

    name: str
    query: str
    selection: tuple
    reads_model: bool = False  # filters on model outputs: its images are those the sidebar's model puts there


def model_defined(cohorts: Sequence[CohortChoice], model_id: str) -> None:
    """Says which chosen cohorts hold images by a model's outputs, and whose: the same name on the model
    overview of another model holds other images."""
    names = [c.name for c in cohorts if c.reads_model]
    if names:
        st.caption(f"{', '.join(names)} filter on model outputs (outcome, errors, predictions): both models are "
                   f"compared on the images that **{model_id}**'s outputs put there.")


def cohort_choices(view: View, entries: Sequence[NamedCohort]) -> tuple[list[CohortChoice], list[str]]:
    """The usable cohorts of ``entries`` (the global one left out: the engine always adds it) and the
    problems of the others. Queries carry the view's model, so model columns read as on other pages."""
    usable, problems = [], []
    for entry in entries:
        if entry.cohort.is_global:
            continue
        try:
            selection = view.selection(entry.cohort)
        except CohortError as error:
            problems.append(f"{entry.name}: {error}")
            continue
        query = to_query(entry.cohort, ViewState(model=view.model_id))
        usable.append(CohortChoice(entry.name, query, (selection[0], tuple(selection[1])),
                                   selection.reads_model(view.catalog)))
    return usable, problems


def choose_cohorts(view: View, key: str, label_text: str, help_text: str) -> list[CohortChoice]:
    """A multiselect of the saved cohorts and the URL's cohort (all chosen at first)."""
    choices, problems = cohort_choices(view, named_cohorts(view))
    for problem in problems:
        st.warning(f"Left out: {problem}", icon=":material/warning:")
    by_name = {c.name: c for c in choices}
    key = f"{key}_{view.store.name}"
    if key not in st.session_state:
        st.session_state[key] = list(by_name)
    elif any(n not in by_name for n in st.session_state[key]):  # a deleted or renamed cohort leaves the choice
        st.session_state[key] = [n for n in st.session_state[key] if n in by_name]
    picked = st.multiselect(label_text, list(by_name), key=key, help=help_text, placeholder="Only all images")
    return [by_name[n] for n in picked]


# --------------------------------------------------------------------------- the comparison


@st.cache_data(show_spinner="Comparing the models…", max_entries=32)
def _comparison(_store, _state, store_key: tuple, baseline: str, candidate: str, cohorts: tuple,
                thresholds: tuple) -> ComparisonResult:
    # ``cohorts`` holds (name, query, selection): the selection changes when a saved cohort is edited.
    # Detection metrics come from the cohorts' evaluations the model overview keeps: a new IoU or
    # score threshold re-reads only the counts at it.
    return compare_models(_store, baseline, candidate, cohorts=[(n, q) for n, q, _ in cohorts], state=_state,
                          links=False, evaluate=lambda model_id, selection: detection_evaluation(
                              _store, store_key, model_id, selection), **dict(thresholds))


def comparison(view: View, baseline: str, candidate: str, cohorts: Sequence[CohortChoice]) -> ComparisonResult:
    """``core.compare.compare_models`` for the view's thresholds, cached until the store changes.

    Image sets are linked only when opened (``open_image_set``), so comparing saves no cohort.
    """
    return _comparison(view.store, view.state, view.store_key, baseline, candidate,
                       tuple((c.name, c.query, c.selection) for c in cohorts), tuple(sorted(view.thresholds.items())))


def focus_cohort(view: View, result: ComparisonResult) -> str:
    """The cohort the headline cards, changed images and delta chart are about (the URL's cohort at first)."""
    names = [c.name for c in result.cohorts]
    current = current_cohort_name(view, named_cohorts(view))
    key = f"vl_cmp_focus_{view.store.name}"
    urlsync.bind(key, current if current in names else names[0])
    if st.session_state[key] not in names:
        st.session_state[key] = names[0]
    return st.selectbox("Focus cohort", names, key=key, help="The cohort the cards, the changed images and the "
                        "chart below are about.")


def summary(result: ComparisonResult, focus: str) -> None:
    """Headline cards for one cohort: the two primary metrics with their change, BTC and BEC."""
    row = next(c for c in result.cohorts if c.name == focus)
    cols = st.columns(4)
    for col, metric in zip(cols, PRIMARY_METRICS[result.task][:2]):
        value, delta = row.candidate.get(metric), row.delta.get(metric)
        before = row.baseline.get(metric)
        col.metric(f"{label(result.task, metric)}, candidate", "n/a" if value is None else f"{value:.4f}",
                   None if delta is None else f"{delta:+.4f}",
                   delta_color="inverse" if metric in LOWER_IS_BETTER else "normal", border=True,
                   delta_description=None if before is None else f"baseline {before:.4f}",
                   help="The candidate's value; the change is candidate − baseline.")
    cols[2].metric("Backward trust compatibility", _share(row.btc), border=True,
                   help="Of the images the baseline gets right, the share the candidate also gets right. "
                        "100% means no user who trusted the baseline's answer is let down.")
    cols[3].metric("Backward error compatibility", _share(row.bec), border=True,
                   help="Of the candidate's errors, the share the baseline made too. 100% means every remaining "
                        "error is one users already know.")


def _set_cards(result: ComparisonResult, focus: str) -> list[tuple[ImageSet, str, str, str]]:
    """(set, title, what it holds, model to open it with) for the focus cohort."""
    row = next(c for c in result.cohorts if c.name == focus)
    b, c = result.baseline, result.candidate
    return [
        (row.new_errors, "New errors", f"right by {b}, wrong by {c}", c),
        (row.fixed_errors, "Fixed errors", f"wrong by {b}, right by {c}", b),
        (row.disagreements, "Disagreements",
         "where the two models' detections differ" if result.task == "detection"
         else "the two models predict differently", c),
    ]


def open_image_set(view: View, image_set: ImageSet, model_id: str) -> None:
    """Open the explorer on exactly ``image_set`` (a short id list, or a cohort saved for a long one)."""
    query = image_set_query(view.store, image_set.image_ids, image_set.name, state=view.state)
    cohort = parse_query(query, view.catalog).cohort
    target = view.url_params(cohort, model=model_id, view=None, page=None, image=None)
    st.switch_page(EXPLORER, query_params={k: v for k, v in target.items() if not is_page_param(k)})


def changed_images(view: View, result: ComparisonResult, focus: str) -> None:
    """New errors, fixed errors and disagreements of the focus cohort, each one click from the explorer."""
    cols = st.columns(3)
    for col, (image_set, title, words, model_id) in zip(cols, _set_cards(result, focus)):
        slug = title.lower().replace(" ", "_")
        with col.container(border=True, key=f"vl_cmp_set_{slug}"):
            st.markdown(f"**{title}** · {_images(image_set.count)}")
            st.caption(f"Images {words}.")
            if st.button(f"Open {title.lower()}", key=f"vl_cmp_open_{slug}", icon=":material/photo_library:",
                         disabled=not image_set.count, width="stretch",
                         help=f"The data explorer on these images, showing {model_id}'s predictions"):
                open_image_set(view, image_set, model_id)


def _delta_style(better: pd.Series) -> list[str]:
    def css(flag: object) -> str:
        if pd.isna(flag):
            return ""
        background, text = GOOD if flag else BAD
        return f"background-color: {background}; color: {text}; font-weight: 600"
    return [css(flag) for flag in better]


def unchanged_as_none(frame: pd.DataFrame) -> pd.DataFrame:
    """``metrics_frame`` with ``better`` None where nothing changed (no colour for an unchanged metric)."""
    unchanged = frame["delta"].abs().lt(1e-12).fillna(False)
    return frame.assign(better=frame["better"].astype(object).where(~unchanged, None))


def metrics_table(result: ComparisonResult) -> pd.DataFrame:
    """Rows of metrics; per cohort the baseline, the candidate and the change (columns: cohort, role)."""
    frame = result.metrics_frame()
    names = [c.name for c in result.cohorts]
    wide = frame.pivot(index="metric", columns="cohort", values=["baseline", "candidate", "delta"])
    wide = wide.reindex(index=list(result.metric_names))
    roles = {"baseline": result.baseline, "candidate": result.candidate, "delta": "Δ"}
    wide.columns = pd.MultiIndex.from_tuples([(cohort, roles[role]) for role, cohort in wide.columns])
    wide = wide.reindex(columns=pd.MultiIndex.from_tuples([(n, roles[r]) for n in names for r in roles]))
    wide.index = [label(result.task, m) for m in wide.index]
    return wide.astype("float64")


def show_metrics(result: ComparisonResult) -> None:
    """The metrics table with coloured changes (green: the candidate is better)."""
    table = metrics_table(result)
    better = unchanged_as_none(result.metrics_frame()).pivot(index="metric", columns="cohort", values="better")
    better = better.reindex(index=list(result.metric_names))
    styler = table.style.format("{:.4f}", na_rep="n/a")
    for cohort in [c.name for c in result.cohorts]:
        column = (cohort, "Δ")
        styler = styler.format("{:+.4f}", subset=[column], na_rep="n/a")
        flags = better[cohort].reset_index(drop=True)
        styler = styler.apply(lambda _col, flags=flags: _delta_style(flags), subset=[column])
    st.dataframe(styler, width="stretch", height=35 * (len(table) + 2) + 3, placeholder="n/a",
                 column_config={"_index": st.column_config.TextColumn("Metric", width="medium", pinned=True)})
    if result.task == "detection":
        st.caption("mAP, precision, recall and F1 are means over the classes with ground truth (macro, as the "
                   "model overview shows them by default).")


def delta_chart(result: ComparisonResult, focus: str) -> None:
    frame = unchanged_as_none(result.metrics_frame())
    frame = frame[(frame["cohort"] == focus) & frame["delta"].notna()]
    if frame.empty:
        st.caption("No metric is defined for both models on this cohort.")
        return
    chart_frame = pd.DataFrame({"label": [label(result.task, m) for m in frame["metric"]],
                                "delta": frame["delta"].astype(float), "better": frame["better"].eq(True)})
    st.vega_lite_chart(_delta_spec(chart_frame, f"{result.candidate} − {result.baseline}"), width="stretch")


@st.cache_data(show_spinner=False, max_entries=64)
def _delta_spec(chart_frame: pd.DataFrame, title: str) -> dict:
    # The Vega-Lite spec, built once per comparison and focus cohort: building it through Altair
    # costs more than the rest of the page's rerun.
    chart = metric_deltas(chart_frame).encode(x=alt.X("delta:Q", title=title, axis=alt.Axis(format="+.2f",
                                                                                            tickCount=8)))
    return chart.properties(height=alt.Step(22)).to_dict()


def compatibility_table(result: ComparisonResult) -> pd.DataFrame:
    frame = result.compatibility_frame().rename(columns={
        "cohort": "Cohort", "images": "Images", "evaluated": "Both predicted", "btc": "BTC", "bec": "BEC",
        "new_errors": "New errors", "fixed_errors": "Fixed errors", "disagreements": "Disagreements"})
    return frame.astype({"BTC": "float64", "BEC": "float64"})


def show_compatibility(result: ComparisonResult) -> None:
    share = {"format": "percent", "min_value": 0.0, "max_value": 1.0}
    st.dataframe(compatibility_table(result), hide_index=True, width="stretch", placeholder="n/a", column_config={
        "Cohort": st.column_config.TextColumn(pinned=True),
        "BTC": st.column_config.ProgressColumn(
            "Trust compatibility (BTC)", help="Of the baseline's correct images, the share the candidate keeps "
                                              "correct", **share),
        "BEC": st.column_config.ProgressColumn(
            "Error compatibility (BEC)", help="Of the candidate's errors, the share the baseline made too", **share),
    })


def object_table(result: ComparisonResult) -> tuple[pd.DataFrame, list[bool | None]]:
    """Detection: objects found, missed and false detections of both models at the IoU and score thresholds,
    and per row whether the candidate is better (None: no change)."""
    o = result.objects
    rows = [("Objects found (TP)", o.baseline_tp, o.candidate_tp, True),
            ("Objects missed (FN)", o.ground_truths - o.baseline_tp, o.ground_truths - o.candidate_tp, False),
            ("False detections (FP)", o.baseline_fp, o.candidate_fp, False)]
    table = pd.DataFrame({"Objects": [r[0] for r in rows], result.baseline: [r[1] for r in rows],
                          result.candidate: [r[2] for r in rows], "Δ": [r[2] - r[1] for r in rows]})
    better = [None if after == before else (after > before) == up for _, before, after, up in rows]
    return table, better


def show_objects(view: View, result: ComparisonResult) -> None:
    """Per-object TP / FN / FP of both models and the images with newly missed objects."""
    o = result.objects
    table, better = object_table(result)
    styler = table.style.format({"Δ": "{:+d}"}).apply(lambda _c: _delta_style(pd.Series(better)), subset=["Δ"])
    left, right = st.columns([3, 2])
    left.dataframe(styler, hide_index=True, width="stretch")
    with right.container(border=True, key="vl_cmp_objects_panel"):
        st.markdown(f"**{o.ground_truths:,}** ground-truth objects at {thresholds_text(view)}")
        st.markdown(f":red-badge[{o.newly_missed:,} newly missed] :green-badge[{o.newly_found:,} newly found]")
        missed = o.newly_missed_images
        if st.button(f"Open the {missed.count:,} images with newly missed objects", key="vl_cmp_open_missed",
                     icon=":material/photo_library:", disabled=not missed.count, width="stretch"):
            open_image_set(view, missed, result.candidate)


# --------------------------------------------------------------------------- the PDF scorecard


@st.cache_data(show_spinner=False, max_entries=8)
def _scorecard_pdf(_store, store_key: tuple, model_id: str, baseline: str | None, cohorts: tuple, targets: tuple,
                   thresholds: tuple) -> bytes:
    card = scorecard(_store, cohorts=[(n, q) for n, q, _ in cohorts], model_id=model_id, baseline=baseline,
                     targets=dict(targets), **dict(thresholds))
    return pdf_bytes(card)


def scorecard_panel(view: View, *, model_id: str, baseline: str | None = None,
                    default_targets: dict[str, float] | None = None, key: str = "vl_sc") -> None:
    """Targets, cohorts, then "Prepare scorecard" and "Download PDF scorecard".

    The PDF is built only when asked for, and cached on the store's signature
    and every setting; ``default_targets`` fill a newly chosen target.
    """
    task = view.task
    picked = st.multiselect("Targets", list(metric_names(task)), key=f"{key}_targets_{task}", format_func=lambda m: label(task, m),
                            placeholder="Metrics to set a target for",
                            help="Each target is marked met or not met in the scorecard.")
    targets: dict[str, float] = {}
    if picked:
        cols = st.columns(min(len(picked), 4))
        for k, metric in enumerate(picked):
            start = (default_targets or {}).get(metric)
            value = cols[k % len(cols)].number_input(
                label(task, metric), min_value=0.0, max_value=1.0, step=0.01, format="%.3f",
                value=round(start, 3) if start is not None else None, key=f"{key}_target_{task}_{metric}",
                placeholder="target", help="Met when the model scores at most this" if metric in LOWER_IS_BETTER
                else "Met when the model scores at least this")
            if value is not None:
                targets[metric] = value
    cohorts = choose_cohorts(view, f"{key}_cohorts", "Cohorts in the scorecard",
                             "Each gets a row of metrics (all images always comes first).")
    params = (view.store_key, model_id, baseline, tuple((c.name, c.query, c.selection) for c in cohorts),
              tuple(sorted(targets.items())), tuple(sorted(view.thresholds.items())))
    ready_key = f"{key}_ready"
    if st.session_state.get(ready_key) == params:
        suffix = f"-vs-{baseline}" if baseline else ""
        st.download_button("Download PDF scorecard", _scorecard_pdf(view.store, *params),
                           file_name=f"scorecard-{view.store.name}-{model_id}{suffix}.pdf", mime="application/pdf",
                           key=f"{key}_download", type="primary", icon=":material/download:", on_click="ignore")
        return
    if st.button("Prepare scorecard", key=f"{key}_prepare", icon=":material/picture_as_pdf:",
                 help="Computes the scorecard: metrics, feature groups, error slices, sample errors"
                      + (" and the comparison" if baseline else "") + ". Takes a few seconds."):
        try:
            with st.spinner("Building the scorecard…"):
                _scorecard_pdf(view.store, *params)
        except VisionLensError as error:
            st.error(str(error), icon=":material/error:")
        else:
            st.session_state[ready_key] = params
            st.rerun()
    elif st.session_state.get(ready_key) is not None:
        st.caption("The settings changed since the last scorecard: prepare it again.")


# --------------------------------------------------------------------------- error slices


@st.cache_data(show_spinner="Searching for error slices…", max_entries=32)
def _slices(_store, _cohort: Cohort, _state, store_key: tuple, cohort_key: tuple, model_id: str, thresholds: tuple,
            top_k: int, max_order: int) -> list[Slice]:
    return find_slices(_store, model_id, top_k=top_k, max_order=max_order, cohort=_cohort, state=_state,
                       **dict(thresholds))


def error_slices(view: View, *, top_k: int, max_order: int) -> list[Slice]:
    """``core.slices.find_slices`` within the view's cohort, for its model and thresholds, cached until the store
    changes."""
    return _slices(view.store, view.cohort, view.state, view.store_key, view.cohort_key(), view.model_id,
                   tuple(sorted(view.thresholds.items())), top_k, max_order)


def cohort_error_rate(view: View) -> tuple[float | None, int, int]:
    """(error rate, errors, images with a prediction) of the view's cohort for its model."""
    counts = view.outcome_counts()
    errors, evaluated = counts.get("incorrect", 0), counts.get("incorrect", 0) + counts.get("correct", 0)
    return (errors / evaluated if evaluated else None), errors, evaluated


def slice_cohort(view: View, found: Slice) -> Cohort:
    return parse_query(found.query, view.catalog).cohort


def slice_chart(slices: Sequence[Slice], overall: float) -> None:
    frame = pd.DataFrame({"description": [f"{k}. {s.description}" for k, s in enumerate(slices, start=1)],
                          "error_rate": [s.error_rate for s in slices], "size": [s.size for s in slices]})
    st.vega_lite_chart(_slice_spec(frame, overall), width="stretch")


@st.cache_data(show_spinner=False, max_entries=64)
def _slice_spec(frame: pd.DataFrame, overall: float) -> dict:
    # Built once per set of slices, as ``_delta_spec``.
    return slice_error_rates(frame, overall).properties(height=alt.Step(26)).configure_axisX(
        format="%", tickCount=5).to_dict()


def _save_slice(view: View, cohort: Cohort, name_key: str, found: Slice) -> None:
    try:
        saved = view.state.create_cohort(st.session_state[name_key], cohort, description=(
            f"Error slice of {view.model_id}: {found.errors:,} errors in {found.size:,} images "
            f"({found.error_rate:.1%}) at {thresholds_text(view)}"))
    except CohortError as error:
        st.session_state["vl_slices_flash"] = ("error", str(error), None)
    else:
        st.session_state["vl_slices_flash"] = ("saved", saved.name, saved.id)


def slice_rows(view: View, slices: Sequence[Slice], overall: float | None) -> None:
    """One row per slice: its conditions, size, error rate and score, a link to the explorer and a save button."""
    saved_by_query = {s.query: s for s in view.saved_cohorts() if s.parent_id is None and not s.image_ids}
    for rank, found in enumerate(slices, start=1):
        cohort = slice_cohort(view, found)
        with st.container(border=True, key=f"vl_slice_row_{rank}"):
            cols = st.columns([0.3, 3.7, 1.1, 1.9, 1.1, 1.2, 1.4], vertical_alignment="center")
            cols[0].markdown(f"**{rank}**")
            cols[1].markdown(" ".join(f":blue-badge[{p.label}]" for p in found.predicates))
            cols[2].markdown(f"{found.size:,} images")
            lift = f" · ×{found.error_rate / overall:.1f}" if overall else ""
            cols[3].markdown(f"**{found.error_rate:.1%}** wrong{lift}")
            cols[4].markdown(f":gray[score {found.score:.3f}]")
            cols[5].page_link(EXPLORER, label="Explore", icon=":material/photo_library:",
                              query_params=view.link_params(cohort), help="Open the data explorer on this slice")
            existing = saved_by_query.get(to_query(cohort))
            if existing is not None:
                cols[6].markdown(f":green-badge[:material/bookmark: {existing.name}]")
                continue
            with cols[6].popover("Save", icon=":material/bookmark_add:", width="stretch"):
                name_key = f"vl_slice_name_{found.query}"
                st.text_input("Cohort name", value=found.description, key=name_key)
                st.button("Save as cohort", key=f"vl_slice_save_{found.query}", type="primary",
                          on_click=_save_slice, args=(view, cohort, name_key, found))


def slice_flash(view: View) -> None:
    """What the last save did, with a link to the saved cohort."""
    flash = st.session_state.pop("vl_slices_flash", None)
    if flash is None:
        return
    kind, text, cohort_id = flash
    if kind == "error":
        st.error(text)
        return
    with st.container(horizontal=True, vertical_alignment="center"):
        st.success(f"Saved the slice as cohort **{text}** (#{cohort_id}).", icon=":material/bookmark_added:")
        st.page_link(EXPLORER, label="Open it", icon=":material/photo_library:",
                     query_params=view.link_params(Cohort(parent_id=cohort_id)))
