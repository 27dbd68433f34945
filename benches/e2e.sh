#!/usr/bin/env bash
# End-to-end throughput and latency of one forwarding hop on loopback (issue 5), measured in
# ONE run with the same load tool (`oscore-gateway load`), the same window W and count N:
#
#   (a) load -> udp-echo                                  the kernel's ceiling
#   (b) load -> udp-relay -> udp-echo                     the simplest user-space hop
#   (c) load -> gateway (plain forward) -> plain origin   (load --serve)
#   (d) load -> gateway (outbound OSCORE) -> OSCORE origin (load --serve --credentials)
#   (e) OSCORE client -> gateway (inbound) -> plain origin (load --credentials -> gateway
#       holding the :client1 server context, [[route]] -> load --serve)
#   (f) load -> aiocoap-proxy -> aiocoap-fileserver      (small N: aiocoap is slow)
#   (g) load with OSCORE -> aiocoap-fileserver            (small N)
#
# The gateway runs with [coap] nstart = NSTART (default 64): with the RFC 7252 default of 1
# the gateway has one exchange at a time in flight toward the origin and measures the
# loopback round trip, not the gateway; row d-n1 shows that case.
#
# The main rows run at window W (64: the (d)/(b) target); d@32, f and g run at W32 (32: the
# (d)/(f) target); a1, b1, d1 at W=1 (the added-latency target); d1-bp is d1 with the
# gateway busy polling ([coap] busy_poll_us: one core busy while traffic flows).
#
# For each: requests/s, p50 and p99 latency, CPU seconds per 100k requests of the server-side
# processes (utime+stime from /proc/PID/stat, hop and origin together) and the hop's peak RSS
# (VmHWM); then (d)/(b), (d)/(f), and the gateway's added latency at W=1: p50(d) - p50(a).
#
# Loopback only, bounded (every load run has --duration-limit; every wait has a timeout),
# and every process it starts is stopped by PID on exit (trap).
#
# Proxied runs name the target with Proxy-Scheme + Uri-Host + Uri-Port (aiocoap-proxy answers
# Proxy-Uri with 5.01), the same request form for the gateway and aiocoap.
#
# Usage: benches/e2e.sh            (from the project root; builds the release binary)
# Env:   N=20000 W=64 W32=32 NSTART=64 NF=300 (aiocoap scenarios) N1=2000 (W=1 runs) PORT_BASE=47300
#        SKIP_BUILD=1  BIN=target/release/oscore-gateway  VENV=/work/main/target/interop/venv  INTEROP=/work/shared/interop
#        ROWS="b d d@32 d1 a1"  (only these rows; default: all)
#        BUSY_POLL_US=200  (the gateway's [coap] busy_poll_us in row d1-bp only; the other rows
#        run with the default, off)
#        PIN=split  (CPU placement for every row alike: every hop -- udp-relay, the gateways,
#        aiocoap-proxy -- on CPU 1, everything else -- the load tool, udp-echo, the origins --
#        on CPU 0, as a deployment that gives the gateway its own core would)
#        PIN=one    (every process on CPU 0: no cross-CPU wake-ups at all)
#        Default: no pinning, the kernel places the processes.
#        HALTPOLL_NS=200000  (root: the guest's cpuidle halt polling for this run, restored on
#        exit; see benches/lib.sh. The header prints the setting in force.)
set -euo pipefail

N=${N:-20000}
W=${W:-64}
W32=${W32:-32}
NSTART=${NSTART:-64}
NF=${NF:-300}
N1=${N1:-2000}
PORT_BASE=${PORT_BASE:-47300}
LIMIT=${LIMIT:-60}
ROWS=${ROWS:-}
BUSY_POLL_US=${BUSY_POLL_US:-200}
NAME=e2e
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
VENV=${VENV:-$ROOT/target/interop/venv}
[ -x "$VENV/bin/python" ] || VENV=/work/main/target/interop/venv
INTEROP=${INTEROP:-$ROOT/../shared/interop}
[ -d "$INTEROP" ] || INTEROP=/work/shared/interop

RESULTS=$TMP/results.tsv
: >"$RESULTS"

want() { [ -z "$ROWS" ] || [[ " $ROWS " == *" $1 "* ]]; }

