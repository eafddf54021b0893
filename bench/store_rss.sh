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

PORT=$(free_port)
moto_server -H 127.0.0.1 -p "$PORT" >"$OUT/moto.log" 2>&1 &
MOTO_PID=$!
trap 'kill $MOTO_PID 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.1; done
python3 - "$PORT" <<'PY'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", region_name="us-east-1",
                  aws_access_key_id="bench", aws_secret_access_key="bench")
s3.create_bucket(Bucket="evidence", ObjectLockEnabledForBucket=True)
s3.put_object_lock_configuration(Bucket="evidence", ObjectLockConfiguration={
    "ObjectLockEnabled": "Enabled",
    "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 1}}})
PY

KEY=bench/2026/12/01/bench-action/000-GetFile.zip
mkdir -p "$OUT/spool/$(dirname "$KEY")"
head -c "${SIZE_MIB}M" /dev/urandom >"$OUT/spool/$KEY"
SHA=$(sha256sum "$OUT/spool/$KEY" | cut -d' ' -f1)
cat >"$OUT/lrvault.toml" <<TOML
[database]
path = "$OUT/lrvault.db"
[store]
backend = "s3"
spool = "$OUT/spool"
bucket = "evidence"
prefix = "lrvault/"
endpoint = "http://127.0.0.1:$PORT"
region = "us-east-1"
credentials = "env"
require_worm = true
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
