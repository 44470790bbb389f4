"""The cohort bar on every page, and the dialogs that create, edit and delete cohorts.

The bar shows the current cohort (the whole dataset by default), its size and
its conditions in words, and lets the user switch to a saved cohort, build a
new filter, edit, save, duplicate or delete one, and see every saved cohort
with its size. Every change lands in the URL (``cohort=<id>`` plus filters),
never only in the session.

The filter builder edits a draft of conditions (column, operator, value,
group) held in session state; each condition is read through
``core.cohorts.parse_filter``, the same parser the URL uses, so the builder
cannot make a cohort the URL could not carry.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import pandas as pd
import streamlit as st

from core.cohorts import (OPERATORS, ColumnInfo, Cohort, Filter, format_number, parse_filter, parse_query,
                          quote_identifier)
from core.errors import CohortError
from core.state import STATUSES, SavedCohort

from . import urlsync
from .nav import go, named
from .state import View, claim_dialog

ALL_IMAGES = 0  # the switcher's id for the global cohort
GROUPS = (0, 1, 2, 3)  # 0: every image must match; k: OR group k
ALL_COHORTS_WIDTH = 760  # px: the list of all cohorts in the cohort bar's popover
_DRAFT = "_vl_draft"
_DISTINCT_LIMIT = 200
_uids = itertools.count(1)


# --------------------------------------------------------------------------- the bar


def render(view: View) -> None:
    saved = {s.id: s for s in view.saved_cohorts()}
    with st.container(border=True, key="vl_cohort_bar"):
        left, middle, right = st.columns([2, 4.6, 4.4], vertical_alignment="center")
        with left:
            _switcher(view, saved)
        with middle.container(key="vl_cohort_summary"):
            _summary(view, saved)
        with right:
            _actions(view, saved)


def _switcher(view: View, saved: dict[int, SavedCohort]) -> None:
    current = view.cohort.parent_id if view.cohort.parent_id in saved else ALL_IMAGES
    urlsync.bind("vl_cohort", current)

    def switch() -> None:
        chosen = st.session_state["vl_cohort"]
        go(view, Cohort(parent_id=chosen or None), page=None, image=None)

    st.selectbox("Cohort", [ALL_IMAGES, *saved], key="vl_cohort", on_change=switch,
                 format_func=lambda i: "All images" if i == ALL_IMAGES else saved[i].name)


def _escape(text: str) -> str:
    for char in "\\[]*_`$~:<>#|":
        text = text.replace(char, "\\" + char)
    return text


def _summary(view: View, saved: dict[int, SavedCohort]) -> None:
    count, total = view.count(), view.total()
    share = f" ({count / total:.1%})" if total else ""
    own = Cohort(view.cohort.filters, view.cohort.groups)
    parent = saved.get(view.cohort.parent_id)
    badges = []
    if parent is not None:
        badges += [f":blue-badge[{_escape(s)}]" for s in view.describe(parent.cohort(view.catalog))]
    if not own.is_global:
        badges += [f":orange-badge[{_escape(s)}]" for s in view.describe(own)]
    status = " · :orange[unsaved filters]" if not own.is_global else ""
    st.markdown(f"**{count:,}** of {total:,} images{share}{status}")
    if badges:
        st.markdown(" ".join(badges))


def _actions(view: View, saved: dict[int, SavedCohort]) -> None:
    cohort = view.cohort
    own = Cohort(cohort.filters, cohort.groups)
    current = saved.get(cohort.parent_id) if own.is_global else None
    with st.container(horizontal=True, gap="small", horizontal_alignment="right"):
        if st.button("New", icon=":material/add:", key="vl_bar_new", help="Build a new cohort filter"):
            open_builder(view, Cohort(), title="New cohort")
        if not own.is_global:
            if st.button("Save", icon=":material/save:", key="vl_bar_save", type="primary",
                         help="Save these filters as a named cohort"):
                open_builder(view, cohort, title="Save cohort")
            if st.button("Edit", icon=":material/edit:", key="vl_bar_edit", help="Change these filters"):
                open_builder(view, cohort, title="Edit filters")
        elif current is not None:
            if st.button("Edit", icon=":material/edit:", key="vl_bar_edit", help=f"Edit '{current.name}'"):
                open_builder(view, current.cohort(view.catalog), title=f"Edit '{current.name}'", target=current)
            if st.button("Refine", icon=":material/filter_alt:", key="vl_bar_refine",
                         help=f"Add conditions within '{current.name}': a cohort of this cohort"):
                open_builder(view, Cohort(parent_id=current.id), title=f"Within '{current.name}'")
            if st.button("Duplicate", icon=":material/content_copy:", key="vl_bar_dup"):
                copy = view.state.duplicate_cohort(current.id)
                go(view, Cohort(parent_id=copy.id), page=None, image=None)
                st.rerun()
            if st.button("Delete", icon=":material/delete:", key="vl_bar_delete"):
                confirm_delete(view, current)
        # Drawn only while open: the cohort bar is on every page, and the table counts every cohort.
        listing = st.popover("All cohorts", icon=":material/list:", key="vl_bar_all", on_change="rerun")
        with listing:
            if listing.open:
                # A popover is as wide as its content, and a stretched table as wide as its popover.
                cohort_table(view, list(saved.values()), key="vl_bar_table", width=ALL_COHORTS_WIDTH)


# --------------------------------------------------------------------------- all cohorts


def cohort_sizes(view: View, cohorts: Sequence[SavedCohort]) -> pd.DataFrame:
    """One row per saved cohort: id, name, size under the current model, parent, conditions."""
    names = {c.id: c.name for c in cohorts}
    rows = []
    for c in cohorts:
        try:
            size: int | None = view.count(Cohort(parent_id=c.id))
            words = "; ".join(view.describe(c.cohort(view.catalog)))
        except CohortError as error:
            size, words = None, f"cannot be used with this store: {error}"
        rows.append({"id": c.id, "Cohort": c.name, "Images": size, "Inside": names.get(c.parent_id, ""),
                     "Conditions": words, "Updated": c.updated_at[:19].replace("T", " ")})
    return pd.DataFrame(rows, columns=["id", "Cohort", "Images", "Inside", "Conditions", "Updated"])


def cohort_table(view: View, cohorts: Sequence[SavedCohort], *, key: str, opens: bool = True,
                 width: int | str = "stretch") -> SavedCohort | None:
    """Every saved cohort with its size. A click on a row opens that cohort (``opens``) or
    just selects it; returns the selected one."""
    if not cohorts:
        st.caption("No saved cohorts yet. Build a filter with **New**, then **Save** it.")
        return None
    table = cohort_sizes(view, cohorts)
    total = view.total()

    def open_selected() -> None:
        rows = st.session_state[key].selection.rows
        if rows:
            go(view, Cohort(parent_id=int(table["id"].iloc[rows[0]])), page=None, image=None)

    event = st.dataframe(
        table, key=key, hide_index=True, width=width, on_select=open_selected if opens else "rerun",
        selection_mode="single-row",
        column_config={
            "id": st.column_config.NumberColumn("Id", width="small"),
            "Images": st.column_config.ProgressColumn("Images", format="%d", min_value=0, max_value=max(total, 1)),
            "Conditions": st.column_config.TextColumn(width="large"),
        })
    rows = event.selection.rows
    by_id = {c.id: c for c in cohorts}
    return by_id[int(table["id"].iloc[rows[0]])] if rows else None


# --------------------------------------------------------------------------- delete


def confirm_delete(view: View, target: SavedCohort) -> None:
    if claim_dialog():
        _delete_dialog(view, target)


@st.dialog("Delete cohort")
def _delete_dialog(view: View, target: SavedCohort) -> None:
    st.markdown(f"Delete the saved cohort **{_escape(target.name)}**? Its images stay in the dataset.")
    children = view.state.children(target.id)
    mode = "error"
    if children:
        names = ", ".join(c.name for c in children)
        mode = st.radio(f"It contains {len(children)} cohort(s): {names}.",
                        ["reparent", "cascade"], key="vl_delete_mode",
                        format_func={"reparent": "Keep them (move them up one level)",
                                     "cascade": "Delete them too"}.get)
    cols = st.columns(2)
    if cols[0].button("Delete", type="primary", key="vl_delete_yes", width="stretch"):
        view.state.delete_cohort(target.id, children=mode)
        shown = view.cohort.parent_id
        if shown == target.id or (mode == "cascade" and shown in {c.id for c in children}):
            go(view, Cohort(parent_id=target.parent_id), page=None, image=None)
        st.rerun()
    if cols[1].button("Cancel", key="vl_delete_no", width="stretch"):
        st.rerun()


# --------------------------------------------------------------------------- the filter builder


def open_builder(view: View, cohort: Cohort, *, title: str, target: SavedCohort | None = None) -> None:
    """Open the filter builder on ``cohort``'s own conditions.

    With ``target`` (a saved cohort) it saves changes back to it; otherwise it
    applies the filter to the URL or saves it as a new cohort inside
    ``cohort.parent_id``.
    """
    for key in [k for k in st.session_state if str(k).startswith("vl_f")]:
        del st.session_state[key]
    own = parse_query(target.query, view.catalog).cohort if target is not None else cohort
    rows = []
    for group, filters in [(0, own.filters), *enumerate(own.groups, start=1)]:
        for f in filters:
            rows.append(_row_from_filter(view, f, min(group, GROUPS[-1])))
    st.session_state[_DRAFT] = {
        "rows": rows or [_new_row(view)],
        "parent": target.parent_id if target is not None else cohort.parent_id,
        "target": target.id if target is not None else None,
        "image_ids": target.image_ids if target is not None else None,
    }
    st.session_state["vl_draft_name"] = target.name if target is not None else ""
    if claim_dialog():
        _builder(view, title)


def _new_row(view: View, column: str | None = None) -> int:
    uid = next(_uids)
    names = _filterable(view)
    st.session_state[f"vl_f{uid}_col"] = column or names[0]
    st.session_state[f"vl_f{uid}_grp"] = 0
    return uid


def _row_from_filter(view: View, f: Filter, group: int) -> int:
    uid = _new_row(view, f.column)
    st.session_state[f"vl_f{uid}_grp"] = group
    st.session_state[f"vl_f{uid}_op"] = f.op
    info = view.catalog.column(f.column)
    arity = OPERATORS[f.op].arity
    key = _value_key(uid, f.column, f.op)
    number_input = info.values == "number" and arity in ("one", "two")  # float-valued widgets
    if arity == "two":
        lo, hi = f.value
        st.session_state[key + "lo"], st.session_state[key + "hi"] = (float(lo), float(hi)) if number_input else (lo, hi)
    elif arity == "many":
        items = list(f.value)
        st.session_state[key] = items if _picks(info) else ", ".join(_text(v) for v in items)
    elif arity == "one":
        value = f.value
        st.session_state[key] = float(value) if number_input else (_text(value) if info.values == "boolean" else value)
    return uid


def _filterable(view: View) -> list[str]:
    """Columns a cohort can filter on: model outcomes first, then labels, then metadata."""
    first = ("outcome", "error", "true_label", "pred_label", "score", "n_tp", "n_fp", "n_fn")
    cols = view.catalog.columns
    return [c for c in first if c in cols] + sorted((c for c in cols if c not in first),
                                                    key=lambda c: cols[c].label.lower())


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return format_number(value)
    return str(value)


def _picks(info: ColumnInfo) -> bool:
    """Whether values are picked from a list (classes, outcomes, known texts) rather than typed."""
    return info.values in ("class", "outcome", "boolean", "review") or (info.values == "text" and not info.is_list)


def _value_key(uid: int, column: str, op: str) -> str:
    # The key names the column and operator, so changing either starts a fresh value widget.
    return f"vl_f{uid}_val:{column}:{OPERATORS[op].arity}:"


@st.cache_data(show_spinner=False, max_entries=256)
def _distinct(_view: View, store_key: tuple, column: str) -> list[str]:
    q = quote_identifier(column)
    frame = _view.query(f'SELECT CAST({q} AS VARCHAR) AS v, count(*) AS n FROM "images" WHERE {q} IS NOT NULL '
                        f"GROUP BY 1 ORDER BY n DESC, v LIMIT {_DISTINCT_LIMIT}")
    return frame["v"].tolist()


def _choices(view: View, info: ColumnInfo) -> list[str]:
    if info.values == "class":
        return list(view.classes)
    if info.values == "outcome":
        return ["correct", "incorrect"]
    if info.values == "boolean":
        return ["true", "false"]
    if info.values == "review":
        return list(STATUSES)
    return _distinct(view, view.store_key, info.name)


@st.cache_data(show_spinner=False, max_entries=256)
def _range(_view: View, store_key: tuple, column: str) -> tuple[float, float]:
    q = quote_identifier(column)
    lo, hi = _view.store.rows(f'SELECT min({q}), max({q}) FROM "images"')[0]
    return readable_range(float(lo) if lo is not None else 0.0, float(hi) if hi is not None else 0.0)


def readable_range(lo: float, hi: float) -> tuple[float, float]:
    """``lo``..``hi`` widened to round numbers (three digits of the span): a new condition's default
    reads 0.166 rather than the smallest value's 0.16699938398692812, and still holds every image."""
    span = hi - lo
    if not (math.isfinite(span) and span > 0):
        return lo, hi
    decimals = 2 - math.floor(math.log10(span))
    step = 10.0 ** -decimals
    return (round(math.floor(lo / step) * step, max(decimals, 0)),
            round(math.ceil(hi / step) * step, max(decimals, 0)))


