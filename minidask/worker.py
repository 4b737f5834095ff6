"""The worker: runs tasks and holds their results.

A worker connects to the scheduler, registers, and then keeps one stream
open to it. On that stream the scheduler sends ``compute-task`` messages;
the worker fetches each task's missing inputs straight from the peer
workers that hold them (the ``get-data`` handler below answers such
requests), runs the task in its thread pool of ``nthreads`` threads, keeps
the result in memory, and reports back with ``task-finished`` or
``task-erred``. Every ``worker.heartbeat-interval`` it reports its CPU and
memory use, which the scheduler uses to notice a worker that hangs.

Whatever a task prints goes to the worker's log (and to the worker's
standard output): ``client.get_worker_logs()`` shows it.

Under a nanny (the usual case) the worker runs in a process of its own,
started as ``minidask-worker --no-nanny``; the nanny restarts it if it
dies. A worker whose scheduler goes away closes itself: workers do not
outlive their scheduler.
"""

import asyncio
import heapq
import inspect
import io
import itertools
import logging
import os
import pickle
import sys
import threading
import time
import traceback
import queue

import cloudpickle
import psutil

from minidask import comm as comms
from minidask import config
from minidask.comm import CommClosedError, CommError
from minidask.core import (BatchedSend, RemoteError, Server, flush_queued,
                           read_stream)
from minidask.task import FunctionCache, run_spec
from minidask.utils import format_bytes, parse_bytes, parse_timedelta

logger = logging.getLogger(__name__)
print_logger = logging.getLogger("minidask.print")

EXIT_SCHEDULER_LOST = 3  # exit status of a worker process whose scheduler left
# A task still running this long (seconds) after it started is reported
# to the scheduler as started; see Worker._note_started.
START_REPORT_DELAY = 0.05
# Results whose pickle is at most this many bytes travel with the message
# that says they are done; see _small_pickle.
INLINE_RESULT_BYTES = 1024


class MissingData(Exception):
    """No holder could hand over a task's input."""

    def __init__(self, key, holders):
        self.key, self.holders = key, list(holders)
        super().__init__(f"could not fetch {key!r} from {holders}")


class WorkerTask:
    __slots__ = ("key", "spec", "priority", "group", "who_has", "deps")

    def __init__(self, key, spec, priority, group, who_has):
        self.key = key
        self.spec = spec
        self.priority = priority
        self.group = group
        self.who_has = who_has
        self.deps = list(who_has)


# -- print() inside tasks --------------------------------------------------

_task_context = threading.local()


class _TaskOutput:
    """sys.stdout for a process with workers: prints in tasks are logged.

    Writes from a thread that is running a task go, line by line, to that
    worker's log; all writes also reach the original stream.
    """

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        log = getattr(_task_context, "log", None)
        if log is not None:
            pending = getattr(_task_context, "pending", "") + text
            *lines, _task_context.pending = pending.split("\n")
            for line in lines:
                log.info("%s", line)
        return self._stream.write(text)

    def flush(self):
        return self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


_capture_lock = threading.Lock()


def _capture_prints():
    with _capture_lock:  # two task threads must not wrap it twice
        if not isinstance(sys.stdout, _TaskOutput):
            sys.stdout = _TaskOutput(sys.stdout)


# -- the threads that run tasks --------------------------------------------

class TaskThreads:
    """A fixed set of daemon threads running tasks from a queue.

    Lighter than concurrent.futures' pool on the path of every task, and
    daemon threads do not keep a closing worker process alive while a
    long task runs: tasks cannot be interrupted, so a closing worker
    abandons them.

    Outcomes go back to the event loop in batches: a thread that finishes
    while the loop has not yet collected the outcomes before it adds its
    own to them instead of waking the loop once more. The worker queues a
    task or so ahead of its threads, so a thread that finishes starts the
    next task at once, and several outcomes often go back together.
    """

    def __init__(self, nthreads, name, run, done):
        self.loop = asyncio.get_running_loop()
        self.jobs = queue.SimpleQueue()
        self.run, self.done = run, done
        self.running = [None] * nthreads  # each thread's job, if it has one
        self._finished = []
        self._lock = threading.Lock()  # guards _finished
        self.threads = [
            threading.Thread(target=self._serve, args=(i,),
                             name=f"{name}-{i}", daemon=True)
            for i in range(nthreads)]
        for thread in self.threads:
            thread.start()

    def submit(self, *job):
        self.jobs.put(job)

    def busy(self):
        """The jobs that threads are running now."""
        return [job for job in self.running if job is not None]

    def _serve(self, index):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self.running[index] = job[0]
            outcome = self.run(*job)
            self.running[index] = None
            with self._lock:
                self._finished.append((job[0], outcome))
                first = len(self._finished) == 1
            if first:
                try:
                    self.loop.call_soon_threadsafe(self._collect)
                except RuntimeError:
                    return  # the event loop is closed: the worker is gone

    def _collect(self):
        with self._lock:
            finished, self._finished = self._finished, []
        for job, outcome in finished:
            self.done(job, outcome)
        flush_queued()  # report them now, not a turn of the loop later

    def shutdown(self):
        for _ in self.threads:
            self.jobs.put(None)


