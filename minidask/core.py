"""Core: what the scheduler, workers and nannies have in common.

Each of them is a :class:`Server`: it listens on an address, accepts comms
that pass the secret handshake, reads messages of the form
``{"op": "name", ...}`` and calls the *handler* registered for that op. A
handler's return value goes back to the caller as the reply. Some handlers
turn the connection into a long-lived *stream*: the scheduler keeps one
stream open to every worker and every client, on which many small one-way
messages travel in batches (:class:`BatchedSend`) and are dispatched to
*stream handlers*.

Requests from one server to another go through a :class:`ConnectionPool`,
which keeps connections open between calls so that the handshake is paid
once per peer, not once per request.
"""

import asyncio
import collections
import inspect
import logging
import os
import secrets
import threading
import traceback
import uuid
from pathlib import Path

from minidask import comm as comms
from minidask import config, logs
from minidask.comm import CommClosedError, CommError, ProtocolError

logger = logging.getLogger(__name__)

NO_REPLY = object()  # a handler that has answered (or kept) the comm itself


# -- the cluster secret ---------------------------------------------------

_known_secrets = {}  # address -> secret, for clusters in this process


def new_secret():
    return secrets.token_hex(32)


def secret_dir():
    """A folder only this user can read, for secret files by address."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.access(base, os.W_OK):
        base = Path.home() / ".cache"
    path = Path(base) / "minidask" / "secrets"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def secret_file_for(address):
    name = address.replace("://", "_").replace(":", "_").replace("/", "_")
    return secret_dir() / name


def write_secret_file(path, secret):
    """Write ``secret`` to ``path`` readable by this user only."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.chmod(path, 0o600)
    return path


def read_secret_file(path):
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise OSError(f"cannot read the cluster secret from {path}: "
                      f"{exc.strerror}") from exc
    if not text:
        raise ValueError(f"the secret file {path} is empty")
    return text


def register_secret(address, secret):
    _known_secrets[address] = secret


def forget_secret(address):
    _known_secrets.pop(address, None)


def secret_for(address):
    """Find the secret for the cluster at ``address``, or None.

    In order: the ``secret`` config key (``MINIDASK_SECRET``), the
    ``secret-file`` config key, a cluster in this process, and the secret
    file a scheduler of this user wrote for that address.
    """
    if config.get("secret", None):
        return str(config.get("secret"))
    if config.get("secret-file", None):
        return read_secret_file(config.get("secret-file"))
    if address in _known_secrets:
        return _known_secrets[address]
    path = secret_file_for(address)
    if path.exists():
        return read_secret_file(path)
    return None


# -- replies ------------------------------------------------------------------

class RemoteError(Exception):
    """An exception raised on a peer that could not be sent back as is."""


def error_reply(exc):
    tb = traceback.format_exc()
    try:
        comms.dumps(exc)
    except Exception:
        exc = RemoteError(f"{type(exc).__name__}: {exc}")
    return {"status": "error", "exception": exc, "traceback": tb}


def unwrap(reply, address):
    if isinstance(reply, dict) and reply.get("status") == "error":
        exc = reply["exception"]
        exc.remote_traceback = reply.get("traceback")
        raise exc
    if not isinstance(reply, dict) or reply.get("status") != "OK":
        raise ProtocolError(f"{address} sent a malformed reply: {reply!r}")
    return reply.get("result")


# -- batching -----------------------------------------------------------------

