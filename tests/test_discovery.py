"""How ``Client()`` with no address finds its cluster.

The order: the ``scheduler-address`` config key, from a config file, the
``MINIDASK_SCHEDULER_ADDRESS`` environment variable or ``config.set``
(each overriding the one before), else a new LocalCluster that the client
owns. The scheduler here is a real ``minidask-scheduler`` process; the
client finds its secret in the file that process writes for its address.
"""

import logging
import os
import selectors
import subprocess
import sys
import time

import pytest

from minidask import Client, ConnectError, LocalCluster, config
from helpers import children, free_port, wait_until


def inc(x):
    return x + 1


@pytest.fixture(scope="module")
def scheduler():
    """A minidask-scheduler process; yields its address and its pid."""
    process = subprocess.Popen(
        [sys.executable, "-m", "minidask.cli", "scheduler", "--port", "0",
         "--no-dashboard"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    if not selector.select(timeout=30):
        process.kill()
        raise AssertionError("minidask-scheduler printed no address")
    address = process.stdout.readline().strip()
    assert address.startswith("tcp://127.0.0.1:")
    yield address, process.pid
    process.terminate()
    assert process.wait(timeout=30) == 0


class ClientLog(logging.Handler):
    """The client's INFO lines, kept for the test to read."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def client_log():
    handler = ClientLog()
    logger = logging.getLogger("minidask.client")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def connected_to(client, scheduler):
    """Whether ``client`` talks to the scheduler process of the fixture."""
    address, pid = scheduler
    return (client.scheduler_address == address
            and client.run_on_scheduler(os.getpid) == pid)


def write_config(folder, name, text):
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def use_config_folder(monkeypatch, folder):
    monkeypatch.setenv("MINIDASK_CONFIG", str(folder))
    config.refresh()


# -- each way of configuring the address ------------------------------------


def test_environment_variable(scheduler, monkeypatch, client_log):
    monkeypatch.setenv("MINIDASK_SCHEDULER_ADDRESS", scheduler[0])
    config.refresh()
    with Client() as client:
        assert connected_to(client, scheduler)
        assert client.cluster is None
    assert client_log == [
        f"connecting to {scheduler[0]} from config scheduler-address, set "
        f"by environment variable MINIDASK_SCHEDULER_ADDRESS"]


def test_config_file(scheduler, monkeypatch, tmp_path, client_log):
    path = write_config(tmp_path / "conf", "scheduler.yaml",
                        f"scheduler-address: {scheduler[0]}\n")
    use_config_folder(monkeypatch, tmp_path / "conf")
    with Client() as client:
        assert connected_to(client, scheduler)
    assert client_log == [
        f"connecting to {scheduler[0]} from config scheduler-address, set "
        f"by config file {path}"]


def test_config_set(scheduler, client_log):
    with config.set({"scheduler-address": scheduler[0]}):
        with Client() as client:
            assert connected_to(client, scheduler)
    assert client_log == [
        f"connecting to {scheduler[0]} from config scheduler-address, set "
        f"by config.set"]


def test_environment_beats_file_and_config_set_beats_both(
        scheduler, monkeypatch, tmp_path, client_log):
    dead = f"tcp://127.0.0.1:{free_port()}"
    write_config(tmp_path / "conf", "a.yaml", f"scheduler-address: {dead}\n")
    monkeypatch.setenv("MINIDASK_SCHEDULER_ADDRESS", scheduler[0])
    use_config_folder(monkeypatch, tmp_path / "conf")
    with Client() as client:
        assert connected_to(client, scheduler)

    monkeypatch.setenv("MINIDASK_SCHEDULER_ADDRESS", dead)
    config.refresh()
    with config.set({"scheduler-address": scheduler[0]}):
        with Client() as client:
            assert connected_to(client, scheduler)
    assert "set by config.set" in client_log[-1]


def test_an_address_given_wins_over_the_config(scheduler, client_log):
    dead = f"tcp://127.0.0.1:{free_port()}"
    with config.set({"scheduler-address": dead}):
        with Client(scheduler[0]) as client:
            assert connected_to(client, scheduler)
    assert client_log == [f"connecting to {scheduler[0]} given to Client()"]


# -- nothing configured ------------------------------------------------------


def test_nothing_configured_starts_a_local_cluster_and_closes_it(client_log):
    before = children()
    with Client(n_workers=1, threads_per_worker=1,
                dashboard_address=None) as client:
        assert isinstance(client.cluster, LocalCluster)
        assert client.scheduler_address == client.cluster.scheduler_address
        assert client.submit(inc, 1).result(timeout=30) == 2
        assert len(children()) == len(before) + 1  # one worker process
    assert client_log[0] == "no scheduler configured: starting a LocalCluster"
    assert client.cluster.status == "closed"
    wait_until(lambda: children() == before, timeout=15,
               message="Client() left its cluster's processes behind")


def test_a_client_given_a_cluster_does_not_close_it():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        with Client(cluster) as client:
            assert client.submit(inc, 1).result(timeout=30) == 2
        assert cluster.status == "running"
        assert cluster.scheduler_info()["workers"]


# -- mistakes ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["environment", "file", "config.set"])
def test_a_configured_address_that_does_not_answer_is_an_error(
        how, monkeypatch, tmp_path):
    dead = f"tcp://127.0.0.1:{free_port()}"
    expected = {"environment": "environment variable "
                               "MINIDASK_SCHEDULER_ADDRESS",
                "file": f"config file {tmp_path / 'conf' / 'dead.yaml'}",
                "config.set": "config.set"}[how]
    if how == "environment":
        monkeypatch.setenv("MINIDASK_SCHEDULER_ADDRESS", dead)
        config.refresh()
    elif how == "file":
        write_config(tmp_path / "conf", "dead.yaml",
                     f"scheduler-address: {dead}\n")
        use_config_folder(monkeypatch, tmp_path / "conf")
    before = children()
    with config.set({"comm.timeouts.connect": "0.5s"}):
        if how == "config.set":
            config.set({"scheduler-address": dead})
        start = time.monotonic()
        with pytest.raises(ConnectError) as info:
            Client()
        elapsed = time.monotonic() - start
    message = str(info.value)
    assert f"could not connect to {dead}" in message
    assert f"config scheduler-address, set by {expected}" in message
    assert elapsed < 5
    assert children() == before  # no LocalCluster was started instead


def test_a_malformed_configured_address_says_where_it_came_from(monkeypatch):
    monkeypatch.setenv("MINIDASK_SCHEDULER_ADDRESS", "localhost:8786")
    config.refresh()
    with pytest.raises(ValueError, match="'localhost:8786' is not an "
                       "address.*environment variable"):
        Client()


def test_an_address_with_cluster_arguments_is_an_error(scheduler):
    with pytest.raises(ValueError, match="both an address"):
        Client(scheduler[0], n_workers=2)
    with config.set({"scheduler-address": scheduler[0]}):
        with pytest.raises(ValueError, match="will not start a cluster "
                           "with n_workers"):
            Client(n_workers=2)
