"""Baseline vs candidate: metrics, changed images and backward compatibility.

``compare_models(store, baseline, candidate, cohorts=...)`` evaluates both
models on the same images: the whole dataset and each named cohort (a cohort
query string, compiled once, with the baseline's view of model columns unless
the query names a model), so the two columns of a row always describe one set
of images. Per cohort it reports every headline metric of both models and the
delta (candidate − baseline), and

- **new errors**: images the baseline got right and the candidate gets wrong;
  **fixed errors**: the reverse;
- **BTC**, backward trust compatibility: of the images the baseline got right,
  the share the candidate also gets right;
- **BEC**, backward error compatibility: of the candidate's errors, the share
  the baseline made too (Srivastava, Nushi, Kamar, Shah, Horvitz, "An
  Empirical Analysis of Backward Compatibility in Machine Learning Systems",
  KDD 2020);
- **disagreements**: images the two models predict differently.

"Right" is the cohort compiler's per-image ``error`` column: the predicted
class (multiclass), the exact label set at the label threshold (multilabel),
no false positive and no false negative at the IoU and score thresholds
(detection). For detection the comparison is also made per object: ground
truths the candidate newly misses or newly finds, and false positives of each.
A detection image counts as a disagreement when some object is found by one
model and missed by the other, or the models' false-positive counts differ.

Each set of changed images comes with a cohort query one click away: an
``image_id__in`` list while it is short, otherwise a hand-picked cohort saved
in the store's state database (reused when an identical one exists) and linked
as ``cohort=<id>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from .cohorts import (Catalog, ParsedQuery, ViewState, catalog_of, compile_cohort, frame_sql, parse_query,
                      selection_cohort, to_query)
from .errors import CohortError, EvalError
from .store import Store

if TYPE_CHECKING:
    from .metrics.detection import CohortEvaluation
    from .state import StateDB

    # (model_id, selection) -> that detection cohort's evaluation
    Evaluator = Callable[[str, "tuple[str, list] | None"], CohortEvaluation]

log = logging.getLogger(__name__)

MAX_INLINE_IDS = 200  # longer image lists are saved as a cohort instead of spelled out in the URL
ALL_IMAGES = "All images"

# Headline metrics per task, in display order. Detection: AP at the chosen IoU, the 12 COCO stats and
# precision / recall / F1 at IoU and score threshold, each a mean over the classes with ground truth (macro,
# as COCO averages AP and as the model overview shows by default).
HEADLINE_METRICS = {
    "multiclass": ("accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_micro",
                   "recall_micro", "f1_micro", "precision_weighted", "recall_weighted", "f1_weighted"),
    "multilabel": ("exact_match", "hamming_loss", "precision_macro", "recall_macro", "f1_macro",
                   "precision_micro", "recall_micro", "f1_micro", "precision_weighted", "recall_weighted",
                   "f1_weighted"),
    "detection": ("mAP", "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
                  "ARl", "precision", "recall", "f1"),
}
LOWER_IS_BETTER = frozenset({"hamming_loss"})


def metric_names(task: str) -> tuple[str, ...]:
    """Headline metric names of a task (``EvalError`` for an unknown task)."""
    if task not in HEADLINE_METRICS:
        raise EvalError(f"unknown task {task!r}", field="task", choices=list(HEADLINE_METRICS))
    return HEADLINE_METRICS[task]


def _finite(value: object) -> float | None:
    """A metric as float, or None where it is undefined (NaN, or COCO's -1 for "no ground truth")."""
    if value is None:
        return None
    number = float(value)
    if not math.isfinite(number) or number == -1.0:
        return None
    return number


def model_metrics(store: Store, task: str, model_id: str, selection: tuple[str, list] | None, *,
                  iou: float = 0.5, score_threshold: float = 0.5, label_threshold: float = 0.5,
                  evaluate: "Evaluator | None" = None) -> dict:
    """Headline metrics of one model on a selection (``None`` where undefined).

    ``evaluate(model_id, selection)``: the detection cohort's ``evaluate_cohort`` result, for a
    caller that keeps them (the app does, per cohort, whatever the thresholds)."""
    from .metrics import classification

    if task == "multiclass":
        raw = classification.classification_metrics(store, model_id, selection)
    elif task == "multilabel":
        raw = classification.multilabel_metrics(store, model_id, selection, label_threshold=label_threshold)
    elif task == "detection":
        from .metrics.detection import detection_metrics

        raw = detection_metrics(store, model_id, selection, iou=iou, score_threshold=score_threshold,
                                 evaluation=evaluate(model_id, selection) if evaluate else None)
        raw = {**raw, **{k: raw["aggregates"]["macro"][k] for k in ("precision", "recall", "f1")}}
    else:
        raise EvalError(f"unknown task {task!r}", field="task", choices=list(HEADLINE_METRICS))
    return {name: _finite(raw.get(name)) for name in metric_names(task)}


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ImageSet:
    """A set of images with the cohort query that opens it (None when empty or not asked for)."""

    name: str
    count: int
    query: str | None
    image_ids: np.ndarray = field(repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "count": self.count, "query": self.query}


@dataclass(frozen=True)
class CohortComparison:
    """Both models on one cohort's images."""

    name: str
    query: str
    count: int  # images in the cohort
    evaluated: int  # of those, images both models predicted
    baseline: dict
    candidate: dict
    delta: dict  # candidate − baseline; None where either is undefined
    btc: float | None  # None: the baseline got nothing right here
    bec: float | None  # None: the candidate made no error here
    new_errors: ImageSet
    fixed_errors: ImageSet
    disagreements: ImageSet

    def to_dict(self) -> dict:
        return {"name": self.name, "query": self.query, "count": self.count, "evaluated": self.evaluated,
                "baseline": self.baseline, "candidate": self.candidate, "delta": self.delta,
                "btc": self.btc, "bec": self.bec, "new_errors": self.new_errors.to_dict(),
                "fixed_errors": self.fixed_errors.to_dict(), "disagreements": self.disagreements.to_dict()}


@dataclass(frozen=True)
class ObjectComparison:
    """Detection, per object at the IoU and score thresholds (whole dataset)."""

    ground_truths: int  # that count (not crowd)
    baseline_tp: int
    candidate_tp: int
    newly_missed: int  # found by the baseline, missed by the candidate
    newly_found: int  # missed by the baseline, found by the candidate
    baseline_fp: int
    candidate_fp: int
    newly_missed_images: ImageSet

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("ground_truths", "baseline_tp", "candidate_tp", "newly_missed",
                                             "newly_found", "baseline_fp", "candidate_fp")}
        out["newly_missed_images"] = self.newly_missed_images.to_dict()
        return out


