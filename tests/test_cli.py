"""minidask-scheduler and minidask-worker, run as a user would run them."""

import os
import signal
import subprocess
import sys

import psutil
import pytest

from minidask import Client
from helpers import free_port, wait_until


def inc(x):
    return x + 1


def start(*args, env=None):
    process = subprocess.Popen(
        [sys.executable, "-m", "minidask.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})})
    return process


def first_line(process, timeout=30):
    """The address line a command prints once it listens."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(process.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        process.kill()
        raise AssertionError(f"no address printed: {process.stderr.read()}")
    return process.stdout.readline().strip()


def stop(process, sig=signal.SIGTERM):
    descendants = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(sig)
    code = process.wait(timeout=30)
    wait_until(lambda: not any(p.is_running() and
                               p.status() != psutil.STATUS_ZOMBIE
                               for p in descendants), timeout=15,
               message="a child process outlived its command")
    return code


@pytest.fixture
def scheduler():
    port = free_port()
    process = start("scheduler", "--port", str(port), "--no-dashboard")
    address = first_line(process)
    yield address, process
    if process.poll() is None:
        stop(process)


def test_scheduler_prints_its_address_and_stops_on_sigterm(scheduler):
    address, process = scheduler
    assert address.startswith("tcp://127.0.0.1:")
    assert stop(process) == 0
    assert "closing" in process.stderr.read()


@pytest.mark.parametrize("nanny", [True, False])
def test_worker_joins_runs_tasks_and_stops(scheduler, nanny):
    address, _ = scheduler
    args = ["worker", address, "--nthreads", "2", "--name", "w1"]
    worker = start(*args, *([] if nanny else ["--no-nanny"]))
    worker_address = first_line(worker)
    assert worker_address.startswith("tcp://127.0.0.1:")
    with Client(address) as client:
        client.wait_for_workers(1, timeout=30)
        info = client.scheduler_info()["workers"][worker_address]
        assert info["name"] == "w1" and info["nthreads"] == 2
        assert (info["nanny"] is not None) == nanny
        assert client.submit(inc, 1).result(timeout=10) == 2
    assert stop(worker, signal.SIGINT) == 0


def test_worker_exits_when_its_scheduler_stops(scheduler):
    address, process = scheduler
    worker = start("worker", address)
    first_line(worker)
    stop(process)
    assert worker.wait(timeout=30) == 0


def test_worker_without_secret_says_how_to_get_one(tmp_path):
    port = free_port()
    env = {"XDG_RUNTIME_DIR": str(tmp_path), "HOME": str(tmp_path)}
    worker = start("worker", f"tcp://127.0.0.1:{port}", env=env)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode != 0
    assert "no cluster secret" in err and "--secret-file" in err


def test_taken_scheduler_port_is_an_error_naming_it(scheduler):
    address, _ = scheduler
    port = address.rsplit(":", 1)[1]
    second = start("scheduler", "--port", port, "--no-dashboard")
    _, err = second.communicate(timeout=30)
    assert second.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in err
