"""Pascal VOC reader: nested trees, images apart or beside, foreign paths, difficult, bad xml; end to end."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.errors import IngestError
from core.ingest import Problems
from core.ingest.run import ingest_main
from core.ingest.voc import read_voc
from core.store import Store


def image(path, size=(50, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def voc_xml(path, filename, objects, *, folder=None, full_path=None, extra=""):
    """objects: (name, xmin, ymin, xmax, ymax, difficult) tuples, values written verbatim."""
    parts = ["<annotation>"]
    if folder:
        parts.append(f"<folder>{folder}</folder>")
    if filename is not None:
        parts.append(f"<filename>{filename}</filename>")
    if full_path:
        parts.append(f"<path>{full_path}</path>")
    parts.append("<size><width>50</width><height>40</height><depth>3</depth></size>")
    for name, x0, y0, x1, y1, difficult in objects:
        parts.append(f"<object><name>{name}</name><difficult>{difficult}</difficult>"
                     f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    parts.append(extra + "</annotation>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts))


@pytest.fixture
def voc_tree(tmp_path):
    """Three layouts at once: VOC Annotations/JPEGImages, xml beside image, and a foreign <path>."""
    root = tmp_path / "voc"
    image(root / "VOC2012" / "JPEGImages" / "a.jpg")
    voc_xml(root / "VOC2012" / "Annotations" / "a.xml", "a.jpg",
            [("dog", 1, 2, 11, 12, 0), ("person", 5, 5, 6, 9, 1)], folder="VOC2012")
    image(root / "site2" / "deep" / "b.png")
    voc_xml(root / "site2" / "deep" / "b.xml", "b.png", [("cat", 0.5, 0.5, 20.5, 10.5, 0)])
    image(tmp_path / "pictures" / "set" / "c.jpg")
    voc_xml(root / "other" / "labels" / "c.xml", "c.jpg", [("dog", 0, 0, 50, 40, 0)],
            full_path="C:\\Users\\someone\\pictures\\set\\c.jpg")
    (root / "notes.xml").write_text("<config><x>1</x></config>")  # not an annotation: ignored
    return root


def test_layouts_classes_boxes(voc_tree, tmp_path):
    ds = read_voc(voc_tree, tmp_path / "pictures")
    assert ds.classes == ["cat", "dog", "person"]
    assert [u.rsplit("/", 1)[-1] for u in ds.images["uri"]] == ["a.jpg", "c.jpg", "b.png"]
    boxes = ds.gt_boxes
    assert boxes["image_id"].tolist() == [0, 0, 1, 2]
    assert boxes["class_id"].tolist() == [1, 2, 1, 0]
    assert boxes[["xmin", "ymin", "xmax", "ymax"]].iloc[3].tolist() == [0.5, 0.5, 20.5, 10.5]
    assert boxes["area"].tolist() == [100, 4, 2000, 200]
    # difficult → iscrowd (ignored by COCO-style matching, as VOC evaluation ignores it)
    assert boxes["iscrowd"].tolist() == [False, True, False, False]


def test_image_found_by_name_anywhere_below_images_root(tmp_path):
    root = tmp_path / "ann"
    image(tmp_path / "imgs" / "x" / "y" / "q.jpg")
    voc_xml(root / "q.xml", "q.jpg", [("a", 0, 0, 1, 1, 0)], full_path="/nowhere/q.jpg")
    ds = read_voc(root, tmp_path / "imgs")
    assert ds.images["uri"].tolist() == [str(tmp_path / "imgs" / "x" / "y" / "q.jpg")]


def test_image_found_by_xml_stem_when_filename_missing(tmp_path):
    root = tmp_path / "voc"
    image(root / "z.jpg")
    voc_xml(root / "z.xml", None, [("a", 0, 0, 1, 1, 0)])
    assert read_voc(root).images["uri"].tolist() == [str(root / "z.jpg")]


def test_ambiguous_name_is_an_error(tmp_path):
    root = tmp_path / "voc"
    image(tmp_path / "imgs" / "1" / "q.jpg")
    image(tmp_path / "imgs" / "2" / "q.jpg")
    voc_xml(root / "ann" / "q.xml", "q.jpg", [("a", 0, 0, 1, 1, 0)], full_path="/elsewhere/q.jpg")
    with pytest.raises(IngestError, match="2 files are named 'q.jpg'") as info:
        read_voc(root, tmp_path / "imgs")
    assert info.value.file == str(root / "ann" / "q.xml")


@pytest.mark.parametrize("obj,field,text", [
    (("dog", 10, 2, 5, 12, 0), "bndbox/xmax", "max < min"),
    (("dog", 1, 20, 5, 12, 0), "bndbox/ymax", "max < min"),
    (("dog", "one", 2, 5, 12, 0), "bndbox/xmin", "not a finite number"),
    (("dog", 1, 2, "nan", 12, 0), "bndbox/xmax", "not a finite number"),
    (("dog", 1, 2, "inf", 12, 0), "bndbox/xmax", "not a finite number"),
    (("", 1, 2, 5, 12, 0), "name", "no <name>"),
])
def test_bad_objects_name_file_object_field(tmp_path, obj, field, text):
    root = tmp_path / "voc"
    image(root / "good.jpg")
    voc_xml(root / "good.xml", "good.jpg", [("cat", 0, 0, 2, 2, 0)])
    image(root / "bad.jpg")
    voc_xml(root / "bad.xml", "bad.jpg", [("cat", 0, 0, 1, 1, 0), obj])
    with pytest.raises(IngestError) as info:
        read_voc(root)
    assert (info.value.file, info.value.row, info.value.field) == (str(root / "bad.xml"), "object[1]", field)
    assert text in info.value.message
    problems = Problems(skip_bad=True)
    ds = read_voc(root, problems=problems)
    assert ds.images["uri"].tolist() == [str(root / "good.jpg")]
    assert len(problems.skipped) == 1


def test_object_without_box_malformed_xml_and_missing_image(tmp_path):
    root = tmp_path / "voc"
    image(root / "ok.jpg")
    voc_xml(root / "ok.xml", "ok.jpg", [("cat", 0, 0, 2, 2, 0)])
    (root / "nobox.xml").write_text("<annotation><filename>ok.jpg</filename>"
                                    "<object><name>cat</name></object></annotation>")
    (root / "broken.xml").write_text("<annotation><filename>ok.jpg</filename><object>")
    voc_xml(root / "missing.xml", "missing.jpg", [("cat", 0, 0, 2, 2, 0)])
    problems = Problems(skip_bad=True)
    ds = read_voc(root, problems=problems)
    assert len(ds.images) == 1
    found = {e.file.rsplit("/", 1)[-1]: e for e in problems.skipped}
    assert set(found) == {"nobox.xml", "broken.xml", "missing.xml"}
    assert found["nobox.xml"].field == "bndbox"
    assert "not valid xml" in found["broken.xml"].message and found["broken.xml"].row.startswith("line")
    assert found["missing.xml"].field == "filename" and "not found" in found["missing.xml"].message


def test_two_annotations_of_one_image(tmp_path):
    root = tmp_path / "voc"
    image(root / "im.jpg")
    voc_xml(root / "a.xml", "im.jpg", [("cat", 0, 0, 2, 2, 0)])
    voc_xml(root / "b.xml", "im.jpg", [("dog", 0, 0, 2, 2, 0)])
    with pytest.raises(IngestError, match="already annotated by") as info:
        read_voc(root)
    assert info.value.file == str(root / "b.xml")


def test_multilabel_and_multiclass(voc_tree, tmp_path):
    ml = read_voc(voc_tree, tmp_path / "pictures", task="multilabel")
    assert [list(v) for v in ml.images["true_label"]] == [[1, 2], [1], [0]]
    with pytest.raises(IngestError, match="exactly one class"):
        read_voc(voc_tree, tmp_path / "pictures", task="multiclass")
    problems = Problems(skip_bad=True)
    mc = read_voc(voc_tree, tmp_path / "pictures", task="multiclass", problems=problems)
    assert mc.images["true_label"].tolist() == [1, 0]


def test_ingest_voc_end_to_end(voc_tree, tmp_path, capsys):
    out = tmp_path / "voc_store.duckdb"
    code = ingest_main(["--task", "detection", "--out", str(out), "--voc", str(voc_tree),
                        "--images-root", str(tmp_path / "pictures")])
    assert code == 0, capsys.readouterr().err
    store = Store(out)
    assert store.classes == ["cat", "dog", "person"]
    assert store.image_count() == 3
    assert store.rows("SELECT count(*), sum(iscrowd::INT) FROM gt_boxes") == [(4, 1)]
    assert store.rows("SELECT width, height FROM images WHERE image_id = 2") == [(50, 40)]
    assert store.model_ids() == []
    store.close()


def test_boxes_drawn_on_an_upright_photo_are_stored_on_its_pixels(tmp_path, capsys):
    """<size> 40 x 50 for a photo stored 50 x 40 with EXIF 6: the box was drawn upright."""
    root = tmp_path / "voc"
    image(root / "a.jpg")
    with Image.open(root / "a.jpg") as picture:
        exif = Image.Exif()
        exif[0x0112] = 6
        picture.convert("RGB").save(root / "a.jpg", exif=exif)
    voc_xml(root / "a.xml", "a.jpg", [("dog", 2, 5, 12, 25, 0)])
    text = (root / "a.xml").read_text().replace("<width>50</width><height>40</height>",
                                                "<width>40</width><height>50</height>")
    (root / "a.xml").write_text(text)
    assert read_voc(root).declared_sizes.to_dict("records") == [{"image_id": 0, "width": 40, "height": 50}]
    out = tmp_path / "upright.duckdb"
    assert ingest_main(["--task", "detection", "--out", str(out), "--voc", str(root)]) == 0
    assert "were given upright" in capsys.readouterr().out
    store = Store(out)
    # Stored 50 x 40: EXIF 6 turns (x, y) to (40 - y, x), so upright [2, 5, 12, 25] was [5, 28, 25, 38].
    assert store.rows("SELECT xmin, ymin, xmax, ymax FROM gt_boxes") == [(5, 28, 25, 38)]
    store.close()
