"""Browser tests: `streamlit run` on a free loopback port over small stores, driven by Chromium.

Skipped when Debian's chromium is missing (`make browser` installs it). The
browser may reach only the app's own address: every other request is
aborted and recorded, so a CDN font or icon fails the suite.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .stores import build_all

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
STARTUP_S = 90


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.e2e)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def e2e_stores(tmp_path_factory) -> Path:
    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed (run `make browser`)")
    folder = tmp_path_factory.mktemp("e2e-stores")
    build_all(folder)
    return folder


@contextlib.contextmanager
def serve(data_dir: Path, log_path: Path, env: dict | None = None) -> Iterator[str]:
    """`streamlit run` over the stores in ``data_dir`` on a free loopback port; yields its base URL."""
    port = _free_port()
    environment = dict(os.environ, VISIONLENS_DATA=str(data_dir), **(env or {}))
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "streamlit_app.py"), "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true"],
            cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                with urllib.request.urlopen(base + "/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not start:\n{log_path.read_text()}")
            time.sleep(0.3)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@contextlib.contextmanager
def chromium() -> Iterator:
    """Debian's Chromium driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def server(e2e_stores, tmp_path_factory) -> Iterator[str]:
    with serve(e2e_stores, tmp_path_factory.mktemp("e2e-log") / "streamlit.log") as base:
        yield base


@pytest.fixture(scope="session")
def browser():
    """One Chromium for the session: Playwright's sync API cannot start a second one inside it."""
    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed (run `make browser`)")
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="session")
def outside_requests() -> list[str]:
    """Every request the app made to anything but itself (must stay empty)."""
    return []


def isolated_context(browser, base: str, outside_requests: list[str]):
    """A fresh browser context (like a new browser) that may reach only the app at ``base``:
    every other request is aborted and recorded in ``outside_requests``."""
    context = browser.new_context(viewport={"width": 1440, "height": 1000})

    def route(request_route):
        url = request_route.request.url
        if url.startswith(base) or url.startswith("data:") or url.startswith("blob:"):
            request_route.continue_()
        else:
            outside_requests.append(url)
            request_route.abort()

    context.route("**/*", route)
    return context


@pytest.fixture
def new_page(browser, server, outside_requests):
    """A factory of fresh pages (each its own browser context, like a new browser)."""
    contexts = []

    def make():
        context = isolated_context(browser, server, outside_requests)
        contexts.append(context)
        return context.new_page()

    yield make
    for context in contexts:
        context.close()


@pytest.fixture
def page(new_page):
    return new_page()
