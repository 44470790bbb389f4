"""PDF scorecard of one model on one dataset.

``scorecard(store, ...)`` gathers what the scorecard shows (no file written):
the dataset (size, classes, metadata distributions), the model, headline
metrics against the targets the user sets (met / not met), metrics per cohort
and per feature group with fairlearn's between-groups difference and ratio,
the top error slices (``core.slices``), sample errors with their explanation
overlays (or, without explanations, with boxes / labels drawn), the
comparison with a baseline when one is given (``core.compare``), and the
review status and notes people left on images and saved cohorts (the
store's state database, ``core.state``; read only).
``render_pdf(card, path)`` lays it out with fpdf2 in a core font (no font
files, no downloads); charts are Altair specs (``core.report_charts``)
rendered to PNG by vl-convert. ``build_report`` does both.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from . import report_charts as charts
from .cohorts import (Catalog, Cohort, Filter, catalog_of, cohort_rows, compile_cohort, parse_query,
                      quote_identifier)
from .compare import (LOWER_IS_BETTER, ComparisonResult, check_models, cohort_thresholds, compare_models,
                      metric_names, model_metrics, parse_named, run_thresholds, threshold_words)
from .errors import EvalError
from .exif import turn_boxes, upright, upright_size
from .slices import MIN_LIFT, Slice, find_slices
from .state import STATUSES, StateDB
from .store import Store

log = logging.getLogger(__name__)

# The metrics that head tables and charts, per task (all headline metrics stay in the first table).
PRIMARY_METRICS = {
    "multiclass": ("accuracy", "f1_macro", "precision_macro", "recall_macro"),
    "multilabel": ("exact_match", "f1_micro", "f1_macro", "hamming_loss"),
    "detection": ("mAP", "AP", "precision", "recall"),
}
# Detection's precision, recall and F1 are means over the classes (``compare.model_metrics``).
_METRIC_WORDS = {"mAP": "AP at IoU", "AP": "AP (IoU .50:.95)", "exact_match": "Exact match",
                 "hamming_loss": "Hamming loss", "precision": "Precision (macro)", "recall": "Recall (macro)",
                 "f1": "F1 (macro)"}
MAX_FEATURES = 4  # feature-group sections in the scorecard
MAX_GROUP_VALUES = 12  # a categorical column with more values is not a readable group chart
GROUP_BINS = 4  # equal-width bins of a numeric feature group: the model overview's default
SAMPLE_SIDE = 320  # px, longest side of a sample image in the PDF (about 42 mm wide there)
MAX_REVIEW_ROWS = 60  # review notes listed in the PDF (all are counted)


def metric_label(name: str) -> str:
    """"f1_macro" → "F1 (macro)"; COCO names stay as they are."""
    if name in _METRIC_WORDS:
        return _METRIC_WORDS[name]
    head, _, avg = name.partition("_")
    head = {"f1": "F1"}.get(head, head.capitalize() if head.islower() else head)
    return f"{head} ({avg})" if avg else head


# --------------------------------------------------------------------------- content


@dataclass(frozen=True)
class TargetCheck:
    metric: str
    value: float | None
    target: float

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.target if self.metric in LOWER_IS_BETTER else self.value >= self.target


@dataclass(frozen=True)
class Distribution:
    """One metadata column's distribution: numeric bins or value counts."""

    column: str
    title: str
    kind: str  # numeric | categorical
    counts: pd.DataFrame  # numeric: start, end, images; categorical: value, images


@dataclass(frozen=True)
class FeatureGroups:
    """A feature's groups with their metrics and fairlearn's between-groups difference / ratio."""

    column: str
    title: str
    table: pd.DataFrame  # group, images, accuracy, error_rate
    difference: float
    ratio: float


@dataclass(frozen=True)
class Sample:
    image_id: int
    caption: str
    image: Image.Image = field(repr=False)
    shows: str  # explanation method, "boxes" or "labels"


@dataclass(frozen=True)
class ReviewNote:
    """The review status and note of one image or one saved cohort."""

    kind: str  # image | cohort
    target: int  # image id or saved cohort id
    name: str  # "Image 12", or the saved cohort's name
    status: str  # open | reviewed | fixed
    note: str
    updated: str  # ISO time, UTC


@dataclass(frozen=True)
class Scorecard:
    """Everything the PDF shows, computed from the store."""

    store: str
    task: str
    created: str
    n_images: int
    classes: tuple[str, ...]
    class_counts: pd.DataFrame  # class, images
    model: dict  # model_id, name, source, predicted
    thresholds: dict
    metric_names: tuple[str, ...]
    headline: dict
    targets: tuple[TargetCheck, ...]
    distributions: tuple[Distribution, ...]
    cohorts: pd.DataFrame  # cohort, query, images, one column per metric
    groups: tuple[FeatureGroups, ...]
    overall_error_rate: float | None
    slices: tuple[Slice, ...]
    samples: tuple[Sample, ...]
    comparison: ComparisonResult | None = None
    baseline_name: str | None = None
    reviews: tuple[ReviewNote, ...] = ()

    @property
    def primary(self) -> tuple[str, ...]:
        return PRIMARY_METRICS[self.task]

    def review_counts(self) -> dict[str, dict[str, int]]:
        """kind → status → how many images / saved cohorts have that review status."""
        counts = {kind: dict.fromkeys(STATUSES, 0) for kind in ("cohort", "image")}
        for review in self.reviews:
            counts[review.kind][review.status] += 1
        return counts


