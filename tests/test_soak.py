"""Soak: minutes of ordinary mixed work, with memory that stays flat.

One LocalCluster (two single-threaded worker processes) runs, for
``MINIDASK_SOAK_SECONDS`` seconds (600 by default), a seeded random mix
of what users do: maps and reductions, scatter, cancellations, futures
released before they finish, large results, failing tasks, and two
restarts. Every answer is checked. The memory of the cluster's process
(scheduler, nannies and client) and of each worker process is sampled
throughout; a leak shows as growth from start to end, so that growth
must stay within a generous bound. Workers are measured between
restarts, since a restart gives each a fresh process.

Run it alone with::

    MINIDASK_SOAK_SECONDS=600 python -m pytest tests/test_soak.py -m slow -s

The variable is read when this module is imported, because the tests'
configuration fixture removes every ``MINIDASK_`` variable before each
test runs.
"""

import gc
import json
import os
import random
import threading
import time

import psutil
import pytest

from minidask import CancelledError, Client, LocalCluster
from helpers import wait_until

SOAK_SECONDS = float(os.environ.get("MINIDASK_SOAK_SECONDS", 600))
SEED = 4_242
MiB = 2**20
RESTARTS = 2


def inc(x):
    return x + 1


def add(*values):
    return sum(values)


def nap(x, delay):
    time.sleep(delay)
    return x


def blob(n):
    return b"x" * n


def fail(x):
    raise ValueError(f"bad input {x}")


class Mix:
    """The kinds of work, each checking its own answers; counts them."""

    def __init__(self, client, rng):
        self.client, self.rng = client, rng
        self.counts = {"tasks": 0, "checked": 0, "cancelled": 0,
                       "released": 0, "scattered": 0, "errors": 0}

    def one(self):
        action = self.rng.choice([
            self.map_reduce, self.map_reduce, self.tree, self.scatter,
            self.cancel, self.release, self.large, self.erring])
        action()

    def map_reduce(self):
        xs = [self.rng.randrange(1000)
              for _ in range(self.rng.randint(50, 300))]
        futures = self.client.map(inc, xs, pure=False)
        total = self.client.submit(add, *futures, pure=False)
        assert total.result(timeout=60) == sum(xs) + len(xs)
        self._count(len(xs) + 1, 1)

    def tree(self):
        level = self.client.map(inc, range(128), pure=False)
        while len(level) > 1:
            level = [self.client.submit(add, a, b, pure=False)
                     for a, b in zip(level[::2], level[1::2])]
        assert level[0].result(timeout=60) == sum(range(1, 129))
        self._count(255, 1)

    def scatter(self):
        size = self.rng.choice([10, 1000, 100_000, 1_000_000])
        data = [os.urandom(size) for _ in range(self.rng.randint(1, 8))]
        futures = self.client.scatter(data)
        sizes = self.client.map(len, futures, pure=False)
        assert self.client.gather(sizes) == [size] * len(data)
        assert self.client.gather(futures) == data
        self.counts["scattered"] += len(data)
        self._count(len(data), 2 * len(data))

    def cancel(self):
        kept = self.client.map(nap, range(10), delay=0.02, pure=False)
        # Long enough that none can finish before the cancellation lands.
        dropped = self.client.map(nap, range(10), delay=0.5, pure=False)
        self.client.cancel(dropped)
        assert self.client.gather(kept) == list(range(10))
        for future in dropped:
            with pytest.raises(CancelledError):
                future.result(timeout=60)
        self.counts["cancelled"] += len(dropped)
        self._count(len(kept) + len(dropped), len(kept) + len(dropped))

    def release(self):
        futures = self.client.map(nap, range(50), delay=0.001, pure=False)
        self.counts["released"] += len(futures)
        self._count(len(futures), 0)
        del futures  # before they finish: the scheduler forgets them

    def large(self):
        n = self.rng.choice([2**20, 4 * 2**20])
        assert len(self.client.submit(blob, n, pure=False)
                   .result(timeout=60)) == n
        self._count(1, 1)

    def erring(self):
        future = self.client.submit(fail, self.rng.random(), pure=False)
        with pytest.raises(ValueError, match="bad input"):
            future.result(timeout=60)
        self.counts["errors"] += 1
        self._count(1, 1)

    def _count(self, tasks, checked):
        self.counts["tasks"] += tasks
        self.counts["checked"] += checked


def _rss(pid):
    return psutil.Process(pid).memory_info().rss


def worker_pids(cluster):
    return [h.server.process.pid for h in cluster.workers.values()]


def sample(cluster, began):
    """The memory of every process now; printed as it goes, for ``-s``."""
    gc.collect()
    now = {"t": round(time.monotonic() - began),
           "cluster_mib": _mib(_rss(os.getpid())),
           "workers_mib": {pid: _mib(_rss(pid))
                           for pid in worker_pids(cluster)}}
    print(f"soak at {now['t']} s: cluster {now['cluster_mib']} MiB, "
          f"workers {now['workers_mib']}", flush=True)
    return now


