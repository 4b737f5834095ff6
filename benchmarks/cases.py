"""What the benchmarks measure: small functions, each run on both engines.

A case gets the engine (``engine.Client``, ``engine.LocalCluster``,
``engine.wait``) and the sizes to run at. Most cases also get a client of
the standard cluster, which the runner starts fresh for each case and
engine: two worker processes of one thread each, no dashboard. The cases
that are about clusters themselves (start-up, threads) start their own.

A case returns :class:`Measure` rows. Each row says which way is better,
and some carry minidask's target: a bound, or ``"dask"`` for "no worse
than dask's own number".

Every case warms its cluster up first (a few tasks on each worker), so
that one-off costs such as the first connection between two workers are
not counted, and tasks are submitted with ``pure=False``, so that neither
engine spends time hashing arguments into keys.
"""

import dataclasses
import statistics
import time

from benchmarks.tasks import (add, inc, loop_cpu_seconds,
                              open_dashboard_pages, random_array,
                              random_bytes, scheduler_task_count)

STANDARD_CLUSTER = dict(n_workers=2, threads_per_worker=1,
                        dashboard_address=None)
TIMEOUT = 300  # seconds; far more than any case takes, so a hang ends
SIZE_BUDGET = 90  # seconds one size of the graph-size case may take
TRANSFER_TIMEOUT = 10  # seconds; a transfer at full size takes about 1 s

LOWER, HIGHER = "lower", "higher"


@dataclasses.dataclass
class Sizes:
    """How big each case runs; ``FULL`` measures, ``QUICK`` only checks."""

    startup_repeats: int
    round_trips: int
    tiny_tasks: int
    chain_length: int
    tree_leaves: int
    transfer_bytes: tuple
    transfer_repeats: int
    graph_sizes: tuple
    thread_counts: tuple
    threaded_tasks: int
    dashboard_rounds: int
    idle_seconds: float


FULL = Sizes(startup_repeats=3, round_trips=1000, tiny_tasks=10_000,
             chain_length=1000, tree_leaves=10_000,
             transfer_bytes=(50 * 2**20, 200 * 2**20), transfer_repeats=3,
             graph_sizes=(1000, 10_000, 100_000),
             thread_counts=(1, 2, 4, 8, 16), threaded_tasks=1500,
             dashboard_rounds=2, idle_seconds=1)

QUICK = Sizes(startup_repeats=1, round_trips=20, tiny_tasks=100,
              chain_length=20, tree_leaves=50,
              transfer_bytes=(2**20, 2 * 2**20),
              transfer_repeats=1, graph_sizes=(50, 100, 200),
              thread_counts=(1, 2), threaded_tasks=50, dashboard_rounds=1,
              idle_seconds=0.2)


@dataclasses.dataclass
class Measure:
    """One row of the table: a number, its unit and which way is better."""

    row: str
    value: float  # None when it could not be measured
    unit: str
    better: str
    target: object = None  # a bound, or "dask" for dask's own value
    error: str = None  # why there is no value


@dataclasses.dataclass
class Case:
    name: str
    function: object
    needs_client: bool  # True: run on a fresh standard cluster


CASES = []


def case(name, needs_client=True):
    """Register a case under ``name``, in the order they are defined."""
    def register(function):
        CASES.append(Case(name, function, needs_client))
        return function
    return register


# -- helpers ------------------------------------------------------------------

def warm_up(client):
    """Run a few tasks everywhere, and fetch their results, untimed."""
    workers = list(client.scheduler_info()["workers"])
    futures = [client.submit(inc, i, workers=[w], pure=False)
               for i, w in enumerate(workers * 3)]
    client.gather(futures)


def settle(client, timeout=60):
    """Wait until the scheduler has forgotten every task of the case so far.

    Released futures are forgotten asynchronously; measuring the next
    size while the scheduler still cleans up would charge it to that size.
    """
    deadline = time.monotonic() + timeout
    while client.run_on_scheduler(scheduler_task_count):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the scheduler still held tasks after "
                               f"{timeout} s")
        time.sleep(0.02)


def wait_all(engine, futures, what):
    """Wait for every future, or raise TimeoutError naming ``what``."""
    try:
        engine.wait(futures, timeout=TIMEOUT)
    except TimeoutError:
        raise TimeoutError(f"{what} not done within {TIMEOUT} s") from None


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


# -- the cases ----------------------------------------------------------------

@case("cluster start-up", needs_client=False)
def startup(engine, sizes):
    """LocalCluster(...) + Client(cluster) + wait_for_workers(2)."""
    times = []
    for _ in range(sizes.startup_repeats):
        start = time.perf_counter()
        cluster = engine.LocalCluster(**STANDARD_CLUSTER)
        client = engine.Client(cluster)
        client.wait_for_workers(2)
        times.append(time.perf_counter() - start)
        client.close()
        cluster.close()
    return [Measure(f"to ready, median of {len(times)}",
                    statistics.median(times), "s", LOWER, target="dask")]


