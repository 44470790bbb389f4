"""Model overview: metrics across dataset cohorts and feature groups, and the charts behind them.

Every number comes from ``core.metrics`` or ``core.fairness``; this module only
picks what to show, caches results per cohort selection and draws them. The
detection thresholds (IoU, score) and the multilabel label threshold are the
sidebar's, live: metrics are recomputed from stored matches and
probabilities, nothing is re-run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from core.cohorts import Cohort
from core.error_analysis import available_features
from core.fairness import BINNINGS, METRICS as GROUP_METRICS, cohort_group_metrics
from core.metrics.classification import (NORMALIZATIONS, classification_metrics, classification_metrics_of_cohorts,
                                         confusion_matrix, multilabel_arrays, multilabel_metrics, normalize_confusion)
from core.metrics.detection import (AVERAGES, BACKGROUND, CohortEvaluation, confusion_matrix_detection,
                                    detection_metrics, evaluate_cohort, pr_curves, tide_errors)
from core.report_charts import metric_by_group

from .state import View

ERROR_RED = "#c0392b"
# Okabe-Ito, as app.charts: one colour per cohort, told apart with colour-vision deficiencies.
COHORT_COLORS = ["#0072B2", "#E69F00", "#009E73", "#56B4E9", "#CC79A7", "#D55E00", "#F0E442", "#999999"]
MAX_DEFAULT_CLASSES = 10  # confusion matrices start with at most this many classes
_DETECTION_KEY = "vl_overview"  # + _average, _classes_<store>
_METRICS_KEY = "vl_overview_metrics"


# --------------------------------------------------------------------------- metrics registry


@dataclass(frozen=True)
class MetricSpec:
    """A metric the overview can show: its result key, label, explanation and direction."""

    key: str
    label: str
    help: str
    higher_is_better: bool = True


_P = "of the images predicted as a class, the share that truly are"
_R = "of the images of a class, the share predicted as it"
_F = "harmonic mean of precision and recall"
_MACRO = "averaged over classes, each class counting equally (rare classes weigh as much as common ones)"
_MICRO = "pooled over every prediction before dividing (common classes dominate)"
_WEIGHTED = "averaged over classes, weighted by how many images each class has"

METRICS: dict[str, tuple[MetricSpec, ...]] = {
    "multiclass": (
        MetricSpec("accuracy", "Accuracy", "Share of images whose predicted class is the true class."),
        *(MetricSpec(f"{m}_{a}", f"{name} ({a})", f"{name}: {what}; {how}.")
          for m, name, what in (("precision", "Precision", _P), ("recall", "Recall", _R), ("f1", "F1", _F))
          for a, how in (("macro", _MACRO), ("micro", _MICRO + "; equals accuracy for one label per image"),
                         ("weighted", _WEIGHTED))),
    ),
    "multilabel": (
        MetricSpec("exact_match", "Exact match", "Share of images whose predicted label set equals the true set "
                   "exactly (subset accuracy: strict, one wrong label fails the image)."),
        MetricSpec("hamming_loss", "Hamming loss", "Share of (image, label) decisions that are wrong. Lower is "
                   "better; forgiving where exact match is strict.", higher_is_better=False),
        *(MetricSpec(f"{m}_{a}", f"{name} ({a})", f"{name} per label: {what}; {how}.")
          for m, name, what in (("precision", "Precision", "of the images given a label, the share that have it"),
                                ("recall", "Recall", "of the images that have a label, the share given it"),
                                ("f1", "F1", _F))
          for a, how in (("macro", _MACRO.replace("class", "label")), ("micro", _MICRO.replace("class", "label")),
                         ("weighted", _WEIGHTED.replace("class", "label")))),
    ),
    "detection": (
        MetricSpec("mAP", "mAP@IoU", "Average precision at the sidebar's IoU threshold, combined over classes by "
                   "the aggregate method (macro is COCO's mean over classes)."),
        MetricSpec("AP", "AP", "COCO's primary metric: AP averaged over IoU 0.50:0.05:0.95, every area, up to 100 "
                   "detections per image."),
        MetricSpec("AP50", "AP50", "AP at IoU 0.50 (Pascal VOC's metric): lenient about box placement."),
        MetricSpec("AP75", "AP75", "AP at IoU 0.75: rewards tight boxes."),
        MetricSpec("APs", "AP small", "AP over objects smaller than 32² pixels."),
        MetricSpec("APm", "AP medium", "AP over objects between 32² and 96² pixels."),
        MetricSpec("APl", "AP large", "AP over objects larger than 96² pixels."),
        MetricSpec("AR1", "AR1", "Average recall with one detection per image."),
        MetricSpec("AR10", "AR10", "Average recall with ten detections per image."),
        MetricSpec("AR100", "AR100", "Average recall with up to 100 detections per image, over IoU 0.50:0.95."),
        MetricSpec("ARs", "AR small", "AR100 over small objects."),
        MetricSpec("ARm", "AR medium", "AR100 over medium objects."),
        MetricSpec("ARl", "AR large", "AR100 over large objects."),
        MetricSpec("precision", "Precision@IoU", "Of the detections scoring at least the score threshold, the "
                   "share matching an object at the IoU threshold; per class, combined by the aggregate method "
                   "(macro: the mean over classes; micro: pooled)."),
        MetricSpec("recall", "Recall@IoU", "Of the objects, the share found by a detection scoring at least the "
                   "score threshold at the IoU threshold; per class, combined by the aggregate method."),
        MetricSpec("f1", "F1@IoU", "Harmonic mean of precision and recall at the two thresholds, per class, "
                   "combined by the aggregate method."),
    ),
}

RECOMMENDED: dict[str, tuple[tuple[str, ...], str]] = {
    "multiclass": (("accuracy", "f1_macro", "precision_macro", "recall_macro"),
                   "Accuracy says how often the model is right; with unbalanced classes it hides weak classes, "
                   "so add macro F1, precision and recall, which weigh every class equally."),
    "multilabel": (("exact_match", "hamming_loss", "f1_macro", "f1_micro"),
                   "Exact match is strict (one wrong label fails an image) and Hamming loss forgiving; together "
                   "they bracket quality. Macro F1 shows rare labels, micro F1 the overall decision quality."),
    "detection": (("mAP", "AP", "AP50", "AR100", "precision", "recall"),
                  "mAP at the IoU you set answers 'is it good enough at my overlap?', COCO AP and AP50 compare with "
                  "published numbers, AR100 says how much is found at all, and precision/recall at the score "
                  "threshold describe the detections a user actually sees."),
}

PER_CLASS: dict[str, dict[str, str]] = {
    "classification": {"f1": "F1", "precision": "Precision", "recall": "Recall", "support": "Images"},
    "detection": {"AP_iou": "AP@IoU", "AP": "AP", "AR100": "AR100", "precision": "Precision@IoU",
                  "recall": "Recall@IoU", "f1": "F1@IoU", "n_gt": "Objects"},
}
NORMALIZATION_LABELS = {None: "Counts", "true": "By true class (recall)", "pred": "By prediction (precision)",
                        "all": "Share of all"}
PARTIAL_TABLE_AFTER_S = 0.3  # metrics taking longer than this show the cohorts done so far


def metric_specs(task: str) -> dict[str, MetricSpec]:
    return {m.key: m for m in METRICS[task]}


# --------------------------------------------------------------------------- cohorts


@dataclass(frozen=True)
class NamedCohort:
    name: str
    cohort: Cohort


def named_cohorts(view: View) -> list[NamedCohort]:
    """The global cohort, the URL's cohort when it is not a saved one, then every saved cohort."""
    saved = view.saved_cohorts()
    out = [NamedCohort("All images", Cohort())]
    own = Cohort(view.cohort.filters, view.cohort.groups)
    is_saved = own.is_global and view.cohort.parent_id in {s.id for s in saved}
    if not view.cohort.is_global and not is_saved:
        out.append(NamedCohort("Current cohort", view.cohort))
    taken = {c.name for c in out}
    for s in saved:
        name = s.name if s.name not in taken else f"{s.name} (#{s.id})"
        taken.add(name)
        out.append(NamedCohort(name, Cohort(parent_id=s.id)))
    return out


