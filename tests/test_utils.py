"""Tests for minidask.utils: sizes and durations read and written."""

import datetime

import pytest

from minidask.utils import (format_bytes, format_time, parse_bytes,
                            parse_timedelta)

GiB = 2**30


@pytest.mark.parametrize("text, expected", [
    ("2 GiB", 2 * GiB),
    ("100 MB", 100_000_000),
    ("5kB", 5000),
    ("5 KiB", 5 * 1024),
    ("1e9", 10**9),
    ("1.5 MiB", 3 * 2**19),
    ("4 gib", 4 * GiB),
    ("  12  ", 12),
    ("7 B", 7),
    ("100 MB/s", 100_000_000),
    (123, 123),
    (2.5e3, 2500),
    (0, 0),
])
def test_parse_bytes(text, expected):
    result = parse_bytes(text)
    assert result == expected
    assert isinstance(result, int)


@pytest.mark.parametrize("bad", [
    "lots", "", "MB", "5 XB", "2e", "-5 MB", -1, float("nan"),
    float("inf"), None, True, [1],
])
def test_parse_bytes_rejects_bad_input(bad):
    with pytest.raises(ValueError) as info:
        parse_bytes(bad)
    message = str(info.value)
    assert repr(bad) in message
    assert "'2 GiB'" in message  # the accepted forms are listed


@pytest.mark.parametrize("n, expected", [
    (0, "0 B"),
    (512, "512 B"),
    (1024, "1.00 KiB"),
    (int(1.5 * GiB), "1.50 GiB"),
    (1000 * 2**20, "0.98 GiB"),
    (3 * 2**40, "3.00 TiB"),
    (-2 * GiB, "-2.00 GiB"),
])
def test_format_bytes(n, expected):
    assert format_bytes(n) == expected


def test_format_bytes_reads_back():
    for n in (5 * 2**20, 3 * GiB):
        assert parse_bytes(format_bytes(n)) == n


@pytest.mark.parametrize("value, expected", [
    ("250ms", 0.25),
    ("10s", 10.0),
    ("5 minutes", 300.0),
    ("1h", 3600.0),
    ("2 days", 172800.0),
    ("1.5 us", 1.5e-6),
    ("3", 3.0),
    (3, 3.0),
    (0.5, 0.5),
    (datetime.timedelta(minutes=2), 120.0),
])
def test_parse_timedelta(value, expected):
    result = parse_timedelta(value)
    assert result == pytest.approx(expected)
    assert isinstance(result, float)


def test_parse_timedelta_passes_none_through():
    assert parse_timedelta(None) is None


def test_parse_timedelta_default_unit_applies_to_bare_numbers():
    assert parse_timedelta(250, default="ms") == pytest.approx(0.25)
    assert parse_timedelta("250", default="ms") == pytest.approx(0.25)
    # An explicit unit wins over the default.
    assert parse_timedelta("2s", default="ms") == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [
    "soon", "", "5 parsecs", "s", -1, "-2s", float("nan"), True, [1],
])
def test_parse_timedelta_rejects_bad_input(bad):
    with pytest.raises(ValueError) as info:
        parse_timedelta(bad)
    assert repr(bad) in str(info.value)
    assert "'250ms'" in str(info.value)


def test_parse_timedelta_rejects_unknown_default_unit():
    with pytest.raises(ValueError, match="fortnight"):
        parse_timedelta(3, default="fortnight")


@pytest.mark.parametrize("seconds, expected", [
    (512e-6, "512.0 us"),
    (3.2e-3, "3.2 ms"),
    (1.5, "1.50 s"),
    (125, "2m 5s"),
    (125.6, "2m 6s"),
    (0.99996, "1.00 s"),
    (59.999, "1m 0s"),
    (11400, "3h 10m"),
    (2 * 86400 + 4 * 3600, "2d 4h"),
    (-1.5, "-1.50 s"),
])
def test_format_time(seconds, expected):
    assert format_time(seconds) == expected


def test_no_garbage_collection_pauses_the_collector_and_restores_it():
    import gc
    from minidask.utils import no_garbage_collection
    assert gc.isenabled()
    with no_garbage_collection():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()  # a program that turned it off keeps it off
    try:
        with no_garbage_collection():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(ValueError):
        with no_garbage_collection():
            raise ValueError("the block failed")
    assert gc.isenabled()
