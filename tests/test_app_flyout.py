"""The image flyout under AppTest: prediction facts, detection boxes, computing an explanation."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.explain import available_explanations
from core.metrics.detection import image_objects
from core.store import Store
from e2e.harness import open_app, served_navigation
from e2e.stores import build_detection, build_multiclass


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stores")
    build_multiclass(folder, n=12)
    build_detection(folder, n=10)
    return folder


@pytest.fixture
def app(folder, monkeypatch):
    monkeypatch.setenv("VISIONLENS_DATA", str(folder))
    with served_navigation():
        yield open_app


def test_detection_flyout_lists_every_box_with_its_outcome(folder, app):
    at = app("store=demo-detection&image=2&iou=0.75", page="pages/explorer.py")
    expected = image_objects(Store(folder / "demo-detection"), "baseline", 2, 0.75, 0.5)
    table = next(d.value for d in at.dataframe if "Outcome" in d.value.columns)
    assert len(table) == len(expected)
    counts = table["Outcome"].value_counts().to_dict()
    assert counts.get("TP", 0) == int(((expected["kind"] == "det") & (expected["status"] == "tp")).sum())
    assert counts.get("FN", 0) == int((expected["status"] == "fn").sum())
    assert any("at IoU 0.75" in m.value for m in at.markdown)


def test_an_explanation_is_computed_stored_and_shown(folder, app):
    store = Store(folder / "demo-multiclass")
    assert available_explanations(store, "baseline", 4).empty
    at = app("store=demo-multiclass&image=4", page="pages/explorer.py")
    assert any("No explanation stored" in c.value for c in at.caption)
    at.button(key="vl_fly_ask_4").click().run()
    at.selectbox(key="vl_fly_method_4").select("ig").run()
    at.button(key="vl_fly_compute_4").click().run()
    assert not at.exception, [e.message for e in at.exception]
    store.refresh()
    stored = available_explanations(store, "baseline", 4)
    assert list(stored["method"]) == ["ig"]
    assert at.selectbox(key="vl_fly_expl_4").value == 0  # the stored map, shown over the image