def current_cohort_name(view: View, cohorts: Sequence[NamedCohort]) -> str:
    """The entry of ``cohorts`` that is the URL's cohort (the saved one, the current one or all images)."""
    for entry in cohorts:
        if entry.cohort == view.cohort:
            return entry.name
    return cohorts[0].name


def _selection_key(view: View, cohort: Cohort) -> tuple[str, list]:
    """The cohort's compiled selection: a cache key that changes when a saved cohort is edited."""
    return view.selection(cohort)


# --------------------------------------------------------------------------- cached engine calls


@st.cache_data(show_spinner="Ranking the cohort's detections at every IoU threshold…", max_entries=64)
def _cohort_evaluation(_store, store_key: tuple, model_id: str, selection: tuple[str, list],
                       classes: tuple[int, ...] | None) -> CohortEvaluation:
    """A detection cohort's evaluation at every IoU threshold: the part of its metrics that
    changing the IoU or score threshold leaves alone (ranking ten million detections takes
    seconds; the counts at a new threshold, one aggregate query)."""
    return evaluate_cohort(_store, model_id, selection, classes=list(classes) if classes else None)


def detection_evaluation(store, store_key: tuple, model_id: str, selection: tuple[str, list] | None) -> CohortEvaluation:
    """A detection cohort's evaluation (every class), from the cache the model overview fills."""
    return _cohort_evaluation(store, store_key, model_id, selection, None)


