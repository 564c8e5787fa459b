#!/usr/bin/env python3
"""DuckDB companion of `benches/analytics.rs` (issue 3).

Computes, from the bench's Parquet export (one row per filter: filter_id, model, layer_id, task,
visual_category, conv_depth, conv_depth_norm, w0..w8 float32), the same answers the server gives,
with DuckDB (`SET threads=2`) for the scan and numpy for the small post-processing:

- census: models, layers and filters per task;
- basis: per visual category, count, Σ f̃ and the 45 Σ f̃_i f̃_j of the L∞-scaled filters
  (f̃ = f / max_j |f_j| in float64, an all-zero filter stays zero), then the covariance and
  numpy `eigh` -> mean, components (largest-|loading| entry positive) and EVR;
- quality: per layer, n, max |w|, Σ f and Σ f_i f_j of the raw filters (float64), then the
  strict sparse count at ε (all |f_j| < ε · layer max |w|, threshold 1 for an all-zero layer) in a
  second pass joined on the layer max, and the variance entropy H (log10) from numpy `eigvalsh`
  of the covariance (eigenvalues ≤ 1e-10 · tr(Σ f fᵀ)/(n−1) count as 0, as the server does);
- drift: coefficients c = Vᵀ(f̃ − μ) in the pinned basis (f̃ rounded to float32 as the server's
  histograms do, products summed left to right in float64), binned with numpy.histogram's rule
  (70 equal bins over [range_min, range_max], ±1-ULP edge fix-up, last bin right-inclusive)
  in SQL, counted per task and component with GROUPING SETS; then density -> empty bins set to
  float32 eps (density units) -> renormalise -> Jeffreys KL, summed with EVR weights.

Each answer is timed end to end (SQL + numpy), best of `repeats` (3). With `validate_bins` the
SQL binning is cross-checked against numpy.histogram on the coefficients.

Usage: analytics_duckdb.py PARAMS.json   (written by the bench). Prints one JSON object.
"""

import json
import sys
import time

import duckdb
import numpy as np

W = [f"w{j}" for j in range(9)]
PAIRS = [(i, j) for i in range(9) for j in range(i, 9)]


def log(msg):
    print(f"[duckdb] {msg}", file=sys.stderr, flush=True)


def dbl(x):
    """An exact DOUBLE literal (a plain decimal literal would be parsed as DECIMAL)."""
    return f"CAST('{float(x)!r}' AS DOUBLE)"


def maxabs(prefix=""):
    """max_j |w_j| of a row, as FLOAT (exact)."""
    return "greatest(" + ", ".join(f"abs({prefix}{w})" for w in W) + ")"


def sym(cols, prefix):
    """(L, 9, 9) symmetric matrices from the 45 upper-triangle columns of fetchnumpy()."""
    n = len(cols[f"{prefix}0_0"])
    P = np.zeros((n, 9, 9))
    for i, j in PAIRS:
        v = np.asarray(cols[f"{prefix}{i}_{j}"], dtype=np.float64)
        P[:, i, j] = v
        P[:, j, i] = v
    return P


def sums_sql(src):
    s = ", ".join(f"sum({src}{j}) AS s{j}" for j in range(9))
    p = ", ".join(f"sum({src}{i} * {src}{j}) AS p{i}_{j}" for i, j in PAIRS)
    return f"{s}, {p}"


# ---------------------------------------------------------------------------------------------


def census(con, prm):
    rows = con.execute(
        "SELECT task, count(DISTINCT model), count(DISTINCT layer_id), count(*) FROM t GROUP BY task"
    ).fetchall()
    return {k: {"models": int(m), "layers": int(l), "filters": int(n)} for k, m, l, n in rows}


def basis(con, prm):
    xs = ", ".join(f"{w}::DOUBLE AS x{j}" for j, w in enumerate(W))
    scaled = ", ".join(f"CASE WHEN m > 0 THEN x{j} / m ELSE x{j} END AS f{j}" for j in range(9))
    sql = f"""
        WITH a AS (SELECT visual_category AS k, {maxabs()}::DOUBLE AS m, {xs} FROM t),
             s AS (SELECT k, {scaled} FROM a)
        SELECT k, count(*) AS n, {sums_sql('f')} FROM s GROUP BY k ORDER BY k"""
    cols = con.execute(sql).fetchnumpy()
    keys = [str(k) for k in cols["k"]]
    n = np.asarray(cols["n"], dtype=np.int64)
    S = np.stack([np.asarray(cols[f"s{j}"], dtype=np.float64) for j in range(9)], axis=1)
    P = sym(cols, "p")
    out = {}
    for g, key in enumerate(keys):
        ng = int(n[g])
        mean = S[g] / ng
        cov = (P[g] - np.outer(S[g], S[g]) / ng) / (ng - 1)
        vals, vecs = np.linalg.eigh(cov)
        order = np.argsort(vals)[::-1]
        vals = np.clip(vals[order], 0.0, None)
        comps = vecs[:, order].T.copy()
        for c in comps:
            top = int(np.argmax(np.abs(c)))
            if c[top] < 0:
                c *= -1.0
        total = vals.sum()
        evr = vals / total if total > 0 else np.zeros(9)
        out[key] = {"n": ng, "mean": mean.tolist(), "evr": evr.tolist(), "components": comps.reshape(-1).tolist()}
    return out


