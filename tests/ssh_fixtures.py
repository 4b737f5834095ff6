"""pytest fixtures for the SSH tests: a real sshd and the embedded server.

tests/conftest.py makes them available to every test with

    from ssh_fixtures import *  # noqa: F401,F403

Fixtures:

- `openssh_server`: OpenSSH's sshd serving the current user (root in CI).
- `openssh_server_unprivileged`: OpenSSH's sshd serving `minidask-test`.
- `embedded_ssh_server`: minidask's `EmbeddedSSHServer`, current user.

Each yields a server with `host`, `port`, `username`, `known_hosts` and
`connect_options`, closes it afterwards, and fails the test if a process
started through it is still alive. The two sshd fixtures skip, saying why,
where sshd is missing or the tests do not run as root. Their
`remote_python` is a Python the served user can import minidask with (see
tests/sshd_fixture.py for how one is found for `minidask-test`, also
when the tests run in a virtual environment); tests that need it call
`require_remote_python(server)`. A test that runs something as
`minidask-test` without SSH gets the same Python from
`sshd_fixture.prepare_remote_python(user, folder)`. On the embedded server
commands run as this process's user, with its environment: `sys.executable`
is the remote Python, and PYTHONPATH names the minidask under test first.
"""

import os
import shutil
import tempfile

import psutil
import pytest

from minidask.deploy.sshd import EmbeddedSSHServer
from sshd_fixture import (SOURCE_ROOT, OpenSSHServer, current_user,
                          ensure_test_user, is_alive, prepare_remote_python,
                          python_path, sshd_problem)

__all__ = [
    "embedded_ssh_server",
    "openssh_server",
    "openssh_server_unprivileged",
    "require_remote_python",
    "root_remote_python",
    "server",
    "ssh_test_user",
    "unprivileged_remote_python",
]


def require_remote_python(server):
    """Skip the calling test unless `server` has a usable remote Python."""
    if server.remote_python is None:
        pytest.skip(f"no Python for {server.username} on {server!r}:"
                    f" {server.remote_python_problem}")
    return server.remote_python


def _skip_without_sshd():
    problem = sshd_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="session")
def ssh_test_user():
    """The unprivileged `minidask-test` user, created when absent."""
    _skip_without_sshd()
    return ensure_test_user()


@pytest.fixture(scope="session")
def root_remote_python():
    """How root runs the minidask under test over SSH: a RemotePython."""
    _skip_without_sshd()
    yield from _remote_python_for(current_user())


@pytest.fixture(scope="session")
def unprivileged_remote_python(ssh_test_user):
    """How `minidask-test` runs the minidask under test: a RemotePython."""
    yield from _remote_python_for(ssh_test_user)


def _remote_python_for(user):
    # Not pytest's tmp_path: that lives in a folder only root may enter.
    folder = tempfile.mkdtemp(prefix="minidask-test-python-")
    os.chmod(folder, 0o755)
    try:
        yield prepare_remote_python(user, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def openssh_server(root_remote_python):
    """A real sshd serving the current user."""
    with OpenSSHServer(remote_python=root_remote_python) as server:
        yield server


@pytest.fixture
def openssh_server_unprivileged(ssh_test_user, unprivileged_remote_python):
    """A real sshd serving the unprivileged `minidask-test` user."""
    with OpenSSHServer(user=ssh_test_user,
                       remote_python=unprivileged_remote_python) as server:
        yield server


@pytest.fixture
def embedded_ssh_server():
    """minidask's embedded SSH server, on its own thread."""
    before = _children()
    server = EmbeddedSSHServer(env={"PYTHONPATH": python_path(SOURCE_ROOT)})
    with server:
        yield server

    survivors = [proc for proc in _children() - before if is_alive(proc)]
    assert not survivors, (f"processes started through {server!r} survived"
                           f" its close: {survivors}")


def _children():
    return set(psutil.Process().children(recursive=True))


# Each SSH test that takes ``server`` runs once against each kind of server.
SERVERS = [
    pytest.param("embedded_ssh_server", id="embedded"),
    pytest.param("openssh_server", id="openssh", marks=pytest.mark.ssh),
    pytest.param("openssh_server_unprivileged", id="openssh-unprivileged",
                 marks=pytest.mark.ssh),
]


@pytest.fixture(params=SERVERS)
def server(request):
    """The embedded server, OpenSSH's sshd as root, and as another user."""
    return request.getfixturevalue(request.param)
