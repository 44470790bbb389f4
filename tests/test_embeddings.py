"""Embeddings: the hooked features, PCA against scikit-learn, blocked duplicate search against brute force."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.decomposition import PCA

from app.review_views import brushed_ids
from core.embeddings import (DUPLICATES_TABLE, EMBEDDINGS_TABLE, compute_embeddings, embeddings_main, last_linear,
                             near_duplicates, pca_2d, penultimate_features)
from core.errors import EvalError
from core.ingest.build import Dataset, ModelRun, add_model, build_store
from core.store import Store

SIZE = 16


class QuadrantColours(torch.nn.Module):
    """Features: each 2×2 quadrant's mean colour, centred on grey (12 values); a linear head on top."""

    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(12, 12)  # an earlier linear layer: the hook must take the last one
        with torch.no_grad():
            self.hidden.weight.copy_(torch.eye(12))
            self.hidden.bias.zero_()
        self.head = torch.nn.Linear(12, 3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x - 0.5, 2).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.features(x)))


def quadrant_colours() -> torch.nn.Module:
    torch.manual_seed(0)
    return QuadrantColours()


class NoLinear(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def quadrant_images(folder, n: int, duplicates: dict[int, int]) -> list[str]:
    """``n`` images of random quadrant colours; image ``b`` repeats image ``a`` for each ``b: a``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    colours = rng.integers(0, 256, (n, 2, 2, 3), dtype=np.uint8)
    for copy, original in duplicates.items():
        colours[copy] = colours[original]
    uris = []
    for i in range(n):
        pixels = np.kron(colours[i], np.ones((SIZE // 2, SIZE // 2, 1), dtype=np.uint8))
        path = folder / f"q{i}.png"
        Image.fromarray(pixels).save(path)
        uris.append(str(path))
    return uris


def test_hook_takes_last_linear_input():
    model = quadrant_colours().eval()
    assert last_linear(model) is model.head
    x = torch.rand(5, 3, SIZE, SIZE)
    features = penultimate_features(model, [x[:3], x[3:]], torch.device("cpu"))
    np.testing.assert_allclose(features, model.features(x).numpy(), atol=1e-6)
    with pytest.raises(EvalError, match="no nn.Linear"):
        penultimate_features(NoLinear(), [x], torch.device("cpu"))


def test_pca_matches_sklearn_up_to_sign():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 8)) * np.array([5, 3, 1, 1, .5, .5, .1, .1])
    ours = pca_2d(features)
    reference = PCA(n_components=2).fit_transform(features)
    np.testing.assert_allclose(np.abs(ours), np.abs(reference), atol=1e-8)
    assert ours[:, 0].var() > ours[:, 1].var()
    # Signs are fixed by the loadings, not by the SVD's whim: a shuffled copy maps to the same points.
    order = rng.permutation(len(features))
    np.testing.assert_allclose(pca_2d(features[order]), ours[order], atol=1e-8)


def brute_force_pairs(features: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    sims = unit @ unit.T
    a, b = np.nonzero(np.triu(sims >= threshold, k=1))
    return set(zip(a.tolist(), b.tolist()))


def test_blocked_duplicates_equal_brute_force():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(50, 6)).astype(np.float32)
    features[[7, 31, 44]] = features[[3, 3, 20]] * np.float32(1.5) + rng.normal(scale=1e-3, size=(3, 6))
    expected = brute_force_pairs(features, 0.98)
    assert {(3, 7), (3, 31), (7, 31), (20, 44)} <= expected
    for block in (1, 4, 7, 64):
        pairs = near_duplicates(features, threshold=0.98, block_rows=block, device="cpu")
        assert set(zip(pairs["a"], pairs["b"])) == expected
        assert (pairs["a"] < pairs["b"]).all() and pairs["similarity"].is_monotonic_decreasing
    top = near_duplicates(features, threshold=0.98, max_pairs=2, block_rows=4, device="cpu")
    everything = near_duplicates(features, threshold=0.98, device="cpu")
    # The two most similar pairs (tiles of another size may differ in the last float32 bit).
    assert len(top) == 2 and set(zip(top["a"], top["b"])) <= expected
    assert top["similarity"].min() >= everything["similarity"].iloc[2] - 1e-6


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("emb")
    n = 40
    uris = quadrant_images(folder / "imgs", n, {12: 5, 30: 21})
    images = pd.DataFrame({"image_id": np.arange(n), "uri": uris, "true_label": np.arange(n) % 3})
    probs = np.full((n, 3), 1 / 3, np.float32)
    params = {"loader": f"{__name__}:quadrant_colours", "kwargs": {}, "input_size": [SIZE, SIZE]}
    run = ModelRun("m", "m", params, pd.DataFrame({"image_id": np.arange(n), "probs": list(probs)}))
    return build_store(folder / "emb.duckdb", Dataset("emb", "multiclass", ["a", "b", "c"], images), [run]).path


def test_compute_embeddings_writes_parts(store_path, capsys):
    assert embeddings_main([str(store_path), "--device", "cpu", "--batch-size", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"model": "m", "images": 40, "near_duplicates": 2}
    store = Store(store_path)
    points = store.query(f'SELECT * FROM "{EMBEDDINGS_TABLE}" ORDER BY image_id')
    pairs = store.query(f'SELECT * FROM "{DUPLICATES_TABLE}" ORDER BY image_id_a')
    store.close()
    assert points.columns.tolist() == ["model_id", "image_id", "x", "y", "computed_at"]
    assert points["image_id"].tolist() == list(range(40)) and (points["model_id"] == "m").all()
    # A duplicate lands on its original's point.
    xy = points[["x", "y"]].to_numpy()
    np.testing.assert_allclose(xy[12], xy[5], atol=1e-5)
    assert not np.allclose(xy[12], xy[6], atol=1e-3)
    assert list(zip(pairs["image_id_a"], pairs["image_id_b"])) == [(5, 12), (21, 30)]
    assert (pairs["similarity"] > 0.9999).all()


def test_bad_arguments(store_path):
    with pytest.raises(EvalError, match="unknown model"):
        compute_embeddings(store_path, "nope", device="cpu")
    with pytest.raises(EvalError, match="batch size"):
        compute_embeddings(store_path, "m", batch_size=0, device="cpu")


def test_review_page(store_path, monkeypatch):
    """The review page, listed in the menu, in its three views."""
    from streamlit.testing.v1 import AppTest

    import app.nav as nav
    from core.label_quality import write_label_quality
    from core.state import StateDB

    assert "review" in {p.url_path for p in nav.PAGES}
    monkeypatch.setenv("VISIONLENS_DATA", str(store_path.parent))
    compute_embeddings(store_path, "m", device="cpu")
    flagged, _ = write_label_quality(store_path, "m")  # uniform probabilities: nothing is flagged
    assert not flagged["label_issue"].any()

    def page(mode: str | None, model: str = "m") -> AppTest:
        at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "streamlit_app.py"), default_timeout=120)
        at.query_params.update({"store": "emb", "model": model, **({"view": mode} if mode else {})})
        at.run()
        at.switch_page("pages/review.py")
        at.run()
        assert not at.exception, [e.message for e in at.exception]
        return at

    assert any("Nothing to review" in s.value for s in page(None).success)
    assert any("Drag a rectangle" in c.value for c in page("map").caption)
    at = page("duplicates")
    assert any("**2** pairs" in c.value for c in at.caption)
    assert StateDB.for_store(store_path).list_reviews() == []
    probs = np.random.default_rng(3).dirichlet([.3, .3, .3], 40).astype(np.float32)
    add_model(store_path, ModelRun("sure", "sure", {}, pd.DataFrame({"image_id": np.arange(40), "probs": list(probs)})))
    assert any("No label-quality scores" in i.value for i in page(None, "sure").info)
    # Stored from a file: the page says what the model lacks rather than a command that would fail.
    assert any("cannot be re-run" in i.value for i in page("map", "sure").info)
    assert not any("visionlens embeddings" in i.value for i in page("duplicates", "sure").info)
    add_model(store_path, ModelRun("labels-only", "labels-only", {}, pd.DataFrame(
        {"image_id": np.arange(40), "pred_label": np.arange(40) % 3, "score": np.ones(40, np.float32)})))
    assert any("needs class probabilities" in i.value for i in page(None, "labels-only").info)
    with pytest.raises(EvalError, match="stored no class probabilities"):
        write_label_quality(store_path, "labels-only")
    flagged, _ = write_label_quality(store_path, "sure")
    at = page(None, "sure")
    first = int(flagged.loc[flagged["label_issue"]].sort_values(["label_quality_score", "image_id"])["image_id"].iloc[0])
    assert next(m.value for m in at.markdown if m.value.startswith("**Image ")).startswith(f"**Image {first}**")
    status = at.segmented_control(key="vl_review_status")
    opened = status.format_func("open")
    at.text_input(key=f"vl_review_image_n_{first}").set_value("relabel as b").run()
    at.segmented_control(key=f"vl_review_image_s_{first}").set_value("fixed").run()
    review = StateDB.for_store(store_path).get_review("image", first)
    assert (review.status, review.note) == ("fixed", "relabel as b")
    # The counts and the open list drawn in the same run already hold the change.
    status = at.segmented_control(key="vl_review_status")
    n_open = int(opened.split("(")[1].rstrip(")"))
    assert status.format_func("open") == f"open ({n_open - 1})" and status.format_func("fixed") == "fixed (1)"
    assert not any(m.value.startswith(f"**Image {first}**") for m in at.markdown)


def test_brushed_ids_are_the_points_inside_the_rectangle():
    points = pd.DataFrame({"image_id": [7, 3, 5, 1], "x": [0.0, 1.0, 2.0, 3.0], "y": [0.0, 1.0, 1.5, 5.0]})
    assert brushed_ids(points, None) is None and brushed_ids(points, {}) is None
    assert brushed_ids(points, {"x": [0, 3]}) is None  # a band, not yet a rectangle
    assert brushed_ids(points, {"x": [2.0, 1.0], "y": [0.5, 1.5]}) == [3, 5]  # edges included, either order
    assert brushed_ids(points, {"x": [-1, 4], "y": [-1, 6]}) == [1, 3, 5, 7]
    assert brushed_ids(points, {"x": [10, 11], "y": [0, 1]}) == []


def test_map_selection_becomes_a_saved_cohort_opened_in_the_explorer(store_path, monkeypatch):
    """A rectangle on the map (the selection state Streamlit's frontend reports) lists its images;
    saving them opens the explorer on ?cohort=<id>, a saved cohort of exactly those images."""
    from core.cohorts import catalog_of, cohort_rows, parse_query
    from core.state import StateDB
    from e2e.harness import open_app, served_navigation

    monkeypatch.setenv("VISIONLENS_DATA", str(store_path.parent))
    points, _ = compute_embeddings(store_path, "m", device="cpu")
    x0, x1 = float(points["x"].min()), float(points["x"].median())
    y0, y1 = float(points["y"].min()), float(points["y"].quantile(0.75))
    inside = points["x"].between(x0, x1) & points["y"].between(y0, y1)
    expected = sorted(points.loc[inside, "image_id"].astype(int).tolist())
    assert 0 < len(expected) < len(points)
    with served_navigation():
        at = open_app("store=emb&model=m&view=map", page="pages/review.py")
        assert any("Drag a rectangle" in c.value for c in at.caption)
        at.session_state["vl_review_map"] = {"selection": {"brush": {"x": [x1, x0], "y": [y0, y1]}}}
        at.run()
        assert f"**{len(expected)}** images selected" in [m.value for m in at.markdown]
        at.button(key="vl_review_save").click().run()  # a cohort needs a name: the click says so, saves nothing
        assert [w.value for w in at.warning] == ["Type a name to save it under first."]
        assert StateDB.for_store(store_path).list_cohorts() == []
        at.text_input(key="vl_review_cohort_name").set_value("lower left").run()
        at.button(key="vl_review_save").click().run()
        assert not at.exception, [e.message for e in at.exception]
    saved = [c for c in StateDB.for_store(store_path).list_cohorts() if c.name == "lower left"]
    assert len(saved) == 1 and saved[0].description == "selected on the embedding map"
    assert at.query_params["cohort"] == str(saved[0].id)
    assert [h.value for h in at.header] == ["Data explorer"]
    store = Store(store_path)
    try:
        catalog = catalog_of(store)
        rows = cohort_rows(store, parse_query(f"cohort={saved[0].id}", catalog), "m", columns=["image_id"],
                           catalog=catalog)
    finally:
        store.close()
    assert sorted(rows["image_id"].astype(int).tolist()) == expected


def test_saved_cohorts_get_a_review_status_and_note(store_path, monkeypatch):
    from core.state import StateDB
    from e2e.harness import open_app, served_navigation

    monkeypatch.setenv("VISIONLENS_DATA", str(store_path.parent))
    state = StateDB.for_store(store_path)
    for cohort in state.list_cohorts():  # other tests of this module may have saved some
        state.delete_cohort(cohort.id, children="cascade")
    with served_navigation():
        at = open_app("store=emb&model=m&view=cohorts", page="pages/review.py")
        assert any("No saved cohorts yet" in i.value for i in at.info)
        first = state.create_cohort("first ten", image_ids=range(10))
        second = state.create_cohort("duplicates", image_ids=[5, 12], description="copies of one picture")
        at.run()
        assert any("**2** saved cohorts" in c.value for c in at.caption)
        assert any(m.value.startswith("**duplicates** (#") and "copies of one picture" in m.value
                   for m in at.markdown)
        at.text_input(key=f"vl_review_cohort_n_{second.id}").set_value("drop #12").run()
        at.segmented_control(key=f"vl_review_cohort_s_{second.id}").set_value("fixed").run()
        assert not at.exception, [e.message for e in at.exception]
    review = state.get_review("cohort", second.id)
    assert (review.status, review.note) == ("fixed", "drop #12")
    assert state.get_review("cohort", first.id) is None  # untouched cohorts get no review row
