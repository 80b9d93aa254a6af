#!/usr/bin/env python3
"""Run every benchmark in bench/ with its default sizes, then rewrite the table at the top of BENCHMARKS.md.

Each bench runs as its own process, one after the other (they share the
services and the machine), prints its key figure last and appends its line to
BENCHMARKS.md itself. Before each one the MongoDB and S3 test servers are
restarted when `scripts/services` started them (`--keep-servers`: not): both
keep everything in memory and slow down as they grow (nx-27017 was 1.4 GB
after the benches before the busy hour), so without it a figure would depend
on which benches ran before it. Each bench still measures its baselines in
the same run on the same servers as Ganymede. This command collects those
outputs and rewrites only the "latest figures vs targets" table at the top of
BENCHMARKS.md (the runs' lines below it are kept), marking each target met or
MISSED. A figure whose bench was not run this time keeps its previous row.

    .venv/bin/python bench/run_all.py                    # everything, default sizes: ~20-30 min on 2 cores
    .venv/bin/python bench/run_all.py --only busy_hour scheduling
    .venv/bin/python bench/run_all.py --scale 10         # the busy hour also at 10x the rows

Needs the services (make services). The full outputs go to $BENCH_LOGS
(default /tmp/ganymede-bench-logs) and a summary is printed at the end.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import common

BENCHES = ("agent", "upload", "worker", "extract", "backup", "busy_hour", "scheduling", "tools", "fairness")
BEGIN, END = "<!-- latest-figures:begin -->", "<!-- latest-figures:end -->"
LOG_DIR = os.environ.get("BENCH_LOGS") or os.path.join(tempfile.gettempdir(), "ganymede-bench-logs")


def num(pattern, text, group=1, how=max):
    found = [float(m.group(group)) for m in re.finditer(pattern, text)]
    return how(found) if found else None


def row(name, value, target, ok, source):
    """One table row: figure, latest value, target, met/MISSED, bench."""
    if value is None:
        return {"name": name, "latest": "not measured", "target": target, "status": "—", "bench": source}
    return {"name": name, "latest": value, "target": target, "status": "met" if ok else "**MISSED**",
            "bench": source}


def ratio_row(name, value, target, source, at_least=True, fmt="{:.2f}"):
    if value is None:
        return row(name, None, target, False, source)
    return row(name, fmt.format(value), target, value >= float(target.split()[-1]) if at_least
               else value <= float(target.split()[-1]), source)


def rss_row(name, mb, source, limit=300):
    return row(name, None if mb is None else f"{mb:.0f} MB", f"< {limit} MB", mb is not None and mb < limit, source)


# --- what each bench prints (parsed, never changed) ---------------------------------------

def parse(name, out):
    if name == "agent":
        return [ratio_row("agent archive build (rows/s, one core, plain tarfile + gzip)",
                          num(r"agent archive build at \S+ rows: ([\d.]+) rows/s", out), ">= 150000", "bench_agent.py",
                          fmt="{:,.0f}"),
                rss_row("agent peak RSS (archive build)", num(r"peak RSS ([\d.]+) MB", out), "bench_agent.py", limit=100)]
    if name == "upload":
        return [ratio_row("upload: ganymede-api vs bare Tornado (MB/s ratio)",
                          num(r"ratio api/bare: ([\d.]+)", out), ">= 0.8", "bench_upload.py"),
                rss_row("ganymede-api peak RSS (concurrent uploads)",
                        num(r"ganymede-api:.*peak RSS\s+([\d.]+) MB", out), "bench_upload.py")]
    if name == "worker":
        return [ratio_row("staging: StageTransaction vs bare LOAD DATA (rows/s ratio)",
                          num(r"ratios: staging ([\d.]+)", out), ">= 0.8", "bench_worker.py"),
                ratio_row("MongoDB load: LoadTransaction vs bare bulk_write (docs/s ratio)",
                          num(r"MongoDB load ([\d.]+)", out), ">= 0.8", "bench_worker.py"),
                rss_row("worker peak RSS (stage / load)", num(r"peak RSS (?:\S+ rows )?([\d.]+) MB", out),
                        "bench_worker.py")]
    if name == "extract":
        return [ratio_row("extract: GlassbeamExtract vs bare find+json+gzip (docs/s ratio)",
                          num(r"extract ratio ([\d.]+)", out), ">= 0.8", "bench_extract.py"),
                rss_row("extract peak RSS", num(r"peak RSS ([\d.]+) MB -> ([\d.]+) MB", out, 2), "bench_extract.py")]
    if name == "backup":
        m = re.search(r"backup speed vs fastest tool \((\w+)\) ([\d.]+) \(target >= 0.9; start-up excluded, "
                      r"with it ([\d.]+)\); peak RSS ([\d.]+) MB", out)
        rows = [ratio_row("hourly backup as a process vs fastest of s5cmd / rclone (speed ratio; verifies, they don't)",
                          float(m.group(2)) if m else None, ">= 0.9", "bench_backup.py"),
                rss_row("backup peak RSS", float(m.group(4)) if m else None, "bench_backup.py")]
        if m:
            rows[0]["latest"] += f" (vs {m.group(1)}; with start-up {m.group(3)})"
        return rows
    if name == "busy_hour":
        rows = [ratio_row("busy hour (20 agents x 5,000 rows) / sum of bare stages",
                          num(r"busy hour ratio ([\d.]+)", out), "<= 1.25", "bench_busy_hour.py", at_least=False),
                rss_row("busy hour peak RSS (api, luigi worker, agent)",
                        num(r"busy hour ratio [^;]*; peak RSS ([\d.]+) MB", out), "bench_busy_hour.py")]
        scale = re.search(r"10x/1x time ([\d.]+)", out)
        if scale:  # opt-in (--scale 10): without it the previous row stays
            rows.append(ratio_row("10x rows: busy hour time 10x / 1x", float(scale.group(1)), "<= 10.5",
                                  "bench_busy_hour.py --scale 10", at_least=False))
            rows.append(rss_row("busy hour peak RSS at 10x rows", num(r"peak RSS at 10x ([\d.]+) MB", out),
                                "bench_busy_hour.py --scale 10"))
        return rows
    if name == "scheduling":
        seconds = num(r"scheduling \d+ transactions: ([\d.]+) s", out)
        bare = num(r"bare Luigi graph ([\d.]+) s", out)
        r = row("1,000 tiny transactions scheduled and completed through luigid",
                None if seconds is None else f"{seconds:.1f} s", "< 60 s", seconds is not None and seconds < 60,
                "bench_scheduling.py")
        if seconds is not None and bare is not None:
            r["latest"] += f" (bare Luigi graph of the same shape {bare:.1f} s)"
        return [r]
    if name == "tools":
        staging = num(r"staging vs mysqlimport ([\d.]+)", out)
        r = row("staging: StageTransaction vs `mysqlimport --local` (speed ratio)",
                None if staging is None else f"{staging:.2f}", "(no target; bare ratio above)", True, "bench_tools.py")
        if staging is not None:
            r["status"] = "info"
        return [r]
    if name == "fairness":
        healthz = num(r"fairness: healthz p99 ([\d.]+) ms", out)
        other = num(r"other agent p99 ([\d.]+) ms", out)
        worst = None if healthz is None or other is None else max(healthz, other)
        r = ratio_row("fairness: worst p99 of /healthz and another agent's GET during 16 large completes (ms)",
                      worst, "<= 100", "bench_fairness.py", at_least=False, fmt="{:.1f}")
        return [r]
    return []


# --- BENCHMARKS.md -------------------------------------------------------------------------

def read_table(text):
    """{figure: row} from the current table, to keep rows of benches not run this time."""
    rows = {}
    if BEGIN in text and END in text:
        for line in text.split(BEGIN, 1)[1].split(END, 1)[0].splitlines():
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            if len(cells) == 5 and cells[0] not in ("figure", "---") and not set(cells[0]) <= {"-"}:
                rows[cells[0]] = dict(zip(("name", "latest", "target", "status", "bench"), cells))
    return rows


def write_table(rows, path=common.BENCHMARKS_MD):
    text = open(path).read() if os.path.exists(path) else ""
    produced = {r["bench"] for r in rows}  # a bench run this time replaces all of its rows
    previous = {n: r for n, r in read_table(text).items() if r["bench"] not in produced}
    merged = dict(previous)
    merged.update({r["name"]: r for r in rows})
    first = [r["name"] for r in rows] + [n for n in previous if n not in {r["name"] for r in rows}]

    def rank(name):  # benches in BENCHES order, a bench's rows in the order it reports them
        bench = merged[name]["bench"].split()[0]
        known = [f"bench_{b}.py" for b in BENCHES]
        return (known.index(bench) if bench in known else len(known), first.index(name))
    order = sorted(first, key=rank)
    table = [BEGIN,
             f"Latest figures vs targets (rewritten by `bench/run_all.py`, last run {common.now_utc()} on "
             f"{common.machine()}; each figure's own line, with its exact command, is in the runs below):",
             "",
             "| figure | latest | target | status | bench |",
             "|---|---|---|---|---|"]
    cell = lambda text: str(text).replace("|", "\\|")
    table += ["| " + " | ".join(cell(merged[n][k]) for k in ("name", "latest", "target", "status", "bench")) + " |"
              for n in order]
    table.append(END)
    block = "\n".join(table)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        body = text
        if body.startswith("# Benchmarks"):
            body = body.split("\n", 1)[1] if "\n" in body else ""
        text = ("# Benchmarks\n\n" + block + "\n\n## Runs\n\nOne line per run, appended by the commands in "
                "`bench/` (date, machine, exact command, figures).\n\n" + body.lstrip("\n"))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --- running ---------------------------------------------------------------------------------

def fresh_test_servers():
    """Restart the MongoDB and S3 test servers if scripts/services started them (else they are left alone)."""
    done = subprocess.run([sys.executable, os.path.join(common.ROOT, "scripts", "services"), "restart", "mongodb", "s3"],
                          capture_output=True, text=True, cwd=common.ROOT)
    print("\n" + " · ".join(line for line in done.stdout.splitlines() if "not restarted" in line or "started on" in line),
          flush=True)
    if done.returncode != 0:
        raise SystemExit(f"restarting the test servers failed:\n{done.stdout}{done.stderr}")
    common.require_services()


def run_bench(name, extra, log_path):
    """Run one bench, echoing its output; (exit code, output, seconds)."""
    argv = [sys.executable, os.path.join(common.HERE, f"bench_{name}.py"), *extra]
    print(f"\n=== {' '.join(['.venv/bin/python', f'bench/bench_{name}.py', *extra])}", flush=True)
    started = time.perf_counter()
    lines = []
    with open(log_path, "w") as log, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                       text=True, cwd=common.ROOT, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            lines.append(line)
    return proc.returncode, "".join(lines), time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=BENCHES, help="run just these")
    parser.add_argument("--skip", nargs="+", choices=BENCHES, default=[], help="run all but these")
    parser.add_argument("--scale", type=int, default=1, help="passed to bench_busy_hour.py (10: the 10x hour too)")
    parser.add_argument("--keep-servers", action="store_true",
                        help="do not restart the MongoDB and S3 test servers before each bench")
    parser.add_argument("--no-record", action="store_true",
                        help="pass --no-record to every bench and leave BENCHMARKS.md alone")
    parser.add_argument("--from-logs", metavar="STAMP",
                        help="run nothing: rewrite the table from the logs of an earlier run (e.g. 20261130T0857)")
    args = parser.parse_args()
    if args.from_logs:
        rows = []
        for name in (args.only or BENCHES):
            path = os.path.join(LOG_DIR, f"{args.from_logs}-{name}.log")
            if os.path.exists(path) and name not in args.skip:
                rows += parse(name, open(path).read())
        write_table(rows)
        print("\n".join(f"{r['name']}: {r['latest']} (target {r['target']}) {r['status']}" for r in rows))
        return 0
    common.require_services()
    os.makedirs(LOG_DIR, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M")
    names = [n for n in (args.only or BENCHES) if n not in args.skip]
    rows, summary = [], []
    for name in names:
        extra = ["--scale", str(args.scale)] if name == "busy_hour" and args.scale > 1 else []
        extra += ["--no-record"] if args.no_record else []
        log_path = os.path.join(LOG_DIR, f"{stamp}-{name}.log")
        if not os.path.exists(os.path.join(common.HERE, f"bench_{name}.py")):
            summary.append((name, "missing", f"bench/bench_{name}.py does not exist", 0.0))
            continue
        if not args.keep_servers:
            fresh_test_servers()
        code, out, seconds = run_bench(name, extra, log_path)
        last = next((line for line in reversed(out.splitlines()) if line.strip()), "")
        if code != 0:
            summary.append((name, f"FAILED (exit {code})", last, seconds))
            failed = parse(name, "")
            for r in failed:
                r.update(latest=f"bench failed (exit {code}), see {log_path}",
                         status="**MISSED**")
            rows += failed
            continue
        summary.append((name, "ok", last, seconds))
        rows += parse(name, out)
    if not args.no_record:
        write_table(rows)
    print("\n=== summary")
    for name, status, last, seconds in summary:
        print(f"{name:11} {status:16} {seconds:7.0f} s  {last}")
    print()
    width = max((len(r["name"]) for r in rows), default=10)
    for r in rows:
        print(f"{r['name']:{width}}  {r['latest']:>14}  target {r['target']:10}  {r['status']}")
    missed = [r for r in rows if "MISSED" in r["status"]]
    print(f"\n{len(rows) - len(missed)} of {len(rows)} figures meet their targets; missed: "
          + (", ".join(r["name"] for r in missed) or "none"))
    return 1 if any(status.startswith("FAILED") for _, status, _, _ in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
