"""SSHCluster against real SSH servers, and every way it can fail.

Each cluster test runs three times: on OpenSSH's sshd logging in as root,
on sshd logging in as the unprivileged `minidask-test`, and on minidask's
embedded server. All hosts are 127.0.0.1, so "nothing left on any host"
is checked with psutil across this machine. To find exactly this test's
processes while other minidask tests may run beside it, every test gives
its cluster a `remote_python` path of its own (a symlink to the server's
Python): each scheduler, nanny and worker process of the cluster runs
that path.
"""

import operator
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

import asyncssh
import psutil
import pytest

from minidask import Client, config
from minidask.deploy.ssh import (RemoteCommandError, SSHAuthenticationError,
                                 SSHCluster, SSHConnectError, SSHHostKeyError)
from minidask.deploy.sshd import EmbeddedSSHServer
from helpers import free_port, wait_until
from ssh_fixtures import require_remote_python
from sshd_fixture import is_alive


@pytest.fixture
def shared_dir():
    """A folder every user may read: the unprivileged user runs from it."""
    folder = tempfile.mkdtemp(prefix="minidask-ssh-test-")
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def python(server, shared_dir):
    """A path to the server's remote Python that only this test runs."""
    if isinstance(server, EmbeddedSSHServer):
        # Same user, same machine, same environment.
        return python_link(sys.executable, shared_dir)
    return python_link(require_remote_python(server), shared_dir)


def python_link(target, folder):
    """A path of this test's own that runs ``target``.

    In a virtual environment a bare symlink elsewhere would start the base
    interpreter without the environment's packages: Python finds its
    environment from ``pyvenv.cfg`` beside or above the executable, so the
    link gets that file and the environment's ``lib`` beside it.
    """
    in_venv = sys.prefix != sys.base_prefix
    if in_venv and os.path.realpath(target) == \
            os.path.realpath(sys.executable):
        os.makedirs(os.path.join(folder, "bin"), exist_ok=True)
        shutil.copy(os.path.join(sys.prefix, "pyvenv.cfg"), folder)
        os.symlink(os.path.join(sys.prefix, "lib"),
                   os.path.join(folder, "lib"))
        link = os.path.join(folder, "bin", "python")
    else:
        link = os.path.join(folder, "python")
    os.symlink(target, link)
    return link


def script(folder, name, text):
    """An executable shell script that every user may run."""
    path = os.path.join(folder, name)
    with open(path, "w") as file:
        file.write("#!/bin/sh\n" + textwrap.dedent(text))
    os.chmod(path, 0o755)
    return path


