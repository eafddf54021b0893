#!/usr/bin/env bash
# Quota utilisation benchmark: drains a backlog of more than three "hour" windows' worth of
# results through the simulator (windows shrunk), then reports results archived, 429s and
# utilisation per full window = link calls admitted in the window / configured per-hour limit,
# counted from the simulator's own request log. The same backlog is then drained by a
# reference client written the way public MDE scripts do it (call, and on 429 sleep
# Retry-After), against a fresh simulator, for a side-by-side comparison.
#
# Usage: bench/quota.sh [HOUR_SECS] [ACTIONS]     (defaults 60 and 3600; run from the repo)
set -euo pipefail
cd "$(dirname "$0")/.."
HOUR=${1:-60}
ACTIONS=${2:-3600}
MINUTE=$(python3 -c "print($HOUR/60)")
OUT=$PWD/bench/out/quota-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
cargo build --locked --release -q
BIN=target/release/lrvault

. bench/lib.sh
SIM_FLAGS=(--actions "$ACTIONS" --seed 5 --spread 2d --per-minute 100 --per-hour 1500
  --minute-secs "$MINUTE" --hour-secs "$HOUR" --max-getfile-size 2048)

# --- lrvault -----------------------------------------------------------------------------
start_sim lrvault "${SIM_FLAGS[@]}" --request-log "$OUT/lrvault.requests.jsonl"
write_config "$OUT/lrvault.toml" "[quota]
per_minute = 95
per_hour = 1450
minute_secs = $MINUTE
hour_secs = $HOUR
[download]
concurrency = 4"
echo "lrvault: draining (windows: minute ${MINUTE}s, hour ${HOUR}s; limits 95/1450, server 100/1500)"
START=$(date +%s.%N)
/usr/bin/time -f "%M" -o "$OUT/lrvault.maxrss" "$BIN" --config "$OUT/lrvault.toml" -q backfill --since 3d >"$OUT/lrvault.out"
END=$(date +%s.%N)
stop_sim
ARCHIVED=$(sqlite3 "$OUT/lrvault.db" "select count(*) from evidence")

# --- reference client ------------------------------------------------------------------
start_sim reference "${SIM_FLAGS[@]}" --request-log "$OUT/reference.requests.jsonl"
echo "reference: draining the same backlog (greedy, sleeps Retry-After on 429)"
RSTART=$(date +%s.%N)
python3 bench/reference_client.py "$BASE" "$TENANT_ID" "$CLIENT_ID" sim-secret-0 "$OUT/reference-files" >"$OUT/reference.out"
REND=$(date +%s.%N)
stop_sim

python3 bench/utilisation.py "$HOUR" 1450 \
  "lrvault:$OUT/lrvault.requests.jsonl:$ARCHIVED:$(python3 -c "print(round($END-$START,1))")" \
  "reference:$OUT/reference.requests.jsonl:$(cat "$OUT/reference.out"):$(python3 -c "print(round($REND-$RSTART,1))")" \
  | tee "$OUT/report.txt"
echo "lrvault peak RSS: $(cat "$OUT/lrvault.maxrss") KiB" | tee -a "$OUT/report.txt"
echo "(raw data in $OUT)"
