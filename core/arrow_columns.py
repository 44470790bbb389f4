"""Query results taken from Arrow into numpy and pandas one column at a time, in image order.

A million-row result converted at once holds the Arrow table, its sorted copy
and the pandas frame together. Here the rows are ordered by an argsort of the
image ids (not ``ORDER BY``, whose sort of wide rows takes memory too), and
each Arrow column can be freed as soon as its numpy or categorical form exists.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


def image_order(table: pa.Table) -> np.ndarray:
    """Row positions of ``table`` by ascending ``image_id``."""
    return np.argsort(table.column("image_id").to_numpy().astype(np.int64), kind="stable")


def numbers(column: pa.ChunkedArray, rows: np.ndarray) -> np.ndarray:
    """``column``'s values at ``rows`` as float64, nulls as NaN."""
    return column.to_numpy().astype(np.float64, copy=False)[rows]


def categorical(column: pa.ChunkedArray, rows: np.ndarray) -> pd.Categorical:
    """``column``'s values at ``rows`` as pandas would categorise them (sorted categories; null and NaN
    missing), each distinct value held once: a million strings would take ~10 MiB per column."""
    values = pc.drop_null(pc.unique(column))
    if pa.types.is_floating(values.type):
        values = values.filter(pc.invert(pc.is_nan(values)))
    values = values.take(pc.sort_indices(values))
    codes = pc.fill_null(pc.index_in(column, value_set=values), -1).to_numpy()
    return pd.Categorical.from_codes(codes[rows], categories=pd.Index(values.to_pandas()))


def columns_of(table: pa.Table) -> dict[str, pa.ChunkedArray]:
    """``table``'s columns by name; pop each when converting it, and drop ``table``, to free it early."""
    return {name: table.column(name) for name in table.column_names}
