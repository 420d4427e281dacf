#!/usr/bin/env bash
# firecracker.sh - MEASUREMENT ONLY (run by `cargo xtask bench --nested --firecracker BIN`) harness: Firecracker cold boot and snapshot-restore
# latency up to the in-guest agent answering `GET /health` with 204 on vsock port 49983.
#
# Required env:
#   KERNEL   uncompressed vmlinux
#   ROOTFS   ext4 image (never written: every boot gets its own sparse/reflink copy)
# Optional env:
#   N                boots and snapshot loads per series (default 10)
#   READY_TIMEOUT    seconds to wait for /health 204 per boot/load (default 180)
#   FC_BIN           firecracker binary (required: built from source for measurement only,
#                    never part of this repository)
#   PROBE            vsock probe helper (default: firecracker_probe.py next to this script)
#   VSOCK_PORT       guest agent port (default 49983)
#   BOOT_ARGS        kernel cmdline (default below)
#   API_TIMEOUT      curl --max-time per API call (default 30)
#   TMPBASE          where per-run temp dirs go (default /tmp; keep it short: UDS paths <108 chars)
#   ALLOW_NOT_READY  1 = do not abort when /health never answers; record the failure and go on
#                    through pause/snapshot/load API steps anyway (for dry runs on hosts where
#                    the guest cannot boot). Default 0: abort with an error.
#   KEEP_TMP         1 = keep the temp dir (logs, serial console output) for inspection
#
# Output (stdout): one JSON line per series, e.g.
#   {"name":"firecracker: boot -> envd /health 204","runtime":"firecracker","samples_ns":[...]}
#   {"name":"firecracker: snapshot load -> envd /health 204","runtime":"firecracker","samples_ns":[...]}
# (with ALLOW_NOT_READY=1 and failures, a "failed":<count> key is added.)
# Progress and errors go to stderr.
#
# Timed window: from just before the firecracker process is launched (after the per-boot rootfs
# copy and after the probe process is initialised) to the moment the probe reads the
# `HTTP/1.1 204` status line. Clock: CLOCK_REALTIME on both sides (bash $EPOCHREALTIME, us
# resolution; python time.time_ns()).
set -uo pipefail
export LC_ALL=C   # $EPOCHREALTIME must use '.' as decimal separator

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FC_BIN=${FC_BIN:?set FC_BIN to a firecracker binary}
PROBE=${PROBE:-$HERE/firecracker_probe.py}
: "${KERNEL:?set KERNEL to an uncompressed vmlinux}"
: "${ROOTFS:?set ROOTFS to an ext4 image}"
N=${N:-10}
READY_TIMEOUT=${READY_TIMEOUT:-180}
API_TIMEOUT=${API_TIMEOUT:-30}
VSOCK_PORT=${VSOCK_PORT:-49983}
BOOT_ARGS=${BOOT_ARGS:-"console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw init=/usr/local/sbin/sandmesh-init"}
ALLOW_NOT_READY=${ALLOW_NOT_READY:-0}
KEEP_TMP=${KEEP_TMP:-0}
TMPBASE=${TMPBASE:-/tmp}