def parse_targets(items: dict[str, float] | None, task: str) -> dict[str, float]:
    """Check target names against the task's metrics and values as numbers."""
    valid = metric_names(task)
    out = {}
    for name, value in (items or {}).items():
        if name not in valid:
            raise EvalError(f"no metric {name!r} to set a target for", field="target", choices=list(valid))
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise EvalError(f"target for {name} is not a number: {value!r}", field="target") from None
        if not math.isfinite(number):
            raise EvalError(f"target for {name} must be finite, got {value!r}", field="target")
        out[name] = number
    return out


def _class_counts(store: Store, catalog: Catalog) -> pd.DataFrame:
    # Multiclass: images per class; list labels: images holding the class.
    if catalog.task == "multiclass":
        sql = 'SELECT true_label AS class_id, count(*) AS images FROM "images" GROUP BY 1'
    else:
        sql = ('SELECT class_id, count(*) AS images FROM (SELECT DISTINCT image_id, unnest(true_label) AS class_id '
               'FROM "images") GROUP BY 1')
    counts = store.query(sql).dropna()
    frame = pd.DataFrame({"class_id": np.arange(len(catalog.classes)), "class": list(catalog.classes)})
    frame = frame.merge(counts.astype({"class_id": "int64"}), on="class_id", how="left").fillna({"images": 0})
    frame["images"] = frame["images"].astype(np.int64)
    return frame[["class", "images"]]


def _distributions(store: Store, catalog: Catalog, limit: int = 9) -> tuple[Distribution, ...]:
    """User columns first, then image-quality columns: up to ``limit`` readable distributions."""
    preferred = ("brightness", "contrast", "sharpness", "noise", "colorfulness", "aspect_ratio")
    infos = [i for i in catalog.columns.values() if i.source == "user" and not i.is_list
             and i.values in ("number", "text", "boolean")]
    infos += [catalog.columns[c] for c in preferred if c in catalog.columns]
    chosen = infos[:limit]
    if not chosen:
        return ()
    rows = cohort_rows(store, Cohort(), None, columns=[i.name for i in chosen], catalog=catalog)
    out = []
    for info in chosen:
        values = rows[info.name]
        if values.nunique(dropna=False) < 2:
            continue  # one value everywhere: nothing to see
        if info.values == "number" and values.nunique(dropna=True) > MAX_GROUP_VALUES:
            counts = charts.histogram_bins(pd.to_numeric(values, errors="coerce").to_numpy(
                dtype=np.float64, na_value=np.nan))
            out.append(Distribution(info.name, info.label, "numeric", counts))
        else:
            counts = values.value_counts(dropna=False).sort_index()
            labels = ["(missing)" if pd.isna(v) else _value_text(v) for v in counts.index]
            out.append(Distribution(info.name, info.label, "categorical",
                                    pd.DataFrame({"value": labels, "images": counts.to_numpy()})))
    return tuple(out)


def _value_text(value: object) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _cohort_metrics(store: Store, catalog: Catalog, model_id: str, cohorts: Sequence[tuple[str, str]],
                    thresholds: dict) -> pd.DataFrame:
    """One row per cohort (all images first), at the report's thresholds unless its query sets its own; then
    ``setting`` words them (empty otherwise)."""
    rows = []
    for name, query in [("All images", "")] + list(cohorts):
        parsed = parse_named(name, query, catalog)
        at = cohort_thresholds(parsed.view, thresholds)
        selection = compile_cohort(parsed.cohort, store, model_id=parsed.view.model or model_id, catalog=catalog,
                                   **at)
        count = int(store.scalar(f"SELECT count(*) FROM ({selection[0]}) AS s", selection[1]))
        metrics = model_metrics(store, catalog.task, model_id, selection, **at)
        words = threshold_words(catalog.task, at)
        setting = words if words != threshold_words(catalog.task, thresholds) else ""
        rows.append({"cohort": name, "query": query, "setting": setting, "images": count, **metrics})
    return pd.DataFrame(rows)


def _group_features(store: Store, catalog: Catalog, features: Sequence[str] | None) -> list[str]:
    if features is not None:
        for name in features:
            if name not in catalog.columns or catalog.columns[name].source == "model":
                raise EvalError(f"cannot group by {name!r}", field="features",
                                choices=sorted(n for n, i in catalog.columns.items() if i.source != "model"))
        return list(features)
    user = [n for n, i in catalog.columns.items() if i.source == "user" and not i.is_list and not i.is_identifier
            and i.values in ("number", "text", "boolean")]
    chosen = []
    for name in user:
        info = catalog.columns[name]
        if info.values != "number":
            distinct = int(store.scalar(f'SELECT count(DISTINCT {quote_identifier(name)}) FROM "images"'))
            if not 2 <= distinct <= MAX_GROUP_VALUES:
                continue
        chosen.append(name)
    for name in ("brightness", "sharpness"):
        if len(chosen) >= 2:
            break
        if name in catalog.columns:
            chosen.append(name)
    return chosen[:MAX_FEATURES]


def _feature_groups(store: Store, catalog: Catalog, model_id: str, features: list[str],
                    thresholds: dict) -> tuple[FeatureGroups, ...]:
    from .fairness import cohort_group_metrics

    out = []
    for name in features:
        result = cohort_group_metrics(store, Cohort(), model_id, name, ("accuracy", "error_rate"),
                                      bins=GROUP_BINS, binning="equal", **thresholds)
        table = result.by_group.reset_index().rename(columns={name: "group", "count": "images"})
        table["group"] = table["group"].astype(str)
        out.append(FeatureGroups(name, catalog.columns[name].label,
                                 table[["group", "images", "accuracy", "error_rate"]],
                                 float(result.difference["accuracy"]), float(result.ratio["accuracy"])))
    return tuple(out)


