#!/usr/bin/env bash
# Packaging benchmark (issue 11). In one run, from the simulator over loopback (release build):
#   - lrvault archiving a BIG incompressible payload without a server MD5, the same size with
#     Content-MD5, a TEXT payload, and a 200 MiB incompressible payload (for peak RSS);
#   - beside it, on the same link: curl > /dev/null, curl | openssl dgst -sha256, curl | md5sum;
#     and on the same bytes saved to a file: openssl dgst -sha256, md5sum, cat > /dev/null, and
#     gzip -6 (text payload only);
#   - a mixed workload: the BIG payload queued ahead of ~200 small results (120 actions); for the small
#     results whose link was issued while the big one streamed, the time from link to archived;
#   - 64 concurrent transfers: 64 incompressible payloads of BIG/64 bytes with
#     download.concurrency = 64; the process's peak thread count and peak RSS (from /proc).
# lrvault's time is the whole `archive` command: token, link, download, hashes, zip, fsync,
# re-check and commit. Prints ratios and lrvault's peak RSS (GNU time -v).
#
# The times the targets compare (lrvault's and the two `curl | …` pipelines) are medians of
# RUNS runs (default 3), after one untimed lrvault run: on a VM that hands freed memory back
# to its host (Firecracker's free page reporting here), the first writes into memory freed a
# while ago cost far more than the copy itself, and lrvault writes every byte it archives.
#
# Usage: bench/package.sh [BIG_BYTES] [TEXT_BYTES]   (defaults 2 GiB and 256 MiB; from the repo)
# STORE_DIR=DIR puts lrvault's evidence stores under DIR (default: beside the report, on disk;
# /dev/shm takes the disk out of lrvault's time, the references never write to disk but one).
set -euo pipefail
cd "$(dirname "$0")/.."
BIG=${1:-2147483648}
TEXT=${2:-268435456}
RUNS=${RUNS:-3}
SMALL=209715200
ROOT=$PWD/bench/out/package-$(date +%Y%m%d-%H%M%S)
mkdir -p "$ROOT"
[ -x /usr/bin/time ] && /usr/bin/time -v true >/dev/null 2>&1 || {
  apt-get update -qq && apt-get install -y -qq time >/dev/null
}
cargo build --locked --release -q
BIN=$PWD/target/release/lrvault
. bench/lib.sh
REPORT=$ROOT/report.txt

# secs CMD...: wall seconds of a shell command line.
secs() {
  local t0 t1
  t0=$(date +%s.%N)
  bash -c "$1" >/dev/null
  t1=$(date +%s.%N)
  python3 -c "print(round($t1 - $t0, 2))"
}

median() { python3 -c 'import statistics, sys; print(round(statistics.median(map(float, sys.argv[1:])), 2))' "$@"; }

# secs_median CMD: the median of RUNS runs of secs CMD.
secs_median() {
  local runs=()
  for _ in $(seq "$RUNS"); do runs+=("$(secs "$1")"); done
  median "${runs[@]}"
}

# lrvault_discover NAME: a fresh database and store for NAME, and its results queued.
lrvault_discover() {
  STORE_ROOT=${STORE_DIR:-$OUT}/$1-store
  rm -rf "$OUT/lrvault.db" "$OUT/lrvault.db-wal" "$OUT/lrvault.db-shm" "$STORE_ROOT"
  write_config "$OUT/lrvault.toml"
  "$BIN" --config "$OUT/lrvault.toml" -q migrate >/dev/null
  "$BIN" --config "$OUT/lrvault.toml" -q discover >/dev/null
}