def quality(con, prm):
    eps = prm["sparsity_eps"]
    xs = ", ".join(f"{w}::DOUBLE AS x{j}" for j, w in enumerate(W))
    sql = f"""
        WITH agg AS (
            SELECT layer_id, count(*) AS n, max(m) AS lmax, {sums_sql('x')}
            FROM (SELECT layer_id, {maxabs()}::DOUBLE AS m, {xs} FROM t)
            GROUP BY layer_id),
        thr AS (
            SELECT layer_id, CASE WHEN lmax = 0 THEN {dbl(1.0)} ELSE {dbl(eps)} * lmax END AS th FROM agg),
        sp AS (
            SELECT t.layer_id, count(*) FILTER (WHERE {maxabs('t.')}::DOUBLE < thr.th) AS sparse
            FROM t JOIN thr ON t.layer_id = thr.layer_id
            GROUP BY t.layer_id)
        SELECT agg.*, sp.sparse FROM agg JOIN sp ON agg.layer_id = sp.layer_id ORDER BY agg.layer_id"""
    cols = con.execute(sql).fetchnumpy()
    ids = np.asarray(cols["layer_id"], dtype=np.int64)
    n = np.asarray(cols["n"], dtype=np.int64)
    sparse = np.asarray(cols["sparse"], dtype=np.int64)
    S = np.stack([np.asarray(cols[f"s{j}"], dtype=np.float64) for j in range(9)], axis=1)
    P = sym(cols, "p")
    entropy = [None] * len(ids)
    ok = n >= 2
    if ok.any():
        nn = n[ok].astype(np.float64)
        Sk, Pk = S[ok], P[ok]
        cov = (Pk - Sk[:, :, None] * Sk[:, None, :] / nn[:, None, None]) / (nn - 1.0)[:, None, None]
        vals = np.clip(np.linalg.eigvalsh(cov), 0.0, None)
        trace = np.trace(Pk, axis1=1, axis2=2)
        floor = 1e-10 * trace / (nn - 1.0)
        vals = np.where(vals <= floor[:, None], 0.0, vals)
        total = vals.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = vals / np.where(total > 0, total, 1.0)[:, None]
            terms = np.where(p > 0, p * np.log10(np.where(p > 0, p, 1.0)), 0.0)
        h = np.where(total > 0, -terms.sum(axis=1), 0.0)
        for idx, v in zip(np.nonzero(ok)[0], h):
            entropy[idx] = float(v)
    return {
        "layer_id": ids.tolist(),
        "n": n.tolist(),
        "sparse": sparse.tolist(),
        "entropy": entropy,
    }


def coefficient_sql(prm):
    """SELECT of (task, c0..c8): the server's projection of f32-rounded L∞-scaled filters."""
    mu = prm["mean"]
    V = np.asarray(prm["components"], dtype=np.float64).reshape(9, 9)
    d = ", ".join(
        f"CAST(CASE WHEN m > 0 THEN CAST({w}::DOUBLE / m::DOUBLE AS FLOAT) ELSE {w} END AS DOUBLE) - {dbl(mu[j])} AS d{j}"
        for j, w in enumerate(W)
    )
    # Left to right, as Rust's Iterator::sum: ((V0*d0 + V1*d1) + V2*d2) + ...
    c = ", ".join("(" + " + ".join(f"{dbl(V[k][j])} * d{j}" for j in range(9)) + f") AS c{k}" for k in range(9))
    return f"""
        WITH a AS (SELECT task, {maxabs()} AS m, {', '.join(W)} FROM t),
             d AS (SELECT task, {d} FROM a)
        SELECT task, {c} FROM d"""


