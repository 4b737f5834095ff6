"""Small helpers for the tests: waiting for a condition, finding processes."""

import os
import socket
import time

import psutil


def wait_until(predicate, timeout=10, interval=0.01, message=None):
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or f"{predicate} stayed false for "
                                            f"{timeout} s")
        time.sleep(interval)


def children():
    """The live child processes of this test process, recursively."""
    return [p for p in psutil.Process(os.getpid()).children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def minidask_processes():
    """Every process on the machine running a minidask server command."""
    found = []
    for proc in psutil.process_iter(["cmdline", "pid"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["pid"] == os.getpid():
            continue
        if "minidask.cli" in cmdline or "minidask-" in cmdline:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.NoSuchProcess:
                pass
    return found


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
