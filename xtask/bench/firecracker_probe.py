#!/usr/bin/env python3
"""Poll an in-guest HTTP agent through Firecracker's hybrid vsock until GET /health -> 204.

usage: firecracker_probe.py UDS_PATH PORT TIMEOUT_S [PIDFILE [READYFILE]]

The probe is meant to be started *before* firecracker is launched (so that Python's own
start-up cost is not inside the measured window): it creates READYFILE once it is
initialised, then keeps retrying until UDS_PATH accepts the hybrid-vsock handshake.
PIDFILE (written by the caller once firecracker is launched) lets it stop early if
firecracker exits.

On success prints the CLOCK_REALTIME nanosecond timestamp at which the 204 status line
was read (same clock as bash's $EPOCHREALTIME) and exits 0.
Exit 2: timeout; exit 3: the firecracker process (from PIDFILE) exited before readiness.
Diagnostics go to stderr.
"""
import os
import socket
import sys
import time


def readline(sock, limit=4096):
    buf = bytearray()
    while len(buf) < limit:
        b = sock.recv(1)
        if not b:
            break
        buf += b
        if b == b"\n":
            break
    return bytes(buf)


def attempt(uds, port, per_try):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(per_try)
    try:
        s.connect(uds)
        s.sendall(b"CONNECT %d\n" % port)
        line = readline(s)
        if not line.startswith(b"OK "):
            return "connect-reply %r" % line[:60]
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status = readline(s)
        parts = status.split()
        if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1] == b"204":
            return None
        return "status %r" % status[:60]
    finally:
        s.close()


def alive(pid):
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); check /proc state
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main():
    uds, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    pidfile = sys.argv[4] if len(sys.argv) > 4 else None
    if len(sys.argv) > 5:
        open(sys.argv[5], "w").close()
    pid = None
    deadline = time.monotonic() + timeout
    last = "no attempt"
    tries = 0
    while True:
        now = time.monotonic()
        if now >= deadline:
            print("probe: timeout after %.1fs (%d attempts), last error: %s" % (timeout, tries, last),
                  file=sys.stderr)
            return 2
        if pid is None and pidfile:
            try:
                with open(pidfile) as f:
                    pid = int(f.read().strip() or "x")
            except (OSError, ValueError):
                pid = None
        if not alive(pid):
            print("probe: firecracker pid %d exited; last error: %s" % (pid, last), file=sys.stderr)
            return 3
        tries += 1
        try:
            err = attempt(uds, port, max(0.05, min(2.0, deadline - now)))
        except OSError as e:  # ENOENT, ECONNREFUSED, ECONNRESET, timeout, ...
            err = "%s: %s" % (type(e).__name__, e)
        if err is None:
            print(time.time_ns())
            return 0
        last = err
        time.sleep(0.002)


if __name__ == "__main__":
    sys.exit(main())
