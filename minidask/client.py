"""The client: where a user's code meets the cluster.

A :class:`Client` connects to the scheduler and keeps one stream open to
it. ``submit`` and ``map`` pack each call into a task (see ``task.py``),
send it on that stream and return a :class:`Future` at once, without
waiting for any answer. The scheduler answers on the same stream when a
result is ready (``key-in-memory``, naming the workers that hold it) or
failed (``task-erred``); ``result()`` and ``gather()`` then fetch the value
straight from a worker that holds it, not through the scheduler. A small
result (a number, a short string) comes with ``key-in-memory`` itself, and
needs no fetch.

Futures are counted: when the last Future for a key is dropped, the client
tells the scheduler it no longer wants that key, and the cluster frees it.

Everything runs on minidask's event loop thread (``loop.py``); the methods
here are synchronous wrappers that hand work to it and wait.
"""

import asyncio
import collections
import copy
import concurrent.futures
import hashlib
import itertools
import logging
import pickle
import queue
import threading
import uuid
import weakref

from minidask import config, display, logs
from minidask.comm import (CommClosedError, CommError, ConnectError,
                           parse_address)
from minidask.core import BatchedSend, ConnectionPool, read_stream, secret_for
from minidask.loop import call_soon, sync
from minidask.scheduler import CancelledError
from minidask.task import (Ref, fill_refs, make_key, make_spec, pickle_bytes,
                           replace_futures)
from minidask.utils import no_garbage_collection

logger = logging.getLogger(__name__)

_clients = weakref.WeakSet()
_priority = itertools.count()


# Guards the creation of FutureState events against a state being settled.
_event_lock = threading.Lock()


class FutureState:
    """The shared state of every Future for one key.

    The event loop settles it; any thread may wait for that. The
    threading.Event a waiting thread needs is made only when one waits
    before the state is settled: most states never need one.
    """

    __slots__ = ("status", "exception", "traceback", "type", "workers",
                 "value", "settled", "event", "aio_event", "callbacks")

    def __init__(self):
        self.status = "pending"
        self.exception = self.traceback = self.type = None
        self.workers = []
        self.value = None  # a small result's pickle, if it came along
        self.settled = False
        self.event = None
        self.aio_event = asyncio.Event()
        self.callbacks = []

    def is_done(self):
        return self.settled

    def wait(self, timeout=None):
        """Wait until settled, from any thread but the loop's; True if so."""
        if self.settled:
            return True
        with _event_lock:
            if self.event is None:
                self.event = threading.Event()
            if self.settled:
                return True
            event = self.event
        return event.wait(timeout)

    def _done(self, status):
        self.status = status
        self.settled = True
        with _event_lock:
            event = self.event
        if event is not None:
            event.set()
        self.aio_event.set()

    def finish(self, type_name, workers, value=None):
        self.type, self.workers, self.value = type_name, workers, value
        self._done("finished")

    def fail(self, exception, traceback, status="error"):
        self.exception, self.traceback = exception, traceback
        self._done(status)

    def reset(self):
        self.status = "pending"
        self.workers = []
        self.value = None
        self.settled = False
        with _event_lock:
            if self.event is not None:
                self.event.clear()
        self.aio_event.clear()


class Future:
    """A result that will be (or is) held on the cluster.

    ``future.result()`` waits for it and brings it here; ``.status`` is
    ``"pending"``, ``"finished"``, ``"error"``, ``"cancelled"`` or
    ``"lost"``. Dropping the last Future for a key frees the result on the
    cluster.
    """

    def __init__(self, key, client):
        self.key = key
        self.client = client
        self._state = client._acquire(key)

    @property
    def status(self):
        return self._state.status

    def done(self):
        return self._state.is_done()

    def result(self, timeout=None):
        """Wait for the result and return it, or raise the task's error."""
        state = self._state
        if not state.wait(timeout):
            raise TimeoutError(
                f"{self.key!r} was not done within {timeout} s")
        value = state.value
        if value is not None:  # small: it came with the news it was done
            return pickle.loads(value)
        try:
            data = self.client._gather_sync([self.key], timeout=timeout)
        except TimeoutError:
            if self.done():
                raise
            raise TimeoutError(
                f"{self.key!r} was not done within {timeout} s") from None
        return data[self.key]

    def exception(self, timeout=None):
        """The exception the task raised, or None once it finished well."""
        if not self._state.wait(timeout):
            raise TimeoutError(
                f"{self.key!r} was not done within {timeout} s")
        return self._state.exception

    def traceback(self, timeout=None):
        """The task's traceback as text, as formatted on the worker."""
        self.exception(timeout)
        return self._state.traceback

    def cancel(self, force=False):
        self.client.cancel([self], force=force)

    def cancelled(self):
        return self._state.status == "cancelled"

    def add_done_callback(self, fn):
        """Call ``fn(future)`` once done, in a separate thread."""
        state = self._state
        call_soon(self.client._add_callback, state, self, fn)

    def release(self):
        if self.client is not None:
            client, self.client = self.client, None
            client._release(self.key)

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass  # interpreter shutdown: nothing is left to tell

    def __reduce__(self):
        raise TypeError(
            f"a Future ({self.key!r}) cannot be pickled; pass it as an "
            f"argument of submit or map, which sends its value instead")

    def __repr__(self):
        return display.future_text(self.key, self.status, self._state.type)

    def _repr_html_(self):
        return display.future_html(self.key, self.status, self._state.type)


