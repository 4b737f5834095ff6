"""How a LocalCluster sizes itself to the machine it runs on.

``LocalCluster()`` with no arguments should use what this process may
really use, which is often less than the machine has: a container or a
batch job limits CPU time and memory through cgroups, and ``taskset`` or
a job scheduler narrows the cores a process may run on. Reading only
``os.cpu_count()`` on such a machine starts too many threads, and a
memory limit taken from the whole machine lets the kernel kill a worker
before its nanny sees it coming.

The functions come in two kinds. The readers (``cpu_count``,
``memory_total`` and the cgroup readers under them) look at the system;
they take the cgroup folder as an argument so that tests can point them
at fake files. The deciders (``usable_cores``, ``usable_memory``,
``worker_split``, ``memory_per_worker``) are pure functions of the
numbers they are given.

Cgroup limits are read from the folder a container sees as its own
(``/sys/fs/cgroup``) and from each folder on the way down to this
process's own group as named in ``/proc/self/cgroup``, keeping the
tightest. Soft limits (``memory.high``, CPU weights) are not read: they
slow a process down rather than stop it, so they do not change how many
workers fit.
"""

import logging
import math
import os
import warnings

import psutil

from ..utils import format_bytes, parse_bytes

logger = logging.getLogger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"
SELF_CGROUP = "/proc/self/cgroup"

# cgroup v1 writes "no limit" as a huge number rather than as "max" (the
# largest page-aligned 64-bit value); anything from 1 EiB up means that.
_UNLIMITED_MEMORY = 2**60

# Up to this many cores, one single-threaded worker per core is best.
_SMALL_MACHINE = 4


# Reading cgroup files


