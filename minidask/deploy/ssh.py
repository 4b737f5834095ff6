"""SSHCluster: a scheduler and workers started on other machines over SSH.

The first host runs ``minidask-scheduler``; every later host runs one
``minidask-worker`` (a nanny and its worker process). Each of these is a
command run over an SSH connection of its own, made with asyncssh: the
same command a person would type (``python -m minidask.cli scheduler
...``). The cluster reads the address each command prints once it
listens, keeps what each prints in a bounded buffer for ``get_logs()``,
and from then on talks to the scheduler over minidask's own comms, as a
client does. What does not depend on SSH (scaling, logs, reprs, closing at
exit) is the ``Cluster`` base class's.

Starting a remote command
-------------------------
The cluster secret is the first line the command reads on its standard
input (``--secret-file -``). A command line is shown to every user of the
host by ``ps``; the channel's stdin is seen by nobody else. Configuration
that matters on the far side (a changed ``comm.timeouts.connect``, say)
goes as ``env MINIDASK_KEY=value`` on the command line, because sshd drops
the environment variables a client sends, and none of it is secret.

The command starts as ``echo <mark> $$; exec env ... python -m ...``: the
login shell prints its pid, then becomes the minidask command, so that pid
is the command's own. sshd makes every command it runs the leader of a
new process group (with ``setsid``), so the pid is also the id of the
command's process group.

Ending a remote command (a design note)
---------------------------------------
The naive approach is to close the SSH connection and trust the server to
end the command. OpenSSH does not: without a terminal, a command whose
channel has closed runs on until it next reads its input or writes its
output, and a minidask scheduler may do neither for hours. The next idea,
a "signal" request over the channel, OpenSSH refuses for root logins,
which it serves without privilege separation.

What we do instead, in three steps:

1. Every command runs with ``--stop-on-eof``: it closes itself cleanly (a
   nanny stops its worker first) once its standard input ends. ``close()``
   sends that end of input; sshd sends the same when the connection is
   lost or this process dies, so a cluster whose client vanished still
   ends by itself.
2. A command still running ``grace`` seconds later (it hangs, or it never
   got as far as minidask, as with a ``remote_python`` that hangs) gets
   SIGTERM, then SIGKILL, sent to its whole process group by ``kill`` run
   over a second channel of the same connection.
3. Then the connection closes.

What we accept: a command that hangs before minidask reads its input
outlives a client that dies, since nobody is left to run step 2. A
nanny's worker process leads a process group of its own, out of reach
of step 2's SIGKILL; its nanny stops it in step 1 (or on SIGTERM), and it
stops by itself once its scheduler is gone. Remote login shells must be
POSIX shells (sh, dash, bash, ksh, zsh), for ``$$``, ``exec`` and ``kill``.
TLS is not set up over SSH: the comms of an SSH cluster are authenticated
by the cluster secret, not encrypted.

Errors
------
Each failure is an :class:`SSHClusterError` whose message names the host,
the port and the way out: an unreachable host or closed port
(:class:`SSHConnectError`, within config ``ssh.timeouts.connect``), a
refused login (:class:`SSHAuthenticationError`, naming the user and the
keys tried), a host key that is not in known_hosts
(:class:`SSHHostKeyError`, saying how to trust it), and a remote command
that exits or hangs before it listens (:class:`RemoteCommandError`,
quoting the command's last lines of output; config
``ssh.timeouts.startup`` bounds the wait). When any host fails, the
cluster stops what it had started on every host before raising.
"""

import argparse
import asyncio
import collections
import getpass
import logging
import os
import re
import shlex
import signal
import socket
import sys
import threading

import asyncssh

from minidask import config, logs
from minidask.comm import CommError, parse_address, parse_host_port
from minidask.core import (forget_secret, register_secret, secret_file_for,
                           write_secret_file)
from minidask.deploy.cluster import Cluster
from minidask.loop import sync
from minidask.utils import parse_timedelta

logger = logging.getLogger(__name__)

