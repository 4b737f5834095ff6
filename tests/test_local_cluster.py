"""LocalCluster: sizing, processes or threads, scaling, closing, mistakes.

Every cluster here is real: a scheduler on this process's event loop and
workers in child processes (``processes=True``) or threads. After each
test that closes a cluster, no child process of the test may be left.
"""

import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
import warnings

import psutil
import pytest

import minidask.deploy.cluster as cluster_module
from minidask import Client, LocalCluster, config
from minidask.core import secret_file_for
from minidask.deploy import sizing
from helpers import children, wait_until


def inc(x):
    return x + 1


def worker_pids(cluster):
    info = cluster.scheduler_info()["workers"]
    return sorted(w["pid"] for w in info.values())


def no_children_left(before=()):
    before = {p.pid for p in before}
    wait_until(lambda: {p.pid for p in children()} <= before, timeout=15,
               message="a worker process outlived its cluster")


@pytest.fixture
def listening_socket():
    """A port that something else already listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


# -- processes and threads ---------------------------------------------------


def test_processes_true_runs_each_worker_in_a_child_process():
    with LocalCluster(n_workers=2, threads_per_worker=1,
                      dashboard_address=None) as cluster:
        pids = worker_pids(cluster)
        assert sorted(p.pid for p in children()) == pids
        assert os.getpid() not in pids
        with Client(cluster) as client:
            assert client.submit(inc, 1).result(timeout=30) == 2
            ran_in = set(client.run(os.getpid).values())
        assert ran_in == set(pids)
    assert cluster.status == "closed"
    no_children_left()


def test_processes_false_runs_workers_as_threads_here():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        assert worker_pids(cluster) == [os.getpid(), os.getpid()]
        assert children() == []
        with Client(cluster) as client:
            assert client.submit(inc, 1).result(timeout=30) == 2
    no_children_left()


def test_default_size_follows_the_usable_cores_and_memory():
    cores = sizing.cpu_count()
    n_workers, threads = sizing.default_split(cores)
    with LocalCluster(processes=False, dashboard_address=None) as cluster:
        workers = cluster.scheduler_info()["workers"].values()
        assert len(workers) == n_workers
        assert sum(w["nthreads"] for w in workers) == n_workers * threads
        share = sizing.memory_total() // n_workers
        assert {w["memory_limit"] for w in workers} == {share}


@pytest.mark.parametrize("given, expected", [
    ("2 GiB", 2 * 2**30),
    (3_000_000_000, 3_000_000_000),
    (None, None),
    (0, None),
])
def test_memory_limit_forms(given, expected):
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      memory_limit=given, dashboard_address=None) as cluster:
        [worker] = cluster.scheduler_info()["workers"].values()
        assert worker["memory_limit"] == expected


def test_memory_limit_fraction_and_auto_divide_the_machine():
    total = sizing.memory_total()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      memory_limit="auto", dashboard_address=None) as auto:
        limits = [w["memory_limit"]
                  for w in auto.scheduler_info()["workers"].values()]
    assert limits == [total // 2, total // 2]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      memory_limit=0.5, dashboard_address=None) as half:
        [worker] = half.scheduler_info()["workers"].values()
    assert worker["memory_limit"] == int(total * 0.5)


def test_memory_limit_above_the_machine_is_lowered_with_a_warning():
    total = sizing.memory_total()
    with pytest.warns(UserWarning, match="more than this machine's usable "
                      "memory") as caught:
        cluster = LocalCluster(n_workers=1, threads_per_worker=1,
                               processes=False, memory_limit=total * 4,
                               dashboard_address=None)
    with cluster:
        [worker] = cluster.scheduler_info()["workers"].values()
        assert worker["memory_limit"] == total
    assert len(caught) == 1


def test_everything_listens_on_localhost_by_default():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        assert cluster.dashboard_link.startswith("http://127.0.0.1:")
        listening = [c.laddr for c in psutil.Process().net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN]
        ports = {port for _, port in listening}
        scheduler_port = int(cluster.scheduler_address.rsplit(":", 1)[1])
        assert {scheduler_port, cluster.dashboard_port} <= ports
        assert {host for host, _ in listening} == {"127.0.0.1"}


# -- scaling, waiting, closing -----------------------------------------------


@pytest.mark.parametrize("processes", [True, False])
def test_scale_up_and_down_leaves_no_process_behind(processes):
    before = children()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=processes,
                      dashboard_address=None) as cluster:
        client = Client(cluster)
        [first] = cluster.scheduler_info()["workers"]
        kept = client.submit(inc, 41, workers=[first])
        assert kept.result(timeout=30) == 42

        cluster.scale(2)
        assert len(cluster.scheduler_info()["workers"]) == 2
        if processes:
            assert len(children()) == len(before) + 2

        cluster.scale(1)  # the newest worker goes; the first stays
        assert list(cluster.scheduler_info()["workers"]) == [first]
        cluster.scale(0)
        assert cluster.scheduler_info()["workers"] == {}
        no_children_left(before)

        cluster.scale(1)
        assert client.submit(inc, 1).result(timeout=30) == 2
        client.close()
    no_children_left(before)


def test_scale_down_keeps_results_of_the_workers_that_leave():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        with Client(cluster) as client:
            workers = cluster.scheduler_info()["workers"].values()
            newest = max(workers, key=lambda w: w["name"])["address"]
            future = client.submit(inc, 1, workers=[newest])
            assert future.result(timeout=30) == 2
            cluster.scale(1)
            assert newest not in cluster.scheduler_info()["workers"]
            assert future.result(timeout=30) == 2


def test_scale_refuses_a_negative_count():
    with LocalCluster(n_workers=0, processes=False,
                      dashboard_address=None) as cluster:
        with pytest.raises(ValueError, match="scale.-1."):
            cluster.scale(-1)


def test_wait_for_workers_waits_and_times_out():
    with LocalCluster(n_workers=0, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        with pytest.raises(TimeoutError, match="0 of 1 workers"):
            cluster.wait_for_workers(1, timeout=0.2)

        arrived = []
        waiter = threading.Thread(target=lambda: arrived.append(
            cluster.wait_for_workers(1, timeout=30)))
        waiter.start()
        cluster.scale(1)
        waiter.join(timeout=30)
        assert arrived == [1]
        with Client(cluster) as client:
            assert client.wait_for_workers(1, timeout=5) == 1


def test_close_is_idempotent_and_ends_the_cluster():
    cluster = LocalCluster(n_workers=1, threads_per_worker=1,
                           dashboard_address=None)
    address = cluster.scheduler_address
    cluster.close()
    cluster.close()
    assert cluster.status == "closed"
    assert not secret_file_for(address).exists()
    with pytest.raises(RuntimeError, match="closed"):
        cluster.scale(2)
    no_children_left()


def test_a_forgotten_cluster_is_closed_at_interpreter_exit(tmp_path):
    script = textwrap.dedent("""
        import psutil
        from minidask import Client, LocalCluster
        cluster = LocalCluster(n_workers=2, threads_per_worker=1,
                               dashboard_address=None)
        client = Client(cluster)
        pids = [p.pid for p in psutil.Process().children(recursive=True)]
        print(cluster.scheduler_address, *pids, flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], timeout=60,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    address, *pids = done.stdout.split()
    assert len(pids) == 2
    # Only a scheduler that was closed removes its secret file; one that
    # was simply killed with its process leaves it behind.
    assert not secret_file_for(address).exists()
    wait_until(lambda: not any(psutil.pid_exists(int(p)) and
                               psutil.Process(int(p)).status()
                               != psutil.STATUS_ZOMBIE for p in pids),
               timeout=15, message="a worker outlived its interpreter")


