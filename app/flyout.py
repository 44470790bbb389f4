"""The image flyout: one image large, its labels and prediction, boxes, explanation, metadata.

Opened by the URL (``image=<id>``), so a copied URL opens the same image;
closing it removes the parameter. It is a right-hand drawer (``st.dialog``);
its own widgets rerun only the drawer. A click in a fragment (the explorer's
grid) opens it from the fragment's own rerun, the URL already set, so the page
is not rerun.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from core import heatmap
from core.cohorts import Cohort, Filter, display_number
from core.explain import available_explanations, load_explanation
from core.exif import read_exif, turn_boxes, upright
from core.metrics.detection import image_ground_truth, image_objects

from . import urlsync
from .charts import bars_height, probability_frame, probability_spec
from .state import View, claim_dialog
from .whatif import render_whatif

# How many targets "compute" explains: the top class for multiclass, the three most
# probable labels / highest-scored detections otherwise (a few seconds on a CPU).
EXPLAIN_TOP_K = {"multiclass": 1, "multilabel": 3, "detection": 3}
BOX_STATUSES = {"tp": "correct (TP)", "fp": "wrong (FP)", "fn": "missed (FN)", "gt": "matched ground truth",
                "ignored": "ignored (crowd / beyond 100)"}
_TRUTH_STATUSES = {"gt": "ground truth", "ignored": "crowd (ignored)"}
_IGNORED_COLOR = "#9aa3b5"
# Small images are enlarged to about this longest side before boxes and captions are
# drawn, so a 32-px image still shows readable labels.
DISPLAY_SIDE = 640
MAP_OPACITY = 0.5  # the explanation map's share of each pixel at first


def show(view: View) -> None:
    """Open the flyout when the URL names an image. Call it last on a page."""
    if view.settings.image is not None:
        open_flyout(view, int(view.settings.image))


def open_flyout(view: View, image_id: int) -> None:
    """Open the flyout on ``image_id`` in this run, unless a dialog is open in it already.

    Called from a fragment's rerun, it opens without rerunning the page (the dialog lives
    outside the fragment). The URL must already name the image (``image=<id>``): a full
    rerun reopens it from there, and closing removes it."""
    if not claim_dialog():
        return
    record = view.query('SELECT * FROM "images" WHERE image_id = ?', [image_id])
    title = f"Image {image_id}"
    if len(record):
        title += f" · {Path(str(record['uri'].iloc[0])).name}"
        # The dataset's own id (a COCO image id), which its user knows the image by.
        source = record["source_id"].iloc[0] if "source_id" in record.columns else None
        if source is not None and pd.notna(source):
            number = isinstance(source, (int, float, np.number))
            title += f" · source id {display_number(source) if number else source}"
    st.dialog(title, width="large", position="right", on_dismiss=_close)(_flyout)(view, image_id, record)


def _close() -> None:
    urlsync.update({"image": None})


def _flyout(view: View, image_id: int, record: pd.DataFrame) -> None:
    if record.empty:
        st.error(f"Image {image_id} is not in this store.")
        return
    row = record.iloc[0]
    picture, facts = st.columns([3, 2], gap="medium")
    with facts:
        objects = _prediction(view, image_id)
    with picture:
        _picture(view, image_id, str(row["uri"]), objects)
    render_whatif(view, image_id)
    st.markdown("##### Metadata")
    _metadata(view, row)


# --------------------------------------------------------------------------- the picture


def _load(uri: str) -> tuple[Image.Image, object] | None:
    """The image in its stored frame (where boxes and maps are drawn) and its EXIF orientation;
    None when the file cannot be read."""
    try:
        with Image.open(uri) as image:
            return image.convert("RGB"), read_exif(image).get("exif_orientation")
    except OSError:
        return None


def _picture(view: View, image_id: int, uri: str, objects: pd.DataFrame | None) -> None:
    loaded = _load(uri)
    if loaded is None:
        # The thumbnail is small and already upright: boxes and maps would not line up on it.
        st.warning(f"The image file `{uri}` cannot be read; showing its thumbnail, without boxes or "
                   "explanation.", icon=":material/broken_image:")
        st.image(io.BytesIO(view.thumbnails([image_id]).get(image_id)), width="stretch")
        return
    image, orientation = loaded
    explained = _explanation_choice(view, image_id)
    if explained is not None:
        method, target, data, signed, alpha = explained
        image = heatmap.overlay(image, data, alpha=alpha, signed=signed, cmap="RdBu_r" if signed else "inferno")
    # Shown as the thumbnails and photo viewers show it; boxes (stored frame) are turned with it.
    stored_size = image.size
    image = upright(image, orientation)
    factor = max(1, DISPLAY_SIDE // max(image.size))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    if objects is not None and len(objects):
        # Without a model every box is ground truth.
        names = BOX_STATUSES if view.model_id is not None else _TRUTH_STATUSES
        default = ["tp", "fp", "fn"] if view.model_id is not None else list(names)
        shown = st.pills("Boxes", list(names), default=default, selection_mode="multi",
                         format_func=names.get, key=f"vl_fly_boxes_{image_id}")
        boxes = _boxes_to_draw(view, objects, set(shown or ()))
        corners = ["xmin", "ymin", "xmax", "ymax"]
        boxes[corners] = turn_boxes(boxes[corners].to_numpy(), *stored_size, orientation) * factor
        image = heatmap.draw_boxes(image, boxes)
    st.image(image, width="stretch")
    if explained is None:
        _compute_explanation(view, image_id)


def _boxes_to_draw(view: View, objects: pd.DataFrame, shown: set[str]) -> pd.DataFrame:
    kind_status = objects["kind"] + ":" + objects["status"]
    wanted = {"det:tp": "tp", "det:fp": "fp", "gt:fn": "fn", "gt:tp": "gt", "det:ignored": "ignored",
              "gt:ignored": "ignored"}
    key = kind_status.map(wanted)
    boxes = objects[key.isin(shown)].copy()
    boxes["status"] = key[key.isin(shown)]
    boxes["label"] = [view.class_name(int(c)) for c in boxes["class_id"]]
    boxes["color"] = np.where(boxes["status"] == "ignored", _IGNORED_COLOR, None)
    boxes.loc[boxes["status"] == "ignored", "status"] = "gt"
    return boxes


# --------------------------------------------------------------------------- labels and prediction


def _frame_row(view: View, image_id: int) -> pd.Series:
    frame = view.rows(Cohort((Filter("image_id", "eq", image_id),)))
    return frame.iloc[0]


def _names(view: View, ids) -> str:
    ids = [] if ids is None else list(ids)
    return ", ".join(view.class_name(int(i)) for i in ids) or "none"


def _prediction(view: View, image_id: int) -> pd.DataFrame | None:
    """Draw the truth and the prediction; for detection return the image's boxes with outcomes."""
    row = _frame_row(view, image_id)
    if view.model_id is None:
        st.markdown(f"**True:** {_names(view, np.atleast_1d(row['true_label']))}")
        st.caption("No model predictions in this store.")
        if view.task != "detection":
            return None
        # The ground truth alone, drawn as matched ground truth (crowd regions as ignored).
        boxes = image_ground_truth(view.store, image_id)
        return boxes.assign(kind="gt", status=np.where(boxes["iscrowd"], "ignored", "tp"))
    outcome = row.get("outcome")
    badge = {"correct": ":green-badge[correct]", "incorrect": ":red-badge[incorrect]"}.get(outcome, ":gray-badge[no prediction]")
    st.markdown(f"**Model** `{view.model_id}` · {badge}")
    if view.task == "detection":
        return _detections(view, image_id)
    probs = view.query('SELECT probs FROM "predictions" WHERE model_id = ? AND image_id = ?',
                       [view.model_id, image_id]) if "probs" in view.store.table_columns("predictions") else pd.DataFrame()
    probs_value = probs["probs"].iloc[0] if len(probs) else None
    if view.task == "multiclass":
        truth = [int(row["true_label"])] if pd.notna(row["true_label"]) else []
        predicted = [int(row["pred_label"])] if pd.notna(row["pred_label"]) else []
        st.markdown(f"**True:** {_names(view, truth)}  \n**Predicted:** {_names(view, predicted)}"
                    + (f" ({row['score']:.3f})" if pd.notna(row.get("score")) else ""))
        threshold = None
    else:
        truth = list(row["true_label"]) if row["true_label"] is not None else []
        predicted = list(row["pred_label"]) if row["pred_label"] is not None else []
        st.markdown(f"**True:** {_names(view, truth)}  \n**Predicted** (≥ {view.label_threshold:.2f}): "
                    f"{_names(view, predicted)}")
        threshold = view.label_threshold
    if probs_value is not None:
        frame = probability_frame(probs_value, view.classes, truth=truth, predicted=predicted)
        st.vega_lite_chart(probability_spec(frame, threshold), width="stretch", height=bars_height(len(frame)))
    return None