_PID_MARK = "minidask-remote-pid"
_ADDRESS = re.compile(r"^(tcp|tls)://\S+$")
_CLOSE_GRACE = 10  # seconds a command has to close itself after its EOF
_KILL_WAIT = 3  # seconds to wait after each of SIGTERM and SIGKILL
_TAIL_LINES = 20  # lines of output quoted in an error

_SCHEDULER_OPTIONS = {"host", "port", "dashboard_address"}
_WORKER_OPTIONS = {"host", "nthreads", "memory_limit", "nanny"}

# Config that describes this machine or this client, not the remote ones.
_LOCAL_CONFIG = ("secret", "secret-file", "scheduler-address", "comm.tls",
                 "dashboard.link", "ssh")

# The key files asyncssh tries when connect_options names none.
_DEFAULT_KEY_FILES = ("id_ed25519_sk", "id_ecdsa_sk", "id_ed448",
                      "id_ed25519", "id_ecdsa", "id_rsa", "id_dsa")


class SSHClusterError(Exception):
    """An SSH cluster could not start; the message names the host."""


class SSHConnectError(SSHClusterError):
    """No SSH server could be reached at a host and port."""


class SSHAuthenticationError(SSHClusterError):
    """The SSH server refused every key (or password) offered to it."""


class SSHHostKeyError(SSHClusterError):
    """The host's key is not in known_hosts, or differs from the one there."""


class RemoteCommandError(SSHClusterError):
    """A remote scheduler or worker exited, or hung, before it listened."""


# -- connecting ----------------------------------------------------------------

async def connect(host, options, timeout):
    """Open an SSH connection to ``host``; an error says what to do."""
    port = options.get("port") or 22
    where = f"{host}:{port}"
    logger.debug("connecting to %s over ssh", where)
    try:
        return await asyncio.wait_for(asyncssh.connect(host, **options),
                                      timeout)
    except asyncio.TimeoutError:
        raise SSHConnectError(
            f"could not connect to {where} over SSH within {timeout:g} s "
            f"(config ssh.timeouts.connect): is the host up, and an SSH "
            f"server listening on port {port}?") from None
    except asyncssh.HostKeyNotVerifiable as exc:
        raise SSHHostKeyError(_host_key_message(host, port, options,
                                                exc)) from exc
    except asyncssh.PermissionDenied as exc:
        raise SSHAuthenticationError(_login_message(host, port, options,
                                                    exc)) from exc
    except asyncssh.Error as exc:
        raise SSHConnectError(f"the SSH connection to {where} failed: "
                              f"{exc.reason}") from exc
    except socket.gaierror as exc:
        raise SSHConnectError(f"could not find the host {host!r} "
                              f"({exc.strerror}): check its spelling, or "
                              f"give its IP address") from exc
    except OSError as exc:
        raise SSHConnectError(
            f"could not connect to {where} over SSH: "
            f"{exc.strerror or exc}: is the host up, and an SSH server "
            f"listening on port {port}?") from exc


def _host_key_message(host, port, options, exc):
    known_hosts = options.get("known_hosts", ())
    if known_hosts == ():
        where = "~/.ssh/known_hosts"
    elif isinstance(known_hosts, (str, os.PathLike)):
        where = os.fspath(known_hosts)
    else:
        where = "the known_hosts given in connect_options"
    keyscan = (f"ssh-keyscan {host}" if port == 22
               else f"ssh-keyscan -p {port} {host}")
    return (f"the SSH host key of {host}:{port} is not trusted "
            f"({exc.reason}): it is not in {where}, or differs from the "
            f"key there. If you trust the host, add its key with "
            f"`{keyscan} >> ~/.ssh/known_hosts` (after checking its "
            f"fingerprint against `ssh-keygen -lf "
            f"/etc/ssh/ssh_host_ed25519_key.pub` run on the host), or pass "
            f"a known_hosts file that holds it as "
            f"connect_options={{'known_hosts': path}}")


