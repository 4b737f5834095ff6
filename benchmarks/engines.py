"""The two engines the benchmarks compare: one API, two implementations.

Each case is written once against the ``dask.distributed`` API and gets
the engine's ``Client``, ``LocalCluster`` and ``wait`` from here. The
names and arguments the cases use mean the same on both, so this module
is the only place where the engines differ.
"""

import importlib

MODULES = {"minidask": "minidask", "dask": "distributed"}


class Engine:
    """One implementation of the API: its classes and its version."""

    def __init__(self, name):
        module = importlib.import_module(MODULES[name])
        self.name = name
        self.Client = module.Client
        self.LocalCluster = module.LocalCluster
        self.wait = module.wait
        self.version = module.__version__

    def __repr__(self):
        return f"<Engine {self.name} {self.version}>"


def available(name):
    """Whether the engine ``name`` can be imported here."""
    try:
        importlib.import_module(MODULES[name])
    except ImportError:
        return False
    return True