@dataclass(frozen=True)
class ComparisonResult:
    """Everything ``compare_models`` found; ``cohorts[0]`` is the whole dataset."""

    store: str
    task: str
    baseline: str
    candidate: str
    thresholds: dict
    metric_names: tuple[str, ...]
    cohorts: tuple[CohortComparison, ...]
    objects: ObjectComparison | None = None

    @property
    def overall(self) -> CohortComparison:
        return self.cohorts[0]

    @property
    def new_errors(self) -> ImageSet:
        return self.overall.new_errors

    @property
    def fixed_errors(self) -> ImageSet:
        return self.overall.fixed_errors

    @property
    def disagreements(self) -> ImageSet:
        return self.overall.disagreements

    @property
    def btc(self) -> float | None:
        return self.overall.btc

    @property
    def bec(self) -> float | None:
        return self.overall.bec

    def metrics_frame(self) -> pd.DataFrame:
        """One row per (cohort, metric): baseline, candidate, delta and whether the candidate is better."""
        rows = []
        for c in self.cohorts:
            for name in self.metric_names:
                b, k, d = c.baseline.get(name), c.candidate.get(name), c.delta.get(name)
                better = None if d is None else (d < 0 if name in LOWER_IS_BETTER else d > 0)
                rows.append({"cohort": c.name, "metric": name, "baseline": b, "candidate": k, "delta": d,
                             "better": better})
        return pd.DataFrame(rows, columns=["cohort", "metric", "baseline", "candidate", "delta", "better"])

    def compatibility_frame(self) -> pd.DataFrame:
        """One row per cohort: size, BTC, BEC and the counts of changed images."""
        return pd.DataFrame([{"cohort": c.name, "images": c.count, "evaluated": c.evaluated, "btc": c.btc,
                              "bec": c.bec, "new_errors": c.new_errors.count, "fixed_errors": c.fixed_errors.count,
                              "disagreements": c.disagreements.count} for c in self.cohorts])

    def to_dict(self) -> dict:
        return {"store": self.store, "task": self.task, "baseline": self.baseline, "candidate": self.candidate,
                "thresholds": self.thresholds, "metrics": list(self.metric_names), "btc": self.btc,
                "bec": self.bec, "new_errors": self.new_errors.to_dict(),
                "fixed_errors": self.fixed_errors.to_dict(), "disagreements": self.disagreements.to_dict(),
                "cohorts": [c.to_dict() for c in self.cohorts],
                "objects": self.objects.to_dict() if self.objects else None}


