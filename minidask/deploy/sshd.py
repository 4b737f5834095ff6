"""An SSH server inside Python, for "SSH to localhost" where no sshd may run.

`SSHCluster` starts the scheduler and the workers by running commands on
each host over SSH. To try that on one machine you would normally SSH to
localhost, but a laptop often has no OpenSSH server and Binder forbids
running one. `EmbeddedSSHServer` fills the gap: an asyncssh server in this
process that accepts exactly one user (the current one) with exactly one
key (one it generates), on 127.0.0.1 only.

What it does with each connection:

- Keys live in a private temporary folder (mode 0700): an ed25519 host key,
  a client key pair whose public half is the only authorized key, and a
  `known_hosts` file so that clients verify the host key as they should.
  `connect_options` names them in the form `asyncssh.connect` takes.
- Each SSH "exec" request runs `/bin/sh -c COMMAND` as the current user, in
  the home directory, with the environment of this process (plus `env`).
  The channel's stdin, stdout and stderr are wired to the command and its
  exit status, or the signal that killed it, goes back to the client.
  Signals the client sends are passed on to the command.
- Every command runs in a session and process group of its own. When its
  channel closes (the command ended, the client went away) or the server
  closes, what is left of that group and its descendants gets SIGTERM, then
  SIGKILL after `kill_timeout` seconds: a cluster stopped over this server
  leaves no process behind.
- Refused: interactive shells and subsystems (with a message on stderr and
  exit status 1; the sftp subsystem is refused outright, before any channel
  data), pseudo-terminals, port forwarding, passwords, and every user but
  the current one.

Known shortcomings, accepted to keep this small: a process that leaves its
session (`setsid`) after its parent has exited is out of sight at clean-up
(OpenSSH kills nothing at all in that case, so this is still stricter).
Environment variables sent by the client are ignored, as OpenSSH ignores
all but the locale ones by default: put variables in the command instead.

Use it synchronously, as in a notebook (the server runs its own event loop
in a background thread)::

    with EmbeddedSSHServer() as server:
        cluster = SSHCluster([server.host] * 3,
                             connect_options=server.connect_options)

or on a running event loop with `async with EmbeddedSSHServer() as server`,
or from a terminal with `python -m minidask.deploy.sshd [--port N]`.
"""

import argparse
import asyncio
import atexit
import logging
import os
import pwd
import shlex
import shutil
import signal
import tempfile
import threading

import asyncssh
import psutil

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
_READ_SIZE = 65536
_POLL_INTERVAL = 0.05


