#!/usr/bin/env python3
"""Scheduling overhead: 1,000 tiny transactions of one hour scheduled and completed through luigid.

1,000 agents (expected from the hour) each complete one transaction whose
archive holds one row per dataset, created the way the API would (transaction
log + `ganymede_agent.archive.build_archive` into upload/), untimed. Then the
cron command `luigi --module ganymede.tasks HourlyBackup --hour H --workers W`
runs through a luigid of our own: 1,000 x (AgentArchive, StageTransaction,
LoadTransaction) + GlassbeamExtract + DumpSchema + HourlyBackup, the work per
task next to nothing. Reported: the wall time (target < 60 s), the time
before the first task runs (building the graph: completeness checks and
add_task calls to luigid), and per task family the run time summed.

    .venv/bin/python bench/bench_scheduling.py                    # ~2 min with set-up
    .venv/bin/python bench/bench_scheduling.py --transactions 200 --workers 2   # quick look
    .venv/bin/python bench/bench_scheduling.py --profile /tmp/sched.prof        # cProfile of the luigi main process

Needs the local MariaDB, the MongoDB and S3 test servers (make services);
starts its own luigid and removes everything it creates. Prints the key
figure last and appends a line to BENCHMARKS.md.
"""
import argparse
import os
import sys
import tempfile
import time
from contextlib import closing
from datetime import timedelta

import luigi

import common

TARGET_S = 60
FAMILIES = ("StageTransaction", "LoadTransaction", "GlassbeamExtract", "DumpSchema", "HourlyBackup")


# --- the bare baseline: a graph of the same shape whose tasks only write their marker ------

class BareTask(luigi.Task):
    dir = luigi.Parameter()

    def marker(self, name):
        return luigi.LocalTarget(os.path.join(self.dir, "state", name))

    def run(self):
        with self.output().open("w") as f:
            f.write("done\n")


class BareArchive(luigi.ExternalTask):
    dir = luigi.Parameter()
    n = luigi.IntParameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.dir, "upload", f"{self.n:05d}"))


class BareStage(BareTask):
    n = luigi.IntParameter()

    def requires(self):
        return BareArchive(dir=self.dir, n=self.n)

    def output(self):
        return self.marker(f"{self.n:05d}.staged")


class BareLoad(BareTask):
    n = luigi.IntParameter()

    @property
    def resources(self):  # as LoadTransaction: one resource per agent and hour
        return {f"bare-load:{self.n}": 1}

    def requires(self):
        return BareStage(dir=self.dir, n=self.n)

    def output(self):
        return self.marker(f"{self.n:05d}.loaded")


class BareExtract(BareTask):
    count = luigi.IntParameter()

    def requires(self):
        return [BareLoad(dir=self.dir, n=n) for n in range(self.count)]

    def output(self):
        return self.marker("extract")


class BareDump(BareTask):
    count = luigi.IntParameter()

    def requires(self):
        return BareExtract(dir=self.dir, count=self.count)

    def output(self):
        return self.marker("dump")


class BareBackup(BareTask):
    count = luigi.IntParameter()

    def requires(self):
        return BareDump(dir=self.dir, count=self.count)

    def output(self):
        return self.marker("backup")


def bare_graph(world, count, workers, usage):
    """The same graph shape through the same luigid, tasks that only write a marker: Luigi's own floor."""
    directory = os.path.join(world.base, "bare-graph")
    os.makedirs(os.path.join(directory, "upload"))
    for n in range(count):
        open(os.path.join(directory, "upload", f"{n:05d}"), "w").close()
    events = os.path.join(world.base, "bare-events.jsonl")
    wall, _, _ = common.run_graph(world, None, workers, events, usage=usage, task_argv=[
        "--module", "bench_scheduling", "BareBackup", "--dir", directory, "--count", str(count)])
    _, stats = common.task_stats(common.read_events(events))
    ran = sum(s["tasks"] for s in stats.values())
    if ran != 2 * count + 3:
        raise SystemExit(f"bare graph: {ran} tasks ran, expected {2 * count + 3}")
    return wall, stats


def tiny_rows(hour, n, scale=1):
    """`scale` rows per dataset for agent number `n`, every key distinct."""
    return {
        "account_usage": [[f"acct-{n:05d}-{i}", 10_000 + n, 10, 100, 50, 3] for i in range(scale)],
        "api_requests": [["GET", f"/v1/objects/{n}/{i}", 200, 100, 4096, 1.5, 9.25] for i in range(scale)],
        "node_health": [[f"node-{n:05d}-{i}", (hour + timedelta(minutes=n % 60)).strftime("%Y-%m-%dT%H:%M:%S"),
                         10 ** 12, 10 ** 11, 0.5, 0] for i in range(scale)],
    }


