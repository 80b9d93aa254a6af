#!/usr/bin/env python3
"""A busy hour end to end against the sum of its bare stages, same data, same services, same run.

The busy hour: N GEO databases of R rows each (ganymede.generator, spread
60/20/20 over the three datasets), N `ganymede-agent` runs at once uploading
through a running `ganymede-api` subprocess, then the cron command
`luigi --module ganymede.tasks HourlyBackup --hour H --workers W` through a
luigid of our own (run through bench/common.py's probe, which logs each
task's start, end and peak RSS). Wall time per phase and in total.

Then the bare stages on the very same data, one after the other:
  collect   the agents' SELECTs through `mariadb --batch --quick | gzip -1`, per GEO
  upload    the same archives PUT concurrently to a bare Tornado handler that writes the body to disk
  staging   LOAD DATA LOCAL of the same CSVs (unpacked beforehand) into copies of the staging tables
  MongoDB   pymongo bulk_write of ReplaceOne upserts of the same documents (exported beforehand as BSON),
            same batches of 2000, same indexes (ganymede.stores.mongo.INDEXES), into a fresh database
  extract   find({"hour": H}) + json.dumps + gzip of the hour's documents
  dump      mariadb-dump --single-transaction of the same schema | gzip
  backup    boto3 upload_file of the same objects into a fresh bucket
Busy hour / sum of bare stages: target <= 1.25. Peak RSS (VmHWM) of the API,
the Luigi worker processes and the agents: target < 300 MB each.

    .venv/bin/python bench/bench_busy_hour.py                      # 20 agents x 5,000 rows: ~1-2 min
    .venv/bin/python bench/bench_busy_hour.py --scale 10           # also the 10x hour (20 x 50,000 rows): +5-10 min
    .venv/bin/python bench/bench_busy_hour.py --agents 5 --rows 1000 --workers 2   # quick look

Needs the local MariaDB, the MongoDB and S3 test servers (make services);
starts its own luigid. Everything it creates (databases, buckets, state,
processes) is removed at the end. Prints the key figure last and appends a
line to BENCHMARKS.md.
"""
import argparse
import gzip
import http.client
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import timedelta

import common

STAGES = ("StageTransaction", "LoadTransaction", "GlassbeamExtract", "DumpSchema", "HourlyBackup")
BARE = ("collect", "upload", "staging", "mongodb", "extract", "dump", "backup")
RSS_TARGET_MB = 300


def start_bare_server(world):
    port, directory = common.free_port(), os.path.join(world.base, "bare-upload")
    os.makedirs(directory)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--bare-server", str(port), directory],
                            env=world.env, start_new_session=True)
    for _ in range(200):
        try:
            common.socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port, directory
        except OSError:
            time.sleep(0.05)
    common.stop_process(proc)
    raise SystemExit("the bare Tornado server did not start")


