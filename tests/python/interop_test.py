"""Reads a FilterDB snapshot and an export with DuckDB and pyarrow, and pulls the export's
selection over Arrow Flight, checking everything against the server's own gRPC answers.

Usage: interop_test.py --server HOST:PORT --snapshot DIR --export DIR --proto-root proto/

The only cast the dataset contract needs is none here: DuckDB reads `kernel`
(FixedSizeList<float32, 9>) as FLOAT[] and `kernel[1]..kernel[9]` index it directly;
`kernel::FLOAT[9]` is needed only for DuckDB's array_* functions.
Prints "OK ..." lines that the Rust end-to-end test checks. Needs grpcio, grpcio-tools,
numpy, pyarrow, duckdb.
"""
import argparse
import importlib
import json
import pathlib
import re
import sys
import tempfile

import numpy as np


def load_stubs(proto_root: pathlib.Path):
    from grpc_tools import protoc

    out = pathlib.Path(tempfile.mkdtemp(prefix="filterdb_stubs_"))
    args = ["protoc", f"-I{proto_root}", f"--python_out={out}", f"--grpc_python_out={out}", "filterdb/v1/filterdb.proto"]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    sys.path.insert(0, str(out))
    return importlib.import_module("filterdb.v1.filterdb_pb2"), importlib.import_module("filterdb.v1.filterdb_pb2_grpc")