def number_format(*values: float, most: int = 6) -> str:
    """A number box's format with the decimals its values need (at least two, at most ``most``): the box
    shows the value the filter uses (0.115, not 0.12)."""
    needed = [next((d for d in range(most) if round(float(v), d) == float(v)), most) for v in values]
    return f"%.{max(2, *needed)}f"


def _numeric_default(view: View, info: ColumnInfo) -> tuple[float, float]:
    if info.needs_model:
        return (0.0, 1.0)
    return _range(view, view.store_key, info.name)


def _value_widgets(view: View, uid: int, info: ColumnInfo, op: str, container) -> list[str] | None:
    """Draw the value input(s) of one condition; the value as texts for the parser."""
    arity = OPERATORS[op].arity
    key = _value_key(uid, info.name, op)
    if arity == "none":
        return ["true"]
    if info.values == "number" and arity in ("one", "two"):
        lo, hi = _numeric_default(view, info)
        shown = number_format(*(st.session_state.get(k, v) for k, v in ((key, lo), (key + "lo", lo), (key + "hi", hi))))
        if arity == "one":
            value = container.number_input("Value", value=lo, key=key, label_visibility="collapsed", format=shown)
            return [_text(value)]
        left, right = container.columns(2)
        low = left.number_input("From", value=lo, key=key + "lo", label_visibility="collapsed", format=shown)
        high = right.number_input("To", value=hi, key=key + "hi", label_visibility="collapsed", format=shown)
        return [_text(low), _text(high)]
    if _picks(info):
        options = _choices(view, info)
        free = info.values == "text"
        if arity == "many":
            picked = container.multiselect("Values", options, key=key, label_visibility="collapsed",
                                           accept_new_options=free, placeholder="Choose values")
            return [str(v) for v in picked] or None
        if op == "contains":
            typed = container.text_input("Text", key=key, label_visibility="collapsed", placeholder="Text")
            return [typed] if typed else None
        picked = container.selectbox("Value", options, key=key, label_visibility="collapsed",
                                     accept_new_options=free, index=None, placeholder="Choose a value")
        return [str(picked)] if picked is not None else None
    hint = "Values, comma separated" if arity == "many" else "Value"
    typed = container.text_input(hint, key=key, label_visibility="collapsed", placeholder=hint)
    if arity in ("many", "two"):
        items = [t.strip() for t in typed.split(",") if t.strip()]
        return items or None
    return [typed] if typed else None


