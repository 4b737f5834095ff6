"""Fuzzing: malformed input must not crash, wedge or bloat a cluster.

Each fuzz run starts a real LocalCluster (a scheduler and two worker
processes under nannies) and aims a seeded, bounded stream of bad input at
its scheduler, worker and nanny ports, while a real client keeps
submitting work and checking every answer. The input comes in layers:

``wire``
    strangers: random bytes, wrong proofs, truncated handshakes, pickles
    sent before the handshake, and a flood of connections that never
    finish it; then peers that know the secret but send broken framing:
    truncated or oversized length prefixes, huge frame counts, frames
    that do not unpickle.
``requests``
    well-framed messages that make no sense: unknown ops, known ops with
    wrong, missing or extra arguments, messages that are not dicts.
``streams``
    the stream ops ``register-worker`` and ``register-client``, with odd
    arguments, followed by batches of junk.

Afterwards every server must still be the process it was (a worker that
restarted crashed), the cluster's processes must not have grown beyond a
bound, every answer the client got must have been right, and the
scheduler must have forgotten every fuzzing peer.

Ops whose job is to stop or change the cluster (``close``, ``restart``,
``retire-workers``) are left out, and the fuzzer never sends a callable:
a peer that knows the secret may do those things by design. The real
client pins its tasks to the real workers, because a fake worker that
registers and vanishes is a worker dying, which the chaos tests cover;
here it would only make the client's tasks wait for nothing.

Each input is made from a seed of its own, drawn in turn from the run's
seed (printed with the figures): ``input_seed(seed, n)`` gives input
``n``'s, which ``Fuzzer.send_one`` turns into that same input again.
``-s`` shows the figures.
"""

import asyncio
import collections
import ctypes
import gc
import json
import os
import pickle
import random
import socket
import struct
import threading
import time

import psutil
import pytest

from minidask import Client, LocalCluster, config
from minidask.comm import MAGIC, MAX_FRAMES, NONCE_BYTES, _proof
from minidask.comm import AuthenticationError, CommError, connect
from minidask.comm import parse_address
from minidask.loop import sync
from helpers import wait_until

SEED = 20_240_601
MiB = 2**20
RSS_BOUND = 50 * MiB  # growth allowed per worker process over one fuzz run
# This test's own process holds the scheduler and nannies, but also the
# fuzzer, which builds messages of up to a million frames, and the checking
# client: its RSS swings with them, and with how much of the freed memory
# the C allocator keeps. The soak test is the one that shows the scheduler
# flat over minutes; here the bound only catches a gross leak.
OWN_PROCESS_RSS_BOUND = 150 * MiB


def inc(x):
    return x + 1


def total(values):
    return sum(values)


# -- what the fuzzer sends ------------------------------------------------

ODD_VALUES = [
    None, True, 0, -1, 1, 2**70, 1.5, float("nan"), "", "x", "fuzz-key",
    "tcp://127.0.0.1:1", b"", b"\x00\xff", [], [1, "a"], ["fuzz-key"], {},
    {"a": 1}, {"fuzz-key": [1]}, ("t",), {1, 2}, [[[]]], "y" * 10_000,
    {"fuzz-key": {"workers": 5}},
]

# Request ops a peer may send each kind of server, with their arguments.
REQUEST_OPS = {
    "scheduler": {
        "identity": [], "get-logs": ["n"], "who-has": ["keys"],
        "scheduler-info": [], "update-data": ["client", "data"],
        "worker-logs": ["n", "workers"], "task-states": ["keys"],
        "broadcast-run": ["function", "args", "kwargs", "workers"],
        "run-on-scheduler": ["function", "args", "kwargs"],
        "wait-for-workers": ["n", "timeout"],
        "worker-exceeded-memory": ["worker", "memory", "limit"],
    },
    "worker": {
        "identity": [], "get-logs": ["n"], "get-data": ["keys"],
        "put-data": ["data"], "gather-from": ["who_has"],
        "run": ["function", "args", "kwargs"],
    },
    "nanny": {
        "identity": [], "get-logs": ["n"],
        "worker-started": ["address", "pid"],
    },
}

