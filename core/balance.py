"""Data balance of a dataset or cohort: how the labels spread over metadata groups.

The measures are those of the Responsible AI toolbox's data balance analysis
(``raimitigations.databalanceanalysis``), with the same formulas, computed for
every class at once (a class is "positive" for an image that carries it: the
class of a multiclass image, any of a multilabel image's labels or of a
detection image's object classes):

- ``class_distribution``: per group of a feature (numeric features binned as
  ``core.fairness.group_labels`` bins them), images per class and the share of
  the group's images carrying each class, next to the overall share.
- ``feature_balance``: for each class and each pair of groups (A, B), the gap
  A - B of the per-group measures, with ``p_pos`` = P(class),
  ``p_feature`` = P(group), ``p_pos_feature`` = P(group and class):
  ``dp`` demographic parity P(class | group) (its gap is the statistical parity
  difference), ``pmi`` log of it, ``sdc`` Sorensen-Dice
  ``p_pos_feature / (p_feature + p_pos)``, ``ji`` Jaccard
  ``p_pos_feature / (p_feature + p_pos - p_pos_feature)``, ``krc`` Kendall rank
  correlation, ``llr`` log-likelihood ratio ``log(p_pos_feature / p_pos)``,
  ``t_test`` ``(p_pos - p_feature * p_pos) / sqrt(p_feature * p_pos)``, and
  ``t_test_pvalue`` of the gap with (groups - 1) degrees of freedom.
- ``distribution_balance``: per group, how far its class distribution (shares
  of the class occurrences) lies from a reference (uniform over the classes, or
  the whole frame's distribution): KL divergence, Jensen-Shannon distance,
  Wasserstein distance (scipy's, between the two lists of shares taken as
  samples, as the toolbox computes it), infinity-norm and total-variation
  distances, and Pearson's chi-square statistic and p-value of the group's
  counts against the reference.
- ``aggregate_balance``: inequality of the group sizes (Atkinson index, Theil T
  and L indices).

Everything is a pure function of a per-image frame (``true_label`` plus the
feature columns, as ``core.cohorts.cohort_rows`` returns it);
``cohort_balance_frame`` reads one for a cohort.
"""

from __future__ import annotations

import itertools
import logging
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats
from scipy.spatial import distance

from .errors import EvalError
from .fairness import group_labels

log = logging.getLogger(__name__)

FEATURE_MEASURES = ("dp", "pmi", "sdc", "ji", "krc", "llr", "t_test")
DISTRIBUTION_MEASURES = ("kl_divergence", "js_distance", "wasserstein", "inf_norm", "total_variation",
                         "chi_square", "chi_square_pvalue")
AGGREGATE_MEASURES = ("atkinson", "theil_t", "theil_l")
REFERENCES = ("uniform", "overall")
MEASURE_LABELS = {
    "dp": "Statistical parity difference", "pmi": "Pointwise mutual information gap", "sdc": "Sorensen-Dice gap",
    "ji": "Jaccard index gap", "krc": "Kendall rank correlation gap", "llr": "Log-likelihood ratio gap",
    "t_test": "t statistic gap", "t_test_pvalue": "t-test p-value",
    "kl_divergence": "KL divergence", "js_distance": "Jensen-Shannon distance", "wasserstein": "Wasserstein distance",
    "inf_norm": "Infinity-norm distance", "total_variation": "Total variation distance",
    "chi_square": "Chi-square", "chi_square_pvalue": "Chi-square p-value",
    "atkinson": "Atkinson index", "theil_t": "Theil T index", "theil_l": "Theil L index",
}