def _detections(view: View, image_id: int) -> pd.DataFrame:
    objects = image_objects(view.store, view.model_id, image_id, view.iou, view.score_threshold)
    counted = objects[objects["status"] != "ignored"]
    n_tp = int(((counted["kind"] == "det") & (counted["status"] == "tp")).sum())
    n_fp = int((counted["status"] == "fp").sum())
    n_fn = int((counted["status"] == "fn").sum())
    st.markdown(f":green-badge[{n_tp} correct] :orange-badge[{n_fp} wrong] :blue-badge[{n_fn} missed] "
                f"at IoU {view.iou:.2f}, score ≥ {view.score_threshold:.2f}")
    table = pd.DataFrame({
        "Box": objects["kind"].map({"det": "detection", "gt": "ground truth"}) + " " + objects["id"].astype(str),
        "Class": [view.class_name(int(c)) for c in objects["class_id"]],
        "Outcome": (objects["kind"] + ":" + objects["status"]).map(
            {"det:tp": "TP", "det:fp": "FP", "gt:fn": "FN", "gt:tp": "matched", "det:ignored": "ignored",
             "gt:ignored": "crowd"}),
        "Score": objects["score"],
        "IoU": objects["iou"],
    })
    st.dataframe(table, hide_index=True, width="stretch", height=min(400, 38 + 35 * len(table)), placeholder="—",
                 column_config={"Score": st.column_config.NumberColumn(format="%.3f"),
                                "IoU": st.column_config.NumberColumn(format="%.3f")})
    return objects


