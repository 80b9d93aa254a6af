"""Stage 4, the top of the graph: the hour backed up to its bucket, then archives moved to archives/.

HourlyBackup is what cron runs. It is complete when its marker exists and no
archive of the hour is still waiting in upload/; a late arrival therefore
reopens the hour, and the same command delivers a supplementary extract and
backs it up. Uploads skip objects already verified, so a rerun after a crash
uploads only what is missing, and archives move only after every object of
the round is verified in the bucket.
"""
import glob
import gzip
import os
import shutil
import subprocess
from contextlib import closing

import luigi

from .. import config, hours, markers
from ..errors import CommandError, GanymedeError
from ..stores import mysql, txlog
from ..stores import s3
from ..stores.s3 import bucket_name, sha256_file
from .agent import state_root
from .extract import GlassbeamExtract, covered_transactions, earlier_rounds, extract_rounds


# --- plain functions -----------------------------------------------------------

def dump_command(cfg):
    binary = shutil.which("mariadb-dump") or shutil.which("mysqldump")
    if not binary:
        raise GanymedeError("neither mariadb-dump nor mysqldump is installed (Debian: apt-get install mariadb-client)")
    argv = [binary] + ([f"--defaults-extra-file={cfg.option_file}"] if cfg.option_file else [])
    return argv + ["-h", cfg.host, "-P", str(cfg.port), "-u", cfg.user, "--single-transaction", "--skip-dump-date",
                   "--routines", "--databases", cfg.database]


def dump_schema(cfg, path):
    """mariadb-dump streamed through gzip into `path`, atomically; a failed dump leaves nothing behind."""
    argv = dump_command(cfg)
    with markers.AtomicFile(path) as raw:
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                shutil.copyfileobj(proc.stdout, gz, 1 << 20)
            stderr = proc.stderr.read().decode("utf-8", "replace")
        if proc.returncode != 0:
            raise CommandError(argv[:1] + argv[2:] if cfg.option_file else argv, proc.returncode, stderr)


def pending_archives(root, hour):
    """Transaction ids of archives still in upload/ for the hour (cheap: one directory walk)."""
    return {os.path.basename(p)[: -len(".tar.gz")]
            for p in glob.glob(os.path.join(root.hour_uploads(hour), "*", "*.tar.gz"))}


def current_round(root, hour):
    """The extract round this run must finish: a new one when upload/ holds archives no round covers."""
    rounds = extract_rounds(hour)
    if rounds == 0:
        return 0
    uncovered = pending_archives(root, hour) - covered_transactions(earlier_rounds(hour, rounds))
    return rounds if uncovered else rounds - 1


def archive_locations(root, hour, transactions):
    """(agent, tx, current path, done path) of each archive of the hour; a missing archive is an error."""
    located = []
    for t in transactions:
        upload = root.upload(hour, t["agent_id"], t["transaction_id"])
        done = root.archived(hour, t["agent_id"], t["transaction_id"])
        path = upload if os.path.exists(upload) else done
        if not os.path.exists(path):
            raise GanymedeError(f"archive of transaction {t['transaction_id']} is in neither {upload} nor {done}")
        located.append((t["agent_id"], t["transaction_id"], path, done))
    return located


def backup_plan(root, hour, rounds, archives):
    """Every object of the hour's bucket as {key: local path}."""
    plan = {}
    for r in range(rounds + 1):
        dump = root.backup_dump(hour, r)
        plan[f"mysql/{os.path.basename(dump)}"] = dump
        for path in (root.extract(hour, r), root.extract_manifest(hour, r)):
            plan[f"extracts/{os.path.basename(path)}"] = path
    for agent_id, transaction_id, path, _ in archives:
        plan[f"archives/{agent_id}/{transaction_id}.tar.gz"] = path
    return dict(sorted(plan.items()))


def upload_plan(store, bucket, plan, manifest_path):
    """Upload and verify every object, then MANIFEST.json (key, size, sha256 of each); returns the listing."""
    listing = []
    for key, path in plan.items():
        sha256 = sha256_file(path)
        action = store.put_verified(bucket, key, path, sha256=sha256)
        listing.append({"key": key, "size": os.path.getsize(path), "sha256": sha256, "action": action})
    markers.write_json(manifest_path, {"bucket": bucket,
                                       "objects": [{k: o[k] for k in ("key", "size", "sha256")} for o in listing]})
    listing.append({"key": "MANIFEST.json", "size": os.path.getsize(manifest_path),
                    "sha256": sha256_file(manifest_path),
                    "action": store.put_verified(bucket, "MANIFEST.json", manifest_path)})
    return listing


def move_archives(archives):
    """upload/ -> archives/, same layout; already moved ones are left alone."""
    moved = []
    for agent_id, transaction_id, path, done in archives:
        if path != done:
            markers.move_atomic(path, done)
            moved.append(transaction_id)
    return moved


# --- tasks ---------------------------------------------------------------------

class DumpSchema(luigi.Task):
    """mariadb-dump of the `ganymede` schema, taken once the round's extract is written."""
    hour = luigi.DateHourParameter(description="The UTC hour")
    round = luigi.IntParameter(default=0, description="Extract round the dump follows")

    def output(self):
        return luigi.LocalTarget(state_root().backup_dump(self.hour, self.round))

    def requires(self):
        return GlassbeamExtract(hour=self.hour, round=self.round)

    def run(self):
        dump_schema(config.mysql(), self.output().path)


class HourlyBackup(luigi.Task):
    """The hour in its bucket (dump, archives, extracts, MANIFEST.json), verified; archives then in archives/."""
    hour = luigi.DateHourParameter(description="The UTC hour")

    def output(self):
        return luigi.LocalTarget(state_root().hour_marker(self.hour, "backup"))

    def complete(self):
        return self.output().exists() and not pending_archives(state_root(), self.hour)

    def requires(self):
        return DumpSchema(hour=self.hour, round=current_round(state_root(), self.hour))

    def run(self):
        root, cfg, rounds = state_root(), config.s3(), self.requires().round
        store = s3.connect(cfg)
        bucket = bucket_name(cfg.bucket_template, self.hour)
        with closing(mysql.connect(config.mysql())) as conn:
            archives = archive_locations(root, self.hour,
                                         txlog.hour_transactions(conn, self.hour, ("completed", "superseded")))
            store.ensure_bucket(bucket)
            listing = upload_plan(store, bucket, backup_plan(root, self.hour, rounds, archives),
                                  os.path.join(os.path.dirname(self.output().path), "MANIFEST.json"))
            moved = move_archives(archives)
            for transaction_id in moved:
                txlog.append_event(conn, transaction_id, "backed_up", {"bucket": bucket})
        markers.write_json(self.output().path, {"hour": hours.format_hour(self.hour), "bucket": bucket,
                                                "rounds": rounds + 1, "objects": listing, "moved": moved})
