"""Bad input and strangers: each gets a clear error, nobody else suffers."""

import asyncio
import logging
import os
import socket
import struct

import pytest

import minidask
from minidask import AuthenticationError, Client, LocalCluster, config
from minidask.comm import ConnectError, connect, parse_address
from minidask.loop import sync
from helpers import free_port


def inc(x):
    return x + 1


def test_address_must_be_tcp_host_port():
    for bad in ["localhost:8786", "tcp://host", "http://h:1", "tcp://:80", 5]:
        with pytest.raises(ValueError, match="tcp://host:port"):
            parse_address(bad)
    assert parse_address("tcp://[::1]:8786") == ("tcp", "::1", 8786)


def test_nothing_listening_is_an_oserror_naming_the_address():
    address = f"tcp://127.0.0.1:{free_port()}"
    with config.set({"comm.timeouts.connect": "0.3s"}):
        with pytest.raises(OSError, match=f"{address} after 0.3 s: is the "
                                          f"scheduler running"):
            Client(address)


def test_unknown_keywords_are_type_errors():
    with pytest.raises(TypeError, match="nthread"):
        LocalCluster(n_workers=1, nthread=2)
    with pytest.raises(TypeError, match="memory"):
        minidask.Worker("tcp://127.0.0.1:1", memory=5)


def _raw_send(address, payload):
    _, host, port = parse_address(address)
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(payload)
        sock.settimeout(5)
        try:
            return sock.recv(1 << 16)
        except (ConnectionError, socket.timeout):
            return b""


def test_wrong_secret_is_refused_with_a_warning(cluster, caplog):
    async def attempt():
        return await connect(cluster.scheduler_address, "not the secret",
                             timeout=5)

    logging.getLogger("minidask").addHandler(caplog.handler)
    try:
        with pytest.raises(AuthenticationError, match="wrong cluster secret"):
            sync(attempt())
        with pytest.raises(AuthenticationError, match="no cluster secret"):
            sync(connect(cluster.scheduler_address, None, timeout=5))
    finally:
        logging.getLogger("minidask").removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING]
    assert any("wrong or missing cluster secret" in w for w in warnings)


def test_a_stranger_gets_only_a_refusal(cluster):
    reply = _raw_send(cluster.scheduler_address, os.urandom(300))
    # the greeting (magic and nonce) then one refusal byte, nothing pickled
    assert reply.startswith(b"minidask/1\n")
    assert reply[len(b"minidask/1\n") + 32:] in (b"-", b"")


def test_garbage_and_oversized_frames_leave_the_scheduler_serving(cluster):
    for payload in [b"", b"\x00" * 10, os.urandom(4096),
                    struct.pack("<Q", 2**63) + os.urandom(64)]:
        _raw_send(cluster.scheduler_address, payload)
    with Client(cluster) as client:
        assert client.submit(inc, 1).result(timeout=10) == 2


def test_oversized_frame_after_handshake_closes_only_that_comm(cluster):
    async def oversized():
        comm = await connect(cluster.scheduler_address, cluster.secret)
        header = struct.pack("<QQ", 1, 2**40)
        await comm.stream.write(header)
        with pytest.raises(minidask.CommClosedError):
            await comm.read()

    with config.set({"comm.max-frame-size": "1 MiB"}):
        sync(oversized())
    with Client(cluster) as client:
        assert client.submit(inc, 2).result(timeout=10) == 3


def test_unknown_op_and_wrong_types_get_error_replies(cluster):
    async def talk():
        comm = await connect(cluster.scheduler_address, cluster.secret)
        await comm.write({"op": "no-such-op"})
        unknown = await comm.read()
        await comm.write({"op": "who-has", "keys": 12})
        wrong = await comm.read()
        await comm.write(["not", "a", "dict"])
        shape = await comm.read()
        await comm.write({"op": "identity"})
        fine = await comm.read()
        comm.abort()
        return unknown, wrong, shape, fine

    unknown, wrong, shape, fine = sync(talk())
    assert unknown["status"] == "error"
    assert "no handler for op 'no-such-op'" in str(unknown["exception"])
    assert wrong["status"] == "error" and shape["status"] == "error"
    assert fine["result"]["address"] == cluster.scheduler_address


def test_servers_listen_on_loopback_by_default(cluster):
    assert parse_address(cluster.scheduler_address)[1] == "127.0.0.1"
    with Client(cluster) as client:
        for address in client.scheduler_info()["workers"]:
            assert parse_address(address)[1] == "127.0.0.1"


def test_secret_file_is_private(cluster):
    from minidask.core import secret_file_for
    path = secret_file_for(cluster.scheduler_address)
    assert path.read_text().strip() == cluster.secret
    assert (path.stat().st_mode & 0o077) == 0
    assert (path.parent.stat().st_mode & 0o077) == 0


def test_secret_is_not_on_any_command_line(cluster):
    import psutil
    for proc in psutil.Process().children(recursive=True):
        assert cluster.secret not in " ".join(proc.cmdline())


def test_a_function_that_does_not_pickle_is_named(client):
    import threading
    lock = threading.Lock()
    with pytest.raises(TypeError, match="cannot send lock"):
        client.submit(lambda l: l, lock)
