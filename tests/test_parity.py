"""One set of scenarios, run on minidask and on dask.distributed.

Each test is written once against the shared API; the ``engine`` fixture
runs it twice, once with each engine's ``Client`` and ``LocalCluster``.
A difference either is fixed in minidask or is listed, with its reason,
in docs/differences.md (and then the test says so where it branches).
"""

import operator
import time
import types

import pytest


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def slow(x, delay=0.05):
    time.sleep(delay)
    return x


def fail(x):
    raise ZeroDivisionError(f"cannot divide {x} by zero")


def _minidask():
    import minidask
    return types.SimpleNamespace(
        name="minidask", Client=minidask.Client,
        LocalCluster=minidask.LocalCluster, wait=minidask.wait,
        as_completed=minidask.as_completed,
        FIRST_COMPLETED=minidask.FIRST_COMPLETED)


def _dask():
    distributed = pytest.importorskip("distributed")
    return types.SimpleNamespace(
        name="dask", Client=distributed.Client,
        LocalCluster=distributed.LocalCluster, wait=distributed.wait,
        as_completed=distributed.as_completed,
        FIRST_COMPLETED="FIRST_COMPLETED")


@pytest.fixture(scope="module", params=["minidask", "dask"])
def engine(request):
    api = _minidask() if request.param == "minidask" else _dask()
    cluster = api.LocalCluster(n_workers=2, threads_per_worker=1,
                               dashboard_address=":0")
    api.cluster = cluster
    yield api
    cluster.close()


@pytest.fixture
def client(engine):
    with engine.Client(engine.cluster) as client:
        yield client


def test_submit_map_gather(client):
    futures = client.map(inc, range(10))
    assert client.gather(futures) == list(range(1, 11))
    total = client.submit(sum, futures)
    assert total.result() == 55
    assert client.gather({"a": [futures[0]], "b": (futures[1],)}) == \
        {"a": [1], "b": (2,)}


def test_futures_nested_in_arguments(client):
    x, y = client.submit(inc, 1), client.submit(inc, 2)
    assert client.submit(sum, [x, y]).result() == 5
    assert client.submit(operator.getitem, {"k": x}, "k").result() == 2


def test_pure_keys(client):
    assert client.submit(inc, 7).key == client.submit(inc, 7).key
    assert client.submit(inc, 7, pure=False).key != \
        client.submit(inc, 7, pure=False).key


def test_future_interface(client):
    future = client.submit(inc, 1)
    assert future.result(timeout=10) == 2
    assert future.done() and future.status == "finished"
    assert future.exception() is None
    assert isinstance(future.key, str)


def test_errors_keep_type_and_message(client):
    future = client.submit(fail, 3)
    with pytest.raises(ZeroDivisionError, match="cannot divide 3 by zero"):
        future.result()
    assert future.status == "error"
    assert isinstance(future.exception(), ZeroDivisionError)
    assert future.traceback() is not None
    with pytest.raises(ZeroDivisionError):
        client.gather([future])
    assert client.gather([future, client.submit(inc, 1)],
                         errors="skip") == [2]


def test_wait_and_as_completed(engine, client):
    futures = client.map(slow, range(4), delay=0.02)
    done, not_done = engine.wait(futures)
    assert len(done) == 4 and not not_done
    fast = client.submit(inc, 1)
    slowest = client.submit(slow, 0, delay=2, pure=False)
    done, not_done = engine.wait([fast, slowest],
                                 return_when=engine.FIRST_COMPLETED)
    assert fast in done and slowest in not_done
    results = sorted(r for _, r in engine.as_completed(
        client.map(inc, range(5)), with_results=True))
    assert results == [1, 2, 3, 4, 5]
    with pytest.raises(TimeoutError):
        engine.wait([client.submit(slow, 1, delay=3, pure=False)],
                    timeout=0.1)


def test_scatter(client):
    [x] = client.scatter([10])
    assert client.submit(inc, x).result() == 11
    named = client.scatter({"ten": 10})
    assert set(named) == {"ten"} and named["ten"].result() == 10
    everywhere = client.scatter(5, broadcast=True)
    assert len(client.who_has([everywhere])[everywhere.key]) == 2


def test_cancel(client):
    future = client.submit(slow, 1, delay=5, pure=False)
    client.cancel([future])
    with pytest.raises(Exception) as info:
        future.result(timeout=10)
    assert "ancel" in type(info.value).__name__
    assert future.status == "cancelled"


def test_run_and_run_on_scheduler(client):
    import os
    pids = client.run(os.getpid)
    assert sorted(pids) == sorted(client.scheduler_info()["workers"])
    names = client.run(lambda dask_worker: dask_worker.address)
    assert all(address == value for address, value in names.items())
    address = client.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.address)
    assert address == client.scheduler_info()["address"]


def test_scheduler_info(client):
    info = client.scheduler_info()
    assert info["type"] == "Scheduler"
    assert info["address"].startswith("tcp://127.0.0.1:")
    assert len(info["workers"]) == 2
    for address, worker in info["workers"].items():
        assert worker["nthreads"] == 1
        assert worker["memory_limit"] > 0
        assert "name" in worker


def test_wait_for_workers_and_who_has(client):
    client.wait_for_workers(2, timeout=30)
    future = client.submit(inc, 41)
    future.result()
    holders = client.who_has([future])[future.key]
    assert len(holders) == 1 and holders[0] in client.scheduler_info()[
        "workers"]


def test_logs(engine, client):
    sched = client.get_scheduler_logs()
    assert sched and all(len(entry) == 2 for entry in sched)
    workers = client.get_worker_logs()
    assert sorted(workers) == sorted(client.scheduler_info()["workers"])
    logs = engine.cluster.get_logs()
    assert "Scheduler" in logs and "Cluster" in logs
    assert all(isinstance(text, str) for text in logs.values())
    assert hasattr(logs, "_repr_html_")


def test_dashboard_link(engine, client):
    for link in (client.dashboard_link, engine.cluster.dashboard_link):
        assert link.startswith("http://127.0.0.1:")
        assert link.endswith("/status")


def test_reprs_mention_the_address(engine, client):
    address = client.scheduler_info()["address"]
    assert address in repr(client)
    assert address in repr(engine.cluster) or \
        engine.cluster.name in repr(engine.cluster)
    assert address.split(":")[-1] in client._repr_html_()
    future = client.submit(inc, 1)
    future.result()
    assert future.key in repr(future) and "finished" in repr(future)


def test_client_without_address_starts_a_local_cluster(engine):
    with engine.Client(n_workers=1, threads_per_worker=1,
                       dashboard_address=":0") as client:
        assert client.submit(inc, 1).result() == 2
        assert client.cluster is not None
        assert len(client.scheduler_info()["workers"]) == 1


def test_restart(engine):
    with engine.LocalCluster(n_workers=1, threads_per_worker=1,
                             dashboard_address=":0") as cluster, \
            engine.Client(cluster) as client:
        assert client.submit(inc, 1).result() == 2
        client.restart()
        client.wait_for_workers(1, timeout=30)
        assert client.submit(inc, 2).result() == 3


def test_dask_collections_on_either_engine(client):
    dask = pytest.importorskip("dask")
    from dask import delayed
    total = delayed(sum)([delayed(inc)(i) for i in range(5)])
    assert dask.compute(total, scheduler=client.get) == (15,)
