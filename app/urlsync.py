"""The one module that reads and writes ``st.query_params``.

The URL is the source of truth for the cohort and the view: every full rerun
parses it, and every control that changes the view writes it back through
``update``. Widgets that mirror a URL parameter are bound with ``bind``: the
URL sets the widget unless the user has just moved it, and the widget's
``on_change`` writes the URL (``write_on_change``), so a reload, a copied URL
or a page link always shows the same view.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping
from urllib.parse import urlencode

import streamlit as st

# Parameters Streamlit itself uses; they never describe the cohort.
_STREAMLIT_PARAMS = frozenset({"embed", "embed_options"})
_SHADOW = "_vl_url_value:"


def params() -> list[tuple[str, str]]:
    """The query parameters in URL order (repeated keys kept), Streamlit's own left out."""
    return [(key, value) for key in st.query_params if key not in _STREAMLIT_PARAMS
            for value in st.query_params.get_all(key)]


def query_string() -> str:
    """The current query string, without the leading ``?``."""
    return urlencode(params())


def replace(new: Iterable[tuple[str, str]] | Mapping[str, str]) -> None:
    """Make the URL exactly ``new`` (Streamlit's own parameters kept)."""
    items = list(new.items()) if isinstance(new, Mapping) else list(new)
    kept = [(key, value) for key in st.query_params if key in _STREAMLIT_PARAMS
            for value in st.query_params.get_all(key)]
    st.query_params.from_dict(_grouped(kept + items))


def update(changes: Mapping[str, str | None]) -> None:
    """Set or (with ``None``) remove single parameters; everything else stays."""
    for key, value in changes.items():
        if value is None:
            if key in st.query_params:
                del st.query_params[key]
        else:
            st.query_params[key] = value


def _grouped(items: list[tuple[str, str]]) -> dict[str, list[str] | str]:
    grouped: dict[str, list[str]] = {}
    for key, value in items:
        grouped.setdefault(key, []).append(value)
    return {key: values[0] if len(values) == 1 else values for key, values in grouped.items()}


def bind(key: str, url_value: object) -> None:
    """Show ``url_value`` in the keyed widget ``key`` unless the user just set it.

    Call before the widget is created. The shadow copy remembers which URL value
    the widget last showed, so a URL change from elsewhere (reload, page link,
    back button) moves the widget, while the user's own change is kept.
    """
    shadow = _SHADOW + key
    if key not in st.session_state or st.session_state.get(shadow) != url_value:
        st.session_state[key] = url_value
        st.session_state[shadow] = url_value


def write_on_change(key: str, param: str, to_url: Callable[[object], str | None] = str,
                    reset: Iterable[str] = ()) -> Callable[[], None]:
    """An ``on_change`` callback: write widget ``key``'s value to URL parameter ``param``.

    ``to_url`` turns the value into the URL text (``None`` removes the parameter,
    e.g. for a default). ``reset`` names parameters that stop making sense after
    the change (a page number after a new filter) and are removed.
    """
    def callback() -> None:
        value = st.session_state[key]
        st.session_state[_SHADOW + key] = value
        update({param: to_url(value), **{name: None for name in reset}})
    return callback
