"""The store layout: atomic base, immutable parts, views that refresh, writers never blocked."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from core import store as store_mod
from core.errors import StoreError
from core.store import Store, build_base, compact, write_part


def images_frame(ids):
    return pd.DataFrame({"image_id": ids, "uri": [f"/img/{i}.png" for i in ids],
                         "width": [8] * len(ids), "height": [8] * len(ids)})


@pytest.fixture()
def base(tmp_path):
    path = tmp_path / "ds.duckdb"
    build_base(path, {"images": images_frame([0, 1, 2])}, {"task": "multiclass", "classes": ["a", "b"]})
    return path


def test_build_and_open(base):
    store = Store(base)
    assert store.task == "multiclass"
    assert store.classes == ["a", "b"]
    assert store.image_count() == 3
    assert {"images", "predictions", "explanations", "thumbnails"} <= set(store.tables())
    # Memory a query freed goes back to the system: the app's resident size stays near what it holds.
    assert store.scalar("SELECT current_setting('allocator_background_threads')") is True
    assert not any(p.name.endswith(".building") for p in base.parent.iterdir())


def test_part_shows_after_refresh_not_before(base):
    store = Store(base)
    write_part(base, "images", images_frame([3]))
    assert store.image_count() == 3  # old snapshot until the app's next rerun
    assert store.refresh() is True
    assert store.image_count() == 4
    assert store.refresh() is False  # nothing new: the check is a no-op


def test_part_with_new_table_and_columns(base):
    store = Store(base)
    write_part(base, "embeddings", pd.DataFrame({"image_id": [0], "x": [0.5]}))
    write_part(base, "images", images_frame([9]).assign(quality=[0.25]))
    store.refresh()
    assert store.has_table("embeddings")
    frame = store.query('SELECT image_id, quality FROM "images" ORDER BY image_id')
    assert frame["quality"].isna().sum() == 3 and frame["quality"].iloc[-1] == 0.25


def test_half_written_part_is_invisible(base):
    store = Store(base)
    folder = store.paths.parts / "images"
    folder.mkdir(parents=True)
    (folder / ".12345.writing").write_bytes(b"PAR1 garbage from a killed writer")
    store.refresh()
    assert store.image_count() == 3


def test_rebuild_replaces_base_and_drops_old_parts(base):
    store = Store(base)
    write_part(base, "images", images_frame([3]))
    store.refresh()
    assert store.image_count() == 4
    build_base(base, {"images": images_frame([0, 1])}, {"task": "multiclass", "classes": ["a"]})
    assert store.image_count() == 4  # still the old snapshot
    store.refresh()
    assert store.image_count() == 2  # the new base; the old generation's part no longer counts
    assert store.classes == ["a"]


def test_compact_folds_parts(base):
    write_part(base, "images", images_frame([3, 4]))
    store = Store(base)
    assert store.image_count() == 5
    compact(base)
    store.refresh()
    assert store.image_count() == 5
    fresh = Store(base)
    assert fresh.image_count() == 5
    # after compaction, new parts still count
    write_part(base, "images", images_frame([5]))
    fresh.refresh()
    assert fresh.image_count() == 6


def test_models_keep_the_order_they_were_added_in(tmp_path):
    def models(*ids):
        return pd.DataFrame({"model_id": list(ids), "name": list(ids), "task": "multiclass", "params": "{}"})

    path = tmp_path / "m.duckdb"
    build_base(path, {"images": images_frame([0]), "models": models("zeta", "beta")},
               {"task": "multiclass", "classes": ["a"]})
    for model_id in ("omega", "alpha", "mu"):  # one part each, as ingest adds them
        write_part(path, "models", models(model_id))
    order = ["zeta", "beta", "omega", "alpha", "mu"]
    assert Store(path).model_ids() == order
    compact(path)
    write_part(path, "models", models("aaa"))
    assert Store(path).model_ids() == [*order, "aaa"]


def test_schema_version_mismatch(base, monkeypatch):
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", store_mod.SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match="schema version"):
        Store(base)


def test_missing_store(tmp_path):
    with pytest.raises(StoreError, match="not found"):
        Store(tmp_path / "nope.duckdb")


def test_failed_build_leaves_old_base(base):
    class Boom:
        pass

    with pytest.raises(Exception):
        build_base(base, {"images": Boom()}, {"task": "multiclass"})
    assert Store(base).image_count() == 3
    assert [p.name for p in base.parent.iterdir() if "building" in p.name] == []


def _writer(path: str, start: int) -> None:
    for i in range(start, start + 10):
        write_part(path, "images", images_frame([i]))


def test_concurrent_part_writers_lose_nothing(base):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(base), 100 + 10 * k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert Store(base).image_count() == 3 + 40


def test_writers_succeed_while_another_process_reads(base, tmp_path):
    """A reader process holds the store open (as the app does) while this one writes."""
    ready = tmp_path / "ready"
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import time, pathlib
        from core.store import Store
        s = Store({str(base)!r})
        before = s.image_count()
        pathlib.Path({str(ready)!r}).write_text("1")
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.05)
        still = s.image_count()
        s.refresh()
        print(before, still, s.image_count())
    """)
    reader = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=os.getcwd())
    for _ in range(400):
        if ready.exists():
            break
        import time
        time.sleep(0.05)
    write_part(base, "images", images_frame([10]))
    compact(base)
    write_part(base, "images", images_frame([11]))
    go.write_text("1")
    out, _ = reader.communicate(timeout=60)
    assert reader.returncode == 0
    assert out.split() == ["3", "3", "5"]


