#!/usr/bin/env bash
# Scale targets of issue 5, end to end on loopback, in ONE run (bounded, stops what it starts):
#
# T1 "throughput with 10 000 contexts and 10 000 patterns within 10 % of one context":
#   (d)    load -> gateway (outbound OSCORE) -> `load --serve --credentials`, one context/pattern
#   (d10k) the same with CTX (10 000) patterns coap://127.0.0.1:PORT/c{i}/*, each its own
#          context directory (benches/gen_contexts.py); the load tool spreads its requests
#          round-robin over all of them (`--spread CTX`, URI .../c{i}/x), the origin holds
#          the CTX matching server contexts.
#   Both gateways (and their origins) run side by side. Before anything is measured:
#     d10k-cold  one request per context: opens every context at the gateway (lazily, on
#                first use; the origin answers each context's first request with 4.01 + Echo,
#                RFC 8613 App. B.1.2);
#     d10k-new   WARM_USES (120) more requests per context. This is the regime of contexts
#                that are new and busy: the persister raises every context's sequence-number
#                mark at uses 6, 21, 51 and 111 (its chunk doubles from 10, as aiocoap's;
#                RFC 8613 App. B.1.1), ~4 durable writes per context;
#     d-warm     1000 requests on the single context.
#   Then, once the gateway's persister thread has been idle for a second (the last raises of
#   d10k-new take it seconds to write; a round that overlapped them measured the writes),
#   ROUNDS (3) rounds of N requests each, (d) then (d10k). No context crosses a mark
#   in them (the next raise is at use 231 with the defaults), as the single context, whose
#   chunk has long reached its 10 000 limit, crosses one only every 10 000 requests. So the
#   two sides differ in the number of contexts and patterns only, and the rounds repeat the
#   comparison on this noisy 2-core machine: the ratio printed is median(d10k)/median(d).
#   Prints req/s, p50/p99, CPU s per 100k requests of the gateway alone and of the origin,
#   the gateway's start-up time (spawn until its port is bound and it answers) and its peak
#   RSS (VmHWM).
#
# T2 "10 000 concurrent Observe relations through the gateway with RSS under 100 MB": see the
#   second half (REL relations, `load --observe`).
#
# Usage: benches/scale.sh     (from the project root; builds the release binary unless SKIP_BUILD=1)
#        PIN=split W=256 ONLY=t1 benches/scale.sh   capacity: the gateways alone on CPU 1, the
#          load tool and origins on CPU 0, and a window that keeps the gateway busy, so that
#          req/s is the gateway's CPU per request rather than this VM's wake-up latencies
# Env:   HALTPOLL_NS=200000 (root; see benches/lib.sh); PIN=split|one (T1; see benches/lib.sh)
#        N=200000 W=64 CTX=10000 ROUNDS=3 WARM_USES=120 REL=10000 HOLD=20 NOTIFY_MS=2000
#        PORT_BASE=47500 LIMIT=120
#        ONLY=t1|t2 (one half)
set -euo pipefail

N=${N:-200000}
W=${W:-64}
CTX=${CTX:-10000}
ROUNDS=${ROUNDS:-3}
WARM_USES=${WARM_USES:-120}
REL=${REL:-10000}
HOLD=${HOLD:-20}
NOTIFY_MS=${NOTIFY_MS:-2000}
PORT_BASE=${PORT_BASE:-47500}
LIMIT=${LIMIT:-120}
ONLY=${ONLY:-}
NAME=scale
# closing 10 000 contexts writes 10 000 sequence.json files: allow up to 120 s;
# the origin opens 10 000 contexts before it binds: up to 300 s
STOP_WAIT_S=120
WAIT_PORT_S=300
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"

now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$2"; }

RESULTS=$TMP/results.tsv
: >"$RESULTS"