def _condition_row(view: View, uid: int) -> Filter | CohortError | None:
    cols = view.catalog.columns
    names = _filterable(view)
    c_col, c_op, c_val, c_grp, c_del = st.columns([2.2, 1.7, 3.2, 1.5, 0.5], vertical_alignment="center")
    column = c_col.selectbox("Column", names, key=f"vl_f{uid}_col", label_visibility="collapsed",
                             format_func=lambda c: cols[c].label)
    info = cols[column]
    ops = list(info.ops)
    if st.session_state.get(f"vl_f{uid}_op") not in ops:
        st.session_state[f"vl_f{uid}_op"] = ops[0]
    op = c_op.selectbox("Operator", ops, key=f"vl_f{uid}_op", label_visibility="collapsed",
                        format_func=lambda o: (OPERATORS[o].list_phrase if info.is_list and OPERATORS[o].list_phrase
                                               else OPERATORS[o].phrase))
    texts = _value_widgets(view, uid, info, op, c_val)
    c_grp.selectbox("Group", GROUPS, key=f"vl_f{uid}_grp", label_visibility="collapsed",
                    format_func=lambda g: "always" if g == 0 else f"or-group {g}")
    c_del.button("", icon=":material/close:", key=f"vl_f{uid}_del", help="Remove this condition",
                 on_click=_remove_row, args=(uid,))
    if texts is None:
        return None
    try:
        return parse_filter(column, op, texts, view.catalog)
    except CohortError as error:
        return error