# measure ID LABEL "SERVER_PIDS" HOP_PID -- LOAD_ARGS...
measure() {
    local id=$1 label=$2 servers=$3 hop=$4; shift 5
    want "$id" || return 0
    local before=0 after=0 p json
    for p in $servers; do before=$((before + $(ticks "$p"))); done
    json=$(on_rest "$BIN" load "$@" --json --duration-limit "$LIMIT" --ack-timeout-ms 1000) || true
    for p in $servers; do after=$((after + $(ticks "$p"))); done
    local rss
    rss=$(hwm_kb "$hop")
    python3 - "$id" "$label" "$((after - before))" "$TCK" "$rss" "$json" >>"$RESULTS" <<'PY'
import json, sys
rid, label, dticks, tck, rss, text = sys.argv[1:7]
try:
    r = json.loads(text)
except Exception:
    print(f"{rid}\t{label}\tFAILED\t-\t-\t-\t-\t-\t{text[:200]!r}")
    sys.exit(0)
ok = r["ok"]
cpu = int(dticks) / int(tck)
per100k = cpu / ok * 100000 if ok else float("nan")
note = f"{r['errors']} err, {r['timeouts']} t/o, {r['unfinished']} unfinished" if (r["errors"] or r["timeouts"] or r["unfinished"]) else ""
print(f"{rid}\t{label}\t{r['window']}\t{r['completed']}\t{r['requests_per_s']:.0f}\t{r['latency_us']['p50']:.1f}\t{r['latency_us']['p99']:.1f}\t{per100k:.2f}\t{int(rss)/1024:.1f}\t{note}")
PY
    tail -n 1 "$RESULTS" >&2
}

P=$PORT_BASE
ECHO=$P; RELAY=$((P + 1)); ORIGIN=$((P + 2)); GW=$((P + 3)); OORIGIN=$((P + 4))
AIO_FS=$((P + 5)); AIO_PROXY=$((P + 6)); AIO_OFS=$((P + 7))

echo "== (a) load -> udp-echo" >&2
start echo on_rest "$BIN" load --udp-echo 127.0.0.1:$ECHO --max-seconds 600; E=$LAST_PID
wait_port $ECHO
measure a "load -> udp-echo" "$E" "$E" -- coap://127.0.0.1:$ECHO/x --count "$N" --window "$W"
measure a1 "load -> udp-echo" "$E" "$E" -- coap://127.0.0.1:$ECHO/x --count "$N1" --window 1

echo "== (b) load -> udp-relay -> udp-echo" >&2
start relay on_hop "$BIN" load --udp-relay 127.0.0.1:$RELAY --to 127.0.0.1:$ECHO --max-seconds 600; R=$LAST_PID
wait_port $RELAY
measure b "load -> udp-relay -> udp-echo" "$R $E" "$R" -- coap://127.0.0.1:$RELAY/x --count "$N" --window "$W"
measure b1 "load -> udp-relay -> udp-echo" "$R $E" "$R" -- coap://127.0.0.1:$RELAY/x --count "$N1" --window 1
stop_all

echo "== (c) load -> gateway (plain forward) -> plain origin" >&2
cat >"$TMP/plain.toml" <<TOML
[coap]
bind = ["127.0.0.1:$GW"]
nstart = $NSTART
[policy]
plain_forwarding = true
TOML
start origin on_rest "$BIN" load --serve 127.0.0.1:$ORIGIN --max-seconds 600; O=$LAST_PID
start gw-plain on_hop "$BIN" run --config "$TMP/plain.toml"; G=$LAST_PID
wait_port $ORIGIN; wait_port $GW
measure c "load -> gateway (plain) -> origin" "$G $O" "$G" -- coap://127.0.0.1:$ORIGIN/x --proxy coap://127.0.0.1:$GW --proxy-scheme --count "$N" --window "$W"
stop_all

echo "== (d) load -> gateway (outbound OSCORE) -> OSCORE origin" >&2
HAVE_VENV=
[ -x "$VENV/bin/python" ] && [ -f "$INTEROP/make_contexts.py" ] && HAVE_VENV=1
if [ -n "$HAVE_VENV" ]; then
    "$VENV/bin/python" "$INTEROP/make_contexts.py" "$TMP/ctx-d" gw=04 --port $OORIGIN --host 127.0.0.1 >/dev/null
else
    # Without the interop venv: write one context pair by hand (aiocoap's format).
    mkdir -p "$TMP/ctx-d/gw" "$TMP/ctx-d/server"
    printf '{"sender-id_hex":"04","recipient-id_ascii":"file","secret_ascii":"e2e"}' >"$TMP/ctx-d/gw/settings.json"
    printf '{"sender-id_ascii":"file","recipient-id_hex":"04","secret_ascii":"e2e"}' >"$TMP/ctx-d/server/settings.json"
    printf '{"coap://127.0.0.1:%s/*":{"oscore":{"basedir":"%s"}}}' $OORIGIN "$TMP/ctx-d/gw" >"$TMP/ctx-d/gw.json"
    printf '{":gw":{"oscore":{"basedir":"%s"}}}' "$TMP/ctx-d/server" >"$TMP/ctx-d/server.json"