# Messages a worker or a client sends on its stream to the scheduler.
STREAM_OPS = {
    "worker": {
        "task-started": ["key"],
        "task-finished": ["key", "nbytes", "type", "start", "stop",
                          "thread", "value"],
        "task-erred": ["key", "exception", "traceback", "start", "stop",
                       "thread"],
        "missing-data": ["key", "dep", "holders"],
        "add-keys": ["keys"], "heartbeat": ["metrics"],
    },
    "client": {
        "update-graph": ["tasks", "keys"],
        "client-desires-keys": ["keys"], "client-releases-keys": ["keys"],
        "cancel-keys": ["keys", "force"], "heartbeat-client": [],
    },
}

TASK_FIELDS = ["spec", "deps", "group", "priority", "retries", "workers"]


class Evil:
    """A pickle that creates a file when it is unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def framed(*frames):
    """Frames as minidask writes them: count, lengths, then the frames."""
    header = struct.pack(f"<Q{len(frames)}Q", len(frames),
                         *(len(f) for f in frames))
    return header + b"".join(frames)


def odd(rng):
    return rng.choice(ODD_VALUES)


def odd_kwargs(rng, params):
    """Arguments for ``params``: some missing, some odd, some extra."""
    kwargs = {p: odd(rng) for p in params if rng.random() < 0.8}
    if rng.random() < 0.3:
        kwargs[rng.choice(["extra", "keyz", "op2", "comm"])] = odd(rng)
    return kwargs


def odd_task(rng):
    """A task for update-graph, each field plausible or odd."""
    plausible = {"spec": b"not a spec", "deps": [], "group": "fuzz",
                 "priority": (0,), "retries": 0, "workers": None}
    task = {}
    for field in TASK_FIELDS:
        roll = rng.random()
        if roll < 0.6:
            task[field] = plausible[field]
        elif roll < 0.9:
            task[field] = odd(rng)
    return task


def junk_batch(rng, role, n):
    """A batch for a ``role`` stream: junk, or messages with odd fields."""
    roll = rng.random()
    if roll < 0.1:
        return odd(rng)
    if roll < 0.2:
        return [odd(rng) for _ in range(rng.randint(1, 3))]
    batch = []
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.15:
            batch.append({"op": rng.choice(["no-such-op", 5, None])})
            continue
        op, params = rng.choice(sorted(STREAM_OPS[role].items()))
        msg = {"op": op, **odd_kwargs(rng, params)}
        if op == "update-graph" and rng.random() < 0.7:
            key = f"fuzz-{n}-{len(batch)}"
            msg["tasks"] = {key: odd_task(rng)}
            msg["keys"] = [key]
        batch.append(msg)
    return batch


# -- one input ----------------------------------------------------------------

async def _raw(address):
    _, host, port = parse_address(address)
    return await asyncio.open_connection(host, port)


async def _read_to_end(reader, wait):
    """What the server says until it closes or goes quiet for ``wait`` s."""
    data = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(1 << 16), wait)
            if not chunk:
                return data, "closed"
            data += chunk
    except asyncio.TimeoutError:
        return data, "quiet"
    except OSError:
        return data, "reset"


def _refused(data, end):
    greeting = len(MAGIC) + NONCE_BYTES
    if data[greeting:greeting + 1] == b"-":
        return "refused"
    return "dropped" if end != "quiet" else "silent"


async def _ask(comm, msg, wait=1.0):
    """Send one request; sort the reply, or the lack of one."""
    try:
        await comm.write(msg)
        reply = await asyncio.wait_for(comm.read(), wait)
    except asyncio.TimeoutError:
        return "silent"
    except CommError:
        return "dropped"
    if isinstance(reply, dict) and reply.get("status") == "error":
        return "error-reply"
    return "reply"


async def _drain(comm, wait=0.5):
    """Read until the server drops us or stops talking."""
    try:
        while True:
            await asyncio.wait_for(comm.read(), wait)
    except asyncio.TimeoutError:
        return "silent"
    except CommError:
        return "dropped"


class Fuzzer:
    """Send bounded, seeded bad input to a cluster; tally what happened."""

    def __init__(self, cluster, targets, layer, evil_path):
        self.secret = cluster.secret
        self.targets = targets  # [(role, address)]
        self.layer = layer
        self.evil_path = evil_path
        self.kinds = collections.Counter()
        self.outcomes = collections.Counter()
        self.flood = None

    async def run(self, count, seconds, seed, concurrency=8):
        """Send up to ``count`` inputs within about ``seconds``."""
        master = random.Random(seed)
        deadline = time.monotonic() + seconds
        gate = asyncio.Semaphore(concurrency)  # inputs under way at once
        tasks = []

        async def one(n, input_seed):
            try:
                await self.send_one(n, input_seed)
            finally:
                gate.release()

        for n in range(count):
            input_seed = master.getrandbits(32)  # as input_seed() does
            await gate.acquire()
            if time.monotonic() >= deadline:
                gate.release()
                break
            tasks.append(asyncio.ensure_future(one(n, input_seed)))
            if self.layer == "wire" and n == count // 2:
                await asyncio.gather(*tasks)
                self.flood = await flood(self.targets[0][1])
        await asyncio.gather(*tasks)
        return len(tasks)

    async def send_one(self, n, input_seed):
        rng = random.Random(input_seed)
        role, address = rng.choice(self.targets)
        kinds = LAYERS[self.layer]
        if self.layer == "streams":
            role, address = self.targets[0]  # streams go to the scheduler
        kind = rng.choice(kinds)
        self.kinds[kind] += 1
        try:
            outcome = await asyncio.wait_for(
                kind(self, rng, role, address, n), 10)
        except asyncio.TimeoutError:
            outcome = "fuzzer-timeout"
        except (OSError, CommError) as exc:
            outcome = f"connect-failed {type(exc).__name__}"
        self.outcomes[outcome] += 1

    # -- wire: strangers ------------------------------------------------------

    async def raw_bytes(self, rng, role, address, n):
        reader, writer = await _raw(address)
        size = rng.choice([0, 1, 10, 74, 75, 76, 300, 4096,
                           rng.randint(0, 20_000)])
        writer.write(rng.randbytes(size))
        data, end = await _read_to_end(reader, 0.3)
        writer.close()
        return _refused(data, end)

    async def bad_proof(self, rng, role, address, n):
        reader, writer = await _raw(address)
        greeting = await reader.readexactly(len(MAGIC) + NONCE_BYTES)
        nonce, own = greeting[len(MAGIC):], rng.randbytes(NONCE_BYTES)
        secret = self.secret.encode()
        magic, proof = rng.choice([
            (MAGIC, rng.randbytes(32)),
            (MAGIC, bytes(32)),
            (MAGIC, _proof(secret, b"server", nonce, own)),
            (MAGIC, _proof(b"not the secret", b"client", nonce, own)),
            (b"minidask/0\n", _proof(secret, b"client", nonce, own)),
        ])
        writer.write(magic + own + proof)
        data, end = await _read_to_end(reader, 1.0)
        writer.close()
        return "refused" if data[:1] == b"-" else "not-refused"

    async def truncated_handshake(self, rng, role, address, n):
        reader, writer = await _raw(address)
        await reader.readexactly(len(MAGIC) + NONCE_BYTES)
        reply = MAGIC + rng.randbytes(NONCE_BYTES + 32)
        writer.write(reply[:rng.randint(0, len(reply) - 1)])
        writer.close()
        return "closed"

    async def pickle_first(self, rng, role, address, n):
        """A pickle that would create a file, sent before the handshake."""
        evil = framed(pickle.dumps(Evil(self.evil_path)))
        reader, writer = await _raw(address)
        if rng.random() < 0.5:
            writer.write(evil)  # in place of the handshake
        else:  # after a handshake reply with a made-up proof
            await reader.readexactly(len(MAGIC) + NONCE_BYTES)
            writer.write(MAGIC + rng.randbytes(NONCE_BYTES + 32) + evil)
        data, end = await _read_to_end(reader, 1.0)
        writer.close()
        return _refused(data, end) if data else end

    # -- wire: broken framing from a peer that knows the secret ---------------

    async def _comm(self, address):
        return await connect(address, self.secret, timeout=5)

    async def truncated_prefix(self, rng, role, address, n):
        comm = await self._comm(address)
        count = rng.randint(1, 5)
        whole = struct.pack(f"<Q{count}Q", count,
                            *(rng.randint(0, 100) for _ in range(count)))
        await comm.stream.write(whole[:rng.randint(0, len(whole) - 1)])
        comm.abort()
        return "closed"

    async def bad_count(self, rng, role, address, n):
        comm = await self._comm(address)
        count = rng.choice([0, MAX_FRAMES + 1, 2**63, 2**64 - 1])
        await comm.stream.write(struct.pack("<Q", count))
        outcome = await _drain(comm)
        comm.abort()
        return outcome

    async def oversized_frame(self, rng, role, address, n):
        comm = await self._comm(address)
        lengths = [rng.randint(0, 10) for _ in range(rng.randint(1, 3))]
        lengths[rng.randrange(len(lengths))] = rng.choice(
            [2**32 + 1, 2**40, 2**63, 2**64 - 1])
        await comm.stream.write(struct.pack(
            f"<Q{len(lengths)}Q", len(lengths), *lengths))
        outcome = await _drain(comm)
        comm.abort()
        return outcome

    async def huge_count(self, rng, role, address, n):
        comm = await self._comm(address)
        count = rng.choice([1_000, 10_000, 100_000, MAX_FRAMES])
        await comm.stream.write(struct.pack(f"<Q{count}Q", count,
                                            *([0] * count)))
        outcome = await _drain(comm, wait=5)
        comm.abort()
        return outcome

    async def not_pickle(self, rng, role, address, n):
        comm = await self._comm(address)
        good = pickle.dumps({"op": "identity"}, protocol=5)
        frame = rng.choice([
            rng.randbytes(rng.randint(1, 500)),
            good[:rng.randint(1, len(good) - 1)],
            b"\x80\x05cno_such_module\nNoSuchThing\n.",
            b"",
        ])
        await comm.stream.write(framed(frame))
        outcome = await _drain(comm)
        comm.abort()
        return outcome

    # -- requests: well framed, meaningless -----------------------------------

    async def requests(self, rng, role, address, n):
        comm = await self._comm(address)
        outcome = None
        for _ in range(rng.randint(1, 5)):
            roll = rng.random()
            if roll < 0.15:
                msg = odd(rng)
            elif roll < 0.3:
                msg = {"op": rng.choice(["no-such-op", "", 7, None, b"x"]),
                       **odd_kwargs(rng, ["keys"])}
            else:
                op, params = rng.choice(sorted(REQUEST_OPS[role].items()))
                msg = {"op": op, **odd_kwargs(rng, params)}
            outcome = await _ask(comm, msg)
            if outcome in ("dropped", "silent"):
                break  # a read may still be under way: use a new comm
        comm.abort()
        return outcome

    # -- streams: register, then junk -----------------------------------------

    async def fake_worker(self, rng, role, address, n):
        comm = await self._comm(address)
        msg = {"op": "register-worker",
               "address": rng.choice([f"tcp://127.0.0.1:{_closed_port()}",
                                      odd(rng)]),
               "name": rng.choice([f"fuzz-worker-{n}", odd(rng)]),
               "nthreads": rng.choice([1, 1, 2, 0, -1, "2", None, 1.5])}
        if rng.random() < 0.3:
            msg.update(odd_kwargs(rng, ["memory_limit", "nanny", "keys"]))
        return await self._stream(comm, msg, "worker", rng, n)

    async def fake_client(self, rng, role, address, n):
        comm = await self._comm(address)
        msg = {"op": "register-client",
               "client": rng.choice([f"fuzz-client-{n}", odd(rng)])}
        return await self._stream(comm, msg, "client", rng, n)

    async def _stream(self, comm, register, role, rng, n):
        outcome = await _ask(comm, register)
        for _ in range(rng.randint(0, 4) if outcome == "reply" else 0):
            try:
                await comm.write(junk_batch(rng, role, n))
            except CommError:
                outcome = "dropped"
                break
            await asyncio.sleep(0.01)
        comm.abort()
        return outcome


def input_seed(run_seed, n):
    """The seed of input ``n`` of the run seeded with ``run_seed``."""
    master = random.Random(run_seed)
    for _ in range(n):
        master.getrandbits(32)
    return master.getrandbits(32)


LAYERS = {
    "wire": [Fuzzer.raw_bytes, Fuzzer.bad_proof, Fuzzer.truncated_handshake,
             Fuzzer.pickle_first, Fuzzer.truncated_prefix, Fuzzer.bad_count,
             Fuzzer.oversized_frame, Fuzzer.not_pickle] * 20
    + [Fuzzer.huge_count],
    "requests": [Fuzzer.requests],
    "streams": [Fuzzer.fake_worker, Fuzzer.fake_client],
}


def _closed_port():
    """A port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def flood(address, extra=36):
    """Open more connections than may shake hands at once; never answer.

    Returns how many were opened and how many the server closed at once
    without a greeting (refused).
    """
    opened = int(config.get("comm.max-pending-handshakes")) + extra
    conns = [await _raw(address) for _ in range(opened)]
    refused = 0
    for reader, _ in conns:
        try:
            first = await asyncio.wait_for(reader.read(1), 2)
        except asyncio.TimeoutError:
            first = None
        refused += first == b""
    for _, writer in conns:
        writer.close()
    return {"opened": opened, "refused": refused}


