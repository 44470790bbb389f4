"""Robustness results as stored: curves per cohort, breaking points and flip strengths.

Reading only, without torch: the Robustness page and the flyout show what is
stored here before anything runs. Running the model on perturbed images
(what-if, sweeps, the flip-strength search) is ``core.rerun``, which writes
these tables as parts:

``robustness``  one row per (model_id, image_id, perturbation, level, run_id):
    ``pred_label``, ``score``, ``probs`` (classification), ``pred_labels``
    (multilabel at the store's label threshold; detection: classes detected at
    the store's score threshold), ``correct`` (at those defaults; multilabel:
    exact match; detection: no FP and no FN at IoU 0.5), ``n_tp``, ``n_fp``,
    ``n_fn`` (detection, same defaults), ``seed``.
``robustness_dets``  detection only, one row per detection: ``det_id`` (rank
    in the model's output), ``class_id``, ``score``, and ``rank``,
    ``tp_mask``, ``ignored_mask``, ``area_mask`` as in ``det_matches``.
``robustness_gts``  detection only, one row per ground-truth box of the
    (perturbed) image: ``gt_id``, ``class_id``, ``area_mask`` and
    ``match_scores`` (partner score per IoU threshold, NaN when missed), as in
    ``gt_matches``.
``counterfactuals``  per image the smallest strength (per kind and direction)
    that changes the prediction: (model_id, image_id, perturbation, direction,
    bound, flip_strength (signed, NULL when the prediction never changes up to
    ``bound``), resolution, seed, run_id).
``whatif_snapshots``  perturbed images saved from the flyout with their settings.

``run_id`` tells runs apart; readers take the newest run of each key, so two
runs of the same key never count twice.

- ``robustness_curves``: per cohort and strength, the task's metric (accuracy /
  macro F1, exact match / macro F1, mAP at the IoU / COCO AP), computed exactly
  as ``core.metrics`` computes the stored one, and the flip rate: the share of
  images whose prediction (class, label set, or detected class set at the score
  threshold) differs from the stored prediction. ``breaking_points`` gives the
  strength at which each cohort falls below a target.
- ``counterfactual_frame_sql`` turns ``counterfactuals`` into one column per
  kind and direction (``flip_blur``, ``flip_brightness_down``…).
- ``describe_outcome`` puts a prediction in words; ``robustness_main`` is the
  ``visionlens robustness`` command.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from . import perturbation_kinds as P
from .errors import EvalError
from .matching import MAX_DETS, N_AREAS, threshold_index
from .metrics.classification import indicator, multilabel_arrays, multilabel_scores, multiclass_scores
from .metrics.detection import accumulate
from .store import Store

log = logging.getLogger(__name__)

TABLE = "robustness"
DETS_TABLE = "robustness_dets"
GTS_TABLE = "robustness_gts"
COUNTERFACTUALS = "counterfactuals"
SNAPSHOTS = "whatif_snapshots"
METRICS = {"multiclass": ("accuracy", "f1_macro"), "multilabel": ("exact_match", "f1_macro"),
           "detection": ("mAP", "AP")}
METRIC_LABELS = {"accuracy": "Accuracy", "f1_macro": "Macro F1", "exact_match": "Exact match",
                 "mAP": "mAP at the IoU", "AP": "COCO AP (IoU .50:.95)"}
DIRECTIONS = {1: "up", -1: "down"}
# Probabilities closer than this are a tie: float32 softmax of equal logits can differ in the last bits.
TIE_TOLERANCE = 1e-6
Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------- a prediction in words


@dataclass(frozen=True)
class Outcome:
    """A prediction of one image: decided labels (class ids), probabilities or boxes."""

    labels: tuple[int, ...]
    probs: np.ndarray | None = None
    score: float | None = None
    boxes: pd.DataFrame | None = None  # detection: ``objects`` at the chosen IoU and score threshold
    counts: tuple[int, int, int] | None = None  # detection: TP, FP, FN

    def tied_top(self, task: str) -> list[int]:
        """Multiclass: the classes sharing the highest probability when two or more do (argmax then
        picks the first of them, not the model); empty otherwise."""
        if task != "multiclass" or self.probs is None or len(self.probs) < 2:
            return []
        probs = np.asarray(self.probs, dtype=np.float64)
        top = np.flatnonzero(np.isclose(probs, probs.max(), rtol=0.0, atol=TIE_TOLERANCE))
        return top.tolist() if len(top) > 1 else []


def describe_outcome(outcome: Outcome, classes: Sequence[str], task: str) -> str:
    """``three (0.912)``, ``{one, seven}`` or ``2 TP, 1 FP, 0 FN``: a prediction in words."""
    names = [classes[k] if 0 <= k < len(classes) else str(k) for k in outcome.labels]
    if task == "multiclass":
        return f"{names[0]} ({outcome.score:.3f})"
    if task == "multilabel":
        return "{" + ", ".join(names) + "}"
    tp, fp, fn = outcome.counts
    return f"{tp} TP, {fp} FP, {fn} FN ({', '.join(names) or 'nothing'} detected)"


# --------------------------------------------------------------------------- curves


def _latest(table: str, keys: str) -> str:
    # The newest run of each key: a key swept twice counts once.
    return f'SELECT * FROM "{table}" WHERE model_id = ? AND perturbation = ? ' \
           f"QUALIFY dense_rank() OVER (PARTITION BY {keys} ORDER BY run_id DESC) = 1"


def _cohort_filter(selection: tuple[str, list] | None, column: str = "image_id") -> tuple[str, str, list]:
    """(WITH clause, condition on ``column``, params) restricting rows to a selection's images."""
    if selection is None:
        return "", "", []
    sql, params = selection
    return f"WITH vl_sel AS ({sql}) ", f"AND {column} IN (SELECT image_id FROM vl_sel)", list(params)


