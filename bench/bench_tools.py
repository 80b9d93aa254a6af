#!/usr/bin/env python3
"""Ganymede's staging against the tool an operator would otherwise reach for, same data, same servers, same run.

The data: a busy hour as the agents deliver it (N GEO databases of R rows, N
`ganymede-agent` runs through a running `ganymede-api`), untimed.

- staging: StageTransaction for every transaction (`luigi.build`, local
  scheduler, one worker; unpacks the archive, checks sha256s and row counts,
  LOAD DATA, refuses warnings) against `mysqlimport --local` of the same
  CSVs, unpacked beforehand (the `tar -xzf` an operator would need first is
  timed separately), into copies of the staging tables.
- The agent's archive build against `mariadb-dump | gzip` is bench_agent.py;
  the backup against s5cmd and rclone is bench_backup.py.

mysqlimport comes from Debian's mariadb-client, installed here if missing
(`apt-get install -y`); if it cannot be installed it is reported as not
available. Rounds alternate and the best of each counts, since these
machines are shared.

    .venv/bin/python bench/bench_tools.py                       # 20 agents x 5,000 rows, 3 rounds: ~1 min
    .venv/bin/python bench/bench_tools.py --agents 5 --rows 2000 --rounds 1   # quick look
    .venv/bin/python bench/bench_tools.py --no-install          # use what is installed

Needs the local MariaDB, the MongoDB and S3 test servers (make services).
Everything it creates is removed at the end. Prints the key figure last and
appends a line to BENCHMARKS.md.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import closing
from datetime import timedelta

import common


# --- tools ------------------------------------------------------------------------

def apt_install(package, log):
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for attempt in range(2):
        if attempt:
            subprocess.run(["apt-get", "update", "-q"], stdout=log, stderr=subprocess.STDOUT, env=env)
        if subprocess.run(["apt-get", "install", "-y", "-q", package], stdout=log, stderr=subprocess.STDOUT,
                          env=env).returncode == 0:
            return True
    return False


def ensure_tools(install, log_path):
    """{tool: (argv prefix, version) or (None, why not)}; installs from Debian / PyPI when allowed."""
    tools = {}
    with open(log_path, "ab") as log:
        def have(name, find, apt=None, pip=None):
            path = find()
            if not path and install and apt and shutil.which("apt-get"):
                apt_install(apt, log)
                path = find()
            if not path and install and pip:
                subprocess.run([sys.executable, "-m", "pip", "install", "-q", pip], stdout=log,
                               stderr=subprocess.STDOUT)
                path = find()
            if not path:
                how = f"Debian package {apt}" if apt else f"PyPI package {pip}"
                tools[name] = (None, f"not available ({how} {'did not install' if install else 'not installed'})")
            else:
                tools[name] = (path, None)

        have("mysqlimport", lambda: shutil.which("mariadb-import") or shutil.which("mysqlimport"),
             apt="mariadb-client")
    for name, (path, _) in list(tools.items()):
        if path:
            out = subprocess.run([path, "--version"], capture_output=True, text=True)
            version = (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"
            tools[name] = (path, version)
    return tools


def run_timed(argv, env=None, cwd=None):
    started = time.perf_counter()
    out = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])}… exited {out.returncode}: {(out.stderr or out.stdout)[-1500:]}")
    return seconds, out.stdout


# --- children: Ganymede's steps in a process of their own ------------------------------

def child_stage(txs_path):
    started = time.perf_counter()
    import luigi
    from ganymede import hours
    from ganymede.tasks import StageTransaction
    with open(txs_path) as f:
        txs = json.load(f)
    tasks = [StageTransaction(transaction_id=t["transaction_id"], hour=hours.parse_hour(t["hour"]),
                              agent_id=t["agent_id"]) for t in txs]
    imported = time.perf_counter()
    ok = luigi.build(tasks, local_scheduler=True, workers=1, log_level="WARNING")
    done = time.perf_counter()
    print(json.dumps({"ok": ok, "seconds": done - imported, "imports": imported - started,
                      "vmhwm_mb": common.vmhwm_mb()}))


def run_child(world, *args):
    started = time.perf_counter()
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=world.env, capture_output=True,
                         text=True)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"child {args[0]} exited {out.returncode}: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result


# --- the comparisons -----------------------------------------------------------------

def staging_setup(world, archives, directory):
    """CSV files named after the staging tables, one directory per archive; a bare database with copies of the
    staging tables (transaction_id defaulted: mysqlimport cannot set it). Returns (seconds of tar -xzf, dirs)."""
    from ganymede import datasets, generator
    dirs = []
    started = time.perf_counter()
    for n, path in enumerate(archives):
        target = os.path.join(directory, f"a{n:04d}")
        os.makedirs(target)
        subprocess.run(["tar", "-xzf", path, "-C", target], check=True)
        dirs.append(target)
    untar = time.perf_counter() - started
    for target in dirs:
        for d in datasets.CATALOG.values():
            os.rename(os.path.join(target, f"{d.name}.csv"), os.path.join(target, f"{d.staging_table}.csv"))
    bare = world.extra_database("mysqlimport")
    with closing(generator.connect()) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{bare}`")
        for d in datasets.CATALOG.values():
            cur.execute(f"CREATE TABLE `{bare}`.`{d.staging_table}` LIKE `{world.mysql_database}`.`{d.staging_table}`")
            cur.execute(f"ALTER TABLE `{bare}`.`{d.staging_table}` MODIFY transaction_id CHAR(36) NOT NULL DEFAULT ''")
    return untar, dirs, bare


def truncate_staging(database):
    from ganymede import datasets, generator
    with closing(generator.connect(database)) as conn, conn.cursor() as cur:
        for d in datasets.CATALOG.values():
            cur.execute(f"TRUNCATE TABLE `{d.staging_table}`")


def staging_round(world, tools, hour, transactions, txs_path, dirs, bare, order):
    from ganymede import datasets
    from ganymede.paths import StateRoot
    root = StateRoot(world.root)
    times = {}
    for name in order:
        if name == "ganymede":
            for t in transactions:
                marker = root.transaction_marker(hour, t["agent_id"], t["transaction_id"], "staged")
                if os.path.exists(marker):
                    os.remove(marker)
            truncate_staging(world.mysql_database)
            result = run_child(world, "--child-stage", txs_path)
            if not result["ok"]:
                raise RuntimeError("StageTransaction failed")
            times[name] = (result["wall"], result["seconds"], result["vmhwm_mb"])
        else:
            truncate_staging(bare)
            total = 0.0
            for d in datasets.CATALOG.values():
                argv = [tools["mysqlimport"][0], "--local", "-h", "127.0.0.1", "-u", "root",
                        "--fields-terminated-by=,", "--fields-optionally-enclosed-by=\"", "--fields-escaped-by=",
                        "--lines-terminated-by=\\n", "--ignore-lines=1", "--columns=" + ",".join(d.column_names),
                        bare] + [os.path.join(target, f"{d.staging_table}.csv") for target in dirs]
                seconds, _ = run_timed(argv)
                total += seconds
            times[name] = (total, None, None)
    return times


def count_rows(database):
    from ganymede import datasets, generator
    with closing(generator.connect(database)) as conn, conn.cursor() as cur:
        total = 0
        for d in datasets.CATALOG.values():
            cur.execute(f"SELECT COUNT(*) FROM `{d.staging_table}`")
            total += cur.fetchone()[0]
        return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=20, help="GEOs / agents (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=5000, help="rows per agent (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating staging rounds; the best of each counts")
    parser.add_argument("--no-install", action="store_true", help="do not install missing tools")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--child-stage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_stage:
        return child_stage(args.child_stage)
    common.require_services()
    from ganymede import hours
    from ganymede.stores import txlog

    world = common.World("gbtools").activate()
    api = None
    try:
        tools = ensure_tools(not args.no_install, os.path.join(world.base, "install.log"))
        for name, (path, version) in tools.items():
            print(f"{name:12} {path + '  ' + version if path else version}")

        hour = hours.last_complete_hour() - timedelta(hours=4)
        world.upgrade()
        prepared = common.prepare_geos(world, hour, args.agents, args.rows)
        api, url = common.start_api(world)
        common.run_agents(world, common.write_agent_configs(world, prepared, url), hours.format_hour(hour))
        common.stop_process(api)
        api = None
        with closing(world.mysql()) as conn:
            transactions = txlog.hour_transactions(conn, hour, ("completed",))
        if len(transactions) != args.agents:
            raise SystemExit(f"{len(transactions)} transactions completed, expected {args.agents}")
        from ganymede.paths import StateRoot
        root = StateRoot(world.root)
        archives = [root.upload(hour, t["agent_id"], t["transaction_id"]) for t in transactions]

        # staging
        txs_path = os.path.join(world.base, "txs.json")
        with open(txs_path, "w") as f:
            json.dump([{"transaction_id": t["transaction_id"], "agent_id": t["agent_id"],
                        "hour": hours.format_hour(hour)} for t in transactions], f)
        staging_names = ["ganymede"] + (["mysqlimport"] if tools["mysqlimport"][0] else [])
        untar_s, dirs, bare = staging_setup(world, archives, os.path.join(world.base, "csv"))
        staging = {}
        for n in range(args.rounds):
            order = staging_names if n % 2 == 0 else staging_names[::-1]
            for name, value in staging_round(world, tools, hour, transactions, txs_path, dirs, bare, order).items():
                staging.setdefault(name, []).append(value)
                print(f"staging round {n + 1} {name:11} {value[0]:6.2f} s", flush=True)
        staged_rows = count_rows(world.mysql_database)
        imported_rows = count_rows(bare) if "mysqlimport" in staging else None
        if imported_rows is not None and imported_rows != staged_rows:
            raise SystemExit(f"mysqlimport loaded {imported_rows} rows, StageTransaction {staged_rows}")
        sbest = {name: min(values, key=lambda v: v[0]) for name, values in staging.items()}
    finally:
        common.stop_process(api)
        world.cleanup()

    print()
    s = sbest["ganymede"]
    print(f"staging {args.agents * args.rows:,} rows from {args.agents} archives, best of {args.rounds}:")
    print(f"  StageTransaction     {s[0]:6.2f} s (in-process {s[1]:.2f} s; peak RSS {s[2]:.0f} MB)")
    staging_ratio = None
    if "mysqlimport" in sbest:
        staging_ratio = sbest["mysqlimport"][0] / s[0]
        print(f"  mysqlimport --local  {sbest['mysqlimport'][0]:6.2f} s (+ tar -xzf beforehand {untar_s:.2f} s); "
              f"Ganymede's speed / mysqlimport's = {staging_ratio:.2f} "
              f"({(sbest['mysqlimport'][0] + untar_s) / s[0]:.2f} counting tar)")
    else:
        print(f"  mysqlimport          {tools['mysqlimport'][1]}")

    unavailable = [f"{n} {tools[n][1]}" for n in tools if not tools[n][0]]
    figures = (f"staging {args.agents * args.rows:,} rows: StageTransaction {s[0]:.2f} s"
               + (f", mysqlimport --local {sbest['mysqlimport'][0]:.2f} s (+ tar {untar_s:.2f} s), speed ratio "
                  f"{staging_ratio:.2f}" if staging_ratio else "")
               + (" · not available: " + "; ".join(unavailable) if unavailable else "")
               + " · versions: " + ", ".join(f"{n} {v}" for n, (p, v) in tools.items() if p))
    if not args.no_record:
        common.record(common.command_line(__file__), figures)
    print("tools: staging vs mysqlimport " + (f"{staging_ratio:.2f}" if staging_ratio else "n/a"))

if __name__ == "__main__":
    sys.exit(main())
