"""Load: 200 agents at once against ONE `ganymede-api` process, each completing one transaction.

Zero errors and zero lost are the assertions; the latencies of create and
complete (p50/p99, client-side, loopback, a new connection per request as the
agent's urllib makes) are printed on a line starting FIGURES; bench/bench_load.py
runs this test and records that line in BENCHMARKS.md (a test writes no tracked file).
"""
import hashlib
import os
import threading
import time
from contextlib import closing

import pytest

import faultlib as F
from conftest import build_test_archive, sample_rows
from ganymede import hours
from ganymede.paths import StateRoot
from ganymede.stores import txlog

pytestmark = pytest.mark.slow

AGENTS = 200


def listen_overflows():
    """The kernel's count of connections dropped because a listen queue was full (all sockets of the host)."""
    with open("/proc/net/netstat") as f:
        rows = [line.split() for line in f if line.startswith("TcpExt:")]
    return int(dict(zip(rows[0][1:], rows[1][1:])).get("ListenOverflows", 0))


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


@pytest.mark.timeout(240)
def test_200_concurrent_agents_one_api_zero_errors_zero_lost(genv, tmp_path):
    hour = hours.last_complete_hour()
    hour_text = hours.format_hour(hour)
    with closing(genv.mysql()) as conn:
        agents = [(f"load-{i:03d}", txlog.add_agent(conn, f"load-{i:03d}", "load-geo")) for i in range(AGENTS)]
    archives = {}
    for agent_id, _ in agents:
        path = str(tmp_path / "archives" / f"{agent_id}.tar.gz")
        build_test_archive(path, agent_id, "load-geo", hour, sample_rows(hour, 5, agent_tag=agent_id))
        archives[agent_id] = open(path, "rb").read()
    api = F.ApiProcess(genv, tmp_path / "api.log").start()
    start = threading.Barrier(AGENTS, timeout=60)
    latencies = {"create": [], "upload": [], "complete": []}
    errors, done, lock = [], {}, threading.Lock()

    def timed(step, fn, *args):
        began = time.perf_counter()
        reply = fn(*args)
        with lock:
            latencies[step].append(time.perf_counter() - began)
        return reply

    def agent(agent_id, token):
        try:
            start.wait()
            created = timed("create", F.create_transaction, api.port, agent_id, token, hour_text)
            assert created.status == 201, created
            tx = created.json["transaction_id"]
            uploaded = timed("upload", F.upload, api.port, agent_id, token, tx, archives[agent_id])
            assert uploaded.status == 200, uploaded
            completed = timed("complete", F.complete, api.port, agent_id, token, tx)
            assert completed.status == 200 and completed.json["state"] == "completed", completed
            done[agent_id] = tx
        except (AssertionError, OSError) as exc:
            with lock:
                errors.append(f"{agent_id}: {exc!r}"[:300])

    threads = [threading.Thread(target=agent, args=a) for a in agents]
    overflows = listen_overflows()
    began = time.perf_counter()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        wall = time.perf_counter() - began
        overflows = listen_overflows() - overflows
    finally:
        api.stop()

    assert errors == [], f"{len(errors)} agents failed: {errors[:5]}"
    assert len(done) == AGENTS
    with closing(genv.mysql()) as conn, conn.cursor() as cur:
        cur.execute("SELECT agent_id, transaction_id, state, sha256 FROM transactions")
        rows = cur.fetchall()
    assert len(rows) == AGENTS and {r[2] for r in rows} == {"completed"}  # none lost, none twice
    root = StateRoot(genv.root)
    uploads = [p for p in F.tree(os.path.join(genv.root, "upload")) if p.endswith(".tar.gz")]
    assert len(uploads) == AGENTS
    for agent_id, tx, _, sha in rows:
        assert done[agent_id] == tx and sha == hashlib.sha256(archives[agent_id]).hexdigest()
        assert F.sha256_file(root.upload(hour, agent_id, tx)) == sha
    assert F.tree(os.path.join(genv.root, "incoming")) == [] and "Traceback" not in api.log()

    ms = {step: (1000 * percentile(v, 50), 1000 * percentile(v, 99), 1000 * max(v)) for step, v in latencies.items()}
    line = (f"FIGURES {AGENTS} agents, 0 errors, {AGENTS} completed, {len(uploads)} archives in upload/ · "
            + " · ".join(f"{step} p50 {p50:.0f} ms, p99 {p99:.0f} ms (max {top:.0f})"
                         for step, (p50, p99, top) in ms.items())
            + f" · all done in {wall:.1f} s ({AGENTS * 3 / wall:.0f} requests/s) · listen-queue overflows "
            f"during the run: {overflows} (each costs its client a 1 s SYN retry)")
    print("\n" + line)