class Client:
    """Connect to a cluster and run work on it.

    ``Client()`` finds its cluster in this order: the ``scheduler-address``
    config key (a config file, ``MINIDASK_SCHEDULER_ADDRESS`` or
    ``config.set``), else a new :class:`~minidask.LocalCluster` that this
    client owns and closes, made with ``cluster_kwargs``. A configured
    address that does not answer within ``timeout`` (default: config
    ``comm.timeouts.connect``) is an error naming where it was configured,
    never a reason to start a local cluster instead. ``Client(cluster)``
    uses a cluster object; ``Client("tcp://host:port")`` an address. One
    INFO log line says which way the client connected.

    Example::

        >>> client = Client(n_workers=2)
        >>> client.submit(sum, [1, 2, 3]).result()
        6
        >>> client.close()
    """

    def __init__(self, address=None, timeout=None, **cluster_kwargs):
        self.id = f"Client-{uuid.uuid4().hex[:12]}"
        self.status = "connecting"
        self.cluster = None
        self._owns_cluster = False
        self._states = {}
        self._refs = collections.Counter()
        self._lock = threading.RLock()  # a Future's __del__ may run under it
        self._outbox = []  # messages for the scheduler, in program order
        self._callbacks = None
        self.scheduler_address = None
        self._stream = None
        self._pool = None
        self._timeout = timeout
        self._configured_from = None  # where a configured address came from
        self._scheduler_closing = False
        logs.setup(logs.stderr_level())  # so that the INFO line is kept
        address, secret = self._find_cluster(address, cluster_kwargs)
        try:
            sync(self._connect(address, secret, timeout))
        except BaseException:
            if self._owns_cluster:
                self.cluster.close()
            raise
        _clients.add(self)

    def _find_cluster(self, address, cluster_kwargs):
        """Decide where to connect; return the address and its secret.

        In order: a cluster object, an address, the ``scheduler-address``
        config key, and last a new LocalCluster. One INFO line says which.
        """
        if address is not None and cluster_kwargs:
            raise ValueError(
                f"Client got both an address ({address!r}) and arguments for "
                f"a new cluster ({', '.join(cluster_kwargs)}): give one")
        if hasattr(address, "scheduler_address"):
            self.cluster = address
            logger.info("connecting to %s of %s %s", address.scheduler_address,
                        type(address).__name__, address.name)
            return address.scheduler_address, address.secret
        if address is not None:
            parse_address(address)
            logger.info("connecting to %s given to Client()", address)
            return address, secret_for(address)
        configured = config.get("scheduler-address", None)
        if configured:
            return self._configured(configured, cluster_kwargs)
        logger.info("no scheduler configured: starting a LocalCluster")
        from minidask.deploy.local import LocalCluster
        self.cluster = LocalCluster(**cluster_kwargs)
        self._owns_cluster = True
        return self.cluster.scheduler_address, self.cluster.secret

    def _configured(self, address, cluster_kwargs):
        """The scheduler named by config: it must answer, or we fail.

        Falling back to a LocalCluster here would hide a typo or a dead
        scheduler behind a cluster the user did not ask for.
        """
        where = self._configured_from = (
            f"config scheduler-address, set by "
            f"{config.source('scheduler-address')}")
        if cluster_kwargs:
            raise ValueError(
                f"a scheduler address is configured ({address}, from "
                f"{where}) so Client() will not start a cluster with "
                f"{', '.join(cluster_kwargs)}; unset it or drop those")
        try:
            parse_address(address)
        except ValueError as exc:
            raise ValueError(f"{exc} (from {where})") from None
        logger.info("connecting to %s from %s", address, where)
        return address, secret_for(address)

    async def _connect(self, address, secret, timeout):
        self.scheduler_address = address
        security = getattr(self.cluster, "security", None)
        self._pool = ConnectionPool(secret, security)
        try:
            comm = await self._pool.connect(address, timeout, local=True)
        except ConnectError as exc:
            where = self._configured_from
            if where:
                raise ConnectError(
                    f"{exc} The address is from {where}: start that "
                    f"scheduler, or unset the key to have Client() start "
                    f"a LocalCluster") from exc
            raise
        await comm.write({"op": "register-client", "client": self.id})
        reply = await comm.read()
        self._identity = reply["result"]
        self._stream = BatchedSend(comm)
        self.status = "running"
        handlers = {
            "key-in-memory": self._on_key_in_memory,
            "task-erred": self._on_task_erred,
            "lost-data": self._on_lost_data,
            "task-cancelled": self._on_task_cancelled,
            "restart": self._on_restart,
            "scheduler-closing": self._on_scheduler_closing,
        }
        self._reader = asyncio.ensure_future(self._listen(comm, handlers))

    async def _listen(self, comm, handlers):
        await read_stream(comm, handlers)
        if self.status == "running":
            self.status = "lost"
            if self._scheduler_closing:  # its cluster was closed: no news
                logger.info("the scheduler at %s closed",
                            self.scheduler_address)
            else:
                logger.warning("lost the connection to the scheduler at %s",
                               self.scheduler_address)
            error = CommClosedError(
                f"lost the connection to the scheduler at "
                f"{self.scheduler_address}: results not yet fetched are gone")
            for state in list(self._states.values()):
                if not state.is_done():
                    self._settle(state, lambda s: s.fail(error, None, "lost"))

    # -- messages from the scheduler ------------------------------------------------

    def _settle(self, state, change):
        change(state)
        if state.callbacks:
            callbacks, state.callbacks = state.callbacks, []
            for future, fn in callbacks:
                self._run_callback(fn, future)

    def _on_key_in_memory(self, key, type, workers, value=None):
        state = self._states.get(key)
        if state is not None:
            self._settle(state, lambda s: s.finish(type, workers, value))

    def _on_task_erred(self, key, exception, traceback):
        state = self._states.get(key)
        if state is None or state.status == "error":
            return
        if traceback and isinstance(exception, BaseException) and \
                not getattr(exception, "_minidask_noted", False):
            exception.add_note(f"\nTraceback on the worker:\n{traceback}")
            exception._minidask_noted = True
        self._settle(state, lambda s: s.fail(exception, traceback))

    def _on_lost_data(self, key):
        state = self._states.get(key)
        if state is not None and state.status == "finished":
            state.reset()

    def _on_task_cancelled(self, key):
        state = self._states.get(key)
        if state is not None and not state.is_done():
            self._settle(state, lambda s: s.fail(
                CancelledError(f"{key!r} was cancelled"), None, "cancelled"))

    def _on_scheduler_closing(self):
        self._scheduler_closing = True

    def _on_restart(self):
        error = CancelledError("the cluster was restarted: this result is gone")
        for state in list(self._states.values()):
            self._settle(state, lambda s: s.fail(error, None, "cancelled"))

    # -- callbacks ---------------------------------------------------------------------

    def _add_callback(self, state, future, fn):
        if state.is_done():
            self._run_callback(fn, future)
        else:
            state.callbacks.append((future, fn))

    def _run_callback(self, fn, future):
        if self._callbacks is None:
            self._callbacks = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="minidask-callbacks")
        self._callbacks.submit(_call_logged, fn, future)

    # -- reference counting --------------------------------------------------------------

    def _acquire(self, key):
        with self._lock:
            self._refs[key] += 1
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = FutureState()
            return state

    def _release(self, key):
        with self._lock:
            self._refs[key] -= 1
            if self._refs[key] > 0:
                return
            del self._refs[key]
            self._states.pop(key, None)
        self._send({"op": "client-releases-keys", "keys": [key]})

    def _send(self, msg):
        """Queue a message for the scheduler, from any thread.

        Every message goes through this one queue so that the scheduler
        hears them in the order the program made them: releasing a future
        must never overtake the submission of a task that depends on it.
        """
        with self._lock:
            outbox = self._outbox
            last = outbox[-1] if outbox else None
            if (last is not None and msg["op"] == last["op"]
                    == "client-releases-keys"):
                last["keys"].extend(msg["keys"])
                return
            outbox.append(msg)
            first = len(outbox) == 1
        if first and self.status == "running":
            call_soon(self._flush_outbox)

    def _flush_outbox(self):
        with self._lock:
            messages, self._outbox = self._outbox, []
        for msg in messages:
            self._stream.send(msg)

    # -- submitting work --------------------------------------------------------------

    def submit(self, func, *args, key=None, pure=True, workers=None,
               retries=0, **kwargs):
        """Run ``func(*args, **kwargs)`` on the cluster; return a Future.

        Futures anywhere in the arguments are replaced, on the worker, by
        their results. With ``pure=True`` (the default) the same call gives
        the same key, so submitting it twice computes it once.
        """
        if not callable(func):
            raise TypeError(f"submit needs a function to call, not "
                            f"{type(func).__name__} {func!r}")
        func_bytes = pickle_bytes(func)
        task, key = self._make_task(func, func_bytes, args, kwargs, key,
                                    pure, workers, retries)
        return self._send_tasks({key: task})[0]

    def map(self, func, *iterables, key=None, pure=True, workers=None,
            retries=0, **kwargs):
        """Submit ``func`` once per element of ``iterables``."""
        if not callable(func):
            raise TypeError(f"map needs a function to call, not "
                            f"{type(func).__name__} {func!r}")
        if not iterables:
            raise TypeError("map needs at least one iterable of arguments")
        func_bytes = pickle_bytes(func)
        calls = list(zip(*iterables))
        keys = key if isinstance(key, (list, tuple)) else [None] * len(calls)
        if len(keys) != len(calls):
            raise ValueError(f"map got {len(keys)} keys for {len(calls)} "
                             f"calls")
        tasks, order = {}, []
        with no_garbage_collection():
            for i, (args, k) in enumerate(zip(calls, keys)):
                if isinstance(key, str):
                    k = f"{key}-{i}"
                task, k = self._make_task(func, func_bytes, args, kwargs, k,
                                          pure, workers, retries)
                tasks.setdefault(k, task)
                order.append(k)
            futures = dict(zip(tasks, self._send_tasks(tasks)))
        return [futures[k] for k in order]

    def _make_task(self, func, func_bytes, args, kwargs, key, pure, workers,
                   retries):
        deps = set()
        args = replace_futures(tuple(args), Future, deps)
        kwargs = replace_futures(dict(kwargs), Future, deps)
        spec = make_spec(func_bytes, args, kwargs)
        if key is None:
            key = make_key(func, func_bytes, spec, pure)
        if isinstance(workers, str):
            workers = [workers]
        task = {"spec": spec, "deps": sorted(deps), "group": key.rsplit(
            "-", 1)[0] if "-" in key else key, "priority": (next(_priority),),
            "retries": retries, "workers": workers}
        return task, key

    def _send_tasks(self, tasks, wanted=None):
        """Send tasks; return Futures for ``wanted`` keys (default: all)."""
        self._check_running()
        wanted = list(tasks) if wanted is None else wanted
        futures = [Future(key, self) for key in wanted]
        for future in futures:
            if future._state.status == "cancelled":
                future._state.reset()
        self._send({"op": "update-graph", "tasks": tasks, "keys": wanted})
        return futures

    def get(self, graph, keys, **kwargs):
        """Compute a Dask task graph: Dask's scheduler interface.

        ``dask.compute(x, scheduler=client.get)`` runs a Dask collection
        (``dask.delayed``, ``dask.array``, ...) on this cluster; ``keys``
        may be nested lists, and the results come back in the same shape.
        Needs ``dask`` installed here and on the workers.
        """
        from minidask import dask_graphs
        func_bytes = pickle_bytes(dask_graphs.run_node)
        batch = next(_priority)

        def make_task(func, args, key, group, priority):
            deps = [ref.key for ref in args[1].values()]
            return {"spec": make_spec(func_bytes, args, {}), "deps": deps,
                    "group": group, "priority": (batch, priority),
                    "retries": 0, "workers": None}

        tasks = dask_graphs.graph_to_tasks(graph, make_task)
        wanted = list(dict.fromkeys(dask_graphs.flatten_keys(keys)))
        futures = self._send_tasks(tasks, wanted)
        values = self.gather(dict(zip(wanted, futures)))
        return dask_graphs.pack(keys, values)

    def _check_running(self):
        if self.status != "running":
            raise RuntimeError(
                f"this client is {self.status}; make a new Client to go on")

    # -- getting results back ------------------------------------------------------------

    def gather(self, futures, errors="raise"):
        """Bring results here; same nesting as ``futures``.

        A failed task re-raises its exception (with the worker's traceback
        attached as a note); ``errors="skip"`` leaves failed ones out.
        """
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors={errors!r}: use 'raise' or 'skip'")
        keys = set()
        packed = replace_futures(futures, Future, keys)
        data = self._gather_sync(sorted(keys), errors=errors)
        if errors == "skip":
            packed = _drop_missing(packed, data)
        return fill_refs(packed, data)

    def _gather_sync(self, keys, errors="raise", timeout=None):
        if any(k not in self._states for k in keys):
            missing = [k for k in keys if k not in self._states]
            raise CancelledError(f"{missing[0]!r} was released")
        return sync(self._gather(keys, errors), timeout)

    async def _gather(self, keys, errors="raise"):
        """Wait for ``keys``, then fetch their values from the workers."""
        data = {}
        while True:
            states = {k: self._states[k] for k in keys if k not in data}
            for key, state in states.items():
                await state.aio_event.wait()
                if state.status != "finished" and errors == "raise":
                    raise _fresh(state.exception)
            wanted = {k: s for k, s in states.items()
                      if s.status == "finished"}
            for key, state in list(wanted.items()):
                if state.value is not None:  # it came with key-in-memory
                    data[key] = pickle.loads(state.value)
                    del wanted[key]
            if not wanted:
                break
            data.update(await self._fetch(wanted))
            missing = [k for k in wanted if k not in data]
            if not missing:
                break
            await self._find_again(missing)
        return data

    async def _fetch(self, states):
        by_worker = collections.defaultdict(list)
        for key, state in states.items():
            if state.workers:
                by_worker[state.workers[hash(key) % len(state.workers)]] \
                    .append(key)
        replies = await asyncio.gather(
            *(self._pool.call(w, "get-data", keys=ks)
              for w, ks in by_worker.items()), return_exceptions=True)
        data = {}
        for reply in replies:
            if isinstance(reply, dict):
                data.update(reply)
            elif not isinstance(reply, (CommError, OSError)):
                raise reply
        return data

    async def _find_again(self, keys):
        """Results a worker no longer had: ask where they are now."""
        who_has = await self._pool.call(self.scheduler_address, "who-has",
                                        keys=keys)
        lost = []
        for key in keys:
            state = self._states[key]
            holders = who_has.get(key) or []
            if holders:
                state.workers = holders
            else:
                state.reset()
                lost.append(key)
        if lost:  # the scheduler recomputes them and tells us when done
            self._stream.send({"op": "client-desires-keys", "keys": lost})

    def scatter(self, data, broadcast=False, workers=None, hash=True):
        """Put local data on the cluster; return Futures for it."""
        self._check_running()
        if isinstance(data, dict):
            items = dict(data)
        else:
            single = not isinstance(data, (list, tuple, set, frozenset))
            values = [data] if single else list(data)
            items = {_data_key(v, hash): v for v in values}
        sync(self._scatter(items, broadcast, workers))
        futures = {k: Future(k, self) for k in items}
        if isinstance(data, dict):
            return futures
        if single:
            return futures[next(iter(items))]
        return [futures[_data_key(v, hash)] for v in values] if hash else \
            list(futures.values())

    async def _scatter(self, items, broadcast, workers):
        from minidask.comm import to_wire
        info = await self._pool.call(self.scheduler_address, "scheduler-info")
        targets = list(workers or info["workers"])
        if not targets:
            raise RuntimeError("there are no workers to scatter to yet; "
                               "wait_for_workers(1) first")
        placed = collections.defaultdict(dict)
        for i, (key, value) in enumerate(items.items()):
            for w in (targets if broadcast else [targets[i % len(targets)]]):
                placed[w][key] = to_wire(value)
        replies = await asyncio.gather(*(
            self._pool.call(w, "put-data", data=d) for w, d in placed.items()))
        record = {}
        for w, reply in zip(placed, replies):
            for key, (nbytes, type_name) in reply.items():
                entry = record.setdefault(
                    key, {"workers": [], "nbytes": nbytes, "type": type_name})
                entry["workers"].append(w)
        for key, entry in record.items():
            self._acquire(key).finish(entry["type"], entry["workers"])
        await self._pool.call(self.scheduler_address, "update-data",
                              client=self.id, data=record)
        with self._lock:  # drop the hold _acquire took; Futures take theirs
            for key in record:
                self._refs[key] -= 1

    def cancel(self, futures, force=False):
        """Stop computing these futures' tasks and forget their results."""
        keys = set()
        replace_futures(futures, Future, keys)
        error = CancelledError("cancelled by the client")

        def cancel():
            for key in keys:
                state = self._states.get(key)
                if state is not None and not state.is_done():
                    self._settle(state, lambda s: s.fail(error, None,
                                                         "cancelled"))
        call_soon(cancel)
        self._send({"op": "cancel-keys", "keys": list(keys), "force": force})

    # -- asking the cluster ------------------------------------------------------------

    def _call(self, op, **msg):
        self._check_running()
        return sync(self._pool.call(self.scheduler_address, op, **msg))

    def scheduler_info(self):
        """The scheduler's address, dashboard port and workers."""
        return self._call("scheduler-info")

    def who_has(self, futures=None):
        """Which workers hold each future's result."""
        keys = None
        if futures is not None:
            found = set()
            replace_futures(futures, Future, found)
            keys = sorted(found)
        return self._call("who-has", keys=keys)

    def run(self, function, *args, workers=None, **kwargs):
        """Run ``function`` on every worker (not as a task); results by
        worker address. A ``dask_worker`` parameter receives the Worker."""
        replies = self._call("broadcast-run", function=pickle_bytes(function),
                             args=args, kwargs=kwargs, workers=workers)
        for reply in replies.values():
            if isinstance(reply, BaseException):
                raise reply
        return replies

    def run_on_scheduler(self, function, *args, **kwargs):
        """Run ``function`` in the scheduler's process, on its event loop.
        A ``dask_scheduler`` parameter receives the Scheduler."""
        return self._call("run-on-scheduler", function=function, args=args,
                          kwargs=kwargs)

    def wait_for_workers(self, n_workers=1, timeout=None):
        """Wait until at least ``n_workers`` workers are connected."""
        return self._call("wait-for-workers", n=n_workers, timeout=timeout)

    def restart(self, timeout=30):
        """Restart every worker and forget every task and result."""
        return self._call("restart", timeout=timeout)

    def get_scheduler_logs(self, n=None):
        """The scheduler's log as (level, line) pairs, newest first."""
        return self._call("get-logs", n=n)

    def get_worker_logs(self, n=None, workers=None):
        """Each worker's log as (level, line) pairs, newest first."""
        return self._call("worker-logs", n=n, workers=workers)

    @property
    def dashboard_link(self):
        from minidask.deploy.cluster import dashboard_link
        port = self._identity.get("services", {}).get("dashboard")
        if port is None:
            return None
        _, host, _ = parse_address(self.scheduler_address)
        return dashboard_link(host, port)

    # -- closing -----------------------------------------------------------------------

    def close(self, timeout=None):
        """Release everything this client holds and disconnect."""
        if self.status in ("closing", "closed"):
            return
        if self.status == "running":
            sync(self._close(), timeout)
        self.status = "closed"
        if self._callbacks is not None:
            self._callbacks.shutdown(wait=False)
        if self._owns_cluster and self.cluster is not None:
            self.cluster.close()

    async def _close(self):
        self.status = "closing"
        error = CancelledError("the client was closed")
        for state in list(self._states.values()):
            if not state.is_done():
                self._settle(state, lambda s: s.fail(error, None,
                                                     "cancelled"))
        self._stream.abort()
        self._pool.close()
        self._reader.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- display -------------------------------------------------------------------------

    def _info(self):
        workers = {}
        if self.status == "running":
            try:
                workers = self.scheduler_info()["workers"]
            except (CommError, OSError, RuntimeError):
                pass
        cluster = self.cluster._info() if self.cluster is not None else None
        return {"id": self.id, "status": self.status,
                "scheduler_address": self.scheduler_address,
                "dashboard_link": self.dashboard_link
                if self.status == "running" else None,
                "cluster": cluster, "workers": workers}

    def __repr__(self):
        return display.client_text(self._info())

    def _repr_html_(self):
        return display.client_html(self._info())


