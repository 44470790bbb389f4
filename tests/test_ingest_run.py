"""`visionlens ingest` command: --model inference, adding a model to a store, errors and exit codes."""

from __future__ import annotations

import io
import json
import textwrap

import pytest
from PIL import Image

from core.ingest.run import ProgressBar, ingest_main, model_id_from
from core.store import Store

MODELS = textwrap.dedent('''
    import torch

    class MeanColour(torch.nn.Module):
        """Logits = 10 x mean of each channel: red, green, blue images predict classes 0, 1, 2."""
        def forward(self, x):
            return x.mean(dim=(2, 3)) * 10

    class HalfBox(torch.nn.Module):
        """One box per image over its top-left quarter, class 1, scored by brightness."""
        def forward(self, x):
            h, w = x.shape[2:]
            return [{"boxes": torch.tensor([[0.0, 0.0, w / 2, h / 2]]), "scores": img.mean().reshape(1),
                     "labels": torch.tensor([1]), "class_probs": torch.tensor([[0.0, 1.0]])} for img in x]

    def classifier():
        return MeanColour()

    def detector():
        return HalfBox()
''')


@pytest.fixture
def fake_models(tmp_path, monkeypatch):
    (tmp_path / "vl_fake_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "vl_fake_models"


COLOURS = {"a_red": (200, 10, 10), "b_green": (10, 200, 10), "c_blue": (10, 10, 200)}


@pytest.fixture
def colour_folder(tmp_path):
    root = tmp_path / "colours"
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (12 + 4 * k, 10), rgb).save(root / name / f"{k}.png")
    Image.new("RGB", (12, 10), COLOURS["a_red"]).save(root / "b_green" / "mislabelled.png")
    return root


