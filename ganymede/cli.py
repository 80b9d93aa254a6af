"""`ganymede` (admin) and the old scripts' manual commands.

The manual commands build the very same Luigi command line that cron runs
(`luigi --module ganymede.tasks …`) and hand it to Luigi's own entry point,
so a manual run and a cron run cannot disagree, share the central scheduler
(no task runs twice at once) and exit with the same [retcode] codes.
"""
import argparse
import sys
from contextlib import closing
from datetime import datetime, timedelta

import luigi.retcodes

from . import config, hours
from .errors import GanymedeError
from .stores import mysql, txlog


def _fail(message, code=2):
    print(f"ganymede: {message}", file=sys.stderr)
    return code


def _hour_arg(text):
    try:
        return hours.parse_hour(text)
    except GanymedeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_luigi(task_args, local_scheduler=False):
    """Run `luigi --module ganymede.tasks <task_args>` in-process; exits with Luigi's retcode."""
    argv = ["--module", "ganymede.tasks", *task_args] + (["--local-scheduler"] if local_scheduler else [])
    luigi.retcodes.run_with_retcodes(argv)


# --- ganymede (admin) ----------------------------------------------------------

def _db_upgrade(args):
    """The MySQL migrations, then every MongoDB index the pipeline relies on (both idempotent)."""
    from . import datasets
    from .stores import mongo
    applied = mysql.upgrade(config.mysql())
    print(f"schema at version {mysql.LATEST}" + (f" (applied {applied})" if applied else " (nothing to do)"))
    client, db = mongo.connect(config.mongodb())
    with closing(client):
        indexes = mongo.create_indexes(db, sorted(datasets.CATALOG))
    print("MongoDB indexes in place: " + ", ".join(f"{name}: {' '.join(names)}" for name, names in indexes.items()))


def _agents_add(args):
    with closing(mysql.connect(config.mysql())) as conn:
        token = txlog.add_agent(conn, args.agent_id, args.geo, expected_from=args.since)
    print(f"agent {args.agent_id} (geo {args.geo}) added; its token, shown only now:\n{token}")


def _agents_list(args):
    with closing(mysql.connect(config.mysql())) as conn:
        rows = txlog.list_agents(conn)
    for r in rows:
        state = "active" if r["active"] else f"revoked {r['revoked_at']:%Y-%m-%dT%H:%M:%SZ}"
        print(f"{r['agent_id']:<24} {r['geo']:<12} {state}")


def _agents_revoke(args):
    with closing(mysql.connect(config.mysql())) as conn:
        txlog.revoke_agent(conn, args.agent_id)
    print(f"agent {args.agent_id} revoked")


def _admin_token(args):
    with closing(mysql.connect(config.mysql())) as conn:
        token = txlog.add_admin_token(conn, args.name)
    print(f"admin token {args.name!r}, shown only now:\n{token}")


def _status_rows(args):
    from . import status
    from .paths import StateRoot
    last = args.hour or hours.last_complete_hour()
    first = args.hour or last - timedelta(hours=(args.last or config.alerts().status_hours) - 1)
    with closing(mysql.connect(config.mysql())) as conn:
        return status.hours_status(conn, StateRoot(config.state().root), first, last,
                                   config.extract().deadline_minutes, config.alerts().overdue_minutes)


def _status(args):
    for row in _status_rows(args):
        print(row.line())


def _alerts(args):
    """Overdue hours: printed, and mailed through Luigi's [email] settings; exit 1 if any."""
    from luigi.notifications import send_error_email
    overdue = [row for row in _status_rows(args) if row.verdict in ("overdue", "failed")]
    if not overdue:
        print("no overdue hour")
        return 0
    text = "\n".join(row.line() for row in overdue)
    print(text)
    send_error_email(f"Ganymede: {len(overdue)} hour(s) not closed after their deadline", text)
    return 1


def _demo(args):
    from . import demo
    return demo.main(args)


