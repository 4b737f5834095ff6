"""The nanny: starts a worker process, watches it, restarts it.

A nanny runs beside its worker, not inside it: in the cluster's process
for a LocalCluster, in the ``minidask-worker`` process from a terminal. It
starts the worker as a child process (``minidask-worker --no-nanny``), with
the cluster secret in the child's environment rather than on its command
line, where any user could read it with ``ps``. Then it watches:

* a worker that dies unexpectedly (killed, segfault) is started again;
* a worker whose memory passes ``worker.memory.terminate`` of its
  ``memory_limit`` is killed and started again, and the scheduler is told
  why, so that a task that keeps doing this errs with a message that says so;
* a worker that closes because its scheduler went away is not restarted:
  the nanny closes too; but a worker the scheduler dropped because it
  hung (stopped with SIGSTOP, say) is restarted once it wakes, since the
  scheduler is still there to take it back.

It is also a server: the scheduler asks it to ``restart`` its worker for
``Client.restart()``.
"""

import asyncio
import logging
import os
import signal
import sys

import psutil

from minidask import config
from minidask.comm import CommError
from minidask.core import Server
from minidask.utils import format_bytes, parse_timedelta
from minidask.worker import EXIT_SCHEDULER_LOST

logger = logging.getLogger(__name__)