def mean_cov(n, s, so):
    mean = s / n
    cov = (so - np.outer(s, s) / n) / (n - 1)
    return mean, cov


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--snapshot", required=True)
    ap.add_argument("--export", required=True)
    ap.add_argument("--proto-root", required=True)
    a = ap.parse_args()

    import duckdb
    import grpc
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.flight as flight
    import pyarrow.parquet as pq

    pb, rpc = load_stubs(pathlib.Path(a.proto_root))
    stub = rpc.FilterDbStub(grpc.insecure_channel(a.server))
    snap = pathlib.Path(a.snapshot)
    manifest = json.loads((snap / "manifest.json").read_text())
    assert manifest["partition_keys"] == ["task", "visual_category"], manifest

    # --- DuckDB: counts per task equal the server's census.
    con = duckdb.connect()
    filters = f"read_parquet('{snap}/filters/*/*/*.parquet', hive_partitioning=true)"
    census = stub.Census(pb.CensusRequest(group_by=[pb.FIELD_TASK]))
    want = {g.key[0]: (g.models, g.layers, g.filters) for g in census.groups}
    got = {
        t: (m, l, f)
        for t, m, l, f in con.execute(
            f"SELECT task, count(DISTINCT model_id), count(DISTINCT layer_id), count(*) FROM {filters} GROUP BY task"
        ).fetchall()
    }
    assert got == want, (got, want)
    assert sum(v[2] for v in got.values()) == census.total.filters == manifest["rows"]["filters"]
    print(f"OK duckdb counts {got}")

    # --- DuckDB: means and covariances (float64 sums) equal the server's merged statistics.
    sums = ", ".join(f"sum(kernel[{i + 1}]::DOUBLE)" for i in range(9))
    outer = ", ".join(f"sum(kernel[{i + 1}]::DOUBLE * kernel[{j + 1}]::DOUBLE)" for i in range(9) for j in range(9))
    rows = con.execute(f"SELECT task, count(*), {sums}, {outer} FROM {filters} GROUP BY task").fetchall()
    # The server's view: merged layer statistics per task (models carry the canonical task).
    per_task = {}
    for m in stub.ListModels(pb.ListModelsRequest(page_size=1000)).models:
        for l in stub.ListLayers(pb.ListLayersRequest(model=pb.ModelRef(id=m.model_id))).layers:
            key = m.meta.task.canonical
            n, s, so = per_task.get(key, (0, np.zeros(9), np.zeros((9, 9))))
            per_task[key] = (n + l.stats.n, s + np.array(l.stats.sum), so + np.array(l.stats.sum_outer).reshape(9, 9))
    for r in rows:
        task, n = r[0], r[1]
        s = np.array(r[2:11], dtype=np.float64)
        so = np.array(r[11:], dtype=np.float64).reshape(9, 9)
        wn, ws, wso = per_task[task]
        assert n == wn, (task, n, wn)
        m1, c1 = mean_cov(n, s, so)
        m2, c2 = mean_cov(wn, ws, wso)
        assert np.allclose(m1, m2, rtol=1e-9, atol=1e-12), (task, m1, m2)
        assert np.allclose(c1, c2, rtol=1e-7, atol=1e-12), (task, c1, c2)
    print(f"OK duckdb moments {len(rows)} tasks")

    # --- DuckDB: a partition predicate reads only its folders.
    plan = con.execute(f"EXPLAIN ANALYZE SELECT count(*) FROM {filters} WHERE task = 'Segmentation'").fetchall()[0][1]
    m = re.search(r"Scanning Files: (\d+)/(\d+)", plan)
    assert m, plan
    scanned, total = int(m.group(1)), int(m.group(2))
    assert scanned < total, plan
    print(f"OK duckdb pruning {scanned}/{total} files")

    # --- pyarrow: types, partition pruning, and kernels bit-exact against GetFilters.
    dataset = ds.dataset(snap / "filters", format="parquet", partitioning="hive")
    kernel_type = dataset.schema.field("kernel").type
    assert pa.types.is_fixed_size_list(kernel_type) and kernel_type.list_size == 9, kernel_type
    assert kernel_type.value_type == pa.float32(), kernel_type
    frags = list(dataset.get_fragments(filter=ds.field("task") == "Segmentation"))
    assert 0 < len(frags) < len(list(dataset.get_fragments())), frags
    models = pq.read_table(snap / "models.parquet")
    assert pa.types.is_dictionary(models.schema.field("task").type), models.schema
    layers = pq.read_table(snap / "layers.parquet")
    assert layers.num_rows == manifest["rows"]["layers"]
    table = dataset.to_table()
    assert table.num_rows == census.total.filters
    name = models.column("name")[0].as_py()
    mid = models.column("model_id")[0].as_py()
    t = table.filter(ds.field("model_id") == mid).sort_by("filter_id")
    got = np.asarray(t.column("kernel").combine_chunks().flatten(), dtype=np.float32).reshape(-1, 9)
    req = pb.GetFiltersRequest(model=pb.ModelFilters(model=pb.ModelRef(name=name)), batch_size=500)
    ids, chunks = [], []
    for b in stub.GetFilters(req):
        ids.extend(range(b.first_filter_id, b.first_filter_id + b.count))
        chunks.append(np.frombuffer(b.kernels, dtype="<f4").reshape(-1, 9))
    want_k = np.concatenate(chunks)
    assert t.column("filter_id").to_pylist() == ids
    assert np.array_equal(got.view(np.uint32), want_k.view(np.uint32)), "kernels differ"
    print(f"OK pyarrow {table.num_rows} rows, model {name} bit-exact")

    # --- Arrow Flight: the export's selection pulled without files equals the export.
    export = pathlib.Path(a.export)
    em = json.loads((export / "manifest.json").read_text())
    expr = em["selection"]
    client = flight.connect(f"grpc://{a.server}")
    pulled = client.do_get(flight.Ticket(json.dumps({"where": expr}).encode())).read_all()
    c = stub.Census(pb.CensusRequest(selection=pb.Selection(expr=expr)))
    assert pulled.num_rows == c.total.filters == em["rows"]["filters"], (pulled.num_rows, c.total.filters)
    exported = ds.dataset(export / "filters", format="parquet", partitioning="hive").to_table().sort_by("filter_id")
    pulled = pulled.sort_by("filter_id")
    assert pulled.column("filter_id").equals(exported.column("filter_id"))
    pk = np.asarray(pulled.column("kernel").combine_chunks().flatten(), dtype=np.float32)
    ek = np.asarray(exported.column("kernel").combine_chunks().flatten(), dtype=np.float32)
    assert np.array_equal(pk.view(np.uint32), ek.view(np.uint32))
    assert set(pulled.column("task").to_pylist()) == set(exported.column("task").to_pylist())
    # A bad ticket is a clean error.
    try:
        client.do_get(flight.Ticket(b"task ==== x")).read_all()
        raise AssertionError("bad ticket accepted")
    except (flight.FlightError, pa.ArrowInvalid) as e:
        assert "selection expr" in str(e), e
    print(f"OK flight {pulled.num_rows} rows equal the export")


if __name__ == "__main__":
    main()
