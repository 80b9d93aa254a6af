"""`ganymede` (admin) and the old scripts' manual commands, which run the very tasks cron runs through
ganymede.runs (the same hour's lock and exit codes)."""
import argparse
import os
import sys
import time
from contextlib import closing
from datetime import datetime, timedelta

from . import config, configfile, hours, runs, status
from .errors import GanymedeError, HourError
from .paths import StateRoot
from .stores import mysql, txlog


class BadArgument(GanymedeError):
    """A value on the command line that names nothing usable (a transaction not completed): exit 2."""


class Parser(argparse.ArgumentParser):
    """Usage mistakes end in one line on stderr and exit 2; --help ends with the exit-code table.
    `func`: the (sub)command's handler."""

    def __init__(self, *args, func=None, **kwargs):
        kwargs.setdefault("epilog", "exit codes:\n" + "\n".join(f"  {code:>2}  {text}"
                                                                   for code, text in runs.EXIT_CODES))
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        if func:
            self.set_defaults(func=func)

    def error(self, message):
        self.exit(2, f"{self.prog.split()[0]}: {message} (see {self.prog} --help)\n")


def _hour_arg(text):
    try:
        return hours.parse_hour(text)
    except GanymedeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _common(parser, pipeline=True):
    parser.add_argument("--config", metavar="FILE",
                        help="the one config file read (default: LUIGI_CONFIG_PATH, else /etc/ganymede/luigi.cfg)")
    if pipeline:
        parser.add_argument("--local-scheduler", action="store_true",
                            help="run without luigid (the hour's lock still keeps other runs of the hour out)")
        parser.add_argument("-v", "--verbose", action="store_true",
                            help="Luigi's details on the terminal too (they always go to the log file)")


# --- ganymede (admin) ----------------------------------------------------------

def _db_upgrade(args):
    from . import datasets
    from .stores import mongo
    applied = mysql.upgrade(config.mysql())
    print(f"schema at version {mysql.LATEST}" + (f" (applied {applied})" if applied else " (nothing to do)"))
    client, db = mongo.connect(config.mongodb())
    with closing(client):
        indexes = mongo.create_indexes(db, sorted(datasets.CATALOG))
    print("MongoDB indexes in place: " + ", ".join(f"{name}: {' '.join(names)}" for name, names in indexes.items()))


def _in_mysql(call, *args, **kwargs):
    """call(conn, *args, **kwargs) on a connection of its own."""
    with closing(mysql.connect(config.mysql())) as conn:
        return call(conn, *args, **kwargs)


def _agents_add(args):
    token = _in_mysql(txlog.add_agent, args.agent_id, args.geo, expected_from=args.since)
    print(f"agent {args.agent_id} (geo {args.geo}) added; its token, shown only now:\n{token}")


def _agents_list(args):
    for r in _in_mysql(txlog.list_agents):
        state = "active" if r["active"] else f"revoked {r['revoked_at']:%Y-%m-%dT%H:%M:%SZ}"
        print(f"{r['agent_id']:<24} {r['geo']:<12} {state}")


def _agents_revoke(args):
    _in_mysql(txlog.revoke_agent, args.agent_id)
    print(f"agent {args.agent_id} revoked")


def _admin_token(args):
    token = _in_mysql(txlog.add_admin_token, args.name)
    print(f"admin token {args.name!r}, shown only now:\n{token}")


def _status_rows(args):
    last = args.hour or hours.last_complete_hour()
    return runs.hours_rows(args.hour or last - timedelta(hours=(args.last or config.alerts().status_hours) - 1), last)


