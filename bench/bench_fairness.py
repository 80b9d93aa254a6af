#!/usr/bin/env python3
"""Fairness: /healthz and another agent's requests while one agent floods completes of large archives.

One `ganymede-api` at its default limits. The flooding agent uploads N
archives (one per hour, R rows per dataset), then completes all N at once,
each thread retrying a 429 after one second (harder than the real agent,
which waits Retry-After). Meanwhile /healthz and another agent's
GET /v1/transactions/<tx> are timed every 50 ms. The same probes are timed
for a few seconds before the flood as the bare baseline. Target (issue 16):
p99 < 100 ms for both during the flood.

    .venv/bin/python bench/bench_fairness.py                       # 16 completes of 200k rows per dataset
    .venv/bin/python bench/bench_fairness.py --completes 16 --rows 2000
"""
import argparse
import hashlib
import http.client
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import timedelta

import common


def rows_for(hour, n):
    return {
        "account_usage": ([f"acct-{i:07d}", 10_000 * (i + 1), 10 * (i + 1), 100 * i, 50 * i, i * 3] for i in range(n)),
        "api_requests": (["GET", f"/v1/objects/{i}", 200, 100 + i, 4096 * i, 1.5, 9.25] for i in range(n)),
        "node_health": ([f"node-{i:06d}", (hour + timedelta(seconds=i % 3600)).strftime("%Y-%m-%dT%H:%M:%S"),
                         10 ** 12, 10 ** 11, 0.5, i % 3] for i in range(n)),
    }


def call(port, method, path, headers, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))] if values else float("nan")


def probe(port, paths_headers, stop, samples):
    while not stop.is_set():
        for name, path, headers in paths_headers:
            started = time.perf_counter()
            status, _ = call(port, "GET", path, headers)
            samples.setdefault(name, []).append((time.perf_counter() - started) * 1000)
            assert status == 200, (name, status)
        stop.wait(0.05)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--completes", type=int, default=16)
    parser.add_argument("--rows", type=int, default=200_000, help="rows per dataset in each archive")
    parser.add_argument("--baseline-seconds", type=float, default=5)
    args = parser.parse_args()
    common.require_services()
    from ganymede import datasets, hours
    from ganymede.stores import txlog
    from ganymede_agent.archive import build_archive

    world = common.World(prefix="gfair").activate()
    proc = None
    try:
        world.upgrade()
        with closing(world.mysql()) as conn:
            tokens = {a: txlog.add_agent(conn, a, "geo-bench", expected_from=hours.now() - timedelta(days=2))
                      for a in ("flooder", "other")}
        headers = {a: {"Authorization": f"Bearer {t}", "X-Agent-Id": a} for a, t in tokens.items()}
        proc, _ = common.start_api(world)
        port = world.api_port
        last = hours.last_complete_hour()
        _, other = call(port, "POST", "/v1/transactions", headers["other"],
                        json.dumps({"agent_id": "other", "hour": hours.format_hour(last)}))
        txs = []
        for i in range(args.completes):
            hour = last - timedelta(hours=i + 1)
            path = os.path.join(world.base, f"flood-{i}.tar.gz")
            build_archive(path, {"agent_id": "flooder", "geo": "geo-bench", "hour": hours.format_hour(hour),
                                 "agent_version": "bench"},
                          [(name, datasets.CATALOG[name].column_names, rows)
                           for name, rows in sorted(rows_for(hour, args.rows).items())])
            _, tx = call(port, "POST", "/v1/transactions", headers["flooder"],
                         json.dumps({"agent_id": "flooder", "hour": hours.format_hour(hour)}))
            with open(path, "rb") as f:
                data = f.read()
            status, _ = call(port, "PUT", f"/v1/transactions/{tx['transaction_id']}/archive",
                             dict(headers["flooder"], **{"X-Archive-SHA256": hashlib.sha256(data).hexdigest()}), data)
            assert status == 200, status
            txs.append(tx["transaction_id"])
        size_mb = os.path.getsize(path) / 1e6
        probes = [("healthz", "/healthz", {}),
                  ("other agent GET", f"/v1/transactions/{other['transaction_id']}", headers["other"])]

        def timed(seconds_or_event):
            samples, stop = {}, threading.Event()
            thread = threading.Thread(target=probe, args=(port, probes, stop, samples))
            thread.start()
            if isinstance(seconds_or_event, float):
                time.sleep(seconds_or_event)
            else:
                seconds_or_event()
            stop.set()
            thread.join()
            return samples

        refused = []

        def complete(tx):
            while True:
                status, _ = call(port, "POST", f"/v1/transactions/{tx}/complete", headers["flooder"], b"")
                if status != 429:
                    return status
                refused.append(tx)
                time.sleep(1)

        bare = timed(float(args.baseline_seconds))
        started = time.perf_counter()
        with ThreadPoolExecutor(args.completes) as pool:
            statuses = []
            flood = timed(lambda: statuses.extend(pool.map(complete, txs)))
        took = time.perf_counter() - started
        assert statuses == [200] * args.completes, statuses
        lines = [f"{args.completes} completes of {size_mb:.1f} MB archives ({args.rows} rows per dataset) "
                 f"in {took:.1f} s, {len(refused)} answered 429 first"]
        figures = []
        for name, _, _ in probes:
            p99, base99 = percentile(flood[name], 99), percentile(bare[name], 99)
            lines.append(f"{name}: p50 {percentile(flood[name], 50):.1f} ms, p99 {p99:.1f} ms during the flood "
                         f"({len(flood[name])} probes); bare p99 {base99:.1f} ms")
            figures.append(f"{name} p99 {p99:.1f} ms (bare {base99:.1f} ms)")
        print("\n".join(lines))
        common.record(common.command_line(__file__), "fairness: " + ", ".join(figures)
                      + f", during {args.completes} concurrent completes of {size_mb:.1f} MB archives; target < 100 ms")
        print(f"fairness: healthz p99 {percentile(flood['healthz'], 99):.1f} ms, "
              f"other agent p99 {percentile(flood['other agent GET'], 99):.1f} ms (target < 100 ms)")
    finally:
        if proc is not None:
            common.stop_process(proc)
        world.cleanup()


if __name__ == "__main__":
    sys.exit(main())
