"""A cohort's distribution over one or two frame columns, counted by DuckDB: the data analysis chart.

``distribution`` bins or groups the cohort's rows in SQL, so a million images
come back as a few hundred counts; only those reach pandas, where class ids
become names and rare categories merge into "other". ``point_sample`` draws the
seeded sample the point chart shows, also in SQL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .cohorts import (Catalog, Cohort, ColumnInfo, ParsedQuery, catalog_of, cohort_count, cohort_rows_sql, display_number,
                      quote_identifier)
from .errors import CohortError
from .store import Store

if TYPE_CHECKING:
    from .state import StateDB

COUNT = "count"  # the y choice "number of images"
MAX_CATEGORIES = 30  # categories kept on an axis or in a legend; the rest are counted as "other"
MAX_COLOUR_BINS = 6  # a numeric colour is cut into at most this many intervals
MAX_POINTS = 5_000  # individual datapoints drawn at most (a random sample beyond)
SAMPLE_SEED = 0
MISSING, OTHER = "missing", "other"


def is_numeric(info: ColumnInfo) -> bool:
    """Whether a column is binned as a number (not a category, not a list)."""
    return info.values == "number" and info.kind != "categorical" and not info.is_list


def value_names(values: pd.Series, info: ColumnInfo, classes: list[str]) -> pd.Series:
    """Class ids as class names, flags as yes/no, missing as "missing", everything else as text (vectorised)."""
    missing = values.isna().to_numpy()
    if info.values == "class":
        names = np.asarray([*classes, MISSING], dtype=object)
        ids = np.where(missing, len(classes), pd.to_numeric(values, errors="coerce").fillna(-1).to_numpy())
        ids = ids.astype(np.int64)
        ids[(ids < 0) | (ids > len(classes))] = len(classes)
        return pd.Series(names[ids], index=values.index)
    if info.values == "boolean":
        flags = values.fillna(False).astype(bool).to_numpy()
        return pd.Series(np.where(missing, MISSING, np.where(flags, "yes", "no")), index=values.index)
    return values.astype(object).where(~missing, MISSING).astype(str)


def numeric_bins(low: float, high: float, bins: int, log: bool) -> np.ndarray:
    """Edges of ``bins`` equal-width bins over ``[low, high]`` (equal in log space when ``log`` and
    ``low > 0``), as ``numpy.histogram_bin_edges`` makes them; NaN bounds (no finite value) give [0, 1]."""
    if math.isnan(low):
        return np.array([0.0, 1.0])
    if log and low > 0:
        return np.geomspace(low, high, bins + 1) if high > low else np.array([low, low * 1.0001])
    return np.histogram_bin_edges(np.array([low, high]), bins=bins)


def colour_intervals(low: float, high: float, bins: int) -> tuple[np.ndarray, list[str]]:
    """Edges and labels of the intervals ``pandas.cut`` makes of values in ``[low, high]``; one value
    alone is one colour named by it (pandas would widen it into bins of a raw ``(47.952, 48.0]``)."""
    if low == high:
        _, edges = pd.cut(np.array([low, high]), bins=1, retbins=True)
        return edges, [display_number(low)]
    cut, edges = pd.cut(np.array([low, high]), bins=bins, retbins=True)
    return edges, [str(interval) for interval in cut.categories]


def _bin_guess(value: str, edges: np.ndarray, *, log: bool) -> tuple[str, list]:
    """SQL for the bin a finite ``value`` falls in by the bins' width: at most one bin off the edges'."""
    low, high = (math.log(edges[0]), math.log(edges[-1])) if log else (float(edges[0]), float(edges[-1]))
    scaled = f"ln({value})" if log else value
    last = len(edges) - 2
    return (f"CASE WHEN isfinite({value}) THEN least(greatest(floor(({scaled} - ?) * ?)::BIGINT, 0), {last}) END",
            [low, (last + 1) / (high - low)])


def _bin_index(value: str, guess: str, edges: np.ndarray, *, right_closed: bool) -> tuple[str, list]:
    """SQL for ``searchsorted(edges, value) - 1`` clipped to the bins, from ``guess`` (``_bin_guess``):
    ``side="right"``, bins ``[a, b)``, as numpy's histogram; or ``"left"``, bins ``(a, b]``, as pandas' cut."""
    last = len(edges) - 2
    below, above = ("<=", ">") if right_closed else ("<", ">=")
    edge_list = [float(e) for e in edges]
    return (f"least(greatest({guess} - ({value} {below} (?::DOUBLE[])[{guess} + 1])::BIGINT "
            f"+ ({value} {above} (?::DOUBLE[])[{guess} + 2])::BIGINT, 0), {last})", [edge_list, edge_list])


@dataclass(frozen=True)
class Distribution:
    """Per x group (``x``, or a numeric bin ``x_start``..``x_end``) and colour (``color``): ``value``
    (images, or y's mean) and, for a mean, ``images``. ``images_total``: the cohort's images."""

    table: pd.DataFrame
    images_total: int


def distribution(store: Store, cohort: Cohort | ParsedQuery, model_id: str | None, x: str, y: str = COUNT,
                 color: str | None = None, *, bins: int = 20, log_x: bool = False, iou: float = 0.5,
                 score_threshold: float = 0.5, label_threshold: float = 0.5, state: "StateDB | None" = None,
                 catalog: Catalog | None = None) -> Distribution:
    """The cohort's images per x group and colour: counted, or y averaged (missing y skipped).

    A numeric x is cut into ``bins`` equal bins between its finite extremes (images
    without a finite x are left out); a list x (e.g. an image's labels) counts an image
    once per element, an empty list as "missing"; a numeric colour is cut into at most
    ``MAX_COLOUR_BINS`` intervals. At most ``MAX_CATEGORIES`` categories are kept per
    axis, the most frequent; the rest are summed as "other".
    """
    catalog = catalog or catalog_of(store, state)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise CohortError(f"bins must be a positive integer, got {bins!r}", field="bins")
    infos = {name: catalog.column(name) for name in (x, y, color) if name and name != COUNT}
    if y != COUNT and not is_numeric(infos[y]):
        raise CohortError(f"{y} is not a number: it cannot be averaged", field="y")
    if color and infos[color].is_list:
        raise CohortError(f"{color} holds lists: an image has no single colour by it", field="color")
    q = quote_identifier
    x_info = infos[x]
    x_numeric, colour_numeric = is_numeric(x_info), bool(color) and is_numeric(infos[color])
    x_value = f"CAST(r.{q(x)} AS DOUBLE)" if x_numeric else (
        f"UNNEST(CASE WHEN len(r.{q(x)}) > 0 THEN r.{q(x)} ELSE [NULL] END)" if x_info.is_list else f"r.{q(x)}")
    outputs = {"x": (x, f"{x_value} AS x")}  # by output name: x may also be y
    if color:
        outputs["c"] = (color, f"CAST(r.{q(color)} AS DOUBLE) AS c" if colour_numeric else f"r.{q(color)} AS c")
    if y != COUNT:
        outputs["y"] = (y, f"CAST(r.{q(y)} AS DOUBLE) AS y")

    def source(names: list[str]) -> tuple[str, list]:
        columns = [outputs[n][0] for n in names]
        rows, params = cohort_rows_sql(store, cohort, model_id, columns, iou=iou, score_threshold=score_threshold,
                                       label_threshold=label_threshold, state=state, catalog=catalog)
        return f"(SELECT {', '.join(outputs[n][1] for n in names)} FROM ({rows}) AS r) AS v", params

    present = "isfinite(v.x)" if x_numeric else "true"
    finite_colour = f"{present} AND isfinite(v.c)"
    # The extremes read only the binned columns: a colour by outcome then joins no detections.
    counted, counted_params = source(["x", *(["c"] if colour_numeric else [])])
    stats = store.rows(
        f"SELECT count(*), min(v.x) FILTER (WHERE {present}), max(v.x) FILTER (WHERE {present}), "
        + (f"min(v.c) FILTER (WHERE {finite_colour}), max(v.c) FILTER (WHERE {finite_colour}) "
           if colour_numeric else "NULL, NULL ")
        + f"FROM {counted}", counted_params)[0]
    if x_info.is_list:  # an image counts once however many list elements it spreads over
        total = cohort_count(store, cohort, model_id, iou=iou, score_threshold=score_threshold,
                             label_threshold=label_threshold, state=state, catalog=catalog)
    else:
        total = int(stats[0])
    grouped, params = source(list(outputs))
    guesses, keys, key_params, guess_params = [], [], [], []
    if x_numeric:
        edges = numeric_bins(_number(stats[1]), _number(stats[2]), bins, log_x)
        sql, bin_params = _bin_guess("v.x", edges, log=bool(log_x and edges[0] > 0 and edges[-1] > edges[0]))
        guesses.append(f"{sql} AS gx")
        guess_params += bin_params
        sql, bin_params = _bin_index("w.x", "w.gx", edges, right_closed=False)
        keys.append(sql)
        key_params += bin_params
    else:
        keys.append("w.x")
    colour_labels: list[str] = []
    if colour_numeric and stats[3] is not None:
        colour_edges, colour_labels = colour_intervals(float(stats[3]), float(stats[4]), min(bins, MAX_COLOUR_BINS))
        sql, bin_params = _bin_guess("v.c", colour_edges, log=False)
        guesses.append(f"{sql} AS gc")
        guess_params += bin_params
        sql, bin_params = _bin_index("w.c", "w.gc", colour_edges, right_closed=True)
        keys.append(f"CASE WHEN w.gc IS NOT NULL THEN {sql} END")
        key_params += bin_params
    elif colour_numeric:
        keys.append("NULL::BIGINT")  # no finite colour value: every image's colour is missing
    elif color:
        keys.append("w.c")
    measures = ["count(*)"]
    if y != COUNT:
        measures += ["fsum(w.y) FILTER (WHERE NOT isnan(w.y))", "count(w.y) FILTER (WHERE NOT isnan(w.y))"]
    key_names = ["x", *(["c"] if color else [])]
    groups = store.query(
        f"SELECT {', '.join(f'{k} AS {n}' for k, n in zip(keys, key_names))}, "
        f"{', '.join(f'{m} AS m{i}' for i, m in enumerate(measures))} "
        f"FROM (SELECT v.*{''.join(', ' + g for g in guesses)} FROM {grouped} WHERE {present}) AS w GROUP BY ALL",
        key_params + guess_params + params)
    table = pd.DataFrame(index=groups.index)
    if x_numeric:
        index = groups["x"].to_numpy(dtype=np.int64)
        table["x_start"], table["x_end"] = edges[index], edges[index + 1]
    else:
        table["x"] = value_names(groups["x"], x_info, list(catalog.classes))
    if color:
        if colour_numeric:
            labels = np.asarray([*colour_labels, MISSING], dtype=object)
            codes = groups["c"].fillna(len(colour_labels)).to_numpy(dtype=np.int64)
            table["color"] = labels[codes]
        else:
            table["color"] = value_names(groups["c"], infos[color], list(catalog.classes))
    for i in range(len(measures)):
        table[f"m{i}"] = groups[f"m{i}"].to_numpy(dtype=float)
    for key in ("x", "color"):
        if key in table:
            table[key] = with_other(table[key], table["m0"])
    key_columns = [c for c in ("x_start", "x_end", "x", "color") if c in table]
    merged = table.groupby(key_columns, sort=True).sum().reset_index()
    if y == COUNT:
        out = merged[key_columns].assign(value=merged["m0"].astype(np.int64))
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(merged["m2"] > 0, merged["m1"] / merged["m2"].where(merged["m2"] > 0, 1), np.nan)
        out = merged[key_columns].assign(value=mean, images=merged["m0"].astype(np.int64))
    return Distribution(out.reset_index(drop=True), total)


def point_sample(store: Store, cohort: Cohort | ParsedQuery, model_id: str | None, columns: list[str], *,
                 limit: int = MAX_POINTS, iou: float = 0.5, score_threshold: float = 0.5,
                 label_threshold: float = 0.5, state: "StateDB | None" = None, catalog: Catalog | None = None
                 ) -> tuple[pd.DataFrame, int]:
    """(rows, the cohort's images): all the cohort's rows when it holds at most ``limit`` images, else
    a seeded pseudo-random ``limit`` of them (those whose id hashes lowest), in image order."""
    q = quote_identifier
    wanted = list(dict.fromkeys(["image_id", *columns]))
    rows, params = cohort_rows_sql(store, cohort, model_id, wanted, iou=iou, score_threshold=score_threshold,
                                   label_threshold=label_threshold, state=state, catalog=catalog)
    # A top-N by hash keeps ``limit`` rows in memory, not the cohort's.
    picked = store.query(f"SELECT * FROM (SELECT * FROM ({rows}) AS r ORDER BY hash(r.{q('image_id')}, ?::BIGINT) "
                         f"LIMIT ?) ORDER BY {q('image_id')}", params + [SAMPLE_SEED, int(limit)])
    total = int(store.scalar(f"SELECT count(*) FROM ({rows}) AS r", params)) if len(picked) == limit else len(picked)
    return picked.reset_index(drop=True), total


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def with_other(names: pd.Series, counts: pd.Series | None = None) -> pd.Series:
    """``names``, with all but the ``MAX_CATEGORIES - 1`` most counted as "other": each name counted
    once per row, or ``counts`` times."""
    counts = pd.Series(1, index=names.index) if counts is None else counts
    totals = counts.groupby(names.to_numpy()).sum()
    if len(totals) <= MAX_CATEGORIES:
        return names
    ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
    keep = {name for name, _ in ranked[:MAX_CATEGORIES - 1]}
    return names.where(names.isin(keep), OTHER)