class EmbeddedSSHServer:
    """An SSH server for the current user on 127.0.0.1, keys made on start.

    `port=0` picks a free port. `env` adds variables to the environment
    that commands run with. `kill_timeout` is how long what is left of a
    command gets between SIGTERM and SIGKILL once its channel has closed.

    After `start()` (or `await astart()`), `host`, `port`, `username`,
    `known_hosts` and `connect_options` describe how to reach the server;
    `asyncssh.connect(server.host, **server.connect_options)` does.
    """

    def __init__(self, port=0, env=None, kill_timeout=3.0):
        self.host = HOST
        self.port = port
        self.username = pwd.getpwuid(os.getuid()).pw_name
        self.env = dict(env or {})
        self.kill_timeout = kill_timeout
        self.folder = None
        self.known_hosts = None
        self.client_key = None
        self.connect_options = {}
        self._authorized_key = None
        self._listener = None
        self._connections = set()
        self._commands = set()
        self._loop = None
        self._thread = None

    def __repr__(self):
        state = "listening" if self._listener else "closed"
        return (f"<EmbeddedSSHServer {self.username}@{self.host}:{self.port}"
                f" {state}>")

    def describe(self):
        """Text telling a person how to reach the server: Python or ssh."""
        ssh = shlex.join([
            "ssh", "-p", str(self.port), "-i", self.client_key,
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "IdentitiesOnly=yes",
            f"{self.username}@{self.host}", "echo hello"])
        return "\n".join([
            f"host: {self.host}",
            f"port: {self.port}",
            f"username: {self.username}",
            f"client key: {self.client_key}",
            f"known_hosts: {self.known_hosts}",
            f"connect_options = {self.connect_options!r}",
            f"with OpenSSH's client: {ssh}",
        ])

    # -- the asynchronous API, for use on a running event loop ------------

    async def astart(self):
        """Make the keys and start listening; return the server."""
        if self._listener is not None:
            raise RuntimeError(f"{self!r} is already started")

        self.folder = tempfile.mkdtemp(prefix="minidask-sshd-")
        try:
            host_key = self._write_keys()
            self._listener = await self._listen(host_key)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

        self.port = self._listener.get_port()
        self._write_known_hosts(host_key)
        self.connect_options = {
            "port": self.port,
            "username": self.username,
            "client_keys": [self.client_key],
            "known_hosts": self.known_hosts,
            # Keys held by a running ssh-agent would be offered first, and
            # a real sshd stops after a few wrong ones.
            "agent_path": None,
        }
        logger.info("embedded ssh server listening on %s:%d for user %s,"
                    " keys in %s", self.host, self.port, self.username,
                    self.folder)
        return self

    async def aclose(self):
        """Stop listening, end every command and remove the key folder."""
        if self._listener is None:
            return
        listener, self._listener = self._listener, None
        listener.close()
        await listener.wait_closed()

        connections = list(self._connections)
        for conn in connections:
            conn.close()
        commands = list(self._commands)
        await asyncio.gather(*(command.stop() for command in commands))
        for command in commands:
            await command.finished.wait()
        for conn in connections:
            await conn.wait_closed()

        shutil.rmtree(self.folder, ignore_errors=True)
        logger.info("embedded ssh server on %s:%d closed", self.host,
                    self.port)

    async def __aenter__(self):
        return await self.astart()

    async def __aexit__(self, *exc_info):
        await self.aclose()

    # -- the synchronous API: the server runs on a loop in a thread -------

    def start(self):
        """Start the server on an event loop in a background thread."""
        if self._thread is not None or self._listener is not None:
            raise RuntimeError(f"{self!r} is already started")

        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True,
                                  name="minidask-sshd")
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self.astart(), loop).result()
        except BaseException:
            self._stop_thread()
            raise

        # A notebook kernel that exits normally still ends the commands.
        atexit.register(self.close)
        return self

    def close(self):
        """Close a server started with `start()`; harmless if closed."""
        if self._thread is None:
            if self._listener is not None:
                raise RuntimeError(f"{self!r} was started with astart():"
                                   " close it with `await server.aclose()`")
            return
        try:
            future = asyncio.run_coroutine_threadsafe(self.aclose(),
                                                      self._loop)
            future.result()
        finally:
            self._stop_thread()
            atexit.unregister(self.close)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.close()

    def _stop_thread(self):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._loop = self._thread = None

    # -- keys and listening -----------------------------------------------

    def _write_keys(self):
        """Write the host key and the client key pair; return the host key."""
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        _write_private_key(host_key, os.path.join(self.folder, "host_key"))

        client_key = asyncssh.generate_private_key(
            "ssh-ed25519", comment=f"{self.username}@minidask-sshd")
        self.client_key = os.path.join(self.folder, "client_key")
        _write_private_key(client_key, self.client_key)
        client_key.write_public_key(self.client_key + ".pub")
        self._authorized_key = client_key.convert_to_public()
        return host_key

    def _write_known_hosts(self, host_key):
        # Off port 22, clients look a host up as "[host]:port".
        names = f"[{self.host}]:{self.port},[localhost]:{self.port}"
        public = host_key.export_public_key().decode().strip()
        self.known_hosts = os.path.join(self.folder, "known_hosts")
        with open(self.known_hosts, "w") as file:
            file.write(f"{names} {public}\n")

    async def _listen(self, host_key):
        try:
            return await asyncssh.listen(
                self.host, self.port,
                server_factory=self._make_connection_handler,
                server_host_keys=[host_key],
                process_factory=self._serve,
                encoding=None,
                allow_pty=False,
                agent_forwarding=False,
                x11_forwarding=False,
            )
        except OSError as exc:
            raise OSError(exc.errno, f"embedded ssh server could not listen"
                          f" on {self.host}:{self.port} ({exc.strerror}):"
                          f" pick another port, or 0 for a free one"
                          ) from exc

    def _make_connection_handler(self):
        return _ConnectionHandler(self.username, self._authorized_key,
                                  self._connections)

    # -- serving one session ----------------------------------------------

    async def _serve(self, process):
        """Run one exec request; refuse shells and subsystems."""
        if process.command is None:
            _refuse(process, self.port)
            return

        command = _Command(process, self._environment(), self.kill_timeout)
        self._commands.add(command)
        try:
            await command.run()
        finally:
            command.finished.set()
            self._commands.discard(command)

    def _environment(self):
        """The environment of this process, as if the user had logged in."""
        user = pwd.getpwuid(os.getuid())
        env = dict(os.environ)
        env.update(HOME=user.pw_dir, USER=user.pw_name,
                   LOGNAME=user.pw_name, SHELL="/bin/sh")
        env.update(self.env)
        return env


