#!/usr/bin/env python3
"""Drives aiocoap 0.4.17's FilesystemSecurityContext for tests/credentials.rs.

Run with the interop venv's python (target/interop/venv/bin/python). Modes:

  hold DIR         load (and so lock) DIR, print "LOCKED", wait until stdin closes,
                   then shut the context down cleanly and print "RELEASED"
  try DIR          try to load DIR; print "OK" (and shut down cleanly) or "FAIL <reason>"
  state DIR        load DIR, print one JSON line {"next": N, "window": {"index", "bitfield"}
                   or null}, then shut down cleanly (aiocoap rewrites sequence.json)
  use DIR N [S..]  load DIR, take N sender sequence numbers, strike out the numbers S
                   in the replay window, print {"used": [...]}, then shut down cleanly

Every mode exits 0 unless the script itself is broken; the test reads stdout.
"""

import gc
import json
import sys
import warnings

warnings.simplefilter("ignore")

from aiocoap.oscore import FilesystemSecurityContext  # noqa: E402


def shutdown(ctx):
    # aiocoap shuts a context down in __del__ (_destroy): it writes the exact state,
    # deletes `lock` and releases the flock. CPython runs it when the last reference goes.
    del ctx
    gc.collect()


def window_of(ctx):
    w = ctx.recipient_replay_window
    if not w.is_initialized():
        return None
    return {"index": w._index, "bitfield": w._bitfield}


def main():
    mode, d = sys.argv[1], sys.argv[2]
    if mode == "try":
        try:
            ctx = FilesystemSecurityContext(d)
        except Exception as e:  # filelock.Timeout, LoadError, ...
            print("FAIL", type(e).__name__, e, flush=True)
            return
        print("OK", flush=True)
        shutdown(ctx)
        return
    ctx = FilesystemSecurityContext(d)
    if mode == "hold":
        print("LOCKED", flush=True)
        sys.stdin.read()
        shutdown(ctx)
        print("RELEASED", flush=True)
    elif mode == "state":
        print(json.dumps({"next": ctx.sender_sequence_number, "window": window_of(ctx)}), flush=True)
        shutdown(ctx)
    elif mode == "use":
        used = [ctx.new_sequence_number() for _ in range(int(sys.argv[3]))]
        for s in sys.argv[4:]:
            ctx.recipient_replay_window.strike_out(int(s))  # raises on a replay
        print(json.dumps({"used": used}), flush=True)
        shutdown(ctx)
    else:
        raise SystemExit("unknown mode %r" % mode)


if __name__ == "__main__":
    main()
