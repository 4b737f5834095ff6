"""The benchmarks run end to end at tiny sizes and report every case.

These run ``python -m benchmarks --quick`` as a user would, in a process
of its own, and check the table it prints and the JSON it writes. The
numbers of a quick run measure nothing, so no test looks at their size.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import cases  # noqa: E402

needs_dask = pytest.mark.skipif(
    importlib.util.find_spec("distributed") is None,
    reason="dask.distributed is not installed; it comes with the bench "
           "extra: pip install -e '.[bench]'")


def quick_run(tmp_path, engines):
    output = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--engines",
         ",".join(engines), "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return done.stdout, json.loads(output.read_text())


def check_run(stdout, results, engines):
    names = [c.name for c in cases.CASES]
    assert [c["case"] for c in results["cases"]] == names
    for case in results["cases"]:
        assert case["errors"] == {}, case["case"]
        assert case["rows"], case["case"]
        for row in case["rows"]:
            for engine in engines:
                assert isinstance(row[engine], float), (row, engine)
            assert row["row"] in stdout
    for name in names:
        assert name in stdout
    assert results["quick"] is True
    assert set(results["engines"]) == set(engines)
    facts = results["machine"]
    for key in ("cores", "memory_bytes", "cpu_model", "python", "versions"):
        assert facts[key], key
    assert len(results["load_average"]["before"]) == 3
    assert len(results["load_average"]["after"]) == 3


def test_quick_run_on_minidask(tmp_path):
    stdout, results = quick_run(tmp_path, ["minidask"])
    check_run(stdout, results, ["minidask"])
    for case in results["cases"]:
        for row in case["rows"]:
            assert row["dask"] is None and row["ratio"] is None


@needs_dask
def test_quick_run_on_both_engines(tmp_path):
    stdout, results = quick_run(tmp_path, ["minidask", "dask"])
    check_run(stdout, results, ["minidask", "dask"])
    for case in results["cases"]:
        for row in case["rows"]:
            assert isinstance(row["ratio"], float)
            if row["target"] is not None:
                assert row["target_met"] in (True, False)


def test_saved_run_prints_again(tmp_path):
    """``--show`` prints the table of a saved run as Markdown."""
    row = {"row": "median", "unit": "ms", "better": "lower",
           "target": 1.0, "minidask": 0.5, "dask": 2.0, "ratio": 0.25,
           "target_met": True}
    saved = {"quick": False, "when": "2026-01-01T00:00:00+00:00",
             "engines": {"minidask": "0", "dask": "0"},
             "machine": {"cpu_model": "CPU", "usable_cores": 2,
                         "memory_bytes": 2**30, "python": "3",
                         "commit": "abc"},
             "load_average": {"before": [0.1, 0.1, 0.1],
                              "after": [0.2, 0.1, 0.1]},
             "seconds": 10, "cases": [{"case": "round trip", "rows": [row],
                                       "errors": {}}]}
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(saved))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--show", str(path),
         "--markdown"], cwd=ROOT, capture_output=True, text=True,
        timeout=60)
    assert done.returncode == 0, done.stderr
    assert "| round trip | median | ms | 0.500 | 2.00 | 0.250 | lower " \
           "| < 1: met |" in done.stdout