# measure ID LABEL GW_PID ORIGIN_PID -- LOAD_ARGS...
measure() {
    local id=$1 label=$2 gw=$3 origin=$4; shift 5
    local g0 o0 g1 o1 json
    g0=$(ticks "$gw"); o0=$(ticks "$origin")
    json=$(on_rest "$BIN" load "$@" --json --duration-limit "$LIMIT" --ack-timeout-ms 1000) || true
    g1=$(ticks "$gw"); o1=$(ticks "$origin")
    python3 - "$id" "$label" "$((g1 - g0))" "$((o1 - o0))" "$TCK" "$(hwm_kb "$gw")" "$json" >>"$RESULTS" <<'PY'
import json, sys
rid, label, gt, ot, tck, rss, text = sys.argv[1:8]
try:
    r = json.loads(text)
except Exception:
    print(f"{rid}\t{label}\tFAILED\t-\t-\t-\t-\t-\t-\t-\t{text[:200]!r}")
    sys.exit(0)
ok = r["ok"]
per = lambda t: int(t) / int(tck) / ok * 100000 if ok else float("nan")
note = f"{r['errors']} err {r['error_codes']}, {r['timeouts']} t/o, {r['unfinished']} unfinished" if (r["errors"] or r["timeouts"] or r["unfinished"]) else ""
print(f"{rid}\t{label}\t{r['window']}\t{r['completed']}\t{r['requests_per_s']:.0f}\t{r['latency_us']['p50']:.1f}\t{r['latency_us']['p99']:.1f}\t{per(gt):.2f}\t{per(ot):.2f}\t{int(rss)/1024:.1f}\t{note}")
PY
    tail -n 1 "$RESULTS" >&2
}

P=$PORT_BASE
GW=$((P + 10)); OORIGIN=$((P + 11)); GW10K=$((P + 12)); OORIGIN10K=$((P + 13))
EXTRA=$TMP/extra.txt
: >"$EXTRA"

gw_toml() { # gw_toml PORT [MAX_RELATIONS]
    cat <<TOML
[coap]
bind = ["127.0.0.1:$1"]
nstart = 64
[policy]
plain_forwarding = false
TOML
    if [ -n "${2:-}" ]; then printf '[observe]\nmax_relations = %s\n' "$2"; fi
}

# ---------------------------------------------------------------- T1: 10 000 contexts
if [ "$ONLY" != t2 ]; then
echo "== T1 (d): one context" >&2
mkdir -p "$TMP/ctx1"
python3 "$ROOT/benches/gen_contexts.py" "$TMP/ctx1/d" 1 --port $OORIGIN
# one pattern for every path, like e2e.sh's (d)
python3 - "$TMP/ctx1/d/gw.json" "$OORIGIN" <<'PY'
import json, sys
p, port = sys.argv[1], sys.argv[2]
json.dump({f"coap://127.0.0.1:{port}/*": {"oscore": {"basedir": "gw/c0"}}}, open(p, "w"))
PY
gw_toml $GW >"$TMP/gw1.toml"
start origin1 on_rest "$BIN" load --serve 127.0.0.1:$OORIGIN --credentials "$TMP/ctx1/d/server.json" --max-seconds 1200; O1=$LAST_PID
wait_port $OORIGIN $O1
t0=$(now)
start gw1 on_hop "$BIN" run --config "$TMP/gw1.toml" --credentials "$TMP/ctx1/d/gw.json"; G1=$LAST_PID
wait_port $GW $G1
echo "gateway start-up, 1 context: $(secs "$t0" "$(now)") s to bind, VmRSS $(( $(rss_kb $G1) / 1024 )) MB" >>"$EXTRA"
measure d-warm "one context, warm-up" "$G1" "$O1" -- coap://127.0.0.1:$OORIGIN/x --proxy coap://127.0.0.1:$GW --proxy-scheme --count 1000 --window "$W"