@st.cache_data(show_spinner=False, max_entries=512)
def _cohort_metrics(_store, store_key: tuple, task: str, model_id: str, selection: tuple[str, list],
                    thresholds: tuple, average: str, classes: tuple[int, ...] | None) -> dict:
    """Headline metrics and a per-class table of one cohort."""
    chosen = selection
    limits = dict(thresholds)
    if task == "multiclass":
        result = classification_metrics(_store, model_id, chosen)
        per_class = result["per_class"].rename(columns={"class": "name"})
    elif task == "multilabel":
        result = multilabel_metrics(_store, model_id, chosen, label_threshold=limits["label_threshold"])
        per_class = result["per_label"].rename(columns={"class": "name"})
    else:
        result = detection_metrics(_store, model_id, chosen, iou=limits["iou"],
                                   score_threshold=limits["score_threshold"],
                                   classes=list(classes) if classes else None, average=average,
                                   evaluation=_cohort_evaluation(_store, store_key, model_id, selection, classes))
        result = {**result, **result["aggregates"][average]}
        result["mAP"] = result["aggregates"][average]["AP_iou"]
        per_class = result["per_class"]
    return _summary(task, result, per_class)


@st.cache_data(show_spinner=False, max_entries=64)
def _classification_table(_store, store_key: tuple, model_id: str, selections: tuple) -> list[dict]:
    """``_cohort_metrics`` of every multiclass cohort of the table, counted in one scan, and each one's
    number of images (``n_images``)."""
    return [{**_summary("multiclass", result, result["per_class"].rename(columns={"class": "name"})),
             "n_images": result["n_evaluated"] + result["n_missing"]}
            for result in classification_metrics_of_cohorts(_store, model_id, selections)]


def _summary(task: str, result: dict, per_class: pd.DataFrame) -> dict:
    """The table's values of one cohort's metrics, its per-class table and number of images scored."""
    values = {}
    for spec in METRICS[task]:
        value = result.get(spec.key)
        # COCO writes -1 for "undefined" (no object of that kind in the cohort).
        values[spec.key] = None if value is None or (isinstance(value, float) and (math.isnan(value) or value < 0)) \
            else float(value)
    return {"values": values, "per_class": per_class, "n_evaluated": int(result.get("n_evaluated", -1))}


@st.cache_data(show_spinner=False, max_entries=64)
def _group_metrics(_store, _cohort: Cohort, store_key: tuple, selection: tuple, model_id: str, features: tuple,
                   metrics: tuple, bins: int, binning: str, thresholds: tuple):
    return cohort_group_metrics(_store, _cohort, model_id, list(features), list(metrics), bins=bins,
                                binning=binning, **dict(thresholds))


@st.cache_data(show_spinner=False, max_entries=64)
def _confusion(_store, store_key: tuple, task: str, model_id: str, selection: tuple, thresholds: tuple,
               classes: tuple[int, ...], normalize: str | None, class_names: tuple[str, ...]) -> pd.DataFrame:
    chosen = selection
    limits = dict(thresholds)
    if task == "multiclass":
        return confusion_matrix(_store, model_id, chosen, normalize=normalize, classes=list(classes))
    if task == "detection":
        full = confusion_matrix_detection(_store, model_id, chosen, limits["iou"], limits["score_threshold"])
        keep = [class_names[k] for k in classes] + [BACKGROUND]
        counts = full.loc[keep, keep]
        return pd.DataFrame(normalize_confusion(counts.to_numpy(), normalize), index=counts.index,
                            columns=counts.columns)
    from sklearn.metrics import multilabel_confusion_matrix

    _, y_true, y_pred, _ = multilabel_arrays(_store, model_id, chosen, limits["label_threshold"])
    per_label = multilabel_confusion_matrix(y_true, y_pred, labels=list(classes))  # (k, 2, 2): [[TN, FP], [FN, TP]]
    counts = np.stack([per_label[:, 1, 1], per_label[:, 0, 1], per_label[:, 1, 0], per_label[:, 0, 0]], axis=1)
    frame = pd.DataFrame(normalize_confusion(counts, "true" if normalize else None),
                         index=pd.Index([class_names[k] for k in classes], name="label"),
                         columns=pd.Index(["true positive", "false positive", "false negative", "true negative"],
                                          name="outcome"))
    return frame


@st.cache_data(show_spinner=False, max_entries=64)
def _tide(_store, store_key: tuple, model_id: str, selection: tuple, thresholds: tuple) -> dict:
    chosen = selection
    limits = dict(thresholds)
    result = tide_errors(_store, model_id, chosen, iou=limits["iou"], score_threshold=limits["score_threshold"])
    return {"errors": result["errors"], "special": result["special"], "ap": result["ap"]}


def cohort_metrics(view: View, cohort: Cohort, *, average: str = "macro",
                   classes: Sequence[int] | None = None) -> dict:
    """Cached metrics of one cohort for the view's model and thresholds."""
    return _cohort_metrics(view.store, view.store_key, view.task, view.model_id, _selection_key(view, cohort),
                           tuple(sorted(view.thresholds.items())), average,
                           tuple(classes) if classes is not None else None)


