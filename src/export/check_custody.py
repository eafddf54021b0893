#!/usr/bin/env python3
"""Re-checks an lrvault export kit with nothing but Python 3's standard library.

Run it in the kit's directory:
    python3 check_custody.py [--gen-time "Nov 28 03:17:05 2026 GMT"]

1. The chain segment in custody.db recomputes (the formula of lrvault's docs/audit.md section 5), each row links to
   the one before it, seq has no gap, no row's time is earlier than its predecessor's, and the
   last row is the one the checkpoint file pins (seq and row_hash). The segment's first row
   follows a row that is not in the kit; what pins the segment is its last row.
2. Each evidence row agrees with its ARCHIVED custody row (payload SHA-256 and size, package
   SHA-256, path and name, evidence id, and original_* when the row records them) and with
   the DISCOVERED row of its action (machine, device name, requestor, creation time, and the
   comment when the row records it); its path is the one lrvault's docs/evidence-format.md section 1 builds from them.
3. Each package's zip is the one its ARCHIVED row records; its bag checks (both manifests, one
   payload hashing to the ARCHIVED row's evidence_sha256, a gzip payload's decompressed
   SHA-256 and size); its bag's name and External-Identifier ({tenant}/{action_id}/{index}),
   Payload-Oxum and Contact-Name; its retrieval.json (sha256, bytes, original_*) and
   machine-action.json (id, machineId, computerDnsName, requestor, requestorComment,
   creationDateTimeUtc) agree with the evidence row; its custody_head is a row of the segment.
4. With --gen-time (the token's "Time stamp:" as `openssl ts -reply -text` prints it): the
   token is not earlier than the checkpoint's `at` nor any ARCHIVED row of the kit (to its
   one-second resolution); prints how long after the checkpoint it was issued.
RESTORED rows in the segment are listed (the database was put back from a backup there).
Prints "export OK: ..." and exits 0, or lists every problem and exits 1.
"""
import datetime
import gzip
import hashlib
import json
import os
import re
import sqlite3
import sys
import zipfile

KIT = os.path.dirname(os.path.abspath(__file__))
problems, notes = [], []
uncommented = set()  # DISCOVERED rows written before lrvault recorded the comment


def sha256_stream(f):
    h, n = hashlib.sha256(), 0
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
        n += len(block)
    return h.hexdigest(), n


