# Shared by the bench scripts: start the simulator from the release binary, and write a
# config for it. Expects BIN and OUT to be set.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_sim NAME [simulate flags...]: sets SIM_PID, BASE, TENANT_ID, CLIENT_ID.
start_sim() {
  local name=$1 port
  shift
  port=$(free_port)
  "$BIN" simulate --listen "127.0.0.1:$port" "$@" >"$OUT/$name.sim.out" 2>&1 &
  SIM_PID=$!
  for _ in $(seq 50); do grep -q listening "$OUT/$name.sim.out" 2>/dev/null && break; sleep 0.1; done
  BASE="http://127.0.0.1:$port"
  TENANT_ID=$(sed -n 's/^tenant_id = "\(.*\)"/\1/p' "$OUT/$name.sim.out")
  CLIENT_ID=$(sed -n 's/^client_id = "\(.*\)"/\1/p' "$OUT/$name.sim.out")
}

stop_sim() { kill -TERM "$SIM_PID"; wait "$SIM_PID" || true; }

# write_config PATH [extra TOML]: database under $OUT, store at $STORE_ROOT (default
# $OUT/evidence), one tenant for the simulator.
write_config() {
  (umask 077 && echo sim-secret-0 >"$OUT/secret")
  cat >"$1" <<TOML
[database]
path = "$OUT/lrvault.db"
[store]
root = "${STORE_ROOT:-$OUT/evidence}"
${2:-}
[[tenant]]
name = "bench"
tenant_id = "$TENANT_ID"
client_id = "$CLIENT_ID"
client_secret_file = "$OUT/secret"
api_base = "$BASE"
login_base = "$BASE"
download_hosts = ["127.0.0.1"]
TOML
}

# start_moto: moto's S3 server on a free port with a bucket "evidence" that has Object Lock
# and a default COMPLIANCE retention of one day. Sets MOTO_PID and MOTO_URL.
start_moto() {
  local port
  port=$(free_port)
  moto_server -H 127.0.0.1 -p "$port" >"$OUT/moto.log" 2>&1 &
  MOTO_PID=$!
  MOTO_URL="http://127.0.0.1:$port"
  for _ in $(seq 300); do curl -s -o /dev/null "$MOTO_URL/" && break; sleep 0.1; done
  python3 - "$MOTO_URL" <<'PY'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="bench", aws_secret_access_key="bench")
s3.create_bucket(Bucket="evidence", ObjectLockEnabledForBucket=True)
s3.put_object_lock_configuration(Bucket="evidence", ObjectLockConfiguration={
    "ObjectLockEnabled": "Enabled",
    "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 1}}})
PY
}

# The [store] keys of the moto bucket start_moto made (spool under $OUT).
moto_store_keys() {
  cat <<TOML
backend = "s3"
spool = "$OUT/spool"
bucket = "evidence"
prefix = "lrvault/"
endpoint = "$MOTO_URL"
region = "us-east-1"
credentials = "env"
require_worm = true
TOML
}