def _mib(n):
    return round(n / MiB, 1)


def flat(start, end):
    """Growth within 50 MiB, or within 25% for a larger process."""
    return end - start < max(50, 0.25 * start)


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 300)
def test_soak(tmp_path):
    rng = random.Random(SEED)
    with LocalCluster(n_workers=2, threads_per_worker=1,
                      dashboard_address=None) as cluster, \
            Client(cluster) as client:
        mix = Mix(client, rng)
        for _ in range(10):  # warm up: imports, caches, first buffers
            mix.one()
        began = time.monotonic()
        samples = [sample(cluster, began)]
        epochs = [samples[0]]  # the first sample of each worker lifetime
        restart_at = [SOAK_SECONDS * (i + 1) / (RESTARTS + 1)
                      for i in range(RESTARTS)]
        rounds = restarts = 0
        while time.monotonic() - began < SOAK_SECONDS:
            mix.one()
            rounds += 1
            elapsed = time.monotonic() - began
            if restart_at and elapsed >= restart_at[0]:
                restart_at.pop(0)
                samples.append(sample(cluster, began))
                client.restart()
                restarts += 1
                for _ in range(10):
                    mix.one()
                epochs.append(sample(cluster, began))
            elif elapsed - samples[-1]["t"] >= 30:
                samples.append(sample(cluster, began))
        samples.append(sample(cluster, began))

        left = tasks_left(client)
        held = client.run(lambda dask_worker: len(dask_worker.data))

    first, last = samples[0], samples[-1]
    figures = {
        "seconds": round(time.monotonic() - began), "seed": SEED,
        "rounds": rounds, "restarts": restarts, **mix.counts,
        "cluster_mib": [first["cluster_mib"], last["cluster_mib"]],
        "worker_epochs_mib": _epochs(samples, epochs),
        "tasks_left_on_scheduler": left,
        "results_held_by_workers_at_end": held, "samples": samples,
    }
    path = tmp_path / "soak.json"
    path.write_text(json.dumps(figures, indent=1))
    print(f"\nsoak: {json.dumps(figures)}\n({path})")

    assert restarts == RESTARTS
    assert left == 0, "tasks stayed on the scheduler after every future " \
                      "was released"
    assert not any(held.values())
    assert flat(*figures["cluster_mib"]), figures["cluster_mib"]
    for pid, (start, end) in figures["worker_epochs_mib"].items():
        assert flat(start, end), (pid, start, end)


def tasks_left(client, timeout=30):
    """Tasks the scheduler still knows once it has caught up (0 at best)."""
    def count(dask_scheduler):
        return len(dask_scheduler.tasks)

    gc.collect()  # Futures in reference cycles are released now
    try:
        wait_until(lambda: client.run_on_scheduler(count) == 0, timeout)
    except AssertionError:
        pass
    return client.run_on_scheduler(count)


def _epochs(samples, epochs):
    """Each worker process's memory after warm-up and at its last sample."""
    spans = {}
    for epoch in epochs:
        for pid, start in epoch["workers_mib"].items():
            ends = [s["workers_mib"][pid] for s in samples
                    if pid in s["workers_mib"]]
            if ends:
                spans[pid] = [start, ends[-1]]
    return spans


# Found by the soak: its Futures were never released.

def test_a_future_whose_result_raised_is_released():
    with LocalCluster(n_workers=1, threads_per_worker=1,
                      dashboard_address=None) as cluster, \
            Client(cluster) as client:
        future = client.submit(fail, 1)
        with pytest.raises(ValueError):
            future.result(timeout=30)
        del future
        assert tasks_left(client, timeout=5) == 0, \
            "the exception kept a reference to its Future"


def test_a_future_freed_while_the_client_holds_its_lock_is_no_deadlock():
    """The garbage collector may free a Future at any allocation, and so
    also while the client's lock is held (the soak once stopped for good
    in ``_acquire``). Here it is made to run at that moment."""
    with LocalCluster(n_workers=1, processes=False,
                      dashboard_address=None) as cluster, \
            Client(cluster) as client:
        future = client.submit(inc, 1)
        cycle = [future, future.result(timeout=30)]
        cycle.append(cycle)  # only the collector can free this Future
        del future, cycle
        lock, collected = client._lock, []

        class CollectInside:
            def __enter__(self):
                lock.acquire()
                if not collected:
                    collected.append(gc.collect())

            def __exit__(self, *exc):
                lock.release()

        client._lock = CollectInside()
        submit = threading.Thread(target=client.submit, args=(inc, 2),
                                  daemon=True)
        submit.start()
        submit.join(10)
        stuck = submit.is_alive()
        if stuck:
            lock.release()  # let the stuck thread go, to close cleanly
            submit.join(10)
        client._lock = lock
        assert collected, "the collector never ran under the lock"
        assert not stuck, "the client waited for its own lock"