fi
oscore_toml() { # oscore_toml NSTART [BUSY_POLL_US]
    cat <<TOML
[coap]
bind = ["127.0.0.1:$GW"]
nstart = $1
${2:+busy_poll_us = $2}
[policy]
plain_forwarding = false
TOML
}
oscore_toml "$NSTART" >"$TMP/oscore.toml"
oscore_toml 1 >"$TMP/oscore-n1.toml"
oscore_toml "$NSTART" "$BUSY_POLL_US" >"$TMP/oscore-bp.toml"
start oorigin on_rest "$BIN" load --serve 127.0.0.1:$OORIGIN --credentials "$TMP/ctx-d/server.json" --max-seconds 600; O=$LAST_PID
start gw-oscore on_hop "$BIN" run --config "$TMP/oscore.toml" --credentials "$TMP/ctx-d/gw.json"; G=$LAST_PID
wait_port $OORIGIN; wait_port $GW
measure d "load -> gateway (OSCORE out) -> origin" "$G $O" "$G" -- coap://127.0.0.1:$OORIGIN/x --proxy coap://127.0.0.1:$GW --proxy-scheme --count "$N" --window "$W"
measure d@32 "load -> gateway (OSCORE out) -> origin" "$G $O" "$G" -- coap://127.0.0.1:$OORIGIN/x --proxy coap://127.0.0.1:$GW --proxy-scheme --count "$N" --window "$W32"
measure d1 "load -> gateway (OSCORE out) -> origin" "$G $O" "$G" -- coap://127.0.0.1:$OORIGIN/x --proxy coap://127.0.0.1:$GW --proxy-scheme --count "$N1" --window 1
stop_pid "$G"
start gw-oscore-n1 on_hop "$BIN" run --config "$TMP/oscore-n1.toml" --credentials "$TMP/ctx-d/gw.json"; G=$LAST_PID
wait_port $GW
measure d-n1 "same as d, gateway nstart = 1" "$G $O" "$G" -- coap://127.0.0.1:$OORIGIN/x --proxy coap://127.0.0.1:$GW --proxy-scheme --count "$N" --window "$W"
if want d1-bp; then
    stop_pid "$G"
    start gw-oscore-bp on_hop "$BIN" run --config "$TMP/oscore-bp.toml" --credentials "$TMP/ctx-d/gw.json"; G=$LAST_PID
    wait_port $GW
    measure d1-bp "same as d1, gateway busy_poll_us = $BUSY_POLL_US" "$G $O" "$G" -- coap://127.0.0.1:$OORIGIN/x --proxy coap://127.0.0.1:$GW --proxy-scheme --count "$N1" --window 1
fi
stop_all

echo "== (e) OSCORE client -> gateway (inbound) -> plain origin" >&2
# The client's and the gateway's halves of one context pair (aiocoap's settings.json format):
# the load tool protects with the client half for coap://127.0.0.1:$GW/*, the gateway holds
# the other half as the server-side context :client1 and routes everything to the origin.
mkdir -p "$TMP/ctx-e/client" "$TMP/ctx-e/gw"
printf '{"sender-id_hex":"01","recipient-id_ascii":"gw","secret_ascii":"e2e-inbound"}' >"$TMP/ctx-e/client/settings.json"
printf '{"sender-id_ascii":"gw","recipient-id_hex":"01","secret_ascii":"e2e-inbound"}' >"$TMP/ctx-e/gw/settings.json"
printf '{"coap://127.0.0.1:%s/*":{"oscore":{"basedir":"%s"}}}' $GW "$TMP/ctx-e/client" >"$TMP/ctx-e/client.json"
printf '{":client1":{"oscore":{"basedir":"%s"}}}' "$TMP/ctx-e/gw" >"$TMP/ctx-e/gw.json"
cat >"$TMP/inbound.toml" <<TOML
[coap]
bind = ["127.0.0.1:$GW"]
nstart = $NSTART
[policy]
plain_forwarding = false
[[route]]
target = "coap://127.0.0.1:$ORIGIN"
allow = [":client1"]
TOML
start origin on_rest "$BIN" load --serve 127.0.0.1:$ORIGIN --max-seconds 600; O=$LAST_PID
start gw-inbound on_hop "$BIN" run --config "$TMP/inbound.toml" --credentials "$TMP/ctx-e/gw.json"; G=$LAST_PID
wait_port $ORIGIN; wait_port $GW
measure e "OSCORE load -> gateway (inbound) -> origin" "$G $O" "$G" -- coap://127.0.0.1:$GW/x --credentials "$TMP/ctx-e/client.json" --count "$N" --window "$W"
stop_all

