"""Comms: the connections every minidask process talks over.

A *comm* is one TCP connection between two minidask processes: a client and
the scheduler, the scheduler and a worker, a worker and a peer worker. It
carries *messages*, any picklable Python objects (in practice dicts with an
``"op"`` key, or lists of them), in both directions.

On the wire a message is a set of frames::

    [n: u64] [len(frame 1): u64] ... [len(frame n): u64] frame 1 ... frame n

Frame 1 is the pickle (protocol 5) of the message. Large binary values
(NumPy arrays, and big ``bytes`` wrapped by :func:`to_wire`) are not copied
into that pickle: pickle hands them over as out-of-band buffers, which are
written to the socket as frames of their own and read back straight into
memory of their final size (see :func:`new_buffer`). The top bit of a
frame's length marks it read-only: it is received as a ``bytes`` object,
which pickle then uses as it is, with no copy. Functions defined in
``__main__`` (a notebook) cannot be pickled by reference, so messages that
mention ``__main__`` go through cloudpickle, which pickles such functions
by value.

Before any message is read, both ends run a handshake that proves each
knows the cluster secret (see :func:`_handshake_server`). Nothing from a
peer is unpickled until it has passed, so a stranger on a shared machine
can neither run code on the cluster nor feed it a malicious pickle.

A client in the same process as its scheduler (a LocalCluster's) skips
all of this: it talks to the scheduler through a :class:`LocalComm`,
which hands messages over as objects.
"""

import asyncio
import collections
import ctypes
import hashlib
import hmac
import logging
import mmap
import os
import pickle
import socket
import struct
import weakref

import cloudpickle
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient
from tornado.tcpserver import TCPServer

from minidask import config
from minidask.utils import parse_bytes, parse_timedelta

logger = logging.getLogger(__name__)

MAGIC = b"minidask/1\n"
NONCE_BYTES = 32
PROOF_BYTES = 32  # SHA-256 digest
ACCEPT, REFUSE = b"+", b"-"
MAX_FRAMES = 1_000_000
LARGE_BYTES = 64 * 1024  # bytes values above this travel out of band
READ_ONLY = 1 << 63  # a flag on a frame's length: receive it as bytes
SMALL_FRAME = 64 * 1024  # frames below this share one write with the header
HUGE_FRAME = 2 * 2**20  # frames from this size up go to huge-page memory


# -- errors ---------------------------------------------------------------

class CommError(OSError):
    """Something went wrong talking to a peer; the message names it."""


class CommClosedError(CommError):
    """The connection was closed, by the peer or by us."""


class ConnectError(CommError):
    """Nothing answered at an address within the connect timeout."""


class AuthenticationError(CommError):
    """The handshake failed: one side does not know the cluster secret."""


class ProtocolError(CommError):
    """The peer sent something that is not a minidask message."""


# -- addresses ------------------------------------------------------------

def parse_address(address):
    """Split ``"tcp://host:port"`` into ``("tcp", host, port)``."""
    if not isinstance(address, str) or "://" not in address:
        raise ValueError(
            f"{address!r} is not an address: expected 'tcp://host:port', "
            f"for example 'tcp://127.0.0.1:8786'")
    scheme, _, rest = address.partition("://")
    host, sep, port = rest.rpartition(":")
    if scheme not in ("tcp", "tls") or not sep or not port.isdigit():
        raise ValueError(
            f"{address!r} is not an address: expected 'tcp://host:port', "
            f"for example 'tcp://127.0.0.1:8786'")
    host = host.strip("[]")
    if not host:
        raise ValueError(f"{address!r} has no host: expected 'tcp://host:port'")
    return scheme, host, int(port)


def unparse_address(scheme, host, port):
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def parse_host_port(text, default_port):
    """Split ``"host:port"``, ``":port"`` or ``"host"``; host may be ''."""
    text = str(text)
    if "://" in text:
        text = text.partition("://")[2]
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    if not port.isdigit():
        raise ValueError(f"{text!r}: the port must be a number")
    return host.strip("[]"), int(port)