def test_readers_have_a_memory_limit_and_spill_folder_of_their_own(base, monkeypatch):
    setting = "SELECT current_setting('memory_limit'), current_setting('temp_directory')"
    limit, spill = Store(base).rows(setting)[0]
    _, other_spill = Store(base).rows(setting)[0]
    assert limit == "122.0 MiB" and spill != other_spill  # READ_MEMORY_LIMIT, 128 MB
    monkeypatch.setenv(store_mod.READ_MEMORY_LIMIT_ENV, "2GB")
    assert Store(base).rows(setting)[0][0] == "1.8 GiB"
    monkeypatch.setenv(store_mod.READ_MEMORY_LIMIT_ENV, "plenty")
    with pytest.raises(StoreError, match="VISIONLENS_MEMORY_LIMIT='plenty' is not a memory size"):
        Store(base)


def test_parts_that_do_not_fit_in_memory_are_scanned_from_disk(base, monkeypatch):
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(2):
        write_part(base, "explanations", pd.DataFrame({
            "model_id": "m", "image_id": np.arange(1000) + 1000 * i, "method": "ig", "target": 0, "height": 64,
            "width": 64, "scale": 1.0, "offset": 0.0, "params": "{}",
            "data": [rng.integers(0, 255, 8192, dtype=np.uint8).tobytes() for _ in range(1000)]}))
    write_part(base, "images", images_frame([3]))
    in_memory = "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'parts' ORDER BY table_name"
    assert Store(base).rows(in_memory) == [("explanations",), ("images",)]
    # Over the budget of Parquet held in memory: the biggest part set is scanned, the small one loaded.
    monkeypatch.setattr(store_mod, "PARTS_IN_MEMORY_BYTES", 1 << 20)
    store = Store(base)
    assert store.rows(in_memory) == [("images",)]
    assert store.image_count() == 4 and store.scalar("SELECT count(*) FROM explanations") == 2000
    # Within the budget but over the reader's memory limit: scanned too, and the store opens.
    monkeypatch.setattr(store_mod, "PARTS_IN_MEMORY_BYTES", 1 << 30)
    monkeypatch.setenv(store_mod.READ_MEMORY_LIMIT_ENV, "8MB")
    store = Store(base)
    assert store.rows(in_memory) == [("images",)]
    assert store.scalar("SELECT count(*) FROM explanations WHERE image_id >= 1000") == 1000


def _materialized_count(store: Store) -> int:
    return store.scalar("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'derived'")


def test_derived_table_is_computed_once_and_again_after_a_refresh(base):
    store = Store(base)
    name = store.derived(("ids", 1), "SELECT image_id, random() AS r FROM images WHERE image_id >= ?", [1])
    assert _materialized_count(store) == 0  # computed when a query first names it
    first = store.query(f"SELECT image_id, r FROM {name} ORDER BY image_id")
    assert first["image_id"].tolist() == [1, 2]
    again = store.query(f"SELECT image_id, r FROM {name} ORDER BY image_id")
    assert again["r"].tolist() == first["r"].tolist()  # the same rows, not a recomputation
    write_part(base, "images", images_frame([7]))
    assert store.refresh()
    after = store.query(f"SELECT image_id FROM {name} ORDER BY image_id")
    assert after["image_id"].tolist() == [1, 2, 7]  # a new part: the derived rows follow


def test_only_the_most_recent_derived_tables_are_held(base, monkeypatch):
    monkeypatch.setattr(store_mod, "DERIVED_TABLES_KEPT", 2)
    store = Store(base)
    names = [store.derived(("above", k), "SELECT image_id FROM images WHERE image_id > ?", [k]) for k in range(3)]
    for name in names:
        store.rows(f"SELECT count(*) FROM {name}")
    assert _materialized_count(store) == 2
    # The dropped one is computed again when named again; the others stay right.
    assert [store.scalar(f"SELECT count(*) FROM {name}") for name in names] == [2, 1, 0]
    assert _materialized_count(store) == 2


def test_a_query_retries_when_its_derived_table_was_dropped_meanwhile(base):
    store = Store(base)
    name = store.derived(("all",), "SELECT image_id FROM images")
    assert store.scalar(f"SELECT count(*) FROM {name}") == 3

    def evicted_then_read(cur, params):
        if not evicted:  # another thread's eviction, between this query's check and its run
            evicted.append(store._materialized.pop(name))
            store.cursor().execute(f"DROP TABLE {name}")
        return cur.execute(f"SELECT count(*) FROM {name}", params).fetchall()

    evicted = []
    assert store._run(f"SELECT count(*) FROM {name}", [], evicted_then_read) == [(3,)]
    assert evicted == [None]
    with pytest.raises(Exception, match="no_such_table"):  # a table no query may name stays an error
        store.rows(f"SELECT count(*) FROM {name}, no_such_table")


def test_derived_tables_stay_right_under_threads_that_evict_each_other(base, monkeypatch):
    import threading

    monkeypatch.setattr(store_mod, "DERIVED_TABLES_KEPT", 2)
    write_part(base, "images", images_frame(list(range(3, 40))))
    store = Store(base)
    names = {k: store.derived(("above", k), "SELECT image_id FROM images WHERE image_id >= ?", [k]) for k in range(6)}
    failures = []

    def reader(seed: int) -> None:
        for step in range(30):
            k = (seed * 7 + step) % 6
            try:
                if store.scalar(f"SELECT count(*) FROM {names[k]}") != 40 - k:
                    failures.append(k)
            except Exception as error:  # noqa: BLE001 - every failure is reported below
                failures.append(repr(error))

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert _materialized_count(store) <= 2
