#!/usr/bin/env python3
"""Archive build speed and memory of ganymede-agent against `mariadb-dump | gzip -1`, same table, same run.

The baseline is the pipeline the old shell agent ran. The agent builds one
hour's archive (three datasets read with the sample SQL, CSV, manifest,
tar.gz, fsync'd into place) in a subprocess of its own, with each reader
(`client`: the mariadb command-line client; `pymysql`: a server-side cursor
without type conversion), and reports its build time and peak RSS (VmHWM; the
client process's peak is shown beside it). Rows come from the generator
(`rows=N` spread 60/20/20 over the three tables of one hour); the dump reads
the same three tables. Rounds alternate and the best of each counts, since
these machines are shared. Memory must not grow with rows, so two sizes run.

    bench/bench_agent.py                 # 1,000,000 rows, and 250,000 for the RSS comparison
    bench/bench_agent.py --rows 10000000 --small 1000000

Needs the local MariaDB (make services) and mariadb-dump. Prints the ratio
last and appends a line to BENCHMARKS.md.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import closing


from common import RssWatch, command_line, record, vmhwm_mb  # bench/ is on sys.path: this is a script

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HOUR = "2026-11-30T05"
TABLES = ("account_usage_hourly", "api_request_stats", "node_samples")
READERS = ("client", "pymysql")


def child(database, reader, work):
    """One archive build, as the agent does it; prints its figures as JSON."""
    from ganymede import generator
    from ganymede_agent import cli, collect, config

    path = generator.write_agent_config(os.path.join(work, f"{reader}.cfg"), api_url="http://127.0.0.1:1",
                                        agent_id="bench", token="unused", geo="bench", database=database,
                                        spool_dir=os.path.join(work, "spool"), reader=reader)
    cfg = config.load(path)
    source = collect.Source(cfg.database, cfg.datasets, reader)
    dest = os.path.join(work, f"{reader}.tar.gz")
    started = time.perf_counter()
    manifest = cli.build(cfg, source, HOUR, dest, work)
    seconds = time.perf_counter() - started
    print(json.dumps({
        "seconds": seconds, "reader": source.reader, "bytes": os.path.getsize(dest),
        "rows": sum(d["rows"] for d in manifest["datasets"].values()), "vmhwm_mb": vmhwm_mb()}))
    os.remove(dest)


def run_agent(database, reader, work):
    """One build in a process of its own; the peak RSS of its command-line clients is watched from here, not
    from inside the timed build (polling /proc there cost it ~1 ms of CPU, and the GIL, every 20 ms)."""
    watch = RssWatch()
    watch.start()
    try:
        with subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", database, reader, work],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) as proc:
            watch.watch(proc.pid, "build")
            stdout, stderr = proc.communicate()
    finally:
        watch.stop()
    if proc.returncode != 0:
        raise SystemExit(f"agent build ({reader}) failed: {stderr[-2000:]}")
    return dict(json.loads(stdout.strip().splitlines()[-1]),
                client_maxrss_mb=max(watch.children_of("build").values(), default=0.0))


def run_dump(database, host, port):
    command = (f"set -o pipefail; mariadb-dump --no-defaults -h {host} -P {port} -u root --single-transaction "
               f"{database} {' '.join(TABLES)} | gzip -1 > /dev/null")
    started = time.perf_counter()
    subprocess.run(["bash", "-c", command], check=True)
    return time.perf_counter() - started


def measure(rows, args, work):
    from ganymede import generator

    database = f"gbench_{uuid.uuid4().hex[:8]}"
    connect = {"host": args.mysql_host, "port": args.mysql_port}
    try:
        started = time.perf_counter()
        with closing(generator.create_database(database, **connect)) as conn:
            counts = generator.generate_hour(conn, HOUR, rows=rows, seed=1)
        print(f"{rows:,} rows generated in {time.perf_counter() - started:.1f} s: {counts}", flush=True)
        run_dump(database, args.mysql_host, args.mysql_port)  # warm the buffer pool for everyone
        best = {"dump": float("inf")}
        agent = {}
        for r in range(args.rounds):
            order = ["dump", *READERS] if r % 2 == 0 else [*reversed(READERS), "dump"]
            for name in order:
                if name == "dump":
                    seconds = run_dump(database, args.mysql_host, args.mysql_port)
                    best["dump"] = min(best["dump"], seconds)
                    print(f"round {r + 1} mariadb-dump | gzip -1: {rows / seconds:10,.0f} rows/s ({seconds:.2f} s)",
                          flush=True)
                    continue
                result = run_agent(database, name, work)
                assert result["rows"] == rows and result["reader"] == name, result
                if name not in agent or result["seconds"] < agent[name]["seconds"]:
                    agent[name] = result
                print(f"round {r + 1} agent ({name:7s}):      {rows / result['seconds']:10,.0f} rows/s "
                      f"({result['seconds']:.2f} s, peak RSS {result['vmhwm_mb']:.0f} MB, client "
                      f"{result['client_maxrss_mb']:.0f} MB, archive {result['bytes'] / 1e6:.1f} MB)", flush=True)
        return {"rows": rows, "dump_rows_s": rows / best["dump"],
                **{f"{n}_rows_s": rows / agent[n]["seconds"] for n in READERS},
                **{f"{n}_rss_mb": agent[n]["vmhwm_mb"] for n in READERS},
                "client_process_rss_mb": agent["client"]["client_maxrss_mb"]}
    finally:
        generator.drop_database(database, **connect)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the hour (default: %(default)s)")
    parser.add_argument("--small", type=int, help="a second, smaller size for the RSS comparison (default: rows/4)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each counts")
    parser.add_argument("--mysql-host", default="127.0.0.1")
    parser.add_argument("--mysql-port", type=int, default=3306)
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--child", nargs=3, metavar=("DATABASE", "READER", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    if args.child:
        return child(*args.child)
    if not shutil.which("mariadb-dump"):
        raise SystemExit("mariadb-dump is not installed (apt-get install mariadb-client)")

    work = tempfile.mkdtemp(prefix="bench-agent-", dir=os.environ.get("BENCH_TMP"))
    try:
        small = measure(args.small or max(1, args.rows // 4), args, work)
        big = measure(args.rows, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratio = big["client_rows_s"] / big["dump_rows_s"]
    print()
    for m in (small, big):
        print(f"{m['rows']:>11,} rows: agent/client {m['client_rows_s']:10,.0f} rows/s (peak RSS "
              f"{m['client_rss_mb']:.0f} MB + client {m['client_process_rss_mb']:.0f} MB), agent/pymysql "
              f"{m['pymysql_rows_s']:10,.0f} rows/s (peak RSS {m['pymysql_rss_mb']:.0f} MB), "
              f"mariadb-dump | gzip -1 {m['dump_rows_s']:10,.0f} rows/s")
    print(f"ratio agent (client reader) / mariadb-dump | gzip -1 at {args.rows:,} rows: {ratio:.2f} "
          f"(target >= 1.0; RSS target < 100 MB)")
    if not args.no_record:
        record(command_line(__file__), f"agent archive build, {big['rows']:,} rows: client reader "
                f"{big['client_rows_s']:,.0f} rows/s, pymysql reader {big['pymysql_rows_s']:,.0f} rows/s, "
                f"mariadb-dump | gzip -1 {big['dump_rows_s']:,.0f} rows/s; peak RSS {big['client_rss_mb']:.0f} MB "
                f"(client reader; {small['client_rss_mb']:.0f} MB at {small['rows']:,} rows), "
                f"{big['pymysql_rss_mb']:.0f} MB (pymysql) · ratio {ratio:.2f}")


if __name__ == "__main__":
    sys.exit(main())
