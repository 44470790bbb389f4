"""The explorer, cohorts and flyout in a real browser, on every task."""

from __future__ import annotations

import re

import pytest
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

from .helpers import bar_text, query, settle, shot, visit

TASKS = ("multiclass", "multilabel", "detection")


@pytest.mark.parametrize("task", TASKS)
def test_each_view_renders_on_each_task(page, server, task):
    visit(page, server, f"/explorer?store=demo-{task}")
    page.get_by_text(re.compile(r"^Incorrect")).first.wait_for()
    page.locator("button.vl-card").first.wait_for()
    shot(page, f"{task}-grid")
    page.get_by_role("radio", name="Table", exact=True).click()
    settle(page)
    assert query(page)["view"] == "table"
    page.locator('[data-testid="stDataFrame"]').first.wait_for()
    shot(page, f"{task}-table")
    page.get_by_role("radio", name="Class view", exact=True).click()
    settle(page)
    assert query(page)["view"] == "classes"
    page.get_by_text(re.compile(r"examples")).first.wait_for()
    shot(page, f"{task}-classes")


def test_overview_and_cohorts_pages(page, server):
    visit(page, server, "/?store=demo-detection")
    page.get_by_text("Where to next").wait_for()
    shot(page, "overview")
    page.get_by_role("link", name="Cohorts", exact=True).first.click()
    page.wait_for_url("**/cohorts**", timeout=30_000)
    settle(page)
    assert "/cohorts" in page.url and query(page)["store"] == "demo-detection"
    shot(page, "cohorts")


def test_filter_builder_cohort_survives_a_copied_url(page, new_page, server):
    visit(page, server, "/explorer?store=demo-multiclass")
    page.get_by_role("button", name="New", exact=True).click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    # The first condition starts on "Outcome is …": pick "incorrect".
    dialog.get_by_role("combobox", name="Value").click()
    page.get_by_role("option", name="incorrect", exact=True).click()
    settle(page)
    dialog.get_by_text(re.compile(r"images match")).wait_for()
    shot(page, "builder")
    dialog.get_by_role("button", name="Apply", exact=True).click()
    settle(page)
    page.locator(".st-key-vl_cohort_bar").get_by_text("Outcome is incorrect").wait_for()
    settle(page)
    assert query(page)["outcome__eq"] == "incorrect"
    shown = bar_text(page)
    shot(page, "builder-applied")
    copied = page.url
    fresh = new_page()
    visit(fresh, server, copied.split(server, 1)[1])
    fresh.locator(".st-key-vl_cohort_bar").get_by_text("Outcome is incorrect").wait_for()
    assert fresh.url == copied
    assert bar_text(fresh) == shown
    fresh.locator("button.vl-card").first.wait_for()
    assert fresh.locator("button.vl-card").count() == page.locator("button.vl-card").count()


def test_bad_url_shows_the_error_and_all_images(page, server):
    visit(page, server, "/explorer?store=demo-multiclass&brightness__lt=dark")
    page.get_by_text(re.compile("not a number")).wait_for()
    page.get_by_text("Showing all images").wait_for()
    assert "40 of 40 images" in bar_text(page)
    shot(page, "bad-url")


def finished_runs(page) -> list[str]:
    """How each script run of the page's sessions ends, in order ("full" or "fragment"), read
    from Streamlit's own messages; call before the page opens its session."""
    finished: list[str] = []
    kinds = {ForwardMsg.FINISHED_SUCCESSFULLY: "full", ForwardMsg.FINISHED_FRAGMENT_RUN_SUCCESSFULLY: "fragment"}

    def on_frame(payload) -> None:
        if isinstance(payload, bytes):
            message = ForwardMsg.FromString(payload)
            if message.WhichOneof("type") == "script_finished":
                finished.append(kinds.get(message.script_finished, "other"))

    page.on("websocket", lambda socket: socket.on("framereceived", on_frame))
    return finished


