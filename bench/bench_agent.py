#!/usr/bin/env python3
"""Archive build speed and memory of ganymede-agent against a bare pymysql read of the same rows, same run.

The agent builds one hour's archive (three datasets read with the sample SQL
through pymysql's server-side cursor, CSV, manifest, tar.gz, fsync'd into
place) in a process of its own and reports its build time, its CPU time (at
most one core: it shares the GEO's database server) and its peak RSS (VmHWM).
The baseline is the least any reader can do: the same three queries through a
bare SSCursor, rows fetched and dropped. `mariadb-dump | gzip -1` of the same
tables is shown beside them as a reference, with no target. Rows come from
the generator (`rows=N` spread 60/20/20 over the three tables of one hour).
Rounds alternate and the best of each counts, since these machines are shared.

    bench/bench_agent.py                 # 1,000,000 rows
    bench/bench_agent.py --rows 20000 --rounds 1 --no-record

Targets: >= 150,000 rows/s, RSS < 100 MB. Needs the local MariaDB (make
services) and mariadb-dump. Prints the figure last and appends a line to
BENCHMARKS.md (unless --no-record).
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import closing
from datetime import timedelta

from common import command_line, record, vmhwm_mb  # bench/ is on sys.path: this is a script

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HOUR = "2026-11-30T05"
TABLES = ("account_usage_hourly", "api_request_stats", "node_samples")
TARGET_ROWS_S, TARGET_RSS_MB = 150_000, 100


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(kind, database, work):
    """One archive build as the agent does it, or the bare read; prints its figures as JSON."""
    from ganymede import generator
    from ganymede_agent import cli, collect, config

    path = generator.write_agent_config(os.path.join(work, "bench.cfg"), api_url="http://127.0.0.1:1",
                                        agent_id="bench", token="unused", geo="bench", database=database,
                                        spool_dir=os.path.join(work, "spool"))
    cfg = config.load(path)
    dest = os.path.join(work, "bench.tar.gz")
    cpu, started = _cpu_seconds(), time.perf_counter()
    if kind == "agent":
        manifest = cli.build(cfg, collect.Source(cfg.database, cfg.datasets), HOUR, dest, work)
        rows, size = sum(d["rows"] for d in manifest["datasets"].values()), os.path.getsize(dest)
        os.remove(dest)
    else:
        rows, size = bare_read(cfg), 0
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "cpu": (_cpu_seconds() - cpu) / seconds, "rows": rows, "bytes": size,
                      "vmhwm_mb": vmhwm_mb()}))


def bare_read(cfg):
    """The sample queries through a bare SSCursor (no value conversion), every row fetched and dropped."""
    import pymysql
    import pymysql.converters
    import pymysql.cursors
    from ganymede_agent import collect

    db, start = cfg.database, collect.parse_hour(HOUR)
    params = {"start": start, "end": start + timedelta(hours=1)}
    rows = 0
    with closing(pymysql.connect(host=db.host, port=db.port, user=db.user, password=db.password,
                                 database=db.database, charset="utf8mb4", conv=dict(pymysql.converters.encoders),
                                 init_command="SET time_zone = '+00:00'")) as conn:
        for sql in cfg.datasets.values():
            with conn.cursor(pymysql.cursors.SSCursor) as cur:
                cur.execute(sql, params)
                while batch := cur.fetchmany(5000):
                    rows += len(batch)
    return rows


def run_child(kind, database, work):
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, database, work],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_dump(database, host, port):
    command = (f"set -o pipefail; mariadb-dump --no-defaults -h {host} -P {port} -u root --single-transaction "
               f"{database} {' '.join(TABLES)} | gzip -1 > /dev/null")
    started = time.perf_counter()
    subprocess.run(["bash", "-c", command], check=True)
    return {"seconds": time.perf_counter() - started}


def measure(rows, args, work):
    from ganymede import generator

    database = f"gbench_{uuid.uuid4().hex[:8]}"
    connect = {"host": args.mysql_host, "port": args.mysql_port}
    runs = {"agent": lambda: run_child("agent", database, work), "bare": lambda: run_child("bare", database, work),
            "dump": lambda: run_dump(database, args.mysql_host, args.mysql_port)}
    try:
        started = time.perf_counter()
        with closing(generator.create_database(database, **connect)) as conn:
            counts = generator.generate_hour(conn, HOUR, rows=rows, seed=1)
        print(f"{rows:,} rows generated in {time.perf_counter() - started:.1f} s: {counts}", flush=True)
        runs["dump"]()  # warm the buffer pool for everyone
        best = {}
        for r in range(args.rounds):
            for name in (["agent", "bare", "dump"] if r % 2 == 0 else ["dump", "bare", "agent"]):
                result = runs[name]()
                assert name == "dump" or result["rows"] == rows, result
                if name not in best or result["seconds"] < best[name]["seconds"]:
                    best[name] = result
                extra = (f", CPU {result['cpu']:.2f} core, peak RSS {result['vmhwm_mb']:.0f} MB"
                         if name != "dump" else "")
                print(f"round {r + 1} {name:5s}: {rows / result['seconds']:10,.0f} rows/s "
                      f"({result['seconds']:.2f} s{extra})", flush=True)
        return {name: dict(result, rows_s=rows / result["seconds"]) for name, result in best.items()}
    finally:
        generator.drop_database(database, **connect)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the hour (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each counts")
    parser.add_argument("--mysql-host", default="127.0.0.1")
    parser.add_argument("--mysql-port", type=int, default=3306)
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "DATABASE", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    if args.child:
        return child(*args.child)
    if not shutil.which("mariadb-dump"):
        raise SystemExit("mariadb-dump is not installed (apt-get install mariadb-client)")

    work = tempfile.mkdtemp(prefix="bench-agent-", dir=os.environ.get("BENCH_TMP"))
    try:
        best = measure(args.rows, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    agent, bare, dump = best["agent"], best["bare"], best["dump"]
    figure = (f"agent archive build at {args.rows:,} rows: {agent['rows_s']:.0f} rows/s "
              f"(target >= {TARGET_ROWS_S}; {agent['seconds']:.2f} s, CPU {agent['cpu']:.2f} core, "
              f"archive {agent['bytes'] / 1e6:.1f} MB), peak RSS {agent['vmhwm_mb']:.0f} MB "
              f"(target < {TARGET_RSS_MB} MB); bare SSCursor read {bare['rows_s']:,.0f} rows/s, "
              f"agent/bare {agent['rows_s'] / bare['rows_s']:.2f}; "
              f"reference, no target: mariadb-dump | gzip -1 {dump['rows_s']:,.0f} rows/s")
    print()
    print(figure)
    if not args.no_record:
        record(command_line(__file__), figure)


if __name__ == "__main__":
    sys.exit(main())
