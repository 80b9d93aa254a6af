"""`ganymede demo`: one demo hour end to end on the local services (generated GEO stats, the API, the agents,
then the cron command through the demo's own luigid, left up to show the graph).

Every name it uses (databases, buckets, ports, its luigid) comes from a hash of its `--dir`, so two checkouts
never see each other's demo; each run first removes what the previous one of that directory made.
"""
import configparser
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import closing

from . import config, configfile, datasets, generator, hours, markers, runs, status
from .paths import StateRoot
from .stores import mongo, mysql, quality, txlog
from .stores.s3 import bucket_name, connect as s3_connect

GEOS = ("eu-west", "us-east", "ap-south", "eu-north", "us-west", "sa-east")
MONGO_URI = os.environ.get("GANYMEDE_TEST_MONGO_URI", "mongodb://127.0.0.1:27017/")
S3_ENDPOINT = os.environ.get("GANYMEDE_S3_ENDPOINT", "http://127.0.0.1:9000")
API_PORT = 8751  # the default of start_api's callers (bench); the demo itself takes a free port


def _bin(name):
    return os.path.join(os.path.dirname(sys.executable), name)


def names(base):
    """Everything the demo of directory `base` creates, named after that directory."""
    tag = hashlib.sha256(os.path.abspath(base).encode()).hexdigest()[:8]
    return {"db": f"ganymede_demo_{tag}", "bucket_prefix": f"gd-{tag}-"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_demo_config(base, api_port, luigid_port):
    """The demo's own luigi.cfg and a 0600 .s3curl (moto accepts any key pair)."""
    home = os.path.join(base, "home")
    os.makedirs(home, exist_ok=True)
    s3curl = os.path.join(home, ".s3curl")
    with open(os.open(s3curl, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write("%awsSecretAccessKeys = (\n    demo => { id => 'demo-access-key', key => 'demo-secret-key' },\n);\n")
    os.chmod(s3curl, 0o600)
    named = names(base)
    path = os.path.join(base, "luigi.cfg")
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_dict({
        "core": {"scheduler_host": "127.0.0.1", "scheduler_port": luigid_port, "autoload_range": "true"},
        "state": {"root": os.path.join(base, "state"), "log_file": os.path.join(base, "ganymede.log")},
        "mysql": {"host": "127.0.0.1", "port": 3306, "user": "root", "option_file": "",
                  "database": named["db"]},
        "mongodb": {"uri": MONGO_URI, "database": named["db"]},
        "s3": {"endpoint_url": S3_ENDPOINT, "s3curl_path": s3curl, "profile": "demo",
               "bucket_template": named["bucket_prefix"] + "{yyyymmddhh}"},
        "api": {"port": api_port},
        "extract": {"deadline_minutes": 45},
    })
    with open(path, "w") as f:
        parser.write(f)
    return path, home


def stop_own(pid_file, marker):
    """Stop the process a previous demo started (pid file), only if its command line still names `marker`."""
    try:
        pid = int(open(pid_file).read().strip())
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode("utf-8", "replace")
    except (OSError, ValueError):
        if os.path.exists(pid_file):
            os.unlink(pid_file)
        return
    if marker in cmdline:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.1)
    os.unlink(pid_file)


def start_luigid(base):
    """The demo's own luigid (deploy/luigid.cfg, state in <dir>/luigid) on a free port; left running."""
    state = os.path.join(base, "luigid")
    stop_own(os.path.join(base, "luigid.pid"), state)
    shutil.rmtree(state, ignore_errors=True)
    os.makedirs(state)
    repo_cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy", "luigid.cfg")
    cfg = os.path.join(state, "luigid.cfg")
    with open(repo_cfg) as src, open(cfg, "w") as dst:
        dst.write(src.read().replace("/var/lib/ganymede/luigid", state))
    port = free_port()
    proc = launch([_bin("luigid"), "--address", "127.0.0.1", "--port", str(port), "--logdir", state,
                   "--state-path", os.path.join(state, "state.pickle")], dict(os.environ, LUIGI_CONFIG_PATH=cfg),
                  os.path.join(state, "luigid.out"), f"http://127.0.0.1:{port}/api/task_list?data={{}}", state)
    with markers.open_atomic(os.path.join(base, "luigid.pid"), text=True) as f:
        f.write(f"{proc.pid}\n")
    return port


def reset(base):
    """Start from nothing: what the previous demo of this directory made (databases, buckets, state) goes."""
    named = names(base)
    for name in [named["db"]] + [geo_db(base, geo) for geo in GEOS]:
        generator.drop_database(name)
    client, _ = mongo.connect(config.mongodb())
    with closing(client):
        client.drop_database(named["db"])
    store = s3_connect(config.s3())
    for bucket in store.client.list_buckets().get("Buckets", []):
        if bucket["Name"].startswith(named["bucket_prefix"]):
            for key in store.listed(bucket["Name"]):
                store.client.delete_object(Bucket=bucket["Name"], Key=key)
            store.client.delete_bucket(Bucket=bucket["Name"])
    for sub in ("state", "spool", "agents"):
        shutil.rmtree(os.path.join(base, sub), ignore_errors=True)
    os.makedirs(os.path.join(base, "agents"))


def geo_db(base, geo):
    return f"{names(base)['db']}_geo_{geo.replace('-', '_')}"


def start_api(env, log_path, port=API_PORT):
    """`ganymede-api` with `env` (its luigi.cfg must say `port`), once /healthz answers: (process, base URL).

    A process already answering on the port is not ours: refused, never reused.
    """
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        pass
    else:
        raise SystemExit(f"port {port} is taken by a process this run did not start; stop it or choose another port")
    url = f"http://127.0.0.1:{port}"
    return launch([_bin("ganymede-api")], env, log_path, url + "/healthz", None), url


def launch(argv, env, log_path, ready_url, cwd):
    """Start `argv` in its own session, output to `log_path`; return it once `ready_url` answers."""
    log = open(log_path, "ab")
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    name = os.path.basename(argv[0])
    for _ in range(150):
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited {proc.returncode}; see {log_path}")
        try:
            urllib.request.urlopen(ready_url, timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{name} did not answer on {ready_url}; see {log_path}")


def api_metrics_line(url, admin_token):
    """What ganymede-api's /metrics counted in the demo (parsed, as Prometheus reads it)."""
    from prometheus_client.parser import text_string_to_metric_families
    request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {admin_token}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        samples = [s for f in text_string_to_metric_families(resp.read().decode("utf-8")) for s in f.samples]
    uploads, size = (sum(s.value for s in samples if s.name == f"ganymede_api_{name}_total") for name in
                     ("uploads", "upload_bytes"))
    return f"ganymede-api {url}/metrics (admin token): {uploads:g} uploads, {size:g} bytes"


def summary(hour, base, api_port, luigid_port, api_metrics=""):
    root = StateRoot(config.state().root)
    client, db = mongo.connect(config.mongodb())
    with closing(client):
        counts = {name: db[name].count_documents({"hour": hour}) for name in sorted(datasets.CATALOG)}
    manifest = markers.read_json(root.extract_manifest(hour))
    bucket = bucket_name(config.s3().bucket_template, hour)
    objects = s3_connect(config.s3()).list_objects(bucket)
    lines = [f"Demo hour {hours.format_hour(hour)} (UTC) is done.",
             f"MongoDB database {config.mongodb().database}: "
             + ", ".join(f"{k} {v} documents" for k, v in counts.items()),
             f"Extract: {root.extract(hour)} ({sum(manifest['counts'].values())} rows, "
             f"sha256 {manifest['sha256'][:12]}…)",
             f"  delivered to {manifest['delivered_to']}",
             f"Bucket {bucket} at {config.s3().endpoint_url}: {len(objects)} objects"]
    lines += [f"  {o['Key']}  ({o['Size']} bytes)" for o in objects]
    (row,) = runs.hours_rows(hour, hour)
    with closing(mysql.connect(config.mysql())) as conn:
        checks = quality.hour_results(conn, hour)
    config_path = os.path.join(base, "luigi.cfg")
    lines += [f"Archives moved to {os.path.join(root.root, 'archives')}",
              f"Status (`ganymede --config {config_path} status`): {row.line()}",
              f"Status page: ganymede-api --config {config_path}, then http://127.0.0.1:{api_port}/status "
              f"(user admin, password from `ganymede --config {config_path} admin-token NAME`)",
              f"Dependency graph (the demo's own luigid, still running): "
              f"{status.graph_url(f'http://127.0.0.1:{luigid_port}', hour)}",
              f"Quality checks of the hour ({len(checks)}, {sum(not c.passed for c in checks)} failed; "
              f"`ganymede --config {config_path} status --hour {hours.format_hour(hour)}`):"]
    lines += status.quality_lines(checks)
    lines += ["Metrics:", f"  {api_metrics}" if api_metrics else "  ganymede-api /metrics (admin token)",
              f"  pipeline textfile for node_exporter: {config.metrics().textfile or root.metrics_textfile()}",
              "  dashboard deploy/grafana-dashboard.json, alerting rules deploy/prometheus-rules.yml"]
    return "\n".join(lines)


def main(args):
    base = os.path.abspath(args.dir)
    if args.stop:
        stop_own(os.path.join(base, "luigid.pid"), os.path.join(base, "luigid"))
        return 0
    os.makedirs(base, exist_ok=True)
    luigid_port = start_luigid(base)
    api_port = free_port()
    cfg_path, home = write_demo_config(base, api_port, luigid_port)
    env = dict(os.environ, LUIGI_CONFIG_PATH=cfg_path, HOME=home)
    configfile.use(cfg_path)
    hour = hours.last_complete_hour()
    print(f"Ganymede demo: hour {hours.format_hour(hour)} UTC, {args.agents} agents, state in {base}")
    reset(base)
    mysql.upgrade(config.mysql())
    api, url = start_api(env, os.path.join(base, "api.log"), api_port)
    try:
        for n, geo in enumerate(GEOS[: args.agents]):
            agent_id = f"demo-{geo}"
            with closing(mysql.connect(config.mysql())) as conn:
                token = txlog.add_agent(conn, agent_id, geo, expected_from=hour)
            with closing(generator.create_database(geo_db(base, geo))) as conn:
                generator.generate_hour(conn, hour, seed=n)
            agent_cfg = generator.write_agent_config(
                os.path.join(base, "agents", f"{agent_id}.cfg"), api_url=url, agent_id=agent_id, token=token,
                geo=geo, database=geo_db(base, geo), spool_dir=os.path.join(base, "spool", agent_id))
            subprocess.run([_bin("ganymede-agent"), "--config", agent_cfg, "--hour", hours.format_hour(hour)],
                           env=env, check=True)
        argv = [_bin("ganymede-hourly-backup"), "--hour", hours.format_hour(hour), "--workers", "2"]
        argv += ["--local-scheduler"] if args.local_scheduler else []
        print("$ " + " ".join(["ganymede-hourly-backup", *argv[1:]]), flush=True)
        code = subprocess.run(argv, env=env).returncode
        if code != 0:
            print(f"ganymede demo: the pipeline exited {code}; details in {os.path.join(base, 'ganymede.log')}",
                  file=sys.stderr)
            return code
        with closing(mysql.connect(config.mysql())) as conn:
            api_metrics = api_metrics_line(url, txlog.add_admin_token(conn, f"demo-metrics-{time.time_ns()}"))
    finally:
        api.terminate()
        api.wait(10)
    print(summary(hour, base, api_port, luigid_port, api_metrics))
    return 0
