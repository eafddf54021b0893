#!/usr/bin/env bash
# Large-payload benchmark: one GetFile result of SIZE bytes (generated on the fly by the
# simulator, gzip-wrapped as MDE delivers it) archived by lrvault — streamed, hashed
# (SHA-256, SHA-256 of the gunzipped original; MD5 too when the simulator sends one, which it
# does up to 256 MiB), zipped, fsynced and re-verified — side by side with the manual
# reference: curl the same link to a file, then sha256sum and md5sum it.
# Prints wall time, MB/s and peak memory of both.
#
# Usage: bench/throughput.sh [SIZE_BYTES]     (default 1 GiB; run from the repo)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-1073741824}
OUT=$PWD/bench/out/throughput-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
cargo build --locked --release -q
BIN=$PWD/target/release/lrvault
. bench/lib.sh
# One action with a normal small result set plus the big GetFile.
start_sim throughput --actions 1 --seed 3 --big-getfile "$SIZE"
trap 'kill $SIM_PID 2>/dev/null || true' EXIT
write_config "$OUT/lrvault.toml"
"$BIN" --config "$OUT/lrvault.toml" -q migrate >/dev/null
"$BIN" --config "$OUT/lrvault.toml" -q discover >/dev/null
# The pass holds the big result plus at most four small ones (a few KiB): timed as a whole.
/usr/bin/time -f "%e %M" -o "$OUT/lrvault.time" "$BIN" --config "$OUT/lrvault.toml" -q archive >/dev/null
read -r L_SECS L_RSS <"$OUT/lrvault.time"
read -r ACTION INDEX SIZE_ARCHIVED L_SHA < <(sqlite3 -separator ' ' "$OUT/lrvault.db" \
  "select action_id, command_index, payload_size, payload_sha256 from evidence order by payload_size desc limit 1")

# Reference: token, link, curl to a file, sha256sum + md5sum.
TOKEN=$(curl -s -d "grant_type=client_credentials&client_id=$CLIENT_ID&client_secret=sim-secret-0&scope=https://api.securitycenter.microsoft.com/.default" \
  "$BASE/$TENANT_ID/oauth2/v2.0/token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
LINK=$(curl -s -H "Authorization: Bearer $TOKEN" "$BASE/api/machineactions/$ACTION/GetLiveResponseResultDownloadLink(index=$INDEX)" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["value"])')
/usr/bin/time -f "%e %M" -o "$OUT/ref.time" bash -c "curl -s -o '$OUT/ref.bin' '$LINK' && sha256sum '$OUT/ref.bin' >'$OUT/ref.sha256' && md5sum '$OUT/ref.bin' >/dev/null && sync '$OUT/ref.bin'"
read -r R_SECS R_RSS <"$OUT/ref.time"
REF_SHA=$(cut -d' ' -f1 "$OUT/ref.sha256")
[ "$REF_SHA" = "$L_SHA" ] || { echo "hash mismatch: $REF_SHA vs $L_SHA"; exit 1; }
python3 - "$SIZE_ARCHIVED" "$L_SECS" "$L_RSS" "$R_SECS" "$R_RSS" <<'PY' | tee "$OUT/report.txt"
import sys
size, ls, lr, rs, rr = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
mb = size / 1e6
print(f"payload {size} bytes (gzip-wrapped GetFile); same SHA-256 from both")
print(f"{'tool':<34} {'seconds':>8} {'MB/s':>8} {'peak RSS MiB':>13}")
print(f"{'lrvault archive (zip+hashes+verify)':<34} {ls:>8.2f} {mb/ls:>8.1f} {lr/1024:>13.1f}")
print(f"{'curl + sha256sum + md5sum':<34} {rs:>8.2f} {mb/rs:>8.1f} {rr/1024:>13.1f}")
PY