# --------------------------------------------------------------------------- tables


def _shade(value: float | None, low: float, high: float, higher_is_better: bool) -> str:
    """CSS for one cell: white for the column's worst value, blue for its best."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or high <= low:
        return ""
    share = (value - low) / (high - low)
    share = share if higher_is_better else 1 - share
    alpha = 0.08 + 0.6 * share
    text = "color: white;" if alpha > 0.5 else ""
    return f"background-color: rgba(31, 95, 168, {alpha:.2f}); {text}"


def styled_table(frame: pd.DataFrame, columns: dict[str, bool], *, number_format: str = "{:.4f}",
                 heatmap: bool = True) -> tuple:
    """(Styler, column_config) of ``frame`` with its number ``columns`` (name → higher is better)
    written out ("N/A" where missing) and, with ``heatmap``, shaded from worst to best per column."""
    shown = frame.copy()
    for name in columns:
        shown[name] = ["N/A" if pd.isna(v) else number_format.format(v) for v in frame[name]]

    def shade(column: pd.Series) -> list[str]:
        numbers = pd.to_numeric(frame[column.name], errors="coerce")
        low, high = numbers.min(), numbers.max()
        return [_shade(None if pd.isna(v) else float(v), low, high, columns[column.name]) for v in numbers]

    styler = shown.style.apply(shade, subset=list(columns)) if heatmap else shown.style
    config = {name: st.column_config.TextColumn(name, alignment="right") for name in columns}
    return styler, config


def _metric_table(view: View, cohorts: Sequence[NamedCohort], results: dict[str, dict | None],
                  chosen: Sequence[MetricSpec], counts: dict[str, int | None]) -> pd.DataFrame:
    rows = []
    for entry in cohorts:
        result = results.get(entry.name)
        count = counts.get(entry.name)
        row = {"Cohort": entry.name, "Images": "N/A" if count is None else f"{count:,}"}
        for spec in chosen:
            row[spec.label] = None if result is None else result["values"].get(spec.key)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["Cohort", "Images", *[s.label for s in chosen]])
    return frame.astype({s.label: "float64" for s in chosen})


def _show_table(target, frame: pd.DataFrame, chosen: Sequence[MetricSpec], heatmap: bool) -> None:
    styler, config = styled_table(frame, {s.label: s.higher_is_better for s in chosen}, heatmap=heatmap)
    config["Cohort"] = st.column_config.TextColumn("Cohort", pinned=True)
    config["Images"] = st.column_config.TextColumn("Images", alignment="right")
    target.dataframe(styler, hide_index=True, column_config=config, width="stretch")


def _recommend(task: str, key: str) -> None:
    st.session_state[key] = list(RECOMMENDED[task][0])


def chosen_metrics(view: View) -> list[MetricSpec]:
    """The metrics picked on the cohorts table (the recommended set until one is picked)."""
    specs = metric_specs(view.task)
    picked = st.session_state.get(f"{_METRICS_KEY}_{view.task}", RECOMMENDED[view.task][0])
    return [specs[k] for k in picked if k in specs]


def metric_picker(view: View, *, key: str = _METRICS_KEY) -> list[MetricSpec]:
    """Multiselect of the task's metrics with a "Help me choose metrics" popover."""
    specs = metric_specs(view.task)
    recommended, reason = RECOMMENDED[view.task]
    task_key = f"{key}_{view.task}"
    if task_key not in st.session_state:
        st.session_state[task_key] = list(recommended)
    left, right = st.columns([4, 1.6], vertical_alignment="bottom")
    picked = left.multiselect("Metrics", list(specs), key=task_key, format_func=lambda k: specs[k].label,
                              placeholder="Choose metrics")
    with right.popover("Help me choose metrics", icon=":material/help:", width="stretch"):
        st.markdown(f"**Recommended for {view.task}:** " + ", ".join(specs[k].label for k in recommended))
        st.caption(reason)
        st.button("Use the recommended metrics", key=f"{key}_recommend", on_click=_recommend,
                  args=(view.task, task_key), type="primary", icon=":material/auto_awesome:")
        st.markdown("\n".join(f"- **{s.label}**: {s.help}" for s in specs.values()))
    return [specs[k] for k in picked]


# --------------------------------------------------------------------------- dataset cohorts


def detection_settings(view: View) -> tuple[str, list[int] | None]:
    """The aggregate method and classes chosen on the cohorts table (defaults: macro, every class)."""
    names = list(view.classes)
    picked = st.session_state.get(f"{_DETECTION_KEY}_classes_{view.store.name}") or []
    classes = sorted(names.index(n) for n in picked if n in names) or None
    return st.session_state.get(f"{_DETECTION_KEY}_average", "macro"), classes


