"""`ganymede-agent`: collect this GEO's stats for UTC hours and deliver them to ganymede-api.

Exit codes:
  0  everything collected and delivered (or, with --dry-run, shown)
  1  something was kept for a later run: the API or the GEO database was
     unavailable within the retry budget (the spool keeps what was built)
  2  configuration or usage error (bad/unsafe config file, bad arguments, an
     [api] url that redirects or has no API behind it; the spool is untouched)
  3  another ganymede-agent run holds the spool's lock; nothing was done
  4  the API refused an archive for good; it was moved to <spool>/rejected/
     with the server's reason beside it
  5  the API refused the agent's credentials (401/403); the spool is untouched
When several apply, the highest is returned.
"""
import argparse
import json
import logging
import os
import sys
import tarfile
import tempfile
import time
import zlib
from contextlib import closing
from datetime import datetime, timedelta, timezone

from . import __version__, archive, collect, config
from .client import AUTH_STATUSES, Api, Misdirected, Refused, RetryBudget, Unavailable
from .spool import Spool, SpoolError, SpoolLocked, utc_now

EXIT_OK, EXIT_KEPT, EXIT_USAGE, EXIT_LOCKED, EXIT_REJECTED, EXIT_AUTH = 0, 1, 2, 3, 4, 5
MAX_HOURS = 24 * 31  # one --backfill at most

log = logging.getLogger("ganymede_agent")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="ganymede-agent", description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Exit codes:"):], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=config.DEFAULT_PATH, help="config file, mode 0600 (default: %(default)s)")
    parser.add_argument("--agent-id", help="override [agent] agent_id of the config")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--hour", metavar="YYYY-MM-DDTHH", help="collect this UTC hour (default: the last complete "
                                                              "hour, plus any missed since the last run)")
    which.add_argument("--backfill", nargs=2, metavar=("FROM", "TO"), help="collect every UTC hour FROM..TO inclusive")
    parser.add_argument("--replace", action="store_true",
                        help="with --hour/--backfill: send those hours as replacements of what the server already "
                             "completed (their old data is replaced downstream, never added to)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the archives in a temporary directory and show what would be sent; "
                             "no spool change, no network")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log retries and build details")
    parser.add_argument("--version", action="version", version=f"ganymede-agent {__version__}")
    return parser.parse_args(argv)


HOUR = timedelta(hours=1)


def _this_hour(now=None):
    return (now or datetime.now(timezone.utc).replace(tzinfo=None)).replace(minute=0, second=0, microsecond=0)


