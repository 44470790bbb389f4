"""Compare page in a real browser: a changed-image set opens in the explorer, the PDF scorecard downloads."""

from __future__ import annotations

from pathlib import Path

from core.cohorts import catalog_of, parse_query
from core.compare import compare_models
from core.store import Store

from .conftest import SCREENSHOTS
from .helpers import SETTLE_MS, bar_text, query, settle, visit


def loaded(page) -> None:
    """Settled, with every element drawn (no loading skeletons left)."""
    settle(page)
    page.wait_for_function('!document.querySelector(\'[data-testid="stSkeleton"]\')', timeout=SETTLE_MS)


def whole_page_shot(page, name: str) -> None:
    """A screenshot of the whole page: Streamlit scrolls inside its main block, so the window grows to fit."""
    height = page.evaluate('document.querySelector(\'[data-testid="stMain"]\').scrollHeight')
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": max(size["height"], min(height, 6000))})
    page.wait_for_timeout(500)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
    page.set_viewport_size(size)


def test_new_errors_open_in_the_explorer_and_the_scorecard_downloads(page, server, e2e_stores, outside_requests):
    store = Store(e2e_stores / "demo-multiclass.duckdb")
    expected = compare_models(store, "baseline", "candidate", links=False).new_errors
    assert expected.count
    visit(page, server, "/compare?store=demo-multiclass")
    page.get_by_text("Metrics per cohort").wait_for()
    loaded(page)
    assert (query(page)["model"], query(page)["compare.candidate"]) == ("baseline", "candidate")
    whole_page_shot(page, "compare-multiclass")

    page.get_by_role("button", name="Open new errors").click()
    page.wait_for_url("**/explorer?**", timeout=SETTLE_MS)
    page.get_by_role("heading", name="Data explorer").wait_for()
    loaded(page)
    params = query(page)
    assert params["model"] == "candidate" and "compare.candidate" not in params
    cohort = parse_query(params, catalog_of(store)).cohort
    assert sorted(cohort.filters[0].value) == expected.image_ids.tolist()
    assert f"{expected.count:,} of" in bar_text(page)
    whole_page_shot(page, "compare-new-errors-in-explorer")

    visit(page, server, "/compare?store=demo-multiclass")
    page.get_by_role("tab", name="PDF scorecard").click()
    page.get_by_role("button", name="Prepare scorecard").click()
    download_button = page.get_by_role("button", name="Download PDF scorecard")
    download_button.wait_for(timeout=SETTLE_MS)
    with page.expect_download(timeout=SETTLE_MS) as download:
        download_button.click()
    assert download.value.suggested_filename == "scorecard-demo-multiclass-candidate-vs-baseline.pdf"
    assert Path(download.value.path()).read_bytes().startswith(b"%PDF")
    assert not outside_requests


def test_detection_comparison_draws_objects_and_cohorts(page, server):
    visit(page, server, "/compare?store=demo-detection&site__eq=south")
    page.get_by_text("Newly missed", exact=False).first.wait_for()
    loaded(page)
    assert page.get_by_text("Open the").count() == 1  # the newly-missed-images button
    whole_page_shot(page, "compare-detection-cohort")