def _fresh(exception):
    """A copy of a task's exception, to raise.

    Raising the stored exception itself would attach to it a traceback
    whose frames hold the Future, so that dropping the Future would no
    longer release its key until the garbage collector came by.
    """
    try:
        fresh = copy.copy(exception)
    except Exception:
        return exception
    return fresh if type(fresh) is type(exception) else exception


def _call_logged(fn, future):
    try:
        fn(future)
    except Exception:
        logger.exception("done-callback %r failed", fn)


def _data_key(value, hash_it):
    if not hash_it:
        return f"{type(value).__name__}-{uuid.uuid4().hex}"
    digest = hashlib.md5(pickle_bytes(value), usedforsecurity=False)
    return f"{type(value).__name__}-{digest.hexdigest()}"


def _drop_missing(packed, data):
    """For gather(errors="skip"): leave out the results that failed."""
    kind = type(packed)
    if kind in (list, tuple):
        return kind(_drop_missing(x, data) for x in packed
                    if not _failed(x, data))
    if kind is dict:
        return {k: _drop_missing(v, data) for k, v in packed.items()
                if not _failed(v, data)}
    return packed


def _failed(item, data):
    return type(item) is Ref and item.key not in data


# -- waiting on many futures --------------------------------------------------------

FIRST_COMPLETED = "FIRST_COMPLETED"
ALL_COMPLETED = "ALL_COMPLETED"
DoneAndNotDone = collections.namedtuple("DoneAndNotDone", "done not_done")


