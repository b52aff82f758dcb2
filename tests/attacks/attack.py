"""Escape-suite attacks written in Python (run as `python3 attack.py NAME ARGS`), for the
paths an interpreter offers besides raw syscalls. Same protocol as the C attacks: prints
START, then ESCAPED (exit 0) or BLOCKED (exit 1)."""
import ctypes
import os
import socket
import sys


def escaped(msg):
    print("ESCAPED " + msg, flush=True)
    sys.exit(0)


def blocked(msg):
    print("BLOCKED " + msg, flush=True)
    sys.exit(1)


def inet(host, port, token):
    """socket.create_connection, what an agent's `curl`-like snippet does (codex tests the same)."""
    try:
        s = socket.create_connection((host, int(port)), timeout=3)
        s.sendall(token.encode())
    except OSError as e:
        blocked(f"python connect {host}:{port}: {e!r}")
    escaped(f"python TCP connection to {host}:{port}")


def ctypes_unshare():
    """unshare(CLONE_NEWUSER | CLONE_NEWNS) through libc via ctypes, then mount a tmpfs."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000 | 0x00020000) == 0:
        escaped("unshare(CLONE_NEWUSER|CLONE_NEWNS) from python")
    e = ctypes.get_errno()
    if libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) == 0:
        escaped("mount from python")
    blocked(f"unshare: {os.strerror(e)}; mount: {os.strerror(ctypes.get_errno())}")


def main():
    name = sys.argv[1]
    print("START " + name, flush=True)
    args = sys.argv[2:]
    {"inet": inet, "ctypes_unshare": ctypes_unshare}[name](*args)


if __name__ == "__main__":
    main()
