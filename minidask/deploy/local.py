"""LocalCluster: a scheduler and workers on this machine.

The scheduler runs inside this process, on minidask's event loop thread.
Each worker runs either in a process of its own under a nanny (the
default, ``processes=True``: tasks run in parallel even when they hold
Python's GIL, and a crashing task takes only its worker down) or as
threads in this process (``processes=False``: quicker to start, and
results need no copying between processes).
"""

import inspect
import logging

from minidask.deploy import sizing
from minidask.deploy.cluster import Cluster
from minidask.comm import parse_host_port
from minidask.loop import sync
from minidask import logs
from minidask.nanny import Nanny
from minidask.scheduler import Scheduler
from minidask.worker import Worker

logger = logging.getLogger(__name__)


class _WorkerHandle:
    """A worker (or a nanny and its worker) this cluster started."""

    def __init__(self, server):
        self.server = server

    @property
    def address(self):
        server = self.server
        return server.worker_address if isinstance(server, Nanny) \
            else server.address

    async def close(self):
        await self.server.close()


class LocalCluster(Cluster):
    """A scheduler and workers on this machine.

    Parameters
    ----------
    n_workers : int, optional
        How many workers to start. By default the cluster sizes itself to
        the cores this process may use (CPU affinity and container limits
        included): up to 4 cores, one single-threaded worker per core;
        above that, about sqrt(cores) workers with several threads each.
    threads_per_worker : int, optional
        Threads in each worker's pool, that is how many tasks it runs at
        once. Given alone, the number of workers follows from it.
    processes : bool
        True (default): each worker in its own process, under a nanny
        that restarts it if it dies. False: workers as threads in this
        process.
    memory_limit : "auto", int, str, float or None
        Memory each worker may use: "auto" (default) shares the machine's
        memory among the workers; ``"2 GiB"`` or a number of bytes; a
        fraction like ``0.5`` of the machine's memory; None for no limit.
        With ``processes=True`` a worker's nanny restarts it when it
        passes 95% of this.
    host : str
        Where the scheduler listens; "127.0.0.1" (default) lets only this
        machine in.
    scheduler_port : int
        0 (default) picks a free port; a port that is taken is an error.
    dashboard_address : str or None
        Where the dashboard listens, ":8787" by default (on ``host``); if
        that port is taken it moves to a free one and says so. None: no
        dashboard.
    silence_logs : int
        Log level below which the scheduler's and workers' log lines are
        not printed (they are still kept for ``get_logs()``).
    name : str, optional
        A name shown in reprs and logs.

    Examples
    --------
    >>> from minidask import LocalCluster, Client
    >>> cluster = LocalCluster(n_workers=2, threads_per_worker=1)
    >>> client = Client(cluster)
    >>> client.submit(pow, 2, 10).result()
    1024
    >>> cluster.scale(3)          # one more worker
    >>> client.close(); cluster.close()
    """

    def __init__(self, n_workers=None, threads_per_worker=None,
                 processes=True, memory_limit="auto", host="127.0.0.1",
                 scheduler_port=0, dashboard_address=":8787",
                 silence_logs=logging.WARNING, name=None, **worker_kwargs):
        _check_unknown(worker_kwargs)
        cores = sizing.cpu_count()
        n_workers, threads = sizing.worker_split(
            cores, n_workers, threads_per_worker)
        self.threads_per_worker = threads
        self.memory_limit = sizing.memory_per_worker(memory_limit, n_workers)
        self.processes = processes
        self.host = host
        self.scheduler_port = scheduler_port
        self.dashboard_address = _dashboard_address(dashboard_address, host)
        self.silence_logs = _log_level(silence_logs)
        logs.setup(self.silence_logs)
        self.scheduler = None
        super().__init__(name=name)
        sync(self._start(n_workers))

    async def _start_scheduler(self):
        self.scheduler = Scheduler(
            host=self.host, port=self.scheduler_port, secret=self.secret,
            dashboard_address=self.dashboard_address)
        await self.scheduler.start()
        self.scheduler_address = self.scheduler.address
        if self.scheduler.dashboard is not None:
            self.dashboard_port = self.scheduler.dashboard.port

    async def _start_worker(self, name):
        options = dict(nthreads=self.threads_per_worker,
                       memory_limit=self.memory_limit, name=name,
                       host=self.host, secret=self.secret)
        if self.processes:
            server = Nanny(self.scheduler_address,
                           silence_logs=self.silence_logs, **options)
            self.log_buffer.owners.add(server.id)
        else:
            server = Worker(self.scheduler_address, **options)
        await server.start()
        return _WorkerHandle(server)

    async def _stop_scheduler(self):
        if self.scheduler is not None:
            await self.scheduler.close()


def _check_unknown(kwargs):
    if kwargs:
        known = sorted(inspect.signature(LocalCluster).parameters)
        known.remove("worker_kwargs")
        raise TypeError(
            f"LocalCluster got an unknown keyword argument "
            f"{next(iter(kwargs))!r}; it takes {', '.join(known)}")


def _dashboard_address(address, host):
    if address is None or address is False:
        return None
    dash_host, port = parse_host_port(address, 8787)
    return f"{dash_host or host}:{port}"


def _log_level(silence_logs):
    if silence_logs is False or silence_logs is None:
        return logging.INFO
    if silence_logs is True:
        return logging.WARNING
    if isinstance(silence_logs, str):
        return logging.getLevelName(silence_logs.upper())
    return int(silence_logs)


__all__ = ["LocalCluster"]