# lrvault_time NAME: times one `archive` under GNU time -v; sets L_SECS and L_RSS_MIB.
lrvault_time() {
  local name=$1
  /usr/bin/time -v -o "$OUT/$name.time" "$BIN" --config "$OUT/lrvault.toml" -q archive >/dev/null
  L_SECS=$(python3 - "$OUT/$name.time" <<'PY'
import sys
for line in open(sys.argv[1]):
    if "Elapsed (wall clock)" in line:
        parts = [float(p) for p in line.rsplit(" ", 1)[1].split(":")]
        print(round(sum(p * 60 ** i for i, p in enumerate(reversed(parts))), 2))
PY
)
  L_RSS_MIB=$(awk -F': ' '/Maximum resident set size/ {printf "%.1f", $2/1024}' "$OUT/$name.time")
}

# lrvault_archive NAME [RUNS]: one untimed run, then RUNS timed ones (default 1), each from a
# fresh discover; sets L_SECS (median), L_RSS_MIB (largest), L_PACKAGE, L_SHA (of the largest
# payload) and L_COMPRESSION (its choice and reason), from the last run.
lrvault_archive() {
  local name=$1 runs=${2:-1} secs=() rss=()
  if [ "$runs" -gt 1 ]; then
    lrvault_time "$name"
  fi
  for _ in $(seq "$runs"); do
    [ "$runs" -gt 1 ] && lrvault_discover "$name"
    lrvault_time "$name"
    secs+=("$L_SECS")
    rss+=("$L_RSS_MIB")
  done
  L_SECS=$(median "${secs[@]}")
  L_RSS_MIB=$(python3 -c 'import sys; print(max(map(float, sys.argv[1:])))' "${rss[@]}")
  L_PACKAGE=$(sqlite3 "$OUT/lrvault.db" "select package_size from evidence order by payload_size desc limit 1")
  L_SHA=$(sqlite3 "$OUT/lrvault.db" "select payload_sha256 from evidence order by payload_size desc limit 1")
  L_COMPRESSION=$(unzip -p "$(sqlite3 "$OUT/lrvault.db" "select '$STORE_ROOT/' || package_path from evidence order by payload_size desc limit 1")" '*/retrieval.json' |
    python3 -c 'import json,sys; c=json.load(sys.stdin)["compression"]; print(c["method"], "-", c["reason"])' || true)
}

# mint_link: a fresh download link for the first queued result (the payload).
mint_link() {
  local token action
  token=$(curl -s -d "grant_type=client_credentials&client_id=$CLIENT_ID&client_secret=sim-secret-0&scope=https://api.securitycenter.microsoft.com/.default" \
    "$BASE/$TENANT_ID/oauth2/v2.0/token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  action=$(sqlite3 "$OUT/lrvault.db" "select action_id from results where command_index = 0 limit 1")
  curl -s -H "Authorization: Bearer $token" \
    "$BASE/api/machineactions/$action/GetLiveResponseResultDownloadLink(index=0)" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["value"])'
}

row() { printf '%-44s %8s %9s  %s\n' "$@" | tee -a "$REPORT"; }
mbs() { python3 -c "print(round($1 / 1e6 / $2, 1))"; }