def _detailed_lines(rows, all_checks=False):
    """Each hour's status line and detail: its failed quality checks, or with all_checks every one."""
    from .stores import quality
    root, lines = StateRoot(config.state().root), []
    with closing(mysql.connect(config.mysql())) as conn:
        for row in rows:
            transactions = status.hour_transactions(conn, root, row.hour)
            lines += [row.line(), f"  agents expected: {', '.join(row.expected) or '(none)'}",
                      f"  agents missing:  {', '.join(row.not_arrived) or '(none)'}"]
            if row.unexpected:
                lines.append(f"  agents not expected that sent data: {', '.join(row.unexpected)}")
            lines += [f"  failed: {family}: {reason}" for family, reason in sorted(row.reasons.items())]
            checks = quality.hour_results(conn, row.hour) if all_checks else row.quality_failures
            lines += status.quality_lines(checks)
            lines.append(f"  transactions ({len(transactions)}):")
            lines += [f"    {status.transaction_line(root, t)}" for t in transactions]
            lines.append(f"  graph: {status.graph_url(runs.scheduler_url(), row.hour)}")
    return lines


def _status(args):
    rows = _status_rows(args)
    print("\n".join(_detailed_lines(rows, all_checks=True) if args.hour else [row.line() for row in rows]))


def _alerts(args):
    from luigi.notifications import email, send_error_email
    rows = [row for row in _status_rows(args) if row.needs_attention()]
    if not rows:
        print(f"{runs.stamp()} ganymede alerts: no hour needs attention (exit 0)")
        return 0
    text = "\n".join(_detailed_lines(rows))
    print(f"{runs.stamp()} ganymede alerts: {len(rows)} hour(s) need attention (exit 3)\n{text}")
    send_error_email(f"Ganymede: {len(rows)} hour(s) need attention", text)
    if sys.stdout.isatty() and not email().force_send:
        print("(not mailed: Luigi sends no mail from a terminal; cron's run mails, or set [email] force_send)")
    return 3


def _transactions(args):
    root = StateRoot(config.state().root)
    rows = _in_mysql(status.hour_transactions, root, args.hour)
    if not rows:
        print(f"no transaction for {hours.format_hour(args.hour)}")
    for t in rows:
        print(status.transaction_line(root, t))


def _graph(args):
    print(status.graph_url(runs.scheduler_url(), args.hour))


def _demo(args):
    from . import demo
    return demo.main(args)


def build_parser():
    parser = Parser(prog="ganymede", description="Ganymede administration")
    _common(parser, pipeline=False)
    sub = parser.add_subparsers(dest="command", required=True)
    db = sub.add_parser("db", help="the MySQL schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="create or upgrade the MySQL schema and the MongoDB indexes (idempotent)",
                  func=_db_upgrade)
    agents = sub.add_parser("agents", help="GEO agents").add_subparsers(dest="agents_command", required=True)
    add = agents.add_parser("add", help="register an agent and print its token once", func=_agents_add)
    add.add_argument("agent_id")
    add.add_argument("--geo", required=True)
    add.add_argument("--since", type=_hour_arg, default=None,
                     help="first UTC hour the agent is expected for (default: the hour it is added), for backfills")
    agents.add_parser("list", help="list agents", func=_agents_list)
    agents.add_parser("revoke", help="revoke an agent's token", func=_agents_revoke).add_argument("agent_id")
    sub.add_parser("admin-token", help="create (or rotate) an admin token and print it once",
                   func=_admin_token).add_argument("name")
    for name, func, text in (
            ("status", _status, "one line per hour: agents, staged, loaded, extract, backup, verdict; with --hour "
                                "also the agents by name, failures with reasons and the transactions"),
            ("alerts", _alerts, "hours that need attention (failed, overdue, expected agents that sent nothing), "
                                "with their reasons; mailed through luigi's [email]; exit 3 if any")):
        which = sub.add_parser(name, help=text, description=text, func=func).add_mutually_exclusive_group()
        which.add_argument("--hour", type=_hour_arg, help="one UTC hour, YYYY-MM-DDTHH")
        which.add_argument("--last", type=_positive, help="the last N complete hours (default [alerts] status_hours)")
    for name, func, text in (("transactions", _transactions, "an hour's transactions: id, agent, state, where "
                                                             "its archive is now, the reason of a failed one"),
                             ("graph", _graph, "the URL of an hour's dependency graph in luigid")):
        sub.add_parser(name, help=text, description=text, func=func).add_argument(
            "--hour", type=_hour_arg, required=True, help="the UTC hour, YYYY-MM-DDTHH")
    demo = sub.add_parser("demo", help="run a demo hour end to end on the local services", func=_demo)
    demo.add_argument("--dir", default=".demo", help="where the demo keeps its config and state")
    demo.add_argument("--agents", type=int, default=3)
    demo.add_argument("--local-scheduler", action="store_true", help="do not use luigid")
    demo.add_argument("--stop", action="store_true", help="stop the luigid a previous demo left running, and exit")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command != "demo":
            configfile.use(args.config)
            if args.command != "graph":
                runs.check_option_file()
        return args.func(args) or 0
    except GanymedeError as exc:
        print(f"ganymede: {exc}", file=sys.stderr)
        return 1


