"""Model overview in a real browser: every task renders, the IoU slider moves mAP, fairness gaps show."""

from __future__ import annotations

import pytest

from core.cohorts import Cohort
from core.fairness import cohort_group_metrics
from core.metrics.detection import detection_metrics
from core.store import Store

from .conftest import SCREENSHOTS
from .helpers import query, settle, shot, visit

TASKS = ("multiclass", "multilabel", "detection")
SHOWN = 5e-5  # tables show four decimals
WARM_UP_MS = 300_000


@pytest.fixture(scope="module", autouse=True)
def warm_up(browser, server):
    """A fresh server's first run of this page imports the engine (scikit-learn, …): wait for it once."""
    context = browser.new_context()
    context.new_page().goto(server + "/model-overview?store=demo-multiclass")
    context.pages[0].wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]',
                                       timeout=WARM_UP_MS)
    context.close()


def table_rows(page, first_column: str) -> list[list[str]]:
    """Rows (cell texts) of the dataframe whose accessible table holds ``first_column``'s header."""
    page.locator('[data-testid="stDataFrame"] th', has_text=first_column).first.wait_for(state="attached")
    frames = page.locator('[data-testid="stDataFrame"]')
    for i in range(frames.count()):
        frame = frames.nth(i)
        headers = frame.locator("table thead th").all_inner_texts()
        if first_column in [h.strip() for h in headers]:
            rows = frame.locator("table tbody tr")
            return [rows.nth(r).locator("td").all_inner_texts() for r in range(rows.count())]
    raise AssertionError(f"no table with a {first_column!r} column")


def headers(page, first_column: str) -> list[str]:
    page.locator('[data-testid="stDataFrame"] th', has_text=first_column).first.wait_for(state="attached")
    frames = page.locator('[data-testid="stDataFrame"]')
    for i in range(frames.count()):
        texts = [h.strip() for h in frames.nth(i).locator("table thead th").all_inner_texts()]
        if first_column in texts:
            return texts
    raise AssertionError(f"no table with a {first_column!r} column")


@pytest.mark.parametrize("task", TASKS)
def test_overview_renders_on_each_task(page, server, task):
    visit(page, server, f"/model-overview?store=demo-{task}")
    page.get_by_text("Per label" if task == "multilabel" else "Per class", exact=True).wait_for()
    rows = table_rows(page, "Cohort")
    assert rows[0][0] == "All images" and rows[0][1].replace(",", "").isdigit()
    assert "N/A" not in rows[0]
    page.locator('[data-testid="stVegaLiteChart"]').first.wait_for()
    shot(page, f"{task}-model-overview")
    page.get_by_role("tab", name="Confusion matrix").click()
    settle(page)
    tab_shot(page, f"{task}-confusion-matrix")
    if task == "detection":
        for tab in ("PR curves", "TIDE errors"):
            page.get_by_role("tab", name=tab).click()
            settle(page)
            tab_shot(page, f"detection-{tab.split()[0].lower()}")


def tab_shot(page, name: str) -> None:
    """A picture of the visualisation tabs alone (the app scrolls inside its main area, so a page
    screenshot shows only the top)."""
    page.locator('[data-testid="stVegaLiteChart"]:visible').last.wait_for()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.locator('[data-testid="stTabs"]').screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def test_iou_slider_changes_map(page, server, e2e_stores):
    visit(page, server, "/model-overview?store=demo-detection")
    page.get_by_text("Per class", exact=True).wait_for()
    column = headers(page, "Cohort").index("mAP@IoU")
    before = float(table_rows(page, "Cohort")[0][column])
    slider = page.locator('[data-testid="stSidebar"]').get_by_role("slider").first
    slider.focus()
    page.keyboard.press("ArrowRight")
    settle(page)
    assert query(page)["iou"] == "0.55"
    after = float(table_rows(page, "Cohort")[0][column])
    store = Store(e2e_stores / "demo-detection.duckdb")
    for shown, iou in ((before, 0.5), (after, 0.55)):
        expected = detection_metrics(store, "baseline", None, iou=iou, score_threshold=0.5)["mAP"]
        assert shown == pytest.approx(expected, abs=SHOWN)
    assert after != before
    shot(page, "detection-model-overview-iou-055")


def test_fairness_table_shows_difference_and_ratio(page, server, e2e_stores):
    visit(page, server, "/model-overview?store=demo-multiclass&view=features")
    page.get_by_text("Disparity between groups").wait_for()
    assert headers(page, "Metric")[:4] == ["Metric", "Overall", "Difference (max − min)", "Ratio (min / max)"]
    gaps = {row[0]: row for row in table_rows(page, "Metric")}
    store = Store(e2e_stores / "demo-multiclass.duckdb")
    # The first user column (altitude) is grouped by default, in four equal-width bins.
    expected = cohort_group_metrics(store, Cohort(), "baseline", ["altitude"],
                                    ["accuracy", "error_rate", "precision_macro"], bins=4, binning="equal")
    assert float(gaps["Accuracy"][2]) == pytest.approx(expected.difference["accuracy"], abs=SHOWN)
    assert float(gaps["Accuracy"][3]) == pytest.approx(expected.ratio["accuracy"], abs=SHOWN)
    assert float(gaps["Error rate"][3]) == pytest.approx(expected.ratio["error_rate"], abs=SHOWN)
    counts = [int(row[1]) for row in table_rows(page, "Altitude")]
    assert counts == expected.by_group["count"].tolist()
    shot(page, "multiclass-feature-cohorts")
