#!/usr/bin/env bash
# A/B of two gateway binaries on the 10 000-context workload of benches/scale.sh T1, in ONE
# run, interleaved, so that this VM's minute-to-minute swings (±15-20 % for one binary,
# docs/PERFORMANCE.md) fall on both alike. Bounded, loopback only, stops what it starts.
#
#   A and B each run as a gateway with CTX patterns coap://127.0.0.1:PORT/c{i}/*, each its
#   own context directory (benches/gen_contexts.py; a context is never shared between
#   processes), in front of its own origin. Both origins are the same binary (ORIGIN_BIN,
#   default A), so only the gateways differ. After a cold pass (every context opened) and
#   WARM_USES requests per context (past the persister's early raises), and once both
#   persisters are idle, ROUNDS rounds send N requests round-robin over the contexts
#   (`load --spread`) to A, then the same to B (B first in every other round).
#   Prints per round req/s and the gateway's CPU seconds per 100k requests (utime+stime),
#   then the medians and B/A of both.
#
# Usage: A=/tmp/gw-old B=target/release/oscore-gateway benches/ab.sh
# Env:   CTX=10000 N=100000 ROUNDS=8 W=256 WARM_USES=120 PIN=split (gateways on CPU 1,
#        load tool and origins on CPU 0: req/s is then the gateway's capacity) PORT_BASE=47700
#        LIMIT=120 ORIGIN_BIN=$A
set -euo pipefail

CTX=${CTX:-10000}
N=${N:-100000}
ROUNDS=${ROUNDS:-8}
W=${W:-256}
WARM_USES=${WARM_USES:-120}
PORT_BASE=${PORT_BASE:-47700}
LIMIT=${LIMIT:-120}
PIN=${PIN:-split}
NAME=ab
STOP_WAIT_S=120
WAIT_PORT_S=300
SKIP_BUILD=1
: "${A:?A=path of the first gateway binary}" "${B:?B=path of the second gateway binary}"
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
ORIGIN_BIN=${ORIGIN_BIN:-$A}
RESULTS=$TMP/results.tsv
: >"$RESULTS"

declare -A GWPORT OPORT GWPID
GWPORT[A]=$PORT_BASE; OPORT[A]=$((PORT_BASE + 1))
GWPORT[B]=$((PORT_BASE + 2)); OPORT[B]=$((PORT_BASE + 3))

for s in A B; do
    bin=${!s}
    python3 "$ROOT/benches/gen_contexts.py" "$TMP/ctx$s" "$CTX" --port "${OPORT[$s]}"
    printf '[coap]\nbind = ["127.0.0.1:%s"]\nnstart = 64\n[policy]\nplain_forwarding = false\n' \
        "${GWPORT[$s]}" >"$TMP/gw$s.toml"
    start "origin$s" on_rest "$ORIGIN_BIN" load --serve "127.0.0.1:${OPORT[$s]}" \
        --credentials "$TMP/ctx$s/server.json" --max-seconds 1800
    wait_port "${OPORT[$s]}" "$LAST_PID"
    "$ORIGIN_BIN" load "coap://127.0.0.1:${OPORT[$s]}/ping" --count 1 --window 1 --timeout 300 \
        --ack-timeout-ms 1000 --duration-limit 300 >/dev/null || true
    start "gw$s" on_hop "$bin" run --config "$TMP/gw$s.toml" --credentials "$TMP/ctx$s/gw.json"
    GWPID[$s]=$LAST_PID
    wait_port "${GWPORT[$s]}" "$LAST_PID"
done

# load SIDE COUNT: prints "req/s ticks ok" for COUNT requests through SIDE's gateway
load() {
    local s=$1 count=$2 t0 t1 json
    t0=$(ticks "${GWPID[$s]}")
    json=$(on_rest "$A" load "coap://127.0.0.1:${OPORT[$s]}/c{i}/x" --spread "$CTX" \
        --proxy "coap://127.0.0.1:${GWPORT[$s]}" --proxy-scheme --window "$W" --count "$count" \
        --json --duration-limit "$LIMIT" --ack-timeout-ms 1000) || true
    t1=$(ticks "${GWPID[$s]}")
    python3 -c '
import json, sys
try:
    r = json.loads(sys.argv[1])
except ValueError:
    print("0 0 0 1")
    sys.exit(0)
bad = r["errors"] + r["timeouts"] + r["unfinished"]
rps, ok = r["requests_per_s"], r["ok"]
print(f"{rps:.0f} {sys.argv[2]} {ok} {bad}")' "$json" "$((t1 - t0))"
}

for s in A B; do
    echo "warm-up $s: cold pass and $WARM_USES uses per context: $(load "$s" "$CTX") / $(load "$s" $((WARM_USES * CTX)))" >&2
done
for s in A B; do echo "persister $s idle after $(wait_persister_idle "${GWPID[$s]}") s" >&2; done

for r in $(seq 1 "$ROUNDS"); do
    order="A B"; [ $((r % 2)) -eq 0 ] && order="B A"
    for s in $order; do
        read -r rps t ok bad <<<"$(load "$s" "$N")"
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$s" "$rps" "$t" "$ok" "$bad" >>"$RESULTS"
        printf 'round %s %s: %s req/s, gateway %s ticks for %s ok (%s failed)\n' "$r" "$s" "$rps" "$t" "$ok" "$bad" >&2
    done
done

echo "== A/B, $CTX contexts, N=$N, W=$W, $(placement), $(idle_setting)"
echo "A = $A"
echo "B = $B"
python3 - "$RESULTS" "$TCK" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines()]
tck = int(sys.argv[2])
by = {"A": [], "B": []}
for r, s, rps, t, ok, bad in rows:
    cpu = int(t) / tck / int(ok) * 100000 if int(ok) else float("nan")
    by[s].append((float(rps), cpu, int(bad)))
print("round\tA req/s\tB req/s\tA CPU s/100k\tB CPU s/100k")
for i, (a, b) in enumerate(zip(by["A"], by["B"]), 1):
    print(f"{i}\t{a[0]:.0f}\t{b[0]:.0f}\t{a[1]:.3f}\t{b[1]:.3f}")
ma = [statistics.median(x[k] for x in by[s]) for s in "AB" for k in (0, 1)]
print(f"median req/s: A {ma[0]:.0f}, B {ma[2]:.0f}, B/A = {ma[2] / ma[0]:.3f}")
print(f"median gateway CPU s/100k: A {ma[1]:.3f}, B {ma[3]:.3f}, B/A = {ma[3] / ma[1]:.3f}")
wins = sum(1 for a, b in zip(by["A"], by["B"]) if b[1] < a[1])
print(f"rounds where B used less CPU per request: {wins} of {len(by['A'])}")
failed = sum(x[2] for s in "AB" for x in by[s])
if failed:
    print(f"WARNING: {failed} requests failed or timed out")
PY