# --------------------------------------------------------------------------- image sets


def image_set_query(store: Store, image_ids: np.ndarray, name: str, *, state: "StateDB | None" = None,
                    max_inline: int = MAX_INLINE_IDS) -> str | None:
    """A cohort query for exactly ``image_ids``: inline when short, else a saved hand-picked cohort.

    A saved cohort with the same name and the same images is reused, so
    comparing again does not pile up copies.
    """
    ids = np.unique(np.asarray(image_ids, dtype=np.int64))
    if len(ids) == 0:
        return None
    if len(ids) <= max_inline:
        return to_query(selection_cohort(ids.tolist()))
    if state is None:
        from .state import StateDB

        state = StateDB.for_store(store.paths.base)
    wanted = tuple(ids.tolist())
    for saved in state.list_cohorts():
        if saved.name == name and saved.image_ids == wanted and not saved.query and saved.parent_id is None:
            return saved.link
    saved = state.create_cohort(name, image_ids=wanted,
                                description=f"{len(wanted)} images, saved by model comparison")
    return saved.link


# --------------------------------------------------------------------------- engine


def check_models(store: Store, catalog: Catalog, models: dict[str, str]) -> None:
    """Each role's model exists and all are of the store's task; EvalError naming the model otherwise."""
    valid = list(catalog.models)
    tasks = dict(store.rows('SELECT model_id, task FROM "models"'))
    for role, model_id in models.items():
        what = "model" if role == "model" else f"{role} model"
        if model_id not in valid:
            raise EvalError(f"unknown {what} {model_id!r}", field=role, choices=valid)
        task = tasks.get(model_id)
        if task and task != catalog.task:
            raise EvalError(f"{what} {model_id!r} is a {task} model, the store is {catalog.task}; "
                            f"compare models of one task", field=role,
                            choices=[m for m in valid if tasks.get(m) in (None, "", catalog.task)])


@dataclass(frozen=True)
class _PerImage:
    """Dense per-image arrays over image ids 0..n-1 for the two models."""

    evaluated: np.ndarray  # both models have a verdict
    baseline_correct: np.ndarray
    candidate_correct: np.ndarray
    disagree: np.ndarray
    newly_missed: np.ndarray | None  # detection: images with a ground truth the candidate newly misses
    object_counts: dict | None  # detection: ObjectComparison's counts