@case("round trip")
def round_trip(engine, client, sizes):
    """One task at a time: submit, then wait for and fetch its result."""
    warm_up(client)
    times = []
    for i in range(sizes.round_trips):
        start = time.perf_counter()
        client.submit(inc, i, pure=False).result(timeout=TIMEOUT)
        times.append(time.perf_counter() - start)
    n = f"{len(times):,} in a row"
    return [Measure(f"median of {n}",
                    statistics.median(times) * 1e3, "ms", LOWER, target=1.0),
            Measure(f"99th percentile of {n}",
                    percentile(times, 99) * 1e3, "ms", LOWER)]


@case("tiny tasks")
def tiny_tasks(engine, client, sizes):
    """Many independent tasks at once: map, then gather every result."""
    warm_up(client)
    n = sizes.tiny_tasks
    start = time.perf_counter()
    results = client.gather(client.map(inc, range(n), pure=False))
    elapsed = time.perf_counter() - start
    assert results == list(range(1, n + 1))
    return [Measure(f"{n:,} tasks", n / elapsed,
                    "tasks/s", HIGHER, target=5000)]


@case("chain")
def chain(engine, client, sizes):
    """Each task needs the one before it: no two can run at once."""
    warm_up(client)
    n = sizes.chain_length
    start = time.perf_counter()
    future = client.submit(inc, 0, pure=False)
    for _ in range(n - 1):
        future = client.submit(inc, future, pure=False)
    result = future.result(timeout=TIMEOUT)
    elapsed = time.perf_counter() - start
    assert result == n
    return [Measure(f"{n:,} dependent tasks", n / elapsed,
                    "tasks/s", HIGHER, target=1500)]


@case("tree reduction")
def tree_reduction(engine, client, sizes):
    """Sum the leaves pairwise, level by level, down to one result."""
    warm_up(client)
    n = sizes.tree_leaves
    start = time.perf_counter()
    level = client.map(inc, range(n), pure=False)
    tasks = n
    while len(level) > 1:
        pairs = client.map(add, level[0::2], level[1::2], pure=False)
        level = pairs + level[2 * len(pairs):]  # an odd one waits a level
        tasks += len(pairs)
    result = level[0].result(timeout=TIMEOUT)
    elapsed = time.perf_counter() - start
    assert result == n * (n + 1) // 2
    return [Measure(f"{n:,} leaves, {tasks:,} tasks",
                    tasks / elapsed, "tasks/s", HIGHER)]


@case("transfer")
def transfer(engine, client, sizes):
    """Move a large value from worker A to a task on worker B.

    The value is made on A first and not timed. The timed part is the
    task on B that takes it and returns its length: the transfer plus one
    round trip, which is small beside it at full size. A transfer that
    does not finish within ``TRANSFER_TIMEOUT`` is reported as failed.

    One transfer of the largest size goes first, untimed: the first
    large value a worker process receives costs it the first touch of
    that much memory, which is slower than any later one on a virtual
    machine, for either engine.
    """
    warm_up(client)
    a, b = sorted(client.scheduler_info()["workers"])[:2]
    try:
        transfer_rate(engine, client, random_bytes,
                      max(sizes.transfer_bytes), a, b)
    except TimeoutError:
        pass  # the timed transfers below will report it
    settle(client)
    rows = []
    for nbytes in sizes.transfer_bytes:
        size = f"{nbytes / 2**20:g} MiB"
        for kind, make in ((f"{size} bytes", random_bytes),
                           (f"{size} NumPy array", random_array)):
            row = kind  # the median of transfer_repeats
            try:
                rate = statistics.median(
                    transfer_rate(engine, client, make, nbytes, a, b)
                    for _ in range(sizes.transfer_repeats))
            except TimeoutError as exc:
                rows.append(Measure(row, None, "GB/s", HIGHER, target=1.5,
                                    error=str(exc)))
                continue
            finally:
                settle(client)
            rows.append(Measure(row, rate, "GB/s", HIGHER, target=1.5))
    return rows


def transfer_rate(engine, client, make, nbytes, a, b):
    """GB/s of one transfer of a new value made by ``make`` from a to b."""
    value = client.submit(make, nbytes, workers=[a], pure=False)
    wait_all(engine, [value], f"making {nbytes:,} bytes")
    start = time.perf_counter()
    on_b = client.submit(len, value, workers=[b], pure=False)
    try:
        length = on_b.result(timeout=TRANSFER_TIMEOUT)
    except TimeoutError:
        raise TimeoutError(f"not done within {TRANSFER_TIMEOUT} s") from None
    elapsed = time.perf_counter() - start
    assert length == nbytes
    return nbytes / elapsed / 1e9