def running(path):
    """Live processes anywhere on this machine whose command runs `path`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if path in (proc.info["cmdline"] or []) and is_alive(proc):
            found.append(proc)
    return found


def assert_nothing_left(path):
    # Closing waits for every command to end; a moment more lets a parent
    # reap its child.
    wait_until(lambda: not running(path), timeout=5,
               message=f"processes left running: {running(path)}")


def options(server, python, **kwargs):
    """SSHCluster arguments for `server`: one-thread workers, no dashboard."""
    return dict(connect_options=server.connect_options, remote_python=python,
                worker_options={"nthreads": 1},
                scheduler_options={"dashboard_address": None}, **kwargs)


def hosts(server, n=3):
    return [server.host] * n


# -- a working cluster -----------------------------------------------------

def test_a_graph_moves_data_between_two_workers(server, python):
    with SSHCluster(hosts(server), **options(server, python)) as cluster:
        # A scheduler, and two nannies each with its worker process.
        assert len(running(python)) == 5
        with Client(cluster) as client:
            a, b = sorted(client.scheduler_info()["workers"])
            numbers = client.submit(list, range(100), workers=[a])
            total = client.submit(sum, numbers, workers=[b])
            result = client.submit(operator.add, total, 1, workers=[a])

            assert result.result(timeout=30) == 4951
            who_has = client.who_has([numbers, total])
            assert set(who_has[numbers.key]) == {a, b}  # a to b
            assert set(who_has[total.key]) == {a, b}  # and back

    assert cluster.status == "closed"
    assert_nothing_left(python)


def test_the_cluster_interface(server, python):
    kwargs = options(server, python, name="remote")
    kwargs["scheduler_options"] = {"dashboard_address": ":0"}
    # Two names for this machine, to see the workers cycle over the hosts.
    names = [server.host, server.host, "localhost"]
    with config.set({"comm.timeouts.connect": "7s"}):
        cluster = SSHCluster(names, **kwargs)
    with cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://127.0.0.1:")
        cluster.wait_for_workers(2, timeout=10)
        assert "remote" in repr(cluster) and address in repr(cluster)
        assert address in cluster._repr_html_()

        link = cluster.dashboard_link
        assert link.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(link, timeout=10) as page:
            assert page.status == 200

        with Client(cluster) as client:
            # Changed config reaches the remote processes.
            remote = client.run_on_scheduler(
                lambda: __import__("minidask").config.get(
                    "comm.timeouts.connect"))
            assert remote == "7s"

            cluster.scale(3)
            assert len(client.scheduler_info()["workers"]) == 3
            cluster.scale(1)
            (remaining,) = client.scheduler_info()["workers"]

        # The secret travels over stdin, never on a command line.
        for proc in psutil.process_iter(["cmdline"]):
            assert cluster.secret not in " ".join(proc.info["cmdline"] or [])

        logs = cluster.get_logs()
        assert set(logs) == {"Cluster", "Scheduler", remaining,
                             "ssh: scheduler on 127.0.0.1",
                             "ssh: worker 0 on 127.0.0.1",
                             "ssh: worker 1 on localhost",
                             "ssh: worker 2 on 127.0.0.1"}
        assert address in logs["ssh: scheduler on 127.0.0.1"]
        assert remaining in logs["ssh: worker 0 on 127.0.0.1"]
        chosen = cluster.get_logs(scheduler=False, workers=[remaining])
        assert set(chosen) == {"Cluster", remaining,
                               "ssh: worker 0 on 127.0.0.1"}
        assert "MINIDASK_COMM__TIMEOUTS__CONNECT=7s" in \
            cluster.scheduler_process.command

    assert_nothing_left(python)
    # Every command closed itself on the end of its input: none was killed.
    logs = cluster.get_logs()
    assert "sending SIG" not in logs["Cluster"]
    # What the commands printed stays readable after close.
    assert "closing" in logs["ssh: scheduler on 127.0.0.1"]
    assert "ssh: worker 2 on 127.0.0.1" in logs
    assert "closing" in logs["ssh: worker 1 on localhost"]


def test_a_single_host_runs_only_the_scheduler(embedded_ssh_server,
                                               shared_dir):
    server = embedded_ssh_server
    python = python_link(sys.executable, shared_dir)
    with SSHCluster([server.host], **options(server, python)) as cluster:
        assert cluster.scheduler_info()["workers"] == {}
        with pytest.raises(ValueError, match="no worker hosts.*at least "
                                             "two hosts"):
            cluster.scale(1)
    assert_nothing_left(python)


def test_a_secret_in_the_remote_environment_does_not_win(shared_dir):
    python = python_link(sys.executable, shared_dir)
    env = {"MINIDASK_SECRET": "not-this-clusters",
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    with EmbeddedSSHServer(env=env) as server:
        with SSHCluster([server.host] * 2,
                        **options(server, python)) as cluster:
            with Client(cluster) as client:
                assert client.submit(operator.neg, 1).result(timeout=30) == -1
    assert_nothing_left(python)


CLIENT_THAT_DIES = """
import ast, sys, time
from minidask.deploy.ssh import SSHCluster
kwargs = ast.literal_eval(sys.argv[1])
cluster = SSHCluster(**kwargs)
print(cluster.scheduler_address, flush=True)
time.sleep(600)
"""


def test_remote_processes_end_when_their_client_dies(server, python):
    kwargs = dict(hosts=hosts(server), **options(server, python))
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT_THAT_DIES, repr(kwargs)],
        stdout=subprocess.PIPE, text=True)
    try:
        address = client.stdout.readline().strip()
        assert address.startswith("tcp://"), "the cluster did not start"
        assert len(running(python)) >= 3
        client.kill()  # no close(), no atexit: only the SSH channels end
        client.wait()
    finally:
        client.kill()
        client.wait()

    wait_until(lambda: not running(python), timeout=20,
               message=f"processes outlived their client: {running(python)}")


# -- bad input -------------------------------------------------------------

def test_a_closed_port_is_an_error_naming_host_and_port():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(SSHConnectError, match=f"127.0.0.1:{port}"):
        SSHCluster(["127.0.0.1", "127.0.0.1"],
                   connect_options={"port": port})
    assert time.monotonic() - start < 5


def test_a_silent_host_fails_within_the_connect_timeout():
    # Accepts TCP connections (the kernel does) but never speaks SSH.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        start = time.monotonic()
        with config.set({"ssh.timeouts.connect": "1s"}):
            with pytest.raises(SSHConnectError,
                               match=f"127.0.0.1:{port} over SSH within "
                                     f"1 s"):
                SSHCluster(["127.0.0.1"], connect_options={"port": port})
        assert time.monotonic() - start < 5


def test_an_unknown_host_name_is_an_error_naming_it():
    with config.set({"ssh.timeouts.connect": "3s"}):
        with pytest.raises(SSHConnectError, match="no-such-host.invalid"):
            SSHCluster(["no-such-host.invalid"])


def test_a_refused_login_names_user_host_and_keys(server, tmp_path):
    wrong = tmp_path / "wrong_key"
    wrong.write_bytes(asyncssh.generate_private_key(
        "ssh-ed25519").export_private_key())
    wrong.chmod(0o600)
    connect_options = dict(server.connect_options, client_keys=[str(wrong)])

    with pytest.raises(SSHAuthenticationError) as info:
        SSHCluster(hosts(server, 1), connect_options=connect_options)

    message = str(info.value)
    assert f"user {server.username!r}" in message
    assert f"127.0.0.1:{server.port}" in message
    assert str(wrong) in message
    assert "client_keys" in message and "authorized_keys" in message


def test_an_unknown_host_key_is_refused_saying_how_to_trust_it(server,
                                                               tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    connect_options = dict(server.connect_options, known_hosts=str(empty))

    with pytest.raises(SSHHostKeyError) as info:
        SSHCluster(hosts(server, 1), connect_options=connect_options)

    message = str(info.value)
    assert f"ssh-keyscan -p {server.port} 127.0.0.1 >> ~/.ssh/known_hosts" \
        in message
    assert str(empty) in message and "'known_hosts'" in message


def test_by_default_host_keys_are_checked_against_the_users_known_hosts(
        embedded_ssh_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # a home with no known_hosts
    connect_options = dict(embedded_ssh_server.connect_options)
    del connect_options["known_hosts"]

    with pytest.raises(SSHHostKeyError, match="~/.ssh/known_hosts"):
        SSHCluster(hosts(embedded_ssh_server, 1),
                   connect_options=connect_options)


def test_a_missing_remote_python_is_an_error_quoting_its_output(server):
    missing = "/nonexistent/bin/python3"
    start = time.monotonic()
    with pytest.raises(RemoteCommandError) as info:
        SSHCluster(hosts(server), connect_options=server.connect_options,
                   remote_python=missing)

    message = str(info.value)
    assert "scheduler on 127.0.0.1" in message
    assert "exited with status 127 before it listened" in message
    printed = message.split("printed:")[1].split("The command was")[0]
    assert missing in printed  # the shell's words for it vary
    assert f"remote_python ({missing})" in message
    assert time.monotonic() - start < 10


def test_a_python_without_minidask_is_an_error_quoting_its_output(
        server, python, shared_dir):
    # -I -S: no PYTHONPATH, no site-packages, so no minidask.
    bare = script(shared_dir, "bare-python", f'exec {python} -I -S "$@"\n')

    with pytest.raises(RemoteCommandError) as info:
        SSHCluster(hosts(server), connect_options=server.connect_options,
                   remote_python=bare)

    message = str(info.value)
    assert "No module named 'minidask'" in message
    assert "exited with status 1" in message


def test_a_failing_worker_host_stops_what_started_on_the_others(server,
                                                                python):
    kwargs = options(server, python)
    kwargs["remote_python"] = [python, python, "/nonexistent/python"]

    with pytest.raises(RemoteCommandError, match="the worker 1 on"):
        SSHCluster(hosts(server), **kwargs)

    assert_nothing_left(python)  # the scheduler and worker 0 were stopped


def test_an_unreachable_worker_host_stops_what_started_on_the_others(
        embedded_ssh_server, shared_dir):
    server = embedded_ssh_server
    python = python_link(sys.executable, shared_dir)
    closed = dict(server.connect_options, port=free_port())
    kwargs = options(server, python)
    kwargs["connect_options"] = [server.connect_options,
                                 server.connect_options, closed]

    with pytest.raises(SSHConnectError, match=f":{closed['port']}"):
        SSHCluster(hosts(server), **kwargs)

    assert_nothing_left(python)


def test_a_hanging_start_is_bounded_by_the_startup_timeout(server, python,
                                                           shared_dir):
    # A Python that never starts, with a child process of its own.
    hanging = script(shared_dir, "hanging-python", """\
        sleep 1000 &
        echo "sleeping as $!" >&2
        wait
        """)
    kwargs = options(server, python)
    kwargs["remote_python"] = [python, python, hanging]

    start = time.monotonic()
    with config.set({"ssh.timeouts.startup": "3s"}):
        with pytest.raises(RemoteCommandError,
                           match="did not start within 3 s") as info:
            SSHCluster(hosts(server), **kwargs)
    assert time.monotonic() - start < 15

    message = str(info.value)
    assert "sleeping as" in message
    sleep = int(message.split("sleeping as ")[1].split()[0])
    assert not psutil.pid_exists(sleep) or not is_alive(
        psutil.Process(sleep))
    assert not running(hanging)
    assert_nothing_left(python)


def test_per_host_lists_must_match_the_hosts():
    with pytest.raises(ValueError, match="2 remote_python for 3 hosts"):
        SSHCluster(["a", "b", "c"], remote_python=["python3", "python3"])
    with pytest.raises(ValueError, match="1 connect_options for 2 hosts"):
        SSHCluster(["a", "b"], connect_options=[{}])


def test_unknown_arguments_are_type_errors_naming_them():
    with pytest.raises(TypeError, match="'n_workers'.*takes name"):
        SSHCluster(["a", "b"], n_workers=2)
    with pytest.raises(TypeError, match="'threads'.*takes host, "
                                        "memory_limit, nanny, nthreads"):
        SSHCluster(["a", "b"], worker_options={"threads": 2})
    with pytest.raises(TypeError, match="list of host names"):
        SSHCluster("node0")


# -- the command line ------------------------------------------------------

def test_minidask_ssh_serves_until_sigterm(server, python):
    connect = server.connect_options
    command = [sys.executable, "-m", "minidask.cli", "ssh",
               server.host, server.host,
               "--ssh-port", str(connect["port"]),
               "--username", connect["username"],
               "--identity-file", connect["client_keys"][0],
               "--known-hosts", connect["known_hosts"],
               "--remote-python", python, "--nthreads", "1",
               "--scheduler-port", "0", "--no-dashboard"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        address = proc.stdout.readline().strip()
        assert address.startswith("tcp://127.0.0.1:"), proc.stderr.read()
        with Client(address) as client:  # the secret file lets it in
            assert client.submit(operator.mul, 6, 7).result(timeout=30) == 42
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()

    assert proc.returncode == 0, stderr
    assert "closing the cluster" in stderr
    assert_nothing_left(python)


def test_minidask_ssh_stops_when_its_scheduler_ends(embedded_ssh_server,
                                                    shared_dir):
    server = embedded_ssh_server
    python = python_link(sys.executable, shared_dir)
    connect = server.connect_options
    proc = subprocess.Popen(
        [sys.executable, "-m", "minidask.cli", "ssh", server.host,
         server.host, "--ssh-port", str(connect["port"]),
         "--identity-file", connect["client_keys"][0],
         "--known-hosts", connect["known_hosts"], "--remote-python", python,
         "--scheduler-port", "0", "--no-dashboard"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("tcp://")
        (scheduler,) = [p for p in running(python)
                        if "scheduler" in p.cmdline()]
        scheduler.terminate()
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()

    assert proc.returncode == 1
    assert "the scheduler ended: closing the cluster" in stderr
    assert_nothing_left(python)


def test_minidask_ssh_reports_a_failure_and_exits_nonzero():
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "minidask.cli", "ssh", "127.0.0.1",
         "--ssh-port", str(port)],
        capture_output=True, text=True, timeout=60)

    assert result.returncode == 1
    assert f"minidask-ssh: could not connect to 127.0.0.1:{port}" in \
        result.stderr



@pytest.mark.parametrize("command", ["scheduler", "worker"])
def test_stop_on_eof_stops_a_command_cleanly(command, shared_dir):
    python = python_link(sys.executable, shared_dir)
    scheduler = subprocess.Popen(
        [python, "-m", "minidask.cli", "scheduler", "--port", "0",
         "--no-dashboard", "--secret-file", "-", "--stop-on-eof"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    procs = [scheduler]
    try:
        scheduler.stdin.write("a-secret\n")
        scheduler.stdin.flush()
        address = scheduler.stdout.readline().strip()
        if command == "worker":
            procs.insert(0, subprocess.Popen(
                [python, "-m", "minidask.cli", "worker", address,
                 "--secret-file", "-", "--stop-on-eof"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True))
            procs[0].stdin.write("a-secret\n")
            procs[0].stdin.flush()
            assert procs[0].stdout.readline().startswith("tcp://")
        for proc in procs:
            proc.stdin.close()  # what sshd does when a channel goes away
            assert proc.wait(timeout=30) == 0
            assert "standard input closed: closing" in proc.stderr.read()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert_nothing_left(python)