def build_parser():
    parser = argparse.ArgumentParser(prog="ganymede", description="Ganymede administration")
    sub = parser.add_subparsers(dest="command", required=True)
    db = sub.add_parser("db", help="the MySQL schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="create or upgrade the MySQL schema and the MongoDB indexes (idempotent)"
                  ).set_defaults(func=_db_upgrade)
    agents = sub.add_parser("agents", help="GEO agents").add_subparsers(dest="agents_command", required=True)
    add = agents.add_parser("add", help="register an agent and print its token once")
    add.add_argument("agent_id")
    add.add_argument("--geo", required=True)
    add.add_argument("--since", type=_hour_arg, default=None,
                     help="first UTC hour the agent is expected for (default: the hour it is added), for backfills")
    add.set_defaults(func=_agents_add)
    agents.add_parser("list", help="list agents").set_defaults(func=_agents_list)
    revoke = agents.add_parser("revoke", help="revoke an agent's token")
    revoke.add_argument("agent_id")
    revoke.set_defaults(func=_agents_revoke)
    admin = sub.add_parser("admin-token", help="create (or rotate) an admin token and print it once")
    admin.add_argument("name")
    admin.set_defaults(func=_admin_token)
    for name, func, text in (("status", _status, "one line per hour: agents, staged, loaded, extract, backup"),
                             ("alerts", _alerts, "report hours still not closed after their deadline")):
        cmd = sub.add_parser(name, help=text)
        which = cmd.add_mutually_exclusive_group()
        which.add_argument("--hour", type=_hour_arg, help="one UTC hour, YYYY-MM-DDTHH")
        which.add_argument("--last", type=int, help="the last N complete hours (default [alerts] status_hours)")
        cmd.set_defaults(func=func)
    demo = sub.add_parser("demo", help="run a demo hour end to end on the local services")
    demo.add_argument("--dir", default=".demo", help="where the demo keeps its config and state")
    demo.add_argument("--agents", type=int, default=3)
    demo.add_argument("--local-scheduler", action="store_true", help="do not use luigid")
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except GanymedeError as exc:
        return _fail(str(exc), 1)


# --- the old scripts' manual commands -------------------------------------------

def _transaction_task(task, argv, prog, option):
    parser = argparse.ArgumentParser(prog=prog, description=f"Run {task} for one transaction through Luigi")
    if option:
        parser.add_argument(option, dest="transaction_id", required=True)
    else:
        parser.add_argument("transaction_id")
    parser.add_argument("--local-scheduler", action="store_true", help="do not use luigid")
    args = parser.parse_args(argv)
    try:
        with closing(mysql.connect(config.mysql())) as conn:
            tx = txlog.get_transaction(conn, args.transaction_id)
    except GanymedeError as exc:
        sys.exit(_fail(str(exc), 1))
    if not tx or tx["state"] not in ("completed", "superseded"):
        sys.exit(_fail(f"no completed transaction {args.transaction_id!r}"
                       + (f" (it is {tx['state']})" if tx else ""), 2))
    run_luigi([task, "--transaction-id", tx["transaction_id"], "--hour", hours.format_hour(tx["hour"]),
               "--agent-id", tx["agent_id"]], args.local_scheduler)


def worker_main(argv=None):
    """ganymede-worker TXID: stage one transaction."""
    _transaction_task("StageTransaction", argv, "ganymede-worker", None)


def worker_etl_main(argv=None):
    """ganymede-worker-etl --transactionid=TXID: load one transaction into MongoDB."""
    _transaction_task("LoadTransaction", argv, "ganymede-worker-etl", "--transactionid")


def _hour_from_parts(args):
    """-y -m -d -h (numbers, leading zeros optional) -> a UTC hour that has ended; none given: the last one."""
    parts = {"-y": args.y, "-m": args.m, "-d": args.d, "-h": args.h}
    if all(v is None for v in parts.values()):
        return hours.last_complete_hour()
    if any(v is None for v in parts.values()):
        raise GanymedeError("give all of -y -m -d -h, or none for the last complete UTC hour")
    for flag, value in parts.items():
        if not (value.strip().isascii() and value.strip().isdigit()):
            raise GanymedeError(f"{flag} {value!r} is not a number")
    try:
        hour = datetime(*(int(v) for v in parts.values()))
    except ValueError as exc:
        raise GanymedeError(f"-y {args.y} -m {args.m} -d {args.d} -h {args.h} is not a UTC hour: {exc}") from None
    if hour > hours.last_complete_hour():
        raise GanymedeError(f"{hours.format_hour(hour)} UTC has not ended yet "
                            f"(the last complete UTC hour is {hours.format_hour(hours.last_complete_hour())})")
    return hour