def _login_message(host, port, options, exc):
    user = options.get("username") or getpass.getuser()
    return (f"{host}:{port} refused the SSH login of user {user!r} "
            f"({exc.reason}); tried {_keys_tried(options)}. Give the key "
            f"that user may log in with as connect_options="
            f"{{'client_keys': [path], 'username': ...}}, or add your "
            f"public key to ~{user}/.ssh/authorized_keys on {host} (for "
            f"example with `ssh-copy-id -p {port} {user}@{host}`)")


def _keys_tried(options):
    """Say which keys asyncssh offers with these connect options."""
    keys = options.get("client_keys", ())
    if keys is None:
        tried = "no keys (client_keys=None turns key logins off)"
    elif keys == ():
        folder = os.path.expanduser(os.path.join("~", ".ssh"))
        found = [os.path.join(folder, name) for name in _DEFAULT_KEY_FILES
                 if os.path.exists(os.path.join(folder, name))]
        tried = ("the default keys " + ", ".join(found) if found else
                 f"no key files: connect_options names none and {folder} "
                 f"holds none")
    else:
        if isinstance(keys, (str, os.PathLike)) or not isinstance(
                keys, (list, tuple)):
            keys = [keys]
        tried = "the keys " + ", ".join(_key_name(key) for key in keys)
    agent = options.get("agent_path", ())
    if keys is not None and agent is not None and (
            agent != () or os.environ.get("SSH_AUTH_SOCK")):
        tried += ", and those held by ssh-agent"
    if options.get("password"):
        tried += ", and a password"
    return tried


def _key_name(key):
    if isinstance(key, (str, os.PathLike)):
        return os.fspath(key)
    if isinstance(key, tuple) and key:
        return _key_name(key[0])
    if hasattr(key, "get_fingerprint"):
        return f"a key with fingerprint {key.get_fingerprint()}"
    return f"a {type(key).__name__} key"


# -- one remote command --------------------------------------------------------