# --- the old scripts' manual commands -------------------------------------------

def _pipeline(prog, args, run):
    """Config, logging, checks, `run()` -> (code, words), then the closing line naming args.what (run() may
    make it precise) on stdout, cron's log, and the exit."""
    started = time.monotonic()
    try:
        configfile.use(args.config)
        runs.setup_logging(args.verbose)
        code, words = runs.preflight(args.local_scheduler) or run()
    except (HourError, BadArgument) as exc:
        print(f"ganymede: {exc}", file=sys.stderr)
        sys.exit(2)
    except GanymedeError as exc:
        code, words = 1, str(exc)
    line = f"{runs.stamp()} {prog} {args.what}: {words} (exit {code}, {time.monotonic() - started:.1f} s)"
    print(line, flush=True)
    runs.log.info(line)
    sys.exit(code)


def _transaction_task(task, argv, prog, name, **how):
    parser = Parser(prog=prog, description=f"Run {task} for one transaction (find ids with "
                                            "`ganymede transactions --hour H`)")
    parser.add_argument(name, **how)
    _common(parser)
    args = parser.parse_args(argv)
    args.what = f"transaction {args.transaction_id}"

    def run():
        tx = _in_mysql(txlog.get_transaction, args.transaction_id)
        if not tx or tx["state"] not in ("completed", "superseded"):
            raise BadArgument(f"no completed transaction {args.transaction_id!r}"
                                + (f" (it is {tx['state']})" if tx else ""))
        args.what += f" (hour {hours.format_hour(tx['hour'])})"
        return runs.run_hour(prog, tx["hour"], [task, "--transaction-id", tx["transaction_id"], "--hour",
                                                hours.format_hour(tx["hour"]), "--agent-id", tx["agent_id"]],
                             local_scheduler=args.local_scheduler)

    _pipeline(prog, args, run)


def worker_main(argv=None):
    _transaction_task("StageTransaction", argv, "ganymede-worker", "transaction_id")


def worker_etl_main(argv=None):
    _transaction_task("LoadTransaction", argv, "ganymede-worker-etl", "--transactionid", dest="transaction_id",
                      required=True)


def _hour_from_parts(args):
    """-y -m -d -h (numbers, leading zeros optional) -> a UTC hour that has ended; none given: the last one."""
    parts = {"-y": args.y, "-m": args.m, "-d": args.d, "-h": args.h}
    if all(v is None for v in parts.values()):
        return hours.last_complete_hour()
    if any(v is None for v in parts.values()):
        raise HourError("give all of -y -m -d -h, or none for the last complete UTC hour")
    for flag, value in parts.items():
        if not (value.strip().isascii() and value.strip().isdigit()):
            raise HourError(f"{flag} {value!r} is not a number")
    try:
        hour = datetime(*(int(v) for v in parts.values()))
    except ValueError as exc:
        raise HourError(f"-y {args.y} -m {args.m} -d {args.d} -h {args.h} is not a UTC hour: {exc}") from None
    return _ended(hour)


def _ended(hour):
    if hour > hours.last_complete_hour():
        raise HourError(f"{hours.format_hour(hour)} UTC has not ended yet "
                        f"(the last complete UTC hour is {hours.format_hour(hours.last_complete_hour())})")
    return hour


