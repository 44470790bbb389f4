"""Data analysis in a real browser: aggregate and point charts and the table, on every task."""

from __future__ import annotations

import re

import pytest

from .helpers import query, settle, shot, visit

TASKS = ("multiclass", "multilabel", "detection")
WARM_UP_MS = 300_000


@pytest.fixture(scope="module", autouse=True)
def warm_up(browser, server):
    """A fresh server's first run of this page imports the engine (scikit-learn, …): wait for it once."""
    context = browser.new_context()
    context.new_page().goto(server + "/data-analysis?store=demo-multiclass")
    context.pages[0].wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]',
                                       timeout=WARM_UP_MS)
    context.close()


@pytest.mark.parametrize("task", TASKS)
def test_chart_and_table_views(page, server, task):
    visit(page, server, f"/data-analysis?store=demo-{task}")
    page.get_by_text(re.compile(r"images, counted per")).wait_for()
    page.locator('[data-testid="stVegaLiteChart"] .mark-rect path').first.wait_for(state="attached")
    shot(page, f"{task}-data-aggregate")
    page.get_by_role("radio", name="Individual datapoints", exact=True).click()
    settle(page)
    page.get_by_text(re.compile(r"Click a point to open the image")).wait_for()
    page.locator('[data-testid="stVegaLiteChart"] .mark-symbol path').first.wait_for(state="attached")
    shot(page, f"{task}-data-points")
    page.get_by_role("radio", name="Table view", exact=True).click()
    settle(page)
    assert query(page)["view"] == "table"
    page.locator('[data-testid="stDataFrame"]').first.wait_for()
    shot(page, f"{task}-data-table")
