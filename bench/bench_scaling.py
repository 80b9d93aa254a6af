#!/usr/bin/env python3
"""Scaling: N transactions of one hour through the whole HourlyBackup graph, N = 250 … 10,000, 1× and 10× rows.

For each point a fresh luigid and world: N agents each complete one
transaction whose archive holds `rows` rows per dataset (created as the API
would, untimed), then the cron command runs through that luigid with
`--workers W`. Recorded: the wall time, luigid's CPU seconds and peak RSS, the
load tasks luigid held (LoadTransaction below `[extract] load_tasks`,
LoadBatch above), and per row factor the growth exponent k of time ~ N^k
(least squares over log-log). The 10,000-transaction hour must close inside
the 45-minute deadline.

    .venv/bin/python bench/bench_scaling.py                              # the whole matrix, ~25 min
    .venv/bin/python bench/bench_scaling.py --sizes 250 1000 --rows 1    # quick look
    .venv/bin/python bench/bench_scaling.py --sizes 1000 --load-tasks 100000   # one task per transaction

Needs the local MariaDB and the MongoDB and S3 test servers (make services);
starts its own luigid per point and removes everything it creates. Prints the
key figure last and appends a line to BENCHMARKS.md.
"""
import argparse
import math
import os
import sys
import tempfile
import time
from datetime import timedelta

import bench_scheduling
import common

DEADLINE_S = 45 * 60


def run_point(n, rows, workers, load_tasks):
    """One hour of `n` transactions of `rows` rows per dataset; returns its figures."""
    from ganymede import hours, markers
    from ganymede.paths import StateRoot

    hour = hours.last_complete_hour() - timedelta(hours=3)
    base = tempfile.mkdtemp(prefix="gbscale-luigid-", dir=os.environ.get("BENCH_TMP"))
    luigid, world = common.Luigid(base), None
    extra = {"extract": {"deadline_minutes": "1440", "load_tasks": str(load_tasks)}} if load_tasks else None
    try:
        luigid.start()
        world = common.World("gbscale", luigid_port=luigid.port, extra=extra).activate()
        world.upgrade()
        started = time.perf_counter()
        bench_scheduling.create_transactions(world, hour, n, rows)
        created = time.perf_counter() - started
        events = os.path.join(world.base, "events.jsonl")
        usage, cpu0 = {}, common.cpu_seconds(luigid.proc.pid)
        wall, _, maxrss = common.run_graph(world, hours.format_hour(hour), workers, events, usage=usage)
        luigid_cpu = common.cpu_seconds(luigid.proc.pid) - cpu0
        _, stats = common.task_stats(common.read_events(events))
        failed = sum(s["failed"] for s in stats.values())
        if failed:
            raise SystemExit(f"N={n}: {failed} task(s) failed; see {events}.log")
        extract = markers.read_json(StateRoot(world.root).extract_manifest(hour, 0))
        if len(extract["transactions"]) != n or sum(extract["counts"].values()) != 3 * n * rows:
            raise SystemExit(f"N={n}: the extract holds {len(extract['transactions'])} transactions and "
                             f"{sum(extract['counts'].values())} rows, expected {n} and {3 * n * rows}")
        return {"n": n, "rows": rows, "wall": wall, "created": created, "luigid_cpu": luigid_cpu,
                "luigid_rss": common.vmhwm_mb(luigid.proc.pid), "luigi_cpu": usage["cpu_s"], "luigi_rss": maxrss,
                "load_tasks": {f: stats[f]["tasks"] for f in ("LoadTransaction", "LoadBatch") if f in stats}}
    finally:
        luigid.stop()
        if world:
            world.cleanup()
        common.shutil.rmtree(base, ignore_errors=True)


def exponent(points, key):
    """k of key ~ N^k, least squares over log-log; None with fewer than two sizes."""
    xs = [math.log(p["n"]) for p in points]
    ys = [math.log(max(p[key], 1e-3)) for p in points]
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 4000, 10000], help="transactions per hour")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 10], help="rows per dataset per transaction")
    parser.add_argument("--workers", type=int, default=4, help="luigi --workers (default: %(default)s)")
    parser.add_argument("--load-tasks", type=int, default=0,
                        help="[extract] load_tasks for the runs (default: the product's default)")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    common.require_services()

    points = []
    print(f"{'N':>6} {'rows':>4} {'wall s':>8} {'luigid CPU-s':>12} {'luigid RSS MB':>13} {'luigi CPU-s':>11} "
          f"{'luigi RSS MB':>12}  load tasks", flush=True)
    for rows in args.rows:
        for n in args.sizes:
            p = run_point(n, rows, args.workers, args.load_tasks)
            points.append(p)
            tasks = ", ".join(f"{v} {k}" for k, v in p["load_tasks"].items())
            print(f"{n:>6} {rows:>4} {p['wall']:>8.1f} {p['luigid_cpu']:>12.1f} {p['luigid_rss']:>13.0f} "
                  f"{p['luigi_cpu']:>11.1f} {p['luigi_rss']:>12.0f}  {tasks} (set-up {p['created']:.0f} s)", flush=True)
    fits = []
    for rows in args.rows:
        mine = [p for p in points if p["rows"] == rows]
        k_wall, k_cpu = exponent(mine, "wall"), exponent(mine, "luigid_cpu")
        if k_wall is not None:
            fits.append(f"{rows}x rows: wall ~ N^{k_wall:.2f}, luigid CPU ~ N^{k_cpu:.2f}")
    for line in fits:
        print("growth: " + line)
    largest = max(points, key=lambda p: (p["n"], p["rows"]))
    verdict = "met" if largest["wall"] < DEADLINE_S else "MISSED"
    figures = ("; ".join(f"N={p['n']} {p['rows']}x {p['wall']:.0f} s (luigid {p['luigid_cpu']:.0f} CPU-s, "
                         f"{p['luigid_rss']:.0f} MB)" for p in points)
               + f"; {args.workers} workers" + (f", load_tasks {args.load_tasks}" if args.load_tasks else "")
               + ("; " + "; ".join(fits) if fits else "")
               + f" · {verdict} (largest hour inside the {DEADLINE_S // 60}-minute deadline)")
    if not args.no_record:
        common.record(common.command_line(__file__), figures)
    print(f"scaling: {largest['n']} transactions x {largest['rows']} rows closed in {largest['wall']:.0f} s "
          f"(deadline {DEADLINE_S} s, {verdict})")


if __name__ == "__main__":
    sys.exit(main())