def _read(path):
    """Return the stripped text of a file, or None if it cannot be read."""
    try:
        with open(path, encoding="ascii") as file:
            return file.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _own_groups(self_cgroup):
    """Map each cgroup controller to this process's group path.

    Lines of ``/proc/self/cgroup`` read ``id:controllers:path``; cgroup v2
    has one line with no controllers, stored here under ``""``.
    """
    groups = {}
    for line in (_read(self_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                groups[controller] = parts[2]
    return groups


def _group_folders(mount, path):
    """Return ``mount`` and each folder below it on the way to ``path``."""
    folders = [mount]
    names = [name for name in (path or "").split("/") if name]
    if ".." in names:  # a group outside this mount: only the mount counts
        return folders
    for name in names:
        folders.append(os.path.join(folders[-1], name))
    return folders


def _v1_folders(root, controller, groups):
    """Return the cgroup v1 folders to read for ``controller``."""
    mounts = {"cpu": ("cpu", "cpu,cpuacct"), "memory": ("memory",)}
    folders = []
    for mount in mounts[controller]:
        folders += _group_folders(os.path.join(root, mount),
                                  groups.get(controller))
    return folders


def _cpu_max(folder):
    """Read cgroup v2 ``cpu.max`` ("quota period") as cores, or None."""
    fields = (_read(os.path.join(folder, "cpu.max")) or "").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _quota(fields[0], fields[1])


def _cfs_quota(folder):
    """Read cgroup v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` as cores."""
    quota = _read(os.path.join(folder, "cpu.cfs_quota_us"))
    period = _read(os.path.join(folder, "cpu.cfs_period_us"))
    if quota is None or period is None:
        return None
    return _quota(quota, period)


def _quota(quota, period):
    """Divide a CPU quota by its period; None when either is unusable."""
    try:
        quota, period = int(quota), int(period)
    except ValueError:
        return None
    # A quota of -1 is cgroup v1's way of writing "no limit".
    return quota / period if quota > 0 and period > 0 else None


def _memory_limit(path):
    """Read a cgroup memory limit file as bytes, or None for no limit."""
    text = _read(path)
    if text is None or text == "max":
        return None
    try:
        limit = int(text)
    except ValueError:
        return None
    return limit if 0 < limit < _UNLIMITED_MEMORY else None


def cgroup_cpu_limit(root=CGROUP_ROOT, self_cgroup=SELF_CGROUP):
    """Return the CPU quota in cores (may be fractional), or None.

    Reads cgroup v2 ``cpu.max`` and cgroup v1 ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us`` under ``root``, keeping the tightest quota.
    """
    groups = _own_groups(self_cgroup)
    quotas = [_cpu_max(folder)
              for folder in _group_folders(root, groups.get(""))]
    quotas += [_cfs_quota(folder)
               for folder in _v1_folders(root, "cpu", groups)]
    return min((q for q in quotas if q is not None), default=None)


def cgroup_memory_limit(root=CGROUP_ROOT, self_cgroup=SELF_CGROUP):
    """Return the cgroup memory limit in bytes, or None.

    Reads cgroup v2 ``memory.max`` and cgroup v1
    ``memory.limit_in_bytes`` under ``root``, keeping the tightest limit.
    """
    groups = _own_groups(self_cgroup)
    paths = [os.path.join(folder, "memory.max")
             for folder in _group_folders(root, groups.get(""))]
    paths += [os.path.join(folder, "memory.limit_in_bytes")
              for folder in _v1_folders(root, "memory", groups)]
    limits = [_memory_limit(path) for path in paths]
    return min((limit for limit in limits if limit is not None), default=None)


# What this process may use


def usable_cores(logical, affinity=None, quota=None):
    """Combine the machine's cores, the affinity set and a cgroup quota.

    A fractional quota rounds up (1.5 cores gives 2): the second thread
    still gets half a core of work done. The result is never below 1.
    """
    cores = logical
    if affinity is not None:
        cores = min(cores, affinity)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def usable_memory(total, limit=None):
    """Return the smaller of the machine's memory and a cgroup limit."""
    return total if limit is None else min(total, limit)


def _affinity():
    """Return how many cores this process may be scheduled on, or None."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    # macOS has neither call; Windows has only psutil's.
    try:
        return len(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error, OSError):
        return None


def cpu_count(root=CGROUP_ROOT, self_cgroup=SELF_CGROUP):
    """Return the number of cores this process may use, at least 1."""
    logical = psutil.cpu_count() or os.cpu_count() or 1
    affinity = _affinity()
    quota = cgroup_cpu_limit(root, self_cgroup)
    cores = usable_cores(logical, affinity, quota)
    logger.debug("%d usable cores (machine %d, affinity %s, cgroup quota %s)",
                 cores, logical, affinity, quota)
    return cores


def memory_total(root=CGROUP_ROOT, self_cgroup=SELF_CGROUP):
    """Return the bytes of memory this process may use."""
    total = psutil.virtual_memory().total
    limit = cgroup_memory_limit(root, self_cgroup)
    usable = usable_memory(total, limit)
    logger.debug("%s usable memory (machine %s, cgroup limit %s)",
                 format_bytes(usable), format_bytes(total),
                 "none" if limit is None else format_bytes(limit))
    return usable


# Splitting the machine into workers


def _check_count(name, value, minimum, sized_by_default=True):
    """Raise ValueError unless ``value`` is an int >= ``minimum``.

    None is also accepted when the caller sizes it from the machine.
    """
    if value is None and sized_by_default:
        return
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int or value < minimum:
        way_out = ("None to size it from the machine, or "
                   if sized_by_default else "")
        raise ValueError(
            f"{name}={value!r} is not allowed: use {way_out}an int of at "
            f"least {minimum}"
        )


def default_split(cores):
    """Return the (n_workers, threads_per_worker) used when neither is given.

    Up to 4 cores: one single-threaded worker per core. Beyond that, about
    sqrt(cores) workers: the factor pair of ``cores`` closest to a square,
    with the larger factor as the worker count (8 cores: 4 workers of 2
    threads). The tie goes to more workers because separate processes run
    pure-Python tasks in parallel, which threads of one process, sharing
    its GIL, do not; it is also the shape dask picks. A prime number of
    cores has no balanced pair and gets one single-threaded worker per
    core.
    """
    if cores <= _SMALL_MACHINE:
        return cores, 1
    n_workers = min(f for f in range(1, cores + 1)
                    if cores % f == 0 and f * f >= cores)
    return n_workers, cores // n_workers


def worker_split(cores, n_workers=None, threads_per_worker=None):
    """Decide how many workers to start and how many threads each gets.

    With neither given, see ``default_split``. With one given, the other
    shares out ``cores``, rounding down but never below 1. ``n_workers=0``
    starts no workers (add them later with ``scale``); its threads per
    worker are those the default split would give, so that scaling up to
    the default size gives the default cluster.
    """
    _check_count("cores", cores, 1, sized_by_default=False)
    _check_count("n_workers", n_workers, 0)
    _check_count("threads_per_worker", threads_per_worker, 1)

    if n_workers is not None and threads_per_worker is not None:
        return n_workers, threads_per_worker
    if n_workers is not None:
        if n_workers == 0:
            return 0, default_split(cores)[1]
        return n_workers, max(1, cores // n_workers)
    if threads_per_worker is not None:
        return max(1, cores // threads_per_worker), threads_per_worker
    return default_split(cores)


def memory_per_worker(memory_limit, n_workers, total=None):
    """Return each worker's memory limit in bytes, or None for no limit.

    ``memory_limit`` may be:

    - ``"auto"``: the usable memory shared equally among ``n_workers``
      (all of it when ``n_workers`` is 0);
    - ``None`` or ``0``: no limit;
    - an int: bytes;
    - a float in (0, 1]: that fraction of the usable memory;
    - a string: a size such as ``"2 GiB"``, or a bare number read as the
      number it spells (``"0.5"`` is a fraction, ``"4000000000"`` bytes).

    ``total`` defaults to ``memory_total()``. A limit above it is lowered
    to it, with a warning, as the workers could never use more.
    """
    _check_count("n_workers", n_workers, 0, sized_by_default=False)
    if total is None:
        total = memory_total()

    limit = _limit_bytes(memory_limit, n_workers, total)
    if limit is not None and limit > total:
        warnings.warn(
            f"memory_limit={memory_limit!r} ({format_bytes(limit)}) is more "
            f"than this machine's usable memory ({format_bytes(total)}); "
            f"using {format_bytes(total)} per worker",
            UserWarning, stacklevel=2,
        )
        return total
    return limit


def _limit_bytes(memory_limit, n_workers, total):
    """Turn any accepted form of ``memory_limit`` into bytes or None."""
    value = memory_limit
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return total // max(1, n_workers)
        value = _read_limit_text(memory_limit)

    if value is None or (_is_number(value) and value == 0):
        return None
    if isinstance(value, float) and 0 < value <= 1:
        return int(total * value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ValueError(_bad_limit(memory_limit))


def _read_limit_text(text):
    """Read a memory limit string as a number or as a size in bytes."""
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None and math.isfinite(number) and number <= 1:
        return number  # "0", "0.5", "1": the same as the float
    try:
        return parse_bytes(text)
    except ValueError:
        raise ValueError(_bad_limit(text)) from None


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bad_limit(value):
    return (
        f"memory_limit={value!r} is not understood: use 'auto', None or 0 "
        f"for no limit, an int number of bytes, a size string such as "
        f"'2 GiB', or a float in (0, 1] for a fraction of the machine's "
        f"memory"
    )