def glassbeam_extract_main(argv=None):
    from .tasks.extract import current_round
    parser = Parser(
        prog="ganymede-glassbeam-extract", add_help=False,
        description="Build (or rebuild) one UTC hour's Glassbeam extract, as ganymede_glassbeam_extract.sh did. "
                    "Without -y -m -d -h: the last complete UTC hour. An hour without agent data delivers "
                    "nothing (unless [extract] deliver_empty).")
    parser.add_argument("--help", action="help", help="show this help and exit")
    parser.add_argument("-y", metavar="YYYY", help="year")
    parser.add_argument("-m", metavar="MM", help="month, 1-12 (leading zero optional)")
    parser.add_argument("-d", metavar="DD", help="day of the month (leading zero optional)")
    parser.add_argument("-h", metavar="HH", help="hour, 0-23 UTC, military time (leading zero optional)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild the hour's extract (round 0) even if it exists; same data gives the same bytes")
    _common(parser)
    args = parser.parse_args(argv)
    args.what = "extract"

    def run():
        hour = _hour_from_parts(args)
        args.what = f"hour {hours.format_hour(hour)}"
        return runs.run_hour(parser.prog, hour, lambda: [
            "GlassbeamExtract", "--hour", hours.format_hour(hour),
            "--round", str(_forget_extract(hour) if args.force else current_round(hour))],
            local_scheduler=args.local_scheduler)

    _pipeline(parser.prog, args, run)


def _forget_extract(hour):
    """--force: set the round-0 manifest aside (renamed) so Luigi builds round 0 again; returns 0."""
    manifest = StateRoot(config.state().root).extract_manifest(hour, 0)
    if os.path.exists(manifest):
        os.replace(manifest, manifest + f".replaced-{hours.now():%Y%m%dT%H%M%S%f}")
    return 0


def hourly_backup_main(argv=None):
    parser = Parser(
        prog="ganymede-hourly-backup",
        description="Run the whole graph for one UTC hour (stage, load, extract, backup), as cron does; or, with "
                    "--catch-up N or --backfill FROM TO, for every hour among them whose deadline has passed and "
                    "that is not closed, oldest first (never the current hour, nor hours nobody was expected for). "
                    "Ends with one line: hour(s), outcome and reason, exit code, duration.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--hour", type=_hour_arg, help="YYYY-MM-DDTHH (default: last complete UTC hour)")
    which.add_argument("--catch-up", type=_positive, metavar="N", help="the not-closed hours among the last N")
    which.add_argument("--backfill", type=_hour_arg, nargs=2, metavar=("FROM", "TO"),
                       help="the not-closed hours FROM..TO (inclusive, YYYY-MM-DDTHH)")
    parser.add_argument("--workers", type=int, default=1, help="Luigi workers (default 1)")
    _common(parser)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.backfill and args.backfill[0] > args.backfill[1]:
        parser.error("--backfill FROM TO: FROM is after TO")
    hour = args.hour or hours.last_complete_hour()

    def one(h):
        return runs.run_hour(parser.prog, h, ["HourlyBackup", "--hour", hours.format_hour(h)], args.workers,
                             args.local_scheduler)

    def several():
        missing = runs.catch_up_hours(args.catch_up, *(args.backfill or ()))
        if not missing:
            return 0, "nothing to run: every hour is closed, idle or before its deadline"
        results = [(h, *one(h)) for h in missing]
        return max(code for _, code, _ in results), "; ".join(
            f"{hours.format_hour(h)} {words} (exit {code})" for h, code, words in results)

    if args.catch_up or args.backfill:
        args.what = (f"catch-up {args.catch_up} h" if args.catch_up else
                     f"backfill {hours.format_hour(args.backfill[0])}..{hours.format_hour(args.backfill[1])}")
        _pipeline(parser.prog, args, several)
    else:
        args.what = f"hour {hours.format_hour(hour)}"
        _pipeline(parser.prog, args, lambda: one(_ended(hour)))