def label_matrix(labels: Sequence | pd.Series, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, classes) bool of which classes each image carries, and which rows are labelled.

    A label is a class id (multiclass) or a list of class ids; a missing label
    (None / NaN) is an unlabelled image, an empty list an image without classes.
    """
    values = list(labels)
    out = np.zeros((len(values), n_classes), dtype=bool)
    labelled = np.ones(len(values), dtype=bool)
    for row, value in enumerate(values):
        if value is None or (np.ndim(value) == 0 and pd.isna(value)):
            labelled[row] = False
            continue
        ids = np.atleast_1d(np.asarray(value, dtype=np.int64))
        if len(ids) and (ids.min() < 0 or ids.max() >= n_classes):
            raise EvalError(f"class id {int(ids.max() if ids.max() >= n_classes else ids.min())} outside "
                            f"0..{n_classes - 1}", row=row, field="true_label")
        out[row, ids] = True
    return out, labelled


def _groups(frame: pd.DataFrame, feature: str, bins: int, binning: str) -> pd.Series:
    if feature not in frame.columns:
        raise EvalError(f"frame has no column {feature!r}", field=feature, choices=list(frame.columns))
    return group_labels(frame[feature], bins, binning)


def _prepare(frame: pd.DataFrame, feature: str | None, classes: Sequence[str], label: str, bins: int,
             binning: str) -> tuple[np.ndarray, pd.Categorical, list[str]]:
    """Labels of the labelled rows, their groups (one group "all" without a feature), group names."""
    if label not in frame.columns:
        raise EvalError(f"frame has no column {label!r}", field=label, choices=list(frame.columns))
    matrix, labelled = label_matrix(frame[label], len(classes))
    if feature is None:
        groups = pd.Categorical(["all"] * len(frame), categories=["all"])
    else:
        groups = pd.Categorical(_groups(frame, feature, bins, binning))
    groups = groups[labelled]
    return matrix[labelled], groups, [str(c) for c in groups.categories]


def _counts(matrix: np.ndarray, groups: pd.Categorical) -> tuple[np.ndarray, np.ndarray]:
    """(G, K) images of each group carrying each class, and (G,) images per group (present groups only)."""
    codes = np.asarray(groups.codes)
    one_hot = np.zeros((len(groups.categories), len(codes)))
    one_hot[codes, np.arange(len(codes))] = 1.0
    return one_hot @ matrix.astype(np.float64), one_hot.sum(axis=1)


def class_distribution(frame: pd.DataFrame, feature: str | None, classes: Sequence[str], *,
                       label: str = "true_label", bins: int = 4, binning: str = "equal") -> pd.DataFrame:
    """One row per group and class: ``images`` carrying the class, ``group_images``, ``share``
    (P(class | group)) and ``overall_share`` (P(class) over the frame)."""
    matrix, groups, names = _prepare(frame, feature, classes, label, bins, binning)
    counts, sizes = _counts(matrix, groups)
    total = max(len(matrix), 1)
    overall = matrix.sum(axis=0) / total
    g, k = np.meshgrid(np.arange(len(names)), np.arange(len(classes)), indexing="ij")
    out = pd.DataFrame({
        "group": pd.Categorical(np.asarray(names, dtype=object)[g.ravel()], categories=names, ordered=True),
        "class": pd.Categorical(np.asarray(classes, dtype=object)[k.ravel()], categories=list(classes), ordered=True),
        "images": counts.ravel().astype(np.int64), "group_images": sizes[g.ravel()].astype(np.int64),
        "share": np.divide(counts, sizes[:, None], out=np.zeros_like(counts), where=sizes[:, None] > 0).ravel(),
        "overall_share": overall[k.ravel()]})
    return out[out["group_images"] > 0].reset_index(drop=True)


def _per_group_measures(p_pos: np.ndarray, p_feature: np.ndarray, p_pos_feature: np.ndarray, n: int) -> dict:
    """The toolbox's per (group, class) measures; arrays broadcast to (G, K)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        dp = p_pos_feature / p_feature
        a = n ** 2 * (1 - 2 * p_feature - 2 * p_pos + 2 * p_pos_feature + 2 * p_pos * p_feature)
        b = n * (2 * p_feature + 2 * p_pos - 4 * p_pos_feature - 1)
        c = n ** 2 * np.sqrt((p_feature - p_feature ** 2) * (p_pos - p_pos ** 2))
        return {
            "dp": dp,
            "pmi": np.where(dp == 0, -np.inf, np.log(dp)),
            "sdc": p_pos_feature / (p_feature + p_pos),
            "ji": p_pos_feature / (p_feature + p_pos - p_pos_feature),
            "krc": (a + b) / c,
            "llr": np.where(p_pos_feature == 0, -np.inf, np.log(p_pos_feature / p_pos)),
            "t_test": (p_pos - p_feature * p_pos) / np.sqrt(p_feature * p_pos),
        }