# -- the dashboard -------------------------------------------------------------


def test_a_taken_dashboard_port_moves_with_one_warning(listening_socket):
    from minidask.dashboard import start_dashboard  # noqa: F401
    taken = listening_socket
    warnings_seen = LogWarnings()
    with warnings_seen, LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False,
            dashboard_address=f":{taken}") as cluster:
        moved = cluster.dashboard_port
        assert moved != taken
        assert cluster.dashboard_link == f"http://127.0.0.1:{moved}/status"
        health = f"http://127.0.0.1:{moved}/health"
        with urllib.request.urlopen(health, timeout=10) as reply:
            assert reply.read() == b"ok"
    [warning] = warnings_seen.lines
    assert str(taken) in warning and str(moved) in warning


class LogWarnings:
    """Collect the WARNING lines of minidask's loggers in a with block."""

    def __init__(self):
        self.lines = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda r: self.lines.append(r.getMessage())
        self.logger = logging.getLogger("minidask")

    def __enter__(self):
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)


@pytest.fixture
def fresh_template_warnings(monkeypatch):
    monkeypatch.setattr(cluster_module, "_warned_templates", set())


def test_dashboard_link_follows_the_config_template(monkeypatch,
                                                    fresh_template_warnings):
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ana/")
    template = "{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/status"
    with config.set({"dashboard.link": template}), LocalCluster(
            n_workers=0, processes=False, dashboard_address=":0") as cluster:
        port = cluster.dashboard_port
        assert cluster.dashboard_link == f"/user/ana/proxy/{port}/status"
        with Client(cluster) as client:
            assert client.dashboard_link == cluster.dashboard_link
            assert f'href="/user/ana/proxy/{port}/status"' in \
                client._repr_html_()


