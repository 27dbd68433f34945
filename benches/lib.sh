# Shared by benches/e2e.sh and benches/scale.sh (sourced, not run): the build step, the temp
# dir, starting and stopping background processes by PID, waiting for a UDP port, and the
# /proc readings. Before sourcing set NAME (temp dir prefix) and, optionally, STOP_WAIT_S
# (how long a stopped process may take to exit after SIGTERM before SIGKILL; default 5)
# and WAIT_PORT_S (how long wait_port waits; default 20). KEEP_TMP=1 keeps the temp dir
# (every process's log, the generated contexts) for a look after the run.
#
# HALTPOLL_NS=N (opt-in, needs root): for the run, set the guest's cpuidle halt polling
# (/sys/module/haltpoll/parameters/guest_halt_poll_ns, Documentation/virt/guest-halt-polling.rst;
# the kernel's default is 200000) and put the old value back on exit. A KVM/Firecracker guest
# booted with haltpoll.guest_halt_poll_ns=0 halts an idle vCPU at once, and every wake-up of
# it by another vCPU is then an IPI through the host (tens of µs); with polling on, a vCPU
# that went idle a moment ago notices the wake-up itself. It changes the machine, not the
# programs measured, and applies to every row alike. `idle_setting` prints what is in force.

# PIN=split|one: CPU placement (see the scripts' headers). on_hop CMD... / on_rest CMD...
# exec CMD on the hop's (relay, gateway) / the others' (load tool, echo, origins) CPU per
# PIN; exec, so that `start`'s $! is the program's own PID.
PIN=${PIN:-}
case "$PIN" in
    "") HOP_CPU=""; REST_CPU="" ;;
    split) HOP_CPU=1; REST_CPU=0 ;;
    one) HOP_CPU=0; REST_CPU=0 ;;
    *) echo "PIN=$PIN: expected split or one" >&2; exit 2 ;;
esac
on_hop() { if [ -n "$HOP_CPU" ]; then exec taskset -c "$HOP_CPU" "$@"; else exec "$@"; fi; }
on_rest() { if [ -n "$REST_CPU" ]; then exec taskset -c "$REST_CPU" "$@"; else exec "$@"; fi; }
placement() {
    case "$PIN" in
        split) echo "placement: PIN=split: hops on CPU 1; load tool, echo and origins on CPU 0" ;;
        one) echo "placement: PIN=one: every process on CPU 0" ;;
        *) echo "placement: not pinned (the kernel places the processes)" ;;
    esac
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BIN:-$ROOT/target/release/oscore-gateway}
TCK=$(getconf CLK_TCK)
STOP_WAIT_S=${STOP_WAIT_S:-5}
WAIT_PORT_S=${WAIT_PORT_S:-20}

if [ -z "${SKIP_BUILD:-}" ]; then
    (cd "$ROOT" && cargo build --release --bin oscore-gateway >&2)
fi

TMP=$(mktemp -d "/tmp/oscore-$NAME.XXXXXX")
PIDS=()

# stop_pid PID: SIGTERM, wait up to STOP_WAIT_S, then SIGKILL.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 1 $((STOP_WAIT_S * 20))); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.05
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

stop_all() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    PIDS=()
}

HALTPOLL_FILE=/sys/module/haltpoll/parameters/guest_halt_poll_ns
HALTPOLL_OLD=
restore_haltpoll() {
    if [ -n "$HALTPOLL_OLD" ]; then echo "$HALTPOLL_OLD" >"$HALTPOLL_FILE" || true; HALTPOLL_OLD=; fi
}

cleanup() {
    stop_all
    restore_haltpoll
    if [ -n "${KEEP_TMP:-}" ]; then echo "logs and contexts kept in $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "${HALTPOLL_NS:-}" ]; then
    case "$HALTPOLL_NS" in *[!0-9]*) echo "HALTPOLL_NS=$HALTPOLL_NS: expected nanoseconds" >&2; exit 2 ;; esac
    if [ ! -w "$HALTPOLL_FILE" ]; then
        echo "HALTPOLL_NS: $HALTPOLL_FILE is missing or not writable (needs root and the cpuidle-haltpoll driver)" >&2
        exit 2
    fi
    HALTPOLL_OLD=$(cat "$HALTPOLL_FILE")
    echo "$HALTPOLL_NS" >"$HALTPOLL_FILE"
fi

# idle_setting: the guest's idle driver and halt-polling limit, for the report header.
idle_setting() {
    local drv
    drv=$(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || echo none)
    if [ -r "$HALTPOLL_FILE" ]; then
        printf 'cpuidle %s, guest_halt_poll_ns=%s%s' "$drv" "$(cat "$HALTPOLL_FILE")" \
            "${HALTPOLL_OLD:+ (set by HALTPOLL_NS for this run; was $HALTPOLL_OLD)}"
    else
        printf 'cpuidle %s' "$drv"
    fi
}

# start NAME CMD...: runs CMD in the background, logs to $TMP/NAME.log, sets $LAST_PID.
start() {
    local name=$1; shift
    "$@" >"$TMP/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# wait_port PORT [PID]: until something has bound UDP 127.0.0.1:PORT (at most WAIT_PORT_S;
# gives up early when PID has died). aiocoap binds an IPv6 socket (127.0.0.1 as
# ::ffff:127.0.0.1), so udp6 is searched too.
wait_port() {
    local hex i
    hex=$(printf ':%04X$' "$1")
    for i in $(seq 1 $((WAIT_PORT_S * 20))); do
        if awk '{print $2}' /proc/net/udp /proc/net/udp6 2>/dev/null | grep -q "$hex"; then return 0; fi
        if [ -n "${2:-}" ]; then kill -0 "$2" 2>/dev/null || break; fi
        sleep 0.05
    done
    echo "port $1 was not bound within $WAIT_PORT_S s; logs:" >&2
    tail -n 20 "$TMP"/*.log >&2 || true
    exit 1
}

ticks() { # utime+stime of PID in clock ticks
    stat_ticks "/proc/$1/stat"
}
stat_ticks() { # utime+stime from a /proc stat file (fields 14, 15 after the comm)
    sed 's/^.*) //' "$1" 2>/dev/null | awk '{print $12 + $13}'
}
# Waits (at most $2 s, default 60) until the sequence persister thread of gateway PID $1
# (thread name oscore-persist) used no CPU for one second, and prints how long that took.
# A pass that follows one in which many contexts crossed a mark would otherwise share the
# CPU with those contexts' durable writes (10 000 raises take seconds).
wait_persister_idle() {
    local pid=$1 limit=${2:-60} task="" t start last now
    for t in /proc/"$pid"/task/*; do
        if [ "$(cat "$t/comm" 2>/dev/null)" = oscore-persist ]; then task=$t; fi
    done
    if [ -z "$task" ]; then echo 0; return; fi
    start=$(date +%s.%N)
    last=$(stat_ticks "$task/stat")
    for _ in $(seq "$limit"); do
        sleep 1
        now=$(stat_ticks "$task/stat")
        if [ "$now" = "$last" ]; then break; fi
        last=$now
    done
    awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'
}
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