# --------------------------------------------------------------------------- explanations


def _target_label(view: View, target: int, objects_by_det: dict[int, str] | None) -> str:
    if view.task == "detection":
        return objects_by_det.get(target, f"detection {target}") if objects_by_det else f"detection {target}"
    return view.class_name(target)


def _explanation_choice(view: View, image_id: int) -> tuple[str, int, np.ndarray, bool, float] | None:
    if view.model_id is None:
        return None
    stored = available_explanations(view.store, view.model_id, image_id)
    if stored.empty:
        return None
    det_names = None
    if view.task == "detection":
        dets = view.query('SELECT det_id, class_id, score FROM "det_boxes" WHERE model_id = ? AND image_id = ?',
                          [view.model_id, image_id])
        det_names = {int(d): f"{view.class_name(int(c))} {s:.2f} (detection {int(d)})"
                     for d, c, s in dets.itertuples(index=False)}
    options = [None] + list(range(len(stored)))
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    alpha = right.slider("Map opacity", 0.0, 1.0, MAP_OPACITY, step=0.05, key="vl_fly_alpha",
                         help="How much of the explanation map covers the photo (0: the photo alone)")
    choice = left.selectbox(
        "Explanation", options, index=1, key=f"vl_fly_expl_{image_id}",
        format_func=lambda i: "none (plain image)" if i is None else
        f"{stored['method'].iloc[i]} · {_target_label(view, int(stored['target'].iloc[i]), det_names)}")
    if choice is None:
        return None
    method, target = str(stored["method"].iloc[choice]), int(stored["target"].iloc[choice])
    data = load_explanation(view.store, view.model_id, image_id, method, target)
    if data is None:
        return None
    from core.explain.methods import METHODS  # imports captum and shap: only when a map is shown

    signed = METHODS[method].signed if method in METHODS else bool(data.min() < 0)
    return method, target, data, signed, alpha


def _compute_explanation(view: View, image_id: int) -> None:
    if view.model_id is None:
        return
    st.caption("No explanation stored for this image and model.")
    if not view.model_params().get("loader"):
        st.caption("This model was stored from a predictions file, so it cannot be re-run to explain an image. "
                   "Ingest it with `--model module:function` to compute explanations (`visionlens precompute "
                   "--explain`, or here).")
        return
    asked = f"vl_fly_explain_{image_id}"
    if not st.session_state.get(asked):
        # The methods import captum and shap (seconds): only once the user asks.
        st.button("Compute an explanation…", icon=":material/auto_awesome:", key=f"vl_fly_ask_{image_id}",
                  on_click=st.session_state.__setitem__, args=(asked, True))
        return
    from core.explain.methods import METHODS

    fits = [name for name, method in METHODS.items() if view.task in method.tasks]
    cols = st.columns([2, 1], vertical_alignment="bottom")
    method = cols[0].selectbox("Method", fits, key=f"vl_fly_method_{image_id}")
    if cols[1].button("Compute", icon=":material/play_arrow:", key=f"vl_fly_compute_{image_id}"):
        from core.explain.precompute import precompute

        progress = st.progress(0.0, text=f"Computing {method}…")
        try:
            written = precompute(view.store.paths.base, [method], model_id=view.model_id, image_ids=[image_id],
                                 targets="pred", top_k=EXPLAIN_TOP_K[view.task],
                                 progress=lambda done, total: progress.progress(done / max(total, 1)))
        except Exception as error:  # noqa: BLE001 - the user's own model code runs here and may raise anything
            progress.empty()
            st.error(f"Could not compute {method} for image {image_id}: {error}")
            return
        progress.empty()
        view.store.refresh()
        # Nothing written: the map was stored meanwhile (a background precompute, another tab).
        st.toast(f"Stored {written} explanation map(s)." if written else "This explanation was already stored.")
        st.rerun()


# --------------------------------------------------------------------------- metadata


def _metadata(view: View, row: pd.Series) -> None:
    labels = {name: info.label for name, info in view.catalog.columns.items()}

    def text(name: str, value: object) -> str:
        if name == "true_label":
            ids = np.atleast_1d(value) if value is not None else []
            return _names(view, ids)
        if isinstance(value, (list, tuple, np.ndarray)):
            return json.dumps([v.item() if hasattr(v, "item") else v for v in value])
        if isinstance(value, float):
            return f"{value:.6g}"
        return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)

    table = pd.DataFrame({"Field": [labels.get(n, n) for n in row.index],
                          "Value": [text(n, v) for n, v in row.items()]})
    st.dataframe(table, hide_index=True, width="stretch")