class RemoteProcess:
    """One minidask command on one host, over an SSH connection of its own.

    ``start()`` connects, runs the command, hands it the secret and returns
    the address it prints once it listens; ``output()`` is what it has
    printed, newest line first; ``stop()`` ends it as the module's design
    note says. ``role`` ("scheduler", "worker 2") names it in messages.
    """

    def __init__(self, role, host, connect_options, argv, secret,
                 env=None, log=logger, connect_timeout=10):
        self.role = role
        self.host = host
        self.port = connect_options.get("port") or 22
        self.connect_options = connect_options
        self.python = argv[0]
        self.command = _shell_command(argv, env or {})
        self.secret = secret
        self.log = log
        self.connect_timeout = connect_timeout
        self.lines = collections.deque(
            maxlen=int(config.get("logging.buffer-length")))
        self.address = None
        self.pid = None
        self.conn = None
        self.process = None
        self._closed = None  # done once the command's channel has closed
        self._readers = []
        self._watcher = None
        self._stopping = False

    def __repr__(self):
        return f"<RemoteProcess {self.role} on {self.where}>"

    @property
    def where(self):
        return f"{self.host}:{self.port}"

    @property
    def ended(self):
        """Whether the command has ended (its channel has closed)."""
        return self._closed is not None and self._closed.done()

    def output(self):
        """What the command printed on stdout and stderr, newest first."""
        return "\n".join(reversed(self.lines))

    # -- starting ---------------------------------------------------------

    async def start(self, timeout):
        """Run the command; return its address once it listens."""
        self.conn = await connect(self.host, self.connect_options,
                                  self.connect_timeout)
        try:
            self.address = await asyncio.wait_for(self._launch(), timeout)
        except asyncio.TimeoutError:
            await self.stop(grace=0)
            raise RemoteCommandError(self._failure(
                f"did not start within {timeout:g} s (config "
                f"ssh.timeouts.startup)")) from None
        except (asyncssh.Error, OSError) as exc:
            await self.stop(grace=0)
            raise RemoteCommandError(self._failure(
                f"could not be run: {exc}")) from exc
        except BaseException:
            await self.stop(grace=0)
            raise
        self._readers.append(asyncio.ensure_future(
            self._keep(self.process.stdout)))
        self._watcher = asyncio.ensure_future(self._watch())
        self.log.info("%s on %s listening at %s", self.role, self.where,
                      self.address)
        return self.address

    async def _launch(self):
        self.log.debug("running on %s: %s", self.where, self.command)
        self.process = await self.conn.create_process(
            self.command, encoding="utf-8", errors="replace")
        self._closed = asyncio.ensure_future(self.process.wait_closed())
        self.process.stdin.write(self.secret + "\n")
        self._readers.append(asyncio.ensure_future(
            self._keep(self.process.stderr)))
        return await self._read_address()

    async def _read_address(self):
        """Read stdout up to the address; fail if the command ends first."""
        while line := await _readline(self.process.stdout):
            line = line.rstrip("\n")
            if self.pid is None and line.startswith(_PID_MARK + " "):
                self.pid = int(line.split()[1])
                continue
            self.lines.append(line)
            if _ADDRESS.match(line):
                return line
        await self._closed
        await asyncio.gather(*self._readers)
        raise RemoteCommandError(self._failure(
            f"exited with {self._exit()} before it listened"))

    async def _keep(self, stream):
        while line := await _readline(stream):
            self.lines.append(line.rstrip("\n"))

    async def _watch(self):
        """Say so when the command ends while the cluster still needs it."""
        await asyncio.shield(self._closed)
        if not self._stopping:
            self.log.warning("%s on %s ended by itself (%s); its last "
                             "lines: %s", self.role, self.where,
                             self._exit(), self._tail(5) or "(none)")

    def _exit(self):
        exit_signal = self.process.exit_signal if self.process else None
        if exit_signal:
            return f"signal {exit_signal[0]}"
        status = self.process.exit_status if self.process else None
        if status is None or status < 0:
            return "no exit status: its connection was lost"
        return f"status {status}"

    def _tail(self, n=_TAIL_LINES):
        return "\n".join("    " + line for line in list(self.lines)[-n:])

    def _failure(self, what):
        """The message for a command that did not start: output and hint."""
        probe = f'{shlex.quote(self.python)} -c "import minidask"'
        ssh = f"ssh -p {self.port} {self.host} {shlex.quote(probe)}"
        return (f"the {self.role} on {self.where} {what}. The last lines "
                f"it printed:\n{self._tail() or '    (nothing)'}\n"
                f"The command was: {self.command}\n"
                f"Check that remote_python ({self.python}) is a Python on "
                f"{self.host} that imports minidask: `{ssh}` shows it")

    # -- stopping ---------------------------------------------------------

    async def stop(self, grace=_CLOSE_GRACE):
        """End the command (EOF, SIGTERM, SIGKILL) and disconnect."""
        self._stopping = True
        if self.conn is None:
            return
        try:
            if self._closed is not None and not self.ended:
                await self._end(grace)
        finally:
            await self._disconnect()

    async def _end(self, grace):
        """End of input first; signals for a command that outlives it."""
        try:
            self.process.stdin.write_eof()
        except (asyncssh.Error, OSError):
            pass  # the channel is already going away
        if await self._ended_within(grace):
            return
        if grace:
            self.log.warning("%s on %s still runs %g s after its input "
                             "closed", self.role, self.where, grace)
        await self._signal("TERM")
        if await self._ended_within(_KILL_WAIT):
            return
        await self._signal("KILL")
        if await self._ended_within(_KILL_WAIT):
            return
        self.log.warning("could not stop the %s on %s (pid %s): it may "
                         "still run there", self.role, self.where, self.pid)

    async def _ended_within(self, timeout):
        done, _ = await asyncio.wait([self._closed], timeout=timeout)
        return bool(done)

    async def _signal(self, name):
        """Signal the command's process group from a second channel."""
        if self.pid is None:
            return  # the shell never said its pid: there is nothing to aim at
        # The group first; the pid alone in case a server did not make the
        # command the leader of a process group.
        command = f"kill -s {name} -- -{self.pid} {self.pid} 2>/dev/null"
        self.log.info("sending SIG%s to the %s on %s (process group %d)",
                      name, self.role, self.where, self.pid)
        try:
            await asyncio.wait_for(self.conn.run(command, check=False),
                                   _KILL_WAIT)
        except (asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
            self.log.warning("could not send SIG%s to the %s on %s: %s",
                             name, self.role, self.where, exc)

    async def _disconnect(self):
        conn, self.conn = self.conn, None
        conn.close()
        try:
            await asyncio.wait_for(conn.wait_closed(), _KILL_WAIT)
        except asyncio.TimeoutError:
            pass  # the far side is gone; nothing more to say to it
        for reader in self._readers:
            reader.cancel()


async def _readline(stream):
    """The next line of ``stream``, or "" once it or its connection ends."""
    try:
        return await stream.readline()
    except (asyncssh.Error, OSError):
        return ""


def _shell_command(argv, env):
    """The command line: print the shell's pid, then become ``argv``."""
    assignments = [f"{name}={value}" for name, value in env.items()]
    program = ["env", *assignments, *argv] if assignments else argv
    return f"echo {_PID_MARK} $$; exec {shlex.join(program)}"


def _config_env():
    """``MINIDASK_...`` variables for config that differs from the defaults."""
    env = {}
    defaults = _flatten(config.read_file(config.DEFAULTS_FILE))
    for key, default in defaults.items():
        if any(key == p or key.startswith(p + ".") for p in _LOCAL_CONFIG):
            continue
        value = config.get(key, default)
        if value != default:
            name = "__".join(part.upper().replace("-", "_")
                             for part in key.split("."))
            env[f"MINIDASK_{name}"] = (value if isinstance(value, str)
                                       else repr(value))
    return env


def _flatten(mapping, prefix=""):
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# -- the cluster ---------------------------------------------------------------

class _WorkerHandle:
    """A worker (a nanny and its worker process) on a remote host."""

    def __init__(self, process):
        self.process = process

    @property
    def address(self):
        return self.process.address

    async def close(self):
        await self.process.stop()


class SSHCluster(Cluster):
    """A scheduler on ``hosts[0]`` and a worker on each later host, by SSH.

    Parameters
    ----------
    hosts : list of str
        Host names or addresses. The first runs the scheduler, every later
        entry one worker under a nanny; repeat a host for several workers
        on it (``["node0", "node1", "node1"]``). Each is also the address
        its scheduler or worker listens on, so it must mean that host to
        the other hosts and to this machine (not an alias of
        ``~/.ssh/config``); the ``host`` of ``worker_options`` and
        ``scheduler_options`` sets another one.
    connect_options : dict or list of dict, optional
        Arguments for ``asyncssh.connect``: ``port``, ``username``,
        ``client_keys``, ``known_hosts``... One dict for every host, or a
        list with one per host. By default asyncssh logs in as the current
        user with the keys in ``~/.ssh`` (and ssh-agent's), and checks the
        host key against ``~/.ssh/known_hosts``: an unknown host is refused.
    worker_options : dict, optional
        Options of ``minidask-worker``: ``nthreads`` (default 1),
        ``memory_limit`` (default "auto": the host's usable memory, for
        each worker on it; ``"4 GiB"``, a fraction, or 0 for no limit),
        ``host`` (where the worker listens; default the worker's host, as
        given in ``hosts``) and ``nanny`` (default True).
    scheduler_options : dict, optional
        Options of ``minidask-scheduler``: ``port`` (default 0, any free
        port), ``host`` (default ``hosts[0]``) and ``dashboard_address``
        (default ":8787"; ":0" for any free port, None for no dashboard).
    remote_python : str or list of str, optional
        The Python to run on each host, one path or one per host; by
        default ``sys.executable``, the path of this Python. It must be
        able to import minidask there.
    name : str, optional
        A name shown in reprs and logs.

    Each command's own output (standard output and error, which is where
    a Python that fails to start says why) is kept for ``get_logs()``
    under ``"ssh: scheduler on HOST"`` and ``"ssh: worker N on HOST"``,
    beside the ``"Cluster"``, ``"Scheduler"`` and per-worker keys of every
    cluster; it stays readable after ``close()``.

    Configuration: ``ssh.timeouts.connect`` bounds each SSH connection,
    ``ssh.timeouts.startup`` the time a command may take to listen. Other
    config that differs from the defaults reaches the remote commands as
    environment variables. Stopping, and what is left when a client dies,
    are described in this module's docstring.

    Examples
    --------
    >>> from minidask import Client, SSHCluster
    >>> cluster = SSHCluster(["node0", "node1", "node2"],
    ...                      connect_options={"username": "me"},
    ...                      worker_options={"nthreads": 2})
    >>> client = Client(cluster)
    >>> client.submit(pow, 2, 10).result()
    1024
    >>> client.close(); cluster.close()
    """

    def __init__(self, hosts, connect_options=None, worker_options=None,
                 scheduler_options=None, remote_python=None, **kwargs):
        name = kwargs.pop("name", None)
        if kwargs:
            raise TypeError(
                f"SSHCluster got unknown keyword arguments "
                f"{', '.join(map(repr, kwargs))}; besides hosts, "
                f"connect_options, worker_options, scheduler_options and "
                f"remote_python it takes name")
        self.hosts = _check_hosts(hosts)
        self.connect_options = [
            dict(options or {}) for options in
            _per_host("connect_options", connect_options, self.hosts, dict)]
        self.remote_python = [
            python or sys.executable for python in
            _per_host("remote_python", remote_python, self.hosts, str)]
        self.worker_options = _check_options(
            "worker_options", worker_options, _WORKER_OPTIONS)
        self.scheduler_options = _check_options(
            "scheduler_options", scheduler_options, _SCHEDULER_OPTIONS)
        self.connect_timeout = parse_timedelta(
            config.get("ssh.timeouts.connect"))
        self.startup_timeout = parse_timedelta(
            config.get("ssh.timeouts.startup"))
        # An empty MINIDASK_SECRET, lest one set in a remote environment win
        # over the secret that the commands read on their standard input.
        self.env = {"MINIDASK_SECRET": "", **_config_env()}
        self.scheduler_process = None
        self.remote = {}  # get_logs() key -> RemoteProcess, stopped ones too
        logs.setup(logs.stderr_level())
        super().__init__(name=name)
        self._warn_unchecked_host_keys()
        sync(self._start(len(self.hosts) - 1))

    def _warn_unchecked_host_keys(self):
        unchecked = sorted({
            host for host, options in zip(self.hosts, self.connect_options)
            if "known_hosts" in options and options["known_hosts"] is None})
        if unchecked:
            self.log.warning(
                "connect_options has known_hosts=None for %s: host keys "
                "are not checked, so anyone on the way could pose as the "
                "host", ", ".join(unchecked))

    # -- what the Cluster base asks of us ---------------------------------

    async def _start_scheduler(self):
        process = self.scheduler_process = self._remote_process(
            "scheduler", 0, self._scheduler_argv())
        address = self.scheduler_address = await process.start(
            self.startup_timeout)
        register_secret(address, self.secret)
        try:
            info = await self._pool.call(address, "scheduler-info")
        except (CommError, OSError) as exc:
            raise SSHClusterError(
                f"the scheduler on {process.where} listens at {address}, "
                f"but this process cannot talk to it: {exc}. Can this "
                f"machine reach {address}? scheduler_options={{'host': "
                f"...}} sets the address it listens on") from exc
        self.dashboard_port = info["services"].get("dashboard")
        self.dashboard_host = self._dashboard_host()

    async def _start_worker(self, name):
        if len(self.hosts) < 2:
            raise ValueError(
                f"SSHCluster {self.name} has no worker hosts: hosts[0] runs "
                f"the scheduler and every later entry one worker, so give "
                f"at least two hosts (repeat one for several workers)")
        index = 1 + name % (len(self.hosts) - 1)
        process = self._remote_process(f"worker {name}", index,
                                       self._worker_argv(name, index))
        await process.start(self.startup_timeout)
        return _WorkerHandle(process)

    async def _stop_scheduler(self):
        if self.scheduler_process is not None:
            await self.scheduler_process.stop()
        if self.scheduler_address:
            forget_secret(self.scheduler_address)

    async def _get_logs(self, cluster, scheduler, workers):
        found = await super()._get_logs(cluster, scheduler, workers)
        chosen = None
        if workers and workers is not True:
            chosen = [workers] if isinstance(workers, str) else list(workers)
        for key, process in self.remote.items():
            if process is self.scheduler_process:
                wanted = scheduler
            else:
                wanted = workers and (chosen is None
                                      or process.address in chosen)
            if wanted:
                found[key] = process.output()
        return found

    # -- the commands -----------------------------------------------------

    def _remote_process(self, role, index, argv):
        host = self.hosts[index]
        process = RemoteProcess(role, host, self.connect_options[index],
                                argv, self.secret, env=self.env,
                                log=self.log,
                                connect_timeout=self.connect_timeout)
        self.remote[f"ssh: {role} on {host}"] = process
        return process

    def _scheduler_argv(self):
        options = self.scheduler_options
        argv = [self.remote_python[0], "-m", "minidask.cli", "scheduler",
                "--host", str(options.get("host", self.hosts[0])),
                "--port", str(options.get("port", 0)),
                "--secret-file", "-", "--stop-on-eof"]
        dashboard = options.get("dashboard_address", ":8787")
        if dashboard is None or dashboard is False:
            argv.append("--no-dashboard")
        else:
            argv += ["--dashboard-address", str(dashboard)]
        return argv

    def _worker_argv(self, name, index):
        options = self.worker_options
        argv = [self.remote_python[index], "-m", "minidask.cli", "worker",
                self.scheduler_address, "--secret-file", "-",
                "--stop-on-eof", "--name", str(name),
                "--host", str(options.get("host", self.hosts[index]))]
        if "nthreads" in options:
            argv += ["--nthreads", str(options["nthreads"])]
        if "memory_limit" in options:
            limit = options["memory_limit"]
            argv += ["--memory-limit", "0" if limit is None else str(limit)]
        if not options.get("nanny", True):
            argv.append("--no-nanny")
        return argv

    def _dashboard_host(self):
        """Where the dashboard link points: the scheduler's host, unless
        ``dashboard_address`` names a host other than "every network"."""
        address = self.scheduler_options.get("dashboard_address")
        if address:
            host, _ = parse_host_port(str(address), 8787)
            if host and host not in ("0.0.0.0", "::"):
                return host
        _, host, _ = parse_address(self.scheduler_address)
        return self.hosts[0] if host in ("0.0.0.0", "::") else host


def _check_hosts(hosts):
    if isinstance(hosts, str) or not isinstance(hosts, (list, tuple)):
        raise TypeError(f"SSHCluster(hosts=...) takes a list of host names, "
                        f"such as ['node0', 'node1'], not {hosts!r}")
    if not hosts:
        raise ValueError("SSHCluster needs at least one host: hosts[0] runs "
                         "the scheduler, every later entry one worker")
    for host in hosts:
        if not isinstance(host, str) or not host.strip():
            raise ValueError(f"SSHCluster hosts must be host names, such as "
                             f"'node0'; got {host!r} in {list(hosts)!r}")
    return list(hosts)


def _per_host(name, value, hosts, kind):
    """``value`` for each host: one value for all, or a list of one each."""
    if not isinstance(value, (list, tuple)):
        values = [value] * len(hosts)
    elif len(value) != len(hosts):
        raise ValueError(
            f"SSHCluster got {len(value)} {name} for {len(hosts)} hosts: "
            f"give one {kind.__name__} for every host, or a list with one "
            f"per host, in the order of hosts")
    else:
        values = list(value)
    for item in values:
        if item is not None and not isinstance(item, kind):
            raise TypeError(f"SSHCluster {name} must be a {kind.__name__} "
                            f"or a list of them, one per host; got {item!r}")
    return values


def _check_options(name, options, known):
    options = dict(options or {})
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"SSHCluster got unknown {name} "
                        f"{', '.join(map(repr, unknown))}; {name} takes "
                        f"{', '.join(sorted(known))}")
    return options


