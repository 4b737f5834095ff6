"""The scheduler: the one process that knows the whole graph.

Clients send it tasks; it decides which worker runs each one, tells that
worker where the task's inputs live, and tells the clients when results
are ready. It never runs user code and never unpickles a task: a task's
function and arguments travel through it as opaque bytes, from the client
that pickled them to the worker that runs them.

It keeps one stream open to every worker and every client. Almost all of
its work happens in the stream handlers below (``handle_task_finished``,
``handle_update_graph``, ...), each a plain function that changes the task
states and queues messages; nothing on the path of a task waits on a timer.

Design note: the task state machine
-----------------------------------
Each task is in one of these states:

    released    known, but neither computed nor wanted right now
    waiting     wanted; waiting for its dependencies (or for any worker)
    processing  sent to a worker, which is running it or will soon
    memory      its result is held by one or more workers
    erred       it, or one of its dependencies, raised an exception
    forgotten   dropped from the scheduler altogether

The obvious design forgets a task the moment its result is used. We keep
more: a task stays known while anything downstream of it is, because if a
worker dies and takes a result with it, the scheduler must be able to run
the tasks that made it again. So two relations drive every transition:

* ``who_wants`` (clients holding a future) and ``waiters`` (dependents not
  yet computed) say whether a task's *result* is needed. When both are
  empty, the result is released and the workers free the memory.
* ``dependents`` says whether the task's *record* is still needed. A
  released task with no dependents and no wanters is forgotten.

Losing a worker moves the tasks it was running back to ``waiting`` (or to
``erred`` with :class:`KilledWorker` when a task has now been running on
``allowed-failures`` dying workers), and moves every result that lived only
there from ``memory`` back to ``waiting`` if it is still needed: the
dependencies it needs are recomputed the same way, as far back as needed.

Design note: choosing a worker
------------------------------
Sending each task to the worker with the fewest queued tasks balances the
load but ignores data: a task whose input is 1 GiB on worker A should not
run on idle worker B if moving the data takes longer than waiting for A.
So each candidate worker gets an estimated start time: the time to drain
its queue (queued tasks per thread, times the average duration of tasks of
this kind) plus the time to fetch the input bytes it does not hold yet (at
config ``scheduler.bandwidth``). The earliest estimate wins; ties go to the
worker holding more of the input. For small inputs this is simply "fewest
queued tasks"; for large ones data stays put. We do not move tasks once
sent (no work stealing): a worker that turns out slow keeps its queue.
"""

import asyncio
import collections
import concurrent.futures
import heapq
import inspect
import logging
import time

from minidask import __version__, config
from minidask.comm import CommClosedError, CommError
from minidask.core import NO_REPLY, BatchedSend, Server, read_stream
from minidask.core import forget_secret, register_secret
from minidask.core import secret_file_for, write_secret_file
from minidask.utils import (no_garbage_collection, parse_bytes,
                            parse_timedelta)

logger = logging.getLogger(__name__)

UNKNOWN_DURATION = 0.5  # seconds, for a kind of task never seen before
MAX_FETCH_FAILURES = 10  # times a task may fail to fetch an input


class KilledWorker(Exception):
    """A task was running on too many workers that died."""

    def __init__(self, key, last_worker, count, cause=None):
        self.key = key
        self.last_worker = last_worker
        cause = f" ({cause})" if cause else ""
        super().__init__(
            f"task {key!r} was running on {count} workers that died, the "
            f"last {last_worker}{cause}. It may crash its worker or use too "
            f"much memory; raise config scheduler.allowed-failures to try "
            f"it more often")

    def __reduce__(self):
        return _rebuild_exception, (type(self), self.args)


def _rebuild_exception(cls, args):
    exc = Exception.__new__(cls)
    exc.args = args
    return exc


class CancelledError(concurrent.futures.CancelledError):
    """A task was cancelled before it finished, or its result is gone."""


class TaskState:
    """What the scheduler knows of one task."""

    __slots__ = (
        "key", "spec", "group", "priority", "state", "dependencies",
        "dependents", "waiting_on", "waiters", "who_has", "processing_on",
        "who_wants", "nbytes", "type", "exception", "traceback", "retries",
        "suspicious", "restrictions", "executing", "fetch_failures",
    )

    def __init__(self, key, spec, group, priority):
        self.key = key
        self.spec = spec
        self.group = group
        self.priority = priority
        self.state = "released"
        self.dependencies = set()
        self.dependents = set()
        self.waiting_on = set()
        self.waiters = set()
        self.who_has = set()
        self.processing_on = None
        self.who_wants = set()
        self.nbytes = 0
        self.type = None
        self.exception = None
        self.traceback = None
        self.retries = 0
        self.suspicious = 0
        self.restrictions = None
        self.executing = False
        self.fetch_failures = 0

    def __repr__(self):
        return f"<Task {self.key!r} {self.state}>"

    def __lt__(self, other):
        return self.priority < other.priority

    @property
    def wanted(self):
        return bool(self.who_wants or self.waiters)


