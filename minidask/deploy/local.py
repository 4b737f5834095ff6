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
        if isinstance(self.server, Worker):
            logs.detach(self.server.log_buffer, ("",))


def _share_process(worker):
    """Fit the log of a worker that runs as threads in this process.

    It shares the process with the client, the cluster, the scheduler and
    other workers: its log keeps its own lines and its tasks', not theirs.
    (The scheduler's log keeps the process's lines, as it would on its
    own: a connection its comms refused belongs there.) It also listens
    to the root logger, for the lines that user code logs in its tasks.
    """
    worker.log_buffer.process_lines = False
    logs.attach(worker.log_buffer, ("",))


class LocalCluster(Cluster):
    """A scheduler and workers on this machine.

    Parameters
    ----------
    n_workers : int, optional
        How many workers to start; 0 starts none (add them with
        ``scale``). By default the cluster sizes itself to the cores this
        process may use (CPU affinity and container limits included): up
        to 4 cores, one single-threaded worker per core; above that, about
        sqrt(cores) workers with several threads each.
    threads_per_worker : int, optional
        Threads in each worker's pool, that is how many tasks it runs at
        once. Given alone, the number of workers follows from it.
    processes : bool
        True (default): each worker in its own process, under a nanny
        that restarts it if it dies. False: workers as threads in this
        process, quicker to start, but tasks holding the GIL take turns.
    memory_limit : "auto", int, str, float or None
        Memory each worker may use: "auto" (default) shares this
        process's usable memory (the machine's, or a container's limit)
        among the workers; ``"2 GiB"`` or a number of bytes; a fraction
        like ``0.5`` of the usable memory; None or 0 for no limit. A
        limit above the usable memory is lowered to it, with a warning.
        A worker logs a warning at 80% of its limit; with
        ``processes=True`` its nanny restarts it at 95% (config
        ``worker.memory``).
    host : str
        Where the scheduler and the workers listen; "127.0.0.1" (default)
        lets only this machine in.
    scheduler_port : int
        0 (default) picks a free port; a port that is taken is an error.
    dashboard_address : str or None
        Where the dashboard listens: ":8787" by default, on ``host``;
        ":0" for any free port. If the port is taken the dashboard moves
        to the next free one, with a warning naming it. None: no
        dashboard.
    silence_logs : int, str or bool
        Log level from which minidask's log lines are printed to standard
        error: ``logging.WARNING`` (default) or ``"WARNING"``; False prints
        INFO lines too. ``get_logs()`` keeps INFO lines and above whatever
        this says.
    name : str, optional
        A name shown in reprs and logs.
    security : bool or Security, optional
        True: encrypt every connection with TLS, using a temporary
        self-signed certificate made for this cluster. A
        :class:`minidask.security.Security` gives certificates from files.
        By default, TLS is used if config ``comm.tls.*`` names certificates.

    Other keyword arguments are refused with a TypeError that lists these:
    minidask's workers take no options beyond them.

    ``scale(n)`` starts or stops workers, ``wait_for_workers(n)`` waits
    for them, ``get_logs()`` collects recent log lines. ``close()`` stops
    everything (calling it twice is harmless); so does leaving a ``with``
    block, and, for a cluster that was never closed, the end of the
    Python process.

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
                 silence_logs=logging.WARNING, name=None, security=None,
                 **worker_kwargs):
        _check_unknown(worker_kwargs)
        n_workers, threads = sizing.worker_split(
            sizing.cpu_count(), n_workers, threads_per_worker)
        self.threads_per_worker = threads
        self.memory_limit = sizing.memory_per_worker(memory_limit, n_workers)
        self.processes = _check_flag("processes", processes)
        self.host = _check_host(host)
        self.scheduler_port = _check_port("scheduler_port", scheduler_port)
        self.dashboard_address = _dashboard_address(dashboard_address, host)
        self.silence_logs = _log_level(silence_logs)
        logs.setup(self.silence_logs)
        self.scheduler = None
        super().__init__(name=name, security=_security(security))
        sync(self._start(n_workers))

    async def _start_scheduler(self):
        self.scheduler = Scheduler(
            host=self.host, port=self.scheduler_port, secret=self.secret,
            dashboard_address=self.dashboard_address,
            security=self.security)
        await self.scheduler.start()
        self.scheduler_address = self.scheduler.address
        if self.scheduler.dashboard is not None:
            self.dashboard_host = self.scheduler.dashboard.host
            self.dashboard_port = self.scheduler.dashboard.port

    async def _start_worker(self, name):
        options = dict(nthreads=self.threads_per_worker,
                       memory_limit=self.memory_limit, name=name,
                       host=self.host, secret=self.secret,
                       security=self.security)
        if self.processes:
            server = Nanny(self.scheduler_address,
                           silence_logs=self.silence_logs, **options)
            self.log_buffer.owners.add(server.id)
        else:
            server = Worker(self.scheduler_address, **options)
            _share_process(server)
        handle = _WorkerHandle(server)
        try:
            await server.start()
        except BaseException:
            await handle.close()
            raise
        return handle

    async def _stop_scheduler(self):
        if self.scheduler is not None:
            await self.scheduler.close()


# -- checking the arguments ------------------------------------------------


def _security(security):
    from minidask.security import Security
    if security is True:
        return Security.temporary()
    if security in (None, False):
        return Security.from_config()
    if not isinstance(security, Security):
        raise TypeError(f"security={security!r}: give True for a temporary "
                        f"self-signed TLS set, or a minidask Security object")
    return security


def _check_unknown(kwargs):
    if kwargs:
        known = sorted(inspect.signature(LocalCluster).parameters)
        known.remove("worker_kwargs")
        raise TypeError(
            f"LocalCluster got an unknown keyword argument "
            f"{next(iter(kwargs))!r}; it takes {', '.join(known)}")


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not allowed: use True or "
                         f"False")
    return value


def _check_host(host):
    if not isinstance(host, str) or not host or "://" in host:
        raise ValueError(
            f"host={host!r} is not allowed: use an IP address or host name "
            f"such as '127.0.0.1' (this machine only) or '0.0.0.0' (every "
            f"network)")
    return host


def _check_port(name, port):
    is_int = isinstance(port, int) and not isinstance(port, bool)
    if not is_int or not 0 <= port <= 65535:
        raise ValueError(f"{name}={port!r} is not allowed: use a port "
                         f"number up to 65535, or 0 for any free port")
    return port


def _dashboard_address(address, host):
    """Turn ``dashboard_address`` into "host:port", or None for none.

    ``":8787"`` and ``8787`` listen on the cluster's ``host``.
    """
    if address is None or address is False:
        return None
    text = str(address).strip()
    if "://" in text:
        text = text.partition("://")[2].rstrip("/")
    if text.isdigit():
        text = f":{text}"
    dash_host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(
            f"dashboard_address={address!r} is not understood: use ':8787', "
            f"'host:port', ':0' for any free port, or None for no dashboard")
    return f"{dash_host or host}:{port}"


def _log_level(silence_logs):
    """Turn ``silence_logs`` into the level printed from."""
    if silence_logs is False or silence_logs is None:
        return logging.INFO
    if silence_logs is True:
        return logging.WARNING
    if isinstance(silence_logs, str):
        level = logging.getLevelName(silence_logs.strip().upper())
        if isinstance(level, int):
            return level
    elif isinstance(silence_logs, int):
        return silence_logs
    raise ValueError(
        f"silence_logs={silence_logs!r} is not a log level: use "
        f"logging.WARNING, a name such as 'INFO', True (warnings only) or "
        f"False (INFO lines too)")


__all__ = ["LocalCluster"]