def _detection_options(view: View, key: str) -> tuple[str, list[int] | None]:
    left, right = st.columns([1.3, 4])
    average = left.selectbox("Aggregate method", AVERAGES, key=f"{key}_average",
                             help="How per-class values combine: macro (COCO, every class equal), weighted by "
                                  "object count, or micro (one ranking of every detection).")
    names = list(view.classes)
    picked = right.multiselect("Classes", names, key=f"{key}_classes_{view.store.name}", placeholder="All classes",
                               help="Evaluate only these classes (COCO catIds). Empty: every class.")
    classes = sorted(names.index(n) for n in picked) if picked else None
    st.caption(f"At IoU **{view.iou:.2f}** and score threshold **{view.score_threshold:.2f}** (sidebar), live from "
               "the stored matches. AP and AR rank every detection, as pycocotools does; precision, recall and F1 "
               "count the detections at or above the score threshold.")
    return average, classes


def dataset_cohorts_view(view: View, cohorts: Sequence[NamedCohort]) -> None:
    """The metrics table across cohorts (N/A until each is computed) and the per-class table."""
    chosen = metric_picker(view)
    average, classes = ("macro", None)
    if view.task == "detection":
        average, classes = _detection_options(view, _DETECTION_KEY)
    elif view.task == "multilabel":
        st.caption(f"At label threshold **{view.label_threshold:.2f}** (sidebar).")
    heatmap = st.toggle("Show heatmap", key="vl_overview_heatmap", value=True,
                        help="Shade each metric column from its worst cohort (white) to its best (blue).")
    counts = {c.name: None for c in cohorts}
    results: dict[str, dict | None] = {c.name: None for c in cohorts}
    table = st.empty()
    if view.task == "multiclass":
        # Every cohort in two scans, quick at a million images: no partial table meanwhile.
        scored = _classification_table(view.store, view.store_key, view.model_id,
                                       tuple(_selection_key(view, entry.cohort) for entry in cohorts))
        for entry, result in zip(cohorts, scored):
            counts[entry.name] = result["n_images"]
            results[entry.name] = result if result["n_images"] else None
    else:
        started = time.monotonic()
        for entry in cohorts:
            if time.monotonic() - started > PARTIAL_TABLE_AFTER_S:
                # A slow first visit (a big store): the cohorts done so far, the rest N/A, meanwhile.
                # Cached results come at once, and the browser draws the table once.
                _show_table(table, _metric_table(view, cohorts, results, chosen, counts), chosen, heatmap)
            counts[entry.name] = view.count(entry.cohort)
            results[entry.name] = cohort_metrics(view, entry.cohort, average=average, classes=classes) \
                if counts[entry.name] else None
    _show_table(table, _metric_table(view, cohorts, results, chosen, counts), chosen, heatmap)
    _per_class_table(view, cohorts, results)


def _per_class_table(view: View, cohorts: Sequence[NamedCohort], results: dict[str, dict | None]) -> None:
    kind = "detection" if view.task == "detection" else "classification"
    options = PER_CLASS[kind]
    noun = "label" if view.task == "multilabel" else "class"
    # Drawn only while open: a styled table of every class per cohort costs the browser on each visit.
    expander = st.expander(f"Per {noun}", icon=":material/table_rows:", key="vl_overview_per_class_open",
                           on_change="rerun")
    with expander:
        if not expander.open:
            return
        metric = st.segmented_control(f"Per-{noun} metric", list(options), format_func=options.get,
                                      default=next(iter(options)), required=True, key="vl_overview_per_class")
        columns = {}
        for entry in cohorts:
            result = results.get(entry.name)
            if result is None:
                continue
            table = result["per_class"].set_index("name")[metric]
            columns[entry.name] = table.where(table >= 0) if kind == "detection" else table
        if not columns:
            st.info("No cohort holds images with predictions.")
            return
        frame = pd.DataFrame(columns)
        frame.index.name = noun.capitalize()
        counts = metric in ("support", "n_gt")
        styler, config = styled_table(frame.reset_index(), {c: True for c in columns},
                                      number_format="{:,.0f}" if counts else "{:.4f}")
        st.dataframe(styler, hide_index=True, width="stretch", column_config=config)


# --------------------------------------------------------------------------- feature cohorts


def feature_choices(view: View) -> dict[str, str]:
    """Metadata columns to group by (name → label): user columns first."""
    return {f.name: f.label for f in available_features(view.catalog) if f.name not in ("pred_label", "score")}


