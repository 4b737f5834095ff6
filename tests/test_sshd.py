"""SSH servers the SSH cluster is tested and taught with, seen by a client.

The same asyncssh client checks minidask's embedded server and OpenSSH's
sshd (for root and for an unprivileged user): commands, exit status, stdin,
host key verification, refused keys, and that closing a server leaves no
remote process behind. The embedded server's own promises (refused shells
and pseudo-terminals, commands killed with their channel, the command line)
are tested on it alone.
"""

import ast
import asyncio
import os
import signal
import stat
import subprocess
import sys

import asyncssh
import psutil
import pytest

from minidask.deploy.sshd import EmbeddedSSHServer
from ssh_fixtures import require_remote_python
from sshd_fixture import SOURCE_ROOT, TEST_USER, free_port, is_alive

TIMEOUT = 60


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, TIMEOUT))


async def ssh_run(server, command=None, **kwargs):
    return await ssh_run_at(server.host, server.connect_options, command,
                            **kwargs)


async def ssh_run_at(host, connect_options, command=None, **kwargs):
    async with asyncssh.connect(host, **connect_options) as conn:
        return await conn.run(command, **kwargs)


async def remote_pid(process, name=None):
    """Read the pid a remote `echo $$; exec ...` prints first.

    With `name`, also wait until that process has become `name`: the shell
    may print its pid a moment before it executes the command.
    """
    line = await process.stdout.readline()
    proc = psutil.Process(int(line))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while name and proc.name() != name and loop.time() < deadline:
        await asyncio.sleep(0.02)
    return proc


async def wait_until_gone(proc, timeout=10):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while is_alive(proc) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return not is_alive(proc)


def remote_python(server):
    if isinstance(server, EmbeddedSSHServer):
        return sys.executable  # same user, same machine, same environment
    return require_remote_python(server)


# -- every server ----------------------------------------------------------

def test_echo(server):
    result = run(ssh_run(server, "echo hello"))

    assert result.stdout == "hello\n"
    assert result.exit_status == 0


def test_exit_status_and_stderr(server):
    result = run(ssh_run(server, "echo oops >&2; exit 3"))

    assert result.stderr == "oops\n"
    assert result.exit_status == 3


def test_exit_signal(server):
    result = run(ssh_run(server, "kill -TERM $$"))

    assert result.exit_signal[0] == "TERM"
    assert result.returncode == -signal.SIGTERM


def test_stdin_is_forwarded(server):
    data = bytes(range(256)) * 1000
    result = run(ssh_run(server, "cat; echo end", input=data, encoding=None))

    assert result.stdout == data + b"end\n"
    assert result.exit_status == 0


def test_command_runs_as_the_served_user(server):
    result = run(ssh_run(server, "id -un; pwd"))

    assert result.stdout.split() == [server.username,
                                     os.path.expanduser(
                                         f"~{server.username}")]


def test_output_of_background_jobs_is_waited_for(server):
    result = run(ssh_run(server, "(sleep 0.3; echo late) & echo early"))

    assert result.stdout == "early\nlate\n"


def test_remote_python_imports_the_minidask_under_test(server):
    python = remote_python(server)
    env = getattr(server, "remote_env", None) or server.env
    source_root = env["PYTHONPATH"].split(os.pathsep)[0]
    command = f"{python} -c 'import minidask; print(minidask.__file__)'"

    result = run(ssh_run(server, command))

    assert result.exit_status == 0, result.stderr
    assert result.stdout.strip() == os.path.join(source_root, "minidask",
                                                 "__init__.py")


def test_host_key_is_verified(server, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    options = dict(server.connect_options, known_hosts=str(empty))

    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        run(asyncssh.connect(server.host, **options))


def test_a_different_host_key_is_refused(server, tmp_path):
    other = asyncssh.generate_private_key("ssh-ed25519")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{server.host}]:{server.port} "
                           f"{other.export_public_key().decode()}")
    options = dict(server.connect_options, known_hosts=str(known_hosts))

    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        run(asyncssh.connect(server.host, **options))


def test_a_wrong_client_key_is_refused(server):
    wrong = asyncssh.generate_private_key("ssh-ed25519")
    options = dict(server.connect_options, client_keys=[wrong])

    with pytest.raises(asyncssh.PermissionDenied):
        run(asyncssh.connect(server.host, **options))


def test_another_user_is_refused(server):
    other = "nobody" if server.username != "nobody" else "daemon"
    options = dict(server.connect_options, username=other)

    with pytest.raises(asyncssh.PermissionDenied):
        run(asyncssh.connect(server.host, **options))


def test_closing_the_server_kills_a_remote_sleep(server):
    async def scenario():
        async with asyncssh.connect(server.host,
                                    **server.connect_options) as conn:
            process = await conn.create_process("echo $$; exec sleep 1000")
            sleep = await remote_pid(process, "sleep")
            assert sleep.name() == "sleep"

            await asyncio.to_thread(server.close)
            return sleep

    try:
        sleep = run(scenario())
    except (asyncssh.Error, OSError):
        pytest.fail("the client failed before the server closed")
    assert not is_alive(sleep)