def test_dashboard_link_naming_an_unset_variable_warns_once(
        monkeypatch, fresh_template_warnings):
    monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX", raising=False)
    template = "{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/status"
    with config.set({"dashboard.link": template}), LocalCluster(
            n_workers=0, processes=False, dashboard_address=":0") as cluster:
        plain = f"http://127.0.0.1:{cluster.dashboard_port}/status"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cluster.dashboard_link == plain
            assert cluster.dashboard_link == plain
            with Client(cluster) as client:
                assert client.dashboard_link == plain
    [warning] = caught
    assert "JUPYTERHUB_SERVICE_PREFIX" in str(warning.message)
    assert plain in str(warning.message)


def test_no_dashboard_means_no_link():
    with LocalCluster(n_workers=0, processes=False,
                      dashboard_address=None) as cluster:
        assert cluster.dashboard_link is None
        with Client(cluster) as client:
            assert client.dashboard_link is None


# -- mistakes ------------------------------------------------------------------


@pytest.mark.parametrize("arguments, message", [
    ({"n_workers": -1}, r"n_workers=-1 .*an int of at least 0"),
    ({"n_workers": 1.5}, r"n_workers=1.5 .*an int of at least 0"),
    ({"threads_per_worker": 0},
     r"threads_per_worker=0 .*an int of at least 1"),
    ({"memory_limit": "lots"}, r"memory_limit='lots' .*'auto'.*'2 GiB'"),
    ({"memory_limit": -5}, r"memory_limit=-5 "),
    ({"dashboard_address": "lots"},
     r"dashboard_address='lots' .*':8787'.*None"),
    ({"scheduler_port": -1}, r"scheduler_port=-1 .*0 for any free port"),
    ({"silence_logs": "loud"}, r"silence_logs='loud' .*logging.WARNING"),
    ({"processes": "no"}, r"processes='no' .*True or False"),
    ({"host": "tcp://127.0.0.1"}, r"host='tcp://127.0.0.1' .*'127.0.0.1'"),
])
def test_bad_arguments_name_themselves_and_what_is_accepted(arguments,
                                                            message):
    before = children()
    with pytest.raises(ValueError, match=message):
        LocalCluster(**{"processes": False, "dashboard_address": None,
                        **arguments})
    assert children() == before


def test_an_unknown_argument_lists_the_known_ones():
    with pytest.raises(TypeError, match="'nworkers'.*n_workers"):
        LocalCluster(nworkers=2)


def test_a_taken_scheduler_port_is_an_error_naming_it(listening_socket):
    before = children()
    with pytest.raises(OSError, match=f"127.0.0.1:{listening_socket}"):
        LocalCluster(n_workers=1, scheduler_port=listening_socket,
                     dashboard_address=None)
    assert children() == before
