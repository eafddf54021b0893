#!/usr/bin/env bash
# Investigation-package quota benchmark: a backfill drains a backlog of investigation packages
# (getPackageUri: 2 per minute, 120 per hour) alongside live-response results through the
# simulator, windows shrunk, and reports, from the simulator's own request log: results and
# packages archived, 429s, and for the `machineactions.packageuri` key the perfect-governor
# time ratio = (time a perfect governor needs for the same number of getPackageUri calls,
# each placed at the first moment both server windows allow) / (time lrvault took, first to
# last call). Goal: >= 97 % with 0 x 429.
#
# Usage: bench/quota_packages.sh [HOUR_SECS] [PACKAGES] [ACTIONS]
#        (defaults 120, 150 and 200; run from the repo; BIN=target/debug/lrvault skips the
#        release build)
set -euo pipefail
cd "$(dirname "$0")/.."
HOUR=${1:-120}
PACKAGES=${2:-150}
ACTIONS=${3:-200}
MINUTE=$(python3 -c "print($HOUR/60)")
OUT=$PWD/bench/out/quota-packages-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
if [ -z "${BIN:-}" ]; then
  cargo build --locked --release -q
  BIN=target/release/lrvault
fi

. bench/lib.sh
start_sim lrvault --actions "$ACTIONS" --packages "$PACKAGES" --package-size 262144 --seed 7 \
  --spread 20h --minute-secs "$MINUTE" --hour-secs "$HOUR" --max-getfile-size 2048 \
  --request-log "$OUT/requests.jsonl"
write_config "$OUT/lrvault.toml" "[quota]
minute_secs = $MINUTE
hour_secs = $HOUR
[download]
concurrency = 4"
# The simulator links packages to the other loopback name.
sed -i 's/^download_hosts = \["127.0.0.1"\]$/download_hosts = ["127.0.0.1", "localhost"]/' "$OUT/lrvault.toml"
trap 'kill "$SIM_PID" 2>/dev/null || true' EXIT
"$BIN" --config "$OUT/lrvault.toml" -q migrate >/dev/null
echo "draining $PACKAGES packages and the results of $ACTIONS live-response actions (minute ${MINUTE}s, hour ${HOUR}s)"
START=$(date +%s.%N)
"$BIN" --config "$OUT/lrvault.toml" -q backfill --since 3d >"$OUT/lrvault.out"
END=$(date +%s.%N)
stop_sim

python3 - "$OUT/requests.jsonl" "$OUT/lrvault.db" "$MINUTE" "$HOUR" "$START" "$END" <<'PY' | tee "$OUT/report.txt"
import json, sqlite3, sys
from collections import deque

path, db, minute, hour, start, end = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
reqs = [json.loads(l) for l in open(path)]
calls = sorted(r["t_ms"] for r in reqs if r["endpoint"] == "packageuri" and r["status"] != 429)
links = [r for r in reqs if r["endpoint"] == "link" and r["status"] != 429]
throttled = {e: sum(1 for r in reqs if r["endpoint"] == e and r["status"] == 429) for e in ("packageuri", "link")}

def perfect(n, per_min=2, per_hour=120):
    """Span from the first to the n-th call when each call goes at the first moment the
    server's windows (`t_j - t_i < window`) admit it."""
    m, h = minute * 1000, hour * 1000
    in_m, in_h, t = deque(), deque(), 0.0
    for _ in range(n):
        while True:
            while in_m and t - in_m[0] >= m: in_m.popleft()
            while in_h and t - in_h[0] >= h: in_h.popleft()
            nxt = t
            if len(in_m) >= per_min: nxt = max(nxt, in_m[-per_min] + m)
            if len(in_h) >= per_hour: nxt = max(nxt, in_h[-per_hour] + h)
            if nxt == t: break
            t = nxt
        in_m.append(t); in_h.append(t)
    return t

def max_in(times, w):
    best, j = 0, 0
    for i in range(len(times)):
        while times[i] - times[j] >= w: j += 1
        best = max(best, i - j + 1)
    return best

con = sqlite3.connect(db)
pk = con.execute("select count(*) from evidence e join results r using (tenant, action_id, command_index) where r.command_type = 'InvestigationPackage'").fetchone()[0]
lr = con.execute("select count(*) from evidence").fetchone()[0] - pk
ideal = perfect(len(calls))
actual = calls[-1] - calls[0]
print(f"packages archived {pk}, live-response results archived {lr}, wall {end - start:.1f} s")
print(f"429s: packageuri {throttled['packageuri']}, link {throttled['link']}")
print(f"getPackageUri calls {len(calls)}: first to last {actual / 1000:.2f} s, perfect governor {ideal / 1000:.2f} s, "
      f"ratio {ideal / actual:.1%}; most in any minute window {max_in(calls, minute * 1000)} (limit 2), "
      f"in any hour window {max_in(calls, hour * 1000)} (limit 120)")
print(f"result links {len(links)}, last one at {max(r['t_ms'] for r in links) / 1000:.2f} s after the simulator started")
PY
echo "(raw data in $OUT)"