# -- the command line ------------------------------------------------------------

def ssh_main(argv=None):
    """``minidask-ssh HOST [HOST ...]``: an SSH cluster until Ctrl-C."""
    args = _parser().parse_args(argv)
    logs.setup(logging.INFO)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        cluster = SSHCluster(args.hosts, **_cluster_kwargs(args))
    except (SSHClusterError, ValueError, TypeError) as exc:
        raise SystemExit(f"minidask-ssh: {exc}") from None

    with cluster:
        # So that a Client on this machine finds the secret by address.
        path = write_secret_file(secret_file_for(cluster.scheduler_address),
                                 cluster.secret)
        logger.info("secret file for clients: %s", path)
        if cluster.dashboard_link:
            logger.info("dashboard at %s", cluster.dashboard_link)
        print(cluster.scheduler_address, flush=True)
        while not stop.wait(1):
            if cluster.scheduler_process.ended:
                logger.error("the scheduler ended: closing the cluster")
                break
        else:
            logger.info("signal received: closing the cluster")
    path.unlink(missing_ok=True)
    if not stop.is_set():
        raise SystemExit(1)


def _parser():
    parser = argparse.ArgumentParser(
        prog="minidask-ssh",
        description="Start a scheduler on the first HOST and a worker on "
                    "each later one over SSH, and keep them up until "
                    "Ctrl-C or SIGTERM.")
    parser.add_argument("hosts", nargs="+", metavar="HOST",
                        help="hosts to start on; repeat one for several "
                             "workers on it")
    parser.add_argument("--ssh-port", type=int,
                        help="port of the SSH servers (default 22)")
    parser.add_argument("--username", "-l",
                        help="user to log in as (default: yours)")
    parser.add_argument("--identity-file", "-i", action="append",
                        help="private key to log in with (may repeat; "
                             "default: the keys in ~/.ssh)")
    parser.add_argument("--known-hosts",
                        help="known_hosts file to check host keys with "
                             "(default ~/.ssh/known_hosts)")
    parser.add_argument("--remote-python",
                        help="Python to run on the hosts (default: the "
                             "path of this Python)")
    parser.add_argument("--nthreads", type=int,
                        help="threads of each worker (default 1)")
    parser.add_argument("--memory-limit",
                        help="memory each worker may use (default: all of "
                             "its host's)")
    parser.add_argument("--scheduler-port", type=int, default=8786,
                        help="port the scheduler listens on (default 8786, "
                             "0 for any)")
    parser.add_argument("--dashboard-address", default=":8787",
                        help="host:port of the dashboard (default :8787)")
    parser.add_argument("--no-dashboard", action="store_true",
                        help="do not start the dashboard")
    return parser


def _cluster_kwargs(args):
    connect = {}
    if args.ssh_port:
        connect["port"] = args.ssh_port
    if args.username:
        connect["username"] = args.username
    if args.identity_file:
        connect["client_keys"] = args.identity_file
    if args.known_hosts:
        connect["known_hosts"] = args.known_hosts
    worker = {}
    if args.nthreads:
        worker["nthreads"] = args.nthreads
    if args.memory_limit:
        worker["memory_limit"] = args.memory_limit
    scheduler = {"port": args.scheduler_port,
                 "dashboard_address": (None if args.no_dashboard
                                       else args.dashboard_address)}
    return {"connect_options": connect, "worker_options": worker,
            "scheduler_options": scheduler,
            "remote_python": args.remote_python}


__all__ = ["SSHCluster", "SSHClusterError", "SSHConnectError",
           "SSHAuthenticationError", "SSHHostKeyError", "RemoteCommandError",
           "ssh_main"]
