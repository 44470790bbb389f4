"""ImageFolder reader (multiclass, multilabel by folder-per-label) and end to end."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.errors import IngestError
from core.ingest import Problems
from core.ingest.imagefolder import read_imagefolder
from core.ingest.run import ingest_main
from core.store import Store


def image(path, seed=0, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "flowers"
    image(root / "tulip" / "t1.jpg")
    image(root / "tulip" / "sub" / "t2.PNG")
    image(root / "rose" / "r1.jpg")
    image(root / "daisy" / ".hidden.jpg")
    (root / "daisy" / "readme.txt").write_text("not an image")
    (root / ".cache").mkdir()
    image(root / "loose.jpg")  # no class folder
    return root


def test_multiclass(folder):
    ds = read_imagefolder(folder)
    assert ds.classes == ["daisy", "rose", "tulip"]
    assert [u.split("flowers/")[1] for u in ds.images["uri"]] == ["rose/r1.jpg", "tulip/sub/t2.PNG", "tulip/t1.jpg"]
    assert ds.images["true_label"].tolist() == [1, 2, 2]
    assert ds.extra_meta["images_root"] == str(folder)


def test_multilabel_same_relative_path_in_several_label_folders(tmp_path):
    root = tmp_path / "ml"
    image(root / "cat" / "a.jpg", seed=1)
    image(root / "dog" / "a.jpg", seed=1)
    image(root / "dog" / "b.jpg", seed=2)
    image(root / "cat" / "x" / "c.jpg", seed=3)
    image(root / "sky" / "x" / "c.jpg", seed=3)
    ds = read_imagefolder(root, task="multilabel")
    assert ds.classes == ["cat", "dog", "sky"]
    assert [u.split("ml/")[1] for u in ds.images["uri"]] == ["cat/a.jpg", "dog/b.jpg", "cat/x/c.jpg"]
    assert [list(v) for v in ds.images["true_label"]] == [[0, 1], [1], [0, 2]]


def test_multilabel_copies_that_differ(tmp_path):
    root = tmp_path / "ml"
    image(root / "cat" / "a.jpg", seed=1)
    image(root / "dog" / "a.jpg", seed=1, size=(40, 40))
    image(root / "dog" / "b.jpg", seed=2)
    with pytest.raises(IngestError, match="copies of 'a.jpg' in label folders differ") as info:
        read_imagefolder(root, task="multilabel")
    assert info.value.file == str(root / "cat" / "a.jpg")
    problems = Problems(skip_bad=True)
    ds = read_imagefolder(root, task="multilabel", problems=problems)
    assert [u.split("ml/")[1] for u in ds.images["uri"]] == ["dog/b.jpg"]
    assert len(problems.skipped) == 1


def test_detection_and_empty_trees_are_refused(tmp_path, folder):
    with pytest.raises(IngestError, match="no boxes"):
        read_imagefolder(folder, task="detection")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(IngestError, match="no images"):
        read_imagefolder(tmp_path / "empty")
    with pytest.raises(IngestError, match="not found"):
        read_imagefolder(tmp_path / "nope")


def test_ingest_imagefolder_end_to_end_with_bad_image(folder, tmp_path, capsys):
    (folder / "rose" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "out" / "flowers"
    assert ingest_main(["--task", "multiclass", "--out", str(out), "--imagefolder", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "error" in err
    assert not (tmp_path / "out" / "flowers.duckdb").exists()  # nothing half-built

    assert ingest_main(["--task", "multiclass", "--out", str(out), "--imagefolder", str(folder),
                        "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1" in err and "broken.jpg" in err
    store = Store(out)
    assert store.classes == ["daisy", "rose", "tulip"]
    assert store.rows("SELECT true_label, count(*) FROM images GROUP BY 1 ORDER BY 1") == [(1, 1), (2, 2)]
    assert store.scalar("SELECT count(*) FROM thumbnails") == 3
    store.close()
