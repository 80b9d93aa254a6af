#!/usr/bin/env python3
"""Worker throughput against bare baselines, same machine, same run; and peak RSS.

- staging: StageTransaction (archive -> MySQL staging) rows/s against a bare
  `LOAD DATA LOCAL INFILE` of the same CSVs, already unpacked, into the same
  staging tables (target ratio >= 0.8);
- MongoDB: LoadTransaction (staging -> transform -> MongoDB) docs/s against a
  bare pymongo `bulk_write` of the same documents with the same operations
  (ReplaceOne upserts by `_id`, same batches, same indexes, the previous hour
  loaded in both, unless --no-previous-hour) (target ratio >= 0.8); the
  load reads the previous hour's values from MongoDB (one `_id $in` per
  write batch), which the bare write does not: on the test server those
  finds cost 30-45 µs per document (a real mongod serves them from the
  `_id` index), so run it once more with --no-previous-hour to see what
  they cost there;
- memory: peak RSS (VmHWM) of StageTransaction and LoadTransaction, each in
  its own process, for a transaction of --rss-rows rows and of --mongo-rows
  rows (target < 300 MB and the same for both sizes).

The Luigi tasks run in a child process (`luigi.build`, local scheduler) that
times the build itself, so interpreter start-up is not counted; rounds
alternate baseline / Ganymede and the best of each counts, since these
machines are shared.

    .venv/bin/python bench/bench_worker.py                      # ~3-5 min on 2 cores with nx-27017
    .venv/bin/python bench/bench_worker.py --rows 50000 --mongo-rows 5000 --rss-rows 100000   # quick look

Needs the local MariaDB and MongoDB test server (make services). Uses its own
MySQL and MongoDB databases and state root, removed at the end. Prints the
key figures last and appends a line to BENCHMARKS.md.
"""
import argparse
import json
import os
import random
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

HOUR = datetime(2026, 11, 30, 5)
AGENT = "bench-agent"
METHODS = ("GET", "PUT", "POST", "DELETE", "HEAD")
STATUSES = (200, 201, 204, 206, 304, 400, 403, 404, 409, 429, 500, 502, 503)


# --- a transaction of N rows, as the API would have accepted it -----------------------

def split(rows):
    """60% account rows, 20% API rows, 20% node samples (as ganymede.generator does)."""
    accounts, api = rows * 6 // 10, rows // 5
    return accounts, api, rows - accounts - api