# -- the real client, meanwhile -----------------------------------------------

class Checker(threading.Thread):
    """Submit small graphs and check each answer until told to stop."""

    def __init__(self, client, workers, seed):
        super().__init__(daemon=True)
        self.client, self.workers = client, workers
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.rounds = self.checked = 0
        self.errors = []

    def run(self):
        while not self.stop.is_set() and self.check():
            pass

    def check(self):
        """Check one graph; keep a failure for the test to report."""
        try:
            self.check_once()
            return True
        except Exception as exc:
            self.errors.append(repr(exc))
            return False

    def check_once(self, timeout=20):
        xs = self.rng.sample(range(10_000), 20)
        futures = self.client.map(inc, xs, pure=False, workers=self.workers)
        answer = self.client.submit(total, futures, pure=False,
                                    workers=self.workers)
        assert answer.result(timeout=timeout) == sum(xs) + len(xs)
        assert self.client.gather(futures) == [x + 1 for x in xs]
        self.rounds += 1
        self.checked += len(xs) + 1


# -- looking at the cluster ---------------------------------------------------

def _nannies(cluster):
    return [h.server for h in cluster.workers.values()]


def snapshot(cluster):
    """Who the servers are and how much memory their processes use."""
    scheduler = cluster.scheduler
    nannies = _nannies(cluster)
    pids = [n.process.pid for n in nannies]
    return {
        "scheduler": scheduler.id,
        "nannies": [n.id for n in nannies],
        "worker_pids": pids,
        "rss": {"cluster": _rss(os.getpid()),
                "cluster trimmed": _trimmed_rss(),
                **{f"worker {pid}": _rss(pid) for pid in pids}},
    }