def _load_image(store: Store, image_id: int, uri: str | None) -> tuple[Image.Image, bool] | None:
    """The image file in its stored frame (True), or when the file is gone its stored thumbnail,
    already upright (False)."""
    if uri:
        try:
            with Image.open(uri) as img:
                return img.convert("RGB"), True
        except OSError:
            log.info("image %s unreadable; using its thumbnail", uri)
    jpeg = store.scalar('SELECT jpeg FROM "thumbnails" WHERE image_id = ?', [int(image_id)])
    if jpeg is None:
        return None
    with Image.open(io.BytesIO(bytes(jpeg))) as img:
        return img.convert("RGB"), False


def _names(catalog: Catalog, labels: object) -> str:
    if labels is None or (np.isscalar(labels) and pd.isna(labels)):
        return "none"
    if np.isscalar(labels):
        return catalog.classes[int(labels)]
    names = [catalog.classes[int(c)] for c in labels]
    return ", ".join(names) if names else "none"


def _samples(store: Store, catalog: Catalog, model_id: str, thresholds: dict, top_slice: Slice | None,
             limit: int) -> tuple[Sample, ...]:
    """Errors of the model, those with stored explanations first, then those of the worst slice."""
    if limit <= 0:
        return ()
    errors = Cohort((Filter("error", "eq", True),))
    explained = set()
    if store.has_table("explanations"):
        explained = set(store.query('SELECT DISTINCT image_id FROM "explanations" WHERE model_id = ?',
                                    [model_id])["image_id"].tolist())
    columns = ["image_id", "uri", "width", "height", "true_label", "pred_label", "score",
               *(["exif_orientation"] if "exif_orientation" in catalog.columns else [])]
    candidates = cohort_rows(store, errors, model_id, columns=columns, order_by="-score", limit=2000,
                             catalog=catalog, **thresholds)
    if top_slice is not None:
        in_slice = cohort_rows(store, parse_query(top_slice.query, catalog).cohort.with_filters(*errors.filters),
                               model_id, columns=["image_id"], catalog=catalog, **thresholds)["image_id"]
        slice_ids = set(in_slice.tolist())
    else:
        slice_ids = set()
    rank = candidates["image_id"].map(lambda i: 0 if i in explained else (1 if i in slice_ids else 2))
    chosen = candidates.assign(rank=rank).sort_values(["rank", "score"], ascending=[True, False], kind="stable")
    out = []
    for row in chosen.head(limit).itertuples(index=False):
        loaded = _load_image(store, row.image_id, row.uri)
        if loaded is None:
            continue
        image, stored_frame = loaded
        orientation = getattr(row, "exif_orientation", None)
        shows = "labels"
        if row.image_id in explained and stored_frame:
            # Imported here: they load torch, which a report without maps or boxes does not need.
            from .explain import available_explanations, load_explanation
            from .heatmap import overlay

            maps = available_explanations(store, model_id, row.image_id)
            first = maps.iloc[0]
            attribution = load_explanation(store, model_id, row.image_id, first["method"], int(first["target"]))
            image = overlay(image, attribution)
            shows = str(first["method"])
        if stored_frame:
            image = upright(image, orientation)  # as a viewer shows it (a thumbnail is already)
        # One size for every sample (small images scaled up), so box captions read alike.
        scale = SAMPLE_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
        if catalog.task == "detection":
            from .heatmap import draw_boxes
            from .metrics.detection import image_objects

            boxes = image_objects(store, model_id, int(row.image_id), thresholds["iou"],
                                  thresholds["score_threshold"])
            boxes = boxes[boxes["status"].isin(["tp", "fp", "fn"])].copy()
            # Stored-frame boxes, turned upright and scaled to the picture (from the file or its thumbnail).
            corners = ["xmin", "ymin", "xmax", "ymax"]
            turned = turn_boxes(boxes[corners].to_numpy(), row.width, row.height, orientation)
            boxes[corners] = turned * (image.width / upright_size(row.width, row.height, orientation)[0])
            boxes["text"] = [catalog.classes[int(c)] for c in boxes["class_id"]]  # class only: IoU is too long
            image = draw_boxes(image, boxes)
            shows = "boxes" if shows == "labels" else f"{shows} + boxes"
            caption = f"#{row.image_id}  " + ", ".join(
                f"{(boxes['status'] == s).sum()} {s.upper()}" for s in ("tp", "fp", "fn"))
        else:
            score = "" if pd.isna(row.score) else f" ({row.score:.2f})"
            caption = f"#{row.image_id}  true: {_names(catalog, row.true_label)}  pred: " \
                      f"{_names(catalog, row.pred_label)}{score}"
        out.append(Sample(int(row.image_id), caption, image, shows))
    return tuple(out)


def _review_notes(store: Store) -> tuple[ReviewNote, ...]:
    """Reviews that say something (a status past "open" or a note): saved cohorts first, then images
    by id. The state database is only read (without one there is nothing to list)."""
    state = StateDB.for_store(store.paths.base)
    cohorts = {c.id: c.name for c in state.list_cohorts()}
    notes = []
    for review in state.list_reviews():
        if review.status == "open" and not review.note.strip():
            continue
        name = cohorts[review.target] if review.kind == "cohort" else f"Image {review.target}"
        notes.append(ReviewNote(review.kind, int(review.target), name, review.status, review.note.strip(),
                                review.updated_at))
    return tuple(sorted(notes, key=lambda r: (r.kind != "cohort", r.target)))


def _model_info(store: Store, model_id: str) -> dict:
    row = store.query('SELECT model_id, name, params FROM "models" WHERE model_id = ?', [model_id]).iloc[0]
    try:
        params = json.loads(row["params"] or "{}")
    except (TypeError, ValueError):
        params = {}
    source = params.get("loader") or params.get("source") or "predictions file"
    predicted = int(store.scalar(
        'SELECT count(DISTINCT image_id) FROM "det_boxes" WHERE model_id = ?' if store.task == "detection"
        else 'SELECT count(*) FROM "predictions" WHERE model_id = ?', [model_id]))
    return {"model_id": model_id, "name": row["name"] or model_id, "source": str(source), "predicted": predicted}


