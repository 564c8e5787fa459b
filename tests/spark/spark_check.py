"""Reads a FilterDB snapshot with Apache Spark (a standalone cluster, or any master URL) and
checks the census per task (models, layers, filters) and the per-task means of the 9 kernel
values against the server's answers (expected.json from make_expected.py), and that a task
filter prunes partitions (PartitionFilters in the plan, and fewer files scanned).

Usage: spark_check.py --master spark://127.0.0.1:7077 --snapshot DIR --expected expected.json
       [--executors 2]

Prints "OK ..." lines (the Rust end-to-end test looks for them); exits non-zero on a mismatch.
Means are compared with a float64 tolerance of 1e-9 relative to max(|mean|, mean |value|): a sum
of n doubles in another order differs by about n * 1e-16 times the sum of |values|, so a
tolerance relative to the mean alone would fail on means near zero for no reason.
"""
import argparse
import contextlib
import io
import json
import math
import pathlib
import re
import sys
import time

REL_TOL = 1e-9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--master", required=True)
    ap.add_argument("--snapshot", required=True)
    ap.add_argument("--expected", required=True)
    ap.add_argument("--executors", type=int, default=2)
    a = ap.parse_args()

    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    snap = pathlib.Path(a.snapshot).resolve()
    manifest = json.loads((snap / "manifest.json").read_text())
    expected = json.loads(pathlib.Path(a.expected).read_text())
    assert manifest["partition_keys"] == ["task", "visual_category"], manifest

    t0 = time.time()
    spark = (
        SparkSession.builder.master(a.master)
        .appName("filterdb-spark-check")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.executor.cores", "1")
        .config("spark.executor.memory", "768m")
        .config("spark.cores.max", str(a.executors))
        .config("spark.sql.shuffle.partitions", "4")
        # Partition values are labels: keep them strings ("2" stays "2").
        .config("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
        # A plain physical plan, so the scan's metrics are readable after the query.
        .config("spark.sql.adaptive.enabled", "false")
        .getOrCreate()
    )
    sc = spark.sparkContext
    sc.setLogLevel("WARN")
    # Wait until every executor has registered (the status map includes the driver).
    deadline = time.time() + 120
    while sc._jsc.sc().getExecutorMemoryStatus().size() < a.executors + 1:
        if time.time() > deadline:
            sys.exit(f"only {sc._jsc.sc().getExecutorMemoryStatus().size() - 1} of {a.executors} executors registered")
        time.sleep(0.5)
    print(f"OK cluster {a.master}: {a.executors} executors after {time.time() - t0:.1f} s")

    df = spark.read.parquet(str(snap / "filters"))
    fields = {f.name: f.dataType.simpleString() for f in df.schema.fields}
    assert fields.get("task") == "string" and fields.get("visual_category") == "string", fields
    assert fields.get("kernel") == "array<float>", fields

    # --- Census per task.
    rows = (
        df.groupBy("task")
        .agg(
            F.countDistinct("model_id").alias("models"),
            F.countDistinct("layer_id").alias("layers"),
            F.count(F.lit(1)).alias("filters"),
        )
        .collect()
    )
    got = {r["task"]: {"models": r["models"], "layers": r["layers"], "filters": r["filters"]} for r in rows}
    want = {t: c for t, c in expected["census"].items() if c["filters"] > 0}
    assert got == want, f"census differs:\nspark  {got}\nserver {want}"
    total = sum(c["filters"] for c in got.values())
    assert total == expected["total"]["filters"] == manifest["rows"]["filters"], (total, expected["total"], manifest["rows"])
    print(f"OK spark census {len(got)} tasks, {total} filters")

    # --- Per-task means of the 9 kernel values (float64 accumulation).
    k = [F.col("kernel")[i].cast("double") for i in range(9)]
    aggs = [F.count(F.lit(1)).alias("n")]
    aggs += [F.avg(k[i]).alias(f"m{i}") for i in range(9)]
    aggs += [F.avg(F.abs(k[i])).alias(f"a{i}") for i in range(9)]
    worst = 0.0
    for r in df.groupBy("task").agg(*aggs).collect():
        task = r["task"]
        assert r["n"] == expected["n"][task], (task, r["n"], expected["n"][task])
        for i in range(9):
            got_m, want_m = r[f"m{i}"], expected["means"][task][i]
            scale = max(abs(want_m), r[f"a{i}"])
            err = abs(got_m - want_m) / scale if scale > 0 else abs(got_m - want_m)
            worst = max(worst, err)
            assert err <= REL_TOL, f"{task} mean w{i}: spark {got_m!r}, server {want_m!r} (rel err {err:.3g})"
    print(f"OK spark means {len(expected['means'])} tasks x 9, worst relative error {worst:.3g}")

    # --- Partition pruning: the plan carries the task predicate as a partition filter, and the
    # scan lists only that task's files.
    task = max(got, key=lambda t: (got[t]["filters"] < total, got[t]["filters"]))
    q = df.where(F.col("task") == task).agg(F.count(F.lit(1)).alias("n"))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        q.explain()
    plan = buf.getvalue()
    m = re.search(r"PartitionFilters: \[([^\]]*)\]", plan)
    assert m and task in m.group(1), f"no partition filter on task in:\n{plan}"
    n = q.collect()[0]["n"]
    assert n == got[task]["filters"], (n, got[task])
    scan = q._jdf.queryExecution().executedPlan().collectLeaves().apply(0)
    files_read = scan.metrics().apply("numFiles").value()
    all_files = sum(1 for f in manifest["files"] if f["path"].startswith("filters/"))
    task_files = sum(1 for f in manifest["files"] if f["path"].startswith(f"filters/task={quote(task)}/"))
    assert files_read == task_files < all_files, (files_read, task_files, all_files)
    print(f"OK spark pruning task = {task}: {files_read}/{all_files} files, PartitionFilters: [{m.group(1)}]")
    spark.stop()
    print(f"OK spark done in {time.time() - t0:.1f} s")


def quote(v):
    """The server's hive value encoding (percent-encoding outside [A-Za-z0-9._-])."""
    if v == "":
        return "__HIVE_DEFAULT_PARTITION__"
    return "".join(c if (c.isascii() and (c.isalnum() or c in "._-")) else "".join(f"%{b:02X}" for b in c.encode()) for c in v)


if __name__ == "__main__":
    main()
