#!/usr/bin/env python3
"""Upload MB/s of HourlyBackup's upload step against a bare boto3 upload_file, same files, same server, same run.

HourlyBackup's upload step is `ganymede.tasks.backup.upload_plan`: a listing
of the bucket (skip what is already verified), for each object a sha256 of
the file (and its MD5, or its multipart CRC32), one PutObject with SHA-256
and Content-MD5 or, above [s3] multipart_threshold_mb (here the defaults of
ganymede.config), boto3's managed transfer with CRC32 per part; then one
listing that verifies the single-part copies by size and ETag and a HEAD
for the multipart one (its checksum over its parts recomputed from the
file), then MANIFEST.json. The bare baseline
is `boto3.client("s3").upload_file` of the same files with boto3's defaults.
Both write into a fresh bucket on the same S3 test server; each measurement
runs in its own process (timed from the inside) whose peak RSS (VmHWM) is
reported; rounds alternate and the best of each counts, since these machines
are shared. Two sizes of the large file show memory does not grow with it.

    .venv/bin/python bench/bench_backup.py                        # ~1 min: 8 x 2 MB + one 96 / 192 MB file
    .venv/bin/python bench/bench_backup.py --large-mb 80 --small-large-mb 40 --rounds 2   # quick look

Needs the S3 test server (make services); moto keeps objects in memory, so
every bucket is emptied and removed right after its measurement. Prints the
key figure last and appends a line to BENCHMARKS.md.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from common import command_line, record, vmhwm_mb  # noqa: E402
MIB = 1024 * 1024
KEY_ID, SECRET = "bench", "bench-secret"


def write_files(directory, small_count, small_mb, large_mb):
    """small_count files of small_mb and one of large_mb, random bytes, written in 1 MiB blocks."""
    os.makedirs(directory, exist_ok=True)
    plan = {}
    for i in range(small_count):
        plan[f"archives/bench-{i:02d}/tx-{i:04d}.tar.gz"] = (os.path.join(directory, f"small-{i}"), small_mb)
    plan["mysql/ganymede.sql.gz"] = (os.path.join(directory, "large"), large_mb)
    for path, mb in plan.values():
        with open(path, "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(MIB))
    return {key: path for key, (path, _) in sorted(plan.items())}


def child(mode, endpoint, bucket, plan_path, manifest_path):
    import boto3
    plan = json.load(open(plan_path))
    if mode == "ganymede":
        from ganymede import config
        from ganymede.s3curl import Credentials
        from ganymede.stores.s3 import make_client
        from ganymede.tasks.backup import upload_plan
        store = make_client(config.s3(endpoint_url=endpoint), Credentials(KEY_ID, SECRET))
        started = time.perf_counter()
        listing = upload_plan(store, bucket, plan, manifest_path)
        seconds = time.perf_counter() - started
        assert {o["action"] for o in listing} == {"uploaded"}, listing
    else:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)
        started = time.perf_counter()
        for key, path in plan.items():
            client.upload_file(path, bucket, key)
        seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "vmhwm_mb": vmhwm_mb()}))


def admin_client(endpoint):
    import boto3
    import botocore.config
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY_ID,
                        aws_secret_access_key=SECRET,
                        config=botocore.config.Config(s3={"addressing_style": "path"}))


def drop_bucket(client, bucket):
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    client.delete_bucket(Bucket=bucket)


def measure(args, work, size_label, plan):
    """Alternating rounds of bare and ganymede uploads of `plan`; the best of each."""
    client = admin_client(args.endpoint)
    plan_path = os.path.join(work, f"plan-{size_label}.json")
    with open(plan_path, "w") as f:
        json.dump(plan, f)
    total_mb = sum(os.path.getsize(p) for p in plan.values()) / MIB
    best = {}
    for r in range(args.rounds):
        for mode in ("bare", "ganymede"):
            bucket = f"gbench-{uuid.uuid4().hex[:10]}"
            client.create_bucket(Bucket=bucket)
            try:
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, args.endpoint, bucket,
                                      plan_path, os.path.join(work, "MANIFEST.json")],
                                     capture_output=True, text=True, env=os.environ)
            finally:
                drop_bucket(client, bucket)
            if out.returncode != 0 or not out.stdout.strip():
                raise SystemExit(f"{mode} child failed ({out.returncode}):\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["mb_s"] = total_mb / result["seconds"]
            if mode not in best or result["mb_s"] > best[mode]["mb_s"]:
                best[mode] = result
            print(f"{size_label:5} round {r + 1} {mode:8} {result['mb_s']:7.1f} MB/s ({total_mb:.0f} MB in "
                  f"{result['seconds']:.2f} s, peak RSS {result['vmhwm_mb']:.0f} MB)", flush=True)
    return best, total_mb


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large-mb", type=int, default=192, help="the multipart file of the main figure")
    parser.add_argument("--small-large-mb", type=int, default=96, help="the multipart file of the RSS comparison")
    parser.add_argument("--small-count", type=int, default=8, help="small files beside it")
    parser.add_argument("--small-mb", type=int, default=2, help="size of each small file")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per size; the best one counts")
    parser.add_argument("--endpoint", default=os.environ.get("GANYMEDE_S3_ENDPOINT", "http://127.0.0.1:9000"))
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--child", nargs=5, metavar=("MODE", "ENDPOINT", "BUCKET", "PLAN", "MANIFEST"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    work = tempfile.mkdtemp(prefix="bench-backup-", dir=os.environ.get("BENCH_TMP"))
    config_path = os.path.join(work, "luigi.cfg")
    with open(config_path, "w") as f:  # ganymede's [s3] defaults, this server
        f.write(f"[s3]\nendpoint_url = {args.endpoint}\n\n[core]\nno_configure_logging = true\n")
    os.environ["LUIGI_CONFIG_PATH"] = config_path
    try:
        results = {}
        for label, large_mb in (("small", args.small_large_mb), ("large", args.large_mb)):
            plan = write_files(os.path.join(work, label), args.small_count, args.small_mb, large_mb)
            results[label] = measure(args, work, label, plan)
            shutil.rmtree(os.path.join(work, label))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    (small, small_mb), (large, large_mb) = results["small"], results["large"]
    ratio = large["ganymede"]["mb_s"] / large["bare"]["mb_s"]
    small_ratio = small["ganymede"]["mb_s"] / small["bare"]["mb_s"]
    figures = (f"{args.small_count} x {args.small_mb} MB + {args.large_mb} MB ({large_mb:.0f} MB): bare upload_file "
               f"{large['bare']['mb_s']:.1f} MB/s, HourlyBackup upload step {large['ganymede']['mb_s']:.1f} MB/s, "
               f"ratio {ratio:.2f} (with a {args.small_large_mb} MB file: {small_ratio:.2f}) · peak RSS upload step "
               f"{small['ganymede']['vmhwm_mb']:.0f} MB with {small_mb:.0f} MB, {large['ganymede']['vmhwm_mb']:.0f} MB "
               f"with {large_mb:.0f} MB (bare {small['bare']['vmhwm_mb']:.0f} / {large['bare']['vmhwm_mb']:.0f} MB)")
    if not args.no_record:
        record(command_line(__file__), f"best of {args.rounds} · {figures}")
    print(figures)
    print(f"backup upload ratio {ratio:.2f} (target >= 0.8); peak RSS {small['ganymede']['vmhwm_mb']:.0f} MB -> "
          f"{large['ganymede']['vmhwm_mb']:.0f} MB for {large_mb / small_mb:.1f}x the bytes")


if __name__ == "__main__":
    sys.exit(main())
