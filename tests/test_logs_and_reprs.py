"""get_logs(), and how clusters, clients, futures and logs look.

The views are drawn by ``minidask.display`` from dicts (tested on their
own in ``test_display.py``); these tests check that the real objects hand
it the right facts, and that logs reach the right key.
"""

import logging
import os
import re
import time
import uuid

import pytest

import minidask
from minidask import Client, LocalCluster
from minidask.display import Logs
from minidask.utils import format_bytes
from helpers import wait_until


def inc(x):
    return x + 1


def chatty(token):
    """Print a line, then log one: both must reach this worker's log."""
    print(f"printed {token}")
    log = logging.getLogger("tutorial.task")
    log.setLevel(logging.INFO)  # the root logger lets only warnings by
    log.info("logged %s", token)
    log.warning("warned %s", token)
    return token


def wait_for_file(path):
    while not os.path.exists(path):
        time.sleep(0.01)
    return 1


def fail(x):
    raise ValueError(f"bad {x}")


@pytest.fixture(scope="module", params=[True, False],
                ids=["processes", "threads"])
def cluster(request):
    with LocalCluster(n_workers=2, threads_per_worker=1,
                      processes=request.param,
                      dashboard_address=":0") as cluster:
        yield cluster


@pytest.fixture
def client(cluster):
    with Client(cluster) as client:
        yield client