def _add_row(view: View) -> None:
    st.session_state[_DRAFT]["rows"].append(_new_row(view))


def _remove_row(uid: int) -> None:
    rows = st.session_state[_DRAFT]["rows"]
    if uid in rows:
        rows.remove(uid)


def draft_cohort(filters: list[tuple[int, Filter]], parent: int | None) -> Cohort:
    """The cohort of (group, filter) pairs: group 0 always applies, groups 1.. are alternatives."""
    top = tuple(f for g, f in filters if g == 0)
    groups: dict[int, list[Filter]] = {}
    for g, f in filters:
        if g:
            groups.setdefault(g, []).append(f)
    return Cohort(top, tuple(tuple(g) for g in groups.values()), parent)


@st.dialog("Cohort filter", width="large")
def _builder(view: View, title: str) -> None:
    draft = st.session_state[_DRAFT]
    st.markdown(f"**{_escape(title)}**")
    st.caption("Conditions marked *always* must all hold. When or-groups are used, an image must also match "
               "every condition of at least one or-group.")
    filters: list[tuple[int, Filter]] = []
    problems: list[str] = []
    unfinished = 0
    for uid in list(draft["rows"]):
        result = _condition_row(view, uid)
        if isinstance(result, Filter):
            filters.append((st.session_state[f"vl_f{uid}_grp"], result))
        elif isinstance(result, CohortError):
            problems.append(str(result))
        else:
            unfinished += 1
    st.button("Add condition", icon=":material/add:", key="vl_draft_add", on_click=_add_row, args=(view,))
    cohort = draft_cohort(filters, draft["parent"])
    ids = draft["image_ids"]
    preview = cohort.with_filters(Filter("image_id", "in", ids)) if ids else cohort
    for problem in problems:
        st.warning(problem, icon=":material/edit_note:")
    if unfinished:
        st.caption(f"{unfinished} condition(s) still need a value.")
    try:
        size = view.count(preview)
    except CohortError as error:
        st.error(str(error))
        size = None
    if size is not None:
        sentences = "; ".join(view.describe(Cohort(cohort.filters, cohort.groups)))
        extra = f" (and {len(ids):,} hand-picked images)" if ids else ""
        if draft["parent"] is not None:
            parent = view.state.get_cohort(draft["parent"])
            extra += f", within saved cohort '{_escape(parent.name)}'"
        st.markdown(f"**{size:,}** images match: {_escape(sentences)}{extra}")
    name = st.text_input("Name", key="vl_draft_name", placeholder="Name to save the cohort under")
    ready = not problems and not unfinished and size is not None
    cols = st.columns(3)
    if draft["target"] is None:
        if cols[0].button("Apply", type="primary", key="vl_draft_apply", disabled=not ready, width="stretch",
                          help="Show this filter now; save it later"):
            go(view, cohort, page=None, image=None)
            st.rerun()
        if cols[1].button("Save as new cohort", key="vl_draft_create", disabled=not ready, width="stretch") \
                and named(name):
            saved = view.state.create_cohort(name, cohort)
            go(view, Cohort(parent_id=saved.id), page=None, image=None)
            st.rerun()
    elif cols[0].button("Save changes", type="primary", key="vl_draft_update", disabled=not ready,
                        width="stretch") and named(name):
        view.state.update_cohort(draft["target"], name=name, cohort=Cohort(cohort.filters, cohort.groups))
        go(view, Cohort(parent_id=draft["target"]), page=None, image=None)
        st.rerun()
    if cols[2].button("Cancel", key="vl_draft_cancel", width="stretch"):
        st.rerun()
