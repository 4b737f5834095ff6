"""What every cluster manager does, whatever starts its processes.

A cluster manager starts a scheduler and some workers, keeps a count of
the workers it started, and closes them all again. :class:`Cluster` holds
the part that does not depend on *where* they run: scaling, waiting for
workers, collecting logs, the dashboard link, the notebook view, closing
at interpreter exit. Subclasses say how to start and stop a scheduler and
a worker: ``LocalCluster`` on this machine, ``SSHCluster`` over SSH.

A subclass implements ``_start_scheduler()``, ``_start_worker(name)``
(returning a handle with an ``address`` and an ``async close()``) and
``_stop_scheduler()``, all coroutines run on minidask's event loop.
"""

import asyncio
import atexit
import logging
import os
import uuid
import warnings
import weakref

from minidask import config, display, logs
from minidask.comm import CommError, parse_address
from minidask.core import ConnectionPool, new_secret
from minidask.loop import get_loop, sync

logger = logging.getLogger(__name__)

_clusters = weakref.WeakSet()
_warned_templates = set()


def dashboard_link(host, port, scheme="http"):
    """Format the ``dashboard.link`` template for a dashboard.

    The template may name environment variables, such as
    ``{JUPYTERHUB_SERVICE_PREFIX}``; one that is not set (or a template
    that cannot be formatted) gives the plain link instead, with one
    warning per template.
    """
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    plain = f"{scheme}://{host}:{port}/status"
    template = config.get("dashboard.link", None) or plain
    fields = {**os.environ, "scheme": scheme, "host": host, "port": port}
    try:
        return template.format(**fields)
    except KeyError as exc:
        problem = (f"names {exc.args[0]!r}, which is not set in the "
                   f"environment")
    except (IndexError, ValueError) as exc:
        problem = f"cannot be formatted ({exc})"
    if template not in _warned_templates:
        _warned_templates.add(template)
        warnings.warn(
            f"config dashboard.link {template!r} {problem}: showing the "
            f"plain link {plain} instead", stacklevel=3)
    return plain


