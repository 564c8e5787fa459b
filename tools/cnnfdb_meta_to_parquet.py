#!/usr/bin/env python3
"""Convert the CNN Filter DB release's `meta` table to Parquet for `filterdb import-cnnfdb`.

The release (Zenodo 10.5281/zenodo.6371680, `dataset.h5`) stores its meta table with
`DataFrame.to_hdf(path, "meta")`: pandas' "fixed" format, object columns pickled, so only Python
can read it. This script does that one step and nothing else:

    python tools/cnnfdb_meta_to_parquet.py dataset.h5 meta.parquet
    filterdb import-cnnfdb dataset.h5 meta.parquet

Output: one row per extracted 3x3 layer. The MultiIndex [model_id, conv_depth, conv_depth_norm,
layer_id] becomes plain columns; `filter_ids` stays the release's "start:end" string with an
INCLUSIVE end; every other column is kept when it is simple (numbers, booleans, text). Object
columns holding text become UTF-8 columns (None/NaN -> null); mixed object columns are written
as their `str()` so nothing is silently dropped. Needs pandas, tables (PyTables) and pyarrow.
"""

import argparse
import math
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

INDEX = ["model_id", "conv_depth", "conv_depth_norm", "layer_id"]
REQUIRED = ["model", "filter_ids", "in_channels", "out_channels", "Task", "Training-Dataset"]


def _is_null(v):
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def _object_to_arrow(name, values):
    """An object column as an Arrow array: text stays text, numbers stay numbers."""
    present = [v for v in values if not _is_null(v)]
    if all(isinstance(v, (bool, np.bool_)) for v in present) and present:
        return pa.array([None if _is_null(v) else bool(v) for v in values], pa.bool_())
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in present) and present:
        return pa.array([None if _is_null(v) else int(v) for v in values], pa.int64())
    if all(isinstance(v, (int, float, np.integer, np.floating)) for v in present) and present:
        return pa.array([None if _is_null(v) else float(v) for v in values], pa.float64())
    if not all(isinstance(v, str) for v in present):
        print(f"note: column {name!r} mixes types; written as text", file=sys.stderr)
    return pa.array([None if _is_null(v) else str(v) for v in values], pa.string())


def convert(h5_path, out_path, key="meta"):
    df = pd.read_hdf(h5_path, key)
    names = [n for n in df.index.names if n is not None]
    if names:
        df = df.reset_index()
    # v1.0.0's README has the index typo [model_id, conv_depth, conv_depth]; the file has INDEX.
    missing = [c for c in INDEX + REQUIRED if c not in df.columns]
    if "Visual Category" not in df.columns and "Datatype" not in df.columns:
        missing.append("Visual Category (or v0.1.0's Datatype)")
    if missing:
        sys.exit(f"{h5_path}: meta has no column(s) {missing}; columns are {list(df.columns)}")
    arrays, fields = [], []
    for col in df.columns:
        s = df[col]
        name = str(col)
        if s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
            arr = _object_to_arrow(name, list(s))
        elif pd.api.types.is_bool_dtype(s.dtype):
            arr = pa.array(s.to_numpy(dtype=bool), pa.bool_())
        elif pd.api.types.is_integer_dtype(s.dtype):
            arr = pa.array(s.to_numpy(dtype=np.int64), pa.int64())
        elif pd.api.types.is_float_dtype(s.dtype):
            arr = pa.array(s.to_numpy(dtype=np.float64), pa.float64())
        else:
            print(f"note: column {name!r} of dtype {s.dtype} written as text", file=sys.stderr)
            arr = pa.array([None if _is_null(v) else str(v) for v in s], pa.string())
        arrays.append(arr)
        fields.append(pa.field(name, arr.type))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    # filter_ids must stay the "start:end" text (inclusive end); refuse anything else early.
    bad = [i for i, v in enumerate(df["filter_ids"]) if not (isinstance(v, str) and ":" in v)]
    if bad:
        sys.exit(f"{h5_path}: meta row {bad[0]}: filter_ids {df['filter_ids'].iloc[bad[0]]!r} is not 'start:end'")
    # zstd: FilterDB's Parquet reader is built with zstd (not snappy, pyarrow's default).
    pq.write_table(table, out_path, compression="zstd")
    return len(df)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("h5", help="the release's dataset.h5 (or any file holding the `meta` key)")
    p.add_argument("out", help="Parquet file to write")
    p.add_argument("--key", default="meta", help="HDF5 key of the meta frame (default: meta)")
    a = p.parse_args()
    n = convert(a.h5, a.out, a.key)
    print(f"wrote {n} layer rows to {a.out}")


if __name__ == "__main__":
    main()
