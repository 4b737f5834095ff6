"""minidask: a small, readable distributed task scheduler.

The public surface follows dask.distributed, so that code written against
minidask runs unchanged on Dask::

    from minidask import Client, LocalCluster

    cluster = LocalCluster(n_workers=2)
    client = Client(cluster)
    future = client.submit(sum, [1, 2, 3])
    future.result()   # 6

The parts, each one module with a note on its design: ``comm`` (the
connections), ``core`` (what servers share), ``scheduler``, ``worker``,
``nanny``, ``client`` and ``task``, and under ``deploy/`` the cluster
managers.
"""

__version__ = "0.1.0"

from minidask import config
from minidask.client import (ALL_COMPLETED, FIRST_COMPLETED, Client, Future,
                             as_completed, progress, wait)
from minidask.comm import (AuthenticationError, CommClosedError, CommError,
                           ConnectError)
from minidask.deploy.local import LocalCluster
from minidask.nanny import Nanny
from minidask.scheduler import CancelledError, KilledWorker, Scheduler
from minidask.worker import Worker


def __getattr__(name):
    if name == "SSHCluster":  # asyncssh is imported only when it is used
        from minidask.deploy.ssh import SSHCluster
        return SSHCluster
    raise AttributeError(f"module 'minidask' has no attribute {name!r}")


__all__ = [
    "Client", "Future", "LocalCluster", "SSHCluster", "Scheduler", "Worker",
    "Nanny", "wait", "as_completed", "progress", "config", "KilledWorker",
    "CancelledError", "CommError", "CommClosedError", "ConnectError",
    "AuthenticationError", "FIRST_COMPLETED", "ALL_COMPLETED",
]
