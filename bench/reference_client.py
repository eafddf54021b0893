#!/usr/bin/env python3
"""Reference client for bench/quota.sh: drains live-response results the way public MDE
connector scripts do — one request after another, and on a 429 sleep for Retry-After and
try again. It hashes and saves each result. Prints the number of results saved.

usage: reference_client.py BASE TENANT_ID CLIENT_ID SECRET OUT_DIR
"""
import datetime
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

base, tenant, client, secret, out = sys.argv[1:6]
os.makedirs(out, exist_ok=True)
FINISHED = {"Succeeded", "Failed", "TimeOut", "Cancelled"}


def call(req):
    while True:
        try:
            with urllib.request.urlopen(req) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            if e.code == 429:
                time.sleep(float(e.headers.get("Retry-After", "1")))
                continue
            raise


form = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": client,
                               "client_secret": secret, "scope": "https://api.securitycenter.microsoft.com/.default"}).encode()
token = json.loads(call(urllib.request.Request(f"{base}/{tenant}/oauth2/v2.0/token", data=form)))["access_token"]
auth = {"Authorization": f"Bearer {token}"}
since = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
q = urllib.parse.urlencode({"$filter": f"type eq 'LiveResponse' and creationDateTimeUtc ge {since}", "$top": "10000"})
actions = json.loads(call(urllib.request.Request(f"{base}/api/machineactions?{q}", headers=auth)))["value"]
saved = 0
for a in actions:
    if a.get("status") not in FINISHED:
        continue
    for c in a.get("commands", []):
        if c.get("commandStatus") != "Completed" or c["command"]["type"] == "PutFile":
            continue
        url = f"{base}/api/machineactions/{a['id']}/GetLiveResponseResultDownloadLink(index={c['index']})"
        link = json.loads(call(urllib.request.Request(url, headers=auth)))["value"]
        body = call(urllib.request.Request(link))
        digest = hashlib.sha256(body).hexdigest()
        with open(os.path.join(out, f"{a['id']}-{c['index']}.bin"), "wb") as f:
            f.write(body)
        saved += 1
print(saved)