def _rss(pid):
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def _trimmed_rss():
    """This process's RSS once C's allocator has handed back its cache.

    After a message of a million frames, glibc keeps the freed memory for
    reuse: RSS stays up although Python's objects are gone. Both figures
    are kept; a leak would raise both.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the figure is the plain RSS
    return _rss(os.getpid())


def known_peers(client):
    def peers(dask_scheduler):
        return (sorted(dask_scheduler.workers, key=str),
                sorted(dask_scheduler.clients, key=str))
    return client.run_on_scheduler(peers)


def fuzz_run(layer, count, seconds, tmp_path, seed=SEED):
    """Fuzz one layer of a fresh cluster; check it; print the figures."""
    evil_path = tmp_path / "created-by-unpickling"
    with LocalCluster(n_workers=2, threads_per_worker=1,
                      dashboard_address=None) as cluster, \
            Client(cluster) as client:
        workers = client.scheduler_info()["workers"]
        real = sorted(workers)
        targets = [("scheduler", cluster.scheduler_address)]
        targets += [("worker", a) for a in real]
        targets += [("nanny", workers[a]["nanny"]) for a in real]

        checker = Checker(client, real, seed)
        checker.check_once()  # warm up before measuring memory
        gc.collect()
        before = snapshot(cluster)
        checker.start()

        fuzzer = Fuzzer(cluster, targets, layer, evil_path)
        began = time.monotonic()
        sent = asyncio.run(fuzzer.run(count, seconds, seed))
        fuzz_seconds = time.monotonic() - began

        checker.stop.set()
        checker.join(60)
        checker.check()  # and once more, after the fuzzing
        time.sleep(0.5)
        gc.collect()
        after = snapshot(cluster)
        peers = known_peers(client)
        logs = cluster.get_logs()

        figures = {
            "layer": layer, "seed": seed, "inputs": sent,
            "seconds": round(fuzz_seconds, 1), "kinds": {
                k.__name__: v for k, v in sorted(
                    fuzzer.kinds.items(), key=lambda kv: kv[0].__name__)},
            "outcomes": dict(sorted(fuzzer.outcomes.items())),
            "client_rounds": checker.rounds,
            "results_checked": checker.checked,
            "client_errors": checker.errors,
            "flood": fuzzer.flood,
            "rss_mib": {k: [_mib(before["rss"][k]), _mib(after["rss"].get(k))]
                        for k in before["rss"]},
            "peers_after": peers,
        }
        report(f"fuzz-{layer}", figures, tmp_path)

        assert not checker.errors, checker.errors
        assert after["scheduler"] == before["scheduler"]
        assert after["nannies"] == before["nannies"]
        assert after["worker_pids"] == before["worker_pids"], \
            "a worker process was restarted: it crashed"
        assert all(psutil.pid_exists(p) for p in after["worker_pids"])
        assert cluster.scheduler.status == "running"
        assert all(n.status == "running" for n in _nannies(cluster))
        for name, start in before["rss"].items():
            grown = after["rss"][name] - start
            bound = (OWN_PROCESS_RSS_BOUND if name.startswith("cluster")
                     else RSS_BOUND)
            assert grown < bound, f"{name} grew by {_mib(grown)} MiB"
        assert not evil_path.exists(), "a pickle was loaded before the " \
                                       "handshake"
        assert cluster.secret not in "\n".join(logs.values())
        wait_until(lambda: known_peers(client) == (real, [client.id]),
                   timeout=10, message=f"the scheduler still knows fuzzing "
                                       f"peers: {known_peers(client)}")
        if layer == "wire":
            assert figures["flood"]["refused"] >= 36
            assert "handshakes already pending" in "\n".join(logs.values())
        return figures


def _mib(n):
    return None if n is None else round(n / MiB, 1)


def report(name, figures, tmp_path):
    """Print the figures, and keep them as JSON beside the test's files."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(figures, indent=1, default=str))
    print(f"\n{name}: {json.dumps(figures, default=str)}\n({path})")


