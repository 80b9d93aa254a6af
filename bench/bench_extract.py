#!/usr/bin/env python3
"""GlassbeamExtract rows/s against a bare find() + json.dumps + gzip of the same documents; and peak RSS.

Both sides read the same hour's documents from the same MongoDB test server
in the same run. The bare side is the least an extract can cost: one
`find({"hour": H})` per collection, `json.dumps(doc, default=str)` and a
gzip file (at the extract's compression level, 6). GlassbeamExtract does what production does on top: the graph's
checks (MySQL read, loads complete), documents sorted by `_id` and
canonical JSON so the file is byte-identical for the same data, the sha256,
the outbox copy and the manifest. Each measurement runs in its own process
(`luigi.build`, local scheduler, timed from the inside, so interpreter
start-up is not counted) whose peak RSS (VmHWM) is reported; rounds alternate
and the best of each counts, since these machines are shared. Two sizes show
that memory does not grow with the hour.

    .venv/bin/python bench/bench_extract.py                      # ~1-2 min on 2 cores with nx-27017
    .venv/bin/python bench/bench_extract.py --docs 6000 --small-docs 1500 --rounds 2   # quick look

Needs the local MariaDB and MongoDB test server (make services). Uses its own
MySQL and MongoDB databases and state root, removed at the end. Prints the
key figure last and appends a line to BENCHMARKS.md.
"""
import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from common import command_line, record, vmhwm_mb  # noqa: E402

HOURS = {"small": datetime(2026, 11, 30, 5), "large": datetime(2026, 11, 30, 6)}
AGENTS = 4
METHODS = ("GET", "PUT", "POST", "DELETE", "HEAD")


# --- an hour of D documents from AGENTS agents, loaded through the pipeline ----------

