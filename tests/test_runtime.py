"""The runtime end to end: real scheduler, worker and nanny processes."""

import operator
import os
import signal
import time

import pytest

import minidask
from minidask import CancelledError, Client, KilledWorker, wait
from helpers import wait_until


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def slow_inc(x, delay=0.02):
    time.sleep(delay)
    return x + 1


def fail(x):
    raise ValueError(f"bad value {x}")


def test_submit_and_result(client):
    future = client.submit(inc, 1)
    assert future.result(timeout=10) == 2
    assert future.status == "finished"
    assert future.done()


def test_map_and_gather_keep_order_and_nesting(client):
    futures = client.map(inc, range(20))
    assert client.gather(futures) == list(range(1, 21))
    nested = client.gather({"a": futures[0], "b": [futures[1], (futures[2],)]})
    assert nested == {"a": 1, "b": [2, (3,)]}


def test_dependency_moves_worker_to_worker(client):
    a, b = sorted(client.scheduler_info()["workers"])
    x = client.submit(inc, 1, workers=[a])
    y = client.submit(inc, 10, workers=[b])
    z = client.submit(add, x, y, workers=[b])
    assert z.result(timeout=10) == 13
    # y ran on b; x was made on a and had to be fetched by b
    who_has = client.who_has([x, y, z])
    assert who_has[y.key] == [b] and who_has[z.key] == [b]
    assert set(who_has[x.key]) == {a, b}


def test_futures_inside_containers_become_dependencies(client):
    x, y = client.submit(inc, 1), client.submit(inc, 2)
    total = client.submit(sum, [x, y, 10])
    assert total.result(timeout=10) == 15
    picked = client.submit(operator.getitem, {"k": x}, "k")
    assert picked.result(timeout=10) == 2


def test_diamond_graph(client):
    top = client.submit(inc, 1)
    left = client.submit(inc, top)
    right = client.submit(operator.mul, top, 10)
    bottom = client.submit(add, left, right)
    assert bottom.result(timeout=10) == 3 + 20


def test_pure_calls_share_a_key_and_impure_do_not(client):
    assert client.submit(inc, 5).key == client.submit(inc, 5).key
    assert client.submit(inc, 5, pure=False).key != \
        client.submit(inc, 5, pure=False).key


def test_exception_is_reraised_with_remote_traceback(client):
    future = client.submit(fail, 3)
    with pytest.raises(ValueError, match="bad value 3") as info:
        future.result(timeout=10)
    assert future.status == "error"
    notes = "".join(getattr(info.value, "__notes__", []))
    assert "Traceback on the worker" in notes and "in fail" in notes
    assert "in fail" in future.traceback()
    assert isinstance(future.exception(), ValueError)


def test_error_spreads_to_dependents(client):
    bad = client.submit(fail, 1)
    after = client.submit(inc, bad)
    with pytest.raises(ValueError, match="bad value 1"):
        after.result(timeout=10)


def test_gather_skips_errors_when_asked(client):
    futures = [client.submit(inc, 1), client.submit(fail, 2)]
    assert client.gather(futures, errors="skip") == [2]


def test_scatter(client):
    [x] = client.scatter([41])
    assert client.submit(inc, x).result(timeout=10) == 42
    single = client.scatter({"answer": 41})
    assert single["answer"].key == "answer"
    everywhere = client.scatter(100, broadcast=True)
    assert len(client.who_has(everywhere)[everywhere.key]) == 2


def test_cancel(client):
    future = client.submit(slow_inc, 1, delay=5, pure=False)
    future.cancel()
    with pytest.raises(CancelledError):
        future.result(timeout=5)
    assert future.status == "cancelled"
    wait_until(lambda: future.key not in client.run_on_scheduler(
        lambda dask_scheduler: list(dask_scheduler.tasks)))


def _cluster_memory(client):
    tasks = client.run_on_scheduler(
        lambda dask_scheduler: len(dask_scheduler.tasks))
    held = client.run(lambda dask_worker: len(dask_worker.data))
    return tasks, sum(held.values())


