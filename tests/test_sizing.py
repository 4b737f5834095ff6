"""Tests for minidask.deploy.sizing: cores, memory and the worker split.

The cgroup readers are pointed at fake cgroup folders in tmp_path; the
deciders are fed numbers.
"""

import os
import warnings

import psutil
import pytest

from minidask.deploy import sizing
from minidask.deploy.sizing import (cgroup_cpu_limit, cgroup_memory_limit,
                                    cpu_count, memory_per_worker,
                                    memory_total, usable_cores,
                                    usable_memory, worker_split)

GiB = 2**30
V1_UNLIMITED = "9223372036854771712"


def fake_files(root, files):
    """Write ``{relative path: text}`` under ``root``."""
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


@pytest.fixture
def cgroup(tmp_path):
    """An empty fake cgroup root, and a /proc/self/cgroup saying "/"."""
    root = tmp_path / "cgroup"
    root.mkdir()
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text("0::/\n")
    return root, str(self_cgroup)


# worker_split


@pytest.mark.parametrize("cores, expected", [
    (1, (1, 1)),
    (2, (2, 1)),
    (4, (4, 1)),
    (6, (3, 2)),
    (8, (4, 2)),
    (12, (4, 3)),
    (32, (8, 4)),
    (7, (7, 1)),
    (9, (3, 3)),
])
def test_default_split(cores, expected):
    n_workers, threads = worker_split(cores)
    assert (n_workers, threads) == expected
    assert n_workers * threads == cores


def test_only_n_workers_given():
    assert worker_split(8, n_workers=2) == (2, 4)
    assert worker_split(8, n_workers=3) == (3, 2)
    assert worker_split(2, n_workers=5) == (5, 1)


def test_only_threads_given():
    assert worker_split(8, threads_per_worker=4) == (2, 4)
    assert worker_split(8, threads_per_worker=3) == (2, 3)
    assert worker_split(2, threads_per_worker=8) == (1, 8)


def test_both_given_are_kept():
    assert worker_split(8, n_workers=3, threads_per_worker=5) == (3, 5)


def test_zero_workers_is_allowed():
    assert worker_split(8, n_workers=0) == (0, 2)
    assert worker_split(1, n_workers=0) == (0, 1)


@pytest.mark.parametrize("kwargs, name, value", [
    ({"n_workers": -1}, "n_workers", "-1"),
    ({"n_workers": 2.0}, "n_workers", "2.0"),
    ({"n_workers": "4"}, "n_workers", "'4'"),
    ({"n_workers": True}, "n_workers", "True"),
    ({"threads_per_worker": 0}, "threads_per_worker", "0"),
    ({"threads_per_worker": -2}, "threads_per_worker", "-2"),
])
def test_bad_split_arguments(kwargs, name, value):
    with pytest.raises(ValueError) as info:
        worker_split(8, **kwargs)
    message = str(info.value)
    assert f"{name}={value}" in message
    assert "an int of at least" in message


def test_bad_core_count():
    with pytest.raises(ValueError, match="cores=0"):
        worker_split(0)


# cores


def test_usable_cores_takes_the_tightest_limit():
    assert usable_cores(8) == 8
    assert usable_cores(8, affinity=3) == 3
    assert usable_cores(8, quota=2.0) == 2
    assert usable_cores(8, affinity=6, quota=4.0) == 4
    assert usable_cores(4, affinity=8, quota=16.0) == 4


def test_fractional_quota_rounds_up_and_never_below_one():
    assert usable_cores(8, quota=1.5) == 2
    assert usable_cores(8, quota=0.2) == 1
    assert usable_cores(0) == 1


def test_cgroup_v2_cpu_quota(cgroup):
    root, self_cgroup = cgroup
    fake_files(root, {"cpu.max": "150000 100000"})
    assert cgroup_cpu_limit(root, self_cgroup) == pytest.approx(1.5)


def test_cgroup_v2_without_quota(cgroup):
    root, self_cgroup = cgroup
    fake_files(root, {"cpu.max": "max 100000"})
    assert cgroup_cpu_limit(root, self_cgroup) is None


def test_no_cgroup_files_means_no_limits(cgroup):
    root, self_cgroup = cgroup
    assert cgroup_cpu_limit(root, self_cgroup) is None
    assert cgroup_memory_limit(root, self_cgroup) is None