log() { echo "[fc_bench] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ -x $FC_BIN ]] || die "firecracker binary not executable: $FC_BIN"
[[ -f $PROBE ]] || die "probe helper missing: $PROBE"
[[ -r $KERNEL ]] || die "KERNEL not readable: $KERNEL"
[[ -r $ROOTFS ]] || die "ROOTFS not readable: $ROOTFS"
[[ -r /dev/kvm && -w /dev/kvm ]] || die "/dev/kvm not accessible"
command -v curl >/dev/null || die "curl not found"
command -v python3 >/dev/null || die "python3 not found"
[[ $N =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer (got '$N')"

ROOT=$(mktemp -d "$TMPBASE/fcb.XXXXXX") || die "mktemp failed"
declare -A LIVE=()          # pid -> 1 for every process we started and have not reaped

cleanup() {
    local p
    for p in "${!LIVE[@]}"; do kill -KILL "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    if [[ $KEEP_TMP == 1 ]]; then log "kept temp dir $ROOT"; else rm -rf "$ROOT"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# fork-free sub-second sleep: read with timeout on a private fifo nobody writes to
mkfifo "$ROOT/.sleep" && exec {SLEEPFD}<>"$ROOT/.sleep"
msleep() { read -r -t "$1" -u "$SLEEPFD" _ 2>/dev/null || true; }

reap() {  # reap <pid>: SIGKILL and wait
    kill -KILL "$1" 2>/dev/null
    wait "$1" 2>/dev/null
    unset "LIVE[$1]"
}

# api <dir> <METHOD> <path> [json-body]  -> 0 on 2xx, else logs the answer and returns 1
api() {
    local d=$1 method=$2 path=$3 body=${4:-} code tries=0
    local -a data=()
    [[ -n $body ]] && data=(-d "$body")
    while :; do
        code=$(curl -sS --max-time "$API_TIMEOUT" --unix-socket "$d/api.sock" -X "$method" \
                 -H 'Content-Type: application/json' -H 'Accept: application/json' \
                 "${data[@]}" -o "$d/api.resp" -w '%{http_code}' "http://localhost$path" 2>"$d/api.err")
        # 000 = could not connect (socket created but not listening yet): retry briefly
        if [[ $code == 000 && $tries -lt 500 ]]; then tries=$((tries+1)); msleep 0.002; continue; fi
        break
    done
    if [[ $code == 2?? ]]; then return 0; fi
    log "API $method $path failed: HTTP $code $(cat "$d/api.resp" 2>/dev/null) $(cat "$d/api.err" 2>/dev/null)"
    log "firecracker log tail ($d/fc.log):"; tail -n 15 "$d/fc.log" >&2 2>/dev/null
    return 1
}

# start_probe <dir> <uds>: start the health probe and wait until it is initialised (untimed)
start_probe() {
    local d=$1 uds=$2 i
    rm -f "$d/probe.ready" "$d/fc.pid"
    python3 "$PROBE" "$uds" "$VSOCK_PORT" "$READY_TIMEOUT" "$d/fc.pid" "$d/probe.ready" \
        >"$d/probe.out" 2>"$d/probe.err" &
    PROBE_PID=$!; LIVE[$PROBE_PID]=1
    for ((i = 0; i < 5000; i++)); do [[ -e $d/probe.ready ]] && return 0; msleep 0.002; done
    die "probe helper did not start: $(cat "$d/probe.err")"
}

# launch_fc <dir>: start firecracker with its API socket in <dir>; wait for the socket
launch_fc() {
    local d=$1 i
    "$FC_BIN" --api-sock "$d/api.sock" --id "fcb$$" </dev/null >"$d/fc.log" 2>&1 &
    FC_PID=$!; LIVE[$FC_PID]=1
    echo "$FC_PID" >"$d/fc.pid"
    for ((i = 0; i < 5000; i++)); do
        [[ -S $d/api.sock ]] && return 0
        kill -0 "$FC_PID" 2>/dev/null || break
        msleep 0.001
    done
    log "firecracker did not create its API socket; log:"; cat "$d/fc.log" >&2
    return 1
}

# wait_ready <dir> <label>: wait for the probe; sets SAMPLE_NS (or returns 1)
wait_ready() {
    local d=$1 label=$2 rc
    wait "$PROBE_PID"; rc=$?; unset "LIVE[$PROBE_PID]"
    if [[ $rc == 0 ]]; then
        SAMPLE_NS=$(( $(cat "$d/probe.out") - T0_US * 1000 ))
        return 0
    fi
    case $rc in
        2) log "ERROR: $label: guest agent did not answer GET /health 204 on vsock port $VSOCK_PORT within READY_TIMEOUT=${READY_TIMEOUT}s" ;;
        3) log "ERROR: $label: firecracker exited before the guest agent became ready" ;;
        *) log "ERROR: $label: probe failed (rc=$rc)" ;;
    esac
    log "  probe: $(cat "$d/probe.err")"
    log "  firecracker log / serial console tail ($d/fc.log):"
    tail -n 15 "$d/fc.log" | sed 's/^/    | /' >&2
    return 1
}

not_ready() {  # decide whether a readiness failure aborts the run
    [[ $ALLOW_NOT_READY == 1 ]] || die "aborting (set ALLOW_NOT_READY=1 to continue through the API steps anyway)"
    log "ALLOW_NOT_READY=1: recording the failure and continuing"
}

json_line() {  # json_line <name> <failed> <samples...>
    local name=$1 failed=$2; shift 2
    local IFS=,
    local extra=""
    [[ $failed -gt 0 ]] && extra=",\"failed\":$failed"
    printf '{"name":"%s","runtime":"firecracker","samples_ns":[%s]%s}\n' "$name" "$*" "$extra"
}

log "firecracker: $("$FC_BIN" --version 2>&1 | head -n1)"
log "kernel=$KERNEL rootfs=$ROOTFS N=$N READY_TIMEOUT=${READY_TIMEOUT}s tmp=$ROOT"

# ---------------------------------------------------------------- series 1: cold boot
BOOT_SAMPLES=(); BOOT_FAILED=0
SNAP=""   # dir of boot 1, which holds the snapshot (its drive path is recorded in it)
for ((b = 1; b <= N; b++)); do
    D="$ROOT/boot$b"; mkdir -p "$D"
    cp --sparse=always --reflink=auto "$ROOTFS" "$D/rootfs.ext4" || die "rootfs copy failed"
    start_probe "$D" "$D/v.sock"

    T0_US=${EPOCHREALTIME/./}                      # ---- timed window starts
    launch_fc "$D" || die "boot $b: firecracker did not start"
    api "$D" PUT /machine-config '{"vcpu_count":1,"mem_size_mib":512}' || die "boot $b: machine-config"
    api "$D" PUT /boot-source "{\"kernel_image_path\":\"$KERNEL\",\"boot_args\":\"$BOOT_ARGS\"}" || die "boot $b: boot-source"
    api "$D" PUT /drives/rootfs "{\"drive_id\":\"rootfs\",\"path_on_host\":\"$D/rootfs.ext4\",\"is_root_device\":true,\"is_read_only\":false}" || die "boot $b: drives"
    api "$D" PUT /vsock "{\"guest_cid\":3,\"uds_path\":\"$D/v.sock\"}" || die "boot $b: vsock"
    api "$D" PUT /actions '{"action_type":"InstanceStart"}' || die "boot $b: InstanceStart"
    [[ $b == 1 ]] && log "boot 1: configuration + InstanceStart accepted (pid $FC_PID); waiting for /health 204"
    if wait_ready "$D" "boot $b"; then                # ---- timed window ends
        BOOT_SAMPLES+=("$SAMPLE_NS")
        log "boot $b: $((SAMPLE_NS / 1000)) us"
    else
        BOOT_FAILED=$((BOOT_FAILED + 1)); not_ready
    fi

    if [[ $b == 1 ]]; then
        # snapshot the first VM (guest agent idle and ready)
        api "$D" PATCH /vm '{"state":"Paused"}' || die "pause failed"
        api "$D" PUT /snapshot/create "{\"snapshot_type\":\"Full\",\"snapshot_path\":\"$D/vm.snap\",\"mem_file_path\":\"$D/vm.mem\"}" \
            || die "snapshot create failed"
        log "boot 1: paused and snapshotted ($(du -h --apparent-size "$D/vm.mem" | cut -f1) mem, $(du -h "$D/vm.snap" | cut -f1) state)"
        reap "$FC_PID"
        # disk state matching the snapshot; restored to the recorded drive path before every load
        cp --sparse=always --reflink=auto "$D/rootfs.ext4" "$D/rootfs.pristine" || die "rootfs copy failed"
        SNAP=$D
    else
        reap "$FC_PID"
        rm -rf "$D"
    fi
done

# ---------------------------------------------------------------- series 2: snapshot load
LOAD_SAMPLES=(); LOAD_FAILED=0
for ((r = 1; r <= N; r++)); do
    D="$ROOT/load$r"; mkdir -p "$D"
    # the snapshot re-opens the drive at its recorded path ($SNAP/rootfs.ext4): reset it (untimed)
    cp --sparse=always --reflink=auto "$SNAP/rootfs.pristine" "$SNAP/rootfs.ext4" || die "rootfs reset failed"
    start_probe "$D" "$D/v.sock"

    T0_US=${EPOCHREALTIME/./}                      # ---- timed window starts
    launch_fc "$D" || die "load $r: firecracker did not start"
    api "$D" PUT /snapshot/load "{\"snapshot_path\":\"$SNAP/vm.snap\",\"mem_backend\":{\"backend_type\":\"File\",\"backend_path\":\"$SNAP/vm.mem\"},\"resume_vm\":true,\"vsock_override\":{\"uds_path\":\"$D/v.sock\"}}" \
        || die "load $r: snapshot load failed"
    [[ $r == 1 ]] && log "load 1: snapshot load + resume accepted (pid $FC_PID); waiting for /health 204"
    if wait_ready "$D" "load $r"; then                # ---- timed window ends
        LOAD_SAMPLES+=("$SAMPLE_NS")
        log "load $r: $((SAMPLE_NS / 1000)) us"
    else
        LOAD_FAILED=$((LOAD_FAILED + 1)); not_ready
    fi
    reap "$FC_PID"
    rm -rf "$D"
done

json_line "firecracker: boot -> envd /health 204" "$BOOT_FAILED" "${BOOT_SAMPLES[@]}"
json_line "firecracker: snapshot load -> envd /health 204" "$LOAD_FAILED" "${LOAD_SAMPLES[@]}"
[[ $BOOT_FAILED == 0 && $LOAD_FAILED == 0 ]] || exit 2
