"""Small Playwright helpers for a Streamlit page."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from .conftest import SCREENSHOTS

SETTLE_MS = 180_000


def settle(page) -> None:
    """Wait until Streamlit has finished running the script for what was just done."""
    page.wait_for_timeout(250)
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=SETTLE_MS)
    # Elements still being drawn show as skeletons.
    page.locator('[data-testid="stSkeleton"]').first.wait_for(state="detached", timeout=SETTLE_MS)
    page.wait_for_timeout(150)


def visit(page, base: str, path_and_query: str) -> None:
    page.goto(base + path_and_query)
    page.wait_for_selector('[data-testid="stApp"]', timeout=SETTLE_MS)
    settle(page)


def query(page) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(page.url).query, keep_blank_values=True).items()}


def shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def choose(page, label: str, option: str, within=None) -> None:
    """Pick ``option`` in the selectbox labelled ``label``."""
    scope = within or page
    scope.get_by_role("combobox", name=label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()
    settle(page)


def bar_text(page) -> str:
    """The cohort bar's size line and conditions."""
    return page.locator(".st-key-vl_cohort_summary").inner_text()
