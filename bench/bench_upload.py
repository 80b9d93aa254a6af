#!/usr/bin/env python3
"""Upload throughput of ganymede-api against a bare Tornado handler, same machine, same run.

The bare baseline is the least a streaming upload can cost: a
@stream_request_body handler that writes each chunk to a file. ganymede-api
does what production does on top (agent authentication and transaction checks
in MySQL, sha256 while streaming, writes off the event loop, the log update).
Both run as their own processes and receive the same N concurrent uploads of
M MB, sent by this process with sendfile so the client is not the bottleneck;
after one small warm-up round each, the rounds alternate which server goes
first and the best of each counts (medians and CPU seconds per GB are printed
too, since these machines are shared and noisy). The API's peak RSS (VmHWM)
shows uploads are not held in memory.

    bench/bench_upload.py                                  # ~1 min: 20 x 50 MB, 5 rounds
    bench/bench_upload.py --concurrency 50 --size-mb 100   # the issue's figure

Needs the local MariaDB (make services). Prints the ratio last and appends a
line to BENCHMARKS.md.
"""
import argparse
import asyncio
import hashlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from types import SimpleNamespace

from common import bare_tornado_sink, command_line, cpu_seconds, free_port, record, vmhwm_mb  # bench/ is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def wait_port(port, proc, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port} after {timeout}s")


async def put(port, path, headers, payload, size):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"PUT {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {size}\r\nConnection: close\r\n{head}\r\n"
                 .encode())
    with open(payload, "rb") as f:
        await asyncio.get_running_loop().sendfile(writer.transport, f)
    response = await reader.read()
    writer.close()
    status = int(response.split(b" ", 2)[1])
    if status != 200:
        raise SystemExit(f"upload to {path} answered {status}: {response[-300:]!r}")


async def round_(port, requests, payload, size):
    started = time.perf_counter()
    await asyncio.gather(*(put(port, path, headers, payload, size) for path, headers in requests))
    return time.perf_counter() - started


