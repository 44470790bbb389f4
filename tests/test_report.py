"""PDF scorecard: its content equals the engine's figures, the PDF holds every section, page 1 is saved as PNG."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import MetricFrame
from PIL import Image
from sklearn.metrics import accuracy_score

from core import report_charts as charts
from core.compare import metric_names
from core.errors import EvalError
from core.explain.storage import explanation_rows
from core.ingest.build import Dataset, ModelRun, build_store
from core.report import build_report, pdf_bytes, plain, render_pdf, report_main, scorecard
from core.store import Store, write_part

ARTIFACTS = Path(__file__).parent / "artifacts"
N = 80
CLASSES = ["cat", "dog", "bird"]


def one_hot(labels):
    probs = np.full((len(labels), len(CLASSES)), 0.1, np.float32)
    probs[np.arange(len(labels)), labels] = 0.8
    return pd.DataFrame({"image_id": np.arange(len(labels)), "probs": list(probs)})


@pytest.fixture(scope="module")
def store(tmp_path_factory, write_images):
    """Site B is hard for the candidate (half wrong), site A nearly right; the baseline is worse on A."""
    folder = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(1)
    true = rng.integers(0, 3, N)
    site = np.where(np.arange(N) % 4 == 0, "B", "A")
    cand_wrong = np.where(site == "B", np.arange(N) % 8 == 0, np.arange(N) % 10 == 1)
    base_wrong = np.arange(N) % 3 == 0
    images = pd.DataFrame({"image_id": np.arange(N), "uri": write_images(folder / "img", N), "true_label": true,
                           "site": site})
    report = build_store(folder / "rep.duckdb", Dataset("rep", "multiclass", CLASSES, images),
                         [ModelRun("base", "Baseline net", {}, one_hot(np.where(base_wrong, (true + 1) % 3, true))),
                          ModelRun("cand", "Candidate net", {"loader": "pkg.mod:load"},
                                   one_hot(np.where(cand_wrong, (true + 2) % 3, true)))])
    explained = int(np.flatnonzero(cand_wrong)[-1])
    maps = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8)
    write_part(report.path, "explanations", explanation_rows("cand", [explained], "ig", [int(true[explained])],
                                                            maps, {}))
    return Store(report.path), true, site, cand_wrong, explained


@pytest.fixture(scope="module")
def card(store):
    return scorecard(store[0], model_id="cand", baseline="base", cohorts=[("site B", "site__eq=B")],
                     targets={"accuracy": 0.5, "f1_macro": 0.99}, n_samples=4)


def test_scorecard_content(store, card):
    s, true, site, cand_wrong, explained = store
    predicted = np.where(cand_wrong, (true + 2) % 3, true)
    assert card.headline["accuracy"] == pytest.approx(accuracy_score(true, predicted))
    checks = {t.metric: t.met for t in card.targets}
    assert checks == {"accuracy": True, "f1_macro": False}
    assert card.cohorts["cohort"].tolist() == ["All images", "site B"]
    assert card.cohorts["images"].tolist() == [N, int((site == "B").sum())]
    b = site == "B"
    assert card.cohorts.iloc[1]["accuracy"] == pytest.approx(accuracy_score(true[b], predicted[b]))
    by_site = next(g for g in card.groups if g.column == "site")
    frame = MetricFrame(metrics=accuracy_score, y_true=true, y_pred=predicted, sensitive_features=site)
    assert by_site.difference == pytest.approx(frame.difference(method="between_groups"))
    assert by_site.ratio == pytest.approx(frame.ratio(method="between_groups"))
    assert card.samples[0].image_id == explained and card.samples[0].shows == "ig"
    assert all(cand_wrong[sample.image_id] for sample in card.samples)
    assert card.comparison is not None and card.comparison.baseline == "base"
    assert card.class_counts["images"].sum() == N
    assert card.model == {"model_id": "cand", "name": "Candidate net", "source": "pkg.mod:load", "predicted": N}
    assert card.overall_error_rate == pytest.approx(cand_wrong.mean())


def pdf_text(path: Path) -> str:
    """pdftotext when poppler is installed, else the text operators of the decompressed page streams."""
    if shutil.which("pdftotext"):
        return subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True,
                              check=True).stdout
    data = path.read_bytes()
    chunks = []
    for raw in re.findall(rb"stream\r?\n(.*?)endstream", data, re.S):
        try:
            chunks.append(zlib.decompress(raw).decode("cp1252"))
        except zlib.error:
            continue
    texts = re.findall(r"\(((?:\\.|[^\\)])*)\) Tj", "\n".join(chunks))
    return "\n".join(re.sub(r"\\(.)", r"\1", t) for t in texts)


def page_count(path: Path) -> int:
    return int(re.search(rb"/Count (\d+)", path.read_bytes()).group(1))


def test_pdf_sections_and_page_one_png(card, tmp_path):
    out = render_pdf(card, tmp_path / "card.pdf")
    assert out.read_bytes().startswith(b"%PDF")
    assert page_count(out) >= 4
    text = pdf_text(out)
    for expected in ("Model scorecard", "Candidate net (cand)", "Headline metrics", "not met", "Metrics per cohort",
                     "site B", "?site__eq=B", "Metrics per feature group", "accuracy difference",
                     "Top error slices", "Sample errors", "Comparison with the baseline, Baseline net (base)",
                     "BTC", "Metadata distributions", "page 1 of"):
        assert expected in text, expected
    assert re.search(r"Accuracy\s+0\.\d{3}\s+0\.\d{3}\s+[+-]0\.\d{3}\s+0\.500\s+met", text) or \
        not shutil.which("pdftotext")
    if shutil.which("pdftoppm"):
        ARTIFACTS.mkdir(exist_ok=True)
        subprocess.run(["pdftoppm", "-png", "-r", "110", "-f", "1", "-l", "1", "-singlefile", str(out),
                        str(ARTIFACTS / "scorecard_page1")], check=True)
        page = Image.open(ARTIFACTS / "scorecard_page1.png")
        assert page.width > 800 and np.asarray(page.convert("L")).min() < 60  # drawn, not blank


def test_detection_scorecard_draws_boxes(tmp_path, write_images):
    images = pd.DataFrame({"image_id": np.arange(3), "uri": write_images(tmp_path / "img", 3, (40, 40)),
                           "true_label": [[]] * 3})
    gt = pd.DataFrame({"image_id": [0, 1, 2], "gt_id": [0, 1, 2], "class_id": [0, 1, 0], "xmin": [2, 5, 10],
                       "ymin": [2, 5, 10], "xmax": [20, 30, 30], "ymax": [20, 30, 30]})
    dets = pd.DataFrame({"image_id": [0, 1], "class_id": [0, 0], "score": [0.9, 0.8], "xmin": [2, 5],
                         "ymin": [2, 5], "xmax": [20, 30], "ymax": [20, 30]})
    report = build_store(tmp_path / "det.duckdb", Dataset("det", "detection", ["car", "person"], images, gt),
                         [ModelRun("m", "Detector", {}, det_boxes=dets)])
    card = scorecard(report.path, targets={"mAP": 0.1})
    assert card.task == "detection" and card.samples
    assert {s.shows for s in card.samples} == {"boxes"}
    assert [s.image_id for s in card.samples] == [1, 2]  # image 1: wrong class; image 2: missed
    assert "1 FP" in card.samples[0].caption and "1 FN" in card.samples[0].caption
    data = pdf_bytes(card)  # in memory, as a download button needs
    assert data.startswith(b"%PDF")
    out = tmp_path / "det.pdf"
    out.write_bytes(data)
    text = pdf_text(out)
    assert "AP at IoU" in text and "No slice has an error rate clearly above" in text


def test_cohort_rows_keep_their_own_thresholds_and_no_objects_is_undefined(tmp_path, write_images):
    images = pd.DataFrame({"image_id": np.arange(4), "uri": write_images(tmp_path / "img", 4, (40, 40)),
                           "true_label": [[]] * 4})
    gt = pd.DataFrame({"image_id": [0, 1, 2], "gt_id": [0, 1, 2], "class_id": [0, 1, 0], "xmin": [2, 5, 10],
                       "ymin": [2, 5, 10], "xmax": [20, 30, 30], "ymax": [20, 30, 30]})
    # A car found in image 0; a car scored 0.4 on the person of image 1; a car in image 3, which holds nothing.
    dets = pd.DataFrame({"image_id": [0, 1, 3], "class_id": [0, 0, 0], "score": [0.9, 0.4, 0.9],
                         "xmin": [2, 5, 2], "ymin": [2, 5, 2], "xmax": [20, 30, 20], "ymax": [20, 30, 20]})
    path = build_store(tmp_path / "det.duckdb", Dataset("det", "detection", ["car", "person"], images, gt),
                       [ModelRun("m", "Detector", {}, det_boxes=dets)]).path
    card = scorecard(path, score_threshold=0.5, cohorts=[("empty", "true_label__isnull=true"), ("low", "conf=0.3")])
    rows = card.cohorts.set_index("cohort")
    # Precision averaged over the classes: cars 1 of 2 at score >= 0.5, 1 of 3 at >= 0.3; persons none found.
    assert rows.loc["All images", "precision"] == pytest.approx((1 / 2 + 0) / 2)
    assert rows.loc["low", "precision"] == pytest.approx((1 / 3 + 0) / 2)
    assert rows.loc["low", "setting"] == " (IoU 0.5, score ≥ 0.3)" and rows.loc["All images", "setting"] == ""
    # No object in the cohort: recall (and every other figure) is undefined, not 0.
    assert rows.loc["empty", "images"] == 1
    assert rows.loc["empty", ["precision", "recall", "f1", "mAP"]].isna().all()
    out = tmp_path / "det.pdf"
    assert report_main([str(path), "--score-threshold", "0.3", "-o", str(out)]) == 0
    assert "score threshold 0.3" in pdf_text(out)


def test_detection_samples_are_upright_with_their_boxes(tmp_path, write_images, monkeypatch):
    """A photo stored 40 x 20 with EXIF orientation 6 is shown 20 x 40, its boxes turned with it; once its
    file is gone, its (upright) thumbnail takes its place, the boxes scaled to it."""
    from core import heatmap

    uris = write_images(tmp_path / "img", 2, (40, 20))
    with Image.open(uris[1]) as image:
        exif = Image.Exif()
        exif[0x0112] = 6
        image.convert("RGB").save(uris[1], exif=exif)
    images = pd.DataFrame({"image_id": np.arange(2), "uri": uris, "true_label": [[]] * 2})
    gt = pd.DataFrame({"image_id": [0, 1], "gt_id": [0, 1], "class_id": [0, 0], "xmin": [2, 4], "ymin": [2, 3],
                       "xmax": [20, 30], "ymax": [10, 15]})
    dets = pd.DataFrame({"image_id": [1], "class_id": [1], "score": [0.9], "xmin": [4], "ymin": [3],
                         "xmax": [30], "ymax": [15]})
    report = build_store(tmp_path / "det.duckdb", Dataset("det", "detection", ["car", "person"], images, gt),
                         [ModelRun("m", "Detector", {}, det_boxes=dets)])
    drawn = []
    draw_boxes = heatmap.draw_boxes
    monkeypatch.setattr(heatmap, "draw_boxes", lambda image, boxes, *a, **k: (
        drawn.append((image.size, boxes[["xmin", "ymin", "xmax", "ymax"]].to_numpy())),
        draw_boxes(image, boxes, *a, **k))[1])
    for source in ("file", "thumbnail"):
        drawn.clear()
        card = scorecard(report.path)
        sample = next(s for s in card.samples if s.image_id == 1)
        assert sample.image.height == 2 * sample.image.width  # upright: 20 x 40, scaled
        size, boxes = next(d for d in drawn if d[0] == sample.image.size)
        scale = size[0] / 20
        # EXIF 6 turns (x, y) of a 40 x 20 photo to (20 - y, x): [4, 3, 30, 15] becomes [5, 4, 17, 30].
        np.testing.assert_allclose(boxes, [[5 * scale, 4 * scale, 17 * scale, 30 * scale]] * 2)
        Path(uris[1]).unlink(missing_ok=True)


def test_bad_input(store, tmp_path):
    s, *_ = store
    with pytest.raises(EvalError, match="unknown model 'nope'") as info:
        build_report(s, model_id="nope", out_path=tmp_path / "x.pdf")
    assert info.value.choices == ["base", "cand"]
    with pytest.raises(EvalError, match="no metric 'auc'") as info:
        build_report(s, targets={"auc": 0.9}, out_path=tmp_path / "x.pdf")
    assert info.value.choices == list(metric_names("multiclass"))
    with pytest.raises(EvalError, match="not of the form metric=value"):
        report_main([str(s.paths.base), "--target", "accuracy", "-o", str(tmp_path / "x.pdf")])
    assert not (tmp_path / "x.pdf").exists()


def test_cli_writes_pdf(store, tmp_path, capsys):
    s, *_ = store
    out = tmp_path / "cli.pdf"
    assert report_main([str(s.paths.base), "--model", "cand", "--cohort", "B::site__eq=B",
                        "--target", "accuracy=0.9", "-o", str(out)]) == 0
    assert out.exists() and f"wrote {out}" in capsys.readouterr().out
    assert "Comparison with the baseline" not in pdf_text(out)


def test_charts_render_their_text():
    """vl-convert draws text only in a font it finds; an empty chart would mean none matched."""
    chart = charts.class_distribution(pd.DataFrame({"class": ["a"], "images": [0]}), width=200)
    pixels = np.asarray(Image.open(io.BytesIO(charts.render_png(chart))).convert("L"))
    assert (pixels < 128).sum() > 200  # title, axis labels and ticks, no bar


def test_plain_text_for_core_fonts():
    assert plain("0.2 ≤ Brightness < 0.4 − x → y") == "0.2 <= Brightness < 0.4 - x -> y"
    assert plain("日本") == "??"


def test_review_notes_are_listed_and_counted(tmp_path, write_images):
    from core.state import StateDB

    n = 12
    true = np.arange(n) % 3
    images = pd.DataFrame({"image_id": np.arange(n), "uri": write_images(tmp_path / "img", n), "true_label": true})
    path = build_store(tmp_path / "notes.duckdb", Dataset("notes", "multiclass", CLASSES, images),
                       [ModelRun("m", "Net", {}, one_hot((true + (np.arange(n) % 4 == 0)) % 3))]).path
    empty = scorecard(path, n_samples=0)
    assert empty.reviews == ()
    assert not StateDB.for_store(path).path.exists()  # reading the notes created no state database
    out = render_pdf(empty, tmp_path / "empty.pdf")
    assert "No image or saved cohort has been reviewed yet." in pdf_text(out)

    state = StateDB.for_store(path)
    dark = state.create_cohort("Dark images", image_ids=[1, 2, 3])
    other = state.create_cohort("Untouched", image_ids=[4])
    state.set_review("cohort", dark.id, status="reviewed", note="labels checked ≥ twice")
    state.set_review("cohort", other.id, status="open")  # says nothing: not listed
    state.set_review("image", 7, status="fixed", note="was a bird")
    state.set_review("image", 2, status="reviewed")
    state.set_review("image", 5, note="blurry, keep an eye on it")
    state.set_review("image", 9, status="open", note="  ")  # says nothing: not listed
    card = scorecard(path, n_samples=0)
    assert [(r.kind, r.target, r.name, r.status, r.note) for r in card.reviews] == [
        ("cohort", dark.id, "Dark images", "reviewed", "labels checked ≥ twice"),
        ("image", 2, "Image 2", "reviewed", ""),
        ("image", 5, "Image 5", "open", "blurry, keep an eye on it"),
        ("image", 7, "Image 7", "fixed", "was a bird"),
    ]
    assert card.review_counts() == {"cohort": {"open": 0, "reviewed": 1, "fixed": 0},
                                    "image": {"open": 1, "reviewed": 1, "fixed": 1}}
    text = pdf_text(render_pdf(card, tmp_path / "notes.pdf"))
    for expected in ("Review notes", "cohorts: 0 open, 1 reviewed, 0 fixed", "images: 1 open, 1 reviewed, 1 fixed",
                     "Dark images", "labels checked >= twice", "was a bird", "blurry, keep an eye on it"):
        assert expected in text, expected
    assert "Untouched" not in text