def test_orphans_of_a_lost_connection_are_found_at_close(server):
    async def scenario():
        async with asyncssh.connect(server.host,
                                    **server.connect_options) as conn:
            process = await conn.create_process("echo $$; exec sleep 1000")
            return await remote_pid(process)

    sleep = run(scenario())
    # OpenSSH lets such a command run on; the embedded server ends it.
    if isinstance(server, EmbeddedSSHServer):
        assert run(wait_until_gone(sleep))
    else:
        assert not is_alive(sleep) or sleep in server.descendants()

    server.close()
    assert not is_alive(sleep)


# -- the unprivileged user -------------------------------------------------

@pytest.mark.ssh
def test_unprivileged_user_is_not_root(openssh_server_unprivileged):
    result = run(ssh_run(openssh_server_unprivileged, "id -u; id -un"))

    uid, name = result.stdout.split()
    assert int(uid) != 0
    assert name == TEST_USER


# -- the embedded server alone ---------------------------------------------

def test_closing_the_channel_kills_the_command_and_its_jobs(
        embedded_ssh_server):
    async def scenario():
        async with asyncssh.connect(
                embedded_ssh_server.host,
                **embedded_ssh_server.connect_options) as conn:
            process = await conn.create_process(
                "sleep 1000 & echo $!; echo $$; wait")
            job = await remote_pid(process)
            shell = await remote_pid(process)

            process.close()
            return (await wait_until_gone(job),
                    await wait_until_gone(shell))

    assert run(scenario()) == (True, True)


def test_a_command_that_ignores_sigterm_is_killed(embedded_ssh_server):
    embedded_ssh_server.kill_timeout = 0.5

    async def scenario():
        async with asyncssh.connect(
                embedded_ssh_server.host,
                **embedded_ssh_server.connect_options) as conn:
            process = await conn.create_process(
                "trap '' TERM; echo $$; while :; do sleep 0.1; done")
            shell = await remote_pid(process)
            process.close()
            return await wait_until_gone(shell)

    assert run(scenario())


def test_signals_are_passed_on(embedded_ssh_server):
    async def scenario():
        async with asyncssh.connect(
                embedded_ssh_server.host,
                **embedded_ssh_server.connect_options) as conn:
            process = await conn.create_process("echo $$; exec sleep 1000")
            await remote_pid(process, "sleep")
            process.send_signal("INT")
            return await process.wait()

    result = run(scenario())

    assert result.exit_signal[0] == "INT"


def test_shells_are_refused_with_a_message(embedded_ssh_server):
    result = run(ssh_run(embedded_ssh_server))

    assert result.exit_status == 1
    assert "interactive shells are not supported" in result.stderr
    assert "run a command instead" in result.stderr


def test_subsystems_are_refused_with_a_message(embedded_ssh_server):
    result = run(ssh_run(embedded_ssh_server, subsystem="netconf"))

    assert result.exit_status == 1
    assert "'netconf' subsystem is not supported" in result.stderr


def test_sftp_is_refused(embedded_ssh_server):
    with pytest.raises(asyncssh.ChannelOpenError):
        run(ssh_run(embedded_ssh_server, subsystem="sftp"))


def test_pseudo_terminals_are_refused(embedded_ssh_server):
    with pytest.raises(asyncssh.ChannelOpenError, match="PTY"):
        run(ssh_run(embedded_ssh_server, "echo hello", term_type="xterm"))


def test_the_env_argument_reaches_commands():
    with EmbeddedSSHServer(env={"MINIDASK_GREETING": "hi"}) as server:
        result = run(ssh_run(server, "echo $MINIDASK_GREETING"))

    assert result.stdout == "hi\n"


def test_keys_live_in_a_private_folder_removed_on_close():
    with EmbeddedSSHServer() as server:
        folder = server.folder
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(server.client_key).st_mode) == 0o600
        assert server.connect_options["known_hosts"] == server.known_hosts

    assert not os.path.exists(folder)


def test_a_taken_port_is_an_error_that_says_so():
    port = free_port()
    with EmbeddedSSHServer(port=port):
        with pytest.raises(OSError, match=f"127.0.0.1:{port}.*another port"):
            EmbeddedSSHServer(port=port).start()


def test_the_asynchronous_api():
    async def scenario():
        async with EmbeddedSSHServer() as server:
            async with asyncssh.connect(server.host,
                                        **server.connect_options) as conn:
                result = await conn.run("echo hello")
        return server, result

    server, result = run(scenario())

    assert result.stdout == "hello\n"
    assert not os.path.exists(server.folder)


def test_the_command_line_serves_until_sigterm():
    env = dict(os.environ, PYTHONPATH=SOURCE_ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "minidask.deploy.sshd", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = read_banner(proc)
        options = ast.literal_eval(lines["connect_options"])
        assert lines["host"] == "127.0.0.1"
        assert int(lines["port"]) == options["port"]

        result = run(ssh_run_at(lines["host"], options, "echo hello"))
        assert result.stdout == "hello\n"

        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait()

    assert proc.returncode == 0, stderr
    assert "closed" in stderr
    assert not os.path.exists(os.path.dirname(options["known_hosts"]))


def read_banner(proc):
    """The command line's `name: value` lines, up to "serving"."""
    lines = {}
    for line in proc.stdout:
        if line.startswith("serving"):
            return lines
        for separator in (" = ", ": "):
            name, found, value = line.rstrip("\n").partition(separator)
            if found:
                lines[name] = value
                break
    raise AssertionError(f"no banner: {proc.stderr.read()}")