class _ConnectionHandler(asyncssh.SSHServer):
    """One connection: accept the one client key for the one user."""

    def __init__(self, username, authorized_key, connections):
        self._username = username
        self._authorized_key = authorized_key
        self._connections = connections
        self._conn = None
        self._peer = None

    def connection_made(self, conn):
        self._conn = conn
        self._peer = conn.get_extra_info("peername")
        self._connections.add(conn)
        logger.debug("ssh connection from %s", self._peer)

    def connection_lost(self, exc):
        self._connections.discard(self._conn)
        logger.debug("ssh connection from %s closed: %s", self._peer,
                     exc or "by the client")

    def begin_auth(self, username):
        return True

    def public_key_auth_supported(self):
        return True

    def validate_public_key(self, username, key):
        if username != self._username:
            logger.debug("refused user %r from %s: this server only serves"
                         " %r", username, self._peer, self._username)
            return False
        accepted = key.public_data == self._authorized_key.public_data
        if not accepted:
            logger.debug("refused a client key from %s: not the one in"
                         " connect_options", self._peer)
        return accepted


def _refuse(process, port):
    """Answer a shell or subsystem request with a message, exit status 1."""
    if process.subsystem:
        what = f"the {process.subsystem!r} subsystem is"
    else:
        what = "interactive shells are"
    logger.info("refused a session on port %d: %s not supported", port,
                what.removeprefix("the "))
    message = (f"minidask embedded ssh server: {what} not supported; run a"
               f" command instead, for example: ssh -p {port} {HOST}"
               f" 'echo hello'\n")
    process.stderr.write(message.encode())
    process.exit(1)


class _Command:
    """One exec request: `/bin/sh -c COMMAND` wired to its SSH channel."""

    def __init__(self, process, env, kill_timeout):
        self.process = process
        self.env = env
        self.kill_timeout = kill_timeout
        self.proc = None
        self.finished = asyncio.Event()
        self._stopping = None

    async def run(self):
        """Run the command until it ends or its channel closes."""
        try:
            self.proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", self.process.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.env, cwd=_home(), start_new_session=True)
        except OSError as exc:
            logger.warning("could not start %r: %s", self.process.command,
                           exc)
            self.process.stderr.write(f"minidask embedded ssh server: could"
                                      f" not start /bin/sh: {exc}\n".encode())
            self.process.exit(127)
            return
        logger.debug("started %r as pid %d", self.process.command,
                     self.proc.pid)

        relay = asyncio.ensure_future(self._relay())
        closed = asyncio.ensure_future(self.process.wait_closed())
        try:
            await asyncio.wait({relay, closed},
                               return_when=asyncio.FIRST_COMPLETED)
            if relay.done() and not relay.exception():
                self._report(relay.result())
        finally:
            relay.cancel()
            closed.cancel()
            await asyncio.gather(relay, closed, return_exceptions=True)
            await self.stop()
            await self._read_to_the_end()

    async def _relay(self):
        """Copy the channel to the command and back; return its exit code."""
        stdin = asyncio.ensure_future(self._copy_stdin())
        try:
            # Like OpenSSH, wait for the output to end, not only for the
            # shell: a background job may still be writing to it.
            await asyncio.gather(
                _copy_output(self.proc.stdout, self.process.stdout),
                _copy_output(self.proc.stderr, self.process.stderr))
            return await self.proc.wait()
        finally:
            stdin.cancel()
            await asyncio.gather(stdin, return_exceptions=True)

    async def _read_to_the_end(self):
        """Drain the command's pipes, so that asyncio closes them now.

        Left open, they would be closed when garbage collected, perhaps
        after the event loop has closed.
        """
        try:
            await asyncio.wait_for(asyncio.gather(self.proc.stdout.read(),
                                                  self.proc.stderr.read()),
                                   self.kill_timeout)
        except asyncio.TimeoutError:
            logger.warning("output of %r still open after its processes"
                           " ended: a process that left its session holds"
                           " it", self.process.command)

    async def _copy_stdin(self):
        pipe = self.proc.stdin
        try:
            while True:
                try:
                    data = await self.process.stdin.read(_READ_SIZE)
                except asyncssh.SignalReceived as exc:
                    self._forward_signal(exc.signal)
                    continue
                except asyncssh.BreakReceived:
                    continue
                if not data:
                    break
                pipe.write(data)
                await pipe.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the command stopped reading; the rest is not wanted
        finally:
            pipe.close()

    def _forward_signal(self, name):
        try:
            signum = signal.Signals["SIG" + name]
            os.killpg(self.proc.pid, signum)
        except KeyError:
            logger.debug("ignored unknown signal %r for pid %d", name,
                         self.proc.pid)
        except ProcessLookupError:
            pass  # the command has already ended
        else:
            logger.debug("passed %s on to pid %d", signum.name,
                         self.proc.pid)

    def _report(self, returncode):
        """Send the exit status, or the signal that ended the command."""
        logger.debug("pid %d exited with %d", self.proc.pid, returncode)
        if self.process.is_closing():
            return
        if returncode >= 0:
            self.process.exit(returncode)
            return
        try:
            name = signal.Signals(-returncode).name.removeprefix("SIG")
        except ValueError:
            # A signal with no name (a real-time one): report it the way
            # a shell does, as 128 plus its number.
            self.process.exit(128 - returncode)
        else:
            self.process.exit_with_signal(name)

    async def stop(self):
        """End what is left of the command: SIGTERM, then SIGKILL."""
        if self.proc is None:
            return
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._end_leftovers())
        # Both the server's close and the command's own end may ask.
        await asyncio.shield(self._stopping)

    async def _end_leftovers(self):
        leftovers = _process_group_and_descendants(self.proc.pid)
        if leftovers:
            logger.debug("ending %d processes left by %r", len(leftovers),
                         self.process.command)
            _send_signal(leftovers, signal.SIGTERM)
            alive = await _wait_gone(leftovers, self.kill_timeout)
            if alive:
                logger.warning("%d processes of %r outlived SIGTERM by"
                               " %.1f s, killing them", len(alive),
                               self.process.command, self.kill_timeout)
                _send_signal(alive, signal.SIGKILL)
                await _wait_gone(alive, self.kill_timeout)
        await self.proc.wait()


