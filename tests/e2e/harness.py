"""Running the app under AppTest the way the server runs it.

With a ``pages/`` folder beside the entry point, Streamlit starts every
process in its folder-of-pages mode and leaves it for good once a session
calls ``st.navigation`` (the app then reruns through its entry point; see
``app.nav.enter_shell``). AppTest re-detects that mode on every run, so each
run would start with that extra rerun, which swallows button clicks. The
``served_navigation`` context keeps the mode off after set-up, as on a server
that has served one page.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qsl

from streamlit.runtime.pages_manager import PagesManager
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[2] / "streamlit_app.py")
TIMEOUT_S = 120


@contextlib.contextmanager
def served_navigation() -> Iterator[None]:
    original = PagesManager.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False

    PagesManager.__init__ = init
    try:
        yield
    finally:
        PagesManager.__init__ = original


def open_app(query: str = "", page: str | None = None) -> AppTest:
    """Run the app at ``?query`` (and then ``page``); fail on an uncaught exception."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT_S)
    at.query_params.update(dict(parse_qsl(query, keep_blank_values=True)))
    at.run()
    if page is not None:
        at.switch_page(page)
        at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at