class Cluster:
    """A scheduler and workers that this object started and will close."""

    def __init__(self, name=None, security=None):
        self.name = name or uuid.uuid4().hex[:8]
        self.id = f"Cluster-{self.name}"
        self.status = "created"
        self.secret = new_secret()
        self.scheduler_address = None
        self.dashboard_host = None  # None: the scheduler's host
        self.dashboard_port = None
        self.workers = {}  # name -> handle of a worker this cluster started
        self._worker_count = 0
        self.security = security
        self._pool = ConnectionPool(self.secret, security)
        self.log = logs.ServerLog(logger, self.id)
        self.log_buffer = logs.LogBuffer(self.id, ())
        logs.attach(self.log_buffer)
        self.loop = get_loop()
        _clusters.add(self)

    # -- to be provided by each kind of cluster --------------------------------

    async def _start_scheduler(self):
        raise NotImplementedError

    async def _start_worker(self, name):
        raise NotImplementedError

    async def _stop_scheduler(self):
        raise NotImplementedError

    # -- starting --------------------------------------------------------------

    async def _start(self, n_workers):
        self.status = "starting"
        try:
            await self._start_scheduler()
            await self._scale(n_workers)
        except BaseException:
            await self._close()
            raise
        self.status = "running"
        self.log.info("%s %s running at %s with %d workers",
                      type(self).__name__, self.name, self.scheduler_address,
                      len(self.workers))

    def _new_name(self):
        name = self._worker_count
        self._worker_count += 1
        return name

    # -- scaling ---------------------------------------------------------------

    def scale(self, n):
        """Start or stop workers until there are ``n``."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"scale({n!r}): give a whole number of "
                             f"workers, 0 or more")
        self._check_running()
        sync(self._scale(n))

    async def _scale(self, n):
        if n > len(self.workers):
            names = [self._new_name() for _ in range(n - len(self.workers))]
            self.log.info("starting %d workers", len(names))
            handles = await asyncio.gather(
                *(self._start_worker(name) for name in names),
                return_exceptions=True)
            errors = []
            for name, handle in zip(names, handles):
                if isinstance(handle, BaseException):
                    errors.append(handle)
                else:
                    self.workers[name] = handle
            if errors:
                raise errors[0]
            await self._pool.call(self.scheduler_address, "wait-for-workers",
                                  n=len(self.workers), timeout=60)
        elif n < len(self.workers):
            leaving = list(self.workers)[n:]  # the newest go first
            handles = [self.workers[name] for name in leaving]
            addresses = [h.address for h in handles if h.address]
            await self._retire(handles)
            for name in leaving:
                await self.workers.pop(name).close()
            await self._forgotten(addresses)
            self.log.info("stopped %d workers", len(leaving))

    async def _retire(self, handles):
        """Ask the scheduler to copy what only these workers hold."""
        addresses = [h.address for h in handles if h.address]
        try:
            await self._pool.call(self.scheduler_address, "retire-workers",
                                  workers=addresses)
        except (CommError, OSError) as exc:
            self.log.warning("could not retire workers gracefully: %s", exc)

    async def _forgotten(self, addresses, timeout=10):
        """Wait until the scheduler no longer lists these workers.

        It forgets a worker when the worker's stream closes, a moment
        after the worker itself has closed; after ``scale(n)`` returns,
        ``scheduler_info()`` should already show ``n`` workers.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            info = await self._pool.call(self.scheduler_address,
                                         "scheduler-info")
            if not set(addresses) & set(info["workers"]):
                return
            await asyncio.sleep(0.01)
        self.log.warning("the scheduler still lists stopped workers %s",
                         ", ".join(addresses))

    def wait_for_workers(self, n_workers=1, timeout=None):
        """Wait until the scheduler has ``n_workers`` workers."""
        self._check_running()
        return sync(self._pool.call(self.scheduler_address,
                                    "wait-for-workers", n=n_workers,
                                    timeout=timeout))

    def _check_running(self):
        if self.status != "running":
            raise RuntimeError(f"{type(self).__name__} {self.name} is "
                               f"{self.status}")

    # -- information -----------------------------------------------------------

    @property
    def dashboard_link(self):
        if self.dashboard_port is None:
            return None
        host = self.dashboard_host
        if host is None:
            _, host, _ = parse_address(self.scheduler_address)
        return dashboard_link(host, self.dashboard_port)

    def scheduler_info(self):
        if self.status != "running":
            return {"workers": {}}
        return sync(self._pool.call(self.scheduler_address,
                                    "scheduler-info"))

    def get_logs(self, cluster=True, scheduler=True, workers=True):
        """Recent log lines, newest first: a mapping of source to text.

        Keys are ``"Cluster"`` (this cluster manager and the process it
        runs in), ``"Scheduler"`` and one per worker address; ``workers``
        may also be a list of worker addresses. In a notebook the result
        shows as one section per source.
        """
        return sync(self._get_logs(cluster, scheduler, workers))

    async def _get_logs(self, cluster, scheduler, workers):
        records = {}
        if cluster:
            records["Cluster"] = self.log_buffer.lines()
        if self.status != "running":
            return display.Logs.from_records(records)
        if scheduler:
            records["Scheduler"] = await self._pool.call(
                self.scheduler_address, "get-logs")
        if workers:
            chosen = await self._chosen_workers(workers)
            records.update(await self._pool.call(
                self.scheduler_address, "worker-logs", workers=chosen))
        return display.Logs.from_records(records)

    async def _chosen_workers(self, workers):
        """The worker addresses ``get_logs(workers=...)`` asks for."""
        if workers is True:
            return None
        chosen = [workers] if isinstance(workers, str) else list(workers)
        info = await self._pool.call(self.scheduler_address, "scheduler-info")
        unknown = [a for a in chosen if a not in info["workers"]]
        if unknown:
            raise ValueError(
                f"get_logs(workers=...): no worker at {', '.join(unknown)} "
                f"in this cluster; its workers are "
                f"{', '.join(info['workers']) or 'none yet'}")
        return chosen

    def _info(self):
        try:
            workers = self.scheduler_info()["workers"]
        except (CommError, OSError):
            workers = {}
        return {"type": type(self).__name__, "name": self.name,
                "status": self.status,
                "scheduler_address": self.scheduler_address,
                "dashboard_link": self.dashboard_link, "workers": workers}

    def __repr__(self):
        return display.cluster_text(self._info())

    def _repr_html_(self):
        return display.cluster_html(self._info())

    # -- closing ---------------------------------------------------------------

    def close(self, timeout=30):
        """Stop every worker and the scheduler; safe to call twice."""
        if self.status in ("closing", "closed"):
            return
        sync(self._close(), timeout)

    async def _close(self):
        self.status = "closing"
        handles = list(self.workers.values())
        self.workers.clear()
        results = await asyncio.gather(*(h.close() for h in handles),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                self.log.warning("a worker did not close cleanly: %s",
                                 result)
        await self._stop_scheduler()
        self._pool.close()
        self.status = "closed"
        self.log.info("%s %s closed", type(self).__name__, self.name)
        # The lines stay readable with get_logs(); no new ones arrive.
        logs.detach(self.log_buffer)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@atexit.register
def _close_all():
    """Close what the user forgot, so that no worker process outlives us."""
    from minidask.client import _clients
    for client in list(_clients):
        try:
            client.close(timeout=5)
        except Exception:
            pass
    for cluster in list(_clusters):
        try:
            cluster.close(timeout=10)
        except Exception:
            pass