def test_model_inference_then_a_second_model_as_parts(colour_folder, fake_models, tmp_path, capsys):
    out = tmp_path / "colours_store"
    code = ingest_main(["--task", "multiclass", "--out", str(out), "--imagefolder", str(colour_folder),
                        "--model", f"{fake_models}:classifier", "--input-size", "8,8", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    store = Store(out)
    assert store.model_ids() == ["classifier"]
    params = json.loads(store.models()["params"].iloc[0])
    assert params == {"loader": f"{fake_models}:classifier", "kwargs": {}, "input_size": [8, 8]}
    rows = store.query("SELECT i.uri, p.pred_label, o.correct FROM predictions p JOIN outcomes o USING "
                       "(model_id, image_id) JOIN images i USING (image_id) ORDER BY i.uri")
    assert len(rows) == 7
    wrong = rows[~rows["correct"]]
    assert [u.rsplit("/", 1)[-1] for u in wrong["uri"]] == ["mislabelled.png"]
    assert wrong["pred_label"].tolist() == [0]
    store.close()

    assert ingest_main(["--task", "multiclass", "--out", str(out), "--model", f"{fake_models}:classifier",
                        "--model-name", "v2 (retrained)", "--input-size", "8,8"]) == 0
    store = Store(out)
    assert store.model_ids() == ["classifier", "v2-retrained"]
    assert store.scalar("SELECT count(*) FROM predictions WHERE model_id = 'v2-retrained'") == 7
    assert list(store.paths.parts.glob("predictions/*.parquet"))  # added as a part, base untouched
    store.close()
    assert "added model 'v2-retrained'" in capsys.readouterr().out

    # The same id again is refused, and nothing is added.
    assert ingest_main(["--task", "multiclass", "--out", str(out), "--model", f"{fake_models}:classifier",
                        "--input-size", "8,8"]) == 2
    assert "already in the store" in capsys.readouterr().err


def test_detector_inference_on_coco(tmp_path, fake_models, capsys):
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.new("RGB", (20, 10), (50 * i, 50, 50)).save(tmp_path / "img" / f"{i}.png")
    gt = {"images": [{"id": i, "file_name": f"img/{i}.png"} for i in range(3)],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
          "annotations": [{"image_id": 0, "category_id": 2, "bbox": [0, 0, 10, 5]}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "det"
    code = ingest_main(["--task", "detection", "--out", str(out), "--coco", str(tmp_path / "gt.json"),
                        "--model", f"{fake_models}:detector"])
    assert code == 0, capsys.readouterr().err
    store = Store(out)
    dets = store.query("SELECT * FROM det_boxes ORDER BY image_id")
    assert dets["det_id"].tolist() == [0, 1, 2]  # unique per model
    assert dets[["xmin", "ymin", "xmax", "ymax"]].iloc[0].tolist() == [0, 0, 10, 5]
    assert dets["class_id"].tolist() == [1, 1, 1]
    assert store.rows("SELECT count(*) FROM gt_boxes") == [(1,)]
    store.close()


def test_skip_bad_with_model_lists_each_bad_image_once(colour_folder, fake_models, tmp_path, capsys):
    (colour_folder / "c_blue" / "torn.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "s"
    code = ingest_main(["--task", "multiclass", "--out", str(out), "--imagefolder", str(colour_folder),
                        "--model", f"{fake_models}:classifier", "--input-size", "8,8", "--skip-bad"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "skipped 1 bad row(s)/image(s)" in err
    assert sum("torn.png" in line for line in err.splitlines()) == 1
    store = Store(out)
    assert store.image_count() == 7 and store.scalar("SELECT count(*) FROM predictions") == 7
    store.close()


def test_images_of_several_sizes_need_input_size(colour_folder, fake_models, tmp_path, capsys):
    code = ingest_main(["--task", "multiclass", "--out", str(tmp_path / "x"), "--imagefolder",
                        str(colour_folder), "--model", f"{fake_models}:classifier"])
    assert code == 2
    assert "input_size" in capsys.readouterr().err
    assert not (tmp_path / "x.duckdb").exists()


@pytest.mark.parametrize("argv,text", [
    (["--out", "x"], "--task"),
    (["--task", "multiclass", "--out", "x", "--input-size", "8"], "H,W"),
    (["--task", "multiclass", "--out", "x", "--coco", "a.json", "--voc", "b"], "not allowed with"),
    (["--task", "multiclass", "--out", "{tmp}/none"], "give a dataset"),
    (["--task", "multiclass", "--out", "{tmp}/none", "--predictions", "p.csv"], "no store to add the model to"),
    (["--task", "multiclass", "--out", "{tmp}/o", "--coco", "{tmp}/missing.json"], "file not found"),
    (["--task", "segmentation", "--out", "x"], "invalid choice"),
])
def test_usage_errors_exit_2(tmp_path, capsys, argv, text):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert ingest_main(argv) == 2
    assert text in capsys.readouterr().err


def test_task_mismatch_with_existing_store(colour_folder, tmp_path, capsys):
    out = tmp_path / "s"
    assert ingest_main(["--task", "multiclass", "--out", str(out), "--imagefolder", str(colour_folder)]) == 0
    preds = tmp_path / "p.csv"
    preds.write_text("image,pred_labels\na_red/0.png,a_red\n")
    assert ingest_main(["--task", "multilabel", "--out", str(out), "--predictions", str(preds)]) == 2
    assert "task is 'multiclass'" in capsys.readouterr().err


def test_predictions_table_added_to_imagefolder_store(colour_folder, tmp_path, capsys):
    out = tmp_path / "s"
    assert ingest_main(["--task", "multiclass", "--out", str(out), "--imagefolder", str(colour_folder)]) == 0
    preds = tmp_path / "p.csv"
    preds.write_text("image,pred_label,score\na_red/0.png,a_red,0.9\n/old/box/colours/c_blue/1.png,b_green,0.4\n"
                     "b_green/missing.png,a_red,0.5\n")
    assert ingest_main(["--task", "multiclass", "--out", str(out), "--predictions", str(preds)]) == 2
    err = capsys.readouterr().err
    assert "row 2" in err and "missing.png" in err and "field 'image'" in err
    assert ingest_main(["--task", "multiclass", "--out", str(out), "--predictions", str(preds), "--skip-bad"]) == 0
    store = Store(out)
    got = store.query("SELECT i.uri, p.pred_label, p.score FROM predictions p JOIN images i USING (image_id) "
                      "ORDER BY i.uri")
    assert [u.split("colours/")[1] for u in got["uri"]] == ["a_red/0.png", "c_blue/1.png"]
    assert got["pred_label"].tolist() == [0, 1]
    store.close()


def test_progress_bar_and_model_ids():
    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar("metadata", 0, 10)
    bar("metadata", 10, 10)
    bar("metadata", 10, 10)
    bar("writing", 0, 1)
    bar("writing", 1, 1)
    assert stream.getvalue() == "metadata ...\nmetadata done: 10\nwriting ...\nwriting done\n"

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    bar = ProgressBar(tty, width=4)
    bar("metadata", 2, 4)
    bar.finish()
    assert tty.getvalue() == "\rmetadata   [##--] 2/4\n"
    assert model_id_from("My model: v2.1") == "My-model-v2-1" and model_id_from("???") == "model"