class Nanny(Server):
    """Keep one worker process alive; see the module docstring."""

    kind = "Nanny"

    def __init__(self, scheduler_address, nthreads=1, memory_limit=None,
                 name=None, host="127.0.0.1", secret=None,
                 silence_logs=logging.WARNING, worker_port=0,
                 python=None, env=None, start_timeout=None, security=None):
        super().__init__(secret=secret, security=security)
        self.scheduler_address = scheduler_address
        self.nthreads = nthreads
        self.memory_limit = memory_limit
        self.name = name
        self.host = host
        self.silence_logs = silence_logs
        self.worker_port = worker_port
        self.python = python or sys.executable
        self.env = dict(env or {})
        self.start_timeout = start_timeout or parse_timedelta(
            config.get("comm.timeouts.connect")) + 20
        self.process = None
        self.worker_address = None
        self._started = None
        self._watcher = None
        self._monitor = None
        self._restarting = False
        self.closed_event = asyncio.Event()
        self.handlers.update({
            "worker-started": self.handle_worker_started,
            "restart": self.handle_restart,
            "close": self.handle_close,
        })

    async def start(self):
        await self.listen(self.host, 0)
        self.status = "running"
        await self.start_worker()
        self._monitor = asyncio.ensure_future(self._watch_memory())
        return self

    # -- the worker process ------------------------------------------------------

    def _command(self):
        cmd = [self.python, "-m", "minidask.cli", "worker",
               self.scheduler_address, "--no-nanny",
               "--nthreads", str(self.nthreads), "--nanny-address",
               self.address,
               "--host", self.host, "--port", str(self.worker_port),
               "--log-level", str(self.silence_logs)]
        if self.memory_limit:
            cmd += ["--memory-limit", str(self.memory_limit)]
        if self.name is not None:
            cmd += ["--name", str(self.name)]
        if self.security is not None:
            cmd += self.security.cli_args()
        return cmd

    async def start_worker(self):
        """Start a worker process; return once it listens.

        A process that exits before it has told us its address failed to
        start (a bad environment, say); up to ``nanny.max-start-failures``
        such failures in a row are retried, then the error is raised.
        """
        failures, limit = 0, int(config.get("nanny.max-start-failures"))
        while True:
            try:
                return await self._start_once()
            except RuntimeError:
                failures += 1
                if failures >= limit or self.status != "running":
                    raise
                self.log.warning("worker failed to start (%d of %d tries)",
                                 failures, limit)

    async def _start_once(self):
        loop = asyncio.get_running_loop()
        started = self._started = loop.create_future()
        # Unbuffered, so that what a task prints reaches the worker's
        # standard output when it is printed, not when the worker exits.
        env = {**os.environ, **self.env, "MINIDASK_SECRET": self.secret,
               "PYTHONUNBUFFERED": "1"}
        if config.get("nanny.huge-pages"):
            env.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
        self.process = await asyncio.create_subprocess_exec(
            *self._command(), env=env, stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True)
        if self.status != "running":  # closed while the process started
            await self.kill_worker()
            raise RuntimeError(f"nanny {self.address} closed while its "
                               f"worker was starting")
        self.log.info("nanny %s started worker process %d", self.address,
                      self.process.pid)
        self._watcher = asyncio.ensure_future(self._watch(self.process))
        try:
            self.worker_address = await asyncio.wait_for(
                asyncio.shield(started), self.start_timeout)
        except asyncio.TimeoutError:
            await self.kill_worker()
            raise RuntimeError(
                f"worker process {self.process.pid} did not start within "
                f"{self.start_timeout:g} s") from None
        return self.worker_address

    def handle_worker_started(self, comm=None, address=None, pid=None):
        if self._started is not None and not self._started.done():
            self._started.set_result(address)

    async def _watch(self, process):
        """Wait for ``process`` to end, then decide what happens next."""
        code = await process.wait()
        started = self._started
        if not started.done():  # _start_once raises; its caller retries
            started.set_exception(RuntimeError(
                f"worker process {process.pid} exited with status {code} "
                f"before it started; its output above says why"))
            started.exception()
            return
        if (self.status != "running" or self._restarting
                or process is not self.process):
            return
        if code == 0 or (code == EXIT_SCHEDULER_LOST
                         and not await self._scheduler_answers()):
            self.log.info("worker process %d closed (status %d): the nanny "
                          "closes too", process.pid, code)
            await self.close()
            return
        self.log.warning("worker process %d died (status %s): restarting it",
                         process.pid, code)
        try:
            await self.start_worker()
        except RuntimeError as exc:
            if self.status == "running":
                self.log.error("could not restart the worker: %s", exc)
            await self.close()

    async def _scheduler_answers(self):
        """Is the scheduler still there? (It drops workers that hang.)"""
        try:
            await self.pool.call(self.scheduler_address, "identity",
                                 connect_timeout=2)
            return True
        except (CommError, OSError):
            return False

    async def kill_worker(self, graceful=False):
        """Stop the worker process; SIGTERM first if ``graceful``."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        try:
            if graceful:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 5)
                    return
                except asyncio.TimeoutError:
                    pass
            process.kill()
        except ProcessLookupError:
            pass
        await process.wait()

    async def _watch_memory(self):
        if not self.memory_limit:
            return
        interval = parse_timedelta(config.get("worker.memory.monitor-interval"))
        fraction = float(config.get("worker.memory.terminate"))
        while self.status == "running":
            await asyncio.sleep(interval)
            process = self.process
            if process is None or process.returncode is not None:
                continue
            try:
                rss = psutil.Process(process.pid).memory_info().rss
            except psutil.Error:
                continue
            if rss > fraction * self.memory_limit:
                await self._kill_for_memory(rss)

    async def _kill_for_memory(self, rss):
        self.log.warning(
            "worker %s uses %s, over %d%% of its %s memory limit: killing "
            "and restarting it", self.worker_address, format_bytes(rss),
            round(100 * float(config.get("worker.memory.terminate"))),
            format_bytes(self.memory_limit))
        try:
            await self.pool.call(self.scheduler_address,
                                 "worker-exceeded-memory",
                                 worker=self.worker_address, memory=rss,
                                 limit=self.memory_limit)
        except (CommError, OSError):
            pass  # the scheduler will learn of the death all the same
        await self.kill_worker()

    # -- requests --------------------------------------------------------------------

    async def handle_restart(self, comm=None, timeout=30):
        self._restarting = True
        try:
            await self.kill_worker(graceful=False)
            return await self.start_worker()
        finally:
            self._restarting = False

    async def handle_close(self, comm=None):
        asyncio.ensure_future(self.close())
        return "closing"

    async def close(self, graceful=True):
        if self.status in ("closing", "closed"):
            return
        self.status = "closing"
        if self._monitor is not None:
            self._monitor.cancel()
        await self.kill_worker(graceful=graceful)
        await self.close_server()
        self.status = "closed"
        self.closed_event.set()

    async def finished(self):
        await self.closed_event.wait()

    def identity(self, comm=None):
        return {"type": "Nanny", "id": self.id, "address": self.address,
                "worker": self.worker_address,
                "pid": self.process.pid if self.process else None}


__all__ = ["Nanny"]
