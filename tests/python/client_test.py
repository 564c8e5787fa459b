"""A FilterDB client in Python: grpcio stubs generated from proto/ at run time.

Usage: client_test.py --server HOST:PORT --model NAME --expected FILE.f32 --proto-root proto/

Calls Census (grouped by task) and GetFilters for one model, and checks the kernels bit-exact
against the raw little-endian float32 file numpy wrote. Needs grpcio, grpcio-tools, numpy.
Prints "OK ..." lines that the Rust end-to-end test checks.
"""
import argparse
import importlib
import pathlib
import sys
import tempfile

import numpy as np


def load_stubs(proto_root: pathlib.Path):
    from grpc_tools import protoc

    out = pathlib.Path(tempfile.mkdtemp(prefix="filterdb_stubs_"))
    args = [
        "protoc",
        f"-I{proto_root}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "filterdb/v1/filterdb.proto",
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    sys.path.insert(0, str(out))
    pb = importlib.import_module("filterdb.v1.filterdb_pb2")
    rpc = importlib.import_module("filterdb.v1.filterdb_pb2_grpc")
    return pb, rpc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--expected", required=True)
    ap.add_argument("--proto-root", required=True)
    a = ap.parse_args()

    import grpc

    pb, rpc = load_stubs(pathlib.Path(a.proto_root))
    stub = rpc.FilterDbStub(grpc.insecure_channel(a.server))

    census = stub.Census(pb.CensusRequest(group_by=[pb.FIELD_TASK]))
    t = census.total
    print(f"OK census models={t.models} layers={t.layers} filters={t.filters}")
    for g in census.groups:
        print("group", list(g.key), g.models, g.layers, g.filters)
    assert sum(g.filters for g in census.groups) == t.filters

    req = pb.GetFiltersRequest(model=pb.ModelFilters(model=pb.ModelRef(name=a.model)), batch_size=50)
    ids, chunks = [], []
    for batch in stub.GetFilters(req):
        ids.extend(range(batch.first_filter_id, batch.first_filter_id + batch.count))
        chunks.append(np.frombuffer(batch.kernels, dtype="<f4").reshape(-1, 9))
    got = np.concatenate(chunks)
    want = np.fromfile(a.expected, dtype="<f4").reshape(-1, 9)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), "kernels differ"
    assert ids == list(range(ids[0], ids[0] + len(ids))), "filter ids not consecutive"
    # A second computation of a statistic the server keeps: Σf over the model's first layer.
    layers = stub.ListLayers(pb.ListLayersRequest(model=pb.ModelRef(name=a.model))).layers
    first = layers[0]
    np_sum = want[: first.n_filters].astype(np.float64).sum(axis=0)
    assert np.allclose(np.array(first.stats.sum), np_sum, rtol=0, atol=1e-9), (first.stats.sum, np_sum)
    print(f"OK filters {len(got)} bit-exact")


if __name__ == "__main__":
    main()