def test_released_futures_free_memory_everywhere(client):
    wait_until(lambda: _cluster_memory(client) == (0, 0))
    futures = client.map(inc, range(50))
    total = client.submit(sum, futures)
    assert total.result(timeout=10) == sum(range(1, 51))
    assert _cluster_memory(client)[0] == 51
    del futures, total
    wait_until(lambda: _cluster_memory(client) == (0, 0),
               message="scheduler or workers kept released data")


def test_wait_and_as_completed(client):
    futures = client.map(slow_inc, range(5), delay=0.01)
    done, not_done = wait(futures, timeout=10)
    assert len(done) == 5 and not not_done
    seen = [f.result() for f in minidask.as_completed(futures)]
    assert sorted(seen) == list(range(1, 6))
    with pytest.raises(TimeoutError):
        wait(client.submit(slow_inc, 0, delay=3, pure=False), timeout=0.1)


def test_done_callback_runs(client):
    import threading
    called = threading.Event()
    future = client.submit(inc, 100)
    future.add_done_callback(lambda f: called.set())
    assert called.wait(10)


def test_print_and_logging_inside_tasks_reach_worker_logs(client):
    def chatty(x):
        import logging
        print(f"printing from a task {x}")
        logging.getLogger("user.code").warning("warning from a task %s", x)
        return x

    future = client.submit(chatty, 7, pure=False)
    future.result(timeout=10)
    worker = client.who_has(future)[future.key][0]
    lines = [line for _, line in client.get_worker_logs()[worker]]
    assert any("printing from a task 7" in line for line in lines)
    assert any("warning from a task 7" in line for line in lines)
    assert lines == [line for _, line in
                     client.get_worker_logs(workers=[worker])[worker]]
    sched = client.get_scheduler_logs()
    assert any("joined" in line for _, line in sched)


def test_worker_killed_mid_graph_results_still_correct(cluster, client):
    pids = client.run(os.getpid)
    leaves = client.map(slow_inc, range(500), delay=0.002)
    pairs = [client.submit(add, leaves[i], leaves[i + 1])
             for i in range(0, 500, 2)]
    total = client.submit(sum, pairs)
    time.sleep(0.3)
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    assert total.result(timeout=60) == sum(range(1, 501))
    assert client.gather(leaves) == list(range(1, 501))
    client.wait_for_workers(2, timeout=30)


def test_killed_worker_after_repeated_deaths(cluster, client):
    def crash(x):
        os.kill(os.getpid(), signal.SIGKILL)

    future = client.submit(crash, 1)
    with pytest.raises(KilledWorker, match="3 workers that died"):
        future.result(timeout=60)
    client.wait_for_workers(2, timeout=30)
    assert client.submit(inc, 1).result(timeout=10) == 2


def test_restart_forgets_everything(cluster, client):
    future = client.submit(inc, 1)
    future.result(timeout=10)
    old = set(client.run(os.getpid).values())
    client.restart()
    assert future.status == "cancelled"
    assert not old & set(client.run(os.getpid).values())
    assert client.submit(inc, 2).result(timeout=10) == 3