def group_measures(frame: pd.DataFrame, feature: str, classes: Sequence[str], *, label: str = "true_label",
                   bins: int = 4, binning: str = "equal") -> pd.DataFrame:
    """One row per group and class: ``p_feature``, ``p_pos``, ``p_pos_feature`` and each of
    ``FEATURE_MEASURES`` (what ``feature_balance`` takes differences of)."""
    matrix, groups, names = _prepare(frame, feature, classes, label, bins, binning)
    counts, sizes = _counts(matrix, groups)
    present = sizes > 0
    counts, sizes = counts[present], sizes[present]
    names = [n for n, p in zip(names, present) if p]
    n = len(matrix)
    p_feature = (sizes / n)[:, None]
    p_pos = (matrix.sum(axis=0) / n)[None, :]
    p_pos_feature = counts / n
    measures = _per_group_measures(p_pos, p_feature, p_pos_feature, n)
    g, k = np.meshgrid(np.arange(len(names)), np.arange(len(classes)), indexing="ij")
    out = pd.DataFrame({"group": np.asarray(names, dtype=object)[g.ravel()],
                        "class": np.asarray(classes, dtype=object)[k.ravel()],
                        "p_feature": np.broadcast_to(p_feature, counts.shape).ravel(),
                        "p_pos": np.broadcast_to(p_pos, counts.shape).ravel(),
                        "p_pos_feature": p_pos_feature.ravel()})
    for name in FEATURE_MEASURES:
        out[name] = np.broadcast_to(measures[name], counts.shape).ravel()
    return out


def feature_balance(frame: pd.DataFrame, feature: str, classes: Sequence[str], *, label: str = "true_label",
                    bins: int = 4, binning: str = "equal") -> pd.DataFrame:
    """One row per class and pair of groups (A before B in group order): the gap A - B of each
    of ``FEATURE_MEASURES`` and ``t_test_pvalue``. Classes nobody carries are left out."""
    per_group = group_measures(frame, feature, classes, label=label, bins=bins, binning=binning)
    names = list(dict.fromkeys(per_group["group"]))
    n_groups, n_classes = len(names), len(classes)
    columns = ["feature", "class", "group_a", "group_b", *FEATURE_MEASURES, "t_test_pvalue"]
    if n_groups < 2:
        return pd.DataFrame(columns=columns)
    values = {m: per_group[m].to_numpy(np.float64).reshape(n_groups, n_classes) for m in FEATURE_MEASURES}
    carried = per_group["p_pos"].to_numpy().reshape(n_groups, n_classes)[0] > 0
    pairs = np.array(list(itertools.combinations(range(n_groups), 2)))
    a, b = pairs[:, 0], pairs[:, 1]
    kept = np.flatnonzero(carried)
    out = pd.DataFrame({
        "feature": feature,
        "class": np.repeat(np.asarray(classes, dtype=object)[kept], len(pairs)),
        "group_a": np.tile(np.asarray(names, dtype=object)[a], len(kept)),
        "group_b": np.tile(np.asarray(names, dtype=object)[b], len(kept)),
    })
    with np.errstate(invalid="ignore"):
        for m in FEATURE_MEASURES:
            out[m] = (values[m][a] - values[m][b]).T[kept].ravel()
    out["t_test_pvalue"] = stats.t.sf(np.abs(out["t_test"].to_numpy()), n_groups - 1)
    return out[columns]