def _per_image(store: Store, catalog: Catalog, baseline: str, candidate: str, thresholds: dict
               ) -> tuple[_PerImage, int]:
    n = store.image_count()
    if catalog.task == "detection":
        return _detection_per_image(store, baseline, candidate, thresholds, n), n
    columns = ["image_id", "error", "pred_label"]
    b_sql, b_params = frame_sql(store, baseline, columns=columns, catalog=catalog, **thresholds)
    c_sql, c_params = frame_sql(store, candidate, columns=columns, catalog=catalog, **thresholds)
    frame = store.query(
        f"SELECT b.image_id, b.error AS b_error, c.error AS c_error, "
        f"b.pred_label IS DISTINCT FROM c.pred_label AS differs "
        f"FROM ({b_sql}) AS b JOIN ({c_sql}) AS c USING (image_id) ORDER BY b.image_id",
        b_params + c_params)
    ids = frame["image_id"].to_numpy(dtype=np.int64)
    b_err = frame["b_error"].astype("boolean")
    c_err = frame["c_error"].astype("boolean")
    evaluated = np.zeros(n, bool)
    evaluated[ids] = (b_err.notna() & c_err.notna()).to_numpy()
    b_ok = np.zeros(n, bool)
    b_ok[ids] = (~b_err.fillna(True)).to_numpy(dtype=bool)
    c_ok = np.zeros(n, bool)
    c_ok[ids] = (~c_err.fillna(True)).to_numpy(dtype=bool)
    disagree = np.zeros(n, bool)
    disagree[ids] = frame["differs"].to_numpy(dtype=bool)
    return _PerImage(evaluated, b_ok & evaluated, c_ok & evaluated, disagree & evaluated, None, None), n


# Both models' per-image FP and FN counts (as ``core.matching.image_counts_params``: an image is an
# error when it has either) and the ground truths one finds and the other misses, in one pass
# over each match table. A ground truth's two outcomes pair up as one bit (``gt_id`` is unique
# in a store) of a word of 64 per image: no join on every ground truth (ten million at a
# million images).
_DETECTION_CHANGES_SQL = """
WITH vl_det AS (
    SELECT image_id,
           count(*) FILTER (WHERE model_id = ? AND ((tp_mask | ignored_mask) >> ?) & 1 = 0) AS b_fp,
           count(*) FILTER (WHERE model_id = ? AND ((tp_mask | ignored_mask) >> ?) & 1 = 0) AS c_fp
    FROM det_matches WHERE model_id IN (?, ?) AND score >= ? GROUP BY image_id),
vl_gt AS (
    SELECT image_id, gt_id // 64 AS word, model_id, 1::UBIGINT << (gt_id % 64) AS bit,
           coalesce(match_det_ids[?] >= 0 AND match_scores[?] >= ?, false) AS found,
           coalesce(match_det_ids[?] < 0 OR match_scores[?] < ?, false) AS missed
    FROM gt_matches WHERE model_id IN (?, ?) AND (area_mask & 1) = 1),
vl_words AS (
    SELECT image_id,
           bit_or(bit) FILTER (WHERE model_id = ?) & bit_or(bit) FILTER (WHERE model_id = ?) AS in_both,
           coalesce(bit_or(bit) FILTER (WHERE model_id = ? AND found), 0) AS b_found,
           coalesce(bit_or(bit) FILTER (WHERE model_id = ? AND found), 0) AS c_found,
           count(*) FILTER (WHERE model_id = ? AND missed) AS b_fn,
           count(*) FILTER (WHERE model_id = ? AND missed) AS c_fn
    FROM vl_gt GROUP BY image_id, word),
vl_gts AS (
    SELECT image_id, sum(b_fn) AS b_fn, sum(c_fn) AS c_fn,
           sum(bit_count(in_both)) AS gts,
           sum(bit_count(in_both & b_found)) AS b_tp,
           sum(bit_count(in_both & c_found)) AS c_tp,
           sum(bit_count(in_both & b_found & ~c_found)) AS missed,
           sum(bit_count(in_both & c_found & ~b_found)) AS newly_found
    FROM vl_words GROUP BY image_id)
SELECT i.image_id, coalesce(d.b_fp, 0)::INTEGER AS b_fp, coalesce(d.c_fp, 0)::INTEGER AS c_fp,
       coalesce(g.b_fn, 0)::INTEGER AS b_fn, coalesce(g.c_fn, 0)::INTEGER AS c_fn,
       coalesce(g.gts, 0)::INTEGER AS gts, coalesce(g.b_tp, 0)::INTEGER AS b_tp,
       coalesce(g.c_tp, 0)::INTEGER AS c_tp, coalesce(g.missed, 0)::INTEGER AS missed,
       coalesce(g.newly_found, 0)::INTEGER AS newly_found
FROM images AS i LEFT JOIN vl_det AS d USING (image_id) LEFT JOIN vl_gts AS g USING (image_id)
"""


