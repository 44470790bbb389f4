"""Image embeddings from a model's penultimate layer: a 2-D map and near-duplicate pairs.

Features are the input of the model's last ``nn.Linear`` (captured with a
forward hook, flattened per image), computed in batches on the GPU when there
is one. The map is their PCA (two leading components, from the SVD of the
feature covariance, signs fixed so reruns agree). Near duplicates are pairs
whose L2-normalised features have cosine similarity >= ``DUPLICATE_SIMILARITY``,
found by a blocked matrix multiply (tiles on and above the diagonal, so memory
stays at ``block²``), keeping the most similar pairs.

Written as parts: ``embeddings(model_id, image_id, x, y, computed_at)`` and
``near_duplicates(model_id, image_id_a, image_id_b, similarity, computed_at)``
with ``image_id_a < image_id_b``; a rerun adds parts with a later ``computed_at``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Callable

import numpy as np
import pandas as pd
from typing import TYPE_CHECKING

from .errors import EvalError
from .store import Store, write_part

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

EMBEDDINGS_TABLE = "embeddings"
DUPLICATES_TABLE = "near_duplicates"
DUPLICATE_SIMILARITY = 0.98
MAX_PAIRS = 10_000
BLOCK_ROWS = 4096

Progress = Callable[[int, int], None]


def last_linear(model: torch.nn.Module) -> torch.nn.Linear:
    """The model's last ``nn.Linear`` in registration order (its head)."""
    import torch  # here, not at module level: the app reads this module's tables without torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise EvalError(f"{type(model).__name__} has no nn.Linear layer to take features from", field="model")
    return linears[-1]


def penultimate_features(model: torch.nn.Module, batches, device: torch.device) -> np.ndarray:
    """Features (n, d) float32: the last linear layer's input per image, for each ``(B,3,H,W)`` batch."""
    import torch

    with torch.inference_mode():
        return _penultimate_features(model, batches, device)


