"""core.balance against a plain pandas / scipy reference on toy tables (the RAI toolbox's formulas)."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from core import balance as B
from core.errors import EvalError

CLASSES = ["cat", "dog", "bird"]


@pytest.fixture
def toy() -> pd.DataFrame:
    rng = np.random.default_rng(4)
    n = 60
    site = rng.choice(["north", "south", "east"], n, p=[0.5, 0.3, 0.2])
    # Dogs are rarer in the south: a real imbalance for the measures to find.
    label = np.where(site == "south", rng.choice(3, n, p=[0.6, 0.1, 0.3]), rng.choice(3, n, p=[0.3, 0.4, 0.3]))
    frame = pd.DataFrame({"image_id": np.arange(n), "true_label": label.astype(float), "site": site,
                          "altitude": rng.uniform(0, 100, n)})
    frame.loc[[3, 17], "true_label"] = np.nan  # unlabelled images count nowhere
    return frame


def _labelled(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame[frame["true_label"].notna()].copy()
    out["true_label"] = out["true_label"].astype(int)
    return out


def _reference_group_measures(frame: pd.DataFrame, feature: str, positive: int) -> pd.DataFrame:
    """As the toolbox computes them: value counts over the table, one positive label."""
    df = _labelled(frame)
    n = len(df)
    p_feature = df[feature].value_counts() / n
    p_pos_feature = (df[df["true_label"] == positive][feature].value_counts() / n).reindex(p_feature.index,
                                                                                       fill_value=0.0)
    p_pos = (df["true_label"] == positive).sum() / n
    out = pd.DataFrame({"p_feature": p_feature, "p_pos_feature": p_pos_feature})
    out["dp"] = out["p_pos_feature"] / out["p_feature"]
    out["pmi"] = out["dp"].map(lambda v: -np.inf if v == 0 else np.log(v))
    out["sdc"] = out["p_pos_feature"] / (out["p_feature"] + p_pos)
    out["ji"] = out["p_pos_feature"] / (out["p_feature"] + p_pos - out["p_pos_feature"])
    pf, ppf = out["p_feature"], out["p_pos_feature"]
    concordant = n ** 2 * (1 - 2 * pf - 2 * p_pos + 2 * ppf + 2 * p_pos * pf) + n * (2 * pf + 2 * p_pos - 4 * ppf - 1)
    out["krc"] = concordant / (n ** 2 * np.sqrt((pf - pf ** 2) * (p_pos - p_pos ** 2)))
    out["llr"] = out["p_pos_feature"].map(lambda v: -np.inf if v == 0 else np.log(v / p_pos))
    out["t_test"] = (p_pos - pf * p_pos) / np.sqrt(pf * p_pos)
    return out


def test_feature_balance_equals_the_reference(toy):
    gaps = B.feature_balance(toy, "site", CLASSES)
    groups = ["east", "north", "south"]  # group order: sorted values
    assert len(gaps) == len(CLASSES) * 3
    for k, name in enumerate(CLASSES):
        reference = _reference_group_measures(toy, "site", k)
        for a, b in itertools.combinations(groups, 2):
            row = gaps[(gaps["class"] == name) & (gaps["group_a"] == a) & (gaps["group_b"] == b)].iloc[0]
            for measure in B.FEATURE_MEASURES:
                assert row[measure] == pytest.approx(reference.loc[a, measure] - reference.loc[b, measure],
                                                     abs=1e-12), (name, a, b, measure)
            expected_p = stats.t.sf(abs(reference.loc[a, "t_test"] - reference.loc[b, "t_test"]), 2)
            assert row["t_test_pvalue"] == pytest.approx(expected_p, abs=1e-12)
    dogs = gaps[(gaps["class"] == "dog") & (gaps["group_a"] == "north") & (gaps["group_b"] == "south")].iloc[0]
    labelled = _labelled(toy)
    rates = labelled.groupby("site")["true_label"].apply(lambda s: (s == 1).mean())
    assert dogs["dp"] == pytest.approx(rates["north"] - rates["south"])  # statistical parity difference
    assert dogs["dp"] > 0.2


def test_class_distribution_equals_a_crosstab(toy):
    table = B.class_distribution(toy, "site", CLASSES)
    labelled = _labelled(toy)
    counts = pd.crosstab(labelled["site"], labelled["true_label"]).reindex(columns=range(3), fill_value=0)
    for row in table.itertuples():
        k = CLASSES.index(row[2])
        assert row.images == counts.loc[row.group, k]
        assert row.group_images == counts.loc[row.group].sum()
        assert row.share == pytest.approx(counts.loc[row.group, k] / counts.loc[row.group].sum())
        assert row.overall_share == pytest.approx((labelled["true_label"] == k).mean())


@pytest.mark.parametrize("reference", B.REFERENCES)
def test_distribution_balance_equals_scipy(toy, reference):
    table = B.distribution_balance(toy, "site", CLASSES, reference=reference).set_index("group")
    labelled = _labelled(toy)
    overall = labelled["true_label"].value_counts().reindex(range(3), fill_value=0).to_numpy(float)
    expected_shares = np.full(3, 1 / 3) if reference == "uniform" else overall / overall.sum()
    for group, rows in labelled.groupby("site"):
        counts = rows["true_label"].value_counts().reindex(range(3), fill_value=0).to_numpy(float)
        shares = counts / counts.sum()
        middle = (shares + expected_shares) / 2
        row = table.loc[group]
        assert row["images"] == len(rows)
        kl = np.sum(np.where(shares > 0, shares * np.log(np.where(shares > 0, shares, 1) / expected_shares), 0))
        assert row["kl_divergence"] == pytest.approx(kl)
        js = np.sqrt(0.5 * stats.entropy(shares, middle) + 0.5 * stats.entropy(expected_shares, middle))
        assert row["js_distance"] == pytest.approx(js)
        assert row["wasserstein"] == pytest.approx(stats.wasserstein_distance(shares, expected_shares))
        assert row["inf_norm"] == pytest.approx(np.max(np.abs(shares - expected_shares)))
        assert row["total_variation"] == pytest.approx(0.5 * np.abs(shares - expected_shares).sum())
        chi = ((counts - expected_shares * counts.sum()) ** 2 / (expected_shares * counts.sum())).sum()
        assert row["chi_square"] == pytest.approx(chi)
        assert row["chi_square_pvalue"] == pytest.approx(stats.chi2.sf(chi, 2))


def test_whole_frame_against_uniform(toy):
    table = B.distribution_balance(toy, None, CLASSES)
    assert table["group"].tolist() == ["all"] and table["images"].iloc[0] == 58


def test_multilabel_lists_and_numeric_bins():
    frame = pd.DataFrame({"true_label": [[0, 1], [1], [], [0, 2], None, [2]],
                          "altitude": [1.0, 2.0, 3.0, 10.0, 11.0, 12.0]})
    table = B.class_distribution(frame, "altitude", CLASSES, bins=2)
    low = table[table["group"] == table["group"].cat.categories[0]].set_index("class")
    assert low["group_images"].iloc[0] == 3  # the unlabelled row drops, the empty list stays
    assert low.loc["dog", "images"] == 2 and low.loc["bird", "images"] == 0
    gaps = B.feature_balance(frame, "altitude", CLASSES, bins=2)
    assert set(gaps["class"]) == {"cat", "dog", "bird"}


def test_aggregate_balance():
    frame = pd.DataFrame({"site": ["a"] * 6 + ["b"] * 3 + ["c"] * 1})
    sizes = np.array([6.0, 3.0, 1.0])
    relative = sizes / sizes.mean()
    measures = B.aggregate_balance(frame, "site")
    assert measures["theil_t"] == pytest.approx(np.mean(relative * np.log(relative)))
    assert measures["theil_l"] == pytest.approx(np.mean(-np.log(relative)))
    assert measures["atkinson"] == pytest.approx(1 - np.exp(np.mean(np.log(relative))))
    equal = B.aggregate_balance(pd.DataFrame({"site": ["a", "b", "c"]}), "site")
    assert equal["atkinson"] == pytest.approx(0) and equal["theil_t"] == pytest.approx(0)


def test_bad_input_names_the_field(toy):
    with pytest.raises(EvalError, match="no column 'weather'"):
        B.feature_balance(toy, "weather", CLASSES)
    with pytest.raises(EvalError, match="unknown reference"):
        B.distribution_balance(toy, "site", CLASSES, reference="prior")
    with pytest.raises(EvalError, match="outside 0..2"):
        B.class_distribution(pd.DataFrame({"true_label": [5], "site": ["a"]}), "site", CLASSES)
