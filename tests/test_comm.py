"""Comms between two ends on 127.0.0.1: what each kind of frame becomes."""

import asyncio
import os

import numpy
import pytest

from minidask import comm
from minidask.comm import HUGE_FRAME, SMALL_FRAME, to_wire

SECRET = b"comm tests"


def exchange(messages, reply=None):
    """Send ``messages`` one after another to a real listener; return what
    it read, and what ``reply`` (a message) became when sent back."""
    async def main():
        got, done = [], asyncio.get_running_loop().create_future()

        async def handler(peer):
            for _ in messages:
                got.append(await peer.read())
            if reply is not None:
                await peer.write(reply)
            done.set_result(None)

        listener = comm.Listener(handler, SECRET)
        address = listener.start_listening("127.0.0.1", 0)
        ours = await comm.connect(address, SECRET, timeout=10)
        try:
            for msg in messages:
                ours.write_nowait(msg)  # queued back to back, not awaited
            answer = await ours.read() if reply is not None else None
            await asyncio.wait_for(done, 10)
        finally:
            ours.abort()
            listener.stop()
        return got, answer

    return asyncio.run(main())


def test_many_small_messages_sent_at_once_arrive_one_by_one():
    messages = [{"op": "ping", "n": i, "pad": "x" * (i * 37)}
                for i in range(300)]
    got, _ = exchange(messages)
    assert got == messages


@pytest.mark.parametrize("nbytes", [
    SMALL_FRAME - 1, SMALL_FRAME + 1, HUGE_FRAME - 1, HUGE_FRAME + 3])
def test_large_bytes_arrive_as_bytes_around_each_size_limit(nbytes):
    value = os.urandom(nbytes)
    got, _ = exchange([{"value": to_wire(value)}, {"after": 1}])
    assert type(got[0]["value"]) is bytes
    assert got[0]["value"] == value
    assert got[1] == {"after": 1}  # the stream is still in step


@pytest.mark.parametrize("nbytes", [1000, SMALL_FRAME + 1, HUGE_FRAME + 5])
def test_numpy_arrays_arrive_equal_and_writable(nbytes):
    value = numpy.frombuffer(os.urandom(nbytes), dtype=numpy.uint8).copy()
    got, _ = exchange([{"value": value}])
    received = got[0]["value"]
    assert numpy.array_equal(received, value)
    assert received.flags.writeable
    received[0] = 7  # and the memory is really its own
    assert received[0] == 7


def test_a_read_only_array_arrives_read_only():
    value = numpy.arange(HUGE_FRAME // 8, dtype=numpy.int64)
    value.flags.writeable = False
    got, _ = exchange([{"value": value}])
    assert numpy.array_equal(got[0]["value"], value)
    assert not got[0]["value"].flags.writeable


def test_a_large_in_band_pickle_and_a_long_header():
    big_text = "y" * (3 * SMALL_FRAME)  # in the pickle itself, frame 1
    arrays = [numpy.full(10, i) for i in range(20_000)]  # 20,001 frames
    got, answer = exchange([{"text": big_text}, {"arrays": arrays}],
                           reply={"text": big_text})
    assert got[0]["text"] == big_text and answer["text"] == big_text
    assert all(numpy.array_equal(a, b) for a, b in zip(got[1]["arrays"],
                                                        arrays))


def test_new_buffer_gives_bytes_or_writable_memory():
    frame, view = comm.new_buffer(HUGE_FRAME, read_only=True)
    with view:
        view[:4] = b"abcd"
        view[-1:] = b"z"
    assert type(frame) is bytes and frame[:4] == b"abcd" and frame[-1:] == b"z"
    frame, view = comm.new_buffer(HUGE_FRAME, read_only=False)
    with view:
        view[:2] = b"ok"
    assert memoryview(frame)[:2] == b"ok"
    assert not memoryview(frame).readonly


def test_a_client_in_the_schedulers_process_talks_to_it_directly(cluster):
    from minidask import Client
    with Client(cluster) as client:
        assert isinstance(client._stream.comm, comm.LocalComm)
        assert client.submit(sum, [1, 2]).result(timeout=10) == 3


def test_a_local_connection_with_a_wrong_secret_is_refused(cluster):
    from minidask.loop import sync
    with pytest.raises(comm.AuthenticationError,
                       match="wrong cluster secret"):
        sync(comm.connect(cluster.scheduler_address, "not the secret",
                          timeout=5, local=True))


def test_two_local_clients_each_get_the_workers_traceback_once(cluster):
    from minidask import Client

    def fail(x):
        raise ValueError(f"bad {x}")

    with Client(cluster) as one, Client(cluster) as two:
        errors = []
        for client in (one, two):  # the same key: one task, two clients
            with pytest.raises(ValueError) as info:
                client.submit(fail, 1, key="fail-shared").result(timeout=10)
            errors.append(info.value)
    for exc in errors:
        notes = [n for n in getattr(exc, "__notes__", [])
                 if "Traceback on the worker" in n]
        assert len(notes) == 1


def test_closing_one_end_of_a_local_connection_ends_both():
    async def main():
        ours, theirs = comm.LocalComm.pair("tcp://127.0.0.1:1",
                                           "local://client")
        ours.write_nowait({"op": "last"})
        ours.abort()
        assert await theirs.read() == {"op": "last"}  # sent before the end
        with pytest.raises(comm.CommClosedError):
            await theirs.read()
        with pytest.raises(comm.CommClosedError):
            theirs.write_nowait({"op": "too late"})
        assert ours.peer_gone() and theirs.peer_gone()

    asyncio.run(main())


def test_queued_batches_leave_together_when_flushed_before_the_turn_ends():
    from minidask.core import BatchedSend, flush_queued

    async def main():
        ours, theirs = comm.LocalComm.pair("tcp://127.0.0.1:1",
                                           "local://client")
        stream = BatchedSend(ours)
        stream.send({"op": "a"})
        stream.send({"op": "b"})
        assert not theirs._inbox  # nothing has left in this turn yet
        flush_queued()
        assert list(theirs._inbox) == [[{"op": "a"}, {"op": "b"}]]
        stream.send({"op": "c"})  # the next one waits for the turn's end
        await asyncio.sleep(0)
        assert list(theirs._inbox)[-1] == [{"op": "c"}]
        await stream.flush()

    asyncio.run(main())
