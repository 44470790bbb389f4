"""What-if and robustness in a real browser: a flyout slider perturbs the image and the
prediction changes; the robustness page and the data balance view draw stored results.

The shared e2e stores hold predictions from files (no model to re-run), so this
module serves its own small store whose model can be re-run (an untrained demo
architecture, seeded), with a blur sweep and flip strengths stored, from its own
``streamlit run``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core.demo_models import build_demo_model
from core.ingest.build import Dataset, ModelRun, build_store
from core.models import predict_classifier
from core.rerun import run_counterfactuals, run_sweep

from .conftest import CHROMIUM, serve
from .helpers import query, settle, shot, visit

STORE = "whatif-multiclass"
CLASSES = [f"digit {d}" for d in range(10)]


def _build(folder: Path, n: int = 6, size: int = 48) -> None:
    rng = np.random.default_rng(0)
    images_dir = folder / f"{STORE}.images"
    images_dir.mkdir(parents=True)
    uris = []
    for i in range(n):
        pixels = np.full((size, size, 3), rng.integers(150, 230, 3), dtype=np.uint8)
        x0, y0 = rng.integers(4, size // 2, 2)
        pixels[y0:y0 + size // 3, x0:x0 + size // 4] = rng.integers(0, 80, 3)
        path = images_dir / f"{i}.png"
        Image.fromarray(pixels).save(path)
        uris.append(str(path))
    torch.manual_seed(2)
    model = build_demo_model("multiclass-baseline").eval()
    with torch.no_grad():  # untrained weights, enlarged: confident outputs that react to the image
        for weights in model.parameters():
            if weights.ndim > 1:
                weights.mul_(4.0)
        model.head.weight.mul_(20.0)
    path = folder / "model.pt"
    torch.save(model.state_dict(), path)
    params = {"loader": "core.demo:load_demo_model", "kwargs": {"path": str(path), "kind": "multiclass-baseline"},
              "input_size": [size, size]}
    ids = np.arange(n)
    preds = predict_classifier(model, uris, ids, task="multiclass", input_size=(size, size), device="cpu")
    images = pd.DataFrame({"image_id": ids, "uri": uris, "true_label": rng.integers(0, 10, n).astype(np.int32)})
    path = build_store(folder / STORE, Dataset(STORE, "multiclass", CLASSES, images),
                       [ModelRun("net", "Net", params, preds)]).path
    run_sweep(path, "blur", [0, 1, 2], device="cpu")
    run_counterfactuals(path, "blur", device="cpu", steps=4)


@pytest.fixture(scope="module")
def whatif_server(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed (run `make browser`)")
    folder = tmp_path_factory.mktemp("whatif-store")
    _build(folder)
    with serve(folder, folder / "streamlit.log") as base:
        yield base


@pytest.fixture
def whatif_page(browser, whatif_server):
    context = browser.new_context(viewport={"width": 1440, "height": 1100})
    # The app may reach only itself: a CDN request fails the page instead of passing unnoticed.
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(whatif_server)
                  else route.abort())
    yield context.new_page(), whatif_server
    context.close()


def _perturbed_caption(dialog) -> str:
    return dialog.locator(".st-key-vl_wi_perturbed").get_by_test_id("stCaptionContainer").first.inner_text()


def _open_whatif(page, base: str, query_string: str = ""):
    visit(page, base, f"/explorer?store={STORE}&image=2{query_string}")
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    toggle = dialog.get_by_text("What-if: perturb this image and re-run the model")
    toggle.wait_for()
    if "whatif.open=1" not in query_string:
        toggle.click()
        settle(page)
    dialog.locator(".st-key-vl_wi_perturbed").wait_for(timeout=60_000)
    return dialog


def _slider(dialog, label: str):
    return dialog.get_by_test_id("stSlider").filter(has_text=label)


def test_moving_a_slider_changes_the_prediction(whatif_page):
    page, base = whatif_page
    dialog = _open_whatif(page, base)
    before = _perturbed_caption(dialog)
    assert re.fullmatch(r"digit \d \(\d\.\d{3}\)", before)
    _slider(dialog, "Brightness").get_by_role("slider").focus()
    page.keyboard.press("End")  # brightness +1: a white image
    settle(page)
    dialog.get_by_text(re.compile("prediction (changed|unchanged)")).wait_for()
    after = _perturbed_caption(dialog)
    assert after != before
    assert float(query(page)["whatif.brightness"]) == 1.0
    shot(page, "whatif")


def test_a_copied_url_reopens_the_same_perturbation(whatif_page):
    page, base = whatif_page
    dialog = _open_whatif(page, base, "&whatif.open=1&whatif.blur=3&whatif.noise=0.2")
    assert float(_slider(dialog, "Blur").get_by_test_id("stSliderThumbValue").inner_text()) == 3.0
    first = _perturbed_caption(dialog)
    dialog.get_by_text(re.compile("prediction (changed|unchanged)")).wait_for()
    page.reload()
    page.get_by_role("dialog").locator(".st-key-vl_wi_perturbed").wait_for(timeout=60_000)
    settle(page)
    assert _perturbed_caption(page.get_by_role("dialog")) == first
    assert float(query(page)["whatif.blur"]) == 3.0


def test_robustness_page_and_balance_view(whatif_page):
    page, base = whatif_page
    visit(page, base, f"/robustness?store={STORE}&robustness.target=0.5")
    page.get_by_text("Most fragile images").wait_for()
    page.get_by_test_id("stDataFrame").first.wait_for()
    assert float(page.get_by_label("Target", exact=True).input_value()) == 0.5  # the URL set the widget
    assert page.get_by_test_id("stVegaLiteChart").count() == 2  # metric and flip rate against strength
    assert page.get_by_test_id("stException").count() == 0
    assert query(page)["robustness.target"] == "0.5"
    shot(page, "robustness")
    visit(page, base, f"/data-analysis?store={STORE}&view=balance&balance.feature=brightness")
    page.get_by_text("Distribution balance").wait_for()
    page.get_by_text("Feature balance").wait_for()
    assert page.get_by_test_id("stException").count() == 0
    shot(page, "balance")