def swept(store: Store, model_id: str) -> pd.DataFrame:
    """What is stored: perturbation, level, images (one row per perturbation and level)."""
    if not store.has_table(TABLE):
        return pd.DataFrame({"perturbation": [], "level": [], "images": []})
    return store.query(f'SELECT perturbation, level, count(DISTINCT image_id) AS images FROM "{TABLE}" '
                       "WHERE model_id = ? GROUP BY perturbation, level ORDER BY perturbation, abs(level)", [model_id])


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else float("nan")


def _classification_levels(store: Store, model_id: str, perturbation: str, selection, label_threshold: float
                           ) -> list[dict]:
    head, where, params = _cohort_filter(selection, "r.image_id")
    n_classes = len(store.classes)
    if store.task == "multiclass":
        frame = store.query(
            f"{head}SELECT r.level, i.true_label, r.pred_label, p.pred_label AS reference "
            f"FROM ({_latest(TABLE, 'image_id, level')}) AS r JOIN images AS i USING (image_id) "
            f'LEFT JOIN (SELECT image_id, pred_label FROM "predictions" WHERE model_id = ?) AS p USING (image_id) '
            f"WHERE true {where}",
            params + [model_id, perturbation, model_id])
        out = []
        for level, rows in frame.groupby("level", sort=True):
            known = rows["true_label"].notna().to_numpy()
            y_true = rows["true_label"].to_numpy()[known].astype(np.int64)
            y_pred = rows["pred_label"].to_numpy()[known].astype(np.int64)
            scores = multiclass_scores(y_true, y_pred, n_classes)
            has_ref = rows["reference"].notna().to_numpy()
            flips = rows["pred_label"].to_numpy()[has_ref] != rows["reference"].to_numpy()[has_ref]
            out.append({"level": float(level), "accuracy": scores["accuracy"], "f1_macro": scores["f1_macro"],
                        "flip_rate": float(flips.mean()) if len(flips) else float("nan"), "images": len(rows)})
        return out
    table = store.arrow(
        f"{head}SELECT r.image_id, r.level, i.true_label, r.probs FROM ({_latest(TABLE, 'image_id, level')}) AS r "
        f"JOIN images AS i USING (image_id) WHERE true {where} "
        f"ORDER BY r.level, r.image_id", params + [model_id, perturbation])
    levels = table.column("level").to_numpy()
    ids = table.column("image_id").to_numpy().astype(np.int64)
    y_true = indicator(table.column("true_label"), n_classes)
    probs = table.column("probs").combine_chunks()
    values = probs.flatten().to_numpy(zero_copy_only=False).reshape(-1, n_classes)
    y_pred = values >= values.dtype.type(label_threshold)
    ref_ids, _, ref_pred, _ = multilabel_arrays(store, model_id, selection, label_threshold)
    position = pd.Series(np.arange(len(ref_ids)), index=ref_ids.astype(np.int64))
    out = []
    for level in np.unique(levels):
        mine = levels == level
        scores = multilabel_scores(y_true[mine], y_pred[mine])
        where_ref = position.reindex(ids[mine]).to_numpy()
        has_ref = ~np.isnan(where_ref)
        flips = (y_pred[mine][has_ref] != ref_pred[where_ref[has_ref].astype(np.int64)]).any(axis=1)
        out.append({"level": float(level), "exact_match": scores["exact_match"], "f1_macro": scores["f1_macro"],
                    "flip_rate": float(flips.mean()) if len(flips) else float("nan"), "images": int(mine.sum())})
    return out