def glassbeam_extract_main(argv=None):
    """ganymede-glassbeam-extract [-y YYYY -m M -d D -h H]: the old script's options, hour in UTC.

    Builds the round the hour needs now (the hour's extract, or a
    supplementary one for late arrivals); --force rebuilds the hour's extract.
    """
    from .tasks.extract import current_round
    parser = argparse.ArgumentParser(
        prog="ganymede-glassbeam-extract", add_help=False,
        description="Build (or rebuild) one UTC hour's Glassbeam extract, as ganymede_glassbeam_extract.sh did. "
                    "Without -y -m -d -h: the last complete UTC hour. Exit codes are luigi.cfg's [retcode] "
                    "(missing_data while the hour still waits for agents and its deadline).")
    # usage mistakes end in one line on stderr and exit 2, like bad values
    parser.error = lambda message: sys.exit(_fail(f"{message} (see {parser.prog} --help)"))
    parser.add_argument("--help", action="help", help="show this help and exit")
    parser.add_argument("-y", metavar="YYYY", help="year")
    parser.add_argument("-m", metavar="MM", help="month, 1-12 (leading zero optional)")
    parser.add_argument("-d", metavar="DD", help="day of the month (leading zero optional)")
    parser.add_argument("-h", metavar="HH", help="hour, 0-23 UTC, military time (leading zero optional)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild the hour's extract (round 0) even if it exists; same data gives the same bytes")
    parser.add_argument("--local-scheduler", action="store_true", help="do not use luigid")
    args = parser.parse_args(argv)
    try:
        hour = _hour_from_parts(args)
        round_ = _forget_extract(hour) if args.force else current_round(hour)
    except GanymedeError as exc:
        sys.exit(_fail(str(exc)))
    run_luigi(["GlassbeamExtract", "--hour", hours.format_hour(hour), "--round", str(round_)], args.local_scheduler)


def _forget_extract(hour):
    """--force: set the round-0 manifest aside (kept, renamed) so Luigi builds round 0 again; returns 0.

    The rebuild leaves out what the supplementary rounds hold, so it gives
    the same file as before unless the data changed since.
    """
    import os
    from .paths import StateRoot
    manifest = StateRoot(config.state().root).extract_manifest(hour, 0)
    if os.path.exists(manifest):
        os.replace(manifest, manifest + f".replaced-{hours.now():%Y%m%dT%H%M%S%f}")
    return 0


def hourly_backup_main(argv=None):
    """ganymede-hourly-backup [--hour H]: the cron entry point, by hand."""
    parser = argparse.ArgumentParser(
        prog="ganymede-hourly-backup",
        description="Run the whole graph for one UTC hour (stage, load, extract, backup), as cron does. "
                    "Exit codes are luigi.cfg's [retcode].")
    parser.error = lambda message: sys.exit(_fail(f"{message} (see {parser.prog} --help)"))
    parser.add_argument("--hour", type=_hour_arg, default=None, help="YYYY-MM-DDTHH (default: last complete UTC hour)")
    parser.add_argument("--workers", type=int, default=1, help="Luigi workers (default 1)")
    parser.add_argument("--local-scheduler", action="store_true", help="do not use luigid")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    hour = args.hour or hours.last_complete_hour()
    if hour > hours.last_complete_hour():
        parser.error(f"{hours.format_hour(hour)} UTC has not ended yet")
    run_luigi(["HourlyBackup", "--hour", hours.format_hour(hour), "--workers", str(args.workers)],
              args.local_scheduler)