def test_functions_from_main_run_on_workers(tmp_path, cluster):
    import subprocess
    import sys
    from minidask.core import secret_file_for
    script = tmp_path / "script.py"
    script.write_text(
        "import sys\n"
        "from minidask import Client\n"
        "def square(x):\n"
        "    return x * x\n"
        "with Client(sys.argv[1]) as client:\n"
        "    print(sum(client.gather(client.map(square, range(4)))))\n"
        "    print(client.submit(lambda: 'lambda ran').result())\n")
    assert secret_file_for(cluster.scheduler_address).exists()
    out = subprocess.run([sys.executable, str(script),
                          cluster.scheduler_address],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["14", "lambda ran"]


def test_client_with_address_and_cluster_kwargs_is_an_error(cluster):
    with pytest.raises(ValueError, match="both an address"):
        Client(cluster.scheduler_address, n_workers=2)


def test_a_large_value_moves_between_workers(client):
    a, b = sorted(client.scheduler_info()["workers"])
    big = client.submit(lambda: b"x" * (150 * 2**20), workers=[a],
                        pure=False)
    length = client.submit(len, big, workers=[b])
    assert length.result(timeout=60) == 150 * 2**20


def test_small_results_come_with_the_message_that_they_are_done(client):
    small = client.submit(inc, 41, pure=False)
    large = client.submit(operator.mul, b"z", 5000, pure=False)
    wait([small, large], timeout=10)
    # the small one's pickle travelled worker -> scheduler -> client
    assert small._state.value is not None
    assert large._state.value is None  # the large one is fetched
    assert small.result() == 42 and large.result() == b"z" * 5000
    assert client.gather([small, small]) == [42, 42]


class Holder:
    """Small by its own size, large by what it holds."""

    def __init__(self, n):
        self.items = list(range(n))


def test_a_small_object_holding_much_is_fetched_not_sent_along(client):
    holder = client.submit(Holder, 200_000, pure=False)
    little = client.submit(Holder, 3, pure=False)
    wait([holder, little], timeout=10)
    assert holder._state.value is None
    assert little._state.value is not None
    assert len(holder.result().items) == 200_000
    assert little.result().items == [0, 1, 2]


def test_a_result_that_does_not_pickle_is_an_error_naming_it(client):
    import threading
    future = client.submit(threading.Lock, pure=False)
    with pytest.raises(TypeError, match="cannot pickle '_thread.lock'"):
        future.result(timeout=10)
    assert client.submit(inc, 1).result(timeout=10) == 2


def _executing(key):
    def check(dask_scheduler):
        return dask_scheduler.tasks[key].executing
    return check


def test_a_long_task_is_reported_as_running(client):
    from minidask.worker import START_REPORT_DELAY
    future = client.submit(slow_inc, 1, delay=START_REPORT_DELAY * 40,
                           pure=False)
    wait_until(lambda: client.run_on_scheduler(_executing(future.key)),
               timeout=START_REPORT_DELAY * 30,
               message="the scheduler never heard the task had started")
    assert future.result(timeout=10) == 2


def _glibc_tunables():
    return os.environ.get("GLIBC_TUNABLES")


def test_worker_processes_ask_for_huge_pages(client):
    assert set(client.run(_glibc_tunables).values()) == {
        "glibc.malloc.hugetlb=1"}


def test_huge_pages_can_be_turned_off_and_a_set_value_is_kept(monkeypatch):
    from minidask import LocalCluster
    for setting, env, expected in [(False, None, None),
                                   (True, "glibc.malloc.arena_max=4",
                                    "glibc.malloc.arena_max=4")]:
        if env is None:
            monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
        else:
            monkeypatch.setenv("GLIBC_TUNABLES", env)
        with minidask.config.set({"nanny.huge-pages": setting}), \
                LocalCluster(n_workers=1, threads_per_worker=1,
                             dashboard_address=None) as cluster, \
                Client(cluster) as client:
            assert list(client.run(_glibc_tunables).values()) == [expected]


def test_a_task_waiting_for_a_thread_is_reported_once_it_runs(client):
    from minidask.worker import START_REPORT_DELAY
    a = sorted(client.scheduler_info()["workers"])[0]
    first = client.submit(slow_inc, 1, delay=START_REPORT_DELAY * 12,
                          workers=[a], pure=False)
    second = client.submit(slow_inc, 2, delay=START_REPORT_DELAY * 30,
                           workers=[a], pure=False)
    wait_until(lambda: client.run_on_scheduler(_executing(first.key)),
               timeout=START_REPORT_DELAY * 10)
    # one thread: the second waits behind the first, and is not running
    assert not client.run_on_scheduler(_executing(second.key))
    wait_until(lambda: client.run_on_scheduler(_executing(second.key)),
               timeout=START_REPORT_DELAY * 25,
               message="the second task was never reported as running")
    assert second.result(timeout=10) == 3
