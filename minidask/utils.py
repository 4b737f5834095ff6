"""Reading and writing sizes and durations the way people type them.

Configuration values, command-line options and keyword arguments accept
``"2 GiB"`` for a memory limit and ``"250ms"`` for a timeout; the
scheduler, workers and clusters turn them into plain numbers here, and
turn numbers back into short text for logs, reprs and the dashboard.

Sizes use decimal units for ``kB``/``MB``/``GB`` (powers of 1000) and
binary units for ``KiB``/``MiB``/``GiB`` (powers of 1024); both are read
without regard to case. Output always uses binary units.

One helper of another kind lives here too, for the client and the
scheduler alike: :func:`no_garbage_collection`, for building large
graphs.
"""

import contextlib
import datetime
import gc
import math
import re

# The number a size or duration starts with: "5", "1.5", ".5", "1e9".
_NUMBER = r"(\d+\.?\d*|\.\d+)(e[+-]?\d+)?"
_QUANTITY = re.compile(rf"^\s*(?P<number>{_NUMBER})\s*(?P<unit>[a-zµ]*)\s*$",
                       re.IGNORECASE)

BYTE_UNITS = {
    "": 1, "b": 1, "byte": 1, "bytes": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
    "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "p": 10**15, "pb": 10**15,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
}

TIME_UNITS = {
    "ns": 1e-9, "nanosecond": 1e-9, "nanoseconds": 1e-9,
    "us": 1e-6, "µs": 1e-6, "microsecond": 1e-6, "microseconds": 1e-6,
    "ms": 1e-3, "millisecond": 1e-3, "milliseconds": 1e-3,
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
}


def _is_number(value):
    """True for ints and floats, but not for bools (an int subclass)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_bytes(s):
    """Return the number of bytes that ``s`` spells, as an int.

    Accepts ints, floats and strings such as ``"100 MB"``, ``"2 GiB"``,
    ``"5kB"`` and ``"1e9"``. A trailing ``"/s"`` is ignored, so that a
    bandwidth such as ``"100 MB/s"`` reads as bytes per second.
    """
    if _is_number(s):
        number, multiplier = s, 1
    elif isinstance(s, str):
        number, multiplier = _split_size(s)
    else:
        raise ValueError(_bad_size(s))

    if number < 0 or (isinstance(number, float) and not math.isfinite(number)):
        raise ValueError(_bad_size(s))
    return int(number * multiplier)


def _split_size(text):
    """Split a size string into its number and its unit's multiplier."""
    body = text.strip()
    if body.endswith("/s"):
        body = body[:-2]
    match = _QUANTITY.match(body)
    unit = match and match["unit"].lower()
    if not match or unit not in BYTE_UNITS:
        raise ValueError(_bad_size(text))
    return float(match["number"]), BYTE_UNITS[unit]


def _bad_size(value):
    return (
        f"cannot read {value!r} as a number of bytes: use a non-negative "
        f"int or float, or a string such as '100 MB', '2 GiB', '5kB' or "
        f"'1e9' (units B, kB, MB, GB, TB, PB, KiB, MiB, GiB, TiB, PiB)"
    )


def format_bytes(n):
    """Write a number of bytes in binary units, such as ``"1.50 GiB"``.

    The largest unit that gives at least 0.9 of it is chosen, so that
    1000 MiB reads as ``"0.98 GiB"`` rather than ``"1000.00 MiB"``.
    """
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30),
                       ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= 0.9 * size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def parse_timedelta(value, default="seconds"):
    """Return the duration that ``value`` spells, in seconds, as a float.

    Accepts numbers (read in the ``default`` unit), strings such as
    ``"250ms"``, ``"10s"``, ``"5 minutes"`` or ``"1h"`` (a bare number in
    a string is also read in ``default``), and ``datetime.timedelta``.
    ``None`` is returned unchanged, meaning "no timeout".
    """
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif _is_number(value):
        seconds = _to_float(value, value) * _time_unit(default)
    elif isinstance(value, str):
        seconds = _parse_duration_text(value, default)
    else:
        raise ValueError(_bad_duration(value))

    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(_bad_duration(value))
    return float(seconds)


def _to_float(number, value):
    """Return ``number`` as a float, naming ``value`` if it is too large."""
    try:
        return float(number)
    except OverflowError:
        raise ValueError(_bad_duration(value)) from None


def _parse_duration_text(text, default):
    """Read a duration string such as ``"250ms"`` as seconds."""
    match = _QUANTITY.match(text)
    unit = match["unit"].lower() if match else None
    if not match or (unit and unit not in TIME_UNITS):
        raise ValueError(_bad_duration(text))
    return float(match["number"]) * _time_unit(unit or default)


def _time_unit(name):
    """Return the length of time unit ``name`` in seconds."""
    try:
        return TIME_UNITS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown time unit {name!r}: use one of ns, us, ms, s, m, h, "
            f"d, w or a long form such as 'seconds'"
        ) from None


def _bad_duration(value):
    return (
        f"cannot read {value!r} as a duration: use a non-negative number "
        f"of seconds, a datetime.timedelta, None for no limit, or a string "
        f"such as '250ms', '10s', '5 minutes' or '1h'"
    )


def format_time(seconds):
    """Write a duration briefly: ``"512.0 us"``, ``"3.2 ms"``, ``"1.50 s"``,
    ``"2m 5s"``, ``"3h 10m"`` or ``"2d 4h"``.
    """
    if seconds < 0:
        return "-" + format_time(-seconds)
    # Each test is made on the rounded figure, so that 0.99996 s reads as
    # "1.00 s" and not as "1000.0 ms".
    if round(seconds * 1e6, 1) < 1000:
        return f"{seconds * 1e6:.1f} us"
    if round(seconds * 1e3, 1) < 1000:
        return f"{seconds * 1e3:.1f} ms"
    if round(seconds, 2) < 60:
        return f"{seconds:.2f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60}m {whole % 60}s"
    minutes = round(seconds / 60)
    if minutes < 24 * 60:
        return f"{minutes // 60}h {minutes % 60}m"
    hours = round(seconds / 3600)
    return f"{hours // 24}d {hours % 24}h"


@contextlib.contextmanager
def no_garbage_collection():
    """Run the block with Python's cyclic garbage collector paused.

    For building many long-lived objects at once (a graph of 100,000
    tasks and its futures): every collection during the build walks all
    the objects built so far, which made the cost per task grow with the
    graph. The collector is turned back on afterwards, unless it was off
    to begin with; a block that builds no cycles leaves nothing for it.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