# -- sizes ------------------------------------------------------------------

def sizeof(value):
    """A cheap estimate of how many bytes a result holds."""
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        return len(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        sample = list(itertools.islice(value, 10))
        per_item = (sum(sizeof(x) for x in sample) / len(sample)
                    if sample else 0)
        return int(sys.getsizeof(value) + per_item * len(value))
    if isinstance(value, dict):
        return sys.getsizeof(value) + sum(
            sizeof(k) + sizeof(v)
            for k, v in itertools.islice(value.items(), 10)) * max(
                1, len(value)) // max(1, min(len(value), 10))
    return sys.getsizeof(value)


class Worker(Server):
    """Run tasks in a thread pool and hold their results.

    ``Worker(scheduler_address, nthreads=1, memory_limit=None, name=None)``;
    start it with ``await worker.start()``, or from a terminal with
    ``minidask-worker ADDRESS``.
    """

    kind = "Worker"

    def __init__(self, scheduler_address, nthreads=1, memory_limit=None,
                 name=None, host="127.0.0.1", port=0, secret=None,
                 nanny=None, security=None, log_everything=False):
        comms.parse_address(scheduler_address)
        if not isinstance(nthreads, int) or nthreads < 1:
            raise ValueError(f"nthreads={nthreads!r}: a worker needs a whole "
                             f"number of threads, 1 or more")
        super().__init__(secret=secret, log_everything=log_everything,
                         security=security)
        self.scheduler_address = scheduler_address
        self.nthreads = nthreads
        self.memory_limit = (parse_bytes(memory_limit)
                             if memory_limit else None)
        self.name = name
        self.host, self.port = host, port
        self.nanny = nanny
        self.data = {}
        self.nbytes = {}
        self.tasks = {}
        self.ready = []  # heap of (priority, sequence, key)
        self.handed_out = 0  # tasks given to the threads, running or waiting
        self._unreported = set()  # running, not yet reported as started
        self._start_report = None  # the timer that will report them
        self.in_flight = {}  # key -> future of a fetch under way
        self.functions = FunctionCache()
        self.threads = None  # started with the worker, on its loop
        self._sequence = itertools.count()
        self._thread_index = {}
        self.scheduler = None  # the BatchedSend stream to the scheduler
        self.scheduler_lost = False
        self.closed_event = asyncio.Event()
        self._process = psutil.Process()
        self._memory_warned = False
        self.handlers.update({
            "get-data": self.handle_get_data,
            "put-data": self.handle_put_data,
            "gather-from": self.handle_gather_from,
            "run": self.handle_run,
            "close": self.handle_close,
        })
        self.stream_handlers = {
            "compute-task": self.handle_compute_task,
            "free-keys": self.handle_free_keys,
            "close": self.handle_close_stream,
        }

    # -- lifecycle -------------------------------------------------------------

    async def start(self):
        await self.listen(self.host, self.port)
        self.threads = TaskThreads(self.nthreads, "minidask-task",
                                   self._execute, self._task_done)
        _capture_prints()
        if self.nanny:  # tell the nanny we are alive before anything else
            await self.pool.call(self.nanny, "worker-started",
                                 address=self.address, pid=os.getpid())
        comm = await self.pool.connect(self.scheduler_address)
        await comm.write({
            "op": "register-worker", "address": self.address,
            "name": self.name, "nthreads": self.nthreads,
            "memory_limit": self.memory_limit, "nanny": self.nanny,
            "host": self.host, "pid": os.getpid()})
        reply = await comm.read()
        if reply.get("status") != "OK":
            comm.abort()
            await self.close_server()
            raise reply["exception"]
        self.scheduler = BatchedSend(comm)
        self.status = "running"
        self.log.info("worker at %s, %d threads, memory limit %s, "
                      "scheduler %s", self.address, self.nthreads,
                      format_bytes(self.memory_limit)
                      if self.memory_limit else "none",
                      self.scheduler_address)
        self._background = [
            asyncio.ensure_future(self._listen_to_scheduler(comm)),
            asyncio.ensure_future(self._heartbeat()),
        ]
        return self

    async def _listen_to_scheduler(self, comm):
        await read_stream(comm, self.stream_handlers)
        if self.status == "running":
            self.log.warning("lost the scheduler at %s: closing",
                             self.scheduler_address)
            self.scheduler_lost = True
            await self.close("scheduler lost", tell_scheduler=False)

    async def _heartbeat(self):
        interval = parse_timedelta(config.get("worker.heartbeat-interval"))
        self._process.cpu_percent()
        while self.status == "running":
            self.scheduler.send({"op": "heartbeat",
                                 "metrics": self.metrics()})
            await asyncio.sleep(interval)

    def metrics(self):
        memory = self._process.memory_info().rss
        self._check_memory(memory)
        return {
            "cpu": self._process.cpu_percent(),
            "memory": memory,
            "managed_bytes": sum(self.nbytes.values()),
            "executing": len(self.threads.busy()) if self.threads else 0,
            "ready": len(self.ready),
        }

    def _check_memory(self, memory):
        if not self.memory_limit:
            return
        high = memory > float(config.get("worker.memory.warn")) * \
            self.memory_limit
        if high and not self._memory_warned:
            self.log.warning(
                "worker %s is using %s of its %s memory limit: results it "
                "holds take %s", self.address, format_bytes(memory),
                format_bytes(self.memory_limit),
                format_bytes(sum(self.nbytes.values())))
        self._memory_warned = high

    async def close(self, reason="closing", tell_scheduler=True):
        """Stop: unregister (unless the scheduler is why), then shut down.

        Unregistering first means the scheduler has moved this worker's
        work elsewhere, and logged its leaving, by the time it exits.
        """
        if self.status in ("closing", "closed"):
            return
        self.status = "closing"
        self.log.info("worker %s closing: %s", self.address, reason)
        for task in getattr(self, "_background", []):
            task.cancel()
        if tell_scheduler and self.scheduler is not None:
            await self._unregister()
        if self.scheduler is not None:
            self.scheduler.abort()
        if self.threads is not None:
            self.threads.shutdown()
        if self._start_report is not None:
            self._start_report.cancel()
        await self.close_server()
        self.data.clear()
        self.status = "closed"
        self.closed_event.set()

    async def _unregister(self):
        try:
            await asyncio.wait_for(self.pool.call(
                self.scheduler_address, "unregister-worker",
                connect_timeout=1, address=self.address), 2)
        except (CommError, OSError, asyncio.TimeoutError):
            pass  # it will see the connection close instead

    async def finished(self):
        await self.closed_event.wait()

    def identity(self, comm=None):
        return {"type": "Worker", "id": self.id, "address": self.address,
                "name": self.name, "nthreads": self.nthreads,
                "memory_limit": self.memory_limit,
                "scheduler": self.scheduler_address, "nanny": self.nanny,
                "keys": len(self.data)}

    # -- tasks arriving ----------------------------------------------------------

    def handle_compute_task(self, key, spec, priority, group, who_has,
                            nbytes):
        """Take on a task: fetch its missing inputs, then queue it."""
        if key in self.data:
            self._send_finished(key, time.time(), time.time(), None)
            return
        task = WorkerTask(key, spec, priority, group, who_has)
        self.tasks[key] = task
        missing = {d: who_has[d] for d in task.deps if d not in self.data}
        if missing:
            asyncio.ensure_future(self._fetch_then_queue(task, missing))
        else:
            self._queue(task)

    def _queue(self, task):
        heapq.heappush(self.ready,
                       (task.priority, next(self._sequence), task.key))
        self._run_ready()

    def handle_free_keys(self, keys):
        if keys is None:  # a restart: forget everything
            keys = set(self.data) | set(self.tasks)
        for key in keys:
            self.data.pop(key, None)
            self.nbytes.pop(key, None)
            self.tasks.pop(key, None)

    def handle_close_stream(self, reason="asked to"):
        asyncio.ensure_future(self.close(reason, tell_scheduler=False))

    # -- fetching inputs from peers ----------------------------------------------

    async def _fetch_then_queue(self, task, missing):
        try:
            await self._fetch(missing)
        except MissingData as exc:
            if self.tasks.get(task.key) is task:
                del self.tasks[task.key]
                self.log.info("task %s: input %s missing from %s",
                              task.key, exc.key, exc.holders)
                self.scheduler.send({"op": "missing-data", "key": task.key,
                                     "dep": exc.key, "holders": exc.holders})
            return
        if self.tasks.get(task.key) is task:
            self._queue(task)

    async def _fetch(self, missing):
        """Fetch ``{key: holders}``, one request per holder, at most once."""
        loop = asyncio.get_running_loop()
        waits, by_holder = [], {}
        for key, holders in missing.items():
            if key in self.data:
                continue
            if key not in self.in_flight:
                self.in_flight[key] = loop.create_future()
                holder = holders[hash(key) % len(holders)] if holders else None
                by_holder.setdefault(holder, []).append(key)
            waits.append(self.in_flight[key])
        for holder, keys in by_holder.items():
            asyncio.ensure_future(self._gather_keys(holder, keys, missing))
        for wait in waits:
            await wait

    async def _gather_keys(self, holder, keys, holders):
        got = {}
        try:
            if holder is not None:
                got = await self._get_data(holder, keys)
            for key in keys:
                if key not in got:
                    others = [h for h in holders[key] if h != holder]
                    for other in others:
                        got.update(await self._get_data(other, [key]))
                        if key in got:
                            break
        finally:  # every waiter hears back, whatever went wrong above
            self._settle_fetches(keys, got, holders)

    def _settle_fetches(self, keys, got, holders):
        for key in keys:
            future = self.in_flight.pop(key)
            if key in got:
                self.data[key] = got[key]
                self.nbytes[key] = sizeof(got[key])
                future.set_result(True)
            else:
                future.set_exception(MissingData(key, holders[key]))
                future.exception()  # retrieved: no "never retrieved" noise
        fetched = [k for k in keys if k in got]
        if fetched:
            self.scheduler.send({"op": "add-keys", "keys": fetched})

    async def _get_data(self, address, keys):
        try:
            return await self.pool.call(address, "get-data", keys=keys)
        except (CommError, OSError) as exc:
            self.log.info("could not fetch %d keys from %s: %s",
                          len(keys), address, exc)
            return {}

    def handle_get_data(self, comm=None, keys=()):
        return {k: comms.to_wire(self.data[k]) for k in keys
                if k in self.data}

    def handle_put_data(self, comm=None, data=None):
        for key, value in data.items():
            self.data[key] = value
            self.nbytes[key] = sizeof(value)
        return {k: (self.nbytes[k], type(v).__name__)
                for k, v in data.items()}

    async def handle_gather_from(self, comm=None, who_has=None):
        """Fetch copies of results from their holders (for retiring)."""
        if not isinstance(who_has, dict) or not all(
                isinstance(h, list) and all(isinstance(a, str) for a in h)
                for h in who_has.values()):
            raise TypeError("who_has maps each key to a list of addresses")
        await self._fetch(who_has)
        return len(who_has)

    # -- running tasks -------------------------------------------------------------

    def _run_ready(self):
        """Hand ready tasks to the threads, in priority order.

        Up to two per thread: one running and one waiting, so that a
        thread that finishes need not wait for this loop to give it the
        next. A task that arrives later with a higher priority can be
        overtaken by at most one task per thread.
        """
        while self.ready and self.handed_out < 2 * self.nthreads:
            _, _, key = heapq.heappop(self.ready)
            task = self.tasks.get(key)
            if task is None:
                continue  # freed while it waited
            self.handed_out += 1
            self._note_started(key)
            inputs = {d: self.data[d] for d in task.deps}
            self.threads.submit(task, task.spec, inputs)

    def _note_started(self, key):
        """Tell the scheduler of a start, if the task is still running later.

        The scheduler needs to know which tasks were running only when a
        worker dies, to blame them. Most tasks finish well within
        ``START_REPORT_DELAY``; for them, a message of its own would cost
        the scheduler a wake-up on the path of every task.
        """
        self._unreported.add(key)
        self._arm_start_report()

    def _arm_start_report(self):
        if self._unreported and self._start_report is None:
            self._start_report = asyncio.get_running_loop().call_later(
                START_REPORT_DELAY, self._report_starts)

    def _report_starts(self):
        """Report the unreported tasks a thread is running now.

        One still waiting for a thread starts when the task before it
        finishes, and ``_task_done`` arms this again then.
        """
        self._start_report = None
        running = {task.key for task in self.threads.busy()}
        started = self._unreported & running
        for key in started:
            self.scheduler.send({"op": "task-started", "key": key})
        self._unreported -= started

    def _execute(self, task, spec, inputs):
        """Run one task; this is the only code that runs in the pool."""
        if self.tasks.get(task.key) is not task:
            return None  # freed while it waited for a thread
        thread = self._thread_index.setdefault(
            threading.get_ident(), len(self._thread_index))
        self._threads.add(threading.get_ident())
        _task_context.log = self.print_log
        # Again for each task: sys.stdout may have been replaced since the
        # worker started (contextlib.redirect_stdout, a test runner).
        _capture_prints()
        start = time.time()
        try:
            result = run_spec(spec, inputs, self.functions)
            return "ok", result, None, start, time.time(), thread
        except Exception as exc:
            tb = "".join(traceback.format_exception(
                type(exc), exc, exc.__traceback__.tb_next))
            return "error", exc, tb, start, time.time(), thread
        finally:
            _task_context.log = None

    @property
    def print_log(self):
        return logging.LoggerAdapter(print_logger, {"server": self.id})

    def _task_done(self, task, outcome):
        self.handed_out -= 1
        self._unreported.discard(task.key)
        if self.status == "running":
            self._run_ready()
            self._arm_start_report()
        if self.tasks.get(task.key) is not task:
            return  # freed while it ran
        del self.tasks[task.key]
        status, value, tb, start, stop, thread = outcome
        if status == "ok":
            self.data[task.key] = value
            self.nbytes[task.key] = sizeof(value)
            self._send_finished(task.key, start, stop, thread)
        else:
            self.log.info("task %s raised %s: %s", task.key,
                          type(value).__name__, value)
            self.scheduler.send({
                "op": "task-erred", "key": task.key,
                "exception": _sendable(value), "traceback": tb,
                "start": start, "stop": stop, "thread": thread})

    def _send_finished(self, key, start, stop, thread):
        msg = {"op": "task-finished", "key": key, "nbytes": self.nbytes[key],
               "type": type(self.data[key]).__name__, "start": start,
               "stop": stop, "thread": thread}
        if self.nbytes[key] <= INLINE_RESULT_BYTES:
            value = _small_pickle(self.data[key])
            if value is not None:
                msg["value"] = value
        self.scheduler.send(msg)

    # -- other requests --------------------------------------------------------------

    async def handle_run(self, comm=None, function=None, args=(),
                         kwargs=None):
        """Run ``function`` (pickled) here, for Client.run."""
        func = pickle.loads(function)
        kwargs = dict(kwargs or {})
        if "dask_worker" in inspect.signature(func).parameters:
            kwargs["dask_worker"] = self
        result = func(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def handle_close(self, comm=None, reason="asked to"):
        asyncio.ensure_future(self.close(reason))
        return "closing"


def _small_pickle(value):
    """The pickle of a small result, or None if it is not small or fails.

    A small result rides with the message that says it is done, so that
    a client waiting for it need not ask this worker for it: a round trip
    saved on the path of every small task. The scheduler passes it on
    without unpickling it.

    ``sizeof`` is exact for numbers, strings and bytes. Any other object
    may hold far more than its own size says (an instance with a long
    list in an attribute), so it is pickled into a buffer that gives up
    past ``INLINE_RESULT_BYTES``, after a 64 KiB frame at most.
    """
    if type(value) in _FLAT:
        data = pickle.dumps(value, protocol=5)
    else:
        data = _bounded_pickle(value, pickle.Pickler)
        if data is not None and b"__main__" in data:
            data = _bounded_pickle(value, cloudpickle.Pickler)
    return data if data is not None and len(data) <= INLINE_RESULT_BYTES \
        else None


_FLAT = frozenset([int, float, complex, bool, str, bytes, type(None)])


class _TooLarge(Exception):
    pass


class _BoundedBuffer(io.BytesIO):
    def write(self, data):
        if self.tell() + memoryview(data).nbytes > INLINE_RESULT_BYTES:
            raise _TooLarge
        return super().write(data)


def _bounded_pickle(value, pickler):
    buffer = _BoundedBuffer()
    try:
        pickler(buffer, protocol=5).dump(value)
    except Exception:  # too large, or it does not pickle: the client
        return None    # asks for it, and hears of the error then
    return buffer.getvalue()


def _sendable(exc):
    """The exception itself if it pickles, else one carrying its text."""
    try:
        comms.dumps(exc)
        return exc
    except Exception:
        return RemoteError(f"{type(exc).__name__}: {exc}")


__all__ = ["Worker", "EXIT_SCHEDULER_LOST"]
