#!/usr/bin/env python3
"""Writes N OSCORE context pairs in aiocoap's on-disk format for benches/scale.sh (issue 5,
"10 000 contexts and 10 000 patterns"):

  DIR/gw/c{i}/settings.json      the gateway's (client) half, Sender ID = i (3 bytes)
  DIR/srv/c{i}/settings.json     the origin's (server) half, Recipient ID = i
  DIR/gw.json                    "coap://HOST:PORT/c{i}/*" -> {"oscore": {"basedir": "gw/c{i}"}}
  DIR/server.json                ":c{i}" -> {"oscore": {"basedir": "srv/c{i}"}}

Each pair has its own Master Secret. Relative basedirs are taken relative to the
credentials file (as the gateway and aiocoap do). Bounded: N <= 100000.
Usage: gen_contexts.py DIR N --host 127.0.0.1 --port 5683
"""
import argparse
import json
import os

ap = argparse.ArgumentParser()
ap.add_argument("dir")
ap.add_argument("n", type=int)
ap.add_argument("--host", default="127.0.0.1")
ap.add_argument("--port", type=int, required=True)
a = ap.parse_args()
if not 1 <= a.n <= 100_000:
    raise SystemExit("N must be 1..=100000")

gw, srv = {}, {}
for i in range(a.n):
    kid = f"{i:06x}"
    secret = f"{i:08x}" * 4
    for side, settings in (
        ("gw", {"sender-id_hex": kid, "recipient-id_hex": "01", "secret_hex": secret}),
        ("srv", {"sender-id_hex": "01", "recipient-id_hex": kid, "secret_hex": secret}),
    ):
        d = os.path.join(a.dir, side, f"c{i}")
        os.makedirs(d)
        with open(os.path.join(d, "settings.json"), "w") as f:
            json.dump(settings, f)
    gw[f"coap://{a.host}:{a.port}/c{i}/*"] = {"oscore": {"basedir": f"gw/c{i}"}}
    srv[f":c{i}"] = {"oscore": {"basedir": f"srv/c{i}"}}
with open(os.path.join(a.dir, "gw.json"), "w") as f:
    json.dump(gw, f)
with open(os.path.join(a.dir, "server.json"), "w") as f:
    json.dump(srv, f)