# bench_payload NAME KIND SIZE [gzip]: lrvault first (it also says which blob to link to).
bench_payload() {
  local name=$1 kind=$2 size=$3 link sha
  OUT=$ROOT/$name
  mkdir -p "$OUT"
  start_sim "$name" --actions 0 --seed 11 --payload "$kind:$size"
  lrvault_discover "$name"
  link=$(mint_link)
  # One byte first, so the simulator's one-time MD5 pass (cached) is in nobody's time.
  curl -s -r 0-0 -o /dev/null "$link"
  lrvault_archive "$name" "$RUNS"
  echo | tee -a "$REPORT"
  echo "== $name: $kind payload of $size bytes; compression: $L_COMPRESSION" | tee -a "$REPORT"
  row "tool" "seconds" "MB/s" "note"
  row "lrvault archive (link → committed package)" "$L_SECS" "$(mbs "$size" "$L_SECS")" "median of $RUNS; peak RSS $L_RSS_MIB MiB, package $L_PACKAGE bytes"
  eval "${name}_L=$L_SECS; ${name}_RSS=$L_RSS_MIB; ${name}_PKG=$L_PACKAGE"
  local t
  t=$(secs "curl -s '$link' >/dev/null"); row "curl > /dev/null" "$t" "$(mbs "$size" "$t")" ""
  t=$(secs_median "curl -s '$link' | openssl dgst -sha256"); row "curl | openssl dgst -sha256" "$t" "$(mbs "$size" "$t")" "median of $RUNS"
  eval "${name}_CURL_SHA=$t"
  t=$(secs_median "curl -s '$link' | md5sum"); row "curl | md5sum" "$t" "$(mbs "$size" "$t")" "median of $RUNS"
  eval "${name}_CURL_MD5=$t"
  # What the disk allows: the same link to a file, fsynced (the store is on the same disk
  # unless STORE_DIR says otherwise).
  t=$(secs "curl -s -o '$OUT/payload.bin' '$link' && sync '$OUT/payload.bin'")
  row "curl -o file && sync file (disk floor)" "$t" "$(mbs "$size" "$t")" "on $(df --output=source "$OUT" | tail -1)"
  sha=$(openssl dgst -sha256 -r "$OUT/payload.bin" | cut -d' ' -f1)
  [ "$sha" = "$L_SHA" ] || { echo "hash mismatch: $sha vs lrvault $L_SHA" | tee -a "$REPORT"; exit 1; }
  t=$(secs "cat '$OUT/payload.bin' >/dev/null"); row "cat file > /dev/null" "$t" "$(mbs "$size" "$t")" ""
  t=$(secs "openssl dgst -sha256 '$OUT/payload.bin'"); row "openssl dgst -sha256 file" "$t" "$(mbs "$size" "$t")" ""
  t=$(secs "md5sum '$OUT/payload.bin'"); row "md5sum file" "$t" "$(mbs "$size" "$t")" ""
  if [ "${4:-}" = gzip ]; then
    t=$(secs "gzip -6 -c '$OUT/payload.bin' >'$OUT/payload.gz'")
    eval "${name}_GZIP=$t; ${name}_GZ=$(stat -c %s "$OUT/payload.gz")"
    row "gzip -6 file" "$t" "$(mbs "$size" "$t")" "output $(stat -c %s "$OUT/payload.gz") bytes"
  fi
  rm -f "$OUT/payload.bin" "$OUT/payload.gz"
  rm -rf "$STORE_ROOT"
  stop_sim
}

echo "lrvault $(git rev-parse --short HEAD), $(nproc) cores, $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$REPORT"
echo "store: ${STORE_DIR:-$ROOT} on $(findmnt -n -o FSTYPE,SOURCE --target "${STORE_DIR:-$ROOT}")" | tee -a "$REPORT"
bench_payload random random "$BIG"
bench_payload random_md5 random-md5 "$BIG"
bench_payload text text "$TEXT" gzip
bench_payload small random "$SMALL"

# --- mixed workload ------------------------------------------------------------------------
OUT=$ROOT/mixed
mkdir -p "$OUT"
start_sim mixed --actions 120 --seed 5 --max-getfile-size 4096 --payload "random:$BIG"
lrvault_discover mixed
lrvault_archive mixed
rm -rf "$STORE_ROOT"
stop_sim
echo | tee -a "$REPORT"
python3 - "$OUT/lrvault.db" "$L_SECS" <<'PY' | tee -a "$REPORT"
import datetime, sqlite3, statistics, sys
db = sqlite3.connect(sys.argv[1])
t = lambda s: datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
big = db.execute("select action_id, command_index from evidence order by payload_size desc limit 1").fetchone()
ev = {}
for at, action, index, event in db.execute(
        "select at, action_id, command_index, event from custody_log where event in ('LINK_ISSUED','ARCHIVED') order by seq"):
    ev.setdefault((action, index), {})[event] = t(at)
