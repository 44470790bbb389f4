"""Error analysis in a real browser: the tree draws, a clicked node becomes the cohort, the heat map too."""

from __future__ import annotations

import re

import pytest

from core.cohorts import Cohort, catalog_of, cohort_count, parse_query
from core.store import Store

from .helpers import bar_text, query, settle, shot, visit

TASKS = ("multiclass", "multilabel", "detection")
WARM_UP_MS = 300_000


@pytest.fixture(scope="module", autouse=True)
def warm_up(browser, server):
    """A fresh server's first run of this page imports the engine (scikit-learn, …): wait for it once."""
    context = browser.new_context()
    context.new_page().goto(server + "/error-analysis?store=demo-multiclass")
    context.pages[0].wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]',
                                       timeout=WARM_UP_MS)
    context.close()


def hit_marks(page, mark: str):
    """The marks of the chart's invisible click layer (drawn last, over the visible marks)."""
    return page.locator(f'[data-testid="stVegaLiteChart"] .mark-{mark}.role-mark').last.locator("path")


@pytest.mark.parametrize("task", TASKS)
def test_tree_draws_and_a_clicked_node_becomes_the_cohort(page, server, e2e_stores, outside_requests, task):
    visit(page, server, f"/error-analysis?store=demo-{task}")
    page.get_by_role("button", name="Make it the cohort").first.wait_for()
    nodes = hit_marks(page, "symbol")
    nodes.nth(2).wait_for(state="attached")
    shot(page, f"{task}-error-tree")
    # The second node is the root's first child (nodes are listed breadth first).
    nodes.nth(1).click()
    settle(page)
    panel = page.locator(".st-key-vl_ea_node_actions_panel")
    panel.get_by_text(re.compile(r"^Node #1( |$)")).wait_for()
    settle(page)
    images = int(panel.locator('[data-testid="stMetricValue"]').first.inner_text().replace(",", ""))
    panel.get_by_role("button", name="Make it the cohort").click()
    page.wait_for_url(re.compile(r"__"))
    settle(page)
    params = query(page)
    store = Store(e2e_stores / f"demo-{task}.duckdb")
    catalog = catalog_of(store)
    assert cohort_count(store, parse_query(params, catalog).cohort, "baseline") == images
    assert f"{images:,} of" in bar_text(page)
    page.locator(".st-key-vl_cohort_bar").scroll_into_view_if_needed()
    shot(page, f"{task}-error-tree-node-cohort")
    assert not outside_requests  # the tree is drawn offline


def test_heatmap_cell_becomes_the_cohort(page, server, e2e_stores):
    visit(page, server, "/error-analysis?store=demo-multiclass&view=heatmap")
    page.get_by_role("button", name="Make it the cohort").first.wait_for()
    cells = hit_marks(page, "rect")
    cells.nth(3).wait_for(state="attached")
    shot(page, "multiclass-error-heatmap")
    cells.nth(0).click()
    settle(page)
    panel = page.locator(".st-key-vl_hm_actions_panel")
    images = int(panel.locator('[data-testid="stMetricValue"]').first.inner_text().replace(",", ""))
    panel.get_by_role("button", name="Make it the cohort").click()
    page.wait_for_url(re.compile(r"__"))
    settle(page)
    params = query(page)
    store = Store(e2e_stores / "demo-multiclass.duckdb")
    parsed = parse_query(params, catalog_of(store))
    assert parsed.cohort != Cohort()
    assert cohort_count(store, parsed.cohort, "baseline") == images