def test_cgroup_v1_cpu_quota(cgroup):
    root, self_cgroup = cgroup
    fake_files(root, {"cpu/cpu.cfs_quota_us": "250000",
                      "cpu/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root, self_cgroup) == pytest.approx(2.5)


def test_cgroup_v1_combined_cpu_mount(cgroup):
    root, self_cgroup = cgroup
    fake_files(root, {"cpu,cpuacct/cpu.cfs_quota_us": "50000",
                      "cpu,cpuacct/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root, self_cgroup) == pytest.approx(0.5)


def test_cgroup_v1_without_quota(cgroup):
    root, self_cgroup = cgroup
    fake_files(root, {"cpu/cpu.cfs_quota_us": "-1",
                      "cpu/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root, self_cgroup) is None


def test_malformed_cgroup_file_is_ignored(cgroup):
    root, self_cgroup = cgroup
    fake_files(root, {"cpu.max": "garbage", "memory.max": "lots"})
    assert cgroup_cpu_limit(root, self_cgroup) is None
    assert cgroup_memory_limit(root, self_cgroup) is None


def test_quota_of_an_enclosing_group_counts(tmp_path):
    root = fake_files(tmp_path / "cgroup", {
        "cpu.max": "max 100000",
        "user.slice/cpu.max": "200000 100000",
        "user.slice/app.scope/cpu.max": "max 100000",
    })
    self_cgroup = fake_files(tmp_path, {"self": "0::/user.slice/app.scope"})
    assert cgroup_cpu_limit(root, self_cgroup / "self") == pytest.approx(2.0)


def test_cpu_count_applies_the_cgroup_quota(cgroup):
    root, self_cgroup = cgroup
    fake_files(root, {"cpu.max": "50000 100000"})
    assert cpu_count(root, self_cgroup) == 1


def test_cpu_count_without_cgroup_follows_affinity(cgroup):
    root, self_cgroup = cgroup
    expected = psutil.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        expected = min(expected, len(os.sched_getaffinity(0)))
    assert cpu_count(root, self_cgroup) == expected


def test_cpu_count_follows_a_narrowed_affinity(cgroup, monkeypatch):
    root, self_cgroup = cgroup
    monkeypatch.setattr(sizing.psutil, "cpu_count", lambda: 16)
    monkeypatch.setattr(sizing.os, "sched_getaffinity", lambda pid: {0, 3},
                        raising=False)
    assert cpu_count(root, self_cgroup) == 2


# memory


def test_usable_memory():
    assert usable_memory(8 * GiB) == 8 * GiB
    assert usable_memory(8 * GiB, limit=2 * GiB) == 2 * GiB
    assert usable_memory(8 * GiB, limit=64 * GiB) == 8 * GiB


def test_cgroup_v2_memory_limit(cgroup):
    root, self_cgroup = cgroup
    fake_files(root, {"memory.max": str(2 * GiB)})
    assert cgroup_memory_limit(root, self_cgroup) == 2 * GiB


def test_cgroup_v2_memory_max_means_no_limit(cgroup):
    root, self_cgroup = cgroup
    fake_files(root, {"memory.max": "max"})
    assert cgroup_memory_limit(root, self_cgroup) is None


def test_cgroup_v1_memory_limit(cgroup):
    root, self_cgroup = cgroup
    fake_files(root, {"memory/memory.limit_in_bytes": str(GiB)})
    assert cgroup_memory_limit(root, self_cgroup) == GiB


def test_cgroup_v1_huge_memory_limit_means_no_limit(cgroup):
    root, self_cgroup = cgroup
    fake_files(root, {"memory/memory.limit_in_bytes": V1_UNLIMITED})
    assert cgroup_memory_limit(root, self_cgroup) is None


def test_memory_limit_of_an_enclosing_v1_group_counts(tmp_path):
    root = fake_files(tmp_path / "cgroup", {
        "memory/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/jobs/memory.limit_in_bytes": str(3 * GiB),
        "memory/jobs/42/memory.limit_in_bytes": V1_UNLIMITED,
    })
    self_cgroup = fake_files(tmp_path, {"self": "4:memory:/jobs/42\n0::/"})
    assert cgroup_memory_limit(root, self_cgroup / "self") == 3 * GiB


def test_memory_total_applies_the_cgroup_limit(cgroup):
    root, self_cgroup = cgroup
    fake_files(root, {"memory.max": str(64 * 2**20)})
    assert memory_total(root, self_cgroup) == 64 * 2**20


def test_memory_total_without_cgroup_is_the_machine(cgroup):
    root, self_cgroup = cgroup
    assert memory_total(root, self_cgroup) == psutil.virtual_memory().total


# memory_per_worker


@pytest.mark.parametrize("limit, n_workers, expected", [
    ("auto", 4, 2 * GiB),
    ("auto", 3, 8 * GiB // 3),
    ("auto", 0, 8 * GiB),
    (None, 4, None),
    (0, 4, None),
    (0.0, 4, None),
    ("0", 4, None),
    (GiB, 4, GiB),
    ("2 GiB", 4, 2 * GiB),
    ("4e9", 4, 4 * 10**9),
    (0.5, 4, 4 * GiB),
    (1.0, 4, 8 * GiB),
    ("0.25", 4, 2 * GiB),
])
def test_memory_limit_forms(limit, n_workers, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these should warn
        assert memory_per_worker(limit, n_workers, total=8 * GiB) == expected


def test_auto_uses_memory_total_by_default(monkeypatch):
    monkeypatch.setattr(sizing, "memory_total", lambda: 6 * GiB)
    assert memory_per_worker("auto", 3) == 2 * GiB


def test_limit_above_the_machine_is_clamped_with_a_warning():
    with pytest.warns(UserWarning) as record:
        result = memory_per_worker("16 GiB", 2, total=8 * GiB)
    assert result == 8 * GiB
    message = str(record[0].message)
    assert "16.00 GiB" in message
    assert "8.00 GiB" in message


@pytest.mark.parametrize("bad", [
    "lots", -1, -0.5, 1.5, float("nan"), "-5", True, [GiB],
])
def test_bad_memory_limits(bad):
    with pytest.raises(ValueError) as info:
        memory_per_worker(bad, 2, total=8 * GiB)
    message = str(info.value)
    assert f"memory_limit={bad!r}" in message
    assert "'auto'" in message and "'2 GiB'" in message


def test_memory_per_worker_checks_n_workers():
    with pytest.raises(ValueError, match="n_workers=-1"):
        memory_per_worker("auto", -1, total=8 * GiB)
