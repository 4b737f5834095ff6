"""``python -m benchmarks``: run the cases on both engines, print, save."""

import argparse
import sys
from pathlib import Path

from benchmarks import cases, report, runner
from benchmarks.engines import MODULES, available

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest.json"


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark minidask against dask.distributed on this "
                    "machine.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: check that every case runs")
    parser.add_argument("--engines", default="minidask,dask",
                        help="comma-separated, from: " + ", ".join(MODULES))
    parser.add_argument("--cases", default=None,
                        help="comma-separated case names (default: all): "
                             + ", ".join(c.name for c in cases.CASES))
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="where to write the JSON (default: %(default)s)")
    parser.add_argument("--markdown", action="store_true",
                        help="print the table as Markdown")
    parser.add_argument("--show", type=Path, metavar="JSON",
                        help="print the table of a saved run; run nothing")
    parser.add_argument("--wait-quiet", type=float, metavar="MINUTES",
                        help="first wait up to MINUTES for the 1-minute load "
                             "average to fall below 0.5")
    return parser.parse_args(argv)


def chosen_engines(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        sys.exit(f"unknown engine {unknown[0]!r}: use "
                 f"{' or '.join(MODULES)}")
    missing = [n for n in names if not available(n)]
    for name in missing:
        print(f"{name} is not installed ({MODULES[name]} does not import): "
              f"leaving it out; pip install -e '.[bench]' brings it",
              file=sys.stderr)
    return [n for n in names if n not in missing]


def chosen_cases(text):
    if text is None:
        return None
    names = {n.strip() for n in text.split(",") if n.strip()}
    known = {c.name for c in cases.CASES}
    if names - known:
        sys.exit(f"unknown case {sorted(names - known)[0]!r}: the cases are "
                 f"{', '.join(sorted(known))}")
    return names


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.show:
        results = report.read_json(args.show)
    else:
        engines = chosen_engines(args.engines)
        only = chosen_cases(args.cases)
        if args.wait_quiet:
            runner.wait_for_quiet(report.QUIET, args.wait_quiet)
        sizes = cases.QUICK if args.quick else cases.FULL
        results = runner.run(engines, sizes, quick=args.quick, only=only)
        results["quiet"] = results["load_average"]["before"][0] < report.QUIET
        report.write_json(results, args.output)
    print(report.summary(results))
    print()
    print(report.markdown_table(results) if args.markdown
          else report.text_table(results))
    for line in report.failures(results):
        print(line)
    if not args.show:
        print(f"\nsaved to {args.output}")


if __name__ == "__main__":
    main()
