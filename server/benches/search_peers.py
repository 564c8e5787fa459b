"""The peers of the search benchmark (server/benches/search.rs), in the same run.

Usage: search_peers.py PARAMS.json          -> JSON on stdout: DuckDB and FAISS results
       search_peers.py --plot CURVES.json OUT.png

DuckDB 2.0.0 (SET threads = 2): `ORDER BY distance, filter_id LIMIT k` over the Parquet file,
with the selection as a WHERE clause; a few queries per selection, best of 2 each; its ids are
compared with FilterDB's exact answers (the ground truth).

FAISS (faiss-cpu, 2 OpenMP threads): IndexIVFFlat(L2, nlist) trained on 64 * nlist vectors,
all vectors added with their filter ids; filtered search with an IDSelectorBitmap of the
selection (SearchParametersIVF(sel=..., nprobe=...)); nprobe swept; recall@k against the same
ground truth; QPS over the whole query batch (one search call, as FAISS is meant to be used).
"""

import json
import sys
import time

import numpy as np


def duckdb_part(p):
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads = 2")
    path = f"{p['dir']}/filters.parquet"
    out = []
    for sel in p["selections"]:
        where = f"WHERE {sel['expr']}" if sel["expr"] else ""
        times, agree = [], 0
        nq = min(3, len(p["queries"]))
        for qi in range(nq):
            q = p["queries"][qi]
            dist = " + ".join(f"(CAST(w{j} AS DOUBLE) - {float(np.float32(q[j]))!r})^2" for j in range(9))
            sql = f"SELECT filter_id, {dist} AS d FROM read_parquet('{path}') {where} ORDER BY d, filter_id LIMIT {p['k']}"
            best = float("inf")
            for _ in range(2):
                t = time.perf_counter()
                rows = con.execute(sql).fetchall()
                best = min(best, time.perf_counter() - t)
            times.append(best)
            if [r[0] for r in rows] == sel["truth"][qi]:
                agree += 1
        out.append({"label": sel["label"], "ms": 1e3 * float(np.mean(times)), "agree": f"{agree}/{nq}"})
        print(f"duckdb {sel['label']}: {out[-1]['ms']:.0f} ms/query, ids agree {agree}/{nq}", file=sys.stderr)
    return out


def faiss_part(p):
    import faiss

    faiss.omp_set_num_threads(2)
    n = p["n"]
    x = np.fromfile(f"{p['dir']}/vectors.f32", dtype=np.float32).reshape(n, 9)
    nlist = p["nlist"]
    t = time.perf_counter()
    quantizer = faiss.IndexFlatL2(9)
    index = faiss.IndexIVFFlat(quantizer, 9, nlist)
    rng = np.random.default_rng(0)
    train = x[rng.choice(n, size=min(n, 64 * nlist), replace=False)]
    index.train(train)
    index.add_with_ids(x, np.arange(n, dtype=np.int64))
    build_s = time.perf_counter() - t
    print(f"faiss IVF{nlist},Flat built in {build_s:.1f} s", file=sys.stderr)
    del x
    q = np.asarray(p["queries"], dtype=np.float32)
    k = p["k"]
    out = []
    for sel in p["selections"]:
        bitmap = np.zeros((n + 7) // 8, dtype=np.uint8)
        mask = np.zeros(n, dtype=bool)
        for a, b in sel["ranges"]:
            mask[a:b] = True
        bitmap = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap))
        truth = sel["truth"]
        points = []
        for nprobe in p["nprobes"]:
            if nprobe > nlist:
                break
            params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe) if sel["expr"] else faiss.SearchParametersIVF(nprobe=nprobe)
            # Best of three 300 ms windows, as on the FilterDB side (see `qps` in search.rs).
            qps = 0.0
            for _ in range(3):
                t = time.perf_counter()
                reps = 0
                while True:
                    _, ids = index.search(q, k, params=params)
                    reps += 1
                    if time.perf_counter() - t >= 0.3:
                        break
                qps = max(qps, reps * len(q) / (time.perf_counter() - t))
            hits = sum(len(set(ids[i][ids[i] >= 0].tolist()) & set(truth[i])) for i in range(len(q)))
            recall = hits / max(1, sum(len(tr) for tr in truth))
            points.append({"nprobe": nprobe, "recall": recall, "qps": qps})
            print(f"faiss {sel['label']} nprobe {nprobe}: recall@10 {recall:.3f}, {qps:.0f} QPS", file=sys.stderr)
            if recall >= 0.999:
                break
        out.append({"label": sel["label"], "points": points})
    return out, build_s, (36 + 8)


def plot(curves_path, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = json.load(open(curves_path))
    labels = [s["label"] for s in c["filterdb"]]
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.8), sharey=False)
    for ax, ours, theirs in zip(axes, c["filterdb"], c["faiss"] or [None] * len(labels)):
        # Scaled and unscaled points are one curve of cells probed.
        pts = sorted(ours["points"], key=lambda p: p.get("nprobe_used") or p["nprobe"])
        r = [p["recall"] for p in pts]
        q = [p["qps"] for p in pts]
        ax.plot(r, q, "o-", label="FilterDB approximate")
        if theirs:
            ax.plot([p["recall"] for p in theirs["points"]], [p["qps"] for p in theirs["points"]], "s--", label="FAISS IVF + IDSelector")
        ax.axvline(0.95, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("recall@10")
        ax.set_title(f"selectivity {ours['label']}")
        ax.grid(True, which="both", lw=0.3)
    axes[0].set_ylabel("queries per second (2 cores)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Filtered 10-NN over {c['n']:,} 3x3 filters")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    if sys.argv[1] == "--plot":
        plot(sys.argv[2], sys.argv[3])
        return
    p = json.load(open(sys.argv[1]))
    duck = duckdb_part(p)
    faiss_curves, build_s, bpf = faiss_part(p)
    json.dump({"duckdb": duck, "faiss": faiss_curves, "faiss_build_s": build_s, "faiss_bytes_per_filter": bpf}, sys.stdout)


if __name__ == "__main__":
    main()