def _detection_levels(store: Store, model_id: str, perturbation: str, selection, iou: float,
                      score_threshold: float) -> list[dict]:
    head, where, params = _cohort_filter(selection)
    t = threshold_index(iou)
    n_classes = len(store.classes)
    runs = f"SELECT image_id, level, run_id FROM ({_latest(TABLE, 'image_id, level')}) WHERE true {where}"
    images = store.query(f"{head}{runs}", params + [model_id, perturbation])
    dets = store.query(
        f"{head}SELECT d.image_id, d.level, d.class_id, d.score, d.rank, d.tp_mask, d.ignored_mask, d.area_mask "
        f'FROM "{DETS_TABLE}" AS d JOIN ({runs}) AS r USING (image_id, level, run_id) '
        f"WHERE d.model_id = ? AND d.perturbation = ? AND d.score >= ? AND d.rank < ?",
        params + [model_id, perturbation, model_id, perturbation, float(score_threshold), MAX_DETS[-1]])
    gts = store.query(
        f'{head}SELECT g.image_id, g.level, g.class_id, g.area_mask FROM "{GTS_TABLE}" AS g '
        f"JOIN ({runs}) AS r USING (image_id, level, run_id) WHERE g.model_id = ? AND g.perturbation = ?",
        params + [model_id, perturbation, model_id, perturbation])
    flips = store.query(
        f"{head}SELECT r.level, coalesce(rd.classes, CAST([] AS INTEGER[])) "
        f"<> coalesce(sd.classes, CAST([] AS INTEGER[])) AS flipped FROM ({runs}) AS r "
        f"LEFT JOIN (SELECT image_id, level, run_id, list_sort(list_distinct(list(class_id))) AS classes "
        f'FROM "{DETS_TABLE}" WHERE model_id = ? AND perturbation = ? AND score >= ? GROUP BY ALL) AS rd '
        f"USING (image_id, level, run_id) "
        f"LEFT JOIN (SELECT image_id, list_sort(list_distinct(list(class_id))) AS classes "
        f'FROM "det_boxes" WHERE model_id = ? AND score >= ? GROUP BY ALL) AS sd USING (image_id)',
        params + [model_id, perturbation, model_id, perturbation, float(score_threshold), model_id,
                  float(score_threshold)])
    out = []
    for level in np.unique(images["level"].to_numpy()):
        d = dets[dets["level"] == level]
        g = gts[gts["level"] == level]
        cls = d["class_id"].to_numpy(np.int64)
        order = np.lexsort((d["rank"].to_numpy(), d["image_id"].to_numpy(), -d["score"].to_numpy(), cls))
        n_gt = np.zeros((n_classes, N_AREAS), np.int64)
        area = g["area_mask"].to_numpy(np.int64)
        for a in range(N_AREAS):
            counted = ((area >> a) & 1).astype(bool)
            n_gt[:, a] = np.bincount(g["class_id"].to_numpy(np.int64)[counted], minlength=n_classes)[:n_classes]
        acc = accumulate(cls[order], d["rank"].to_numpy(np.int64)[order], d["tp_mask"].to_numpy(np.int64)[order],
                         d["ignored_mask"].to_numpy(np.int64)[order], d["area_mask"].to_numpy(np.int64)[order],
                         d["score"].to_numpy(np.float64)[order], n_gt)
        flipped = flips.loc[flips["level"] == level, "flipped"].to_numpy(bool)
        out.append({"level": float(level), "mAP": _mean_valid(acc.precision[t, :, :, 0]),
                    "AP": _mean_valid(acc.precision[:, :, :, 0]),
                    "flip_rate": float(flipped.mean()) if len(flipped) else float("nan"),
                    "images": int((images["level"] == level).sum())})
    return out


