#!/usr/bin/env python3
"""Building the backup's S3 client in a fresh process: Ganymede's against a bare boto3 client.

Each hourly backup is a process of its own (cron), so the client is built
from nothing every time: botocore parses its JSON models (endpoints table,
S3 model, rule set) and lists its service directories. Ganymede keeps them
decoded on disk (`ganymede.stores.botomodels`, `[s3] model_cache`).

- bare: `boto3.session.Session().client("s3", endpoint_url=…, config=…)`,
  the same settings as Ganymede's client.
- ganymede: `ganymede.stores.s3.make_client` with a warm model cache (the
  state of every run after the first), and with a cold one (the first run
  after installing or upgrading botocore: it also writes the cache).

Each measurement is a new Python process (imports done before the clock
starts: a Luigi worker has imported them already); rounds alternate and
the median counts. No server is needed: building a client sends nothing.

    .venv/bin/python bench/bench_s3_client.py                 # ~10 s
    .venv/bin/python bench/bench_s3_client.py --rounds 21

Prints the key figure last and appends a line to BENCHMARKS.md.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import common


def child(mode, cache):
    import boto3
    import botocore.config
    from ganymede import config
    from ganymede.s3curl import Credentials
    from ganymede.stores import s3
    cfg = config.s3(endpoint_url=common.S3_ENDPOINT, model_cache=cache)
    started = time.perf_counter()
    if mode == "bare":
        boto3.session.Session().client(
            "s3", endpoint_url=cfg.endpoint_url, aws_access_key_id=common.S3_KEY_ID,
            aws_secret_access_key=common.S3_SECRET,
            config=botocore.config.Config(region_name=cfg.region, s3={"addressing_style": "path"},
                                          signature_version="s3v4",
                                          request_checksum_calculation=cfg.checksum_mode,
                                          response_checksum_validation=cfg.checksum_mode,
                                          retries={"mode": "standard", "max_attempts": 3}))
    else:
        s3.make_client(cfg, Credentials(common.S3_KEY_ID, common.S3_SECRET))
    print(json.dumps({"seconds": time.perf_counter() - started}))


def measure(mode, cache):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, cache],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=common.ROOT))
    if out.returncode != 0:
        raise SystemExit(f"{mode} child failed: {out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11, help="alternating rounds; the median counts")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    base = tempfile.mkdtemp(prefix="gbench-models-")
    try:
        warm = os.path.join(base, "warm")
        measure("ganymede", warm)  # fills it
        times = {"bare": [], "ganymede": [], "cold": []}
        for n in range(args.rounds):
            order = ["bare", "ganymede", "cold"] if n % 2 == 0 else ["cold", "ganymede", "bare"]
            for name in order:
                if name == "cold":
                    cache = os.path.join(base, f"cold-{n}")
                    times[name].append(measure("ganymede", cache))
                    shutil.rmtree(cache, ignore_errors=True)
                else:
                    times[name].append(measure(name, warm if name == "ganymede" else ""))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {name: statistics.median(values) * 1000 for name, values in times.items()}
    ratio = med["bare"] / med["ganymede"]
    figures = (f"S3 client build in a fresh process, median of {args.rounds}: bare boto3 {med['bare']:.1f} ms, "
               f"Ganymede (warm model cache) {med['ganymede']:.1f} ms, (cold cache, writing it) {med['cold']:.1f} ms"
               f" · speed ratio {ratio:.2f}")
    print(figures)
    if not args.no_record:
        common.record(common.command_line(__file__), figures)
    print(f"s3 client: Ganymede vs bare boto3 build speed ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
