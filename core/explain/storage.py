"""Explanation maps in the store: reduced, quantised to uint8, one row per map.

A map is reduced by area averaging so its longer side is at most ``MAX_SIDE`` pixels
(the map covers the model's input, i.e. the whole image, so upsampling it to the image's
size for display restores the geometry). It is then quantised with an affine code that
keeps the sign: ``value = data * scale + offset``, ``offset`` the map's minimum and
``scale = (max - min) / 255``, so the error is at most ``scale / 2`` (plus float32
rounding). A constant map has ``scale = 0`` and all codes 0.

Rows: ``explanations(model_id, image_id, method, target, height, width, scale, offset,
data, params)``; ``data`` is the row-major uint8 map of ``height`` x ``width``; ``params``
the JSON of the method's parameters, the model's input size and the value the map explains.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from ..store import Store

MAX_SIDE = 64
LEVELS = 255

ROW_SCHEMA = pa.schema([
    ("model_id", pa.string()), ("image_id", pa.int32()), ("method", pa.string()),
    ("target", pa.int32()), ("height", pa.int32()), ("width", pa.int32()),
    ("scale", pa.float32()), ("offset", pa.float32()), ("data", pa.binary()),
    ("params", pa.string()),
])


def reduce_maps(maps: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """(N, H, W) → (N, h, w) with max(h, w) <= max_side, by area averaging."""
    _, height, width = maps.shape
    factor = max(height, width) / max_side
    if factor <= 1:
        return maps.astype(np.float32)
    size = (max(1, round(height / factor)), max(1, round(width / factor)))
    # Only writers reduce maps: readers (the app) load this module without torch.
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    return F.adaptive_avg_pool2d(tensor, size)[:, 0].numpy()


def quantise(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 codes (N, h, w), float32 scale (N,) and offset (N,)."""
    maps = maps.astype(np.float32)
    low = maps.min(axis=(1, 2))
    high = maps.max(axis=(1, 2))
    scale = ((high - low) / LEVELS).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = np.rint((maps - low[:, None, None]) / safe[:, None, None])
    return np.clip(codes, 0, LEVELS).astype(np.uint8), scale, low.astype(np.float32)


def dequantise(codes: np.ndarray, scale: float, offset: float) -> np.ndarray:
    return (codes.astype(np.float32) * np.float32(scale) + np.float32(offset)).astype(np.float32)


def explanation_rows(model_id: str, image_ids: Sequence[int], method: str,
                     targets: Sequence[int], maps: np.ndarray, params: dict) -> pa.Table:
    """Table rows for maps (N, H, W) of (image_ids[i], targets[i])."""
    reduced = reduce_maps(maps)
    codes, scale, offset = quantise(reduced)
    n, height, width = codes.shape
    text = json.dumps(params, sort_keys=True)
    return pa.table({
        "model_id": [model_id] * n,
        "image_id": np.asarray(image_ids, dtype=np.int32),
        "method": [method] * n,
        "target": np.asarray(targets, dtype=np.int32),
        "height": np.full(n, height, np.int32),
        "width": np.full(n, width, np.int32),
        "scale": scale,
        "offset": offset,
        "data": [row.tobytes() for row in codes],
        "params": [text] * n,
    }, schema=ROW_SCHEMA)


def _open(store: Store | str | os.PathLike) -> Store:
    return store if isinstance(store, Store) else Store(store)


def load_explanation(store: Store | str | os.PathLike, model_id: str, image_id: int, method: str,
                     target: int) -> np.ndarray | None:
    """The dequantised float32 map (height, width), or None when it was not computed."""
    rows = _open(store).rows(
        'SELECT height, width, scale, "offset", data FROM "explanations" '
        "WHERE model_id = ? AND image_id = ? AND method = ? AND target = ? LIMIT 1",
        [model_id, int(image_id), method, int(target)])
    if not rows:
        return None
    height, width, scale, offset, data = rows[0]
    codes = np.frombuffer(bytes(data), dtype=np.uint8).reshape(height, width)
    return dequantise(codes, scale, offset)


def available_explanations(store: Store | str | os.PathLike, model_id: str,
                           image_id: int) -> pd.DataFrame:
    """method, target, height, width, params of the maps stored for one image."""
    return _open(store).query(
        'SELECT DISTINCT method, target, height, width, params FROM "explanations" '
        "WHERE model_id = ? AND image_id = ? ORDER BY method, target",
        [model_id, int(image_id)])


def stored_keys(store: Store, model_id: str, method: str) -> pd.DataFrame:
    """(image_id, target) already stored for a model and method."""
    return store.query('SELECT DISTINCT image_id, target FROM "explanations" '
                       "WHERE model_id = ? AND method = ?", [model_id, method])