def test_flyout_opens_from_the_grid_and_from_the_url(page, new_page, server):
    runs = finished_runs(page)
    visit(page, server, "/explorer?store=demo-detection")
    card = page.locator("button.vl-card").first
    card.wait_for()
    image_id = card.get_attribute("data-image-id")
    before = len(runs)
    card.click()
    settle(page)
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(f"Image {image_id} ·").first.wait_for()
    assert query(page)["image"] == image_id
    # The grid's fragment opens the drawer itself: the page (sidebar, cohort bar, counts) does not rerun.
    assert "full" in runs[:before] and runs[before:] and set(runs[before:]) == {"fragment"}, runs
    dialog.get_by_text("Metadata").wait_for()
    dialog.locator('[data-testid="stImage"] img').wait_for()
    dialog.locator('[data-testid="stDataFrame"]').last.wait_for()
    page.wait_for_timeout(500)
    shot(page, "detection-flyout")
    fresh = new_page()
    visit(fresh, server, page.url.split(server, 1)[1])
    fresh.get_by_role("dialog").get_by_text(f"Image {image_id} ·").first.wait_for()
    page.keyboard.press("Escape")
    settle(page)
    assert "image" not in query(page)
    # The class view's grids are a fragment too.
    page.get_by_role("radio", name="Class view", exact=True).click()
    settle(page)
    card = page.locator("button.vl-card").first
    image_id = card.get_attribute("data-image-id")
    before = len(runs)
    card.click()
    settle(page)
    page.get_by_role("dialog").get_by_text(f"Image {image_id} ·").first.wait_for()
    assert query(page)["image"] == image_id and query(page)["view"] == "classes"
    assert runs[before:] and set(runs[before:]) == {"fragment"}, runs


def test_table_rows_opened_and_saved_as_a_cohort(page, server):
    runs = finished_runs(page)
    visit(page, server, "/explorer?store=demo-multilabel&view=table")
    grid = page.locator('[data-testid="stDataFrame"]').first
    grid.wait_for()
    box = grid.bounding_box()
    header, row_height = 36, 48
    before = len(runs)

    def click_row(row: int) -> None:
        page.mouse.click(box["x"] + 14, box["y"] + header + row_height * row + row_height / 2)
        settle(page)

    click_row(0)
    page.get_by_text("1 selected").wait_for()
    page.get_by_role("button", name="Open image").click()
    settle(page)
    page.get_by_role("dialog").get_by_text("Image 0 ·").first.wait_for()
    assert query(page)["image"] == "0"
    page.keyboard.press("Escape")
    settle(page)
    assert "image" not in query(page)
    click_row(2)
    page.get_by_text("2 selected").wait_for()
    # The table is a fragment: selecting, opening and closing do not rerun the page.
    assert runs[before:] and set(runs[before:]) == {"fragment"}, runs
    # Typed, then clicked at once (the field still focused): the first click saves.
    page.get_by_label("Cohort name").fill("two picked")
    page.get_by_role("button", name="Save as cohort").click()
    page.locator(".st-key-vl_cohort_summary").get_by_text("2 of 40 images").wait_for()
    settle(page)
    assert "cohort" in query(page)
    shot(page, "table-saved-cohort")


def test_nothing_is_fetched_from_outside(outside_requests):
    assert outside_requests == []


def test_grid_paging_redraws_the_grids_and_lands_in_the_url(page, new_page, server):
    # Paging runs the grids' fragment alone: the page moved to must still reach the URL and the rows.
    visit(page, server, "/explorer?store=demo-detection&explorer.per=12")
    first = page.locator("button.vl-card").first
    first.wait_for()
    shown = [page.locator("button.vl-card").nth(i).get_attribute("data-image-id") for i in range(2)]
    page.get_by_test_id("stPaginationNext").click()
    settle(page)
    assert query(page)["page"] == "2"
    page.get_by_text(re.compile(r"^Incorrect · 13–")).wait_for()
    moved = [page.locator("button.vl-card").nth(i).get_attribute("data-image-id") for i in range(2)]
    assert moved != shown
    page.get_by_role("combobox", name="Per section", exact=True).click()
    page.get_by_role("option", name="48", exact=True).click()
    settle(page)
    assert query(page)["explorer.per"] == "48"
    page.get_by_text(re.compile(r"^Incorrect · 1–")).wait_for()  # one page of 48 holds the demo's section
    assert page.locator("button.vl-card").first.get_attribute("data-image-id") == shown[0]
    fresh = new_page()
    visit(fresh, server, page.url.split(server, 1)[1])
    fresh.get_by_text(re.compile(r"^Incorrect · 1–")).wait_for()
    assert fresh.locator("button.vl-card").first.get_attribute("data-image-id") == \
        page.locator("button.vl-card").first.get_attribute("data-image-id")
