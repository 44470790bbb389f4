"""A store that stays open: `visionlens precompute` writes while a page shows the store,
and the page's next rerun shows the new explanation (issue 13)."""

from __future__ import annotations

import re
import subprocess
import sys

from .conftest import ROOT
from .helpers import settle, shot, visit

IMAGE_ID = 39  # the last image of the multiclass test store: no other test explains it
NOT_COMPUTED = "No explanation stored for this image and model."


def test_precompute_while_the_page_is_open_shows_on_rerun(page, server, e2e_stores):
    visit(page, server, f"/explorer?store=demo-multiclass&model=baseline&image={IMAGE_ID}")
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(f"Image {IMAGE_ID} ·").first.wait_for()
    dialog.get_by_text(NOT_COMPUTED).wait_for()
    assert dialog.get_by_role("combobox", name="Explanation").count() == 0
    plain = dialog.locator('[data-testid="stImage"] img').first.get_attribute("src")

    # The app holds the store open; the writer must still succeed (no DuckDB file lock).
    written = subprocess.run(
        [sys.executable, "-m", "core.cli", "precompute", str(e2e_stores / "demo-multiclass.duckdb"),
         "--explain", "guided_backprop", "--model", "baseline", "--cohort", f"image_id__eq={IMAGE_ID}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert written.returncode == 0, written.stderr
    assert "wrote 1 explanation rows" in written.stdout

    # Nothing has rerun yet: the page still shows the plain image.
    assert dialog.get_by_text(NOT_COMPUTED).is_visible()
    page.keyboard.press("r")  # Streamlit's rerun shortcut
    settle(page)
    dialog = page.get_by_role("dialog")
    dialog.get_by_role("combobox", name="Explanation").wait_for()
    picker = dialog.locator('[data-testid="stSelectbox"]').filter(has_text="Explanation")
    # The chosen option shows as text or as the search input's value, by Streamlit version.
    shown = picker.evaluate("e => e.innerText + ' ' + [...e.querySelectorAll('input')].map(i => i.value).join(' ')")
    assert re.search(r"guided_backprop · \w+", shown), shown  # the stored map is chosen
    assert dialog.get_by_text(NOT_COMPUTED).count() == 0
    overlay = dialog.locator('[data-testid="stImage"] img').first.get_attribute("src")
    assert overlay != plain
    shot(page, "live-store-explanation")
