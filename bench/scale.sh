#!/usr/bin/env bash
# Scale benchmark (issue 8): a generated database of 1,000,000 custody rows and 200,000
# evidence rows (bench/scale_db.py, a valid chain), then, with the release binary:
#   - `audit evidence --machine X --since D`, whole command, median of 5 runs (target < 100 ms);
#   - `verify --chain-only`: the chain walk's rows/s (target >= 500,000), and the whole run;
#   - `verify --sample 0`: chain, schema, every action against its DISCOVERED row and every
#     evidence row against its ARCHIVED row and path, packages not read (target < 10 s).
# Prints the query plan of the audit query, so the indexes it uses are visible.
#
# Usage: bench/scale.sh [ACTIONS]   (4 evidence rows and 20 custody rows per action; default 50000)
set -euo pipefail
cd "$(dirname "$0")/.."
ACTIONS=${1:-50000}
OUT=bench/out/scale-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
cargo build --locked --release -q
BIN=$PWD/target/release/lrvault
(umask 077 && echo unused >"$OUT/secret")
cat >"$OUT/lrvault.toml" <<TOML
[database]
path = "$PWD/$OUT/lrvault.db"
[store]
root = "$PWD/$OUT/evidence"
[[tenant]]
name = "contoso"
tenant_id = "t"
client_id = "11111111-1111-1111-1111-111111111111"
client_secret_file = "$PWD/$OUT/secret"
TOML
"$BIN" --config "$OUT/lrvault.toml" -q migrate >/dev/null
/usr/bin/time -f "generated in %es" python3 bench/scale_db.py "$OUT/lrvault.db" "$ACTIONS"
ls -l "$OUT/lrvault.db" | awk '{printf "database: %.0f MB\n", $5 / 1e6}'

MACHINE=ws-00042.contoso.com
SINCE=2025-06-01
echo "query plan of audit evidence --machine $MACHINE --since $SINCE:"
sqlite3 "$OUT/lrvault.db" "EXPLAIN QUERY PLAN SELECT * FROM v_evidence
  WHERE (machine_id = '$MACHINE' OR computer_dns_name = '$MACHINE') AND action_created_at >= '$SINCE'
  ORDER BY action_created_at, action_id, command_index" | sed 's/^/  /'
for i in 1 2 3 4 5; do
  /usr/bin/time -f "%e" -a -o "$OUT/audit.times" "$BIN" --config "$OUT/lrvault.toml" -q \
    audit evidence --machine "$MACHINE" --since "$SINCE" --format csv >"$OUT/audit.csv"
done
ROWS=$(($(wc -l <"$OUT/audit.csv") - 1))
sort -n "$OUT/audit.times" | sed -n 3p | awk -v rows="$ROWS" '{printf "audit evidence --machine --since: %d rows, median %.0f ms (whole command)\n", rows, $1 * 1000}'

/usr/bin/time -f "%e %M" -o "$OUT/verify.time" "$BIN" --config "$OUT/lrvault.toml" -q verify --chain-only | tee "$OUT/verify.out"
read -r V_SECS V_RSS <"$OUT/verify.time"
echo "verify --chain-only: whole run ${V_SECS}s (quick_check included), peak RSS $((V_RSS / 1024)) MiB"

/usr/bin/time -f "%e %M" -o "$OUT/verify-meta.time" "$BIN" --config "$OUT/lrvault.toml" -q verify --sample 0 | tee "$OUT/verify-meta.out"
read -r M_SECS M_RSS <"$OUT/verify-meta.time"
echo "verify --sample 0 (chain + metadata, no package read): whole run ${M_SECS}s, peak RSS $((M_RSS / 1024)) MiB"