class BatchedSend:
    """Send many small messages on one stream, batched without a timer.

    A message is sent at the end of the event loop's current turn, together
    with every other message queued in that turn; while a write is under
    way, new messages wait for it and then leave together. Under load the
    batches grow by themselves, and an idle stream adds no delay at all.
    A stream reader that has handled a whole batch of incoming messages
    sends what they queued at once (:func:`flush_queued`), a turn of the
    loop sooner.
    """

    def __init__(self, comm):
        self.comm = comm
        self.buffer = []
        self.sending = False
        self.closed = False
        self.loop = asyncio.get_running_loop()
        self._scheduled = None  # the call of _write at the turn's end
        self._idle = asyncio.Event()
        self._idle.set()

    def send(self, msg):
        if self.closed:
            return
        self.buffer.append(msg)
        if not self.sending:
            self.sending = True
            self._idle.clear()
            self._schedule()

    def _schedule(self):
        self._scheduled = self.loop.call_soon(self._write)
        _queued().add(self)

    def write_queued(self):
        """Write now what would be written at the end of this turn."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._write()

    def _write(self):
        self._scheduled = None
        _queued().discard(self)
        if self.closed or not self.buffer:
            self._stop_sending()
            return
        batch, self.buffer = self.buffer, []
        try:
            written = self.comm.write_nowait(batch)
        except CommError:
            self.abort()
            return
        if written.done():
            self._written(written)
        else:
            written.add_done_callback(self._written)

    def _written(self, written):
        if written.cancelled() or written.exception() is not None:
            self.abort()
        elif self.buffer:
            self._schedule()
        else:
            self._stop_sending()

    def _stop_sending(self):
        self.sending = False
        self._idle.set()

    async def flush(self):
        """Wait until everything sent so far has been written."""
        await self._idle.wait()

    def abort(self):
        self.closed = True
        self.buffer = []
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
            _queued().discard(self)
        self.comm.abort()
        self._stop_sending()


_per_thread = threading.local()


def _queued():
    """The BatchedSends of this thread's loop with a write due this turn."""
    try:
        return _per_thread.queued
    except AttributeError:
        _per_thread.queued = set()
        return _per_thread.queued


def flush_queued():
    """Write every batch due at the end of this turn of the loop, now."""
    for stream in list(_queued()):
        stream.write_queued()


async def read_stream(comm, handlers, log=logger, **extra):
    """Dispatch each message of each batch on ``comm`` until it closes.

    A peer whose message no handler takes, or takes with an error, is
    dropped (the comm is closed): the only safe choice, since its later
    messages may depend on the one that failed, and the rest of the
    cluster must go on. The handlers check a message before they change
    any state.
    """
    try:
        while True:
            batch = await comm.read()
            if not isinstance(batch, list):
                raise ProtocolError(f"a stream carries lists of messages, "
                                    f"not {type(batch).__name__}")
            for msg in batch:
                if not isinstance(msg, dict) or msg.get("op") not in handlers:
                    raise ProtocolError(f"unknown stream message {msg!r:.80}")
                op = msg.pop("op")
                handlers[op](**msg, **extra)
            flush_queued()  # what the batch set off need not wait a turn
    except CommClosedError:
        pass
    except Exception as exc:
        log.warning("dropped the stream from %s after a bad message: %s: %s",
                    comm.peer_address, type(exc).__name__, exc)
        log.debug("bad message", exc_info=True)
        comm.abort()


# -- connections out ----------------------------------------------------------

class ConnectionPool:
    """Reusable connections to peers, for request/reply calls."""

    # Connections open at once to one peer. Without a cap, a worker that
    # fetches many inputs from one holder at once opens one connection for
    # each, and the holder refuses handshakes past comm.max-pending-
    # handshakes; with it, requests beyond the cap wait for a free one.
    PER_PEER = 8

    def __init__(self, secret, security=None):
        self.secret = secret
        self.security = security
        self.idle = collections.defaultdict(list)
        self.slots = collections.defaultdict(
            lambda: asyncio.Semaphore(self.PER_PEER))
        self.closed = False

    async def connect(self, address, timeout=None, local=False):
        """A fresh comm of our own, for a stream; the caller closes it."""
        return await comms.connect(address, self._secret_for(address),
                                   timeout=timeout, security=self.security,
                                   local=local)

    def _secret_for(self, address):
        return self.secret if self.secret is not None else secret_for(address)

    async def call(self, address, op, /, connect_timeout=None, **msg):
        """Send ``{"op": op, **msg}`` to ``address`` and return the reply."""
        async with self.slots[address]:
            return await self._call(address, op, connect_timeout, msg)

    async def _call(self, address, op, connect_timeout, msg):
        idle = self.idle[address]
        comm = idle.pop() if idle else await self.connect(address,
                                                           connect_timeout)
        msg["op"] = op
        try:
            await comm.write(msg)
            reply = await comm.read()
        except BaseException:
            comm.abort()
            raise
        if self.closed:
            comm.abort()
        else:
            idle.append(comm)
        return unwrap(reply, address)

    def forget(self, address):
        for comm in self.idle.pop(address, []):
            comm.abort()

    def close(self):
        self.closed = True
        for address in list(self.idle):
            self.forget(address)


