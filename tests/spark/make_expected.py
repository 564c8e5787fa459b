"""Writes the JSON of expected values that spark_check.py compares Spark's answers with.

Usage: make_expected.py --census CENSUS.json --layers SNAPSHOT/layers.parquet > expected.json

CENSUS.json is the server's answer, `filterdb --json census --group-by task`; the per-task means
of the 9 kernel values are the server's stored per-layer statistics (`sum` and `n` columns of
layers.parquet, float64), merged per task: mean = sum(sum) / sum(n). No Rust and no Spark here:
needs pyarrow (the project venv has it).
"""
import argparse
import json
import sys

import pyarrow.parquet as pq


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--census", required=True)
    ap.add_argument("--layers", required=True)
    a = ap.parse_args()
    census = json.load(open(a.census))
    if census.get("group_by") != ["task"]:
        sys.exit(f"{a.census}: expected `filterdb --json census --group-by task`, got group_by {census.get('group_by')}")
    t = pq.read_table(a.layers, columns=["task", "n", "sum"]).to_pylist()
    sums, ns = {}, {}
    for r in t:
        task = r["task"]
        if r["sum"] is None or r["n"] == 0:
            continue
        s = sums.setdefault(task, [0.0] * 9)
        for i in range(9):
            s[i] += r["sum"][i]
        ns[task] = ns.get(task, 0) + r["n"]
    out = {
        "census": {
            g["key"]["task"]: {"models": g["models"], "layers": g["layers"], "filters": g["filters"]}
            for g in census["groups"]
        },
        "total": census["total"],
        "n": ns,
        "means": {task: [v / ns[task] for v in s] for task, s in sums.items()},
    }
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