def robustness_curves(store: Store, model_id: str, perturbation: str,
                      cohorts: Mapping[str, tuple[str, list] | None], *, iou: float = 0.5,
                      score_threshold: float = 0.0, label_threshold: float = 0.5) -> pd.DataFrame:
    """One row per cohort and stored level: the task's metrics, ``flip_rate`` and ``images``.

    ``cohorts`` maps a name to a selection (``(sql, params)`` of ``SELECT image_id``,
    e.g. ``core.cohorts.compile_cohort``; None for every image). Metrics cover the
    cohort's swept images and equal ``core.metrics`` on the same images and
    thresholds at level 0 (no perturbation).
    """
    P.kind(perturbation)
    columns = ["cohort", "level", *METRICS[store.task], "flip_rate", "images"]
    if not store.has_table(TABLE):
        return pd.DataFrame(columns=columns)
    rows = []
    for name, selection in cohorts.items():
        if store.task == "detection":
            levels = _detection_levels(store, model_id, perturbation, selection, iou, score_threshold)
        else:
            levels = _classification_levels(store, model_id, perturbation, selection, label_threshold)
        rows.extend({"cohort": name, **entry} for entry in levels)
    return pd.DataFrame(rows, columns=columns)


def breaking_points(curves: pd.DataFrame, metric: str, target: float) -> pd.DataFrame:
    """Per cohort the strength at which ``metric`` first falls below ``target``, interpolated
    linearly between the stored levels (ordered by magnitude); ``strength`` is 0 when even the
    unperturbed metric is below, NaN when it never falls below."""
    out = []
    for cohort, rows in curves.groupby("cohort", sort=False):
        rows = rows.iloc[np.argsort(np.abs(rows["level"].to_numpy()), kind="stable")]
        levels, values = rows["level"].to_numpy(float), rows[metric].to_numpy(float)
        below = np.flatnonzero(values < target)
        if not len(below):
            strength = float("nan")
        elif below[0] == 0:
            strength = float(levels[0])
        else:
            i = below[0]
            fraction = (values[i - 1] - target) / (values[i - 1] - values[i])
            strength = float(levels[i - 1] + fraction * (levels[i] - levels[i - 1]))
        out.append({"cohort": cohort, "strength": strength})
    return pd.DataFrame(out, columns=["cohort", "strength"])


# --------------------------------------------------------------------------- flip strengths as cohort columns


def counterfactual_column(perturbation: str, direction: int) -> str:
    """The cohort column of a kind and direction: ``flip_blur``, ``flip_brightness_down``…"""
    kind = P.kind(perturbation)
    return f"flip_{perturbation}_{DIRECTIONS[direction]}" if kind.signed else f"flip_{perturbation}"


def _counterfactual_pairs(store: Store) -> list[tuple[str, int]]:
    if not store.has_table(COUNTERFACTUALS):
        return []
    pairs = store.rows(f'SELECT DISTINCT perturbation, direction FROM "{COUNTERFACTUALS}" ORDER BY ALL')
    return [(p, int(d)) for p, d in pairs if p in P.KINDS]


def counterfactual_columns(store: Store) -> list[tuple[str, str]]:
    """(column, label) per stored kind and direction, e.g. ``("flip_blur", "Flips under blur at
    (sigma, px)")``: the cohort columns ``counterfactual_frame_sql`` provides."""
    out = []
    for perturbation, direction in _counterfactual_pairs(store):
        kind = P.KINDS[perturbation]
        way = f" ({DIRECTIONS[direction]})" if kind.signed else ""
        out.append((counterfactual_column(perturbation, direction),
                    f"Flips under {kind.label.lower()}{way} at ({kind.unit})"))
    return out


def counterfactual_frame_sql(store: Store, model_id: str) -> tuple[str, list, list[str]]:
    """``(sql, params, columns)``: one row per image of ``model_id`` with a column per stored kind
    and direction (``counterfactual_column``): the magnitude of the smallest strength that
    flips the prediction, NULL when none does up to the searched bound (newest run of each key).
    Empty SQL when the store has no counterfactuals."""
    pairs = _counterfactual_pairs(store)
    if not pairs:
        return "", [], []
    columns = [counterfactual_column(p, d) for p, d in pairs]
    pivot = ", ".join(f'max(abs(flip_strength)) FILTER (WHERE perturbation = ? AND direction = ?) AS "{c}"'
                      for c in columns)
    params: list = [v for pair in pairs for v in pair]
    sql = (f"SELECT image_id{', ' if pivot else ''}{pivot} FROM (SELECT * FROM \"{COUNTERFACTUALS}\" "
           "WHERE model_id = ? QUALIFY dense_rank() OVER (PARTITION BY image_id, perturbation, direction "
           "ORDER BY run_id DESC) = 1) GROUP BY image_id")
    return sql, params + [model_id], columns


def counterfactuals(store: Store, model_id: str) -> pd.DataFrame:
    """One row per image with a flip column per stored kind and direction (see
    ``counterfactual_frame_sql``)."""
    sql, params, _ = counterfactual_frame_sql(store, model_id)
    if not sql:
        return pd.DataFrame({"image_id": []})
    return store.query(f"SELECT * FROM ({sql}) ORDER BY image_id", params)