def create_transactions(world, hour, count, scale=1):
    """`count` agents, each with one completed transaction and its archive of `scale` rows per dataset in upload/."""
    from ganymede import datasets, hours
    from ganymede.paths import StateRoot
    from ganymede.stores import txlog
    from ganymede_agent.archive import build_archive, sha256_file
    root = StateRoot(world.root)
    with closing(world.mysql()) as conn:
        for n in range(count):
            agent_id = f"sched-{n:05d}"
            txlog.add_agent(conn, agent_id, "geo-sched", expected_from=hour)
            tx, _ = txlog.create_transaction(conn, agent_id, hour)
            path = root.upload(hour, agent_id, tx["transaction_id"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            rows = tiny_rows(hour, n, scale)
            manifest = build_archive(path, {"agent_id": agent_id, "geo": "geo-sched", "hour": hours.format_hour(hour),
                                            "agent_version": "bench"},
                                     [(name, datasets.CATALOG[name].column_names, rows[name])
                                      for name in sorted(datasets.CATALOG)])
            txlog.mark_uploaded(conn, tx["transaction_id"], os.path.getsize(path), sha256_file(path))
            txlog.mark_completed(conn, tx["transaction_id"], path,
                                 {k: v["rows"] for k, v in manifest["datasets"].items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transactions", type=int, default=1000, help="transactions (= agents) in the hour")
    parser.add_argument("--workers", type=int, default=4, help="luigi --workers (default: %(default)s)")
    parser.add_argument("--profile", help="write cProfile stats of the luigi main process here")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    common.require_services()
    from ganymede import hours, markers
    from ganymede.paths import StateRoot

    hour = hours.last_complete_hour() - timedelta(hours=3)
    base = tempfile.mkdtemp(prefix="gbsched-luigid-", dir=os.environ.get("BENCH_TMP"))
    luigid = common.Luigid(base)
    world = None
    try:
        luigid.start()
        world = common.World("gbsched", luigid_port=luigid.port).activate()
        world.upgrade()
        started = time.perf_counter()
        create_transactions(world, hour, args.transactions)
        print(f"{args.transactions} transactions with tiny archives created in {time.perf_counter() - started:.1f} s",
              flush=True)
        events = os.path.join(world.base, "events.jsonl")
        usage, bare_usage = {}, {}
        cpu0, luigid0 = common.machine_cpu(), common.cpu_seconds(luigid.proc.pid)
        wall, _, maxrss = common.run_graph(world, hours.format_hour(hour), args.workers, events, usage=usage,
                                           profile=args.profile)
        cores = common.busy_cores(cpu0, common.machine_cpu())
        luigid_cpu = common.cpu_seconds(luigid.proc.pid) - luigid0
        luigid1 = common.cpu_seconds(luigid.proc.pid)
        bare_wall, bare_stats = bare_graph(world, args.transactions, args.workers, bare_usage)
        bare_luigid_cpu = common.cpu_seconds(luigid.proc.pid) - luigid1
        backup = markers.read_json(StateRoot(world.root).hour_marker(hour, "backup"))
        process_start, stats = common.task_stats(common.read_events(events))
        failed = sum(s["failed"] for s in stats.values())
        if failed:
            raise SystemExit(f"{failed} task(s) failed; see {events}.log")
        if stats["LoadTransaction"]["tasks"] != args.transactions:
            raise SystemExit(f"only {stats['LoadTransaction']['tasks']} of {args.transactions} loads ran")
        first = min(s["first"] for s in stats.values())
        last = max(s["last"] for s in stats.values())
        scheduling = first - process_start
        ran = sum(s["tasks"] for s in stats.values())
        print(f"{args.transactions} transactions, {args.workers} workers: {ran} tasks run in {wall:.1f} s "
              f"({ran / wall:.0f} tasks/s); machine {cores:.1f} cores busy; luigi processes {usage['cpu_s']:.1f} CPU-s, "
              f"luigid {luigid_cpu:.1f} CPU-s; peak RSS {maxrss:.0f} MB")
        print(f"bare Luigi graph of the same shape (tasks only write their marker), same luigid and workers: "
              f"{sum(s['tasks'] for s in bare_stats.values())} tasks in {bare_wall:.1f} s; luigi processes "
              f"{bare_usage['cpu_s']:.1f} CPU-s, luigid {bare_luigid_cpu:.1f} CPU-s; Ganymede / bare {wall / bare_wall:.2f}")
        print(f"  start -> first task (graph built, {3 * args.transactions + 3} tasks sent to luigid): "
              f"{scheduling:.1f} s; first task -> last done {last - first:.1f} s; exit after last {process_start + wall - last:.1f} s"
              if process_start else "")
        for family in FAMILIES:
            s = stats.get(family)
            if s:
                print(f"  {family:18} {s['tasks']:5} tasks, {s['seconds']:7.1f} task-s summed "
                      f"({1000 * s['seconds'] / s['tasks']:.0f} ms each), span {s['last'] - s['first']:.1f} s")
        print(f"  backup: {len(backup['objects'])} objects")
        if args.profile:
            print(f"  cProfile of the luigi main process: {args.profile}")
        figures = (f"{args.transactions} tiny transactions, {args.workers} workers: {ran} tasks in {wall:.1f} s "
                   f"(building the graph {scheduling:.1f} s, "
                   + ", ".join(f"{f} {stats[f]['seconds']:.1f} task-s" for f in FAMILIES if f in stats)
                   + f"); luigi peak RSS {maxrss:.0f} MB; bare Luigi graph of the same shape {bare_wall:.1f} s "
                   f"(ratio {wall / bare_wall:.2f}) · {'met' if wall < TARGET_S else 'MISSED'} (target < 60 s)")
        if not args.no_record:
            common.record(common.command_line(__file__), figures)
        print(f"scheduling {args.transactions} transactions: {wall:.1f} s (target < {TARGET_S} s); "
              f"bare Luigi graph {bare_wall:.1f} s")
    finally:
        luigid.stop()
        if world:
            world.cleanup()
        common.shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