def _detection_per_image(store: Store, baseline: str, candidate: str, thresholds: dict, n: int) -> _PerImage:
    from .matching import bit_index, score_value, threshold_index

    t = threshold_index(thresholds["iou"])
    bit, score, at = bit_index(t, 0), score_value(thresholds["score_threshold"]), t + 1  # lists are 1-based
    both = [baseline, candidate]
    table = store.arrow(_DETECTION_CHANGES_SQL, [baseline, bit, candidate, bit, *both, score,
                                                 at, at, score, at, at, score, *both, *both, *both, *both])
    ids = table.column("image_id").to_numpy().astype(np.int64)

    def per_image(name: str) -> np.ndarray:
        values = np.zeros(n, np.int32)  # an image's count of boxes: 4 bytes, 4 MiB per million images
        values[ids] = table.column(name).to_numpy()
        return values

    b_fp, c_fp, b_fn, c_fn, missed, newly_found = (per_image(name) for name in (
        "b_fp", "c_fp", "b_fn", "c_fn", "missed", "newly_found"))
    evaluated = np.zeros(n, bool)
    evaluated[ids] = True
    disagree = (b_fp != c_fp) | (missed > 0) | (newly_found > 0)
    total = {name: int(pc.sum(table.column(name)).as_py() or 0) for name in ("gts", "b_tp", "c_tp")}
    counts = {"ground_truths": total["gts"], "baseline_tp": total["b_tp"],
              "candidate_tp": total["c_tp"], "newly_missed": int(missed.sum()),
              "newly_found": int(newly_found.sum()), "baseline_fp": int(b_fp.sum()), "candidate_fp": int(c_fp.sum())}
    return _PerImage(evaluated, (b_fp + b_fn == 0) & evaluated, (c_fp + c_fn == 0) & evaluated,
                     disagree & evaluated, missed > 0, counts)


def parse_named(name: str, query: str, catalog: Catalog) -> ParsedQuery:
    """A named cohort's query, parsed strictly; errors say which cohort they are about."""
    try:
        return parse_query(query, catalog)
    except CohortError as error:
        raise CohortError(f"cohort {name!r}: {error.message}", field=error.field, choices=error.choices) from None


def run_thresholds(catalog: Catalog, iou: float, score_threshold: float | None,
                   label_threshold: float | None) -> dict:
    """``iou``, ``score_threshold`` and ``label_threshold`` of a run: those given, else the store's."""
    return {
        "iou": float(iou),
        "score_threshold": catalog.default_score_threshold if score_threshold is None else float(score_threshold),
        "label_threshold": catalog.default_label_threshold if label_threshold is None else float(label_threshold),
    }


def cohort_thresholds(view: ViewState, thresholds: dict) -> dict:
    """The run's thresholds, with those a cohort's own query sets (``iou``, ``conf``, ``thr``) in their place:
    a row opens, by its link, on the figures it shows."""
    own = {"iou": view.iou, "score_threshold": view.conf, "label_threshold": view.thr}
    return {name: float(own[name]) if own.get(name) is not None else value for name, value in thresholds.items()}


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _delta(baseline: dict, candidate: dict) -> dict:
    return {k: (None if baseline.get(k) is None or candidate.get(k) is None else candidate[k] - baseline[k])
            for k in baseline}