# -- servers ------------------------------------------------------------------

class Server:
    """A process's endpoint: listen, then dispatch each op to a handler."""

    kind = "Server"

    def __init__(self, secret=None, log_everything=False, security=None):
        self.id = f"{self.kind}-{uuid.uuid4().hex[:12]}"
        self.secret = secret
        self.security = security
        self.handlers = {
            "identity": self.identity,
            "get-logs": self.handle_get_logs,
        }
        self.pool = ConnectionPool(secret, security)
        self.listener = None
        self.address = None
        self.status = "created"
        self._comms = set()
        self._threads = set()  # threads whose log lines are ours
        self.log = logs.ServerLog(logging.getLogger(type(self).__module__),
                                  self.id)
        logs.setup(logs.stderr_level())
        self.log_buffer = logs.LogBuffer(self.id, self._threads,
                                         everything=log_everything)
        # minidask's loggers do not propagate to the root logger, so a
        # buffer for everything in the process listens to both.
        self._log_names = (("", "minidask") if log_everything
                           else ("minidask",))
        logs.attach(self.log_buffer, self._log_names)

    def __repr__(self):
        return f"<{self.kind} {self.address or 'not listening'} {self.status}>"

    async def listen(self, host="127.0.0.1", port=0):
        self.listener = comms.Listener(self.handle_comm, self.secret,
                                       self.security)
        self.address = self.listener.start_listening(host, port)
        return self.address

    async def handle_comm(self, comm):
        """Serve one connection: read a request, reply, until it closes."""
        self._comms.add(comm)
        try:
            while True:
                msg = await comm.read()
                op = msg.get("op") if isinstance(msg, dict) else None
                reply = await self._dispatch(comm, msg)
                if reply is NO_REPLY:
                    if comm.closed():
                        return
                    continue
                await self._reply(comm, op, reply)
        except CommClosedError:
            pass
        except ProtocolError as exc:
            self.log.warning("dropped connection from %s: %s",
                             comm.peer_address, exc)
        finally:
            self._comms.discard(comm)
            comm.abort()

    async def _reply(self, comm, op, reply):
        try:
            await comm.write(reply)
        except CommError:
            raise
        except Exception as exc:  # the reply does not pickle
            await comm.write(error_reply(TypeError(
                f"{self.kind.lower()} {self.address} cannot send its answer "
                f"to {op!r}: {exc}; only values that pickle can leave it")))

    async def _dispatch(self, comm, msg):
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            return error_reply(ProtocolError(
                f"messages are dicts with an 'op' key, not {type(msg)}"))
        op = msg.pop("op")
        handler = self.handlers.get(op)
        if handler is None:
            self.log.debug("unknown op %r from %s", op, comm.peer_address)
            return error_reply(ValueError(
                f"{self.kind} has no handler for op {op!r}"))
        try:
            result = handler(comm=comm, **msg)
            if inspect.isawaitable(result):
                result = await result
        except CommClosedError:
            raise
        except Exception as exc:
            self.log.debug("handler %r failed", op, exc_info=True)
            return error_reply(exc)
        if result is NO_REPLY:
            return NO_REPLY
        return {"status": "OK", "result": result}

    def identity(self, comm=None):
        return {"type": self.kind, "id": self.id, "address": self.address}

    def get_logs(self, n=None):
        return self.log_buffer.lines(n)

    def handle_get_logs(self, comm=None, n=None):
        return self.get_logs(n)

    async def close_server(self):
        """Stop listening and drop every connection."""
        if self.listener is not None:
            self.listener.stop()
        for comm in list(self._comms):
            comm.abort()
        self.pool.close()
        logs.detach(self.log_buffer, self._log_names)