def scorecard(store: Store | str, *, cohorts: Sequence[tuple[str, str]] | None = None, model_id: str | None = None,
              baseline: str | None = None, targets: dict[str, float] | None = None, iou: float = 0.5,
              score_threshold: float | None = None, label_threshold: float | None = None,
              features: Sequence[str] | None = None, n_slices: int = 8, n_samples: int = 8) -> Scorecard:
    """Compute the scorecard's content (writes nothing; saved cohorts are read, never created)."""
    if not isinstance(store, Store):
        store = Store(store)
    catalog = catalog_of(store)
    if not catalog.models:
        raise EvalError("the store has no model to report on", field="model")
    if model_id is None:
        model_id = next((m for m in catalog.models if m != baseline), catalog.models[0])
    roles = {"model": model_id} | ({"baseline": baseline} if baseline is not None else {})
    check_models(store, catalog, roles)
    cohorts = list(cohorts or [])
    goal = parse_targets(targets, catalog.task)
    thresholds = run_thresholds(catalog, iou, score_threshold, label_threshold)
    cohort_table = _cohort_metrics(store, catalog, model_id, cohorts, thresholds)
    headline = {m: cohort_table.iloc[0][m] for m in metric_names(catalog.task)}
    headline = {k: (None if v is None or pd.isna(v) else float(v)) for k, v in headline.items()}
    error_frame = cohort_rows(store, Cohort(), model_id, columns=["error"], catalog=catalog, **thresholds)["error"]
    evaluated = error_frame.dropna()
    overall_error = float(evaluated.astype(bool).mean()) if len(evaluated) else None
    slices = tuple(find_slices(store, model_id, top_k=n_slices, **thresholds))
    comparison = None
    if baseline is not None and baseline != model_id:
        comparison = compare_models(store, baseline, model_id, cohorts=cohorts, links=False, **thresholds)
    return Scorecard(
        store=store.name, task=catalog.task, created=time.strftime("%Y-%m-%d %H:%M"),
        n_images=store.image_count(), classes=catalog.classes, class_counts=_class_counts(store, catalog),
        model=_model_info(store, model_id), thresholds=thresholds, metric_names=metric_names(catalog.task),
        headline=headline, targets=tuple(TargetCheck(m, headline[m], t) for m, t in goal.items()),
        distributions=_distributions(store, catalog), cohorts=cohort_table,
        groups=_feature_groups(store, catalog, model_id, _group_features(store, catalog, features), thresholds),
        overall_error_rate=overall_error, slices=slices,
        samples=_samples(store, catalog, model_id, thresholds, slices[0] if slices else None, n_samples),
        comparison=comparison, baseline_name=_model_info(store, baseline)["name"] if comparison else None,
        reviews=_review_notes(store))


# --------------------------------------------------------------------------- PDF

_INK = (29, 39, 51)
_MUTED = (91, 103, 115)
_RULE = (214, 219, 224)
_PANEL = (244, 246, 248)
_BLUE = (31, 95, 168)
_GREEN = (46, 133, 64)
_RED = (192, 57, 43)
_FONT = "Helvetica"
# Characters a core font (cp1252) lacks, in plain words.
_PLAIN = {"≤": "<=", "≥": ">=", "−": "-", "→": "->", "Δ": "delta ", "≠": "!=", "✓": "yes", "✗": "no"}


def plain(text: object) -> str:
    """Text a core PDF font can show: known symbols spelled out, anything else as '?'."""
    text = "".join(_PLAIN.get(ch, ch) for ch in str(text))
    return text.encode("cp1252", errors="replace").decode("cp1252")