def drift(con, prm):
    lo, hi, B = float(prm["range_min"]), float(prm["range_max"]), int(prm["bins"])
    span = hi - lo
    step = span / B
    LO, SPAN, STEP = dbl(lo), dbl(span), dbl(step)
    i0 = ", ".join(f"c{k}, least(CAST(trunc(((c{k} - {LO}) / {SPAN}) * {dbl(B)}) AS INTEGER), {B - 1}) AS i{k}" for k in range(9))
    i1 = ", ".join(f"c{k}, CASE WHEN c{k} < i{k} * {STEP} + {LO} THEN i{k} - 1 ELSE i{k} END AS j{k}" for k in range(9))
    b = ", ".join(
        f"CASE WHEN j{k} <> {B - 1} AND c{k} >= (j{k} + 1) * {STEP} + {LO} THEN j{k} + 1 ELSE j{k} END AS b{k}"
        for k in range(9)
    )
    sets = ", ".join(f"(task, b{k})" for k in range(9))
    sql = f"""
        WITH c AS ({coefficient_sql(prm)}),
             i AS (SELECT task, {i0} FROM c),
             j AS (SELECT task, {i1} FROM i),
             b AS (SELECT task, {b} FROM j)
        SELECT task, {', '.join(f'b{k}' for k in range(9))}, count(*) AS cnt
        FROM b GROUP BY GROUPING SETS ({sets})"""
    rows = con.execute(sql).fetchall()
    keys = sorted({r[0] for r in rows})
    index = {k: g for g, k in enumerate(keys)}
    counts = np.zeros((len(keys), 9, B), dtype=np.int64)
    for r in rows:
        g = index[r[0]]
        for k in range(9):
            if r[1 + k] is not None:
                counts[g, k, r[1 + k]] += r[10]
                break
    # numpy.histogram(density=True) from the counts, then the notebook's ε and renormalisation.
    edges = np.linspace(lo, hi, B + 1)
    widths = np.diff(edges)
    eps = np.finfo(np.float32).eps
    probs = np.zeros((len(keys), 9, B))
    for g in range(len(keys)):
        for k in range(9):
            n = counts[g, k].astype(np.float64)
            dens = n / widths / n.sum()
            dens[dens == 0] = eps
            probs[g, k] = dens / dens.sum()

    def kl(p, q):  # scipy.stats.entropy(p, q): normalise, then Σ p log(p/q)
        p = p / p.sum()
        q = q / q.sum()
        return float(np.sum(np.where(p > 0, p * np.log(p / q), 0.0)))

    evr = np.asarray(prm["evr"], dtype=np.float64)
    G = len(keys)
    D = np.zeros((G, G))
    for a in range(G):
        for c in range(a + 1, G):
            s = sum(evr[k] * (kl(probs[a, k], probs[c, k]) + kl(probs[c, k], probs[a, k])) for k in range(9))
            D[a, c] = D[c, a] = s
    return {"keys": keys, "d": D.reshape(-1).tolist(), "hist": counts.tolist(), "n": counts[:, 0].sum(axis=1).tolist()}, counts


def validate_bins(con, prm, counts, keys):
    """Cross-check of the SQL binning: numpy.histogram on the coefficients themselves."""
    lo, hi, B = float(prm["range_min"]), float(prm["range_max"]), int(prm["bins"])
    cols = con.execute(coefficient_sql(prm)).fetchnumpy()
    task = np.asarray(cols["task"]).astype(str)
    C = np.stack([np.asarray(cols[f"c{k}"], dtype=np.float64) for k in range(9)], axis=1)
    equal = True
    for g, key in enumerate(keys):
        sel = C[task == key]
        for k in range(9):
            h, _ = np.histogram(sel[:, k], bins=B, range=(lo, hi))
            if not np.array_equal(h, counts[g, k]):
                equal = False
                log(f"SQL bins differ from numpy.histogram for {key} component {k}")
    range_equal = bool(C.min() == lo and C.max() == hi)
    if not range_equal:
        log(f"coefficient range {C.min()!r}..{C.max()!r} differs from the server's {lo!r}..{hi!r}")
    return equal, range_equal, int(C.size)


def timed(name, fn, con, prm, repeats):
    times = []
    result = None
    for r in range(repeats):
        t = time.perf_counter()
        result = fn(con, prm)
        times.append(time.perf_counter() - t)
        log(f"{name}: run {r + 1}/{repeats} {times[-1]:.3f} s")
    return result, {"best_s": min(times), "runs_s": times}


def main():
    prm = json.load(open(sys.argv[1]))
    repeats = int(prm.get("repeats", 3))
    con = duckdb.connect()
    con.execute("SET threads=2")
    path = str(prm["parquet"]).replace("'", "''")
    con.execute(f"CREATE VIEW t AS SELECT * FROM read_parquet('{path}')")
    rows = con.execute("SELECT count(*) FROM t").fetchone()[0]
    log(f"duckdb {duckdb.__version__}, {rows} rows in {prm['parquet']}")
    out = {"duckdb_version": duckdb.__version__, "rows": int(rows), "timings": {}}
    out["census"], out["timings"]["census"] = timed("census", census, con, prm, repeats)
    out["basis"], out["timings"]["basis"] = timed("basis", basis, con, prm, repeats)
    out["quality"], out["timings"]["quality"] = timed("quality", quality, con, prm, repeats)
    (out["drift"], counts), out["timings"]["drift"] = timed("drift", drift, con, prm, repeats)
    if prm.get("validate_bins"):
        equal, range_equal, n = validate_bins(con, prm, counts, out["drift"]["keys"])
        out["bins_numpy_equal"] = equal
        out["coefficient_range_equal"] = range_equal
        if equal:
            out["bins_checked_with_numpy"] = n
        log(f"SQL binning vs numpy.histogram on {n} coefficients: {'equal' if equal else 'DIFFERENT'}; range equal: {range_equal}")
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
