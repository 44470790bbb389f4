"""A page of thumbnails as one element: a grid of clickable image cards.

One ``st.components.v2`` element draws the whole page (inline JPEG data URIs,
no file writes, nothing fetched from outside), which is far cheaper than one
Streamlit element per image. Clicking a card reports its image id to Python.
Each card has a title line and chips; a chip's ``kind`` picks its colour:
``ok`` (correct / true positive), ``err`` (wrong / false positive),
``miss`` (missed / false negative), ``info`` (neutral).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import streamlit as st

from .state import View

@dataclass(frozen=True)
class Chip:
    text: str
    kind: str = "info"
    hint: str = ""


@dataclass(frozen=True)
class Card:
    image_id: int
    jpeg: bytes | None
    title: str
    chips: Sequence[Chip] = field(default_factory=tuple)
    correct: bool | None = None


_CSS = """
.vl-grid { display: grid; gap: 10px; grid-template-columns: repeat(auto-fill, minmax(var(--vl-size), 1fr)); }
.vl-card { all: unset; box-sizing: border-box; display: flex; flex-direction: column; gap: 4px; cursor: pointer;
  padding: 6px; border-radius: 6px; border: 1px solid rgba(49, 51, 63, 0.15);
  border-top: 4px solid var(--vl-state, rgba(49, 51, 63, 0.2)); background: var(--st-background-color, #fff);
  font-family: var(--st-font, sans-serif); font-size: 12px; color: var(--st-text-color, #1d2433); min-width: 0; }
.vl-card:hover, .vl-card:focus-visible { box-shadow: 0 0 0 2px var(--st-primary-color, #3154c8); }
.vl-card.vl-correct { --vl-state: #2f9e44; }
.vl-card.vl-wrong { --vl-state: #e03131; }
.vl-thumb { width: 100%; height: var(--vl-size); display: flex; align-items: center; justify-content: center;
  background: rgba(49, 51, 63, 0.05); border-radius: 4px; overflow: hidden; }
.vl-thumb img { max-width: 100%; max-height: 100%; object-fit: contain; image-rendering: auto; }
.vl-title { font-weight: 600; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.vl-chips { display: flex; flex-wrap: wrap; gap: 3px; }
.vl-chip { padding: 0 5px; border-radius: 8px; line-height: 17px; white-space: nowrap; max-width: 100%;
  overflow: hidden; text-overflow: ellipsis; border: 1px solid transparent; }
.vl-chip.ok { background: #d3f9d8; color: #1b5e20; }
.vl-chip.err { background: #ffe3e3; color: #a51111; }
.vl-chip.miss { background: #fff3bf; color: #7a5a00; border-color: #f2c94c; }
.vl-chip.info { background: rgba(49, 51, 63, 0.07); }
.vl-empty { color: rgba(49, 51, 63, 0.6); font-size: 14px; padding: 8px 0; }
"""

# Rebuilds the grid from ``data`` on every render; a click sets the one-shot
# trigger ``clicked`` to the card's image id.
_JS = """
export default function (component) {
  const { data, setTriggerValue, parentElement } = component;
  let grid = parentElement.querySelector('.vl-grid');
  if (!grid) {
    grid = document.createElement('div');
    grid.className = 'vl-grid';
    grid.setAttribute('role', 'list');
    parentElement.appendChild(grid);
  }
  grid.style.setProperty('--vl-size', data.size + 'px');
  grid.replaceChildren();
  if (!data.cards.length) {
    const empty = document.createElement('div');
    empty.className = 'vl-empty';
    empty.textContent = data.empty;
    grid.appendChild(empty);
    return;
  }
  for (const card of data.cards) {
    const button = document.createElement('button');
    button.className = 'vl-card' + (card.correct === true ? ' vl-correct' : card.correct === false ? ' vl-wrong' : '');
    button.dataset.imageId = card.id;
    button.setAttribute('role', 'listitem');
    button.title = card.tooltip;
    const thumb = document.createElement('div');
    thumb.className = 'vl-thumb';
    if (card.src) {
      const img = document.createElement('img');
      img.src = card.src;
      img.alt = card.title;
      img.loading = 'lazy';
      thumb.appendChild(img);
    }
    const title = document.createElement('div');
    title.className = 'vl-title';
    title.textContent = card.title;
    const chips = document.createElement('div');
    chips.className = 'vl-chips';
    for (const chip of card.chips) {
      const span = document.createElement('span');
      span.className = 'vl-chip ' + chip.kind;
      span.textContent = chip.text;
      if (chip.hint) span.title = chip.hint;
      chips.appendChild(span);
    }
    button.append(thumb, title, chips);
    button.addEventListener('click', () => setTriggerValue('clicked', card.id));
    grid.appendChild(button);
  }
}
"""

_grid = st.components.v2.component("visionlens.thumbnail_grid", css=_CSS, js=_JS)


def data_uri(jpeg: bytes | None) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii") if jpeg else ""


def _card_data(card: Card) -> dict:
    hints = [f"{chip.text}: {chip.hint}" if chip.hint else chip.text for chip in card.chips]
    return {"id": int(card.image_id), "src": data_uri(card.jpeg), "title": card.title,
            "correct": card.correct, "tooltip": "\n".join([card.title, *hints]),
            "chips": [{"text": chip.text, "kind": chip.kind, "hint": chip.hint} for chip in card.chips]}


def thumbnail_grid(cards: Sequence[Card], *, key: str, size: int,
                   on_click: Callable[[int], None], empty: str = "No images") -> int | None:
    """Draw ``cards`` as one grid. A click calls ``on_click(image_id)`` before the rerun
    and the grid returns that id in the rerun (None otherwise)."""
    def clicked() -> None:
        value = st.session_state[key].clicked
        if value is not None:
            on_click(int(value))

    result = _grid(key=key, data={"size": int(size), "empty": empty, "cards": [_card_data(c) for c in cards]},
                   on_clicked_change=clicked, height="content")
    return int(result.clicked) if result.clicked is not None else None

# --------------------------------------------------------------------------- cards from cohort rows

# What each task's chips read: only these are computed for a page (a detection
# frame's predicted classes and top score cost an aggregation over every box).
CARD_COLUMNS = {"multiclass": ("image_id", "true_label", "pred_label", "score", "outcome"),
                "multilabel": ("image_id", "true_label", "pred_label", "outcome"),
                "detection": ("image_id", "outcome", "n_tp", "n_fp", "n_fn")}


def card_columns(view: View) -> list[str]:
    """Frame columns the cards need, for ``View.rows(columns=...)``."""
    if view.model_id is None:
        return ["image_id", "true_label"]
    return list(CARD_COLUMNS[view.task])


def _ids(value: object) -> list[int]:
    if value is None or (isinstance(value, float) and value != value):
        return []
    return [int(v) for v in np.atleast_1d(value)]


def _chips(view: View, row: dict) -> list[Chip]:
    name = view.class_name
    if view.model_id is None:
        return [Chip(name(k), "info", "true label") for k in _ids(row.get("true_label"))]
    if view.task == "detection":
        tp, fp, fn = (int(row.get(k) or 0) for k in ("n_tp", "n_fp", "n_fn"))
        chips = [Chip(f"{tp} correct", "ok", "detections matching a ground-truth box (TP)")] if tp else []
        chips += [Chip(f"{fp} wrong", "err", "detections matching no ground-truth box (FP)")] if fp else []
        chips += [Chip(f"{fn} missed", "miss", "ground-truth boxes no detection found (FN)")] if fn else []
        return chips or [Chip("no objects", "info")]
    if view.task == "multilabel":
        truth, predicted = set(_ids(row.get("true_label"))), set(_ids(row.get("pred_label")))
        chips = []
        for k in sorted(truth | predicted):
            if k in truth and k in predicted:
                chips.append(Chip(name(k), "ok", "true and predicted"))
            elif k in predicted:
                chips.append(Chip(name(k), "err", "predicted but not true (FP)"))
            else:
                chips.append(Chip(name(k), "miss", "true but not predicted (FN)"))
        return chips or [Chip("no labels", "info")]
    truth, predicted = _ids(row.get("true_label")), _ids(row.get("pred_label"))
    if not predicted:
        return [Chip(f"true {name(t)}", "info") for t in truth] + [Chip("no prediction", "info")]
    score = row.get("score")
    hint = f"score {score:.3f}" if score is not None and score == score else ""
    right = row.get("outcome") == "correct"
    chips = [Chip(f"pred {name(predicted[0])}", "ok" if right else "err", hint)]
    if not right:
        chips += [Chip(f"true {name(t)}", "info", "true label") for t in truth]
    return chips


def cards(view: View, frame: pd.DataFrame) -> list[Card]:
    """One card per frame row (columns from ``card_columns``), thumbnails fetched in one query."""
    jpegs = view.thumbnails(frame["image_id"].tolist())
    out = []
    for row in frame.to_dict("records"):
        image_id = int(row["image_id"])
        outcome = row.get("outcome")
        correct = None if outcome not in ("correct", "incorrect") else outcome == "correct"
        out.append(Card(image_id, jpegs.get(image_id), f"#{image_id}", tuple(_chips(view, row)), correct))
    return out
