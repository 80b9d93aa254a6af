"""Stage 4, the top of the graph (what cron runs): the hour backed up to its bucket, then archives moved to
archives/ once every object is verified. A late arrival in upload/ reopens the hour (docs/operations.md)."""
import gzip
import os
import shutil
import subprocess
from contextlib import closing
from functools import cached_property

import luigi

from .. import config, files, hours, markers
from ..errors import CommandError, GanymedeError
from ..stores import mysql, s3, txlog
from .agent import state_root, unless_complete
from .extract import (GlassbeamExtract, TransactionCompletion, covered_transactions, current_round, hour_log,
                      pending_archives, round_manifests)


def dump_schema(cfg, path):
    """mariadb-dump streamed through gzip into `path`, atomically; a failed dump leaves nothing behind."""
    binary = shutil.which("mariadb-dump") or shutil.which("mysqldump")
    if not binary:
        raise GanymedeError("neither mariadb-dump nor mysqldump is installed (Debian: apt-get install mariadb-client)")
    options = [f"--defaults-extra-file={cfg.option_file}"] if cfg.option_file else []
    args = ["-h", cfg.host, "-P", str(cfg.port), "-u", cfg.user, "--single-transaction", "--skip-dump-date",
            "--routines", "--databases", cfg.database]
    with markers.open_atomic(path) as raw:
        with subprocess.Popen([binary, *options, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                shutil.copyfileobj(proc.stdout, gz, 1 << 20)
            stderr = proc.stderr.read().decode("utf-8", "replace")
        if proc.returncode != 0:
            raise CommandError([binary, *args], proc.returncode, stderr)  # without the option file


def archive_locations(root, hour, transactions, covered):
    """(agent, tx, current path, done path) of each archive an extract round holds; a missing one is an error."""
    located = []
    for t in transactions:
        if t["transaction_id"] not in covered:
            continue
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
    for r in sorted(rounds):
        dump = root.backup_dump(hour, r)
        plan[f"mysql/{os.path.basename(dump)}"] = dump
        for path in (root.extract(hour, r), root.extract_manifest(hour, r)):
            plan[f"extracts/{os.path.basename(path)}"] = path
    for agent_id, transaction_id, path, _ in archives:
        plan[f"archives/{agent_id}/{transaction_id}.tar.gz"] = path
    return dict(sorted(plan.items()))


def backup_hour(cfg, bucket, plan, manifest_path):
    """The hour's objects into `bucket` (made if need be), verified, then MANIFEST.json (key, size, sha256 of
    each) once everything it lists is; returns the listing. A rerun uploads only what is missing."""
    store = s3.connect(cfg)
    store.ensure_bucket(bucket)
    listed = store.listed(bucket)
    listing = [{"key": key, "size": local.size, "sha256": local.sha256, "action": action}
               for key, (action, local) in store.put_all(bucket, plan, None, listed).items()]
    markers.write_json(manifest_path, {"bucket": bucket,
                                       "objects": [{k: o[k] for k in ("key", "size", "sha256")} for o in listing]})
    manifest = store.local(manifest_path)
    listing.append({"key": "MANIFEST.json", "size": manifest.size, "sha256": manifest.sha256,
                    "action": store.put_verified(bucket, "MANIFEST.json", manifest_path, manifest, listed)})
    return listing


def move_archives(conn, archives, logged):
    """upload/ -> archives/, each move then recorded in the log; `logged` {transaction id: archive_path the log
    holds} also records a move an interrupted run did not."""
    for agent_id, transaction_id, path, done in archives:
        if path != done:
            files.move_durably(path, done)
        if logged.get(transaction_id) != done:
            txlog.set_archive_path(conn, transaction_id, done)


class DumpSchema(luigi.Task):
    """mariadb-dump of the `ganymede` schema, taken once the round's extract is written."""
    hour = luigi.DateHourParameter(description="The UTC hour")
    round = luigi.IntParameter(default=0, description="Extract round the dump follows")

    def output(self):
        return luigi.LocalTarget(state_root().backup_dump(self.hour, self.round))

    def requires(self):
        return GlassbeamExtract(hour=self.hour, round=self.round)

    @unless_complete
    def run(self):
        dump_schema(config.mysql(), self.output().path)


class HourlyBackup(luigi.task.MixinNaiveBulkComplete, luigi.Task):
    """The hour in its bucket (dumps, archives, extracts, MANIFEST.json), verified; archives then in archives/."""
    hour = luigi.DateHourParameter(description="The UTC hour")

    def output(self):
        return luigi.LocalTarget(state_root().hour_marker(self.hour, "backup"))

    def complete(self):
        return self.output().exists() and not pending_archives(self.hour)

    def requires(self):
        return [DumpSchema(hour=self.hour, round=0)] + self._waiting

    @cached_property
    def _waiting(self):
        """Archives in upload/ that no round holds and the log does not list as completed; read once per task
        instance (Luigi calls requires() several times a run)."""
        _, rows = hour_log(self.hour)
        known = covered_transactions(round_manifests(self.hour).values()) | {t["transaction_id"] for t in rows}
        return [TransactionCompletion(hour=self.hour, agent_id=agent, transaction_id=tx)
                for tx, agent in sorted(pending_archives(self.hour).items()) if tx not in known]

    def run(self):
        _, logged = hour_log(self.hour)
        completed = [t["transaction_id"] for t in logged if t["state"] == "completed"]
        # Supplementary rounds are dynamic dependencies: a late arrival opens one after Luigi scheduled
        # this task, and Luigi checks requires() again just before run().
        yield [DumpSchema(hour=self.hour, round=r) for r in range(1, current_round(self.hour, completed) + 1)]
        root, cfg = state_root(), config.s3()
        # the rounds whose dump is on disk, read now: requires() may have seen a round nobody has built yet
        rounds = {r: m for r, m in round_manifests(self.hour).items()
                  if os.path.exists(root.backup_dump(self.hour, r))}
        archives = archive_locations(root, self.hour, logged, covered_transactions(rounds.values()))
        bucket = s3.bucket_name(cfg.bucket_template, self.hour)
        listing = backup_hour(cfg, bucket, backup_plan(root, self.hour, rounds, archives),
                              os.path.join(os.path.dirname(self.output().path), "MANIFEST.json"))
        with closing(mysql.connect(config.mysql())) as conn:
            for _, transaction_id, path, done in archives:  # before the move: no moved archive lacks its event
                if path != done:
                    txlog.append_event_once(conn, transaction_id, "backed_up", {"bucket": bucket})
            # The marker goes first: complete() also needs upload/ empty, so a crash during the move reruns it,
            # while a marker written after the move could be left stale by a crash in between.
            markers.write_json(self.output().path, {
                "hour": hours.format_hour(self.hour), "bucket": bucket, "rounds": len(rounds), "objects": listing,
                "archives": sorted(done for _, _, _, done in archives)})
            move_archives(conn, archives, {t["transaction_id"]: t["archive_path"] for t in logged})