# -- serialization ----------------------------------------------------------

class _LargeBytes:
    """A big ``bytes`` value that should cross the wire out of band."""

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data

    def __reduce_ex__(self, protocol):
        return bytes, (pickle.PickleBuffer(self.data),)


def to_wire(value):
    """Mark a data value so that pickle sends it without copying it."""
    if type(value) is bytes and len(value) >= LARGE_BYTES:
        return _LargeBytes(value)
    return value


def dumps(msg):
    """Turn a message into frames: its pickle, then out-of-band buffers."""
    buffers = []
    try:
        head = pickle.dumps(msg, protocol=5, buffer_callback=buffers.append)
        by_reference = b"__main__" in head
    except Exception:
        by_reference = True
    if by_reference:
        # Pickled by reference, a function from a notebook would not be
        # found on the worker: cloudpickle ships its code instead.
        buffers = []
        head = cloudpickle.dumps(msg, protocol=5,
                                 buffer_callback=buffers.append)
    return [head] + [buf.raw() for buf in buffers]


def loads(frames):
    return pickle.loads(frames[0], buffers=frames[1:])


def _length_field(frame):
    view = memoryview(frame)
    return view.nbytes | (READ_ONLY if view.readonly else 0)


# -- memory to receive into -------------------------------------------------

def new_buffer(nbytes, read_only=False):
    """Memory for a frame of ``nbytes``: ``(frame, writable view of it)``.

    A read-only frame becomes a ``bytes`` object; a writable one becomes
    memory that a NumPy array (say) can go on using as its own. The view
    is for receiving into; release it once the frame is full.

    Receiving a large value costs less in copying than in the kernel
    handing out fresh pages, one fault per 4 KiB page. So large writable
    frames are private anonymous maps with transparent huge pages asked
    for: a fault per 2 MiB. A large ``bytes`` object is filled where it
    lies, as CPython's own C code fills a new one before handing it out,
    instead of receiving into a buffer and copying it (which would also
    need twice the memory); other interpreters make that copy.
    """
    if read_only and _new_bytes is not None and nbytes:
        frame = _new_bytes(None, nbytes)
        contents = (ctypes.c_char * nbytes).from_address(
            id(frame) + _BYTES_OFFSET)
        return frame, memoryview(contents).cast("B")
    buffer = _writable(nbytes)
    return buffer, memoryview(buffer)


def _bytes_maker():
    """CPython's maker of new bytes objects, and where their contents lie."""
    try:
        maker = ctypes.pythonapi.PyBytes_FromStringAndSize
    except AttributeError:  # not CPython
        return None, None
    maker.restype = ctypes.py_object
    maker.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
    offset = bytes.__basicsize__ - 1  # the header, then the contents
    probe = maker(b"minidask", 8)
    if ctypes.string_at(id(probe) + offset, 8) != probe:
        return None, None  # a layout we do not know: copy instead
    return maker, offset


_new_bytes, _BYTES_OFFSET = _bytes_maker()


def _writable(nbytes):
    if nbytes < HUGE_FRAME or not hasattr(mmap, "MAP_PRIVATE"):
        return bytearray(nbytes)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


# -- the handshake ------------------------------------------------------------

def _proof(secret, role, first, second):
    return hmac.new(secret, role + first + second, hashlib.sha256).digest()


def as_secret_bytes(secret):
    if secret is None:
        return None
    return secret.encode() if isinstance(secret, str) else bytes(secret)