b0, b1 = ev[big]["LINK_ISSUED"], ev[big]["ARCHIVED"]
lat = sorted(e["ARCHIVED"] - e["LINK_ISSUED"] for k, e in ev.items()
             if k != big and "ARCHIVED" in e and b0 <= e["LINK_ISSUED"] <= b1)
small = sum(1 for k, e in ev.items() if k != big and "ARCHIVED" in e)
print(f"== mixed: {small} small results archived behind the big one (whole pass {sys.argv[2]} s); "
      f"the big one streamed {b1 - b0:.1f} s")
if lat:
    print(f"   {len(lat)} small results linked while it streamed: link → archived median "
          f"{statistics.median(lat):.2f} s, p90 {lat[int(len(lat) * 0.9)]:.2f} s, max {lat[-1]:.2f} s (target: median ≤ 10 s)")
else:
    print("   no small result was linked while the big one streamed")
PY

# --- 64 concurrent transfers ----------------------------------------------------------------
OUT=$ROOT/wide
mkdir -p "$OUT"
WIDE=64
payloads=()
for _ in $(seq "$WIDE"); do payloads+=(--payload "random:$((BIG / WIDE))"); done
start_sim wide --actions 0 --seed 7 --per-minute 10000 "${payloads[@]}"
STORE_ROOT=$OUT/wide-store
write_config "$OUT/lrvault.toml" "[download]
concurrency = $WIDE"
"$BIN" --config "$OUT/lrvault.toml" -q migrate >/dev/null
"$BIN" --config "$OUT/lrvault.toml" -q discover >/dev/null
t0=$(date +%s.%N)
"$BIN" --config "$OUT/lrvault.toml" -q archive >/dev/null &
pid=$!
threads=0 hwm=0
while [ -r "/proc/$pid/status" ]; do
  read -r t h < <(awk '/^Threads:/ {t=$2} /^VmHWM:/ {h=$2} END {print t+0, h+0}' "/proc/$pid/status" 2>/dev/null || echo "0 0")
  [ "${t:-0}" -gt "$threads" ] && threads=$t
  [ "${h:-0}" -gt "$hwm" ] && hwm=$h
  sleep 0.02
done
wait "$pid"
t1=$(date +%s.%N)
archived=$(sqlite3 "$OUT/lrvault.db" "select count(*) from evidence")
rm -rf "$STORE_ROOT"
stop_sim
echo | tee -a "$REPORT"
echo "== wide: $WIDE payloads of $((BIG / WIDE)) bytes, download.concurrency = $WIDE: $archived archived in $(python3 -c "print(round($t1 - $t0, 2))") s; peak $threads threads, peak RSS $((hwm / 1024)) MiB" | tee -a "$REPORT"

# --- ratios --------------------------------------------------------------------------------
python3 - "$BIG" "$TEXT" "$random_L" "$random_CURL_SHA" "$random_md5_L" "$random_md5_CURL_MD5" \
  "$text_L" "$text_GZIP" "$text_PKG" "$text_GZ" "$random_RSS" "$small_RSS" <<'PY' | tee -a "$REPORT"
import sys
big, text, rl, rcs, ml, mcm, tl, tg, tpkg, tgz, rss_big, rss_small = map(float, sys.argv[1:])
print()
print("== against the targets")
print(f"no server MD5: lrvault {big/rl/1e6:.0f} MB/s = {rcs/rl:.2f} x curl | openssl dgst -sha256 (target >= 0.85)")
print(f"Content-MD5:   lrvault {big/ml/1e6:.0f} MB/s = {mcm/ml:.2f} x curl | md5sum (target >= 0.9)")
print(f"text:          lrvault {tg/tl:.2f} x faster than gzip -6 (target >= 2), package {tpkg/tgz:.3f} x gzip's output (target <= 1.15)")
print(f"peak RSS:      {rss_big:.1f} MiB for {big/2**30:.2f} GiB (target <= 64), {rss_small:.1f} MiB for 200 MiB (target within 8 MiB)")
PY
echo "(raw data in $ROOT)"
