#!/usr/bin/env bash
# Peak memory of one large package upload to S3: a SIZE_MIB file (default 2 GiB) published
# from the spool by `Store::publish` (multipart, SHA-256 per part) into a moto bucket with
# Object Lock and a default COMPLIANCE retention. Target: peak RSS <= 96 MiB, whatever the
# size (parts of 8 MiB, 4 in flight).
#
# Usage: bench/store_rss.sh [SIZE_MIB]     (run from the repo; needs moto_server and boto3,
#                                           which `pip install 'moto[server]'` brings)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-2048}
LIMIT_KIB=$((96 * 1024))
OUT=$PWD/bench/out/store-rss-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT/spool"
cargo build --locked --release -q --example store_upload
BIN=$PWD/target/release/examples/store_upload
. bench/lib.sh

start_moto
trap 'kill $MOTO_PID 2>/dev/null || true' EXIT

KEY=bench/2026/12/01/bench-action/000-GetFile.zip
mkdir -p "$OUT/spool/$(dirname "$KEY")"
head -c "${SIZE_MIB}M" /dev/urandom >"$OUT/spool/$KEY"
SHA=$(sha256sum "$OUT/spool/$KEY" | cut -d' ' -f1)
cat >"$OUT/lrvault.toml" <<TOML
[database]
path = "$OUT/lrvault.db"
[store]
$(moto_store_keys)
[[tenant]]
name = "bench"
tenant_id = "t"
client_id = "c"
client_secret_env = "UNUSED"
TOML

AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench \
  /usr/bin/time -v -o "$OUT/time.txt" "$BIN" "$OUT/lrvault.toml" "$KEY" "$SHA" | tee "$OUT/upload.txt"
RSS_KIB=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$OUT/time.txt")
SECS=$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$OUT/time.txt")
rm -f "$OUT/spool/$KEY"
printf 'upload of %s MiB: peak RSS %s KiB (%s MiB), wall %s, limit %s MiB\n' \
  "$SIZE_MIB" "$RSS_KIB" "$((RSS_KIB / 1024))" "$SECS" "$((LIMIT_KIB / 1024))" | tee "$OUT/result.txt"
[ "$RSS_KIB" -le "$LIMIT_KIB" ] || { echo "FAIL: peak RSS above the limit"; exit 1; }
echo PASS
