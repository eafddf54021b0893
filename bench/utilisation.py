#!/usr/bin/env python3
"""Per-window utilisation of result-link calls, from the simulator's request log.

usage: utilisation.py HOUR_SECS LIMIT name:requests.jsonl:results:seconds ...
A full window is [t0 + k*HOUR, t0 + (k+1)*HOUR) from the first link call, ending before the
last link call; utilisation = admitted link calls in it / LIMIT (the configured per-hour limit).
"""
import json
import sys

hour_ms = float(sys.argv[1]) * 1000
limit = int(sys.argv[2])
print(f"{'tool':<10} {'results':>7} {'secs':>7} {'429s':>5} {'link calls':>10}  utilisation per full window (limit {limit})")
for spec in sys.argv[3:]:
    name, path, results, secs = spec.split(":")
    reqs = [json.loads(l) for l in open(path)]
    links = sorted(r["t_ms"] for r in reqs if r["endpoint"] == "link" and r["status"] != 429)
    throttled = sum(1 for r in reqs if r["status"] == 429)
    t0 = links[0]
    full = int((links[-1] - t0) // hour_ms)
    util = []
    for k in range(full):
        lo, hi = t0 + k * hour_ms, t0 + (k + 1) * hour_ms
        util.append(sum(1 for t in links if lo <= t < hi) / limit)
    # the most calls any sliding window of one hour ever held
    best, j = 0, 0
    for i in range(len(links)):
        while links[i] - links[j] >= hour_ms:
            j += 1
        best = max(best, i - j + 1)
    cells = " ".join(f"{u:.1%}" for u in util) or "(no full window)"
    print(f"{name:<10} {results:>7} {secs:>7} {throttled:>5} {len(links):>10}  {cells}  (max in any sliding window: {best})")