class WorkerState:
    """What the scheduler knows of one worker."""

    def __init__(self, address, name, nthreads, memory_limit, nanny, host,
                 pid, stream):
        self.address = address
        self.name = name
        self.nthreads = nthreads
        self.memory_limit = memory_limit
        self.nanny = nanny
        self.host = host
        self.pid = pid
        self.stream = stream
        self.processing = set()
        self.has_what = set()
        self.metrics = {"cpu": 0.0, "memory": 0, "managed_bytes": 0,
                        "executing": 0}
        self.last_seen = time.time()
        self.death_cause = None

    def __repr__(self):
        return f"<WorkerState {self.address} {len(self.processing)} queued>"

    def info(self):
        return {
            "type": "Worker", "address": self.address, "name": self.name,
            "nthreads": self.nthreads, "memory_limit": self.memory_limit,
            "nanny": self.nanny, "host": self.host, "pid": self.pid,
            "last_seen": self.last_seen,
            "metrics": dict(self.metrics, in_memory=len(self.has_what),
                            processing=len(self.processing)),
        }


class ClientState:
    def __init__(self, client_id, stream):
        self.id = client_id
        self.stream = stream
        self.wants = set()


class Scheduler(Server):
    """The scheduler: place tasks on workers, track results, recover.

    Start it with ``await scheduler.start()`` on a running event loop, or
    from a terminal with ``minidask-scheduler``.
    """

    kind = "Scheduler"

    def __init__(self, host="127.0.0.1", port=0, secret=None,
                 dashboard_address=None, security=None, write_secret=True):
        super().__init__(secret=secret, security=security)
        self.host, self.port = host, port
        self.dashboard_address = dashboard_address
        self.dashboard = None
        self.write_secret = write_secret
        self.secret_file = None
        self.tasks = {}
        self.workers = {}
        self.clients = {}
        self.unrunnable = set()
        self.durations = {}  # task group -> average duration, seconds
        self.task_stream = collections.deque(
            maxlen=int(config.get("scheduler.task-stream-length")))
        self.transition_log = collections.deque(maxlen=100_000)
        self.transition_counter = 0
        self.allowed_failures = int(config.get("scheduler.allowed-failures"))
        self.bandwidth = parse_bytes(config.get("scheduler.bandwidth"))
        self.worker_ttl = parse_timedelta(config.get("scheduler.worker-ttl"))
        self.started = time.time()
        self.version = __version__
        self._worker_arrived = asyncio.Event()
        self._tasks_bg = set()
        self.handlers.update({
            "register-worker": self.handle_register_worker,
            "register-client": self.handle_register_client,
            "who-has": self.handle_who_has,
            "scheduler-info": self.handle_scheduler_info,
            "update-data": self.handle_update_data,
            "worker-logs": self.handle_worker_logs,
            "broadcast-run": self.handle_broadcast_run,
            "run-on-scheduler": self.handle_run_on_scheduler,
            "wait-for-workers": self.handle_wait_for_workers,
            "wait-for-worker": self.handle_wait_for_worker,
            "unregister-worker": self.handle_unregister_worker,
            "retire-workers": self.handle_retire_workers,
            "restart": self.handle_restart,
            "worker-exceeded-memory": self.handle_worker_exceeded_memory,
            "task-states": self.handle_task_states,
        })
        self.worker_handlers = {
            "task-started": self.handle_task_started,
            "task-finished": self.handle_task_finished,
            "task-erred": self.handle_task_erred,
            "missing-data": self.handle_missing_data,
            "add-keys": self.handle_add_keys,
            "heartbeat": self.handle_heartbeat,
        }
        self.client_handlers = {
            "update-graph": self.handle_update_graph,
            "client-desires-keys": self.handle_client_desires_keys,
            "client-releases-keys": self.handle_client_releases_keys,
            "cancel-keys": self.handle_cancel_keys,
            "heartbeat-client": lambda client: None,
        }

    # -- lifecycle -------------------------------------------------------------

    async def start(self):
        await self.listen(self.host, self.port)
        register_secret(self.address, self.secret)
        if self.write_secret and self.secret:
            self.secret_file = write_secret_file(
                secret_file_for(self.address), self.secret)
        if self.dashboard_address is not None:
            await self._start_dashboard()
        self._spawn(self._check_heartbeats())
        self.status = "running"
        self.log.info("scheduler at %s", self.address)
        return self

    async def _start_dashboard(self):
        try:
            from minidask.dashboard import start_dashboard
        except ImportError as exc:
            self.log.warning("no dashboard: %s (install bokeh)", exc)
            return
        self.dashboard = await start_dashboard(self, self.dashboard_address)
        self.log.info("dashboard at http://%s:%d/status",
                      self.dashboard.host, self.dashboard.port)

    def _spawn(self, coro):
        task = asyncio.ensure_future(coro)
        self._tasks_bg.add(task)
        task.add_done_callback(self._tasks_bg.discard)
        return task

    async def close(self):
        """Tell workers and clients we are going, then stop serving."""
        if self.status in ("closing", "closed"):
            return
        self.status = "closing"
        self.log.info("scheduler at %s closing", self.address)
        for ws in list(self.workers.values()):
            ws.stream.send({"op": "close", "reason": "scheduler closing"})
        for cs in list(self.clients.values()):
            cs.stream.send({"op": "scheduler-closing"})
        for task in list(self._tasks_bg):
            task.cancel()
        if self.dashboard is not None:
            await self.dashboard.stop()
        for stream in [w.stream for w in self.workers.values()] + [
                c.stream for c in self.clients.values()]:
            await _flush(stream)
        await self.close_server()
        if self.secret_file is not None:
            self.secret_file.unlink(missing_ok=True)
        forget_secret(self.address)
        self.status = "closed"

    async def _check_heartbeats(self):
        """Remove workers that stopped answering (hung, not dead)."""
        while True:
            await asyncio.sleep(max(self.worker_ttl / 4, 0.05))
            now = time.time()
            for ws in list(self.workers.values()):
                if now - ws.last_seen > self.worker_ttl:
                    self.log.warning(
                        "worker %s not heard from for %.1f s: removing it",
                        ws.address, now - ws.last_seen)
                    ws.death_cause = "it stopped sending heartbeats"
                    self.remove_worker(ws.address)

    # -- information -----------------------------------------------------------

    def identity(self, comm=None):
        dashboard = ({"dashboard": self.dashboard.port}
                     if self.dashboard else {})
        return {
            "type": "Scheduler", "id": self.id, "address": self.address,
            "version": self.version, "started": self.started,
            "services": dashboard,
            "workers": {a: ws.info() for a, ws in self.workers.items()},
        }

    def handle_scheduler_info(self, comm=None):
        return self.identity()

    def handle_who_has(self, comm=None, keys=None):
        keys = self.tasks if keys is None else keys
        return {k: [ws.address for ws in self.tasks[k].who_has]
                for k in keys if k in self.tasks}

    def handle_task_states(self, comm=None, keys=None):
        keys = self.tasks if keys is None else keys
        return {k: self.tasks[k].state for k in keys if k in self.tasks}

    async def gather_worker_logs(self, n=None, workers=None):
        addresses = list(self.workers) if workers is None else workers
        replies = await asyncio.gather(
            *(self.pool.call(a, "get-logs", n=n) for a in addresses),
            return_exceptions=True)
        return {a: (r if not isinstance(r, Exception)
                    else [("ERROR", f"could not fetch logs: {r}")])
                for a, r in zip(addresses, replies)}

    async def handle_worker_logs(self, comm=None, n=None, workers=None):
        return await self.gather_worker_logs(n, workers)

    async def handle_broadcast_run(self, comm=None, function=None,
                                   args=(), kwargs=None, workers=None):
        addresses = list(self.workers) if workers is None else workers
        unknown = [a for a in addresses if a not in self.workers]
        if unknown:
            raise ValueError(f"no such worker(s): {', '.join(unknown)}")
        replies = await asyncio.gather(
            *(self.pool.call(a, "run", function=function, args=args,
                             kwargs=kwargs or {}) for a in addresses),
            return_exceptions=True)
        return dict(zip(addresses, replies))

    async def handle_run_on_scheduler(self, comm=None, function=None,
                                      args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        params = inspect.signature(function).parameters
        if "dask_scheduler" in params:
            kwargs["dask_scheduler"] = self
        result = function(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _wait_for_arrivals(self, done, comm):
        """Wait until ``done()``, or until the peer that asked hangs up."""
        while not done():
            self._worker_arrived.clear()
            try:
                await asyncio.wait_for(self._worker_arrived.wait(), 1)
            except asyncio.TimeoutError:
                if comm is not None and comm.peer_gone():
                    raise CommClosedError(
                        f"{comm.peer_address} left while waiting") from None

    async def handle_wait_for_workers(self, comm=None, n=1, timeout=None):
        _expect(n, int, "n")
        _expect(timeout, (int, float), "timeout", optional=True)

        def enough():
            return len(self.workers) >= n
        try:
            await asyncio.wait_for(self._wait_for_arrivals(enough, comm),
                                   timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"only {len(self.workers)} of {n} workers arrived within "
                f"{timeout} s") from None
        return len(self.workers)

    async def handle_wait_for_worker(self, comm=None, address=None,
                                     timeout=None):
        """Wait until the worker at ``address`` has registered."""
        _expect(timeout, (int, float), "timeout", optional=True)
        try:
            await asyncio.wait_for(self._wait_for_arrivals(
                lambda: address in self.workers, comm), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"worker {address} did not join within "
                               f"{timeout} s") from None
        return True

    # -- workers arriving and leaving ------------------------------------------

    async def handle_register_worker(self, comm, address, name, nthreads,
                                     memory_limit=None, nanny=None,
                                     host=None, pid=None, keys=()):
        _check_worker(address, name, nthreads, memory_limit, nanny)
        if address in self.workers:
            await comm.write({"status": "error", "exception": ValueError(
                f"a worker at {address} is already registered")})
            return NO_REPLY
        if name is not None and any(w.name == name
                                    for w in self.workers.values()):
            await comm.write({"status": "error", "exception": ValueError(
                f"a worker named {name!r} is already registered; give each "
                f"worker its own name")})
            return NO_REPLY
        stream = BatchedSend(comm)
        ws = WorkerState(address, name, nthreads, memory_limit, nanny, host,
                         pid, stream)
        self.workers[address] = ws
        await comm.write({"status": "OK", "result": {"id": self.id}})
        self.log.info("worker %s%s joined with %d threads", address,
                      "" if name is None else f" ({name})", nthreads)
        self._worker_arrived.set()
        self._assign_unrunnable()
        try:
            await read_stream(comm, self.worker_handlers, log=self.log,
                              worker=address)
        finally:
            if self.workers.get(address) is ws:
                self.remove_worker(address)
        return NO_REPLY

    def handle_unregister_worker(self, comm=None, address=None):
        """A worker closing by itself says goodbye before it goes."""
        self.remove_worker(address)
        return True

    def remove_worker(self, address):
        """Forget a worker; rerun or recompute what was lost with it."""
        ws = self.workers.pop(address, None)
        if ws is None:
            return
        ws.stream.abort()
        self.pool.forget(address)
        lost = [ts for ts in ws.has_what if ts.who_has == {ws}]
        for ts in ws.has_what:
            ts.who_has.discard(ws)
        running = sorted(ws.processing)
        for ts in running:
            ts.processing_on = None
        ws.processing.clear()
        ws.has_what.clear()
        self.log.info("worker %s left: %d tasks to rerun, %d results lost",
                      address, len(running), len(lost))
        for ts in lost:
            self._lose_data(ts)
        blamed = _likely_running(running, ws.nthreads)
        for ts in running:
            self._rerun_after_death(ts, ws, ts in blamed)
        self.transition_counter += 1

    def _lose_data(self, ts):
        """A result's last copy is gone: recompute it if anything needs it."""
        if ts.spec is None:  # scattered: there is nothing to recompute
            self._set_state(ts, "released")
            self._set_erred(ts, LookupError(
                f"{ts.key!r} was scattered to a worker that is gone; "
                f"scatter it again (broadcast=True keeps copies on every "
                f"worker)"), None)
            return
        self._set_state(ts, "released")
        for cs in ts.who_wants:
            cs.stream.send({"op": "lost-data", "key": ts.key})
        for dep in ts.dependents:
            if dep.state == "waiting":
                dep.waiting_on.add(ts)
        if ts.wanted:
            self._make_waiting([ts])

    def _rerun_after_death(self, ts, ws, blamed):
        if ts.state != "processing":
            return
        ts.executing = False
        if blamed:
            ts.suspicious += 1
        if ts.suspicious >= self.allowed_failures:
            exc = KilledWorker(ts.key, ws.address, ts.suspicious,
                               ws.death_cause)
            self.log.warning("%s", exc)
            self._set_erred(ts, exc, None)
            return
        self._set_state(ts, "released")
        self._make_waiting([ts])

    def handle_worker_exceeded_memory(self, comm=None, worker=None,
                                      memory=None, limit=None):
        ws = self.workers.get(worker)
        if ws is not None:
            ws.death_cause = (f"it exceeded its memory limit: "
                              f"{memory} of {limit} bytes")

    # -- clients ---------------------------------------------------------------

    async def handle_register_client(self, comm, client):
        stream = BatchedSend(comm)
        cs = ClientState(client, stream)
        self.clients[client] = cs
        await comm.write({"status": "OK", "result": self.identity()})
        self.log.info("client %s connected", client)
        try:
            await read_stream(comm, self.client_handlers, log=self.log,
                              client=client)
        finally:
            self.remove_client(client)
        return NO_REPLY

    def remove_client(self, client):
        cs = self.clients.pop(client, None)
        if cs is None:
            return
        cs.stream.abort()
        self.log.info("client %s gone: releasing %d keys", client,
                      len(cs.wants))
        self._release_for(cs, list(cs.wants))

    # -- the graph arriving ----------------------------------------------------

    def handle_update_graph(self, client, tasks, keys):
        """Add tasks; ``keys`` are the ones this client holds futures for.

        ``tasks`` maps each new key to ``{"spec": bytes, "deps": [keys],
        "group": name, "priority": sortable, "retries": n, "workers":
        [addresses or names] or None}``.
        """
        cs = self.clients.get(client)
        if cs is None:
            return
        _check_graph(tasks, keys)
        with no_garbage_collection():
            self._add_graph(cs, tasks, keys)

    def _add_graph(self, cs, tasks, keys):
        new = []
        for key, task in tasks.items():
            if key in self.tasks:
                continue  # the same call submitted again: nothing to do
            ts = TaskState(key, task["spec"], task["group"],
                           task["priority"])
            ts.retries = task.get("retries", 0)
            ts.restrictions = task.get("workers")
            self.tasks[key] = ts
            new.append((ts, task["deps"]))
        missing = []
        for ts, deps in new:
            for dep_key in deps:
                dep = self.tasks.get(dep_key)
                if dep is None:
                    missing.append((ts, dep_key))
                    continue
                ts.dependencies.add(dep)
                dep.dependents.add(ts)
        for key in keys:
            ts = self.tasks.get(key)
            if ts is not None:
                ts.who_wants.add(cs)
                cs.wants.add(ts)
        for ts, dep_key in missing:
            self._set_erred(ts, KeyError(
                f"task {ts.key!r} depends on {dep_key!r}, which the "
                f"scheduler no longer knows: its future was released or "
                f"cancelled before this task was submitted"), None)
        fresh = [ts for ts, _ in new if ts.state == "released"]
        fresh.sort()
        self._make_waiting(fresh)
        for key in keys:  # already known tasks: tell the client what it has
            ts = self.tasks.get(key)
            if ts is not None:
                self._report_to(cs, ts)

    def handle_client_desires_keys(self, client, keys):
        cs = self.clients.get(client)
        if cs is None:
            return
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None:
                cs.stream.send({"op": "task-erred", "key": key,
                                "exception": CancelledError(
                                    f"{key!r} is no longer on the cluster"),
                                "traceback": None})
                continue
            ts.who_wants.add(cs)
            cs.wants.add(ts)
            self._report_to(cs, ts)
            if ts.state == "released":
                self._make_waiting([ts])

    def handle_client_releases_keys(self, client, keys):
        cs = self.clients.get(client)
        if cs is None:
            return
        tasks = [self.tasks[k] for k in keys if k in self.tasks]
        self._release_for(cs, tasks)

    def handle_cancel_keys(self, client, keys, force=False):
        cs = self.clients.get(client)
        if cs is None:
            return
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None:
                continue
            wanters = list(ts.who_wants) if force else [cs]
            for other in wanters:
                other.stream.send({"op": "task-cancelled", "key": key})
                self._release_for(other, [ts])

    def _report_to(self, cs, ts):
        if ts.state == "memory":
            cs.stream.send(self._memory_msg(ts))
        elif ts.state == "erred":
            cs.stream.send({"op": "task-erred", "key": ts.key,
                            "exception": ts.exception,
                            "traceback": ts.traceback})

    def _memory_msg(self, ts, value=None):
        msg = {"op": "key-in-memory", "key": ts.key, "type": ts.type,
               "workers": [ws.address for ws in ts.who_has]}
        if value is not None:
            msg["value"] = value
        return msg

    def _release_for(self, cs, tasks):
        for ts in tasks:
            ts.who_wants.discard(cs)
            cs.wants.discard(ts)
        self._release_unwanted(tasks)

    def handle_update_data(self, comm=None, client=None, data=None):
        """Record data that a client put on workers itself (scatter).

        ``data`` maps key to ``{"workers": [...], "nbytes": n, "type": t}``.
        """
        cs = self.clients.get(client)
        if cs is None:  # nobody would ever release it: free it at once
            for key, info in data.items():
                for address in info["workers"]:
                    ws = self.workers.get(address)
                    if ws is not None and key not in self.tasks:
                        ws.stream.send({"op": "free-keys", "keys": [key]})
            raise ValueError(f"update-data from {client!r}, which is not a "
                             f"connected client")
        for key, info in data.items():
            ts = self.tasks.get(key)
            if ts is None:
                ts = self.tasks[key] = TaskState(key, None, "scatter",
                                                 (0,))
            for address in info["workers"]:
                ws = self.workers.get(address)
                if ws is not None:
                    ts.who_has.add(ws)
                    ws.has_what.add(ts)
            ts.nbytes, ts.type = info["nbytes"], info["type"]
            self._set_state(ts, "memory")
            if cs is not None:
                ts.who_wants.add(cs)
                cs.wants.add(ts)
        return len(data)

    # -- state transitions -----------------------------------------------------

    def _set_state(self, ts, state):
        self.transition_log.append((ts.key, ts.state, state, time.time()))
        self.transition_counter += 1
        ts.state = state

    def _make_waiting(self, tasks):
        """Move released tasks towards running, recomputing their inputs.

        Works through an explicit stack rather than recursion, so that a
        chain of many thousand lost results is recomputed without hitting
        Python's recursion limit.
        """
        stack = list(tasks)
        ready = []
        while stack:
            ts = stack.pop()
            if ts.state != "released":
                continue
            self._set_state(ts, "waiting")
            ts.waiting_on = set()
            for dep in ts.dependencies:
                dep.waiters.add(ts)
                if dep.state == "memory":
                    continue
                if dep.state == "erred":
                    self._set_erred(ts, dep.exception, dep.traceback)
                    break
                ts.waiting_on.add(dep)
                if dep.state == "released":
                    stack.append(dep)
            else:
                if not ts.waiting_on:
                    ready.append(ts)
        ready.sort()
        for ts in ready:
            if ts.state == "waiting" and not ts.waiting_on:
                self._assign(ts)

    def _assign(self, ts):
        ws = self._decide_worker(ts)
        if ws is None:
            self.unrunnable.add(ts)
            return
        self.unrunnable.discard(ts)
        self._set_state(ts, "processing")
        ts.processing_on = ws
        ws.processing.add(ts)
        ws.stream.send({
            "op": "compute-task", "key": ts.key, "spec": ts.spec,
            "priority": ts.priority, "group": ts.group,
            "who_has": {dep.key: [w.address for w in dep.who_has]
                        for dep in ts.dependencies},
            "nbytes": {dep.key: dep.nbytes for dep in ts.dependencies},
        })

    def _assign_unrunnable(self):
        for ts in sorted(self.unrunnable):
            if ts.state == "waiting" and not ts.waiting_on:
                self._assign(ts)
            else:
                self.unrunnable.discard(ts)

    def _decide_worker(self, ts):
        """The worker expected to start ``ts`` soonest (see design note)."""
        candidates = self.workers.values()
        if ts.restrictions:
            allowed = set(ts.restrictions)
            candidates = [ws for ws in candidates
                          if ws.address in allowed or ws.name in allowed]
        if not candidates:
            return None
        duration = self.durations.get(ts.group, UNKNOWN_DURATION)
        input_bytes = sum(dep.nbytes for dep in ts.dependencies)

        def estimate(ws):
            held = sum(dep.nbytes for dep in ts.dependencies
                       if ws in dep.who_has)
            queue = len(ws.processing) / ws.nthreads * duration
            transfer = (input_bytes - held) / self.bandwidth
            return queue + transfer, -held

        return min(candidates, key=estimate)

    def _release_unwanted(self, tasks):
        """Release the results nobody needs, then forget what we can."""
        stack = list(tasks)
        while stack:
            ts = stack.pop()
            if ts.wanted or self.tasks.get(ts.key) is not ts:
                continue
            if ts.state in ("memory", "processing", "waiting"):
                self._release_result(ts)
                for dep in ts.dependencies:
                    dep.waiters.discard(ts)
                    stack.append(dep)
            if not ts.dependents and ts.state in ("released", "erred"):
                self._forget(ts)
                stack.extend(ts.dependencies)

    def _release_result(self, ts):
        if ts.state == "memory":
            for ws in ts.who_has:
                ws.has_what.discard(ts)
                ws.stream.send({"op": "free-keys", "keys": [ts.key]})
            ts.who_has.clear()
        elif ts.state == "processing":
            ws = ts.processing_on
            ws.processing.discard(ts)
            ws.stream.send({"op": "free-keys", "keys": [ts.key]})
            ts.processing_on = None
            ts.executing = False
        self.unrunnable.discard(ts)
        ts.waiting_on.clear()
        self._set_state(ts, "released")

    def _forget(self, ts):
        self._set_state(ts, "forgotten")
        del self.tasks[ts.key]
        for dep in ts.dependencies:
            dep.dependents.discard(ts)
            dep.waiters.discard(ts)

    def _set_erred(self, ts, exception, traceback):
        """Mark ``ts`` and everything downstream of it as failed."""
        stack = [ts]
        while stack:
            t = stack.pop()
            if t.state in ("erred", "memory"):
                continue
            if t.processing_on is not None:
                t.processing_on.processing.discard(t)
                t.processing_on = None
            self.unrunnable.discard(t)
            t.waiting_on.clear()
            t.exception, t.traceback = exception, traceback
            self._set_state(t, "erred")
            for cs in t.who_wants:
                cs.stream.send({"op": "task-erred", "key": t.key,
                                "exception": exception,
                                "traceback": traceback})
            stack.extend(t.dependents)
        self._release_unwanted(list(ts.dependencies) + [ts])

    # -- workers reporting -----------------------------------------------------

    def _processing_here(self, key, worker):
        ts = self.tasks.get(key)
        if ts is None or ts.state != "processing":
            return None
        if ts.processing_on is None or ts.processing_on.address != worker:
            return None
        return ts

    def handle_task_started(self, worker, key):
        ts = self._processing_here(key, worker)
        if ts is not None:
            ts.executing = True

    def handle_task_finished(self, worker, key, nbytes, type, start, stop,
                             thread, value=None):
        """A result is in memory: tell its clients, start what it unblocks.

        ``value`` is the pickle of a small result, passed on to the clients
        waiting for it (never unpickled here, nor kept).
        """
        ws = self.workers.get(worker)
        if ws is None:
            return
        _check_timing(start, stop, thread)
        _expect(nbytes, int, "nbytes")
        _expect(value, bytes, "value", optional=True)
        ts = self._processing_here(key, worker)
        if ts is None:
            self._stale_result(ws, key)
            return
        self._record_stream(ts, worker, start, stop, thread, "ok")
        ws.processing.discard(ts)
        ts.processing_on = None
        ts.executing = False
        ts.nbytes, ts.type = nbytes, type
        ts.who_has.add(ws)
        ws.has_what.add(ts)
        self._set_state(ts, "memory")
        self._learn_duration(ts.group, stop - start)
        ready = []
        for dependent in ts.dependents:
            dependent.waiting_on.discard(ts)
            if dependent.state == "waiting" and not dependent.waiting_on:
                ready.append(dependent)
        for dep in ts.dependencies:
            dep.waiters.discard(ts)
        for cs in ts.who_wants:
            cs.stream.send(self._memory_msg(ts, value))
        ready.sort()
        for dependent in ready:
            self._assign(dependent)
        self._release_unwanted([ts, *ts.dependencies])

    def _stale_result(self, ws, key):
        """A result the scheduler did not ask ``ws`` for (any more)."""
        ts = self.tasks.get(key)
        if ts is not None and ts.state == "memory":
            ts.who_has.add(ws)  # computed twice: keep the spare copy
            ws.has_what.add(ts)
        else:
            ws.stream.send({"op": "free-keys", "keys": [key]})

    def handle_task_erred(self, worker, key, exception, traceback, start,
                          stop, thread):
        _check_timing(start, stop, thread)
        _expect(traceback, str, "traceback", optional=True)
        ts = self._processing_here(key, worker)
        if ts is None:
            return
        self._record_stream(ts, worker, start, stop, thread, "error")
        if ts.retries > 0:
            ts.retries -= 1
            ts.processing_on.processing.discard(ts)
            ts.processing_on = None
            ts.executing = False
            self._set_state(ts, "released")
            self._make_waiting([ts])
            return
        self._set_erred(ts, exception, traceback)

    def handle_missing_data(self, worker, key, dep, holders):
        """``worker`` could not fetch ``dep`` for ``key`` from ``holders``."""
        _expect(holders, (list, tuple), "holders")
        dts = self.tasks.get(dep)
        if dts is not None:
            for address in holders:
                ws = self.workers.get(address)
                if ws is not None and ws in dts.who_has:
                    dts.who_has.discard(ws)
                    ws.has_what.discard(dts)
            if dts.state == "memory" and not dts.who_has:
                self._lose_data(dts)
        ts = self._processing_here(key, worker)
        if ts is None:
            return
        ts.fetch_failures += 1
        if ts.fetch_failures >= MAX_FETCH_FAILURES:
            # Not a dead worker (those are noticed and handled as such):
            # the input exists but will not move. Trying again for ever
            # would hang the client with no word of why.
            self._set_erred(ts, RuntimeError(
                f"task {key!r} could not fetch its input {dep!r} from "
                f"{', '.join(holders) or 'any worker'} in "
                f"{ts.fetch_failures} tries; the workers' logs say why"),
                None)
            return
        ts.processing_on.processing.discard(ts)
        ts.processing_on = None
        ts.executing = False
        self._set_state(ts, "released")
        self._make_waiting([ts])

    def handle_add_keys(self, worker, keys):
        """A worker fetched copies of these results as task inputs."""
        _expect(keys, (list, tuple), "keys")
        ws = self.workers.get(worker)
        if ws is None:
            return
        stale = []
        for key in keys:
            ts = self.tasks.get(key)
            if ts is not None and ts.state == "memory":
                ts.who_has.add(ws)
                ws.has_what.add(ts)
            else:
                stale.append(key)
        if stale:
            ws.stream.send({"op": "free-keys", "keys": stale})

    def handle_heartbeat(self, worker, metrics):
        _check_metrics(metrics)
        ws = self.workers.get(worker)
        if ws is not None:
            ws.metrics = metrics
            ws.last_seen = time.time()

    def _record_stream(self, ts, worker, start, stop, thread, status):
        self.task_stream.append({
            "key": ts.key, "group": ts.group, "worker": worker,
            "thread": thread, "start": start, "stop": stop,
            "status": status})

    def _learn_duration(self, group, duration):
        old = self.durations.get(group)
        self.durations[group] = (duration if old is None
                                 else 0.8 * old + 0.2 * duration)

    # -- cluster-wide operations -----------------------------------------------

    async def handle_retire_workers(self, comm=None, workers=()):
        """Close ``workers`` after copying results only they hold."""
        leaving = [self.workers[a] for a in workers if a in self.workers]
        staying = [ws for ws in self.workers.values() if ws not in leaving]
        for ws in leaving:
            await self._evacuate(ws, staying)
        for ws in leaving:
            ws.death_cause = "it was retired"
            ws.stream.send({"op": "close", "reason": "retired"})
            await _flush(ws.stream)
        return [ws.address for ws in leaving]

    async def _evacuate(self, ws, staying):
        if not staying:
            return
        only_here = [ts for ts in ws.has_what if ts.who_has == {ws}]
        by_target = collections.defaultdict(list)
        for i, ts in enumerate(sorted(only_here)):
            by_target[staying[i % len(staying)]].append(ts)
        for target, tasks in by_target.items():
            try:
                await self.pool.call(
                    target.address, "gather-from",
                    who_has={ts.key: [ws.address] for ts in tasks})
            except (CommError, OSError) as exc:
                self.log.warning("could not copy %d results from retiring "
                                 "worker %s: %s", len(tasks), ws.address, exc)
                continue
            for ts in tasks:
                if ts.state == "memory":
                    ts.who_has.add(target)
                    target.has_what.add(ts)

    async def handle_restart(self, comm=None, timeout=30):
        """Forget every task and restart every worker."""
        self.log.info("restarting: forgetting %d tasks", len(self.tasks))
        for cs in self.clients.values():
            cs.stream.send({"op": "restart"})
            cs.wants.clear()
        for ts in list(self.tasks.values()):
            ts.who_wants.clear()
            ts.waiters.clear()
            ts.dependents.clear()
        self._release_unwanted(list(self.tasks.values()))
        self.tasks.clear()
        self.unrunnable.clear()
        count = len(self.workers)
        nannies = [ws.nanny for ws in self.workers.values() if ws.nanny]
        for ws in list(self.workers.values()):
            if not ws.nanny:
                ws.stream.send({"op": "free-keys", "keys": None})
        results = await asyncio.gather(
            *(self.pool.call(n, "restart", timeout=timeout) for n in nannies),
            return_exceptions=True)
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            raise RuntimeError(f"{len(failed)} workers did not restart: "
                               f"{failed[0]}")
        await self.handle_wait_for_workers(n=count, timeout=timeout)
        return len(self.workers)


# -- checking what peers send ---------------------------------------------
#
# A peer that knows the secret is part of the cluster, but a bug in it (or
# a hand-written client) must not corrupt the scheduler's state for
# everyone else. These checks run before a handler changes anything; a
# failure drops that one peer (see core.read_stream).

def _expect(value, types, what, optional=False):
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, types):
        raise TypeError(f"{what} should be {_names(types)}, not {value!r:.40}")


def _names(types):
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


def _check_worker(address, name, nthreads, memory_limit, nanny):
    _expect(address, str, "address")
    from minidask.comm import parse_address
    parse_address(address)
    _expect(nthreads, int, "nthreads")
    if nthreads < 1:
        raise ValueError(f"a worker needs at least one thread, not {nthreads}")
    _expect(memory_limit, int, "memory_limit", optional=True)
    _expect(nanny, str, "nanny", optional=True)
    _expect(name, (str, int), "name", optional=True)


def _check_graph(tasks, keys):
    _expect(tasks, dict, "tasks")
    _expect(keys, (list, tuple), "keys")
    for key in keys:
        hash(key)
    for key, task in tasks.items():
        _expect(task, dict, f"task {key!r}")
        _expect(task.get("spec"), (bytes, bytearray), "spec")
        _expect(task.get("deps"), (list, tuple), "deps")
        for dep in task["deps"]:
            hash(dep)
        _expect(task.get("group"), str, "group")
        priority = task.get("priority")
        _expect(priority, tuple, "priority")
        for part in priority:
            _expect(part, (int, float), "priority")
        _expect(task.get("retries", 0), int, "retries")
        workers = task.get("workers")
        _expect(workers, (list, tuple), "workers", optional=True)


def _check_metrics(metrics):
    _expect(metrics, dict, "metrics")
    for name in ("cpu", "memory", "managed_bytes", "executing"):
        _expect(metrics.get(name), (int, float), f"metrics[{name!r}]")


def _check_timing(start, stop, thread):
    _expect(start, (int, float), "start")
    _expect(stop, (int, float), "stop")
    _expect(thread, int, "thread", optional=True)


def _likely_running(tasks, nthreads):
    """The tasks a dead worker was probably running when it died.

    Those it said it had started, topped up to one per thread with the
    first in priority order: a worker reports a start only once the task
    has run for a moment (``worker.START_REPORT_DELAY``), so a task that
    kills its worker at once is never reported, and the worker starts
    tasks in priority order. Blaming every queued task instead would, on
    a busy cluster, soon err innocent tasks with KilledWorker.
    """
    started = [ts for ts in tasks if ts.executing]
    others = [ts for ts in tasks if not ts.executing]
    return set(started + others[:max(0, nthreads - len(started))])


async def _flush(stream, timeout=1):
    """Wait, briefly, until a BatchedSend has written what it holds."""
    try:
        await asyncio.wait_for(stream.flush(), timeout)
    except asyncio.TimeoutError:
        pass  # a peer that does not read: it is being dropped anyway


__all__ = ["Scheduler", "KilledWorker", "CancelledError", "TaskState",
           "WorkerState"]