def distribution_measures(observed: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """The distances of class counts ``observed`` from ``reference`` shares (both over the same classes)."""
    observed = np.asarray(observed, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64) / np.sum(reference)
    total = observed.sum()
    if total == 0:
        return {m: float("nan") for m in DISTRIBUTION_MEASURES}
    shares = observed / total
    middle = (shares + reference) / 2
    chi = stats.chisquare(observed, reference * total)
    return {
        "kl_divergence": float(stats.entropy(shares, reference)),
        "js_distance": float(np.sqrt((stats.entropy(shares, middle) + stats.entropy(reference, middle)) / 2)),
        "wasserstein": float(stats.wasserstein_distance(shares, reference)),
        "inf_norm": float(distance.chebyshev(shares, reference)),
        "total_variation": float(0.5 * np.abs(shares - reference).sum()),
        "chi_square": float(chi.statistic),
        "chi_square_pvalue": float(chi.pvalue),
    }


def distribution_balance(frame: pd.DataFrame, feature: str | None, classes: Sequence[str], *,
                         reference: str = "uniform", label: str = "true_label", bins: int = 4,
                         binning: str = "equal") -> pd.DataFrame:
    """One row per group (one row "all" without a feature): ``images``, ``occurrences`` and
    each of ``DISTRIBUTION_MEASURES`` of its class distribution against ``reference``
    ("uniform" over the classes, or "overall": the frame's own distribution; classes that
    never occur in the frame are then left out)."""
    if reference not in REFERENCES:
        raise EvalError(f"unknown reference {reference!r}", field="reference", choices=list(REFERENCES))
    matrix, groups, names = _prepare(frame, feature, classes, label, bins, binning)
    counts, sizes = _counts(matrix, groups)
    overall = matrix.sum(axis=0).astype(np.float64)
    if reference == "uniform":
        expected = np.ones(len(classes))
    else:
        keep = overall > 0
        counts, expected = counts[:, keep], overall[keep]
    rows = []
    for name, row, size in zip(names, counts, sizes):
        if size == 0:
            continue
        rows.append({"group": name, "images": int(size), "occurrences": int(row.sum()),
                     **distribution_measures(row, expected)})
    return pd.DataFrame(rows, columns=["group", "images", "occurrences", *DISTRIBUTION_MEASURES])


def aggregate_balance(frame: pd.DataFrame, feature: str, *, bins: int = 4, binning: str = "equal",
                      epsilon: float = 1.0) -> dict[str, float]:
    """Inequality of the group sizes of ``feature``: Atkinson index (``epsilon``), Theil T and L."""
    sizes = _groups(frame, feature, bins, binning).value_counts(sort=False).to_numpy(np.float64)
    sizes = sizes[sizes > 0]
    if not len(sizes):
        return {m: float("nan") for m in AGGREGATE_MEASURES}
    relative = sizes / sizes.mean()
    if abs(1 - epsilon) < 1e-12:
        atkinson = 1.0 - np.prod(relative) ** (1.0 / len(relative))
    else:
        atkinson = 1.0 - np.mean(relative ** (1 - epsilon)) ** (1.0 / (1 - epsilon))
    return {"atkinson": float(atkinson), "theil_t": float(np.mean(relative * np.log(relative))),
            "theil_l": float(np.mean(-np.log(relative)))}


def cohort_balance_frame(store, cohort, features: Sequence[str], model_id: str | None = None,
                         **thresholds: float) -> pd.DataFrame:
    """The cohort's ``image_id``, ``true_label`` and ``features`` (``model_id`` is needed only
    when the cohort or a feature reads a model's columns)."""
    from .cohorts import catalog_of, cohort_rows

    catalog = catalog_of(store)
    columns = list(dict.fromkeys(["image_id", "true_label", *features]))
    return cohort_rows(store, cohort, model_id, columns=columns, catalog=catalog, **thresholds)
