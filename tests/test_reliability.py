"""Faults the cluster must survive without losing a result or hanging."""

import os
import random
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from minidask import Client, CommClosedError, KilledWorker, LocalCluster
from minidask import config
from helpers import free_port, wait_until
from test_cli import first_line, start, stop


def inc(x):
    return x + 1


def add(*args):
    return sum(args)


def slow(x, delay=0.01):
    time.sleep(delay)
    return x


def tree_and_shuffle(client, n=400):
    """A tree reduction and an all-to-all exchange; return futures and
    the answers they must give."""
    leaves = client.map(slow, range(n), delay=0.001)
    level = leaves
    while len(level) > 1:
        level = [client.submit(add, *level[i:i + 4])
                 for i in range(0, len(level), 4)]
    parts = [client.submit(add, *leaves[i::8]) for i in range(8)]
    mixed = [client.submit(add, *parts, i) for i in range(8)]
    expected_total = sum(range(n))
    return level[0], mixed, expected_total


def run_with_kills(cluster, client, sig, rounds=1, period=0.5, kills=2):
    """Kill (or stop) a random worker every ``period`` while graphs run.

    Graphs keep running, ``rounds`` of them at least, until ``kills``
    workers have been hit, so that every run really injects its faults.
    """
    done = threading.Event()
    hits = []

    def killer():
        while not done.wait(period if hits else period / 4):
            pids = list(client.run(os.getpid).values())
            victim = random.choice(pids)
            os.kill(victim, sig)
            hits.append(victim)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        ran = 0
        while ran < rounds or len(hits) < kills:
            total, mixed, expected = tree_and_shuffle(client)
            assert total.result(timeout=120) == expected
            assert client.gather(mixed) == [expected + i for i in range(8)]
            ran += 1
    finally:
        done.set()
        thread.join()
    print(f"{ran} graphs, {len(hits)} workers killed, all results right")
    return hits


def test_random_sigkills_lose_nothing():
    with LocalCluster(n_workers=4, threads_per_worker=1,
                      dashboard_address=None) as cluster, \
            Client(cluster) as client:
        hits = run_with_kills(cluster, client, signal.SIGKILL, rounds=2)
        assert hits, "no worker was killed: the test proved nothing"
        client.wait_for_workers(4, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("run", range(20))
def test_chaos_twenty_times(run):
    with LocalCluster(n_workers=4, threads_per_worker=1,
                      dashboard_address=None) as cluster, \
            Client(cluster) as client:
        hits = run_with_kills(cluster, client, signal.SIGKILL, rounds=3,
                              period=1.0)
        assert hits


def test_hung_worker_is_noticed_by_missed_heartbeats():
    with config.set({"scheduler.worker-ttl": "1s"}), \
            LocalCluster(n_workers=2, threads_per_worker=1,
                         dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)
        hung_address, hung_pid = next(iter(pids.items()))
        futures = client.map(slow, range(40), delay=0.05)
        os.kill(hung_pid, signal.SIGSTOP)
        try:
            assert client.gather(futures, ) == list(range(40))
            assert hung_address not in client.scheduler_info()["workers"]
            logs = "\n".join(l for _, l in client.get_scheduler_logs())
            assert f"worker {hung_address} not heard from" in logs
        finally:
            os.kill(hung_pid, signal.SIGCONT)
        client.wait_for_workers(2, timeout=60)  # its nanny starts it again


def test_scheduler_loss_fails_pending_futures_quickly():
    port = free_port()
    scheduler = start("scheduler", "--port", str(port), "--no-dashboard")
    address = first_line(scheduler)
    worker = start("worker", address, "--nthreads", "2")
    try:
        _lose_the_scheduler(address, scheduler, worker)
    finally:  # a failed check must not leave servers running
        for process in (scheduler, worker):
            if process.poll() is None:
                stop(process, signal.SIGKILL)


def _lose_the_scheduler(address, scheduler, worker):
    first_line(worker)
    with Client(address) as client:
        client.wait_for_workers(1, timeout=30)
        pending = client.submit(slow, 1, delay=30)
        done = client.submit(inc, 1)
        assert done.result(timeout=10) == 2
        scheduler.kill()
        began = time.monotonic()
        with pytest.raises(CommClosedError, match="lost the connection"):
            pending.result(timeout=30)
        with pytest.raises(CommClosedError):
            client.gather([pending])
        assert time.monotonic() - began < 10
        with pytest.raises(RuntimeError, match="make a new Client"):
            client.submit(inc, 2)
    scheduler.wait(timeout=10)
    assert worker.wait(timeout=30) == 0  # workers do not outlive it


def test_client_loss_releases_its_work(cluster):
    script = (
        "import sys, time\n"
        "from minidask import Client\n"
        "client = Client(sys.argv[1])\n"
        "futures = client.map(time.sleep, [0.2] * 200, pure=False)\n"
        "print('submitted', flush=True)\n"
        "time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", script,
                                cluster.scheduler_address],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "submitted"
    with Client(cluster) as client:
        def task_count():
            return client.run_on_scheduler(
                lambda dask_scheduler: len(dask_scheduler.tasks))
        wait_until(lambda: task_count() > 0, timeout=10)
        process.kill()
        process.wait()
        wait_until(lambda: task_count() == 0, timeout=10,
                   message="a dead client's tasks stayed on the cluster")


def test_memory_hog_is_killed_and_named():
    def hog():
        block = bytearray(400 * 2**20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(10)
        return len(block)

    with LocalCluster(n_workers=1, threads_per_worker=1,
                      memory_limit="300 MiB", dashboard_address=None) \
            as cluster, Client(cluster) as client:
        future = client.submit(hog)
        with pytest.raises(KilledWorker, match="exceeded its memory limit"):
            future.result(timeout=120)
        client.wait_for_workers(1, timeout=60)
        assert client.submit(inc, 1).result(timeout=30) == 2
