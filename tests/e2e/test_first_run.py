"""First start on an empty data folder (as on Streamlit Community Cloud): the app builds the
demo stores in a child process with a progress bar, two browsers share one build, and the
app then opens on the stores with the explanation sample under way."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from core import demo, demo_jobs
from core.store import list_stores

from .conftest import ROOT, isolated_context, serve
from .helpers import shot

# A quick demo: few images and training scenes, one worker, two explained images per store.
DEMO_ARGS = "--images 12 --train-scenes 60 --workers 1 --explain-images 2"
BUILD_S = 180  # generous: the CI machine's two cores are shared with other tests


def _stop_group(lock: Path) -> None:
    """End the background step holding ``lock`` (it runs in a session of its own) and its workers."""
    pid = demo_jobs.lock_holder(lock)
    if pid is not None:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


@pytest.fixture
def empty_server(browser, tmp_path):
    """`streamlit run` over a data folder that does not exist yet."""
    folder = tmp_path / "data"
    with serve(folder, tmp_path / "streamlit.log", env={"VISIONLENS_DEMO_ARGS": DEMO_ARGS}) as base:
        try:
            yield base, folder
        finally:
            for lock in (demo_jobs.BUILD_LOCK, demo_jobs.EXPLAIN_LOCK):
                _stop_group(folder / lock)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path.name} missing)"


def _page(browser, base: str, outside_requests: list[str]):
    context = isolated_context(browser, base, outside_requests)
    return context, context.new_page()


def test_first_run_builds_the_demo_with_a_progress_bar_then_opens_it(browser, empty_server, outside_requests):
    base, folder = empty_server
    contexts = []
    try:
        first_context, first = _page(browser, base, outside_requests)
        second_context, second = _page(browser, base, outside_requests)
        contexts += [first_context, second_context]
        first.goto(base)
        first.get_by_text("Building the demo stores").wait_for(timeout=60_000)
        first.locator('[data-testid="stProgress"]').wait_for()
        builder = demo_jobs.lock_holder(folder / demo_jobs.BUILD_LOCK)
        assert builder is not None
        # A second browser arriving during the build watches the same one.
        second.goto(base)
        second.get_by_text("Building the demo stores").wait_for(timeout=60_000)
        second.locator('[data-testid="stProgress"]').wait_for()
        assert demo_jobs.lock_holder(folder / demo_jobs.BUILD_LOCK) in (builder, None)
        shot(first, "first-run-progress")

        for page in (first, second):
            try:
                page.get_by_text("Where to next").wait_for(timeout=BUILD_S * 1000)
            except Exception as error:
                shot(page, "first-run-stuck")
                raise AssertionError(f"the app did not open: {page.locator('body').inner_text()}\n"
                                     f"build log:\n{_read(folder / demo_jobs.BUILD_LOG)}\n"
                                     f"status:\n{_read(folder / demo_jobs.BUILD_STATUS)}") from error
        assert list_stores(folder) == sorted(f"demo-{t}" for t in demo.TASKS)
        assert demo_jobs.read_status(folder / demo_jobs.BUILD_STATUS).state == "done"
        assert (folder / demo_jobs.BUILD_LOG).read_text().count("built 3 demo store(s)") == 1
        first.get_by_role("combobox", name="Dataset").wait_for()
        # The explanation sample was handed over before the build ended: the line shows at once.
        first.get_by_text("Explanations of the demo sample").wait_for(timeout=30_000)
        shot(first, "first-run-opened")
    finally:
        for context in contexts:
            context.close()


def test_a_failed_build_shows_its_error_and_a_retry_button(tmp_path, monkeypatch):
    """Under AppTest (no browser): a build that fails says why and offers to try again."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("VISIONLENS_DATA", str(tmp_path))
    monkeypatch.setenv("VISIONLENS_DEMO_ARGS", "--images 3")  # refused at once: a failed build
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=120).run()
    assert not at.exception
    assert any("Building the demo stores" in s.value for s in at.subheader)
    deadline = time.monotonic() + BUILD_S
    while demo_jobs.lock_held(tmp_path / demo_jobs.BUILD_LOCK) and time.monotonic() < deadline:
        time.sleep(0.2)
    at.run()
    assert not at.exception
    assert any("a demo needs at least 10 images" in e.value for e in at.error), [e.value for e in at.error]
    assert any("visionlens demo --out" in c.value for c in at.caption)
    assert [b.label for b in at.button] == ["Retry"]
    assert list_stores(tmp_path) == []


def test_nothing_is_fetched_from_outside(outside_requests):
    assert outside_requests == []