def generated_rows(hour, rows, seed=0):
    """{dataset: row iterator}: realistic values that pass the catalog's rules, streamed, deterministic."""
    n_accounts, n_api, n_nodes = split(rows)
    rng = random.Random(f"{seed}:{hour:%Y%m%d%H}")

    def accounts():
        for i in range(n_accounts):
            objects = int(rng.lognormvariate(7, 2))
            yield (f"acct-{i:07d}", objects * int(rng.lognormvariate(12, 1.5)), objects,
                   int(rng.lognormvariate(16, 3)), int(rng.lognormvariate(17, 3)), rng.randint(0, 50000))

    def api():
        produced, i = 0, 0
        while True:
            endpoint = f"/v1/objects/{i}"
            for method in METHODS:
                for status in STATUSES:
                    if produced == n_api:
                        return
                    count = int(rng.lognormvariate(8 if status < 400 else 4, 1.5)) + 1
                    p50 = round(rng.lognormvariate(3, 0.6), 3)
                    yield (method, endpoint, status, count, count * int(rng.lognormvariate(10, 2)), p50,
                           round(p50 * (1 + rng.lognormvariate(0.5, 0.5)), 3))
                    produced += 1
            i += 1

    def nodes():
        count = max(1, -(-n_nodes // 60))
        for n in range(n_nodes):
            minute, node = divmod(n, count)
            total = (48 + node % 4 * 48) << 40
            yield (f"node-{node:05d}", f"{hour + timedelta(minutes=minute, seconds=node % 60):%Y-%m-%d %H:%M:%S}",
                   total, total * (20 + node % 70) // 100, round(rng.uniform(0.05, 24.0), 2), rng.choice((0, 0, 0, 1)))

    return {"account_usage": accounts(), "api_requests": api(), "node_health": nodes()}


def completed_transaction(conn, root, hour, rows, seed=0, agent_id=AGENT):
    """Create, 'upload' and complete a transaction of `rows` rows as the API would; returns its id."""
    from ganymede import datasets, hours
    from ganymede.paths import StateRoot
    from ganymede.stores import txlog
    from ganymede_agent.archive import build_archive, sha256_file
    if not any(a["agent_id"] == agent_id for a in txlog.list_agents(conn)):
        with conn.cursor() as cur:  # registered long before the hour, as in production
            cur.execute("INSERT INTO agents (agent_id, geo, token_hash, active, created_at) "
                        "VALUES (%s, 'bench-geo', %s, 1, %s)", (agent_id, "0" * 64, hour - timedelta(days=365)))
        conn.commit()
    tx, _ = txlog.create_transaction(conn, agent_id, hour)
    path = StateRoot(root).upload(hour, agent_id, tx["transaction_id"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = generated_rows(hour, rows, seed)
    manifest = build_archive(path, {"agent_id": agent_id, "geo": "bench-geo", "hour": hours.format_hour(hour),
                                    "agent_version": "bench"},
                             [(name, datasets.CATALOG[name].column_names, data[name]) for name in sorted(data)],
                             workdir=os.path.join(root, "tmp"))
    txlog.mark_uploaded(conn, tx["transaction_id"], os.path.getsize(path), sha256_file(path))
    txlog.mark_completed(conn, tx["transaction_id"], path, {k: v["rows"] for k, v in manifest["datasets"].items()})
    return tx["transaction_id"]


# --- the child: one Luigi task, timed from the inside -----------------------------------

def child(task_name, transaction_id, hour):
    import luigi
    from ganymede import tasks
    task = getattr(tasks, task_name)(transaction_id=transaction_id, hour=hour, agent_id=AGENT)
    started = time.perf_counter()
    ok = luigi.build([task], local_scheduler=True, log_level="WARNING")
    elapsed = time.perf_counter() - started
    print(json.dumps({"ok": ok, "seconds": elapsed, "vmhwm_mb": vmhwm_mb()}))


def run_child(task_name, transaction_id, hour):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", task_name, transaction_id,
                          hour.strftime("%Y-%m-%dT%H")], capture_output=True, text=True, env=os.environ)
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit(f"{task_name} child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["ok"]:
        raise SystemExit(f"{task_name} failed:\n{out.stderr[-3000:]}")
    return result


# --- the figures --------------------------------------------------------------------

class Bench:
    def __init__(self, args, work):
        from types import SimpleNamespace
        self.args, self.client = args, None
        self.tag = uuid.uuid4().hex[:8]
        self.database = f"gbench_{self.tag}"
        self.root = os.path.join(work, "state")
        self.config_path = os.path.join(work, "luigi.cfg")
        with open(self.config_path, "w") as f:
            f.write(f"[state]\nroot = {self.root}\n\n[mysql]\nhost = {args.mysql_host}\nport = {args.mysql_port}\n"
                    f"user = root\ndatabase = {self.database}\n\n[mongodb]\nuri = {args.mongo_uri}\n"
                    f"database = {self.database}\nbatch_size = {args.batch_size}\n\n"
                    "[core]\nno_configure_logging = true\n")
        os.environ["LUIGI_CONFIG_PATH"] = self.config_path
        self.mysql_cfg = SimpleNamespace(host=args.mysql_host, port=args.mysql_port, user="root",
                                         database=self.database, option_file="", connect_timeout=5)

    def mysql(self):
        from ganymede.stores import mysql
        return mysql.connect(self.mysql_cfg)

    def mongo(self):
        import pymongo
        if self.client is None:
            self.client = pymongo.MongoClient(self.args.mongo_uri, serverSelectionTimeoutMS=5000)
        return self.client[self.database]

    def marker(self, transaction_id, hour, stage):
        from ganymede.paths import StateRoot
        return StateRoot(self.root).transaction_marker(hour, AGENT, transaction_id, stage)

    def truncate_staging(self):
        from ganymede import datasets
        with self.mysql() as conn, conn.cursor() as cur:
            for dataset in datasets.CATALOG.values():
                cur.execute(f"TRUNCATE TABLE `{dataset.staging_table}`")

    # staging ---------------------------------------------------------------------

    def unpacked_csvs(self, transaction_id, hour, directory):
        """The archive's CSVs on disk, as the bare LOAD DATA gets them."""
        from ganymede.paths import StateRoot
        from ganymede.archives import read_archive
        os.makedirs(directory, exist_ok=True)
        paths = {}
        with open(StateRoot(self.root).upload(hour, AGENT, transaction_id), "rb") as raw:
            for name, entry, member in read_archive(raw):
                if member is not None:
                    paths[name] = os.path.join(directory, entry["file"])
                    with open(paths[name], "wb") as out:
                        shutil.copyfileobj(member, out, 1 << 20)
        return paths

    def bare_load_data(self, paths, transaction_id):
        from ganymede import datasets
        with self.mysql() as conn:
            started = time.perf_counter()
            rows = 0
            for name, path in paths.items():
                dataset = datasets.CATALOG[name]
                columns = ", ".join(f"`{c}`" for c in dataset.column_names)
                with conn.cursor() as cur:
                    rows += cur.execute(
                        f"LOAD DATA LOCAL INFILE %s INTO TABLE `{dataset.staging_table}` CHARACTER SET utf8mb4 "
                        "FIELDS TERMINATED BY ',' OPTIONALLY ENCLOSED BY '\"' ESCAPED BY '' "
                        "LINES TERMINATED BY '\\n' IGNORE 1 LINES "
                        f"({columns}) SET transaction_id = %s, record = 0", (path, transaction_id))
                conn.commit()
            return rows, time.perf_counter() - started

    def staging_figures(self, transaction_id, hour, rows, work):
        paths = self.unpacked_csvs(transaction_id, hour, os.path.join(work, "csv"))
        best = {"bare": float("inf"), "stage": float("inf")}
        for r in range(self.args.rounds):
            self.truncate_staging()
            staged, seconds = self.bare_load_data(paths, transaction_id)
            assert staged == rows, (staged, rows)
            best["bare"] = min(best["bare"], seconds)
            print(f"round {r + 1} staging   bare LOAD DATA   {rows / seconds:10.0f} rows/s ({seconds:.2f} s)",
                  flush=True)
            self.truncate_staging()
            marker = self.marker(transaction_id, hour, "staged")
            if os.path.exists(marker):
                os.unlink(marker)
            result = run_child("StageTransaction", transaction_id, hour)
            best["stage"] = min(best["stage"], result["seconds"])
            print(f"round {r + 1} staging   StageTransaction {rows / result['seconds']:10.0f} rows/s "
                  f"({result['seconds']:.2f} s, peak RSS {result['vmhwm_mb']:.0f} MB)", flush=True)
        shutil.rmtree(os.path.join(work, "csv"))
        return rows / best["bare"], rows / best["stage"]

    # MongoDB ---------------------------------------------------------------------

    def reset_mongo(self, previous_docs):
        """Collections as they were before the load: the previous hour only, indexes in place."""
        from ganymede import datasets
        from ganymede.stores import mongo
        db = self.mongo()
        for name in datasets.CATALOG:
            db.drop_collection(name)
        mongo.create_indexes(db, datasets.CATALOG)  # as `ganymede db upgrade` makes them
        for name, docs in previous_docs.items():
            if docs:
                db[name].insert_many(docs, ordered=False)

    def restage(self, transaction_id, hour):
        from ganymede.paths import StateRoot
        from ganymede.tasks.worker import stage_archive
        with self.mysql() as conn:
            stage_archive(conn, StateRoot(self.root).upload(hour, AGENT, transaction_id), transaction_id, hour,
                          os.path.join(self.root, "tmp", f"stage-{transaction_id}.csv"))

    def documents(self, hour):
        from ganymede import datasets
        db = self.mongo()
        return {name: list(db[name].find({"hour": hour})) for name in datasets.CATALOG}

    def bare_bulk_write(self, docs_by_dataset):
        """The baseline: ReplaceOne upserts by `_id`, same batches."""
        import pymongo
        db = self.mongo()
        size = self.args.batch_size
        started = time.perf_counter()
        for name, docs in docs_by_dataset.items():
            collection = db[name]
            for i in range(0, len(docs), size):
                batch = docs[i:i + size]
                collection.bulk_write([pymongo.ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in batch],
                                      ordered=False)
        return time.perf_counter() - started

    def mongo_figures(self, previous_tx, transaction_id, hour, rows):
        previous_hour = hour - timedelta(hours=1)
        run_child("StageTransaction", previous_tx, previous_hour)
        run_child("LoadTransaction", previous_tx, previous_hour)
        previous_docs = self.documents(previous_hour) if self.args.previous_hour else {}
        run_child("StageTransaction", transaction_id, hour)
        best = {"bare": float("inf"), "load": float("inf")}
        docs, rss = None, None
        for r in range(self.args.rounds + 1):
            if docs is not None:  # the documents the first Ganymede round wrote
                self.reset_mongo(previous_docs)
                seconds = self.bare_bulk_write(docs)
                best["bare"] = min(best["bare"], seconds)
                print(f"round {r} MongoDB   bare bulk_write  {rows / seconds:10.0f} docs/s ({seconds:.2f} s)", flush=True)
            if r == self.args.rounds:
                break
            self.reset_mongo(previous_docs)
            marker = self.marker(transaction_id, hour, "loaded")
            if os.path.exists(marker):
                os.unlink(marker)
                self.restage(transaction_id, hour)
            result = run_child("LoadTransaction", transaction_id, hour)
            best["load"] = min(best["load"], result["seconds"])
            rss = result["vmhwm_mb"]
            print(f"round {r + 1} MongoDB   LoadTransaction  {rows / result['seconds']:10.0f} docs/s "
                  f"({result['seconds']:.2f} s, peak RSS {rss:.0f} MB)", flush=True)
            if docs is None:
                docs = self.documents(hour)
                loaded = sum(map(len, docs.values()))
                assert loaded == rows, (loaded, rows)
                growth = sum(d["bytes_stored_growth"] is not None for d in docs["account_usage"])
                print(f"          ({loaded} documents, {growth} with bytes_stored_growth)", flush=True)
        return rows / best["bare"], rows / best["load"], rss

    # memory ------------------------------------------------------------------------

    def rss_figures(self, transaction_id, hour):
        stage = run_child("StageTransaction", transaction_id, hour)
        load = run_child("LoadTransaction", transaction_id, hour)
        return stage["vmhwm_mb"], load["vmhwm_mb"], load["seconds"]

    def drop(self):
        from ganymede.stores import mysql
        with mysql.connect(self.mysql_cfg, database="", autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{self.database}`")
        self.mongo().client.drop_database(self.database)
        self.client.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the staging transaction")
    parser.add_argument("--mongo-rows", type=int, default=20_000, help="rows of the MongoDB load transaction")
    parser.add_argument("--rss-rows", type=int, default=1_000_000, help="rows of the peak-RSS transaction (0: skip)")
    parser.add_argument("--no-previous-hour", dest="previous_hour", action="store_false",
                        help="load into collections without the previous hour (growth lookups find nothing)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per figure; the best one counts")
    parser.add_argument("--batch-size", type=int, default=2000, help="[mongodb] batch_size for both sides")
    parser.add_argument("--mysql-host", default="127.0.0.1")
    parser.add_argument("--mysql-port", type=int, default=3306)
    parser.add_argument("--mongo-uri", default=os.environ.get("GANYMEDE_TEST_MONGO_URI", "mongodb://127.0.0.1:27017/"))
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--child", nargs=3, metavar=("TASK", "TXID", "HOUR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], datetime.strptime(args.child[2], "%Y-%m-%dT%H"))

    from ganymede.stores import mysql
    work = tempfile.mkdtemp(prefix="bench-worker-", dir=os.environ.get("BENCH_TMP"))
    bench = Bench(args, work)
    try:
        mysql.upgrade(bench.mysql_cfg)
        with bench.mysql() as conn:
            started = time.perf_counter()
            stage_tx = completed_transaction(conn, bench.root, HOUR, args.rows)
            # the load transaction's previous hour: growth is computed against it
            previous_tx = completed_transaction(conn, bench.root, HOUR + timedelta(hours=1), args.mongo_rows, seed=1)
            load_tx = completed_transaction(conn, bench.root, HOUR + timedelta(hours=2), args.mongo_rows, seed=2)
            print(f"archives built in {time.perf_counter() - started:.1f} s", flush=True)

        bare_rows, stage_rows = bench.staging_figures(stage_tx, HOUR, args.rows, work)
        bench.truncate_staging()
        bare_docs, load_docs, load_rss = bench.mongo_figures(
            previous_tx, load_tx, HOUR + timedelta(hours=2), args.mongo_rows)
        big = None
        if args.rss_rows:
            with bench.mysql() as conn:
                rss_tx = completed_transaction(conn, bench.root, HOUR + timedelta(hours=5), args.rss_rows, seed=3)
            big = bench.rss_figures(rss_tx, HOUR + timedelta(hours=5))

        stage_ratio, load_ratio = stage_rows / bare_rows, load_docs / bare_docs
        print(f"staging {args.rows} rows, best of {args.rounds}: bare LOAD DATA {bare_rows:.0f} rows/s, "
              f"StageTransaction {stage_rows:.0f} rows/s")
        context = "previous hour loaded" if args.previous_hour else "no previous hour"
        print(f"MongoDB {args.mongo_rows} docs ({context}), best of {args.rounds}: "
              f"bare bulk_write {bare_docs:.0f} docs/s, "
              f"LoadTransaction {load_docs:.0f} docs/s (peak RSS {load_rss:.0f} MB)")
        rss_text = ""
        if big:
            print(f"{args.rss_rows} rows: StageTransaction peak RSS {big[0]:.0f} MB, "
                  f"LoadTransaction peak RSS {big[1]:.0f} MB ({args.rss_rows / big[2]:.0f} docs/s)")
            rss_text = f"peak RSS {args.rss_rows} rows {max(big[:2]):.0f} MB (target < 300)"
        print(f"ratios: staging {stage_ratio:.2f}, MongoDB load {load_ratio:.2f} (targets >= 0.8); {rss_text}")
        if not args.no_record:
            record(command_line(__file__),
                   f"best of {args.rounds} · staging {args.rows} rows: bare LOAD DATA {bare_rows:.0f} rows/s, "
                   f"StageTransaction {stage_rows:.0f} rows/s, ratio {stage_ratio:.2f} · MongoDB {args.mongo_rows} "
                   f"docs ({context}): bare bulk_write {bare_docs:.0f} docs/s, "
                   f"LoadTransaction {load_docs:.0f} docs/s, ratio {load_ratio:.2f}"
                   + (f" · {args.rss_rows} rows: peak RSS stage {big[0]:.0f} MB, load {big[1]:.0f} MB "
                      f"(at {args.mongo_rows} rows: load {load_rss:.0f} MB)" if big else ""))
    finally:
        try:
            bench.drop()
        except Exception as exc:  # the figures are printed; a leftover database is only worth a note
            print(f"note: could not drop {bench.database}: {exc}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
