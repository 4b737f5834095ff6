"""What a run was measured on: the machine, its software and its load."""

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import psutil

PACKAGES = ("minidask", "distributed", "dask", "numpy", "tornado",
            "cloudpickle")


def facts():
    """Cores, memory, CPU model, Python and package versions, commit."""
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
        "commit": commit(),
    }


def load_average():
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions():
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def commit():
    """The repository's commit, with "+changes" if the tree differs."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+changes" if head and changed else head or None


def describe(machine):
    """One line for the top of the table."""
    gib = machine["memory_bytes"] / 2**30
    return (f"{machine['cpu_model']}, {machine['usable_cores']} cores, "
            f"{gib:.0f} GiB, Python {machine['python']}")
