"""Fixtures shared by every test module."""

import os
import pathlib

import pytest

from helpers import children, wait_until
from ssh_fixtures import *  # noqa: F401,F403

# Worker processes unpickle the tests' functions by reference, so they must
# be able to import the test modules, as a user's workers must import the
# user's modules.
_here = str(pathlib.Path(__file__).parent)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_here, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path_factory, monkeypatch):
    """Each test sees only the package defaults and what it sets itself."""
    import minidask.config
    for name in list(__import__("os").environ):
        if name.startswith("MINIDASK_"):
            monkeypatch.delenv(name)
    empty = tmp_path_factory.mktemp("config")
    monkeypatch.setenv("MINIDASK_CONFIG", str(empty))
    minidask.config.refresh()
    yield
    monkeypatch.undo()
    minidask.config.refresh()


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes, shared by a test module."""
    from minidask import LocalCluster
    before = {p.pid for p in children()}
    with LocalCluster(n_workers=2, threads_per_worker=1,
                      dashboard_address=None) as cluster:
        yield cluster
    wait_until(lambda: {p.pid for p in children()} <= before, timeout=10,
               message="worker processes left after the cluster closed")


@pytest.fixture
def client(cluster):
    from minidask import Client
    with Client(cluster) as client:
        yield client