def compare_models(store: Store | str, baseline: str, candidate: str, *,
                   cohorts: Sequence[tuple[str, str]] | None = None, iou: float = 0.5,
                   score_threshold: float | None = None, label_threshold: float | None = None,
                   state: "StateDB | None" = None, max_inline: int = MAX_INLINE_IDS,
                   links: bool = True, evaluate: "Evaluator | None" = None) -> ComparisonResult:
    """Compare ``candidate`` with ``baseline`` on the whole dataset and on each ``(name, query)`` cohort.

    Thresholds default to the store's (``score_threshold`` for detection,
    ``label_threshold`` for multilabel). Raises EvalError for an unknown model,
    a model of another task, or the same model twice; CohortError for a
    query that does not parse. ``links=False`` leaves every image set's
    query out (and so never saves a cohort), for callers that only count. ``evaluate``: as
    for ``model_metrics``.
    """
    if not isinstance(store, Store):
        store = Store(store)
    catalog = catalog_of(store)
    check_models(store, catalog, {"baseline": baseline, "candidate": candidate})
    if baseline == candidate:
        raise EvalError(f"baseline and candidate are the same model {baseline!r}; choose two",
                        field="candidate", choices=[m for m in catalog.models if m != baseline])
    thresholds = run_thresholds(catalog, iou, score_threshold, label_threshold)
    per_image = {}  # per-image outcomes of both models, by thresholds (a cohort's query may set its own)

    def outcomes(at: dict) -> tuple[_PerImage, int]:
        key = tuple(sorted(at.items()))
        if key not in per_image:
            per_image[key] = _per_image(store, catalog, baseline, candidate, at)
        return per_image[key]

    names = metric_names(catalog.task)
    label = f"{candidate} vs {baseline}"

    def image_set(kind: str, mask: np.ndarray, scope: str, at: dict) -> ImageSet:
        ids = np.flatnonzero(mask)
        title = f"{kind}: {label}{threshold_words(catalog.task, at)}" + ("" if scope == ALL_IMAGES else f" in {scope}")
        query = image_set_query(store, ids, title, state=state, max_inline=max_inline) if links else None
        return ImageSet(title, len(ids), query, ids)

    results = []
    for name, query in [(ALL_IMAGES, "")] + list(cohorts or []):
        parsed = parse_named(name, query, catalog)
        view_model = parsed.view.model or baseline
        at = cohort_thresholds(parsed.view, thresholds)
        per, n = outcomes(at)
        selection = compile_cohort(parsed.cohort, store, model_id=view_model, state=state, catalog=catalog, **at)
        ids = store.query(f"SELECT image_id FROM ({selection[0]}) AS s", selection[1])["image_id"]
        members = np.zeros(n, bool)
        members[ids.to_numpy(dtype=np.int64)] = True
        count = len(ids)
        metrics = {m: model_metrics(store, catalog.task, m, selection, evaluate=evaluate, **at)
                   for m in (baseline, candidate)}
        b_ok, c_ok = per.baseline_correct & members, per.candidate_correct & members
        evaluated = per.evaluated & members
        b_wrong, c_wrong = evaluated & ~b_ok, evaluated & ~c_ok
        results.append(CohortComparison(
            name=name, query=to_query(parsed.cohort, ViewState(model=parsed.view.model, iou=parsed.view.iou,
                                                                  conf=parsed.view.conf, thr=parsed.view.thr)),
            count=count,
            evaluated=int(evaluated.sum()), baseline=metrics[baseline], candidate=metrics[candidate],
            delta=_delta(metrics[baseline], metrics[candidate]),
            btc=_share(int((b_ok & c_ok).sum()), int(b_ok.sum())),
            bec=_share(int((c_wrong & b_wrong).sum()), int(c_wrong.sum())),
            new_errors=image_set("New errors", b_ok & c_wrong, name, at),
            fixed_errors=image_set("Fixed errors", b_wrong & c_ok, name, at),
            disagreements=image_set("Disagreements", per.disagree & members, name, at)))
    objects = None
    per, _ = outcomes(thresholds)
    if per.object_counts is not None:
        objects = ObjectComparison(**per.object_counts, newly_missed_images=image_set(
            "Newly missed objects", per.newly_missed, ALL_IMAGES, thresholds))
    return ComparisonResult(store.name, catalog.task, baseline, candidate, thresholds, names, tuple(results),
                            objects)