def clean(directory):
    for dirpath, _, names in os.walk(directory):
        for name in names:
            os.remove(os.path.join(dirpath, name))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=20, help="uploads at once (the issue's figure: 50)")
    parser.add_argument("--size-mb", type=int, default=50, help="size of each upload (the issue's figure: 100)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per server; best one counts")
    parser.add_argument("--mysql-host", default="127.0.0.1")
    parser.add_argument("--mysql-port", type=int, default=3306)
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--bare-server", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        return bare_tornado_sink(int(args.bare_server[0]), args.bare_server[1])

    sys.path.insert(0, ROOT)
    from ganymede_agent.archive import sha256_file

    from ganymede import hours
    from ganymede.stores import mysql, txlog

    n, size = args.concurrency, args.size_mb << 20
    work = tempfile.mkdtemp(prefix="bench-upload-", dir=os.environ.get("BENCH_TMP"))
    database = f"gbench_{uuid.uuid4().hex[:8]}"
    cfg = SimpleNamespace(host=args.mysql_host, port=args.mysql_port, user="root", database=database,
                          option_file="", connect_timeout=5)
    procs = []
    try:
        payload = os.path.join(work, "payload.bin")
        with open(payload, "wb") as f:
            block = os.urandom(1 << 20)
            for i in range(args.size_mb):
                f.write(hashlib.sha256(block + i.to_bytes(4, "big")).digest() + block[32:])
        digest = sha256_file(payload)

        mysql.upgrade(cfg)
        hour = hours.last_complete_hour()
        api_requests = []
        with mysql.connect(cfg) as conn:
            for i in range(n):
                agent_id = f"bench-{i:03d}"
                token = txlog.add_agent(conn, agent_id, "bench")
                tx, _ = txlog.create_transaction(conn, agent_id, hour)
                api_requests.append((f"/v1/transactions/{tx['transaction_id']}/archive", {
                    "Authorization": f"Bearer {token}", "X-Agent-Id": agent_id, "X-Archive-SHA256": digest}))

        state = os.path.join(work, "state")
        api_port, bare_port = free_port(), free_port()
        config_path = os.path.join(work, "luigi.cfg")
        with open(config_path, "w") as f:
            f.write(f"[state]\nroot = {state}\n\n[mysql]\nhost = {cfg.host}\nport = {cfg.port}\nuser = root\n"
                    f"database = {database}\n\n[api]\nhost = 127.0.0.1\nport = {api_port}\n"
                    f"max_archive_mb = {args.size_mb + 1}\nmin_free_mb = 256\n\n[core]\nno_configure_logging = true\n")
        api_bin = os.path.join(os.path.dirname(sys.executable), "ganymede-api")
        log = open(os.path.join(work, "api.log"), "w")
        api = subprocess.Popen([api_bin, "--config", config_path], stdout=log, stderr=subprocess.STDOUT,
                               env=dict(os.environ, LUIGI_CONFIG_PATH=config_path))
        procs.append(api)
        sink = os.path.join(work, "bare")
        os.makedirs(sink)
        bare = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--bare-server", str(bare_port), sink])
        procs.append(bare)
        wait_port(api_port, api)
        wait_port(bare_port, bare)

        bare_requests = [(f"/upload/{i}", {}) for i in range(n)]
        servers = {"bare": (bare, bare_port, bare_requests, sink), "api": (api, api_port, api_requests, state)}
        warm = os.path.join(work, "warm.bin")
        with open(warm, "wb") as f:
            f.write(os.urandom(1 << 20))
        warm_sha = sha256_file(warm)
        for name, (proc, port, requests, directory) in servers.items():  # connections, pools, code paths
            asyncio.run(round_(port, [(p, dict(h, **({"X-Archive-SHA256": warm_sha} if h else {})))
                                      for p, h in requests], warm, 1 << 20))
            clean(directory)
        times = {"bare": [], "api": []}
        cpu_used = {"bare": [], "api": []}
        for r in range(args.rounds):
            order = ["bare", "api"] if r % 2 == 0 else ["api", "bare"]  # neither always goes first
            for name in order:
                proc, port, requests, directory = servers[name]
                subprocess.run(["sync"])
                before = cpu_seconds(proc.pid)
                elapsed = asyncio.run(round_(port, requests, payload, size))
                cpu_used[name].append(cpu_seconds(proc.pid) - before)
                times[name].append(elapsed)
                print(f"round {r + 1} {name:4s}: {n * size / elapsed / 1e6:8.1f} MB/s ({elapsed:.2f} s, "
                      f"server CPU {cpu_used[name][-1]:.2f} s)", flush=True)
                clean(directory)

        total, gb = n * size / 1e6, n * size / 1e9
        best = {k: total / min(v) for k, v in times.items()}
        median = {k: total / statistics.median(v) for k, v in times.items()}
        cpu = {k: statistics.median(v) / gb for k, v in cpu_used.items()}
        rss = {"bare": vmhwm_mb(bare.pid), "api": vmhwm_mb(api.pid)}
        ratio, median_ratio = best["api"] / best["bare"], median["api"] / median["bare"]
        print(f"uploads: {n} concurrent x {args.size_mb} MB; best (median) of {args.rounds} rounds")
        for key, name in (("bare", "bare tornado"), ("api", "ganymede-api")):
            print(f"{name}: {best[key]:7.1f} MB/s ({median[key]:.1f})   CPU {cpu[key]:.2f} s/GB   "
                  f"peak RSS {rss[key]:5.1f} MB" + ("  (target < 200 MB)" if key == "api" else ""))
        print(f"ratio api/bare: {ratio:.2f} (median {median_ratio:.2f}; target >= 0.8)")
        if not args.no_record:
            record(command_line(__file__), f"upload {n} x {args.size_mb} MB, best of {args.rounds}: bare {best['bare']:.0f} MB/s, "
                            f"ganymede-api {best['api']:.0f} MB/s (median ratio {median_ratio:.2f}), CPU "
                            f"{cpu['bare']:.2f} vs {cpu['api']:.2f} s/GB, api peak RSS {rss['api']:.0f} MB · "
                            f"ratio {ratio:.2f}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        try:
            with mysql.connect(cfg, database="", autocommit=True) as conn, conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
        except Exception as exc:  # the figure is printed; a leftover database is only worth a note
            print(f"note: could not drop {database}: {exc}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
