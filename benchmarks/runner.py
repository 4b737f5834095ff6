"""Run each case against each engine, in the same process, one after another.

For each case, each engine gets a cluster of its own (the case's, or a
fresh standard one), closed before the next engine starts: the two never
compete for the machine's two cores. A case that fails on one engine is
recorded as an error in the results and the run goes on.
"""

import contextlib
import datetime
import os
import sys
import time
import traceback
from pathlib import Path

from benchmarks import cases as all_cases
from benchmarks import machine, report
from benchmarks.engines import Engine

ROOT = Path(__file__).resolve().parent.parent


def importable_by_workers():
    """Put this repository on the workers' path, for ``benchmarks.tasks``."""
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), path) if p)


def run(engine_names, sizes, quick=False, only=None, log=sys.stderr):
    """Run the cases (all, or those named in ``only``); return the results."""
    importable_by_workers()
    engines = [Engine(name) for name in engine_names]
    chosen = [c for c in all_cases.CASES if not only or c.name in only]
    started = time.perf_counter()
    results = {
        "when": datetime.datetime.now().astimezone().isoformat(
            timespec="seconds"),
        "quick": quick,
        "engines": {e.name: e.version for e in engines},
        "machine": machine.facts(),
        "load_average": {"before": machine.load_average()},
        "cases": [],
    }
    for number, case in enumerate(chosen, 1):
        print(f"[{number}/{len(chosen)}] {case.name}", file=log, flush=True)
        results["cases"].append(run_case(case, engines, sizes, log))
    results["load_average"]["after"] = machine.load_average()
    # Worker processes import minidask when each case starts them: code
    # that changed during the run was measured in part.
    results["commit_after"] = machine.commit()
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def run_case(case, engines, sizes, log):
    record = {"case": case.name, "load_before": machine.load_average(),
              "seconds": {}, "errors": {}}
    measures = {}
    for engine in engines:
        started = time.perf_counter()
        try:
            measures[engine.name] = run_on(case, engine, sizes)
        except Exception as exc:
            traceback.print_exc(file=log)
            record["errors"][engine.name] = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - started
        record["seconds"][engine.name] = round(seconds, 2)
        print(f"    {engine.name}: {seconds:.1f} s", file=log, flush=True)
    record["rows"] = report.merge_rows(measures)
    return record


def run_on(case, engine, sizes):
    if not case.needs_client:
        return case.function(engine, sizes)
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(
            engine.LocalCluster(**all_cases.STANDARD_CLUSTER))
        client = stack.enter_context(engine.Client(cluster))
        client.wait_for_workers(all_cases.STANDARD_CLUSTER["n_workers"])
        return case.function(engine, client, sizes)


def wait_for_quiet(threshold, minutes, log=sys.stderr, every=30):
    """Sleep until the 1-minute load average is below ``threshold``.

    Gives up after ``minutes``; returns whether the machine became quiet.
    """
    deadline = time.monotonic() + minutes * 60
    while True:
        load = os.getloadavg()[0]
        if load < threshold:
            return True
        if time.monotonic() + every > deadline:
            print(f"load average still {load:.2f} after {minutes:g} min: "
                  f"running anyway", file=log, flush=True)
            return False
        print(f"load average {load:.2f}, waiting for < {threshold:g}",
              file=log, flush=True)
        time.sleep(every)