async def _handshake_server(stream, secret):
    """Challenge a new peer to prove it knows the secret, then prove we do.

    The server sends a fresh nonce; the client answers with its own nonce
    and an HMAC of both under the secret; the server checks it and answers
    with an HMAC in the other direction, so that a client also knows it is
    talking to its own cluster before it unpickles anything.
    """
    nonce = os.urandom(NONCE_BYTES)
    await stream.write(MAGIC + nonce)
    reply = await stream.read_bytes(len(MAGIC) + NONCE_BYTES + PROOF_BYTES)
    magic = reply[:len(MAGIC)]
    peer_nonce = reply[len(MAGIC):len(MAGIC) + NONCE_BYTES]
    proof = reply[len(MAGIC) + NONCE_BYTES:]
    expected = _proof(secret, b"client", nonce, peer_nonce)
    if magic != MAGIC or not hmac.compare_digest(proof, expected):
        await stream.write(REFUSE)
        return False
    await stream.write(ACCEPT + _proof(secret, b"server", peer_nonce, nonce))
    return True


async def _handshake_client(stream, secret, address):
    greeting = await stream.read_bytes(len(MAGIC) + NONCE_BYTES)
    if greeting[:len(MAGIC)] != MAGIC:
        raise ProtocolError(f"{address} is not a minidask server")
    nonce = greeting[len(MAGIC):]
    own_nonce = os.urandom(NONCE_BYTES)
    proof = (_proof(secret, b"client", nonce, own_nonce) if secret
             else bytes(PROOF_BYTES))
    await stream.write(MAGIC + own_nonce + proof)
    verdict = await stream.read_bytes(1)
    if verdict != ACCEPT:
        raise AuthenticationError(_refused_message(address, secret))
    server_proof = await stream.read_bytes(PROOF_BYTES)
    expected = _proof(secret, b"server", own_nonce, nonce)
    if not hmac.compare_digest(server_proof, expected):
        raise AuthenticationError(
            f"{address} does not know this cluster's secret: it is not the "
            f"server you meant to reach")


def _refused_message(address, secret):
    what = "a wrong" if secret else "no"
    return (
        f"{address} refused the connection: it was given {what} cluster "
        f"secret. Connect through the cluster object (Client(cluster)), or "
        f"set the secret with MINIDASK_SECRET or the 'secret-file' config key "
        f"(minidask-scheduler writes one and prints its path)")


# -- one connection -------------------------------------------------------------

