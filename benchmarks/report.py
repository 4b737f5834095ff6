"""The results of a run: one record per row, as a table and as JSON.

A run is a dict (see ``runner.run``); each of its cases holds rows, and
each row the value of both engines, their ratio (minidask over dask) and
whether minidask met its target. The ratio reads the same way for every
row: whether above 1 is good depends on the row's ``better``, which the
table prints beside it.
"""

import json
import math
from pathlib import Path

from benchmarks import machine

ENGINES = ("minidask", "dask")
QUIET = 0.5  # a 1-minute load average below this is a quiet machine


def merge_rows(measures):
    """``{engine: [Measure]}`` -> one record per row, both engines in it."""
    rows = {}
    for engine, found in measures.items():
        for m in found:
            row = rows.setdefault(m.row, {
                "row": m.row, "unit": m.unit, "better": m.better,
                "target": m.target, "minidask": None, "dask": None,
                "errors": {}})
            row[engine] = m.value
            if m.error:
                row["errors"][engine] = m.error
    for row in rows.values():
        row["ratio"] = ratio(row["minidask"], row["dask"])
        row["target_met"] = target_met(row)
    return list(rows.values())


def ratio(ours, theirs):
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def target_met(row):
    """True or False against minidask's target; None without one."""
    target, value = row["target"], row["minidask"]
    if target is None or value is None:
        return None
    bound = row["dask"] if target == "dask" else target
    if bound is None:
        return None
    return value <= bound if row["better"] == "lower" else value >= bound


def target_text(row, with_units=True):
    target = row["target"]
    if target is None:
        return ""
    if target == "dask":
        wanted = "<= dask"
    else:
        sign = "<" if row["better"] == "lower" else ">"
        unit = "x" if row["unit"] == "x" else f" {row['unit']}"
        wanted = f"{sign} {target:,g}{unit if with_units else ''}"
    verdict = {True: "met", False: "missed", None: "not measured"}
    error = row.get("errors", {}).get("minidask")
    if error:
        return f"{wanted}: missed ({missing(error)})"
    return f"{wanted}: {verdict[row['target_met']]}"


# -- formatting ---------------------------------------------------------------

def missing(error):
    """What a cell without a number says: skipped, or failed."""
    return "skipped" if error.startswith("skipped") else "failed"


def number(value):
    """Three significant figures or so, without exponents."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    size = abs(value)
    if size >= 100:
        return f"{value:,.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def with_unit(value, unit):
    if value is None:
        return "-"
    return f"{number(value)}x" if unit == "x" else f"{number(value)} {unit}"


def table_cells(run, unit_column=False):
    """The table as rows of strings, with a header row first.

    With ``unit_column`` the units get a column of their own and the
    target leaves its unit out, for a narrower table.
    """
    header = ["case", "measure", "minidask", "dask", "minidask/dask",
              "better", "minidask target"]
    if unit_column:
        header[4:] = ["ratio", "better", "target"]
        header.insert(2, "unit")
    cells = [header]
    for case in run["cases"]:
        first = True
        for row in case["rows"]:
            unit = row["unit"]
            errors = row.get("errors", {})
            values = [missing(errors[engine]) if engine in errors
                      else number(row[engine]) if unit_column
                      else with_unit(row[engine], unit)
                      for engine in ENGINES]
            line = [case["case"] if first else "", row["row"], *values,
                    number(row["ratio"]), row["better"],
                    target_text(row, with_units=not unit_column)]
            if unit_column:
                line.insert(2, unit)
            cells.append(line)
            first = False
        for engine, error in case["errors"].items():
            line = [case["case"] if first else "",
                    f"{engine} failed: {error}"] + [""] * (len(header) - 2)
            cells.append(line)
            first = False
    return cells


def text_table(run):
    cells = table_cells(run)
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    numeric = {2, 3, 4}

    def line(row):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths)))
    rule = "  ".join("-" * w for w in widths)
    lines = [line(cells[0]), rule] + [line(r) for r in cells[1:]]
    return "\n".join(x.rstrip() for x in lines)


def failures(run):
    """One line per row an engine could not measure, saying why."""
    return [f"{engine}, {case['case']}, {row['row']}: {error}"
            for case in run["cases"] for row in case["rows"]
            for engine, error in row.get("errors", {}).items()]


def markdown_table(run):
    cells = table_cells(run, unit_column=True)
    align = ["---", "---", "---", "---:", "---:", "---:", "---", "---"]
    lines = ["| " + " | ".join(cells[0]) + " |",
             "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(lines)


def summary(run):
    """The lines above the table: machine, versions, load, duration."""
    facts = run["machine"]
    engines = ", ".join(f"{k} {v}" for k, v in run["engines"].items())
    load = run["load_average"]
    quiet = "quiet" if load["before"][0] < QUIET else "busy"
    commit = facts["commit"]
    after = run.get("commit_after", commit)
    if after != commit:
        commit = f"{commit}, {after} by the end (changed during the run)"
    return "\n".join([
        f"machine: {machine.describe(facts)}",
        f"engines: {engines}; commit {commit}; {run['when']}",
        f"load average (1, 5, 15 min): before {load['before']} ({quiet}), "
        f"after {load['after']}; the run took {run['seconds']:.0f} s"
        + (" (--quick: tiny sizes, not measurements)" if run["quick"] else ""),
    ])


def write_json(run, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run, indent=2) + "\n")
    return path


def read_json(path):
    return json.loads(Path(path).read_text())
