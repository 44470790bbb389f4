"""The flyout's what-if: perturb the image with sliders, re-run the model, compare predictions.

``render_whatif(view, image_id)`` draws it (the flyout calls it). Every slider
mirrors a page parameter ``whatif.<setting>`` (``whatif.blur=2``; see
``app.state``), so a copied URL reopens the same perturbation and page links
drop it; ``whatif.open=1`` keeps the panel open. The
model is loaded once per store and model (``st.cache_resource``), the
original and the perturbed image go through it in one batch (``core.rerun.what_if``),
on CUDA when present. Torch is imported only once the panel is opened on a model
that can be re-run: the flyout draws the closed toggle without it.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image, ImageOps

from core import heatmap
from core import perturbation_kinds as P
from core.cohorts import display_number, format_number
from core.errors import VisionLensError
from core.robustness import describe_outcome
from core.store import Store

from . import urlsync
from .charts import bars_height, probability_frame, probability_spec
from .state import View

if TYPE_CHECKING:
    from core.rerun import Runner, WhatIf

PREFIX = "whatif."
OPEN_PARAM = PREFIX + "open"
DISPLAY_SIDE = 320  # small model inputs are enlarged (nearest) to at least this many pixels for drawing
FRAME_COLOUR = "#c9cfdb"  # a 1 px frame: a white or black perturbed image still shows its edges
_KEY = "vl_wi_"
_DEFAULTS = {f.name: f.default for f in fields(P.Settings)}
_STATUS = {"det:tp": "tp", "det:fp": "fp", "gt:fn": "fn", "gt:tp": "gt"}


# --------------------------------------------------------------------------- URL state


def url_settings() -> tuple[P.Settings, str | None]:
    """The URL's what-if settings, and what was wrong with them (defaults are used then).

    Read from the live URL, not ``view.page_params``: the flyout reruns alone (a
    dialog is a fragment) with the view of the last full run, whose parameters
    predate the slider just moved."""
    values = {key[len(PREFIX):]: value for key, value in urlsync.params()
              if key.startswith(PREFIX) and key != OPEN_PARAM}
    try:
        return P.Settings.from_mapping(values), None
    except (VisionLensError, ValueError) as error:
        return P.Settings(), f"Ignoring the URL's what-if settings: {error}"


def _to_url(name: str):
    default = _DEFAULTS[name]

    def convert(value: float) -> str | None:
        return None if abs(float(value) - default) < 1e-12 else format_number(round(float(value), 4))
    return convert


def _reset() -> None:
    urlsync.update({f"{PREFIX}{name}": None for name in _DEFAULTS})
    for name in _DEFAULTS:
        st.session_state.pop(_KEY + name, None)


def _slider(target, name: str, settings: P.Settings, *, label: str, low: float, high: float, step: float,
            help_text: str) -> float:
    key = _KEY + name
    urlsync.bind(key, float(getattr(settings, name)))
    return target.slider(label, float(low), float(high), step=float(step), key=key, help=help_text,
                         on_change=urlsync.write_on_change(key, PREFIX + name, _to_url(name)))


def _controls(settings: P.Settings) -> P.Settings:
    chosen = {}
    names = list(P.KINDS)
    for start in range(0, len(names), 4):
        columns = st.columns(4)
        for column, name in zip(columns, names[start:start + 4]):
            kind = P.KINDS[name]
            chosen[name] = _slider(column, name, settings, label=kind.label, low=kind.low, high=kind.high,
                                   step=kind.step, help_text=f"{kind.label}: {kind.unit}; 0 leaves the image as it is.")
    if chosen["occlusion"] > 0:
        columns = st.columns(4)
        for column, name, label in ((columns[0], "occlusion_x", "Patch centre x"),
                                    (columns[1], "occlusion_y", "Patch centre y")):
            chosen[name] = _slider(column, name, settings, label=label, low=0.0, high=1.0, step=0.05,
                                   help_text="Where the occluding patch sits, as a fraction of the image.")
    return P.Settings(**chosen)


# --------------------------------------------------------------------------- cached engine calls


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def _runner(_store: Store, store_path: str, model_id: str, params: str) -> Runner:
    from core.rerun import Runner  # torch: the model is about to run

    return Runner.load(_store, model_id)


@st.cache_data(show_spinner="Re-running the model…", max_entries=64)
def _result(_runner: Runner, _store: Store, store_key: tuple, model_id: str, image_id: int, settings: P.Settings,
            iou: float, score_threshold: float, label_threshold: float) -> WhatIf:
    from core.rerun import what_if

    return what_if(_runner, _store, image_id, settings, iou=iou, score_threshold=score_threshold,
                   label_threshold=label_threshold)


# --------------------------------------------------------------------------- drawing


def _truth(view: View, image_id: int) -> list[int]:
    value = view.query('SELECT true_label FROM "images" WHERE image_id = ?', [image_id])["true_label"].iloc[0]
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):
        return []
    return [int(v) for v in np.atleast_1d(value)]


def _picture(view: View, image: np.ndarray, boxes: pd.DataFrame | None, size: tuple[int, int]) -> Image.Image:
    """The model's input, enlarged for the eye, with boxes (image pixels, scaled to it)."""
    height, width = image.shape[:2]
    zoom = max(1, math.ceil(DISPLAY_SIDE / max(height, width)))
    picture = Image.fromarray(image).resize((width * zoom, height * zoom), Image.NEAREST)
    if boxes is None or boxes.empty:
        return ImageOps.expand(picture, border=1, fill=FRAME_COLOUR)
    status = (boxes["kind"] + ":" + boxes["status"]).map(_STATUS)
    shown = boxes[status.notna()].copy()
    shown["status"] = status[status.notna()]
    shown["label"] = [view.class_name(int(c)) for c in shown["class_id"]]
    factor_x, factor_y = width * zoom / size[0], height * zoom / size[1]
    shown[["xmin", "xmax"]] = shown[["xmin", "xmax"]] * factor_x
    shown[["ymin", "ymax"]] = shown[["ymin", "ymax"]] * factor_y
    return ImageOps.expand(heatmap.draw_boxes(picture, shown), border=1, fill=FRAME_COLOUR)


