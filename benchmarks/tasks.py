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