def put_file(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120, blocksize=1 << 16)
    try:
        with open(path, "rb") as body:
            conn.request("PUT", "/" + os.path.basename(path), body=body,
                         headers={"Content-Length": str(os.path.getsize(path)),
                                  "Content-Type": "application/gzip"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"bare PUT answered {response.status}")
    finally:
        conn.close()


# --- the bare stages -------------------------------------------------------------------

def timed(fn, *args):
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def bare_collect(world, hour, geo_databases, out_dir):
    """The agents' SELECTs with the command-line client, piped to gzip -1 (one GEO after the other)."""
    from ganymede import generator, hours
    start, end = hours.window(hour)
    quoted = {"start": f"'{start:%Y-%m-%d %H:%M:%S}'", "end": f"'{end:%Y-%m-%d %H:%M:%S}'"}
    sql = {name: " ".join(text.split()) % quoted for name, text in generator.sample_datasets().items()}
    client = common.shutil.which("mariadb") or common.shutil.which("mysql")
    os.makedirs(out_dir, exist_ok=True)

    def run():
        for database in geo_databases:
            for name, query in sql.items():
                with open(os.path.join(out_dir, f"{database}-{name}.tsv.gz"), "wb") as out:
                    reader = subprocess.Popen([client, "--batch", "--quick", "-h", "127.0.0.1", "-u", "root",
                                               database, "-e", query], stdout=subprocess.PIPE)
                    gz = subprocess.Popen(["gzip", "-1"], stdin=reader.stdout, stdout=out)
                    reader.stdout.close()
                    if gz.wait() or reader.wait():
                        raise RuntimeError(f"bare collect of {database}/{name} failed")
    return timed(run)


def bare_upload(world, archives):
    proc, port, directory = start_bare_server(world)
    try:
        put_file(port, archives[0])  # one warm-up request: the server is up and listening
        with ThreadPoolExecutor(len(archives)) as pool:
            started = time.perf_counter()
            list(pool.map(lambda p: put_file(port, p), archives))
            return time.perf_counter() - started
    finally:
        common.stop_process(proc)
        common.shutil.rmtree(directory, ignore_errors=True)


def unpack_csvs(archives, out_dir):
    """{archive: {dataset: csv path}} (untimed preparation of the bare LOAD DATA)."""
    unpacked = {}
    for n, path in enumerate(archives):
        target = os.path.join(out_dir, f"a{n:04d}")
        os.makedirs(target)
        files = {}
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.name.endswith(".csv"):
                    tar.extract(member, target, filter="data")
                    files[member.name[: -len(".csv")]] = os.path.join(target, member.name)
        unpacked[path] = files
    return unpacked


def bare_staging(world, unpacked):
    """LOAD DATA LOCAL of every CSV into copies of the staging tables, one commit per file."""
    from ganymede import datasets, generator
    bare = world.extra_database("bare")
    with closing(generator.connect()) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{bare}`")
        for d in datasets.CATALOG.values():
            cur.execute(f"CREATE TABLE `{bare}`.`{d.staging_table}` LIKE `{world.mysql_database}`.`{d.staging_table}`")
    with closing(generator.connect(bare)) as conn, conn.cursor() as cur:  # autocommit: one commit per file
        started = time.perf_counter()
        for n, files in enumerate(unpacked.values()):
            tx = f"00000000-0000-0000-0000-{n:012d}"
            for name, path in files.items():
                d = datasets.CATALOG[name]
                columns = ", ".join(f"`{c}`" for c in d.column_names)
                cur.execute(f"LOAD DATA LOCAL INFILE %s INTO TABLE `{d.staging_table}` CHARACTER SET utf8mb4 "
                            "FIELDS TERMINATED BY ',' OPTIONALLY ENCLOSED BY '\"' ESCAPED BY '' "
                            "LINES TERMINATED BY '\\n' IGNORE 1 LINES "
                            f"({columns}) SET transaction_id = %s, record = 0", (path, tx))
        return time.perf_counter() - started


def export_documents(world, hour, out_dir):
    """The hour's documents as one BSON file per collection (untimed preparation of the bare write)."""
    import bson
    from ganymede import datasets
    client, db = world.mongo()
    files = {}
    with closing(client):
        for name in sorted(datasets.CATALOG):
            path = os.path.join(out_dir, f"{name}.bson")
            with open(path, "wb") as f:
                for doc in db[name].find({"hour": hour}, batch_size=2000):
                    f.write(bson.encode(doc))
            files[name] = path
    return files


def bare_mongodb(world, files, batch_size=2000):
    """bulk_write(ReplaceOne upsert by _id) of the same documents, same batches, same indexes, fresh database."""
    import bson
    import pymongo
    from ganymede.stores import mongo
    client, db = world.mongo(world.mongo_database + "_bare")
    with closing(client):
        started = time.perf_counter()
        for name, path in files.items():
            for keys in mongo.INDEXES:
                db[name].create_index(keys)
            with open(path, "rb") as f:
                batch = []
                for doc in bson.decode_file_iter(f):
                    batch.append(pymongo.ReplaceOne({"_id": doc["_id"]}, doc, upsert=True))
                    if len(batch) == batch_size:
                        db[name].bulk_write(batch, ordered=False)
                        batch = []
                if batch:
                    db[name].bulk_write(batch, ordered=False)
        return time.perf_counter() - started


def bare_extract(world, hour, out_path):
    from ganymede import datasets
    client, db = world.mongo()
    with closing(client):
        started = time.perf_counter()
        with gzip.open(out_path, "wb", compresslevel=6) as gz:
            for name in sorted(datasets.CATALOG):
                for doc in db[name].find({"hour": hour}, batch_size=2000):
                    gz.write(json.dumps(doc, default=str).encode() + b"\n")
        return time.perf_counter() - started


def bare_dump(world, out_path):
    def run():
        with open(out_path, "wb") as out:
            dump = subprocess.Popen(["mariadb-dump", "-h", "127.0.0.1", "-u", "root", "--single-transaction",
                                     "--databases", world.mysql_database], stdout=subprocess.PIPE)
            gz = subprocess.Popen(["gzip"], stdin=dump.stdout, stdout=out)
            dump.stdout.close()
            if gz.wait() or dump.wait():
                raise RuntimeError("bare mariadb-dump | gzip failed")
    return timed(run)


def bare_backup(world, objects):
    client = common.s3_client()
    bucket = world.bucket("bare")
    client.create_bucket(Bucket=bucket)
    try:
        started = time.perf_counter()
        for key, path in objects.items():
            client.upload_file(path, bucket, key)
        seconds = time.perf_counter() - started
        if len(common.bucket_keys(client, bucket)) != len(objects):
            raise RuntimeError("bare backup: object count differs")
        return seconds
    finally:
        common.delete_bucket(client, bucket)


def backup_objects(root, hour, listing):
    """{key: local path} of what HourlyBackup uploaded (archives are in archives/ by now)."""
    objects = {}
    for entry in listing:
        key = entry["key"]
        if key.startswith("archives/"):
            agent_id, name = key.split("/")[1:3]
            path = root.archived(hour, agent_id, name[: -len(".tar.gz")])
        elif key.startswith("mysql/"):
            path = os.path.join(os.path.dirname(root.backup_dump(hour)), key.split("/", 1)[1])
        elif key.startswith("extracts/"):
            path = os.path.join(os.path.dirname(root.extract(hour)), key.split("/", 1)[1])
        elif key == "MANIFEST.json":
            path = os.path.join(os.path.dirname(root.hour_marker(hour, "backup")), "MANIFEST.json")
        else:
            raise RuntimeError(f"unexpected backup key {key}")
        if not os.path.exists(path):
            raise RuntimeError(f"{key}: {path} is missing")
        objects[key] = path
    return objects


# --- one hour ----------------------------------------------------------------------------

def run_hour(args, luigid, hour, rows, watch):
    from ganymede import datasets, hours, markers
    from ganymede.paths import StateRoot
    world = common.World("gbbusy", luigid_port=luigid.port).activate()
    api = None
    try:
        hour_text = hours.format_hour(hour)
        world.upgrade()
        upgrade = subprocess.run([common.bin_path("ganymede"), "db", "upgrade"], env=world.env,
                                 capture_output=True, text=True)  # the MongoDB indexes, as a deploy makes them
        if upgrade.returncode:
            raise SystemExit(f"ganymede db upgrade failed: {upgrade.stderr}")
        t = time.perf_counter()
        prepared = common.prepare_geos(world, hour, args.agents, rows)
        print(f"[{rows:,} rows/agent] {args.agents} GEO databases generated in {time.perf_counter() - t:.1f} s",
              flush=True)
        api, url = common.start_api(world)
        watch.watch(api.pid, "api")
        configs = common.write_agent_configs(world, prepared, url)

        # the busy hour
        cpu0, api_cpu0 = common.machine_cpu(), common.cpu_seconds(api.pid)
        agents_s, agent_results = common.run_agents(world, configs, hour_text, watch)
        cpu1, api_cpu1 = common.machine_cpu(), common.cpu_seconds(api.pid)
        print(f"  agents: {args.agents} at once, collect + upload {agents_s:.2f} s", flush=True)
        events = os.path.join(world.base, "events.jsonl")
        graph_usage = {}
        graph_s, _, luigi_maxrss = common.run_graph(world, hour_text, args.workers, events, watch, usage=graph_usage)
        cpu2 = common.machine_cpu()
        busy_s = agents_s + graph_s
        print(f"  graph: luigi HourlyBackup --workers {args.workers} {graph_s:.2f} s; busy hour {busy_s:.2f} s",
              flush=True)
        watch.sample()
        api_rss = watch.own.get("api", 0.0)
        common.stop_process(api)
        api = None

        root = StateRoot(world.root)
        backup = markers.read_json(root.hour_marker(hour, "backup"))
        client, db = world.mongo()
        with closing(client):
            docs = sum(db[name].count_documents({"hour": hour}) for name in datasets.CATALOG)
        process_start, stats = common.task_stats(common.read_events(events))
        first_task = min(s["first"] for s in stats.values())
        event_list = common.read_events(events)
        exit_rss = max((e.get("main_rss_mb", 0) for e in event_list if e["event"] == "exit"), default=0)
        failed = sum(s["failed"] for s in stats.values())
        if failed:
            raise SystemExit(f"{failed} task(s) failed; see {events}.log")

        # the bare stages on the same data
        scratch = os.path.join(world.base, "bare")
        os.makedirs(scratch)
        objects = backup_objects(root, hour, backup["objects"])
        archives = sorted(path for key, path in objects.items() if key.startswith("archives/"))
        unpacked = unpack_csvs(archives, os.path.join(scratch, "csv"))
        bson_files = export_documents(world, hour, scratch)
        bare = {
            "collect": bare_collect(world, hour, [p["database"] for p in prepared], os.path.join(scratch, "collect")),
            "upload": bare_upload(world, archives),
            "staging": bare_staging(world, unpacked),
            "mongodb": bare_mongodb(world, bson_files),
            "extract": bare_extract(world, hour, os.path.join(scratch, "extract.jsonl.gz")),
            "dump": bare_dump(world, os.path.join(scratch, "dump.sql.gz")),
            "backup": bare_backup(world, objects),
        }
        bare_sum = sum(bare.values())
        return {
            "rows": rows, "total_rows": rows * args.agents, "docs": docs, "objects": len(objects),
            "bytes": sum(os.path.getsize(p) for p in objects.values()),
            "agents_s": agents_s, "graph_s": graph_s, "busy_s": busy_s,
            "scheduling_s": first_task - process_start if process_start else None,
            "cpu": {"agents_cores": common.busy_cores(cpu0, cpu1), "graph_cores": common.busy_cores(cpu1, cpu2),
                    "agent_processes_s": sum(r["cpu_s"] for r in agent_results), "api_s": api_cpu1 - api_cpu0,
                    "agent_median_s": sorted(r["seconds"] for r in agent_results)[len(agent_results) // 2],
                    "luigi_s": graph_usage["cpu_s"]},
            "stats": stats, "bare": bare, "bare_sum": bare_sum, "ratio": busy_s / bare_sum,
            "rss": {"api": api_rss,
                    "agent": max(watch.own.get("agent", 0.0), 0.0),
                    "agent_wait4": max(r["maxrss_mb"] for r in agent_results),
                    "agent_children": watch.children_of("agent"),
                    "luigi_tasks": max(s["rss_mb"] for s in stats.values()),
                    "luigi_main": max(exit_rss, watch.own.get("luigi", 0.0)),
                    "luigi_wait4": luigi_maxrss},
        }
    finally:
        common.stop_process(api)
        world.cleanup()


def report(result, workers):
    r, lines = result, []
    lines.append(f"busy hour: {r['total_rows']:,} rows ({r['rows']:,} per agent) -> {r['docs']:,} documents, "
                 f"{r['objects']} objects ({r['bytes'] / 1e6:.1f} MB) backed up")
    lines.append(f"  {'phase':34} {'wall s':>8}")
    c = r["cpu"]
    lines.append(f"  {'agents: collect + upload (all at once)':34} {r['agents_s']:8.2f}   (machine {c['agents_cores']:.1f} "
                 f"cores busy; agent processes {c['agent_processes_s']:.1f} CPU-s, api {c['api_s']:.1f} CPU-s; "
                 f"median agent run {c['agent_median_s']:.2f} s)")
    lines.append(f"  {'graph: luigi, %d workers' % workers:34} {r['graph_s']:8.2f}   (machine {c['graph_cores']:.1f} "
                 f"cores busy; luigi processes {c['luigi_s']:.1f} CPU-s)")
    if r["scheduling_s"] is not None:
        lines.append(f"    {'start -> first task (scheduling)':32} {r['scheduling_s']:8.2f}")
    origin = min(s["first"] for s in r["stats"].values()) - (r["scheduling_s"] or 0)
    for family in STAGES:
        s = r["stats"].get(family)
        if s:
            lines.append(f"    {family:32} {s['last'] - s['first']:8.2f}   (at {s['first'] - origin:6.2f}-"
                         f"{s['last'] - origin:6.2f} s, {s['tasks']} task(s), {s['seconds']:.2f} task-s, "
                         f"peak RSS {s['rss_mb']:.0f} MB)")
    lines.append(f"  {'busy hour total':34} {r['busy_s']:8.2f}")
    lines.append("  bare stages (same data, one after the other): "
                 + ", ".join(f"{k} {v:.2f}" for k, v in r["bare"].items()) + f"; sum {r['bare_sum']:.2f} s")
    lines.append(f"  busy hour / sum of bare stages: {r['ratio']:.2f} (target <= 1.25)")
    rss = r["rss"]
    children = ", ".join(f"{k} {v:.0f} MB" for k, v in sorted(rss["agent_children"].items()))
    lines.append(f"  peak RSS: api {rss['api']:.0f} MB, luigi worker {rss['luigi_main']:.0f} MB (main) / "
                 f"{rss['luigi_tasks']:.0f} MB (task processes; wait4 max {rss['luigi_wait4']:.0f} MB), agent "
                 f"{rss['agent']:.0f} MB (python; wait4 max {rss['agent_wait4']:.0f} MB"
                 + (f"; children {children}" if children else "") + f") (target < {RSS_TARGET_MB} MB)")
    return "\n".join(lines)


def peak_rss(result):
    """The largest of every peak: polled VmHWM, and wait4's ru_maxrss (which also covers the agents' mariadb
    client and the worker's mariadb-dump children, and any peak shorter than the polling interval)."""
    rss = result["rss"]
    return max(rss["api"], rss["luigi_main"], rss["luigi_tasks"], rss["luigi_wait4"], rss["agent"], rss["agent_wait4"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=20, help="GEOs / agents (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=5000, help="rows per agent (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=4, help="luigi --workers (default: %(default)s)")
    parser.add_argument("--scale", type=int, default=1,
                        help="also run an hour with SCALE x the rows and report the time ratio (default: 1: off)")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--bare-server", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        return common.bare_tornado_sink(int(args.bare_server[0]), args.bare_server[1], chunk_size=512 << 10)
    common.require_services()
    from ganymede import hours

    # A recent complete hour (the agents refuse an hour not over, the API one past its retention).
    hour = hours.last_complete_hour() - timedelta(hours=2)
    base = tempfile.mkdtemp(prefix="gbbusy-luigid-", dir=os.environ.get("BENCH_TMP"))
    luigid = common.Luigid(base)
    watch = common.RssWatch()
    watch.start()
    try:
        luigid.start()
        results = [run_hour(args, luigid, hour, args.rows, watch)]
        print(report(results[0], args.workers), flush=True)
        if args.scale > 1:
            watch.own.clear()
            watch.children.clear()
            results.append(run_hour(args, luigid, hour - timedelta(hours=1), args.rows * args.scale, watch))
            print(report(results[1], args.workers), flush=True)
    finally:
        watch.stop()
        luigid.stop()
        common.shutil.rmtree(base, ignore_errors=True)

    one = results[0]
    figures = (f"{args.agents} agents x {args.rows:,} rows ({one['docs']:,} docs), {args.workers} workers: "
               f"agents {one['agents_s']:.1f} s + graph {one['graph_s']:.1f} s = busy hour {one['busy_s']:.1f} s; "
               f"bare stages " + ", ".join(f"{k} {v:.1f}" for k, v in one["bare"].items())
               + f" = {one['bare_sum']:.1f} s; ratio {one['ratio']:.2f} (target <= 1.25); peak RSS api "
               f"{one['rss']['api']:.0f} MB, luigi {max(one['rss']['luigi_main'], one['rss']['luigi_tasks']):.0f} MB, "
               f"agent {one['rss']['agent']:.0f} MB (largest of any process, wait4 included: {peak_rss(one):.0f} MB)")
    last = f"busy hour ratio {one['ratio']:.2f} (target <= 1.25); peak RSS {peak_rss(one):.0f} MB (target < 300)"
    if len(results) > 1:
        ten = results[1]
        scaling = ten["busy_s"] / one["busy_s"]
        # the same servers' own scaling: the bare stages on the same data at both sizes
        bare_scaling = ten["bare_sum"] / one["bare_sum"]
        stage_scaling = ", ".join(f"{k} {ten['bare'][k] / v:.1f}" for k, v in one["bare"].items() if v > 0.05)
        figures += (f" · {args.scale}x ({args.rows * args.scale:,} rows/agent, {ten['docs']:,} docs): busy hour "
                    f"{ten['busy_s']:.1f} s (agents {ten['agents_s']:.1f} + graph {ten['graph_s']:.1f}), bare sum "
                    f"{ten['bare_sum']:.1f} s, ratio {ten['ratio']:.2f}; time {args.scale}x/1x {scaling:.2f} "
                    f"(target <= {args.scale * 1.05:.1f}; the bare stages' own: {bare_scaling:.2f}, by stage "
                    f"{stage_scaling}); peak RSS {peak_rss(ten):.0f} MB")
        last += (f"; {args.scale}x/1x time {scaling:.2f} (target <= {args.scale * 1.05:.1f}; bare stages "
                 f"{bare_scaling:.2f}), peak RSS at {args.scale}x {peak_rss(ten):.0f} MB")
    if not args.no_record:
        common.record(common.command_line(__file__), figures)
    print(last)


if __name__ == "__main__":
    sys.exit(main())