def feature_cohorts_view(view: View) -> None:
    """Metrics per group of one or more features, with fairlearn's difference and ratio."""
    choices = feature_choices(view)
    if not choices:
        st.info("This store has no metadata columns to group by.")
        return
    metrics = list(GROUP_METRICS) if view.task == "multiclass" else ["accuracy", "error_rate"]
    default_feature = next(iter(choices))
    cols = st.columns([3, 3, 1, 1.3], vertical_alignment="bottom")
    features = cols[0].multiselect("Features", list(choices), default=[default_feature], format_func=choices.get,
                                   key=f"vl_fc_features_{view.store.name}", max_selections=3,
                                   help="Images are grouped by every combination of these features' values.")
    picked = cols[1].multiselect("Metrics", metrics, default=metrics[:3] if len(metrics) > 2 else metrics,
                                 key=f"vl_fc_metrics_{view.task}", format_func=_group_metric_label)
    bins = cols[2].number_input("Bins", 2, 20, 4, key="vl_fc_bins", help="Bins per numeric feature")
    binning = cols[3].selectbox("Binning", BINNINGS, key="vl_fc_binning",
                                format_func={"equal": "Equal width", "quantile": "Quantiles"}.get)
    if view.task != "multiclass":
        st.caption("Per image, correct means " + ("the predicted label set equals the true set"
                                                  if view.task == "multilabel" else
                                                  "no false positive and no missed object") +
                   "; accuracy is the share of correct images.")
    if not features or not picked:
        st.info("Choose at least one feature and one metric.")
        return
    result = _group_metrics(view.store, view.cohort, view.store_key, _selection_key(view, view.cohort),
                            view.model_id, tuple(features), tuple(picked), int(bins), binning,
                            tuple(sorted(view.thresholds.items())))
    by_group = result.by_group.reset_index()
    for name in features:
        by_group[name] = by_group[name].astype(str)
    by_group = by_group.rename(columns={**choices, "count": "Images", **{m: _group_metric_label(m) for m in picked}})
    labels = [_group_metric_label(m) for m in picked]
    styler, config = styled_table(by_group, {label: m != "error_rate" for label, m in zip(labels, picked)})
    config["Images"] = st.column_config.NumberColumn("Images", format="localized")
    st.dataframe(styler, hide_index=True, width="stretch", column_config=config)
    gaps = pd.DataFrame({"Metric": labels, "Overall": result.overall[picked].to_numpy(),
                         "Difference (max − min)": result.difference[picked].to_numpy(),
                         "Ratio (min / max)": result.ratio[picked].to_numpy()})
    st.markdown("**Disparity between groups**")
    styler, config = styled_table(gaps, {c: True for c in gaps.columns[1:]}, heatmap=False)
    st.dataframe(styler, hide_index=True, width="stretch", column_config=config, key="vl_fc_disparity")
    st.caption("Difference and ratio equal fairlearn's `MetricFrame.difference()` / `ratio()` "
               "(between groups): largest minus smallest group value, smallest over largest.")
    first = picked[0]
    chart_frame = pd.DataFrame({"group": [" · ".join(str(v) for v in row) for row in
                                          by_group[[choices[f] for f in features]].itertuples(index=False)],
                                "value": result.by_group[first].to_numpy(dtype=float)})
    chart = metric_by_group(chart_frame, _group_metric_label(first),
                            group_title=" · ".join(choices[f] for f in features))
    st.altair_chart(chart.properties(height=alt.Step(22)), width="stretch")


def _group_metric_label(name: str) -> str:
    return {"accuracy": "Accuracy", "error_rate": "Error rate", "precision_macro": "Precision (macro)",
            "recall_macro": "Recall (macro)", "f1_macro": "F1 (macro)", "f1_weighted": "F1 (weighted)"}.get(name, name)


# --------------------------------------------------------------------------- visualisations


@st.cache_data(show_spinner=False, max_entries=64)
def _chart_spec(kind: str, frame: pd.DataFrame, **options) -> dict:
    """The Vega-Lite spec of chart ``kind`` of ``frame``, built once per frame: building a chart
    through Altair was over a third of the page's rerun."""
    return _CHARTS[kind](frame, **options).to_dict()


def metrics_chart(frame: pd.DataFrame) -> alt.Chart:
    """Grouped horizontal bars: one group per metric, one bar per cohort (``metric``, ``cohort``, ``value``)."""
    cohorts = list(dict.fromkeys(frame["cohort"]))
    bars = alt.Chart(frame).mark_bar().encode(
        x=alt.X("value:Q", title=None, scale=alt.Scale(domainMin=0)),
        y=alt.Y("metric:N", sort=None, title=None, axis=alt.Axis(labelLimit=160)),
        yOffset=alt.YOffset("cohort:N", sort=cohorts),
        color=alt.Color("cohort:N", sort=cohorts, title="Cohort", legend=alt.Legend(orient="bottom"),
                        scale=alt.Scale(domain=cohorts, range=COHORT_COLORS[: len(cohorts)] or COHORT_COLORS)),
        tooltip=["cohort:N", "metric:N", alt.Tooltip("value:Q", format=".4f")],
    )
    labels = bars.mark_text(align="left", dx=3, fontSize=10, color="#1d2433").encode(
        text=alt.Text("value:Q", format=".3f"), color=alt.value("#1d2433"))
    return (bars + labels).properties(height=alt.Step(16))  # px per bar (the offset band)


