#!/usr/bin/env bash
# Many tenants on one host (issue 18): for each N in TENANTS (default 10 50 200), the built-in
# simulator serves N tenants x 10 actions (small payloads); lrvault runs one `discover` and one
# `archive` pass with download.concurrency = 8, and the script prints, for that pass:
#   wall time, peak RSS, peak thread count (sampled every 20 ms from /proc), and the p50 / p95
#   wait for each tenant's first package (its first ARCHIVED row, from the pass's start).
#
# Usage: bench/tenants.sh [N...]        BIN=path/to/lrvault compares another build (e.g. an
# older release: its `archive` and `discover` run against this build's simulator).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --release -q
SIM_BIN=$PWD/target/release/lrvault
BIN=${BIN:-$SIM_BIN}
CONCURRENCY=${CONCURRENCY:-8}
TENANTS=("$@")
[ ${#TENANTS[@]} -gt 0 ] || TENANTS=(10 50 200)

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

printf '%-8s %-10s %-10s %-9s %-8s %-14s %-14s\n' tenants archived wall_s rss_MiB threads first_p50_s first_p95_s
for N in "${TENANTS[@]}"; do
  OUT=$PWD/bench/out/tenants-$N-$(date +%Y%m%d-%H%M%S)
  mkdir -p "$OUT"
  PORT=$(free_port)
  "$SIM_BIN" simulate --listen "127.0.0.1:$PORT" --tenants "$N" --actions 10 \
    --max-getfile-size 65536 --write-config "$OUT" >"$OUT/sim.log" 2>&1 &
  SIM=$!
  trap 'kill $SIM 2>/dev/null || true' EXIT
  for _ in $(seq 1 200); do
    grep -q "^config for" "$OUT/sim.log" 2>/dev/null && break
    sleep 0.05
  done
  printf '\n[download]\nconcurrency = %d\n' "$CONCURRENCY" >>"$OUT/lrvault.toml"
  "$BIN" --config "$OUT/lrvault.toml" -q migrate >/dev/null
  "$BIN" --config "$OUT/lrvault.toml" -q discover >"$OUT/discover.out" 2>&1
  START=$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)
  T0=$(date +%s.%N)
  /usr/bin/time -f "%M" -o "$OUT/archive.rss" "$BIN" --config "$OUT/lrvault.toml" -q archive \
    >"$OUT/archive.out" 2>&1 &
  TIMER=$!
  PEAK_THREADS=0
  while kill -0 "$TIMER" 2>/dev/null; do
    CHILD=$(pgrep -P "$TIMER" | head -1 || true)
    if [ -n "$CHILD" ] && [ -r "/proc/$CHILD/status" ]; then
      T=$(awk '/^Threads:/ {print $2}' "/proc/$CHILD/status" 2>/dev/null || echo 0)
      [ "${T:-0}" -gt "$PEAK_THREADS" ] && PEAK_THREADS=$T
    fi
    sleep 0.02
  done
  wait "$TIMER" || true
  T1=$(date +%s.%N)
  kill $SIM 2>/dev/null || true
  wait $SIM 2>/dev/null || true
  python3 - "$OUT/lrvault.db" "$START" "$T0" "$T1" "$(cat "$OUT/archive.rss")" "$PEAK_THREADS" "$N" <<'PY'
import sqlite3, sys
from datetime import datetime
db, start, t0, t1, rss_kib, threads, n = sys.argv[1:]
parse = lambda s: datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ")
c = sqlite3.connect(db)
firsts = [(parse(at) - parse(start)).total_seconds() for (at,) in c.execute(
    "SELECT min(at) FROM custody_log WHERE event = 'ARCHIVED' GROUP BY tenant")]
archived = c.execute("SELECT count(*) FROM custody_log WHERE event = 'ARCHIVED'").fetchone()[0]
firsts.sort()
pct = lambda p: firsts[min(len(firsts) - 1, int(p * len(firsts)))] if firsts else float("nan")
print(f"{n:<8} {archived:<10} {float(t1) - float(t0):<10.1f} {int(rss_kib) / 1024:<9.0f} {threads:<8} "
      f"{pct(0.5):<14.1f} {pct(0.95):<14.1f}  ({len(firsts)} tenants with a package)")
PY
done
