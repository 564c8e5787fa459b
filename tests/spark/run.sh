#!/usr/bin/env bash
# Starts a standalone Apache Spark cluster on loopback (one master, two workers with 1 core and
# 1 GiB each), runs spark_check.py against it on a FilterDB snapshot, and stops every process it
# started (also on failure or Ctrl-C).
#
#   tests/spark/run.sh SNAPSHOT_DIR EXPECTED_JSON
#
# EXPECTED_JSON comes from make_expected.py (the server's census per task and per-task means;
# see README.md). Needs Java 17+ on PATH and pip access the first time: pyspark (pinned in
# requirements.txt) is taken from $FILTERDB_SPARK_PYTHON or $FILTERDB_PYTHON, or installed into
# $FILTERDB_SPARK_VENV (default /var/cache/filterdb/spark-venv). The master listens on
# 127.0.0.1:$FILTERDB_SPARK_PORT (default
# 7077); web UIs are on random ports. Exit status: 0 all checks passed, 2 missing prerequisite,
# anything else a failed check or a cluster that did not come up.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ $# -ne 2 ]; then
  echo "usage: $0 SNAPSHOT_DIR EXPECTED_JSON" >&2
  exit 2
fi
snapshot="$(cd "$1" && pwd)"
expected="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"
if ! command -v java >/dev/null 2>&1; then
  echo "run.sh: java not found on PATH: Spark needs a JDK/JRE 17 or newer (apt-get install openjdk-17-jre-headless)" >&2
  exit 2
fi

# The Python with pyspark: $FILTERDB_SPARK_PYTHON, else $FILTERDB_PYTHON (the project venv that
# .ci/run creates) when it has pyspark, else a venv of its own, created on first use.
t0=$(date +%s.%N)
if [ -n "${FILTERDB_SPARK_PYTHON:-}" ]; then
  py="$FILTERDB_SPARK_PYTHON"
elif [ -n "${FILTERDB_PYTHON:-}" ] && "$FILTERDB_PYTHON" -c 'import pyspark' >/dev/null 2>&1; then
  py="$FILTERDB_PYTHON"
else
  venv="${FILTERDB_SPARK_VENV:-/var/cache/filterdb/spark-venv}"
  if ! "$venv/bin/python" -c 'import pyspark' >/dev/null 2>&1; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$here/requirements.txt"
  fi
  py="$venv/bin/python"
fi
want="$(sed -n 's/^pyspark==//p' "$here/requirements.txt")"
have="$("$py" -c 'import pyspark; print(pyspark.__version__)')"
if [ "$have" != "$want" ]; then
  echo "run.sh: $py has pyspark $have, tests/spark/requirements.txt pins $want" >&2
  exit 2
fi
t1=$(date +%s.%N)
spark_home="$("$py" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')"
port="${FILTERDB_SPARK_PORT:-7077}"
master="spark://127.0.0.1:$port"

work="$(mktemp -d "${TMPDIR:-/tmp}/filterdb-spark.XXXXXX")"
pids=()
cleanup() {
  local st=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  if [ "$st" -ne 0 ]; then
    for f in "$work"/*.log; do echo "---- $f (tail)" >&2; tail -n 30 "$f" >&2 || true; done
  fi
  rm -rf "$work"
  exit "$st"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

export SPARK_HOME="$spark_home"
export SPARK_LOCAL_IP=127.0.0.1
export SPARK_LOCAL_DIRS="$work/local"
export SPARK_LOG_DIR="$work"
export SPARK_DAEMON_MEMORY=512m
export PYSPARK_PYTHON="$py"
export PYSPARK_DRIVER_PYTHON="$py"
mkdir -p "$SPARK_LOCAL_DIRS"
# spark-class execs java, so each pid below is the JVM itself.
"$spark_home/bin/spark-class" org.apache.spark.deploy.master.Master \
  --host 127.0.0.1 --port "$port" --webui-port 0 >"$work/master.log" 2>&1 &
pids+=($!)
for _ in $(seq 120); do
  if grep -q "I have been elected leader" "$work/master.log"; then break; fi
  kill -0 "${pids[0]}" 2>/dev/null || { echo "run.sh: the Spark master exited (port $port taken?)" >&2; exit 1; }
  sleep 0.5
done
grep -q "I have been elected leader" "$work/master.log" || { echo "run.sh: the Spark master did not start" >&2; exit 1; }
for w in 1 2; do
  "$spark_home/bin/spark-class" org.apache.spark.deploy.worker.Worker "$master" \
    --host 127.0.0.1 --cores 1 --memory 1g --webui-port 0 --work-dir "$work/worker$w" \
    >"$work/worker$w.log" 2>&1 &
  pids+=($!)
done
for _ in $(seq 120); do
  n=$(grep -c "Registering worker" "$work/master.log" || true)
  [ "$n" -ge 2 ] && break
  sleep 0.5
done
[ "$(grep -c "Registering worker" "$work/master.log" || true)" -ge 2 ] || { echo "run.sh: the workers did not register" >&2; exit 1; }
t2=$(date +%s.%N)

"$py" "$here/spark_check.py" --master "$master" --snapshot "$snapshot" --expected "$expected" --executors 2
t3=$(date +%s.%N)
awk -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" \
  'BEGIN { printf "OK timing: pyspark venv %.1f s, cluster start %.1f s, driver job %.1f s\n", b - a, c - b, d - c }'