def _penultimate_features(model: torch.nn.Module, batches, device: torch.device) -> np.ndarray:
    captured: list[torch.Tensor] = []
    handle = last_linear(model).register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    model = model.to(device)
    chunks = []
    try:
        for x in batches:
            captured.clear()
            model(x.to(device))
            if len(captured) != 1 or captured[0].shape[0] != x.shape[0]:
                raise EvalError("the model's last linear layer does not see one row per image "
                                "(e.g. a detector's per-box head); no image embedding can be taken from it",
                                field="model")
            chunks.append(captured[0].reshape(x.shape[0], -1).float().cpu().numpy())
    finally:
        handle.remove()
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def pca_2d(features: np.ndarray) -> np.ndarray:
    """The two leading principal components (n, 2); each axis's sign makes its largest loading positive."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) == 0:
        return np.zeros((0, 2))
    centered = features - features.mean(axis=0)
    # SVD of the d × d covariance: the same axes as an SVD of the data, at d² memory.
    components, _, _ = np.linalg.svd(centered.T @ centered)
    axes = components[:, :2]
    signs = np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(axes.shape[1])])
    axes = axes * np.where(signs == 0, 1.0, signs)
    coords = centered @ axes
    if coords.shape[1] < 2:  # one-dimensional features: the map is a line
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords


def near_duplicates(features: np.ndarray, *, threshold: float = DUPLICATE_SIMILARITY,
                    max_pairs: int = MAX_PAIRS, block_rows: int = BLOCK_ROWS,
                    device: torch.device | str | None = None) -> pd.DataFrame:
    """Pairs ``(a, b, similarity)`` of row indices, ``a < b``, cosine >= ``threshold``, most similar first."""
    import torch

    from .models import device_for

    device = torch.device(device) if device is not None else device_for()
    x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
    x = torch.nn.functional.normalize(x, dim=1)
    n = len(x)
    found_a, found_b, found_s = [], [], []
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        rows_index = torch.arange(start, stop, device=device)
        for col_start in range(start, n, block_rows):  # tiles on and above the diagonal only
            col_stop = min(n, col_start + block_rows)
            sims = x[start:stop] @ x[col_start:col_stop].T
            # Keep j > i: the diagonal and below it are self-pairs and repeats.
            later = torch.arange(col_start, col_stop, device=device)[None, :] > rows_index[:, None]
            rows, cols = torch.nonzero((sims >= threshold) & later, as_tuple=True)
            values = sims[rows, cols]
            if len(values) > max_pairs:
                values, top = torch.topk(values, max_pairs)
                rows, cols = rows[top], cols[top]
            found_a.append((rows + start).cpu().numpy())
            found_b.append((cols + col_start).cpu().numpy())
            found_s.append(values.float().cpu().numpy())
    a = np.concatenate(found_a) if found_a else np.zeros(0, np.int64)
    b = np.concatenate(found_b) if found_b else np.zeros(0, np.int64)
    s = np.concatenate(found_s) if found_s else np.zeros(0, np.float32)
    order = np.lexsort((b, a, -s))[:max_pairs]
    return pd.DataFrame({"a": a[order].astype(np.int64), "b": b[order].astype(np.int64),
                         "similarity": s[order].astype(np.float32)})


def _model(store: Store, model_id: str | None) -> tuple[str, dict]:
    models = store.models()
    if not len(models):
        raise EvalError("this store has no model; add one first", field="model")
    model_id = model_id or str(models["model_id"].iloc[0])
    match = models[models["model_id"] == model_id]
    if not len(match):
        raise EvalError(f"unknown model {model_id!r}", field="model", choices=models["model_id"].tolist())
    return model_id, json.loads(match["params"].iloc[0] or "{}")


def compute_embeddings(store_path: str | os.PathLike, model_id: str | None = None, *, batch_size: int = 256,
                       device: str | None = None, threshold: float = DUPLICATE_SIMILARITY,
                       max_pairs: int = MAX_PAIRS, progress: Progress | None = None
                       ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run the model over every image; write the ``embeddings`` and ``near_duplicates`` parts.

    Returns both frames (with ``model_id``).
    """
    from .models import device_for, image_tensor, load_model

    if batch_size < 1:
        raise EvalError(f"batch size must be positive, got {batch_size}", field="batch_size")
    store = Store(store_path)
    try:
        model_id, params = _model(store, model_id)
        images = store.query('SELECT "image_id", "uri" FROM "images" ORDER BY "image_id"')
    finally:
        store.close()
    if params.get("task") == "detection":
        raise EvalError("embeddings need a classifier; a detector has no per-image head", field="model")
    model = load_model(params)
    size = tuple(params["input_size"]) if params.get("input_size") else None
    dev = device_for(device)
    uris = images["uri"].tolist()

    def batches():
        for start in range(0, len(uris), batch_size):
            yield image_tensor(uris[start:start + batch_size], size)
            if progress:
                progress(min(len(uris), start + batch_size), len(uris))

    features = penultimate_features(model, batches(), dev)
    image_ids = images["image_id"].to_numpy(np.int32)
    coords = pca_2d(features)
    points = pd.DataFrame({"model_id": pd.Series([model_id] * len(image_ids), dtype="string"),
                           "image_id": image_ids, "x": coords[:, 0].astype(np.float32),
                           "y": coords[:, 1].astype(np.float32)})
    pairs = near_duplicates(features, threshold=threshold, max_pairs=max_pairs, device=dev)
    duplicates = pd.DataFrame({"model_id": pd.Series([model_id] * len(pairs), dtype="string"),
                               "image_id_a": image_ids[pairs["a"].to_numpy()],
                               "image_id_b": image_ids[pairs["b"].to_numpy()],
                               "similarity": pairs["similarity"].to_numpy()})
    # Both parts of one run share a stamp: readers take a model's latest run (core.label_quality.latest_sql).
    points["computed_at"] = duplicates["computed_at"] = pd.Timestamp.now(tz="UTC")
    write_part(store_path, EMBEDDINGS_TABLE, points)
    write_part(store_path, DUPLICATES_TABLE, duplicates)
    log.info("embeddings of %s: %d images, %d near-duplicate pairs", model_id, len(points), len(duplicates))
    return points, duplicates


def embeddings_main(argv: list[str] | None = None) -> int:
    """``visionlens embeddings STORE [--model M] [--device cpu|cuda] [--batch-size N] [--json]``."""
    parser = argparse.ArgumentParser(prog="visionlens embeddings",
                                     description="2-D embedding map and near-duplicate pairs from a model")
    parser.add_argument("store", help="path to NAME.duckdb")
    parser.add_argument("--model", help="model id (default: the model added to the store first)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--similarity", type=float, default=DUPLICATE_SIMILARITY,
                        help=f"cosine similarity of a near-duplicate pair (default {DUPLICATE_SIMILARITY})")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    args = parser.parse_args(argv)
    points, duplicates = compute_embeddings(args.store, args.model, batch_size=args.batch_size,
                                            device=args.device, threshold=args.similarity)
    model_id = str(points["model_id"].iloc[0]) if len(points) else (args.model or "")
    if args.json:
        print(json.dumps({"model": model_id, "images": len(points), "near_duplicates": len(duplicates)}))
    else:
        print(f"model {model_id}: {len(points):,} images mapped, {len(duplicates):,} near-duplicate pairs "
              f"(tables {EMBEDDINGS_TABLE}, {DUPLICATES_TABLE})")
    return 0
