#!/usr/bin/env python3
"""Fills an lrvault database (already migrated by `lrvault migrate`) with a large, valid
archive history for bench/scale.sh: ACTIONS actions of 4 commands each, every command
archived, and a custody chain whose rows hash exactly as DESIGN §6 says and whose DISCOVERED
and ARCHIVED rows say what the actions and evidence rows say (so verify finds no defect). With the defaults: 50,000 actions, 200,000 evidence rows, 1,000,000 custody rows.

Usage: bench/scale_db.py DB [ACTIONS]
"""
import hashlib
import json
import random
import sqlite3
import sys
from datetime import datetime, timedelta, timezone

db_path = sys.argv[1]
actions = int(sys.argv[2]) if len(sys.argv) > 2 else 50_000
COMMANDS = 4
MACHINES = 2_000
REQUESTORS = 50
rng = random.Random(8)
start = datetime(2025, 1, 1, tzinfo=timezone.utc)
RAW_SHA256 = hashlib.sha256(b"{}").hexdigest()  # every action's raw_json is "{}"
ACTOR = "lrvault/0.1.0 app=11111111-1111-1111-1111-111111111111 host=bench uid=998"


def ts(t):
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def hexid(n):
    return "%040x" % rng.getrandbits(160) if n is None else "%040x" % n


db = sqlite3.connect(db_path)
db.execute("PRAGMA synchronous = OFF")
prev, seq = "0" * 64, 0
custody = []


def append(at, tenant, action_id, index, event, sha, path, detail):
    global prev, seq
    seq += 1
    detail = json.dumps(detail, separators=(",", ":"), sort_keys=True)
    text = json.dumps([prev, seq, at, tenant, action_id, index, event, ACTOR, sha, path, detail],
                      separators=(",", ":"), ensure_ascii=False)
    row_hash = hashlib.sha256(text.encode()).hexdigest()
    custody.append((seq, at, tenant, action_id, index, event, ACTOR, sha, path, detail, prev, row_hash))
    prev = row_hash


act_rows, res_rows, ev_rows = [], [], []
for a in range(actions):
    # Each action and its rows fit in its own 10 minutes, so custody times never go backwards.
    created = start + timedelta(seconds=a * 600 + rng.randint(0, 269))
    action_id = "%08x-%04x-4%03x-8%03x-%012x" % (a, rng.getrandbits(16), rng.getrandbits(12),
                                                 rng.getrandbits(12), rng.getrandbits(48))
    machine = a % MACHINES
    machine_id = hexid(machine * 7919)
    dns = f"ws-{machine:05d}.contoso.com"
    requestor = f"analyst{a % REQUESTORS:02d}@contoso.com"
    at = created + timedelta(minutes=5)
    act_rows.append(("contoso", action_id, machine_id, dns, requestor, f"IR-{a}", "Succeeded",
                     ts(created), ts(at), "{}", ts(at), "discover"))
    append(ts(at), "contoso", action_id, None, "DISCOVERED", None, None,
           {"commands": COMMANDS, "computer_dns_name": dns, "created_at": ts(created),
            "machine_id": machine_id, "requestor": requestor, "source": "discover",
            "status": "Succeeded", "requestor_comment": f"IR-{a}", "last_update_at": ts(at),
            "raw_sha256": RAW_SHA256})
    for i in range(COMMANDS):
        ctype = "GetFile" if i % 2 else "RunScript"
        path = f"contoso/{created:%Y/%m/%d}/{action_id}/{i:03d}-{ctype}.zip"
        sha = "%064x" % rng.getrandbits(256)
        pkg = "%064x" % rng.getrandbits(256)
        size = rng.randint(1_000, 5_000_000)
        evidence_id = f"01{a:08x}-{i:04x}-7000-8000-{rng.getrandbits(48):012x}"
        t = at + timedelta(seconds=10 * i)
        append(ts(t), "contoso", action_id, i, "QUEUED", None, None,
               {"command_status": "Completed", "command_type": ctype})
        for issue in (1, 2) if i < 3 else (1,):
            append(ts(t), "contoso", action_id, i, "LINK_ISSUED", None, None,
                   {"issue": issue, "link_host": "contoso.blob.core.windows.net",
                    "link_path": f"/results/{action_id}/{i}"})
        append(ts(t), "contoso", action_id, i, "DOWNLOADED", sha, None,
               {"bytes": size, "http_status": 200, "link_issues": 1, "md5_check": "match", "ranges": []})
        append(ts(t), "contoso", action_id, i, "ARCHIVED", sha, path,
               {"evidence_id": evidence_id, "package_sha256": pkg, "payload_name": "result.bin",
                "payload_size": size, "package_size": size + 900, "payload_md5": None,
                "original_name": None, "original_size": None, "original_sha256": None})
        res_rows.append(("contoso", action_id, i, ctype, "{}", "Completed", "archived", 1, None, None,
                         evidence_id, ts(t)))
        ev_rows.append((evidence_id, "contoso", action_id, i, "result.bin", size, sha, None, None, None,
                        None, path, size + 900, pkg, ts(t), None, None))
    if len(custody) > 50_000:
        db.executemany("INSERT INTO custody_log VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", custody)
        custody.clear()
db.executemany("INSERT INTO actions VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", act_rows)
db.executemany("INSERT INTO results (tenant, action_id, command_index, command_type, command_json, "
               "command_status, state, attempts, next_attempt_at, last_error, evidence_id, updated_at) "
               "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", res_rows)
db.executemany("INSERT INTO evidence VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", ev_rows)
db.executemany("INSERT INTO custody_log VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", custody)
db.commit()
db.execute("ANALYZE")
db.commit()
print(f"{actions} actions, {len(ev_rows)} evidence rows, {seq} custody rows; "
      f"machines like ws-00042.contoso.com, actions from {ts(start)}")