class Comm:
    """One connection to a peer, carrying whole messages both ways.

    Reading goes through a buffer of our own: one read from the stream
    takes whatever has arrived, often several small messages at once, and
    they are parsed from there. A large frame is received straight into
    its own memory instead (see :func:`new_buffer`).
    """

    def __init__(self, stream, local_address, peer_address, max_frame=None):
        self.stream = stream
        self.local_address = local_address
        self.peer_address = peer_address
        self.max_frame = max_frame or parse_bytes(
            config.get("comm.max-frame-size"))
        self.name = None  # what the other end is, once known
        self._buffer = memoryview(bytearray(2 * SMALL_FRAME))
        self._start = self._end = 0  # what is unread: _buffer[_start:_end]

    def __repr__(self):
        return f"<Comm {self.local_address} -> {self.peer_address}>"

    async def read(self):
        """Read one message; raise CommClosedError when the peer is gone."""
        try:
            frames = [await self._take(field & ~READ_ONLY,
                                       bool(field & READ_ONLY))
                      for field in await self._read_header()]
        except StreamClosedError as exc:
            self.stream.close()
            raise CommClosedError(
                f"connection to {self.peer_address} closed") from exc
        except ProtocolError:
            self.abort()
            raise
        try:
            return loads(frames)
        except Exception as exc:
            self.abort()
            raise ProtocolError(
                f"{self.peer_address} sent a message that does not "
                f"unpickle: {exc!r}") from exc

    async def _read_header(self):
        """The length fields of the frames of the next message."""
        (count,) = struct.unpack("<Q", await self._take(8))
        if not 0 < count <= MAX_FRAMES:
            raise ProtocolError(f"{self.peer_address} sent {count} frames")
        fields = struct.unpack(f"<{count}Q", await self._take(8 * count))
        largest = max(field & ~READ_ONLY for field in fields)
        if largest > self.max_frame:
            raise ProtocolError(
                f"{self.peer_address} sent a frame of {largest} bytes, "
                f"over comm.max-frame-size ({self.max_frame})")
        return fields

    async def _take(self, nbytes, read_only=True):
        """The next ``nbytes`` of the stream: bytes, or writable memory."""
        if nbytes > SMALL_FRAME:
            return await self._take_large(nbytes, read_only)
        while self._end - self._start < nbytes:
            await self._fill()
        piece = self._buffer[self._start:self._start + nbytes]
        self._start += nbytes
        return bytes(piece) if read_only else bytearray(piece)

    async def _fill(self):
        """Read whatever has arrived (at least a byte) into the buffer."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end > SMALL_FRAME:  # move the unread part to the front
            unread = self._end - self._start
            self._buffer[:unread] = self._buffer[self._start:self._end]
            self._start, self._end = 0, unread
        self._end += await self.stream.read_into(
            self._buffer[self._end:], partial=True)

    async def _take_large(self, nbytes, read_only):
        frame, view = new_buffer(nbytes, read_only)
        with view:
            buffered = min(self._end - self._start, nbytes)
            view[:buffered] = self._buffer[self._start:self._start + buffered]
            self._start += buffered
            if buffered < nbytes:
                await self.stream.read_into(view[buffered:])
        if read_only and type(frame) is not bytes:
            frame = bytes(frame)  # not CPython: one copy
        return frame

    async def write(self, msg):
        """Send one message; raise CommClosedError when the peer is gone."""
        written = self.write_nowait(msg)
        try:
            await written
        except StreamClosedError as exc:
            raise CommClosedError(
                f"connection to {self.peer_address} closed") from exc

    def write_nowait(self, msg):
        """Queue one message on the socket; return a future of its writing.

        All of a message's frames are queued in this one call, so that
        messages from different writers never interleave on the wire. The
        header and the small frames go in one write: each write can be a
        packet of its own, and a peer woken by a packet that holds half a
        message only goes back to waiting.
        """
        frames = dumps(msg)
        fields = [_length_field(frame) for frame in frames]
        small = [struct.pack(f"<Q{len(fields)}Q", len(fields), *fields)]
        try:
            for frame, field in zip(frames, fields):
                if field & ~READ_ONLY < SMALL_FRAME:
                    small.append(frame)
                    continue
                self.stream.write(b"".join(small))
                small = []
                written = self.stream.write(frame)
            if small:
                written = self.stream.write(b"".join(small))
        except StreamClosedError as exc:
            raise CommClosedError(
                f"connection to {self.peer_address} closed") from exc
        return written

    def closed(self):
        return self.stream.closed()

    def peer_gone(self):
        """Has the peer hung up? Peeks at the socket, consuming nothing.

        For a handler that waits a long time before it replies, while no
        read is under way that would notice. TLS sockets cannot be peeked
        at: for them the answer is only what tornado already knows.
        """
        if self.stream.closed():
            return True
        try:
            data = self.stream.socket.recv(
                1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, ValueError):
            return False
        except OSError:
            return True
        return data == b""

    def abort(self):
        self.stream.close()

    async def close(self):
        self.stream.close()


# -- within one process ---------------------------------------------------

class LocalComm:
    """One end of a connection between two servers of the same process.

    A client in the process that runs its scheduler (a LocalCluster, the
    usual case in a notebook) talks to it through a pair of these: both
    run on minidask's one event loop, so a message is handed over as the
    object it is, with no pickling and no socket. The receiver owns what
    it gets: a sender never touches a message again (every minidask
    sender builds a fresh one), and the two sides may share immutable
    parts of it (a task's spec, a result's pickle, an exception).
    """

    def __init__(self, local_address, peer_address):
        self.local_address = local_address
        self.peer_address = peer_address
        self.name = None
        self.peer = None
        self._inbox = collections.deque()
        self._waiter = None
        self._closed = False

    @classmethod
    def pair(cls, server_address, client_address):
        """The client's end and the server's end of a new connection."""
        ours = cls(client_address, server_address)
        theirs = cls(server_address, client_address)
        ours.peer, theirs.peer = theirs, ours
        return ours, theirs

    def __repr__(self):
        return f"<LocalComm {self.local_address} -> {self.peer_address}>"

    async def read(self):
        while not self._inbox:
            if self._closed:
                raise CommClosedError(
                    f"connection to {self.peer_address} closed")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._inbox.popleft()

    async def write(self, msg):
        self.write_nowait(msg)

    def write_nowait(self, msg):
        if self._closed:
            raise CommClosedError(f"connection to {self.peer_address} closed")
        self.peer._deliver(msg)
        written = asyncio.get_running_loop().create_future()
        written.set_result(None)
        return written

    def _deliver(self, msg):
        self._inbox.append(msg)
        self._wake()

    def _wake(self):
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._waiter = None

    def closed(self):
        return self._closed

    def peer_gone(self):
        return self._closed

    def abort(self):
        """Close both ends: the peer reads what was sent, then the end."""
        for end in (self, self.peer):
            end._closed = True
            end._wake()

    async def close(self):
        self.abort()


# Listeners of this process by address, for connect(..., local=True).
_local_listeners = weakref.WeakValueDictionary()


def _connect_locally(address, secret):
    listener = _local_listeners.get(address)
    if listener is None or listener.loop is not asyncio.get_running_loop():
        return None
    if not hmac.compare_digest(as_secret_bytes(secret) or b"",
                               listener.secret or b""):
        logger.warning("refused connection from this process: wrong or "
                       "missing cluster secret")
        raise AuthenticationError(_refused_message(address, secret))
    ours, theirs = LocalComm.pair(address, f"local://{os.getpid()}")
    asyncio.ensure_future(listener.comm_handler(theirs))
    return ours


# -- connecting and listening ---------------------------------------------------

def _tls_context(address, security, server_side):
    from minidask.security import Security
    security = security or Security.from_config()
    if not security.tls:
        raise ValueError(
            f"{address} uses TLS but no certificates are configured: set "
            f"comm.tls.ca-file, comm.tls.cert and comm.tls.key, or connect "
            f"through the cluster object")
    return security.context(server_side)


async def connect(address, secret, timeout=None, security=None,
                  local=False):
    """Open a comm to ``address`` and run the handshake.

    Retries while nothing listens there yet (a scheduler may still be
    starting) until ``timeout`` (default: config ``comm.timeouts.connect``),
    then raises ConnectError naming the address. With ``local=True``, a
    server listening there in this process is reached by a LocalComm.
    """
    scheme, host, port = parse_address(address)
    if local:
        comm = _connect_locally(address, secret)
        if comm is not None:
            return comm
    if timeout is None:
        timeout = parse_timedelta(config.get("comm.timeouts.connect"))
    ssl_ctx = (_tls_context(address, security, server_side=False)
               if scheme == "tls" else None)
    deadline = asyncio.get_running_loop().time() + timeout
    delay = 0.01
    while True:
        try:
            left = deadline - asyncio.get_running_loop().time()
            stream = await asyncio.wait_for(
                TCPClient().connect(host, port, ssl_options=ssl_ctx,
                                    max_buffer_size=_stream_buffer_limit()),
                max(left, 0.001))
            break
        except (OSError, StreamClosedError, asyncio.TimeoutError) as exc:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise ConnectError(
                    f"could not connect to {address} after {timeout:g} s: "
                    f"is the scheduler running there?") from exc
            # Back off: retrying at once would spin while a server starts;
            # the last try comes just before the deadline.
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 0.5)
    stream.set_nodelay(True)
    secret = as_secret_bytes(secret)
    try:
        await asyncio.wait_for(_handshake_client(stream, secret, address),
                               timeout)
    except (StreamClosedError, asyncio.TimeoutError) as exc:
        stream.close()
        raise CommClosedError(
            f"{address} closed the connection during the handshake; is it "
            f"a minidask server of the same version, and does it use TLS "
            f"(then its address starts with tls://)?") from exc
    except CommError:
        stream.close()
        raise
    local = _stream_address(stream, scheme, peer=False)
    logger.debug("connected to %s from %s", address, local)
    return Comm(stream, local, address)


def _stream_address(stream, scheme, peer):
    sock = stream.socket
    try:
        name = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return f"{scheme}://unknown"
    return unparse_address(scheme, name[0], name[1])


class Listener(TCPServer):
    """Accept connections, run the handshake, hand each comm on.

    ``handler`` is a coroutine function called with each new Comm. A peer
    that fails the handshake, takes too long over it, or arrives while too
    many others are still shaking hands is dropped with a WARNING and never
    reaches the handler.
    """

    def __init__(self, handler, secret, security=None):
        self.scheme = security.scheme if security else "tcp"
        ssl_ctx = (_tls_context("this server", security, server_side=True)
                   if self.scheme == "tls" else None)
        super().__init__(ssl_options=ssl_ctx,
                         max_buffer_size=_stream_buffer_limit())
        self.comm_handler = handler
        self.secret = as_secret_bytes(secret)
        self.pending = 0
        self.max_pending = int(config.get("comm.max-pending-handshakes"))
        self.handshake_timeout = parse_timedelta(
            config.get("comm.timeouts.handshake"))
        self.address = None
        self.loop = None

    def start_listening(self, host, port):
        sockets = _bind(host, port)
        self.add_sockets(sockets)
        bound_host, bound_port = sockets[0].getsockname()[:2]
        self.address = unparse_address(self.scheme, bound_host, bound_port)
        self.loop = asyncio.get_running_loop()
        _local_listeners[self.address] = self
        return self.address

    def stop(self):
        if _local_listeners.get(self.address) is self:
            del _local_listeners[self.address]
        super().stop()

    async def handle_stream(self, stream, peer):
        peer_address = unparse_address(self.scheme, peer[0], peer[1])
        if self.pending >= self.max_pending:
            logger.warning("refused connection from %s: %d handshakes "
                           "already pending", peer_address, self.pending)
            stream.close()
            return
        self.pending += 1
        try:
            stream.set_nodelay(True)
            ok = await asyncio.wait_for(
                _handshake_server(stream, self.secret),
                self.handshake_timeout)
        except (StreamClosedError, asyncio.TimeoutError, OSError):
            ok = None
        finally:
            self.pending -= 1
        if not ok:
            if ok is False:
                logger.warning("refused connection from %s: wrong or "
                               "missing cluster secret", peer_address)
            else:
                logger.debug("connection from %s dropped during the "
                             "handshake", peer_address)
            stream.close()
            return
        comm = Comm(stream, self.address, peer_address)
        await self.comm_handler(comm)


def _stream_buffer_limit():
    """How much tornado may read into one buffer: the largest frame.

    tornado closes a stream that reads more than this at once (100 MiB by
    default), and a frame is read in one go, straight into its buffer.
    """
    return parse_bytes(config.get("comm.max-frame-size")) + 2**20


def _bind(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno,
                      f"cannot listen on {host}:{port}: {exc.strerror}; "
                      f"pick another port, or 0 for any free one") from exc
    sock.listen(128)
    sock.setblocking(False)
    return [sock]


__all__ = [
    "CommError", "CommClosedError", "ConnectError", "AuthenticationError",
    "ProtocolError", "Comm", "LocalComm", "Listener", "connect",
    "parse_address", "unparse_address", "dumps", "loads", "to_wire",
]