def _hour_range(first, last):
    return [first + i * HOUR for i in range((last - first) // HOUR + 1)]


def requested_hours(args, parser_error, now=None):
    """The hours named on the command line, or None for the default (last complete hour and catch-up)."""
    current = _this_hour(now)
    try:
        if args.hour:
            hours = [collect.parse_hour(args.hour)]
        elif args.backfill:
            first, last = (collect.parse_hour(h) for h in args.backfill)
            if first > last:
                parser_error(f"--backfill FROM {args.backfill[0]} is after TO {args.backfill[1]}")
            hours = _hour_range(first, last)
            if len(hours) > MAX_HOURS:
                parser_error(f"--backfill spans {len(hours)} hours; at most {MAX_HOURS} per run")
        else:
            return None
    except ValueError as exc:
        parser_error(str(exc))
    if hours[-1] >= current:
        parser_error(f"hour {collect.format_hour(hours[-1])} is not complete yet (now {current:%Y-%m-%dT%H}Z)")
    return [collect.format_hour(h) for h in hours]


def due_hours(state, catch_up, now=None):
    """Default run: the last complete hour, the hours missed since the last collected one, and failed ones."""
    first = last = _this_hour(now) - HOUR
    if state.get("last_collected"):
        previous = collect.parse_hour(state["last_collected"])
        first = max(previous + HOUR, last - max(catch_up - 1, 0) * HOUR)
        if previous + HOUR < first:
            log.error("the agent did not run for %d hours; collecting only the last %d (catch_up_hours); "
                      "use --backfill %s %s for the rest", (first - previous) // HOUR - 1, catch_up,
                      collect.format_hour(previous + HOUR), collect.format_hour(first - HOUR))
    hours = {collect.format_hour(h) for h in _hour_range(first, last)}
    return sorted(hours.union(state.get("uncollected", [])))


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s ganymede-agent[%(process)d] %(levelname)s %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%SZ")
    logging.Formatter.converter = time.gmtime

    def usage_error(message):
        print(f"ganymede-agent: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    hours = requested_hours(args, usage_error)
    if args.replace and hours is None:
        usage_error("--replace needs --hour or --backfill")
    try:
        cfg = config.load(args.config, agent_id=args.agent_id)
        source = collect.Source(cfg.database, cfg.datasets)
        spool = Spool(cfg.spool_dir, cfg.agent_id, cfg.spool_max_bytes)
        if args.dry_run:
            return dry_run(cfg, source, spool, hours)
        with spool.locked():
            return Run(cfg, source, spool).run(hours, replace=args.replace)
    except SpoolLocked as exc:
        print(f"ganymede-agent: {exc}; exiting (exit code {EXIT_LOCKED})", file=sys.stderr)
        return EXIT_LOCKED
    except (config.ConfigError, SpoolError) as exc:
        usage_error(str(exc))


class Run:
    """One locked run: collect what is due into the spool, then deliver the spool oldest first."""

    def __init__(self, cfg, source, spool):
        self.cfg, self.source, self.spool = cfg, source, spool
        self.api = Api(cfg.api_url, cfg.agent_id, cfg.token, cfg.timeout, RetryBudget(*cfg.retry), ca_file=cfg.ca_file)

    def run(self, hours=None, replace=False):
        state = self.spool.read_state()
        default = hours is None
        hours = due_hours(state, self.cfg.catch_up_hours) if default else hours
        if replace:  # remembered in the spool, so a crash before delivery still sends a replacement
            self.spool.update_state(replace=sorted(set(state.get("replace", [])) | set(hours)))
        failed = self.collect(hours, default, state)
        code = max(self.deliver(), EXIT_KEPT if failed else EXIT_OK)
        self.spool.update_state(last_run={"at": utc_now(), "exit": code, "version": __version__})
        return code

    def collect(self, hours, default, state):
        """Build each hour's archive into the spool; returns the hours that could not be collected."""
        failed = []
        for hour in hours:
            try:
                manifest = build(self.cfg, self.source, hour, self.spool.path_for(hour), self.spool.dir)
            except collect.CollectError as exc:
                log.error("hour %s kept for the next run: not collected: %s", hour, exc)
                failed.append(hour)
                continue
            log.debug("hour %s built: %s", hour, _rows(manifest))
            self.spool.count("built")
            self.spool.enforce_limit(keep=hour)
        changes = {"uncollected": sorted(set(state.get("uncollected", [])).difference(hours).union(failed))}
        if default:
            done = [h for h in hours if h not in failed]
            if done and done[-1] > state.get("last_collected", ""):
                changes["last_collected"] = done[-1]
        self.spool.update_state(**changes)
        return failed

    def deliver(self):
        code = EXIT_OK
        pending = self.spool.hours()
        for i, hour in enumerate(pending):
            path = self.spool.path_for(hour)
            try:
                size, rows = os.path.getsize(path), _rows(read_manifest(path))
            except archive.ArchiveError as exc:
                self.spool.reject(hour, {"error": f"unreadable in the spool: {exc}"})
                log.error("hour %s REJECTED: the spooled archive is unreadable (%s); moved to %s",
                          hour, exc, self.spool.rejected_dir)
                code = EXIT_REJECTED
                continue
            replace = hour in self.spool.read_state().get("replace", [])
            try:
                result = self.api.deliver(hour, path, archive.sha256_file(path), replace=replace)
            except (Unavailable, Misdirected, Refused) as exc:
                if isinstance(exc, Refused) and exc.status not in AUTH_STATUSES:
                    self.spool.reject(hour, exc.reason())
                    self.spool.count("rejected")
                    log.error("hour %s REJECTED by the API, moved to %s: %s", hour, self.spool.rejected_dir, exc)
                    code = EXIT_REJECTED
                    continue
                level, why, stop = {Unavailable: (logging.WARNING, "API unavailable: ", EXIT_KEPT),
                                    Misdirected: (logging.ERROR, "", EXIT_USAGE),
                                    Refused: (logging.ERROR, "the API refused this agent's credentials: ", EXIT_AUTH)
                                    }[type(exc)]
                for kept in pending[i:]:
                    log.log(level, "hour %s kept in the spool: %s%s", kept, why, exc)
                return max(code, stop)
            self.spool.remove(hour)
            if replace:
                self.spool.update_state(replace=[h for h in self.spool.read_state().get("replace", []) if h != hour])
            self.spool.count("delivered")
            self.spool.update_state(last_delivered=hour)
            log.info("hour %s delivered: transaction %s, %s, %d bytes%s", hour, result.transaction_id, rows, size,
                     " (already completed by an earlier run)" if result.already else "")
        return code


def build(cfg, source, hour, dest, workdir):
    fields = {"agent_id": cfg.agent_id, "geo": cfg.geo, "hour": hour, "agent_version": __version__}
    with closing(source.datasets(hour)) as datasets:
        return archive.build_archive(dest, fields, datasets, workdir)


def dry_run(cfg, source, spool, hours):
    """Show what a run would send: the spooled hours, then the hours it would collect, built aside."""
    spooled = os.path.isdir(spool.dir)
    for hour in spool.hours() if spooled else []:
        print(f"would deliver spooled hour {hour}: {os.path.getsize(spool.path_for(hour))} bytes")
    hours = due_hours(spool.read_state() if spooled else {}, cfg.catch_up_hours) if hours is None else hours
    code = EXIT_OK
    with tempfile.TemporaryDirectory(prefix="ganymede-agent-dry-run-") as tmp:
        for hour in hours:
            dest = os.path.join(tmp, hour + ".tar.gz")
            try:
                manifest = build(cfg, source, hour, dest, tmp)
            except collect.CollectError as exc:
                print(f"hour {hour}: cannot collect: {exc}")
                code = EXIT_KEPT
                continue
            print(f"would send hour {hour} as agent {cfg.agent_id} (geo {cfg.geo}) to {cfg.api_url}: "
                  f"{_rows(manifest)}; {os.path.getsize(dest)} bytes, sha256 {archive.sha256_file(dest)}")
            os.unlink(dest)
    return code


def read_manifest(path):
    """The manifest of an archive this agent built (its first member); ArchiveError if it cannot be read."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            first = tar.next()
            if first is None or first.name != archive.MANIFEST_NAME:
                raise archive.ArchiveError(f"the first member is not {archive.MANIFEST_NAME}")
            return archive.validate_manifest(json.load(tar.extractfile(first)))
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise archive.ArchiveError(f"{type(exc).__name__}: {exc}") from None


def _rows(manifest):
    return ", ".join(f"{name}={entry['rows']}" for name, entry in manifest["datasets"].items()) + " rows"


if __name__ == "__main__":
    sys.exit(main())