def _futures_in(futures):
    if isinstance(futures, Future):
        return [futures]
    found = []
    if isinstance(futures, dict):
        futures = futures.values()
    for f in futures:
        found.extend(_futures_in(f) if not isinstance(f, Future) else [f])
    return found


def wait(futures, timeout=None, return_when=ALL_COMPLETED):
    """Wait until all (or the first of) ``futures`` are done.

    Returns ``(done, not_done)`` sets; raises TimeoutError if ``timeout``
    passes first.
    """
    if return_when not in (ALL_COMPLETED, FIRST_COMPLETED):
        raise ValueError(f"return_when={return_when!r}: use "
                         f"'ALL_COMPLETED' or 'FIRST_COMPLETED'")
    items = _futures_in(futures)
    if return_when == ALL_COMPLETED:
        deadline = None if timeout is None else _now() + timeout
        for f in items:
            left = None if deadline is None else max(0, deadline - _now())
            if not f._state.wait(left):
                raise TimeoutError(f"{sum(not g.done() for g in items)} of "
                                   f"{len(items)} futures not done within "
                                   f"{timeout} s")
    else:
        done = threading.Event()
        for f in items:
            f.add_done_callback(lambda _: done.set())
        if items and not done.wait(timeout):
            raise TimeoutError(f"none of {len(items)} futures done within "
                               f"{timeout} s")
    return DoneAndNotDone({f for f in items if f.done()},
                          {f for f in items if not f.done()})