async def _copy_output(pipe, writer):
    while data := await pipe.read(_READ_SIZE):
        writer.write(data)
        await writer.drain()


def _home():
    home = os.path.expanduser("~")
    # OpenSSH also falls back to "/" when the home directory is missing.
    return home if os.path.isdir(home) else "/"


def _process_group_and_descendants(pgid):
    """Processes in group `pgid`, and their descendants that left it."""
    found = set()
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                found.add(proc)
                found.update(proc.children(recursive=True))
        except (psutil.Error, ProcessLookupError):
            pass  # it ended while we looked
    return {proc for proc in found if _is_alive(proc)}


def _send_signal(procs, signum):
    for proc in procs:
        try:
            proc.send_signal(signum)
        except psutil.Error:
            pass  # it has already ended, or its pid was reused


async def _wait_gone(procs, timeout):
    """Wait until `procs` have ended; return those still alive."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        alive = [proc for proc in procs if _is_alive(proc)]
        if not alive or loop.time() >= deadline:
            return alive
        await asyncio.sleep(_POLL_INTERVAL)


def _is_alive(proc):
    # A zombie has ended: all that is left is for its parent to reap it.
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _write_private_key(key, path):
    # Created unreadable to others from the start, and OpenSSH's client
    # refuses a key file that others could read.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(key.export_private_key())


# -- the command line ------------------------------------------------------

def main(argv=None):
    """Serve until Ctrl-C or SIGTERM, then remove the keys."""
    parser = argparse.ArgumentParser(
        prog="python -m minidask.deploy.sshd",
        description="An SSH server for the current user on 127.0.0.1, for"
                    " trying SSHCluster where no sshd runs.")
    parser.add_argument("--port", type=int, default=0,
                        help="port to listen on (default: a free one)")
    parser.add_argument("--log-level", default="INFO",
                        help="logging level (default: INFO)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s"
                               " %(message)s")
    asyncio.run(_serve_until_stopped(args.port))


async def _serve_until_stopped(port):
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)

    async with EmbeddedSSHServer(port=port) as server:
        print(server.describe(), flush=True)
        print("serving until Ctrl-C", flush=True)
        await stopped.wait()
        logger.info("stopping: signal received")


if __name__ == "__main__":
    main()