def utc(text):
    """An RFC 3339 time as lrvault stores it: UTC, milliseconds truncated, 'Z'."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?", text or "")
    if not m:
        return None
    frac = (m.group(2) or "")[:6].ljust(6, "0")
    zone = "+00:00" if m.group(3) in (None, "Z") else m.group(3)
    t = datetime.datetime.fromisoformat(f"{m.group(1)}.{frac}{zone}").astimezone(datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def component(raw):
    """docs/evidence-format.md section 1: an API id as one path component."""
    out = "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "_" for c in raw)[:200]
    return out.replace(".", "_") or "_" if set(out) <= {"."} else out


def differs(name, what, pairs):
    for field, have, want in pairs:
        if have != want:
            problems.append(f"{name}: {field} is {have!r}, {what} says {want!r}")


def check_chain(db, cp_seq, cp_hash, cp_file):
    hashes, rows_by_event = {}, {}
    prev = None
    for row in db.execute(
            "SELECT seq, at, tenant, action_id, command_index, event, actor, evidence_sha256,"
            " package_path, detail, prev_hash, row_hash FROM custody_log ORDER BY seq"):
        seq, at, prev_hash, row_hash = row[0], row[1], row[10], row[11]
        if prev is None and seq == 1 and prev_hash != "0" * 64:
            problems.append("custody seq 1 does not start the chain (prev_hash is not 64 zeros)")
        if prev is not None and (seq != prev[0] + 1 or prev_hash != prev[2]):
            problems.append(f"custody seq {seq} does not link to seq {prev[0]}")
        if prev is not None and at < prev[1]:
            problems.append(f"custody seq {seq} is earlier ({at}) than seq {prev[0]} ({prev[1]})")
        text = json.dumps([prev_hash, *row[:10]], separators=(",", ":"), ensure_ascii=False)
        if hashlib.sha256(text.encode("utf-8")).hexdigest() != row_hash:
            problems.append(f"custody seq {seq} does not recompute")
        hashes[seq] = row_hash
        if row[5] in ("ARCHIVED", "DISCOVERED", "RESTORED"):
            key = (row[2], row[3], row[4]) if row[5] != "RESTORED" else "RESTORED"
            rows_by_event.setdefault((row[5], key), []).append(
                {"seq": seq, "at": at, "sha": row[7], "path": row[8], "detail": json.loads(row[9])})
        prev = (seq, at, row_hash)
    if prev is None or (prev[0], prev[2]) != (cp_seq, cp_hash):
        problems.append(f"the last custody row (seq {prev and prev[0]}) is not the one {cp_file} pins (seq {cp_seq})")
    for r in rows_by_event.get(("RESTORED", "RESTORED"), []):
        notes.append(f"custody seq {r['seq']} is a RESTORED row: the database was put back from a backup"
                     f" there; the rows it replaced are in {r['detail'].get('replaced')!r}, not in this kit")
    return hashes, rows_by_event, (min(hashes) if hashes else None)


def check_rows(ev, name, rows_by_event):
    """The evidence row against its ARCHIVED and DISCOVERED rows; returns the ARCHIVED row."""
    archived = rows_by_event.get(("ARCHIVED", (ev["tenant"], ev["action_id"], ev["command_index"])), [])
    discovered = rows_by_event.get(("DISCOVERED", (ev["tenant"], ev["action_id"], None)), [])
    if len(archived) != 1 or len(discovered) != 1:
        problems.append(f"{name}: {len(archived)} ARCHIVED and {len(discovered)} DISCOVERED rows in the kit, expected 1 each")
        return None
    a, d = archived[0], discovered[0]
    ad, dd = a["detail"], d["detail"]
    what = f"ARCHIVED seq {a['seq']}"
    differs(name, what, [("payload_sha256", ev["payload_sha256"], a["sha"]),
                         ("package_path", ev["package_path"], a["path"]),
                         ("package_sha256", ev["package_sha256"], ad.get("package_sha256")),
                         ("payload_size", ev["payload_size"], ad.get("payload_size")),
                         ("payload_name", ev["payload_name"], ad.get("payload_name")),
                         ("evidence_id", ev["evidence_id"], ad.get("evidence_id"))])
    differs(name, what, [(k, ev[k], ad[k]) for k in ("original_name", "original_size", "original_sha256") if k in ad])
    # Since schema version 5 the ARCHIVED row's time is the evidence row's archived_at.
    if "package_size" in ad and "archived_at" in ev.keys():
        differs(name, what, [("archived_at", ev["archived_at"], a["at"])])
    what = f"DISCOVERED seq {d['seq']}"
    differs(name, what, [("machine_id", ev["machine_id"], dd.get("machine_id")),
                         ("computer_dns_name", ev["computer_dns_name"], dd.get("computer_dns_name")),
                         ("requestor", ev["requestor"], dd.get("requestor")),
                         ("action_created_at", ev["action_created_at"], dd.get("created_at"))])
    for key in ("requestor_comment", "comment"):
        if key in dd:
            differs(name, what, [("requestor_comment", ev["requestor_comment"], dd[key])])
            break
    else:
        uncommented.add(d["seq"])
    day = (ev["action_created_at"] or "")[:10].split("-")
    expected = "/".join([component(ev["tenant"]), *day, component(ev["action_id"]),
                         f"{ev['command_index']:03d}-{component(ev['command_type'] or '')}.zip"])
    differs(name, "docs/evidence-format.md section 1", [("package_path", ev["package_path"], expected)])
    return a


def check_bag(ev, name, z, hashes):
    bag = f"{component(ev['action_id'])}-{ev['command_index']:03d}"
    names = z.namelist()
    if any(not n.startswith(bag + "/") for n in names):
        problems.append(f"{name}: the zip holds entries outside the bag directory {bag}/")
        return
    entries = {n.split("/", 1)[1]: n for n in names if not n.endswith("/")}
    for manifest in ("manifest-sha256.txt", "tagmanifest-sha256.txt"):
        for line in z.read(entries[manifest]).decode("utf-8").splitlines():
            digest, listed = line.split(None, 1)
            listed = listed.replace("%0A", "\n").replace("%0D", "\r").replace("%25", "%")
            if listed not in entries or sha256_stream(z.open(entries[listed]))[0] != digest:
                problems.append(f"{name}: {listed} does not match {manifest}")
    data = [n for n in entries if n.startswith("data/")]
    if len(data) != 1 or sha256_stream(z.open(entries[data[0]])) != (ev["payload_sha256"], ev["payload_size"]):
        problems.append(f"{name}: the payload is not the one the evidence row and its ARCHIVED row record")
    elif ev["original_sha256"] is not None:
        with gzip.open(z.open(entries[data[0]])) as g:
            differs(name, "the decompressed payload", [("(original_sha256, original_size)",
                    (ev["original_sha256"], ev["original_size"]), sha256_stream(g))])
    info = dict(line.split(": ", 1) for line in z.read(entries["bag-info.txt"]).decode("utf-8").splitlines() if ": " in line)
    differs(name, "bag-info.txt", [
        ("the bag's identity", f"{ev['tenant']}/{ev['action_id']}/{ev['command_index']}", info.get("External-Identifier")),
        ("the payload's size", f"{ev['payload_size']}.1", info.get("Payload-Oxum")),
        ("requestor", ev["requestor"], info.get("Contact-Name"))])
    retrieval = json.loads(z.read(entries["retrieval.json"]))
    differs(name, "retrieval.json", [("payload_sha256", ev["payload_sha256"], retrieval.get("sha256")),
                                     ("payload_size", ev["payload_size"], retrieval.get("bytes"))] +
            [(k, ev[k], retrieval.get(k)) for k in ("original_name", "original_size", "original_sha256")])
    action = json.loads(z.read(entries["machine-action.json"]))
    differs(name, "machine-action.json", [
        ("action_id", ev["action_id"], action.get("id")),
        ("machine_id", ev["machine_id"], action.get("machineId")),
        ("computer_dns_name", ev["computer_dns_name"], action.get("computerDnsName")),
        ("requestor", ev["requestor"], action.get("requestor")),
        ("requestor_comment", ev["requestor_comment"], action.get("requestorComment")),
        ("action_created_at", ev["action_created_at"], utc(action.get("creationDateTimeUtc")))])
    head = retrieval.get("custody_head")
    if head is None:
        notes.append(f"{name} has no custody_head (archived before lrvault recorded one)")
    elif hashes.get(head["seq"]) != head["row_hash"]:
        problems.append(f"{name}: its custody_head (seq {head['seq']}) is not in the exported chain")


def check_packages(db, rows_by_event, hashes):
    db.row_factory = sqlite3.Row
    count, archived_at = 0, []
    for ev in db.execute("SELECT * FROM evidence ORDER BY package_path"):
        count += 1
        name = f"evidence {ev['evidence_id']} ({ev['package_path']})"
        a = check_rows(ev, name, rows_by_event)
        if a is None:
            continue
        archived_at.append((a["at"], a["seq"]))
        with open(os.path.join(KIT, "packages", ev["package_path"]), "rb") as f:
            if sha256_stream(f)[0] != ev["package_sha256"]:
                problems.append(f"{name}: the zip's SHA-256 is not the one ARCHIVED seq {a['seq']} records")
                continue
        with zipfile.ZipFile(os.path.join(KIT, "packages", ev["package_path"])) as z:
            check_bag(ev, name, z, hashes)
    return count, archived_at


def check_gen_time(gen_time, checkpoint, archived_at):
    gen = datetime.datetime.strptime(gen_time.strip(), "%b %d %H:%M:%S %Y %Z").replace(tzinfo=datetime.timezone.utc)
    parse = lambda t: datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))
    slack = datetime.timedelta(seconds=1)
    at = parse(checkpoint["at"])
    if gen + slack < at:
        problems.append(f"the token's genTime {gen_time} is earlier than the checkpoint's at {checkpoint['at']}")
    for when, seq in archived_at:
        if gen + slack < parse(when):
            problems.append(f"the token's genTime {gen_time} is earlier than ARCHIVED seq {seq} ({when})")
    delay = (gen - at).total_seconds()
    when = "in the same second as" if delay < 1 else f"{delay:.0f} s after"
    print(f"genTime {gen.strftime('%Y-%m-%dT%H:%M:%SZ')} is {when} the checkpoint's at {checkpoint['at']},"
          f" and not before any ARCHIVED row of the kit")


def main(argv):
    gen_time = argv[argv.index("--gen-time") + 1] if "--gen-time" in argv else None
    db = sqlite3.connect(f"file:{os.path.join(KIT, 'custody.db')}?mode=ro", uri=True)
    cp_seq, cp_hash, cp_file = db.execute("SELECT seq, row_hash, checkpoint_path FROM anchors").fetchone()
    with open(os.path.join(KIT, cp_file), encoding="utf-8") as f:
        checkpoint = json.load(f)
    if (checkpoint["seq"], checkpoint["row_hash"]) != (cp_seq, cp_hash):
        problems.append(f"{cp_file} pins seq {checkpoint['seq']}, custody.db's anchors row says {cp_seq}")
    hashes, rows_by_event, first_seq = check_chain(db, cp_seq, cp_hash, cp_file)
    count, archived_at = check_packages(db, rows_by_event, hashes)
    if gen_time:
        check_gen_time(gen_time, checkpoint, archived_at)
    if uncommented:
        notes.append(f"{len(uncommented)} DISCOVERED rows do not record the requestor's comment;"
                     " requestor_comment is checked against machine-action.json only")
    for note in notes:
        print(f"note: {note}")
    if problems:
        print("\n".join(problems))
        return 1
    print(f"export OK: custody rows {first_seq}..{cp_seq} recompute and end at the row {cp_file} pins;"
          f" {count} packages match their ARCHIVED rows, their DISCOVERED rows, their bags and retrieval.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