def _side(view: View, title: str, image: np.ndarray, outcome, truth: list[int], size: tuple[int, int]) -> None:
    st.markdown(f"**{title}**")
    st.image(_picture(view, image, outcome.boxes, size), width="stretch")
    st.caption(describe_outcome(outcome, view.classes, view.task))
    if outcome.probs is not None:
        threshold = view.label_threshold if view.task == "multilabel" else None
        frame = probability_frame(outcome.probs, view.classes, truth=truth, predicted=outcome.labels, top=5)
        st.vega_lite_chart(probability_spec(frame, threshold), width="stretch", height=bars_height(len(frame)))


def _save(view: View, result: WhatIf) -> None:
    from core.rerun import save_snapshot

    try:
        line = save_snapshot(view.store.paths.base, result, model_id=view.model_id, classes=view.classes,
                             task=view.task)
    except VisionLensError as error:
        st.error(str(error))
        return
    previous = view.state.get_review("image", result.image_id)
    note = f"{previous.note}\n{line}" if previous and previous.note else line
    view.state.set_review("image", result.image_id, note=note)
    view.store.refresh()
    st.toast("Saved the perturbed image and its settings as a note on this image.")


def render_whatif(view: View, image_id: int) -> None:
    """The what-if panel of the flyout for ``image_id`` under the view's model and thresholds."""
    if view.model_id is None:
        return
    params = view.model_params()
    open_now = dict(urlsync.params()).get(OPEN_PARAM) == "1"
    urlsync.bind(_KEY + "open", open_now)
    shown = st.toggle("What-if: perturb this image and re-run the model", key=_KEY + "open",
                      on_change=urlsync.write_on_change(_KEY + "open", OPEN_PARAM, lambda on: "1" if on else None))
    if not shown:
        return
    if not params.get("loader"):
        st.caption("This model was stored from a predictions file, so it cannot be re-run here. Ingest it with "
                   "`--model module:function` to try perturbations.")
        return
    settings, problem = url_settings()
    if problem:
        st.warning(problem, icon=":material/link_off:")
    settings = _controls(settings)
    try:
        runner = _runner(view.store, str(view.store.paths.base), view.model_id, json.dumps(params, sort_keys=True))
        result = _result(runner, view.store, view.store_key, view.model_id, int(image_id), settings,
                         view.iou, view.score_threshold, view.label_threshold)
    except VisionLensError as error:
        st.error(str(error))
        return
    size = view.query('SELECT width, height FROM "images" WHERE image_id = ?', [image_id]).iloc[0]
    size = (int(size["width"]), int(size["height"]))
    tied = result.perturbed.tied_top(view.task)
    if settings.is_identity:
        st.caption("Move a slider to perturb the image; the model re-runs on what it would see.")
    elif tied:
        names = ", ".join(view.classes[k] for k in tied)
        st.markdown(f":orange-badge[:material/balance: no clear prediction] {settings.describe()}: {names} tie at "
                    f"{display_number(float(np.max(result.perturbed.probs)))}; the first of them is shown as "
                    "the prediction.")
    elif result.flipped:
        st.markdown(":red-badge[:material/swap_horiz: prediction changed] " + settings.describe())
    else:
        st.markdown(":green-badge[:material/check: prediction unchanged] " + settings.describe())
    truth = _truth(view, image_id)
    left, right = st.columns(2, gap="medium")
    with left:
        _side(view, "Original", result.original_image, result.original, truth, size)
    with right:
        with st.container(key="vl_wi_perturbed"):
            _side(view, "Perturbed", result.perturbed_image, result.perturbed, truth, size)
    buttons = st.columns([1, 1, 3])
    buttons[0].button("Reset", icon=":material/restart_alt:", on_click=_reset, key=_KEY + "reset",
                      disabled=settings.is_identity)
    if buttons[1].button("Save as note", icon=":material/bookmark_add:", key=_KEY + "save",
                         disabled=settings.is_identity,
                         help="Stores the perturbed image and its settings with the store and adds a line "
                              "to this image's note."):
        _save(view, result)
