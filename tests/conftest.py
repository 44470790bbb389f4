"""Fixtures shared by unit tests: noise images for small stores, and one small demo build per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import demo
from core.store import Store

# Small enough for CI, large enough that the demo's nuisance factors and label errors show.
DEMO_BUILD = {"n_images": 1000, "n_train": 1500, "seed": 0}


def noise_images(folder: Path, n: int, size: tuple[int, int] = (24, 24)) -> list[str]:
    """``n`` seeded random RGB PNGs of ``size`` (width, height) in ``folder``; their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    uris = []
    for i in range(n):
        path = folder / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        uris.append(str(path))
    return uris


@pytest.fixture(scope="session")
def write_images():
    """``noise_images`` for tests whose module-scoped fixtures build stores."""
    return noise_images


@pytest.fixture(scope="session")
def demo_multiclass(tmp_path_factory):
    """The multiclass demo at ``DEMO_BUILD``, built once per session, single-threaded so it is the
    same build on every machine."""
    folder = tmp_path_factory.mktemp("demo-multiclass")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        demo.build_task("multiclass", folder, **DEMO_BUILD)
    finally:
        torch.set_num_threads(threads)
    store = Store(folder / "demo-multiclass.duckdb")
    yield store
    store.close()