if [ -n "$HAVE_VENV" ]; then
    echo "== (f) load -> aiocoap-proxy -> aiocoap-fileserver" >&2
    mkdir -p "$TMP/data"; printf 'hello world, a 30 byte file.\n' >"$TMP/data/hello.txt"
    start fs on_rest "$VENV/bin/aiocoap-fileserver" "$TMP/data" --bind 127.0.0.1:$AIO_FS; FS=$LAST_PID
    start aproxy on_hop "$VENV/bin/aiocoap-proxy" --forward --bind 127.0.0.1:$AIO_PROXY; AP=$LAST_PID
    wait_port $AIO_FS; wait_port $AIO_PROXY
    measure f "load -> aiocoap-proxy -> aiocoap-fileserver" "$AP $FS" "$AP" -- coap://127.0.0.1:$AIO_FS/hello.txt --proxy coap://127.0.0.1:$AIO_PROXY --proxy-scheme --count "$NF" --window "$W32"
    stop_all

    echo "== (g) load with OSCORE -> aiocoap-fileserver" >&2
    "$VENV/bin/python" "$INTEROP/make_contexts.py" "$TMP/ctx-g" bench=03 --port $AIO_OFS --host 127.0.0.1 >/dev/null
    start ofs on_rest "$VENV/bin/aiocoap-fileserver" "$TMP/data" --bind 127.0.0.1:$AIO_OFS --credentials "$TMP/ctx-g/server.json"; FS=$LAST_PID
    wait_port $AIO_OFS
    measure g "load OSCORE -> aiocoap-fileserver" "$FS" "$FS" -- coap://127.0.0.1:$AIO_OFS/hello.txt --credentials "$TMP/ctx-g/bench.json" --count "$NF" --window "$W32"
    stop_all
else
    printf 'f\taiocoap-proxy\tskipped: no aiocoap venv at %s\n' "$VENV" >>"$RESULTS"
    printf 'g\taiocoap-fileserver OSCORE\tskipped: no aiocoap venv at %s\n' "$VENV" >>"$RESULTS"
fi

echo
echo "$(placement)"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'); load average $(cut -d' ' -f1-3 /proc/loadavg); $(idle_setting)"
echo "N=$N W=$W (d@32: W=$W32; aiocoap scenarios N=$NF W=$W32; W=1 rows N=$N1); gateway [coap] nstart=$NSTART except d-n1; release build, RUSTFLAGS='${RUSTFLAGS:-}'; CPU = server-side processes (hop + origin) per 100k requests; RSS = the hop's peak (VmHWM)"
echo
python3 - "$RESULTS" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print("| run | path | W | requests | req/s | p50 µs | p99 µs | CPU s /100k | hop peak RSS MB | note |")
print("|---|---|---|---|---|---|---|---|---|---|")
by = {}
for r in rows:
    if len(r) >= 9:
        print("| " + " | ".join(r[:9] + [r[9] if len(r) > 9 else ""]) + " |")
        by[r[0]] = r
    else:
        print(f"| {r[0]} | {r[1]} | | | | | | | | {' '.join(r[2:])} |")
def rate(k):
    try: return float(by[k][4])
    except Exception: return None
def p50(k):
    try: return float(by[k][5])
    except Exception: return None
print()
d, b, d32, f = rate("d"), rate("b"), rate("d@32"), rate("f")
if d and b: print(f"(d)/(b) at W={by['d'][2]} = {d/b:.3f}  (target >= 0.5 at W=64)")
if d32 and f: print(f"(d@32)/(f) at W={by['f'][2]} = {d32/f:.1f}  (target >= 100 at W=32)")
if p50("d1") is not None and p50("a1") is not None:
    print(f"added latency at W=1: p50(d) - p50(a) = {p50('d1') - p50('a1'):.1f} µs  (target <= 30)")
if p50("d1-bp") is not None and p50("a1") is not None:
    print(f"added latency at W=1, gateway busy polling: p50(d1-bp) - p50(a) = {p50('d1-bp') - p50('a1'):.1f} µs  (one core busy while traffic flows)")
PY
