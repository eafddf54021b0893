#!/usr/bin/env python3
"""Re-checks an lrvault export kit with nothing but Python 3's standard library.

Run it in the kit's directory: python3 check_custody.py

1. Every custody row in custody.db recomputes (DESIGN §6 formula), each links to the one
   before it, and the last one is the row the checkpoint file pins (seq and row_hash).
2. Every package's SHA-256 is the one its ARCHIVED custody row records, its BagIt manifests
   hold, its payload hashes to the ARCHIVED row's evidence_sha256, and the custody row its
   retrieval.json pins (custody_head) is in the chain with that hash.
Prints "export OK: ..." and exits 0, or lists every problem and exits 1.
"""
import hashlib
import json
import os
import sqlite3
import sys
import zipfile

KIT = os.path.dirname(os.path.abspath(__file__))
problems = []


def sha256_stream(f):
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def sha256_file(path):
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_entry(z, name):
    with z.open(name) as f:
        return sha256_stream(f)


db = sqlite3.connect(f"file:{os.path.join(KIT, 'custody.db')}?mode=ro", uri=True)
cp_seq, cp_hash, cp_file = db.execute("SELECT seq, row_hash, file FROM checkpoints").fetchone()
with open(os.path.join(KIT, cp_file), encoding="utf-8") as f:
    checkpoint = json.load(f)
if (checkpoint["seq"], checkpoint["row_hash"]) != (cp_seq, cp_hash):
    problems.append(f"{cp_file} pins seq {checkpoint['seq']}, custody.db says {cp_seq}")

# 1. The chain segment.
hashes, archived = {}, {}
prev_seq = prev_hash_seen = None
rows = db.execute(
    "SELECT seq, at, tenant, action_id, command_index, event, actor, evidence_sha256,"
    " package_path, detail, prev_hash, row_hash FROM custody_log ORDER BY seq"
)
for (seq, at, tenant, action_id, command_index, event, actor, evidence_sha256, package_path,
     detail, prev_hash, row_hash) in rows:
    if prev_seq is not None and (seq != prev_seq + 1 or prev_hash != prev_hash_seen):
        problems.append(f"custody seq {seq} does not link to seq {prev_seq}")
    text = json.dumps([prev_hash, seq, at, tenant, action_id, command_index, event, actor,
                       evidence_sha256, package_path, detail],
                      separators=(",", ":"), ensure_ascii=False)
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != row_hash:
        problems.append(f"custody seq {seq} does not recompute")
    hashes[seq] = row_hash
    if event == "ARCHIVED":
        archived.setdefault((tenant, action_id, command_index), []).append(
            (seq, evidence_sha256, package_path, json.loads(detail)))
    prev_seq, prev_hash_seen = seq, row_hash
first_seq = min(hashes) if hashes else None
if prev_seq != cp_seq or prev_hash_seen != cp_hash:
    problems.append(f"the last custody row (seq {prev_seq}) is not the one {cp_file} pins (seq {cp_seq})")

# 2. The packages.
count = 0
for (evidence_id, tenant, action_id, command_index, package_path, package_sha256,
     payload_sha256) in db.execute(
        "SELECT evidence_id, tenant, action_id, command_index, package_path, package_sha256,"
        " payload_sha256 FROM evidence ORDER BY package_path"):
    count += 1
    name = f"evidence {evidence_id} ({package_path})"
    rows = archived.get((tenant, action_id, command_index), [])
    if len(rows) != 1:
        problems.append(f"{name}: {len(rows)} ARCHIVED rows in the segment, expected 1")
        continue
    seq, row_payload, row_path, detail = rows[0]
    if (row_payload, row_path, detail.get("package_sha256")) != (payload_sha256, package_path, package_sha256):
        problems.append(f"{name}: differs from its ARCHIVED row (seq {seq})")
    path = os.path.join(KIT, "packages", package_path)
    if sha256_file(path) != package_sha256:
        problems.append(f"{name}: the zip's SHA-256 is not the one ARCHIVED seq {seq} records")
        continue
    with zipfile.ZipFile(path) as z:
        entries = {n.split("/", 1)[1]: n for n in z.namelist() if "/" in n and not n.endswith("/")}
        for manifest in ("manifest-sha256.txt", "tagmanifest-sha256.txt"):
            for line in z.read(entries[manifest]).decode("utf-8").splitlines():
                digest, listed = line.split(None, 1)
                listed = listed.replace("%0A", "\n").replace("%0D", "\r").replace("%25", "%")
                if sha256_entry(z, entries[listed]) != digest:
                    problems.append(f"{name}: {listed} does not match {manifest}")
        data = [n for n in entries if n.startswith("data/")]
        if len(data) != 1 or sha256_entry(z, entries[data[0]]) != payload_sha256:
            problems.append(f"{name}: the payload is not the one ARCHIVED seq {seq} records")
        head = json.loads(z.read(entries["retrieval.json"])).get("custody_head")
    if head is None:
        print(f"note: {name} has no custody_head (archived before lrvault recorded one)")
    elif hashes.get(head["seq"]) != head["row_hash"]:
        problems.append(f"{name}: its custody_head (seq {head['seq']}) is not in the exported chain")

if problems:
    print("\n".join(problems))
    sys.exit(1)
print(f"export OK: custody rows {first_seq}..{prev_seq} recompute and end at the row "
      f"{cp_file} pins; {count} packages match their ARCHIVED rows")
