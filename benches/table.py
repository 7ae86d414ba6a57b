#!/usr/bin/env python3
"""The report of a benchmark run: a header saying how the figures were taken, then a Markdown table
of medians per side and their ratios. Every benches/*.sh makes its table here (through bench_table
in benches/lib.sh), so a median or a ratio is computed the same way in all of them.

RESULTS is the run's tab-separated file, one figure per line: workload, side, round, metric, value
(lib.sh's `record` writes it). Each COLUMN is 'HEADER|EXPR|FORMAT':

  EXPR   SIDE.METRIC                     the median of METRIC over SIDE's rounds in the row
         SIDE.METRIC/SIDE.METRIC         the ratio of the two medians
         each:SIDE.METRIC/SIDE.METRIC    the median of the per-round ratios
         rounds:SIDE.METRIC/SIDE.METRIC  the per-round ratios, in round order
         (per-round ratios pair the two sides' figures of the same round)
         With --rows side, SIDE may be '*': the row's own side.
  FORMAT a Python format for one value, e.g. '{:,.0f}' or '{:.2f}x'; a figure that is missing or
         divides by zero prints '-' or 'n/a'.

Rows are the workloads in the order they were first recorded, or with --rows side the sides of one
workload (--workload), each shown as its --label if it has one.
"""

import argparse
import datetime
import os
import statistics
import sys


def load(path):
    """{(workload, side): {metric: [(round, value), ...]}} and the workloads and sides in order."""
    data, workloads, sides = {}, [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 5:
                sys.exit(f"{path}:{n}: expected 5 tab-separated fields, got {len(fields)}")
            workload, side, rnd, metric, value = fields
            try:
                value = float(value)
            except ValueError:
                sys.exit(f"{path}:{n}: {value!r} is not a number")
            if workload not in workloads:
                workloads.append(workload)
            sides.setdefault(workload, [])
            if side not in sides[workload]:
                sides[workload].append(side)
            data.setdefault((workload, side), {}).setdefault(metric, []).append((rnd, value))
    return data, workloads, sides


class Column:
    def __init__(self, spec):
        parts = spec.split("|")
        if len(parts) != 3:
            sys.exit(f"column {spec!r} is not 'HEADER|EXPR|FORMAT'")
        self.header, expr, self.fmt = parts
        self.kind = "value"
        for kind in ("each", "rounds"):
            if expr.startswith(kind + ":"):
                self.kind, expr = kind, expr[len(kind) + 1:]
        terms = expr.split("/")
        if len(terms) > 2 or (self.kind != "value" and len(terms) != 2):
            sys.exit(f"column {spec!r}: EXPR must be SIDE.METRIC or a ratio of two")
        self.terms = []
        for term in terms:
            side, dot, metric = term.rpartition(".")
            if not dot or not side or not metric:
                sys.exit(f"column {spec!r}: {term!r} is not SIDE.METRIC")
            self.terms.append((side, metric))
        try:
            self.fmt.format(1.0)
        except (ValueError, IndexError) as e:
            sys.exit(f"column {spec!r}: bad FORMAT: {e}")

    def cell(self, data, workload, row_side):
        series = []
        for side, metric in self.terms:
            if side == "*":
                if row_side is None:
                    sys.exit(f"column {self.header!r}: SIDE '*' needs --rows side")
                side = row_side
            series.append(data.get((workload, side), {}).get(metric, []))
        if not all(series):
            return "-"
        if self.kind == "value":
            meds = [statistics.median(v for _, v in s) for s in series]
            if len(meds) == 1:
                return self.fmt.format(meds[0])
            return self.fmt.format(meds[0] / meds[1]) if meds[1] else "n/a"
        # Per-round ratios: rounds matched by their number, in the order the numerator ran them.
        den = dict(series[1])
        ratios = [v / den[r] for r, v in series[0] if den.get(r)]
        if not ratios:
            return "n/a"
        if self.kind == "each":
            return self.fmt.format(statistics.median(ratios))
        return " ".join(self.fmt.format(x) for x in ratios)

    def align(self):
        return "---" if self.kind == "rounds" else "---:"


def header(args):
    print(f"Command: `{args.command}`")
    print()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"- date: {date}; host: {os.cpu_count()} CPUs; {args.elapsed} s from start to table, "
          f"{args.measured} s of measuring")
    print(f"- load average (1, 5, 15 min): {args.load_start} at the start, {args.load_measure} when "
          f"measuring began, {args.load_end} at the end")
    if args.loaded:
        print(f"- **taken under load**: the 1-minute load average was above MAX_LOAD={args.max_load}; "
              "these figures measure the other load as much as vstor")
    print(f"- vstor {args.revision}")
    for note in args.note:
        print(f"- {note}")
    print()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results")
    p.add_argument("columns", nargs="+", metavar="COLUMN")
    p.add_argument("--rows", choices=("workload", "side"), default="workload")
    p.add_argument("--workload", help="only this workload's figures")
    p.add_argument("--row-header", default=None, help="the first column's header")
    p.add_argument("--label", action="append", default=[], metavar="SIDE=TEXT")
    # The header, printed when --command is given.
    p.add_argument("--command")
    p.add_argument("--revision", default="unknown")
    p.add_argument("--load-start", default="?")
    p.add_argument("--load-measure", default="?")
    p.add_argument("--load-end", default="?")
    p.add_argument("--max-load", default="?")
    p.add_argument("--loaded", action="store_true", help="the load average went above --max-load")
    p.add_argument("--elapsed", default="?")
    p.add_argument("--measured", default="?")
    p.add_argument("--note", action="append", default=[])
    args = p.parse_args()

    data, workloads, sides = load(args.results)
    columns = [Column(c) for c in args.columns]
    if any("=" not in l for l in args.label):
        sys.exit("--label takes SIDE=TEXT")
    labels = dict(l.split("=", 1) for l in args.label)
    if args.workload is not None:
        if args.workload not in workloads:
            sys.exit(f"{args.results}: no figures for workload {args.workload!r}")
        workloads = [args.workload]
    if args.rows == "side":
        if len(workloads) != 1:
            sys.exit("--rows side needs --workload (or one workload in the results)")
        rows = [(workloads[0], s, labels.get(s, s)) for s in sides[workloads[0]]]
    else:
        rows = [(w, None, w) for w in workloads]
    if not rows:
        sys.exit(f"{args.results}: no figures")

    if args.command is not None:
        header(args)
    first = args.row_header or args.rows
    print("| " + " | ".join([first] + [c.header for c in columns]) + " |")
    print("|" + "|".join(["---"] + [c.align() for c in columns]) + "|")
    for workload, side, label in rows:
        print("| " + " | ".join([label] + [c.cell(data, workload, side) for c in columns]) + " |")


if __name__ == "__main__":
    main()