@case("graph size")
def graph_size(engine, client, sizes):
    """Per-task cost of map + wait as the number of tasks at once grows.

    The whole cost, client and scheduler and workers, divided by the
    tasks: flat means the scheduler's cost per task does not grow with
    the graph. A size that the cost so far says would take more than
    ``SIZE_BUDGET`` seconds is skipped, so that a slow engine on a busy
    machine cannot stretch the run past its few minutes. Sizes under
    10,000, which take a fraction of a second and move most from one
    run to the next, are the median of three.
    """
    warm_up(client)
    costs, rows = {}, []
    for n in sizes.graph_sizes:
        row = f"{n:,} tasks at once"
        expected = n * max(costs.values(), default=0) / 1e6
        if expected > SIZE_BUDGET:
            rows.append(Measure(row, None, "µs/task", LOWER, error=(
                f"skipped: would take about {expected:.0f} s")))
            continue
        costs[n] = statistics.median(
            map_cost(engine, client, n) for _ in range(3 if n < 10_000 else 1))
        rows.append(Measure(row, costs[n], "µs/task", LOWER))
    first, last = sizes.graph_sizes[0], sizes.graph_sizes[-1]
    growth = f"{last:,} over {first:,} tasks"
    if last in costs:
        rows.append(Measure(growth, costs[last] / costs[first], "x", LOWER,
                            target=1.3))
    else:
        rows.append(Measure(growth, None, "x", LOWER, target=1.3,
                            error=f"skipped: no value at {last:,} tasks"))
    return rows


def map_cost(engine, client, n):
    """µs per task of one map of ``n`` tiny tasks and its wait."""
    start = time.perf_counter()
    futures = client.map(inc, range(n), pure=False)
    wait_all(engine, futures, f"{n:,} tasks")
    cost = (time.perf_counter() - start) / n * 1e6
    del futures
    settle(client)
    return cost


@case("threads", needs_client=False)
def threads(engine, sizes):
    """Per-task cost on one worker process as its thread count grows."""
    n = sizes.threaded_tasks
    rows = []
    for nthreads in sizes.thread_counts:
        with engine.LocalCluster(n_workers=1, threads_per_worker=nthreads,
                                 dashboard_address=None) as cluster, \
                engine.Client(cluster) as client:
            client.wait_for_workers(1)
            warm_up(client)
            start = time.perf_counter()
            futures = client.map(inc, range(n), pure=False)
            wait_all(engine, futures, f"{n:,} tasks")
            cost = (time.perf_counter() - start) / n * 1e6
            del futures
        threads = f"{nthreads} thread{'s' if nthreads > 1 else ''}"
        rows.append(Measure(f"1 worker of {threads}, {n:,} tasks", cost,
                            "µs/task", LOWER))
    return rows


@case("unwatched dashboard", needs_client=False)
def dashboard_unwatched(engine, sizes):
    """A cluster with the dashboard off, then on with no browser on it.

    A dashboard nobody looks at should cost the scheduler nothing. What
    is compared is the CPU time of the scheduler's event loop thread (the
    thread where the dashboard would do its work): per second while the
    cluster is idle, where any periodic work of the dashboard's would
    stand out, and per task while tiny tasks run (the rate moves too much
    from run to run on a shared machine). Off and on alternate,
    ``dashboard_rounds`` times each, on a fresh cluster every time; the
    spread between the "off" runs shows the noise.
    """
    n = sizes.tiny_tasks // 8
    cpu, idle, pages = {"off": [], "on": []}, {"off": [], "on": []}, []
    for _ in range(sizes.dashboard_rounds):
        for label, address in [("off", None), ("on", "127.0.0.1:0")]:
            with engine.LocalCluster(n_workers=2, threads_per_worker=1,
                                     dashboard_address=address) as cluster, \
                    engine.Client(cluster) as client:
                client.wait_for_workers(2)
                warm_up(client)
                before = client.run_on_scheduler(loop_cpu_seconds)
                time.sleep(sizes.idle_seconds)  # nothing to do but tick
                after = client.run_on_scheduler(loop_cpu_seconds)
                idle[label].append((after - before) / sizes.idle_seconds
                                   * 1e3)
                before = client.run_on_scheduler(loop_cpu_seconds)
                results = client.gather(client.map(inc, range(n),
                                                   pure=False))
                after = client.run_on_scheduler(loop_cpu_seconds)
                assert results == list(range(1, n + 1))
                cpu[label].append((after - before) / n * 1e6)
                if label == "on":
                    pages.append(client.run_on_scheduler(
                        open_dashboard_pages))
    # A page open would make this a measure of a watched dashboard.
    assert not any(pages), f"dashboard pages were open: {pages}"
    off, on = statistics.mean(cpu["off"]), statistics.mean(cpu["on"])
    return [
        Measure("scheduler thread CPU while idle, off", statistics.mean(
            idle["off"]), "ms/s", LOWER),
        Measure("while idle, on with no page open", statistics.mean(
            idle["on"]), "ms/s", LOWER),
        Measure(f"scheduler thread CPU per task, off ({n:,} tasks)", off,
                "µs/task", LOWER),
        Measure("the same, on with no page open", on, "µs/task", LOWER),
        Measure("on over off", on / off, "x", LOWER),
        Measure("off runs, slowest over fastest (the noise)",
                max(cpu["off"]) / min(cpu["off"]), "x", LOWER),
    ]