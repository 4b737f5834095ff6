"""Tasks: how a function call is packed by a client and run by a worker.

A client turns ``client.submit(func, x, y=future)`` into a task: a key that
names its result, the keys of the tasks it depends on, and a *spec*, the
bytes of ``(function, args, kwargs)``. Futures found anywhere in the
arguments (inside lists, tuples, sets and dicts too) are replaced by
:class:`Ref` placeholders; the worker that runs the task swaps each one
for the dependency's value. The scheduler only ever sees the spec as bytes.

The function is pickled separately from its arguments, so that ``map``
pickles it once for thousands of tasks and a worker unpickles it once.
"""

import hashlib
import os
import pickle

import cloudpickle


class Ref:
    """Stands in, inside a task's arguments, for a dependency's value."""

    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def __reduce__(self):
        return Ref, (self.key,)

    def __repr__(self):
        return f"Ref({self.key!r})"


def pickle_bytes(obj):
    """Pickle ``obj``; by value (cloudpickle) if it comes from __main__."""
    try:
        data = pickle.dumps(obj, protocol=5)
        if b"__main__" not in data:
            return data
    except Exception:
        pass
    try:
        return cloudpickle.dumps(obj, protocol=5)
    except Exception as exc:
        raise TypeError(
            f"cannot send {type(obj).__name__} {_short(obj)} to a worker: "
            f"it does not pickle ({exc}). Create it inside the task "
            f"instead") from exc


def _short(obj):
    text = repr(obj)
    return text if len(text) < 60 else text[:57] + "..."


def replace_futures(obj, future_type, found):
    """Copy ``obj`` with each future replaced by a Ref; collect the keys."""
    kind = type(obj)
    if isinstance(obj, future_type):
        found.add(obj.key)
        return Ref(obj.key)
    if kind in (list, tuple, set, frozenset):
        items = [replace_futures(x, future_type, found) for x in obj]
        return kind(items)
    if kind is dict:
        return {k: replace_futures(v, future_type, found)
                for k, v in obj.items()}
    return obj


def fill_refs(obj, data):
    """Copy ``obj`` with each Ref replaced by its value from ``data``."""
    kind = type(obj)
    if kind is Ref:
        return data[obj.key]
    if kind in (list, tuple, set, frozenset):
        return kind(fill_refs(x, data) for x in obj)
    if kind is dict:
        return {k: fill_refs(v, data) for k, v in obj.items()}
    return obj


def function_name(func):
    name = getattr(func, "__name__", None) or type(func).__name__
    return "lambda" if name == "<lambda>" else name


def make_spec(func_bytes, args, kwargs):
    """Pickle a call into the bytes a worker will run: the task's spec."""
    try:
        return pickle_bytes((func_bytes, args, kwargs))
    except TypeError:
        for value in [*args, *kwargs.values()]:
            pickle_bytes(value)  # raises, naming the argument at fault
        raise


def make_key(func, func_bytes, spec, pure):
    """``name-token``: equal calls get equal keys when ``pure``."""
    if pure:
        token = hashlib.md5(func_bytes + spec, usedforsecurity=False)
        return f"{function_name(func)}-{token.hexdigest()}"
    return f"{function_name(func)}-{os.urandom(16).hex()}"


class FunctionCache:
    """Unpickled functions by their bytes, so map unpickles each once."""

    def __init__(self, size=256):
        self.size = size
        self.functions = {}

    def load(self, func_bytes):
        func = self.functions.get(func_bytes)
        if func is None:
            func = pickle.loads(func_bytes)
            if len(self.functions) >= self.size:
                self.functions.pop(next(iter(self.functions)))
            self.functions[func_bytes] = func
        return func


def run_spec(spec, data, functions):
    """Unpack a spec, fill in its dependencies and call it."""
    func_bytes, args, kwargs = pickle.loads(spec)
    func = functions.load(func_bytes)
    args = fill_refs(args, data)
    kwargs = fill_refs(kwargs, data)
    return func(*args, **kwargs)