def threshold_words(task: str, thresholds: dict) -> str:
    """" (IoU 0.5, score ≥ 0.5)" for detection, " (label threshold 0.5)" for multilabel, "" for multiclass."""
    if task == "detection":
        return f" (IoU {thresholds['iou']:g}, score ≥ {thresholds['score_threshold']:g})"
    if task == "multilabel":
        return f" (label threshold {thresholds['label_threshold']:g})"
    return ""


# --------------------------------------------------------------------------- CLI


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def comparison_lines(result: ComparisonResult) -> list[str]:
    """The plain-text report ``visionlens compare`` prints."""
    lines = [f"store {result.store} ({result.task}): candidate {result.candidate} vs baseline {result.baseline}"]
    for c in result.cohorts:
        lines.append("")
        lines.append(f"[{c.name}] {c.count} images" + (f"  ?{c.query}" if c.query else ""))
        width = max(len(m) for m in result.metric_names)
        lines.append(f"  {'metric'.ljust(width)}  {'baseline':>9}  {'candidate':>9}  {'delta':>9}")
        for m in result.metric_names:
            lines.append(f"  {m.ljust(width)}  {_fmt(c.baseline[m]):>9}  {_fmt(c.candidate[m]):>9}  "
                         f"{_fmt(c.delta[m], signed=True):>9}")
        lines.append(f"  BTC {_fmt(c.btc)}  BEC {_fmt(c.bec)}")
        for s in (c.new_errors, c.fixed_errors, c.disagreements):
            lines.append(f"  {s.name.split(':')[0].lower()}: {s.count}" + (f"  ?{_short(s.query)}" if s.query else ""))
    if result.objects is not None:
        o = result.objects
        lines += ["", f"objects: {o.ground_truths} ground truths; found {o.baseline_tp} → {o.candidate_tp}; "
                      f"newly missed {o.newly_missed}, newly found {o.newly_found}; "
                      f"false positives {o.baseline_fp} → {o.candidate_fp}"]
    return lines


def _short(query: str, limit: int = 100) -> str:
    """A long id list shown by its head (``--json`` gives the whole query)."""
    return query if len(query) <= limit else query[:limit].rsplit(",", 1)[0] + ",…"


def compare_main(argv: list[str] | None = None) -> int:
    """``visionlens compare STORE --baseline A --candidate B [--cohort QUERY]... [--iou X] [--json]``."""
    parser = argparse.ArgumentParser(prog="visionlens compare", description="compare a baseline and a candidate model")
    parser.add_argument("store", help="path to NAME.duckdb")
    parser.add_argument("--baseline", required=True, help="model id of the baseline")
    parser.add_argument("--candidate", required=True, help="model id of the candidate")
    add_cohort_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = compare_models(args.store, args.baseline, args.candidate, cohorts=named_cohorts(args.cohort),
                            iou=args.iou, score_threshold=args.score_threshold,
                            label_threshold=args.label_threshold)
    if args.json:
        sys.stdout.write(json.dumps(result.to_dict()) + "\n")
    else:
        sys.stdout.write("\n".join(comparison_lines(result)) + "\n")
    return 0


def add_cohort_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cohort`` (repeatable) and the thresholds, as ``compare`` and ``report`` take them."""
    parser.add_argument("--cohort", action="append", default=[], metavar="QUERY",
                        help="a cohort query string, or NAME::QUERY to name it (repeatable); iou=, conf= or thr= "
                             "in it set that cohort's own thresholds")
    parser.add_argument("--iou", type=float, default=0.5, help="IoU threshold (detection, default 0.5)")
    parser.add_argument("--score-threshold", type=float, help="detection score threshold (default: the store's)")
    parser.add_argument("--label-threshold", type=float, help="multilabel label threshold (default: the store's)")


def named_cohorts(values: Sequence[str]) -> list[tuple[str, str]]:
    """``NAME::QUERY`` or a bare ``QUERY`` (named by itself) → (name, query) pairs."""
    out = []
    for value in values:
        name, sep, query = value.partition("::")
        out.append((name.strip(), query) if sep else (value, value))
    return out