# -- the runs -----------------------------------------------------------------

@pytest.mark.parametrize("layer", ["wire", "requests", "streams"])
def test_fuzz_short(layer, tmp_path):
    fuzz_run(layer, count=400, seconds=4, tmp_path=tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layer", ["wire", "requests", "streams"])
def test_fuzz_long(layer, tmp_path):
    fuzz_run(layer, count=7_000, seconds=120, tmp_path=tmp_path,
             seed=SEED + 1)


# -- pickles before the handshake ---------------------------------------------

def _addresses(cluster):
    with Client(cluster) as client:
        workers = client.scheduler_info()["workers"]
    return ([cluster.scheduler_address] + sorted(workers)
            + [info["nanny"] for info in workers.values()])


def test_no_pickle_is_loaded_before_the_handshake(cluster, tmp_path):
    target = tmp_path / "created-by-unpickling"
    evil = framed(pickle.dumps(Evil(target)))

    async def send(address, after_greeting):
        reader, writer = await _raw(address)
        if after_greeting:  # a handshake reply with a made-up proof first
            await reader.readexactly(len(MAGIC) + NONCE_BYTES)
            writer.write(MAGIC + os.urandom(NONCE_BYTES + 32))
        writer.write(evil)
        data, _ = await _read_to_end(reader, 2)
        writer.close()
        return data

    for address in _addresses(cluster):
        assert sync(send(address, False)).startswith(MAGIC)
        assert sync(send(address, True)) == b"-"
    time.sleep(0.5)
    assert not target.exists()

    control = tmp_path / "control"  # the same pickle does work when loaded
    pickle.loads(pickle.dumps(Evil(control)))
    assert control.exists()


def test_a_client_loads_nothing_from_a_server_without_the_secret(tmp_path):
    target = tmp_path / "created-by-unpickling"

    async def impostor(reader, writer):
        writer.write(MAGIC + os.urandom(NONCE_BYTES))
        await reader.readexactly(len(MAGIC) + NONCE_BYTES + 32)
        writer.write(b"+" + os.urandom(32)  # accept, with a made-up proof
                     + framed(pickle.dumps(Evil(target))))
        await writer.drain()
        await asyncio.sleep(2)
        writer.close()

    async def attempt():
        server = await asyncio.start_server(impostor, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(AuthenticationError,
                               match="does not know this cluster's secret"):
                await connect(f"tcp://127.0.0.1:{port}", "secret", timeout=5)
        finally:
            server.close()

    asyncio.run(attempt())
    assert not target.exists()


def test_refusals_are_warnings_in_the_scheduler_log(cluster):
    sync(flood(cluster.scheduler_address))
    with pytest.raises(AuthenticationError):
        sync(connect(cluster.scheduler_address, "not the secret", timeout=5))
    with Client(cluster) as client:
        lines = [line for level, line in client.get_scheduler_logs()
                 if level == "WARNING"]
    assert any("handshakes already pending" in line for line in lines)
    assert any("wrong or missing cluster secret" in line for line in lines)


def test_the_secret_is_in_no_log_and_on_no_command_line(capfd):
    with LocalCluster(n_workers=1, threads_per_worker=1, silence_logs=False,
                      dashboard_address=None) as cluster, \
            Client(cluster) as client:
        assert client.submit(inc, 1).result(timeout=30) == 2
        with pytest.raises(AuthenticationError):
            sync(connect(cluster.scheduler_address, "not the secret"))
        sync(flood(cluster.scheduler_address))
        commands = [" ".join(p.cmdline()) for p in
                    psutil.Process().children(recursive=True)]
        logs = cluster.get_logs()
        secret = cluster.secret
    out, err = capfd.readouterr()  # this process's and the workers' output
    assert commands and "INFO" in err
    for text in [out, err, *logs.values(), *commands]:
        assert secret not in text


# -- what the fuzzer found, one reproduction each -----------------------------
#
# Each test below is the smallest input from a fuzz run that broke the
# cluster for someone other than the peer that sent it.

def _small_cluster():
    return LocalCluster(n_workers=1, threads_per_worker=1,
                        dashboard_address=None)


def _peer(cluster, register):
    """A comm to the scheduler that has sent ``register`` and its reply."""
    comm = sync(connect(cluster.scheduler_address, cluster.secret))
    sync(comm.write(register))
    return comm, sync(comm.read())


def _fake_worker(**fields):
    return {"op": "register-worker", "name": "fake",
            "address": f"tcp://127.0.0.1:{_closed_port()}", "nthreads": 1,
            **fields}


def test_junk_on_a_client_stream_drops_that_client():
    with _small_cluster() as cluster, Client(cluster) as client:
        comm, reply = _peer(cluster, {"op": "register-client",
                                      "client": "fake-client"})
        assert reply["status"] == "OK"
        sync(comm.write([{"op": "no-such-op"}]))
        time.sleep(0.2)
        sync(comm.close())
        wait_until(lambda: known_peers(client)[1] == [client.id], timeout=5,
                   message="a client that sent junk stayed registered")


def test_junk_on_a_worker_stream_drops_that_worker():
    with _small_cluster() as cluster, Client(cluster) as client:
        real = sorted(client.scheduler_info()["workers"])
        comm, reply = _peer(cluster, _fake_worker())
        assert reply["status"] == "OK"
        sync(comm.write([{"op": "heartbeat"}]))  # no metrics
        time.sleep(0.2)
        sync(comm.close())
        wait_until(lambda: known_peers(client)[0] == real, timeout=5,
                   message="a worker that sent junk stayed registered")


def test_a_worker_with_zero_threads_does_not_stall_other_clients():
    with _small_cluster() as cluster, Client(cluster) as client:
        comm, _ = _peer(cluster, _fake_worker(nthreads=0))
        try:
            assert client.submit(inc, 1).result(timeout=5) == 2
        finally:
            sync(comm.close())
        assert client.submit(inc, 2).result(timeout=5) == 3


def test_a_worker_without_a_thread_count_does_not_stop_heartbeat_checks():
    with config.set({"scheduler.worker-ttl": "2s"}), _small_cluster() \
            as cluster, Client(cluster) as client:
        real = sorted(client.scheduler_info()["workers"])
        first, _ = _peer(cluster, _fake_worker(nthreads=None))
        time.sleep(3)  # silent past the worker-ttl: removed, if registered
        second, _ = _peer(cluster, _fake_worker(name="fake-2"))
        try:
            wait_until(lambda: known_peers(client)[0] == real, timeout=6,
                       message="a silent worker was never removed")
        finally:
            sync(first.close())
            sync(second.close())


def test_a_task_with_bad_retries_does_not_wedge_a_worker():
    bad = {"spec": b"not a spec", "deps": [], "group": "bad",
           "priority": (0,), "retries": "x", "workers": None}
    with _small_cluster() as cluster, Client(cluster) as client:
        comm, _ = _peer(cluster, {"op": "register-client", "client": "fake"})
        sync(comm.write([{"op": "update-graph", "tasks": {"bad": bad},
                          "keys": ["bad"]}]))
        try:
            assert client.submit(inc, 1).result(timeout=5) == 2
        finally:
            sync(comm.close())


def test_a_task_with_an_odd_priority_does_not_wedge_a_worker():
    bad = {"spec": b"not a spec", "deps": [], "group": "bad",
           "priority": "odd", "retries": 0, "workers": None}
    with _small_cluster() as cluster, Client(cluster) as client:
        queued = client.map(time.sleep, [0.2] * 5, pure=False)
        comm, _ = _peer(cluster, {"op": "register-client", "client": "fake"})
        sync(comm.write([{"op": "update-graph", "tasks": {"bad": bad},
                          "keys": ["bad"]}]))
        try:
            assert [f.result(timeout=10) for f in queued] == [None] * 5
            assert client.submit(inc, 1).result(timeout=5) == 2
        finally:
            sync(comm.close())


def test_a_bad_heartbeat_does_not_break_scheduler_info():
    with _small_cluster() as cluster, Client(cluster) as client:
        comm, _ = _peer(cluster, _fake_worker())
        sync(comm.write([{"op": "heartbeat", "metrics": 5}]))
        time.sleep(0.2)
        try:
            # the peer that sent it is dropped; the real worker stays
            wait_until(lambda: len(client.scheduler_info()["workers"]) == 1,
                       timeout=5)
            with Client(cluster) as another:
                assert another.submit(inc, 1).result(timeout=5) == 2
        finally:
            sync(comm.close())


def test_a_malformed_gather_from_wedges_no_key(cluster):
    with Client(cluster) as client:
        a, b = sorted(client.scheduler_info()["workers"])

    async def ask(address, msg, wait=5):
        comm = await connect(address, cluster.secret)
        try:
            await comm.write(msg)
            return await asyncio.wait_for(comm.read(), wait)
        finally:
            comm.abort()

    key = "fuzz-wedged"
    odd_holders = {"op": "gather-from", "who_has": {key: "tcp://nowhere:1"}}
    try:
        sync(ask(a, odd_holders, wait=2))  # holders must be a list
    except (asyncio.TimeoutError, TimeoutError):
        pass
    sync(ask(b, {"op": "put-data", "data": {key: 1}}))
    reply = sync(ask(a, {"op": "gather-from", "who_has": {key: [b]}}))
    assert reply["status"] == "OK"


def test_an_abandoned_request_does_not_outlive_its_connection():
    with _small_cluster() as cluster, Client(cluster) as client:
        def open_comms(dask_scheduler):
            return len(dask_scheduler._comms)

        before = client.run_on_scheduler(open_comms)
        comm = sync(connect(cluster.scheduler_address, cluster.secret))
        sync(comm.write({"op": "wait-for-workers", "n": 1000,
                         "timeout": None}))  # would wait for ever
        time.sleep(0.2)
        sync(comm.close())
        wait_until(lambda: client.run_on_scheduler(open_comms) <= before,
                   timeout=5, message="the scheduler still serves a "
                                      "request whose peer has gone")


def test_data_scattered_for_no_client_is_not_kept():
    with _small_cluster() as cluster, Client(cluster) as client:
        (worker,) = client.scheduler_info()["workers"]
        comm = sync(connect(cluster.scheduler_address, cluster.secret))
        sync(comm.write({"op": "update-data", "client": "nobody", "data": {
            "orphan": {"workers": [worker], "nbytes": 1, "type": "int"}}}))
        sync(comm.read())
        sync(comm.close())

        def known(dask_scheduler):
            return "orphan" in dask_scheduler.tasks

        wait_until(lambda: not client.run_on_scheduler(known), timeout=5,
                   message="data that no client wants stayed on the "
                           "scheduler")
