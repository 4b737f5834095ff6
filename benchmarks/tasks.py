"""The functions that the benchmarks run as tasks.

They live in a module of their own so that both engines pickle them by
reference and their workers import them: the runner puts this repository
on the workers' ``PYTHONPATH``.
"""

import os


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def random_bytes(nbytes):
    """Random, so that no layer can shrink it by compressing it."""
    return os.urandom(nbytes)


def random_array(nbytes):
    import numpy
    return numpy.frombuffer(os.urandom(nbytes), dtype=numpy.uint8).copy()


def scheduler_task_count(dask_scheduler):
    """Run on the scheduler: how many tasks it still knows."""
    return len(dask_scheduler.tasks)


async def loop_cpu_seconds(dask_scheduler):
    """Run on the scheduler: CPU time of its event loop thread so far.

    A coroutine function, so that both engines run it on the event loop
    itself: dask.distributed runs a plain function in a thread of a pool.
    """
    import time
    return time.thread_time()


def open_dashboard_pages(dask_scheduler):
    """Run on a minidask scheduler: the dashboard pages open now, each a
    Bokeh session with periodic updates; None where that is not known."""
    sessions = getattr(getattr(dask_scheduler, "dashboard", None),
                       "sessions", None)
    return len(sessions()) if callable(sessions) else None