def _now():
    import time
    return time.monotonic()


class as_completed:
    """Iterate over futures in the order they finish.

    ``as_completed(futures, with_results=False)``; more futures can be
    added while iterating with ``.add(future)``.
    """

    def __init__(self, futures=(), with_results=False, raise_errors=True):
        self.queue = queue.Queue()
        self.pending = 0
        self.lock = threading.Lock()
        self.with_results = with_results
        self.raise_errors = raise_errors
        for f in _futures_in(futures):
            self.add(f)

    def add(self, future):
        with self.lock:
            self.pending += 1
        future.add_done_callback(self.queue.put)

    def update(self, futures):
        for f in _futures_in(futures):
            self.add(f)

    def count(self):
        return self.pending

    def is_empty(self):
        return self.pending == 0

    def __iter__(self):
        return self

    def __next__(self):
        with self.lock:
            if self.pending == 0:
                raise StopIteration
        future = self.queue.get()
        with self.lock:
            self.pending -= 1
        if not self.with_results:
            return future
        if future.status == "error" and not self.raise_errors:
            return future, future.exception()
        return future, future.result()


def progress(*futures, notebook=None):
    """Draw a progress bar until the futures are done (Jupyter or text)."""
    return display.progress(list(futures) if len(futures) != 1
                            else futures[0], notebook=notebook)


__all__ = ["Client", "Future", "wait", "as_completed", "progress",
           "FIRST_COMPLETED", "ALL_COMPLETED"]