echo "== T1 (d10k): $CTX contexts and patterns" >&2
t0=$(now)
python3 "$ROOT/benches/gen_contexts.py" "$TMP/ctxk" "$CTX" --port $OORIGIN10K
echo "generating $CTX context pairs: $(secs "$t0" "$(now)") s" >>"$EXTRA"
gw_toml $GW10K >"$TMP/gwk.toml"
t0=$(now)
start origink on_rest "$BIN" load --serve 127.0.0.1:$OORIGIN10K --credentials "$TMP/ctxk/server.json" --max-seconds 1200; O10K=$LAST_PID
wait_port $OORIGIN10K $O10K
# the origin opens all its contexts before it answers: wait for its first answer
"$BIN" load coap://127.0.0.1:$OORIGIN10K/ping --count 1 --window 1 --timeout 300 --ack-timeout-ms 1000 --duration-limit 300 >/dev/null || true
echo "origin start-up, $CTX contexts (opened at start): $(secs "$t0" "$(now)") s until it answers, VmRSS $(( $(rss_kb $O10K) / 1024 )) MB" >>"$EXTRA"
t0=$(now)
start gwk on_hop "$BIN" run --config "$TMP/gwk.toml" --credentials "$TMP/ctxk/gw.json"; G10K=$LAST_PID
wait_port $GW10K $G10K
echo "gateway start-up, $CTX patterns: $(secs "$t0" "$(now)") s to bind, VmRSS $(( $(rss_kb $G10K) / 1024 )) MB" >>"$EXTRA"
spread=(--spread "$CTX" --proxy coap://127.0.0.1:$GW10K --proxy-scheme --window "$W")
t0=$(now)
measure d10k-cold "$CTX contexts, first use of each (open + Echo)" "$G10K" "$O10K" -- "coap://127.0.0.1:$OORIGIN10K/c{i}/x" "${spread[@]}" --count "$CTX"
echo "first pass over $CTX contexts (each opened at the gateway on first use): $(secs "$t0" "$(now)") s; gateway open fds $(ls /proc/$G10K/fd | wc -l)" >>"$EXTRA"
measure d10k-new "$CTX contexts, uses 2-$((WARM_USES + 1)) of each (persister raises each ~4 times)" "$G10K" "$O10K" -- "coap://127.0.0.1:$OORIGIN10K/c{i}/x" "${spread[@]}" --count $((WARM_USES * CTX))
# the raises of the pass above are still being written: the rounds start when they are done
echo "persister busy after d10k-new: $(wait_persister_idle "$G10K") s until idle" >>"$EXTRA"
for r in $(seq 1 "$ROUNDS"); do
    measure "d#$r" "one context, round $r" "$G1" "$O1" -- coap://127.0.0.1:$OORIGIN/x --proxy coap://127.0.0.1:$GW --proxy-scheme --count "$N" --window "$W"
    measure "d10k#$r" "$CTX contexts, round-robin, round $r" "$G10K" "$O10K" -- "coap://127.0.0.1:$OORIGIN10K/c{i}/x" "${spread[@]}" --count "$N"
done
echo "gateway VmRSS after the runs with $CTX contexts open: $(( $(rss_kb $G10K) / 1024 )) MB" >>"$EXTRA"
t0=$(now)
stop_pid "$G10K"
echo "gateway shutdown, $CTX contexts closed (sequence.json written each): $(secs "$t0" "$(now)") s" >>"$EXTRA"
stop_all
fi

# ---------------------------------------------------------------- T2: Observe relations
# REL relations from plain clients (`load --observe REL`, one socket, distinct tokens) through
# the gateway ([observe] max_relations = REL; the default is 64) to an OSCORE origin
# (`load --serve --credentials`, a notification per relation every NOTIFY_MS), held HOLD s,
# then deregistered. Reports the gateway's peak RSS (VmHWM; target < 100 MB), the
# notifications received per s and on how many relations, and its RSS/fds while holding.
OBS_JSON=
if [ "$ONLY" != t1 ]; then
echo "== T2: $REL Observe relations through the gateway" >&2
GWO=$((P + 14)); OORIGINO=$((P + 15))
python3 "$ROOT/benches/gen_contexts.py" "$TMP/ctxo" 1 --port $OORIGINO
python3 - "$TMP/ctxo/gw.json" "$OORIGINO" <<'PY'
import json, sys
p, port = sys.argv[1], sys.argv[2]
json.dump({f"coap://127.0.0.1:{port}/*": {"oscore": {"basedir": "gw/c0"}}}, open(p, "w"))
PY
gw_toml $GWO "$REL" >"$TMP/gwo.toml"
start origino "$BIN" load --serve 127.0.0.1:$OORIGINO --credentials "$TMP/ctxo/server.json" --notify-ms "$NOTIFY_MS" --max-relations "$REL" --max-seconds 1200; O=$LAST_PID
wait_port $OORIGINO $O
start gwo "$BIN" run --config "$TMP/gwo.toml" --credentials "$TMP/ctxo/gw.json"; G=$LAST_PID
wait_port $GWO $G
# no warm-up: the registrations are the first requests on the context, the origin answers
# them 4.01 + Echo (App. B.1.2) and the gateway registers again with the Echo
rss0=$(rss_kb "$G"); g0=$(ticks "$G"); o0=$(ticks "$O")
# sample the gateway while the relations are held
( sleep $((HOLD / 2 + 2)); { echo "gateway while holding $REL relations: VmRSS $(( $(rss_kb $G) / 1024 )) MB, open fds $(ls /proc/$G/fd | wc -l), threads $(awk '/^Threads/ {print $2}' /proc/$G/status)"; } >>"$EXTRA" ) &
SAMPLER=$!
OBS_JSON=$("$BIN" load coap://127.0.0.1:$OORIGINO/obs --proxy coap://127.0.0.1:$GWO --proxy-scheme --observe "$REL" --window "$W" --hold "$HOLD" --duration-limit "$LIMIT" --ack-timeout-ms 1000 --json) || true
wait $SAMPLER 2>/dev/null || true
g1=$(ticks "$G"); o1=$(ticks "$O")
echo "gateway before the relations: VmRSS $((rss0 / 1024)) MB; peak (VmHWM) over the run: $(( $(hwm_kb $G) / 1024 )) MB (target < 100 MB)" >>"$EXTRA"
echo "CPU during the Observe run: gateway $(python3 -c "print($((g1 - g0))/$TCK)") s, origin $(python3 -c "print($((o1 - o0))/$TCK)") s" >>"$EXTRA"
stop_all
echo "origin at exit: $(grep '^serve:' "$TMP/origino.log" || echo '(no summary)')" >>"$EXTRA"
fi

echo
echo "$(placement) (T1)"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'); load average $(cut -d' ' -f1-3 /proc/loadavg); $(idle_setting); RLIMIT_NOFILE $(ulimit -Sn)/$(ulimit -Hn)"
echo "N=$N W=$W CTX=$CTX; CPU = per 100k requests, gateway and origin separately; RSS = the gateway's peak (VmHWM)"
echo
cat "$EXTRA"
echo
python3 - "$RESULTS" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print("| run | path | W | requests | req/s | p50 µs | p99 µs | gateway CPU s /100k | origin CPU s /100k | gateway peak RSS MB | note |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
by = {}
for r in rows:
    print("| " + " | ".join(r + [""] * (11 - len(r))) + " |")
    by[r[0]] = r
def rate(k):
    try: return float(by[k][4])
    except Exception: return None
def median(xs):
    xs = sorted(xs); n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
print()
rounds = sorted({k.split("#")[1] for k in by if "#" in k}, key=int)
pairs = [(rate(f"d#{r}"), rate(f"d10k#{r}")) for r in rounds]
pairs = [(a, b) for a, b in pairs if a and b]
if pairs:
    print("per round (d10k)/(d): " + ", ".join(f"{b / a:.3f}" for a, b in pairs))
    d, k = median([a for a, _ in pairs]), median([b for _, b in pairs])
    print(f"median(d10k)/median(d) = {k:.0f}/{d:.0f} = {k / d:.3f}  (target >= 0.9)")
PY
if [ -n "$OBS_JSON" ]; then
    echo
    echo "Observe ($REL relations, notification every $NOTIFY_MS ms each, hold $HOLD s):"
    python3 - "$OBS_JSON" <<'PY'
import json, sys
try:
    r = json.loads(sys.argv[1])
except Exception:
    print(f"FAILED: {sys.argv[1][:300]!r}"); sys.exit(0)
print(f"registered {r['registered']}/{r['relations']} in {r['register_s']:.2f} s ({r['registration_failures']} failed); "
      f"notifications {r['notifications']} in {r['hold_s']:.1f} s = {r['notifications_per_s']:.0f}/s; "
      f"relations notified {r['relations_notified']} (per relation {r['min_notifications_per_relation']}..{r['max_notifications_per_relation']}); "
      f"ended by the server {r['ended_by_server']}; deregistered {r['deregistered']} ({r['deregistration_failures']} failed); "
      f"timeouts {r['timeouts']}, retransmissions {r['retransmissions']} {r['error_codes'] or ''}")
PY
fi