# --------------------------------------------------------------------------- command line


def parse_levels(text: str) -> list[float]:
    """``0, 1.5,3`` → [0.0, 1.5, 3.0]; EvalError naming the field otherwise."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"levels must be numbers separated by commas, got {text!r}", field="levels") from None


def _bar(label: str) -> Progress:
    def draw(done: int, total: int) -> None:
        width = 30
        filled = int(width * done / total) if total else width
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} images")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return draw


def robustness_main(argv: list[str] | None = None) -> int:
    """``visionlens robustness STORE --perturb KIND --levels 0,1,2,4 [--cohort QUERY]... [--model M]
    [--device cpu|cuda] [--counterfactual]``."""
    from .rerun import DEFAULT_BATCH, Runner, run_counterfactuals, run_sweep  # torch: the command runs the model

    parser = argparse.ArgumentParser(prog="visionlens robustness",
                                     description="re-run a model on perturbed images: robustness curves per "
                                                 "cohort and per-image flip strengths (resumable)")
    parser.add_argument("store", help="path to NAME.duckdb")
    parser.add_argument("--perturb", required=True, help=f"one of {', '.join(P.KINDS)} (comma-separated for several)")
    parser.add_argument("--levels", help="strengths, comma-separated (default: the kind's six levels)")
    parser.add_argument("--cohort", action="append", default=[],
                        help="cohort query string; repeat for several (default: every image)")
    parser.add_argument("--model", help="model id (default: the model added to the store first)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--counterfactual", action="store_true",
                        help="also find each image's smallest flipping strength (bisection)")
    parser.add_argument("--no-sweep", action="store_true", help="only the counterfactual search")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.perturb.split(",") if k.strip()]
    for name in kinds:
        P.kind(name)
    if args.levels and len(kinds) > 1:
        raise EvalError("--levels applies to one perturbation at a time", field="levels")
    if args.batch_size < 1:
        raise EvalError("--batch-size must be at least 1", field="batch-size")
    store = Store(args.store)
    model_id = args.model or (store.model_ids() or [None])[0]
    runner = Runner.load(store, model_id, args.device) if model_id else None
    if runner is None:
        raise EvalError("the store has no model to re-run", field="model")
    for name in kinds:
        if not args.no_sweep:
            levels = parse_levels(args.levels) if args.levels else list(P.KINDS[name].levels)
            summary = run_sweep(args.store, name, levels, model_id=model_id, cohorts=args.cohort,
                                batch_size=args.batch_size, seed=args.seed, runner=runner,
                                progress=_bar(f"{name} sweep"))
            rate = summary.rows_written / summary.seconds if summary.seconds else float("nan")
            print(f"{name}: {summary.rows_written} image-levels computed, {summary.rows_skipped} already stored "
                  f"({summary.n_images} images x {len(summary.levels)} levels; {rate:.1f} image-levels/s "
                  f"on {runner.device})")
            _print_curves(Store(args.store), model_id, name, args.cohort)
        if args.counterfactual:
            n = run_counterfactuals(args.store, name, model_id=model_id, cohorts=args.cohort,
                                    batch_size=args.batch_size, seed=args.seed, runner=runner,
                                    progress=_bar(f"{name} flip search"))
            print(f"{name}: flip strengths of {n} image-directions stored")
    return 0


def _print_curves(store: Store, model_id: str, perturbation: str, queries: Sequence[str]) -> None:
    from .cohorts import catalog_of, compile_cohort, parse_query

    catalog = catalog_of(store)
    selections: dict[str, tuple[str, list] | None] = {"all images": None}
    for query in queries:
        parsed = parse_query(query, catalog)
        selections[query] = compile_cohort(parsed.cohort, store, model_id=model_id, catalog=catalog,
                                           **parsed.view.thresholds(catalog))
    thresholds = {"iou": 0.5, "score_threshold": 0.0 if store.task == "detection" else catalog.default_score_threshold,
                  "label_threshold": catalog.default_label_threshold}
    curves = robustness_curves(store, model_id, perturbation, selections, **thresholds)
    metric = METRICS[store.task][0]
    for name, rows in curves.groupby("cohort", sort=False):
        points = ", ".join(f"{lv:g}: {v:.3f} (flips {f:.1%})"
                           for lv, v, f in zip(rows["level"], rows[metric], rows["flip_rate"]))
        print(f"  {name}: {metric} {points}")