def confusion_chart(matrix: pd.DataFrame, *, normalized: bool) -> alt.Chart:
    """A heatmap of a confusion matrix (rows: truth, columns: prediction) with the value in each cell."""
    rows, columns = list(matrix.index), list(matrix.columns)
    long = matrix.rename_axis(index="truth", columns="predicted").stack().rename("value").reset_index()
    long["text"] = long["value"].map(lambda v: f"{v:.2f}" if normalized else f"{int(v):,}")
    peak = float(long["value"].max()) or 1.0
    base = alt.Chart(long).encode(
        x=alt.X("predicted:N", sort=columns, title=matrix.columns.name or "predicted",
                axis=alt.Axis(labelAngle=-40, orient="top")),
        y=alt.Y("truth:N", sort=rows, title=matrix.index.name or "truth"),
    )
    cells = base.mark_rect(stroke="white").encode(
        color=alt.Color("value:Q", scale=alt.Scale(scheme="blues", domain=[0, peak]), legend=None),
        tooltip=["truth:N", "predicted:N", alt.Tooltip("value:Q", format=".4f" if normalized else ",d")])
    text = base.mark_text(fontSize=11).encode(
        text="text:N",
        color=alt.condition(alt.datum.value > peak * 0.55, alt.value("white"), alt.value("#1d2433")))
    size = max(26, min(56, 560 // max(1, len(columns))))
    return (cells + text).properties(width=size * len(columns), height=size * len(rows))


def pr_curves_chart(curves: dict, names: Sequence[str], classes: Sequence[int]) -> alt.Chart:
    frames = []
    for k in classes:
        curve = curves.get(int(k))
        if curve is None:
            continue
        precision = np.asarray(curve["precision"], dtype=float)
        keep = precision >= 0  # -1: recall never reached
        frames.append(pd.DataFrame({"class": names[k], "recall": np.asarray(curve["recall"])[keep],
                                    "precision": precision[keep]}))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["class", "recall", "precision"])
    return alt.Chart(frame).mark_line(interpolate="step-after").encode(
        x=alt.X("recall:Q", scale=alt.Scale(domain=[0, 1]), title="Recall"),
        y=alt.Y("precision:Q", scale=alt.Scale(domain=[0, 1]), title="Precision"),
        color=alt.Color("class:N", title="Class", legend=alt.Legend(orient="right")),
        tooltip=["class:N", alt.Tooltip("recall:Q", format=".2f"), alt.Tooltip("precision:Q", format=".3f")],
    ).properties(height=340)


def tide_chart(errors: pd.DataFrame) -> alt.Chart:
    frame = errors.assign(label=[f"{c:,} errors" for c in errors["count"]])
    bars = alt.Chart(frame).mark_bar(color=ERROR_RED, opacity=0.85).encode(
        x=alt.X("dAP:Q", title="AP gained if fixed (dAP)"),
        y=alt.Y("type:N", sort=None, title=None),
        tooltip=["type:N", "count:Q", alt.Tooltip("dAP:Q", format=".4f")],
    )
    text = bars.mark_text(align="left", dx=4, color="#1d2433", fontSize=11).encode(text="label:N")
    return (bars + text).properties(height=36 * len(frame))


TIDE_HELP = {"Cls": "right place, wrong class", "Loc": "right class, box misplaced",
             "Both": "wrong class and misplaced", "Dupe": "a second box on an object already found",
             "Bkg": "a box on background", "Miss": "an object no box found"}


def _default_classes(view: View) -> list[str]:
    names = list(view.classes)
    return names if len(names) <= MAX_DEFAULT_CLASSES else names[:MAX_DEFAULT_CLASSES]


_CHARTS = {"metrics": metrics_chart, "confusion": confusion_chart, "tide": tide_chart}


def visualisations(view: View, cohorts: Sequence[NamedCohort]) -> None:
    """Metrics bar chart, confusion matrix and, for detection, PR curves and TIDE errors.

    Only the open tab runs: on a big detection store each of the others reads every
    detection of a cohort."""
    names = [c.name for c in cohorts]
    by_name = {c.name: c for c in cohorts}
    current = current_cohort_name(view, cohorts)
    drawers = {"Metrics chart": _metrics_chart_tab, "Confusion matrix": _confusion_tab}
    if view.task == "detection":
        drawers.update({"PR curves": _pr_curves_tab, "TIDE errors": _tide_tab})
    tabs = st.tabs(list(drawers), key="vl_viz_tab", on_change="rerun")
    for tab, draw in zip(tabs, drawers.values()):
        with tab:
            if tab.open:
                draw(view, names, by_name, current)


def _metrics_chart_tab(view: View, names: list[str], by_name: dict[str, NamedCohort], current: str) -> None:
    picked = st.multiselect("Cohorts", names, default=names[:6], key=f"vl_viz_cohorts_{view.store.name}", persist_state="session")
    chosen = chosen_metrics(view)
    average, classes = detection_settings(view) if view.task == "detection" else ("macro", None)
    rows = []
    for name in picked:
        if not view.count(by_name[name].cohort):
            continue
        values = cohort_metrics(view, by_name[name].cohort, average=average, classes=classes)["values"]
        rows += [{"cohort": name, "metric": s.label, "value": values.get(s.key)} for s in chosen]
    frame = pd.DataFrame(rows, columns=["cohort", "metric", "value"]).dropna()
    if frame.empty:
        st.info("Choose metrics (Dataset cohorts view) and at least one cohort holding images.")
    else:
        st.caption("Metrics: " + ", ".join(s.label for s in chosen) + " (chosen on the Dataset cohorts view).")
        st.vega_lite_chart(_chart_spec("metrics", frame), width="stretch")


def _confusion_tab(view: View, names: list[str], by_name: dict[str, NamedCohort], current: str) -> None:
    cols = st.columns([2, 4, 2], vertical_alignment="bottom")
    cohort_name = cols[0].selectbox("Cohort", names, index=names.index(current), key="vl_cm_cohort", persist_state="session")
    noun = "Labels" if view.task == "multilabel" else "Classes"
    classes = cols[1].multiselect(noun, list(view.classes), default=_default_classes(view),
                                  key=f"vl_cm_classes_{view.store.name}", persist_state="session")
    if view.task == "multilabel":
        normalize = "true" if cols[2].toggle("Share per label", key="vl_cm_norm_ml", persist_state="session") else None
    else:
        normalize = cols[2].selectbox("Normalisation", NORMALIZATIONS, format_func=NORMALIZATION_LABELS.get,
                                      key="vl_cm_norm", persist_state="session")
    if not classes:
        st.info(f"Choose at least one {noun.lower()[:-1] if view.task == 'multilabel' else 'class'}.")
        return
    ids = tuple(sorted(view.classes.index(c) for c in classes))
    matrix = _confusion(view.store, view.store_key, view.task, view.model_id,
                        _selection_key(view, by_name[cohort_name].cohort),
                        tuple(sorted(view.thresholds.items())), ids, normalize, tuple(view.classes))
    if view.task == "detection":
        st.caption(f"At IoU {view.iou:.2f} and score ≥ {view.score_threshold:.2f}. The background row holds "
                   "false positives on nothing, the background column objects no box found.")
    elif view.task == "multilabel":
        st.caption(f"Per label, at label threshold {view.label_threshold:.2f}.")
    st.vega_lite_chart(_chart_spec("confusion", matrix, normalized=normalize is not None), width="content")


def _pr_curves_tab(view: View, names: list[str], by_name: dict[str, NamedCohort], current: str) -> None:
    cols = st.columns([2, 5], vertical_alignment="bottom")
    cohort_name = cols[0].selectbox("Cohort", names, index=names.index(current), key="vl_pr_cohort", persist_state="session")
    classes = cols[1].multiselect("Classes", list(view.classes), default=_default_classes(view)[:6],
                                  key=f"vl_pr_classes_{view.store.name}", persist_state="session")
    result = detection_metrics_for_curves(view, by_name[cohort_name].cohort)
    st.caption(f"Precision against recall at IoU {view.iou:.2f} (COCO's 101 recall points, every area, up to 100 "
               "detections per image).")
    st.altair_chart(pr_curves_chart(result, list(view.classes), [view.classes.index(c) for c in classes]),
                    width="stretch")


def _tide_tab(view: View, names: list[str], by_name: dict[str, NamedCohort], current: str) -> None:
    cohort_name = st.selectbox("Cohort", names, index=names.index(current), key="vl_tide_cohort", persist_state="session")
    tide = _tide(view.store, view.store_key, view.model_id, _selection_key(view, by_name[cohort_name].cohort),
                 tuple(sorted(view.thresholds.items())))
    st.caption(f"TIDE error types at IoU {view.iou:.2f}: each false positive and missed object gets one type; "
               f"dAP is the AP gained if that type were fixed (base AP {tide['ap']:.4f}, ranking the detections scored ≥ "
               f"{view.score_threshold:.2f}).")
    st.vega_lite_chart(_chart_spec("tide", tide["errors"]), width="stretch")
    legend = " · ".join(f"**{k}**: {v}" for k, v in TIDE_HELP.items())
    st.caption(legend)
    special = tide["special"]
    st.caption(f"Removing every false positive would add {special['FalsePos']:.4f} AP; finding every missed "
               f"object {special['FalseNeg']:.4f}.")


def detection_metrics_for_curves(view: View, cohort: Cohort) -> dict:
    """Per-class PR curves of a cohort (the cached detection metrics' curves)."""
    evaluation = _cohort_evaluation(view.store, view.store_key, view.model_id, _selection_key(view, cohort), None)
    return pr_curves(evaluation, view.iou)