def agent_rows(hour, agent, docs):
    """Rows for one agent: a third of `docs` per dataset, values that pass the catalog's rules."""
    n = max(1, docs // 3)
    return {
        "account_usage": [(f"acct-{agent}-{i:06d}", 10_000 * (i + 1), 10 * (i + 1), 100 * i, 50 * i, i % 997)
                          for i in range(n)],
        "api_requests": [(METHODS[i % 5], f"/v1/objects/{i // 5}", (200, 404, 503)[i % 3], 100 + i, 4096 * i,
                          1.5 + i % 7, 9.25 + i % 11) for i in range(n)],
        "node_health": [(f"node-{agent}-{i // 60:04d}", f"{hour + timedelta(minutes=i % 60):%Y-%m-%dT%H:%M:%S}",
                         10 ** 12, 10 ** 11 * (i % 10), round(0.5 + (i % 40) / 10, 2), i % 3) for i in range(n)],
    }


def completed_transaction(conn, root, hour, agent, docs):
    """Create, 'upload' and complete a transaction as the API would; returns its row."""
    from ganymede import datasets, hours
    from ganymede.paths import StateRoot
    from ganymede.stores import txlog
    from ganymede_agent.archive import build_archive, sha256_file
    if not any(a["agent_id"] == agent for a in txlog.list_agents(conn)):
        with conn.cursor() as cur:
            cur.execute("INSERT INTO agents (agent_id, geo, token_hash, active, created_at) "
                        "VALUES (%s, 'bench-geo', %s, 1, %s)", (agent, "0" * 64, hour - timedelta(days=365)))
        conn.commit()
    tx, _ = txlog.create_transaction(conn, agent, hour)
    path = StateRoot(root).upload(hour, agent, tx["transaction_id"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = agent_rows(hour, agent, docs)
    manifest = build_archive(path, {"agent_id": agent, "geo": "bench-geo", "hour": hours.format_hour(hour),
                                    "agent_version": "bench"},
                             [(name, datasets.CATALOG[name].column_names, rows[name]) for name in sorted(rows)])
    txlog.mark_uploaded(conn, tx["transaction_id"], os.path.getsize(path), sha256_file(path))
    txlog.mark_completed(conn, tx["transaction_id"], path, {k: v["rows"] for k, v in manifest["datasets"].items()})
    return txlog.get_transaction(conn, tx["transaction_id"])


# --- the child: one measurement, timed from the inside -----------------------------------

def child(mode, hour, out_path):
    import luigi
    import pymongo
    from ganymede import config, datasets
    from ganymede.tasks import GlassbeamExtract
    started = time.perf_counter()
    if mode == "extract":
        ok = luigi.build([GlassbeamExtract(hour=hour)], local_scheduler=True, log_level="WARNING")
        seconds = time.perf_counter() - started
        docs = sum(json.load(open(GlassbeamExtract(hour=hour).output().path))["counts"].values()) if ok else 0
    else:
        cfg = config.mongodb()
        client = pymongo.MongoClient(cfg.uri)
        db, docs = client[cfg.database], 0
        with gzip.open(out_path, "wb", compresslevel=6) as gz:  # the extract's level: same compression work
            for name in sorted(datasets.CATALOG):
                for doc in db[name].find({"hour": hour}):
                    gz.write(json.dumps(doc, default=str).encode() + b"\n")
                    docs += 1
        client.close()
        seconds, ok = time.perf_counter() - started, True
    print(json.dumps({"ok": ok, "seconds": seconds, "docs": docs, "vmhwm_mb": vmhwm_mb()}))


def run_child(mode, hour, out_path):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, hour.strftime("%Y-%m-%dT%H"),
                          out_path], capture_output=True, text=True, env=os.environ)
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit(f"{mode} child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["ok"]:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return result


# --- the figures --------------------------------------------------------------------------

def setup(args, work):
    """Own luigi.cfg, MySQL and MongoDB databases; both hours loaded through LoadTransaction."""
    tag = uuid.uuid4().hex[:8]
    database, root = f"gbench_{tag}", os.path.join(work, "state")
    config_path = os.path.join(work, "luigi.cfg")
    with open(config_path, "w") as f:
        f.write(f"[state]\nroot = {root}\n\n[mysql]\nhost = {args.mysql_host}\nport = {args.mysql_port}\n"
                f"user = root\ndatabase = {database}\n\n[mongodb]\nuri = {args.mongo_uri}\ndatabase = {database}\n\n"
                f"[extract]\ndeadline_minutes = {10 ** 7}\n\n[core]\nno_configure_logging = true\n")
    os.environ["LUIGI_CONFIG_PATH"] = config_path  # before luigi is imported: it reads the variable then
    import luigi
    from ganymede import cli, config
    from ganymede.stores import mysql
    from ganymede.tasks import LoadTransaction
    if cli.main(["db", "upgrade"]):  # the schema and the MongoDB indexes, as a deploy makes them
        raise SystemExit("ganymede db upgrade failed")
    started = time.perf_counter()
    loads = []
    with mysql.connect(config.mysql()) as conn:
        for size, hour in HOURS.items():
            per_agent = (args.small_docs if size == "small" else args.docs) // AGENTS
            for a in range(AGENTS):
                t = completed_transaction(conn, root, hour, f"bench-{a}", per_agent)
                loads.append(LoadTransaction(transaction_id=t["transaction_id"], hour=hour, agent_id=t["agent_id"]))
    if not luigi.build(loads, local_scheduler=True, log_level="WARNING"):
        raise SystemExit("loading the benchmark hours failed")
    print(f"loaded {args.small_docs} + {args.docs} documents in {time.perf_counter() - started:.1f} s", flush=True)
    return database, root


def measure(args, root, work, hour, size):
    from ganymede.paths import StateRoot
    paths = StateRoot(root)
    best = {"bare": None, "extract": None}
    for r in range(args.rounds):
        for mode in ("bare", "extract"):
            for path in (paths.extract_manifest(hour), paths.extract(hour)):
                if os.path.exists(path):
                    os.unlink(path)
            result = run_child(mode, hour, os.path.join(work, f"bare-{size}.jsonl.gz"))
            if best[mode] is None or result["seconds"] < best[mode]["seconds"]:
                best[mode] = result
            print(f"{size:5} round {r + 1} {mode:7} {result['docs'] / result['seconds']:9.0f} docs/s "
                  f"({result['docs']} docs, {result['seconds']:.2f} s, peak RSS {result['vmhwm_mb']:.0f} MB)",
                  flush=True)
    assert best["bare"]["docs"] == best["extract"]["docs"], best
    return best


def drop(args, database):
    import pymongo
    import pymysql
    with pymysql.connect(host=args.mysql_host, port=args.mysql_port, user="root", autocommit=True) as conn:
        conn.cursor().execute(f"DROP DATABASE IF EXISTS `{database}`")
    pymongo.MongoClient(args.mongo_uri, serverSelectionTimeoutMS=5000).drop_database(database)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=24_000, help="documents in the large hour")
    parser.add_argument("--small-docs", type=int, default=6_000, help="documents in the small hour (RSS comparison)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per size; the best one counts")
    parser.add_argument("--mysql-host", default="127.0.0.1")
    parser.add_argument("--mysql-port", type=int, default=3306)
    parser.add_argument("--mongo-uri", default=os.environ.get("GANYMEDE_TEST_MONGO_URI", "mongodb://127.0.0.1:27017/"))
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "HOUR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], datetime.strptime(args.child[1], "%Y-%m-%dT%H"), args.child[2])

    work = tempfile.mkdtemp(prefix="bench-extract-", dir=os.environ.get("BENCH_TMP"))
    database = None
    try:
        database, root = setup(args, work)
        small = measure(args, root, work, HOURS["small"], "small")
        large = measure(args, root, work, HOURS["large"], "large")
    finally:
        if database:
            try:
                drop(args, database)
            except Exception as exc:  # the figures are printed; a leftover database is only worth a note
                print(f"note: could not drop {database}: {exc}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)

    rate = {size: {mode: r["docs"] / r["seconds"] for mode, r in best.items()}
            for size, best in (("small", small), ("large", large))}
    ratio = rate["large"]["extract"] / rate["large"]["bare"]
    small_ratio = rate["small"]["extract"] / rate["small"]["bare"]
    rss = {size: best["extract"]["vmhwm_mb"] for size, best in (("small", small), ("large", large))}
    bare_rss = {size: best["bare"]["vmhwm_mb"] for size, best in (("small", small), ("large", large))}
    figures = (f"{args.docs} docs: bare find+json+gzip {rate['large']['bare']:.0f} docs/s, GlassbeamExtract "
               f"{rate['large']['extract']:.0f} docs/s, ratio {ratio:.2f} "
               f"(at {args.small_docs} docs: {small_ratio:.2f}) "
               f"· peak RSS GlassbeamExtract {rss['small']:.0f} MB at {args.small_docs} docs, {rss['large']:.0f} MB at "
               f"{args.docs} docs (bare {bare_rss['small']:.0f} / {bare_rss['large']:.0f} MB)")
    if not args.no_record:
        record(command_line(__file__), f"best of {args.rounds} · {figures}")
    print(figures)
    print(f"extract ratio {ratio:.2f} (target >= 0.8); peak RSS {rss['small']:.0f} MB -> {rss['large']:.0f} MB "
          f"for {args.docs // args.small_docs}x the documents")


if __name__ == "__main__":
    sys.exit(main())