def record_lines(text):
    """The lines of a log text that start a record (with their time)."""
    return [line for line in text.splitlines()
            if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - ", line)]


# -- get_logs ------------------------------------------------------------------


def test_get_logs_has_cluster_scheduler_and_one_key_per_worker(cluster):
    logs = cluster.get_logs()
    assert isinstance(logs, Logs)
    workers = list(cluster.scheduler_info()["workers"])
    assert list(logs)[:2] == ["Cluster", "Scheduler"]
    assert sorted(logs)[2:] == sorted(["Cluster", "Scheduler", *workers])[2:]
    assert len(logs) == 2 + len(workers)
    assert "LocalCluster" in logs["Cluster"] and "running at" in \
        logs["Cluster"]
    assert f"scheduler at {cluster.scheduler_address}" in logs["Scheduler"]
    for address in workers:
        assert f"worker at {address}" in logs[address]


def test_print_and_log_in_a_task_land_under_its_worker(cluster, client):
    here, there = list(cluster.scheduler_info()["workers"])
    token = uuid.uuid4().hex
    future = client.submit(chatty, token, workers=[here])
    assert future.result(timeout=30) == token

    logs = cluster.get_logs()
    text = logs[here]
    assert f"printed {token}" in text
    assert f"logged {token}" in text
    for other in ("Scheduler", there):
        assert token not in logs[other]
    # Newest first: the line logged after the print comes before it.
    assert text.index(f"logged {token}") < text.index(f"printed {token}")


def test_log_lines_are_newest_first(cluster, client):
    client.gather(client.map(chatty, [uuid.uuid4().hex for _ in range(4)]))
    for source, text in cluster.get_logs().items():
        times = [line[:23] for line in record_lines(text)]
        assert times, f"{source} has no log lines"
        assert times == sorted(times, reverse=True), source


def test_get_logs_can_pick_sources(cluster):
    first = next(iter(cluster.scheduler_info()["workers"]))
    assert list(cluster.get_logs(cluster=False, scheduler=False,
                                 workers=[first])) == [first]
    assert list(cluster.get_logs(workers=False)) == ["Cluster", "Scheduler"]
    with pytest.raises(ValueError, match="no worker at tcp://127.0.0.1:9 "
                       "in this cluster; its workers are"):
        cluster.get_logs(workers=["tcp://127.0.0.1:9"])


def test_logs_html_has_a_section_per_source_with_its_warnings(cluster,
                                                              client):
    here, _ = list(cluster.scheduler_info()["workers"])
    token = uuid.uuid4().hex
    client.submit(chatty, token, workers=[here]).result(timeout=30)
    logs = cluster.get_logs()
    html = logs._repr_html_()
    sections = html.split("<details")[1:]
    assert len(sections) == len(logs)
    for source, section in zip(logs, sections):
        assert source in section.split("</summary>")[0]
    [mine] = [s for s in sections if here in s.split("</summary>")[0]]
    assert f"warned {token}" in mine
    assert re.search(r"&middot; \d+\s+warnings?", mine)
    text = repr(logs)
    assert text.startswith("Logs({") and f"'{here}':" in text


def test_thread_workers_keep_only_their_own_lines():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        with Client(cluster):
            logs = cluster.get_logs()
    workers = [source for source in logs if source.startswith("tcp://")]
    assert len(workers) == 2
    connecting = f"connecting to {cluster.scheduler_address}"
    assert connecting in logs["Cluster"]
    for address in workers:
        assert f"worker at {address}" in logs[address]
        assert connecting not in logs[address]
        other = next(a for a in workers if a != address)
        assert f"worker at {other}" not in logs[address]


def test_get_logs_after_close_keeps_the_cluster_lines():
    cluster = LocalCluster(n_workers=1, threads_per_worker=1,
                           processes=False, dashboard_address=None)
    cluster.close()
    logs = cluster.get_logs()
    assert list(logs) == ["Cluster"]
    assert logs["Cluster"].splitlines()[0].endswith(
        f"LocalCluster {cluster.name} closed")


# -- reprs of clusters and clients ---------------------------------------------


def memory_total(cluster):
    limits = [w["memory_limit"]
              for w in cluster.scheduler_info()["workers"].values()]
    return format_bytes(sum(limits))


def test_cluster_repr_and_html(cluster):
    assert repr(cluster) == (
        f"LocalCluster({cluster.name}, '{cluster.scheduler_address}', "
        f"workers=2, threads=2, memory={memory_total(cluster)})")
    html = cluster._repr_html_()
    assert "LocalCluster" in html and cluster.name in html
    assert cluster.scheduler_address in html
    assert f'href="{cluster.dashboard_link}"' in html
    assert cluster.dashboard_link == \
        f"http://127.0.0.1:{cluster.dashboard_port}/status"
    assert "running" in html and "Workers (2)" in html
    assert memory_total(cluster) in html
    for address in cluster.scheduler_info()["workers"]:
        assert address in html


def test_client_repr_and_html(cluster, client):
    assert repr(client) == (
        f"<Client: '{cluster.scheduler_address}' workers=2, threads=2, "
        f"memory={memory_total(cluster)}>")
    html = client._repr_html_()
    assert client.id in html and cluster.scheduler_address in html
    assert f'href="{cluster.dashboard_link}"' in html
    assert "LocalCluster object" in html and cluster.name in html
    for address in cluster.scheduler_info()["workers"]:
        assert address in html


def test_client_by_address_shows_its_workers(cluster):
    with Client(cluster.scheduler_address) as client:
        html = client._repr_html_()
        assert "a scheduler address" in html and "Workers (2)" in html
        for address in cluster.scheduler_info()["workers"]:
            assert address in html
        assert client.dashboard_link == cluster.dashboard_link


def test_closed_cluster_and_client_say_so():
    cluster = LocalCluster(n_workers=1, threads_per_worker=1,
                           processes=False, dashboard_address=None)
    client = Client(cluster)
    address = cluster.scheduler_address
    client.close()
    cluster.close()
    assert repr(client) == f"<Client: '{address}' closed>"
    assert repr(cluster) == (f"LocalCluster({cluster.name}, '{address}', "
                             f"workers=0, threads=0, memory=0 B, "
                             f"status=closed)")
    assert "closed" in client._repr_html_()
    assert "closed" in cluster._repr_html_()


def test_closing_the_cluster_first_is_not_a_warning(caplog):
    cluster = LocalCluster(n_workers=1, threads_per_worker=1,
                           processes=False, dashboard_address=None)
    client = Client(cluster)
    lines = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("minidask.client").addHandler(handler)
    try:
        cluster.close()
        wait_until(lambda: client.status == "lost")
    finally:
        logging.getLogger("minidask.client").removeHandler(handler)
        client.close()
    assert lines == []


# -- futures -------------------------------------------------------------------


def test_future_repr_and_html_show_key_and_status(client, tmp_path):
    gate = tmp_path / "go"
    waiting = client.submit(wait_for_file, str(gate))
    assert repr(waiting) == f"<Future: pending, key: {waiting.key}>"
    html = waiting._repr_html_()
    assert waiting.key in html and "pending" in html

    gate.touch()
    assert waiting.result(timeout=30) == 1
    assert repr(waiting) == \
        f"<Future: finished, type: int, key: {waiting.key}>"
    html = waiting._repr_html_()
    assert "finished" in html and ">int<" in html

    failed = client.submit(fail, 1)
    wait_until(failed.done, timeout=30)
    assert repr(failed) == f"<Future: error, key: {failed.key}>"
    assert "error" in failed._repr_html_()


def test_progress_draws_a_bar_for_real_futures(client, capsys):
    futures = client.map(inc, range(10))
    broken = client.submit(fail, 2)
    minidask.progress(futures, notebook=False)
    assert all(f.done() for f in futures)
    assert "10/10" in capsys.readouterr().err

    minidask.progress(futures[0], broken, notebook=False)
    err = capsys.readouterr().err
    assert "2/2" in err and "errors=1" in err