def _fmt(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return f"{float(value):.{digits}f}"


def _signed(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _pdf_class():
    from fpdf import FPDF

    class ScorecardPDF(FPDF):
        title_line = ""

        def header(self) -> None:
            if self.page_no() == 1:
                return
            self.set_font(_FONT, "", 8)
            self.set_text_color(*_MUTED)
            self.cell(0, 5, plain(self.title_line), new_x="LMARGIN", new_y="NEXT")
            self.set_draw_color(*_RULE)
            self.line(self.l_margin, self.get_y() + 1, self.w - self.r_margin, self.get_y() + 1)
            self.ln(5)

        def footer(self) -> None:
            self.set_y(-12)
            self.set_font(_FONT, "", 8)
            self.set_text_color(*_MUTED)
            self.cell(0, 5, f"VisionLens  |  page {self.page_no()} of {{nb}}", align="R")

    return ScorecardPDF


class _Layout:
    """Small drawing vocabulary over fpdf2: sections, cards, tables, charts."""

    def __init__(self, title_line: str):
        self.pdf = _pdf_class()(orientation="P", unit="mm", format="A4")
        self.pdf.title_line = title_line
        self.pdf.set_margins(16, 14, 16)
        self.pdf.set_auto_page_break(True, margin=16)
        self.pdf.alias_nb_pages()
        self.width = self.pdf.w - self.pdf.l_margin - self.pdf.r_margin

    def text(self, content: str, size: float = 9.5, style: str = "", color=_INK, height: float = 5) -> None:
        pdf = self.pdf
        pdf.set_font(_FONT, style, size)
        pdf.set_text_color(*color)
        pdf.multi_cell(0, height, plain(content), new_x="LMARGIN", new_y="NEXT")

    def section(self, title: str, note: str | None = None, *, space: float = 40) -> None:
        pdf = self.pdf
        if pdf.will_page_break(space):
            pdf.add_page()
        pdf.ln(3)
        pdf.set_font(_FONT, "B", 13)
        pdf.set_text_color(*_INK)
        pdf.cell(0, 8, plain(title), new_x="LMARGIN", new_y="NEXT")
        pdf.set_draw_color(*_BLUE)
        pdf.set_line_width(0.6)
        left = pdf.l_margin + pdf.c_margin  # under the title's first letter
        pdf.line(left, pdf.get_y(), left + 14, pdf.get_y())
        pdf.set_line_width(0.2)
        pdf.ln(2)
        if note:
            self.text(note, size=8.5, color=_MUTED, height=4.2)
            pdf.ln(1)

    def subheading(self, title: str) -> None:
        if self.pdf.will_page_break(30):
            self.pdf.add_page()
        self.pdf.ln(1)
        self.text(title, size=10, style="B", height=6)

    def cards(self, items: list[tuple[str, str, tuple]]) -> None:
        """A row of figure cards: (value, label, value colour)."""
        pdf = self.pdf
        gap = 4
        w = (self.width - gap * (len(items) - 1)) / len(items)
        y = pdf.get_y()
        for index, (value, label, color) in enumerate(items):
            x = pdf.l_margin + index * (w + gap)
            pdf.set_fill_color(*_PANEL)
            pdf.rect(x, y, w, 19, style="F")
            pdf.set_fill_color(*color)
            pdf.rect(x, y, 1.2, 19, style="F")
            pdf.set_xy(x + 4, y + 2.5)
            pdf.set_font(_FONT, "B", 15)
            pdf.set_text_color(*color)
            pdf.cell(w - 6, 8, plain(value))
            pdf.set_xy(x + 4, y + 11)
            pdf.set_font(_FONT, "", 8)
            pdf.set_text_color(*_MUTED)
            pdf.cell(w - 6, 5, plain(label))
        pdf.set_xy(pdf.l_margin, y + 23)

    def table(self, header: list[str] | None, rows: list[list], widths: Sequence[float], *,
              align: Sequence[str] | None = None, colors: dict[tuple[int, int], tuple] | None = None,
              size: float = 8.5) -> None:
        from fpdf.fonts import FontFace

        pdf = self.pdf
        align = align or ["LEFT"] + ["RIGHT"] * (len(widths) - 1)
        colors = colors or {}
        pdf.set_font(_FONT, "", size)
        pdf.set_text_color(*_INK)
        pdf.set_draw_color(*_RULE)
        pdf.set_fill_color(*_PANEL)
        scale = self.width / sum(widths)
        with pdf.table(col_widths=[w * scale for w in widths], width=self.width, text_align=list(align),
                       line_height=size * 0.55, borders_layout="HORIZONTAL_LINES", cell_fill_color=_PANEL,
                       cell_fill_mode="ROWS", padding=(1.2, 1.5), first_row_as_headings=header is not None,
                       headings_style=FontFace(emphasis="BOLD", color=_INK, fill_color=(226, 231, 236))) as table:
            if header is not None:
                head = table.row()
                for text in header:
                    head.cell(plain(text))
            for r, values in enumerate(rows):
                row = table.row()
                for c, value in enumerate(values):
                    color = colors.get((r, c))
                    style = FontFace(color=color, emphasis="BOLD") if color else None
                    row.cell(plain(value), style=style)
        pdf.ln(2)

    def chart(self, chart, width_mm: float | None = None) -> None:
        png = charts.render_png(chart)
        self.image(Image.open(io.BytesIO(png)), width_mm or self.width)

    def image(self, image: Image.Image, width_mm: float, x: float | None = None) -> float:
        """Place an image at full width (or ``width_mm``); returns its height in mm."""
        pdf = self.pdf
        height = width_mm * image.height / image.width
        if pdf.will_page_break(height + 2):
            pdf.add_page()
        pdf.image(image, x=x if x is not None else pdf.l_margin, y=pdf.get_y(), w=width_mm, h=height)
        pdf.set_y(pdf.get_y() + height + 2)
        return height


def _title_page(doc: _Layout, card: Scorecard) -> None:
    pdf = doc.pdf
    pdf.add_page()
    pdf.set_fill_color(*_INK)
    pdf.rect(0, 0, pdf.w, 40, style="F")
    pdf.set_xy(pdf.l_margin, 10)
    pdf.set_font(_FONT, "B", 22)
    pdf.set_text_color(255, 255, 255)
    pdf.cell(0, 10, "Model scorecard", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(_FONT, "", 10.5)
    pdf.set_text_color(207, 216, 226)
    model = card.model
    pdf.cell(0, 6, plain(f"{model['name']} ({model['model_id']})  on  {card.store}  |  {card.task}"),
             new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(_FONT, "", 8.5)
    pdf.cell(0, 5, plain(f"Generated {card.created} by VisionLens" + _threshold_words(card)),
             new_x="LMARGIN", new_y="NEXT")
    pdf.set_y(48)
    primary = card.primary[0]
    met = [t.met for t in card.targets]
    target_value = f"{sum(bool(m) for m in met)} / {len(met)}" if met else "none set"
    target_color = _INK if not met else (_GREEN if all(met) else _RED)
    items = [(_fmt(card.n_images), "images", _INK), (_fmt(len(card.classes)), "classes", _INK),
             (_fmt(card.headline.get(primary)), metric_label(primary), _BLUE), (target_value, "targets met",
                                                                                  target_color)]
    if card.comparison is not None:
        items.insert(3, (_signed(card.comparison.overall.delta.get(primary)),
                         f"{metric_label(primary)} vs {card.comparison.baseline}", _delta_color(
                             primary, card.comparison.overall.delta.get(primary))))
    doc.cards(items)


def _threshold_words(card: Scorecard) -> str:
    t = card.thresholds
    if card.task == "detection":
        return f"  |  IoU {t['iou']:g}, score threshold {t['score_threshold']:g}"
    if card.task == "multilabel":
        return f"  |  label threshold {t['label_threshold']:g}"
    return ""


def _delta_color(metric: str, delta: float | None) -> tuple:
    if delta is None or delta == 0:
        return _INK
    better = delta < 0 if metric in LOWER_IS_BETTER else delta > 0
    return _GREEN if better else _RED


def _headline(doc: _Layout, card: Scorecard) -> None:
    targets = {t.metric: t for t in card.targets}
    note = ("All images (for detection, those without a prediction count their objects as missed)."
            if card.task == "detection" else "The images the model predicted.")
    note += " Targets are the ones set for this report"
    note += ("; Hamming loss is met at or below its target, every other metric at or above."
             if card.task == "multilabel" else ", met at or above.")
    doc.section("Headline metrics", note)
    comparison = card.comparison
    header = ["Metric", "Value"] + (["Baseline", "Change"] if comparison else []) + ["Target", "Status"]
    rows, colors = [], {}
    for r, name in enumerate(card.metric_names):
        row = [metric_label(name), _fmt(card.headline.get(name))]
        if comparison:
            delta = comparison.overall.delta.get(name)
            row += [_fmt(comparison.overall.baseline.get(name)), _signed(delta)]
            colors[(r, 3)] = _delta_color(name, delta) if delta else None
        check = targets.get(name)
        if check is None:
            row += ["", ""]
        else:
            status = {True: "met", False: "not met", None: "n/a"}[check.met]
            row += [_fmt(check.target), status]
            colors[(r, len(row) - 1)] = {True: _GREEN, False: _RED, None: _MUTED}[check.met]
        rows.append(row)
    widths = [34, 16] + ([16, 16] if comparison else []) + [16, 16]
    doc.table(header, rows, widths, colors={k: v for k, v in colors.items() if v})


def _model_section(doc: _Layout, card: Scorecard) -> None:
    model = card.model
    doc.section("Model")
    rows = [["Model", f"{model['name']} ({model['model_id']})"], ["Outputs from", model["source"]],
            ["Images predicted", f"{model['predicted']:,} of {card.n_images:,}"],
            ["Task", card.task], ["Classes", ", ".join(card.classes[:12]) + (
                f" and {len(card.classes) - 12} more" if len(card.classes) > 12 else "")]]
    if card.comparison is not None:
        rows.append(["Baseline", f"{card.baseline_name} ({card.comparison.baseline})"])
    doc.table(None, rows, [30, 120], align=["LEFT", "LEFT"])


def _dataset_page(doc: _Layout, card: Scorecard) -> None:
    doc.pdf.add_page()
    what = "images per class" if card.task == "multiclass" else "images holding each class"
    doc.section("Dataset", f"{card.n_images:,} images, {len(card.classes)} classes: {what}"
                           + (" (the 20 largest)." if len(card.classes) > 20 else "."))
    doc.chart(charts.class_distribution(card.class_counts, width=420, title=None), width_mm=doc.width * 0.7)
    if not card.distributions:
        return
    doc.section("Metadata distributions", "Image-quality measures computed at ingest and the dataset's own columns.")
    images = []
    for d in card.distributions:
        chart = charts.histogram(d.counts, d.title, width=170, height=90) if d.kind == "numeric" else \
            charts.category_bars(d.counts, d.title, width=170, height=90)
        images.append(Image.open(io.BytesIO(charts.render_png(chart))))
    columns, gap = 3, 5
    column_w = (doc.width - gap * (columns - 1)) / columns
    pdf = doc.pdf
    for start in range(0, len(images), columns):
        row = images[start:start + columns]
        height = max(column_w * im.height / im.width for im in row)
        if pdf.will_page_break(height + 3):
            pdf.add_page()
        y = pdf.get_y()
        for index, im in enumerate(row):
            w = min(column_w, column_w * im.width / max(im.width for im in images))
            pdf.image(im, x=pdf.l_margin + index * (column_w + gap), y=y, w=w)
        pdf.set_y(y + height + 3)


def _cohorts_section(doc: _Layout, card: Scorecard) -> None:
    doc.section("Metrics per cohort", "Each cohort is a query string in the VisionLens URL grammar; "
                                      "open it with ?QUERY on any page.")
    primary = card.primary
    rows = []
    for row in card.cohorts.itertuples(index=False):
        values = row._asdict()
        rows.append([values["cohort"] + values["setting"], _fmt(int(values["images"]))]
                    + [_fmt(values[m]) for m in primary])
    doc.table(["Cohort", "Images"] + [metric_label(m) for m in primary], rows, [46, 14] + [18] * len(primary))
    queries = [f"{r.cohort}: ?{r.query}" for r in card.cohorts.itertuples(index=False) if r.query]
    if queries:
        doc.text("\n".join(queries), size=7.5, color=_MUTED, height=3.8)
    if len(card.cohorts) > 1:
        frame = card.cohorts[["cohort", primary[0]]].rename(columns={"cohort": "group", primary[0]: "value"})
        frame = frame.assign(model=card.model["model_id"])
        if card.comparison is not None:
            base = pd.DataFrame({"group": [c.name for c in card.comparison.cohorts],
                                 "value": [c.baseline.get(primary[0]) for c in card.comparison.cohorts],
                                 "model": card.comparison.baseline})
            frame = pd.concat([base, frame], ignore_index=True)
        target = next((t.target for t in card.targets if t.metric == primary[0]), None)
        doc.chart(charts.metric_by_group(frame.dropna(subset=["value"]), metric_label(primary[0]), width=380,
                                         target=target), width_mm=doc.width * 0.85)


def _groups_section(doc: _Layout, card: Scorecard) -> None:
    if not card.groups:
        return
    note = (f"Share of correctly handled images per group; a numeric feature in {GROUP_BINS} equal-width bins, "
            "as the model overview groups it by default. Difference = largest minus smallest group value, "
            "ratio = smallest over largest (fairlearn MetricFrame, between_groups).")
    if card.task != "multiclass":
        note += " An image counts as correct when " + (
            "its predicted label set equals its true set." if card.task == "multilabel"
            else "it has no false positive and no false negative.")
    doc.section("Metrics per feature group", note)
    for g in card.groups:
        doc.subheading(f"{g.title}:  accuracy difference {g.difference:.3f},  ratio {g.ratio:.3f}")
        rows = [[r.group, _fmt(int(r.images)), _fmt(r.accuracy), _fmt(r.error_rate)]
                for r in g.table.itertuples(index=False)]
        worst = int(g.table["accuracy"].to_numpy().argmin()) if len(g.table) else -1
        doc.table(["Group", "Images", "Accuracy", "Error rate"], rows, [60, 20, 20, 20],
                  colors={(worst, 2): _RED} if len(g.table) > 1 else None)


def _slices_section(doc: _Layout, card: Scorecard) -> None:
    overall = _share(card.overall_error_rate)
    doc.section("Top error slices",
                f"Metadata slices where the error rate is at least {MIN_LIFT:g} times the overall {overall}, found "
                "by SliceLine (Sagadeeva & Boehm, SIGMOD 2021) over quantile-binned numeric and categorical columns, "
                "ranked by its score, which weighs how much worse a slice is against how small it is.", space=60)
    if not card.slices:
        doc.text("No slice has an error rate clearly above the overall rate.", color=_MUTED)
        return
    frame = pd.DataFrame({"description": [plain(s.description) for s in card.slices],
                          "error_rate": [s.error_rate for s in card.slices],
                          "size": [s.size for s in card.slices]})
    if card.overall_error_rate is not None:
        doc.chart(charts.slice_error_rates(frame, card.overall_error_rate, width=300), width_mm=doc.width * 0.9)
    rows = [[str(rank), s.description, _fmt(s.size), _share(s.error_rate), f"{s.score:.3f}"]
            for rank, s in enumerate(card.slices, start=1)]
    doc.table(["#", "Slice", "Images", "Error rate", "Score"], rows, [6, 96, 16, 18, 14],
              align=["RIGHT", "LEFT", "RIGHT", "RIGHT", "RIGHT"])
    doc.text("\n".join(f"{rank}. ?{s.query}" for rank, s in enumerate(card.slices, start=1)), size=7.5,
             color=_MUTED, height=3.8)


def _samples_section(doc: _Layout, card: Scorecard) -> None:
    if not card.samples:
        return
    shows = {s.shows for s in card.samples}
    explained = sorted(x for x in shows if x not in ("labels", "boxes"))
    note = "Errors of the model, those in the worst slice first. "
    if explained:
        note += f"Overlays show stored explanations ({', '.join(explained)}): brighter is more important. "
    if card.task == "detection":
        note += "Boxes: green true positive, orange false positive, blue dashed missed object."
    doc.section("Sample errors", note, space=70)
    pdf = doc.pdf
    columns, gap = 4, 4
    cell_w = (doc.width - gap * (columns - 1)) / columns
    for start in range(0, len(card.samples), columns):
        row = card.samples[start:start + columns]
        height = max(cell_w * s.image.height / s.image.width for s in row)
        if pdf.will_page_break(height + 12):
            pdf.add_page()
        y = pdf.get_y()
        for index, sample in enumerate(row):
            x = pdf.l_margin + index * (cell_w + gap)
            h = cell_w * sample.image.height / sample.image.width
            pdf.image(sample.image, x=x, y=y, w=cell_w, h=h)
            pdf.set_xy(x, y + height + 1)
            pdf.set_font(_FONT, "", 7)
            pdf.set_text_color(*_INK)
            pdf.multi_cell(cell_w, 3.3, plain(sample.caption), align="L")
        pdf.set_xy(pdf.l_margin, y + height + 12)


def _comparison_section(doc: _Layout, card: Scorecard) -> None:
    result = card.comparison
    if result is None:
        return
    doc.pdf.add_page()
    doc.section(f"Comparison with the baseline, {card.baseline_name} ({result.baseline})",
                "New errors: images the baseline got right and this model gets wrong; fixed: the reverse. "
                "BTC (backward trust compatibility): share of the baseline's correct images this model keeps "
                "correct. BEC (backward error compatibility): share of this model's errors the baseline made "
                "too. Both 100% for a drop-in update.")
    overall = result.overall
    doc.cards([(_share(overall.btc), "BTC", _BLUE), (_share(overall.bec), "BEC", _BLUE),
               (_fmt(overall.new_errors.count), "new errors", _RED if overall.new_errors.count else _INK),
               (_fmt(overall.fixed_errors.count), "fixed errors", _GREEN if overall.fixed_errors.count else _INK),
               (_fmt(overall.disagreements.count), "disagreements", _INK)])
    primary = card.primary
    rows, colors = [], {}
    for r, c in enumerate(result.cohorts):
        rows.append([c.name, _fmt(c.count)] + [_signed(c.delta.get(m)) for m in primary[:2]] +
                    [_share(c.btc), _share(c.bec), _fmt(c.new_errors.count), _fmt(c.fixed_errors.count)])
        for k, m in enumerate(primary[:2]):
            color = _delta_color(m, c.delta.get(m))
            if color != _INK:
                colors[(r, 2 + k)] = color
    doc.table(["Cohort", "Images"] + [f"Change {metric_label(m)}" for m in primary[:2]] +
              ["BTC", "BEC", "New", "Fixed"], rows, [40, 14, 22, 22, 14, 14, 12, 12], colors=colors)
    if result.objects is not None:
        o = result.objects
        doc.text(f"Objects at IoU {result.thresholds['iou']:g}: {o.ground_truths:,} ground truths; found "
                 f"{o.baseline_tp:,} -> {o.candidate_tp:,} ({o.newly_missed:,} newly missed, {o.newly_found:,} "
                 f"newly found); false positives {o.baseline_fp:,} -> {o.candidate_fp:,}.", size=8.5)
    frame = result.metrics_frame()
    frame = frame[(frame["cohort"] == "All images") & frame["delta"].notna()]
    if len(frame):
        doc.subheading("Change per metric, all images")
        doc.chart(charts.metric_deltas(pd.DataFrame({"label": [metric_label(m) for m in frame["metric"]],
                                                     "delta": frame["delta"].astype(float),
                                                     "better": frame["better"].astype(bool)}), width=380),
                  width_mm=doc.width * 0.85)


def _reviews_section(doc: _Layout, card: Scorecard) -> None:
    doc.section("Review notes", "Status (open, reviewed, fixed) and notes left on images and saved cohorts in "
                                "VisionLens (label review page, flyout). Only entries with a status past open or "
                                "a note are listed.", space=30)
    if not card.reviews:
        doc.text("No image or saved cohort has been reviewed yet.", color=_MUTED)
        return
    counts = card.review_counts()
    doc.text("; ".join(f"{kind}s: " + ", ".join(f"{counts[kind][s]:,} {s}" for s in STATUSES)
                       for kind in ("cohort", "image")), size=8.5)
    rows = [[r.kind, r.name, r.status, r.note or "-", r.updated[:16].replace("T", " ")]
            for r in card.reviews[:MAX_REVIEW_ROWS]]
    colors = {(i, 2): _GREEN for i, r in enumerate(card.reviews[:MAX_REVIEW_ROWS]) if r.status == "fixed"}
    doc.table(["Kind", "Image / cohort", "Status", "Note", "Updated (UTC)"], rows, [14, 36, 16, 84, 26],
              align=["LEFT", "LEFT", "LEFT", "LEFT", "LEFT"], colors=colors)
    if len(card.reviews) > MAX_REVIEW_ROWS:
        doc.text(f"{len(card.reviews) - MAX_REVIEW_ROWS:,} more reviewed entries are not listed.", size=8,
                 color=_MUTED)


def pdf_bytes(card: Scorecard) -> bytes:
    """The scorecard as A4 PDF bytes (for a download button: nothing written to disk)."""
    doc = _Layout(f"Scorecard  |  {card.model['name']} on {card.store}  |  {card.created}")
    _title_page(doc, card)
    _headline(doc, card)
    _model_section(doc, card)
    _dataset_page(doc, card)
    doc.pdf.add_page()
    _cohorts_section(doc, card)
    _groups_section(doc, card)
    _slices_section(doc, card)
    _samples_section(doc, card)
    _reviews_section(doc, card)
    _comparison_section(doc, card)
    return bytes(doc.pdf.output())


def render_pdf(card: Scorecard, out_path: str | Path) -> Path:
    """Write the scorecard PDF to ``out_path`` (atomically: a temporary file renamed into place)."""
    out_path = Path(out_path)
    data = pdf_bytes(card)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.writing")
    try:
        tmp.write_bytes(data)
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def build_report(store: Store | str, *, cohorts: Sequence[tuple[str, str]] | None = None,
                 model_id: str | None = None, baseline: str | None = None,
                 targets: dict[str, float] | None = None, out_path: str | Path, **options) -> Path:
    """Compute the scorecard and write it as a PDF; ``options`` go to ``scorecard`` (thresholds, features)."""
    card = scorecard(store, cohorts=cohorts, model_id=model_id, baseline=baseline, targets=targets, **options)
    return render_pdf(card, out_path)


# --------------------------------------------------------------------------- CLI


def _target(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise EvalError(f"target {text!r} is not of the form metric=value", field="target")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise EvalError(f"target {text!r}: {value!r} is not a number", field="target") from None


def report_main(argv: list[str] | None = None) -> int:
    """``visionlens report STORE [--cohort QUERY]... [--model M] [--baseline B] [--target m=v]... -o FILE.pdf``."""
    from .compare import add_cohort_arguments, named_cohorts

    parser = argparse.ArgumentParser(prog="visionlens report", description="PDF scorecard of a model")
    parser.add_argument("store", help="path to NAME.duckdb")
    parser.add_argument("-o", "--out", required=True, help="PDF file to write")
    add_cohort_arguments(parser)
    parser.add_argument("--model", help="model id (default: the model added to the store first that is "
                                         "not the baseline)")
    parser.add_argument("--baseline", help="model id to compare with")
    parser.add_argument("--target", action="append", default=[], metavar="METRIC=VALUE",
                        help="a target for a headline metric, e.g. accuracy=0.9 (repeatable)")
    args = parser.parse_args(argv)
    targets = dict(_target(t) for t in args.target)
    path = build_report(args.store, cohorts=named_cohorts(args.cohort), model_id=args.model, baseline=args.baseline,
                        targets=targets, out_path=args.out, iou=args.iou, score_threshold=args.score_threshold,
                        label_threshold=args.label_threshold)
    sys.stdout.write(f"wrote {path}\n")
    return 0
