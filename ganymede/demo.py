"""`ganymede demo`: one demo hour end to end on the local services.

Three demo GEOs get generated stats in their own MariaDB databases; the API
runs as a subprocess; each agent collects its hour and uploads it; then the
cron command itself (`luigi --module ganymede.tasks HourlyBackup --hour H`)
runs the whole graph through luigid. The demo owns `--dir` (config, state,
spools) and the `ganymede_demo*` databases, and starts from scratch each time.
"""
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import closing

from . import config, datasets, generator, hours, markers, status
from .paths import StateRoot
from .stores import mongo, mysql, txlog
from .stores.s3 import bucket_name, connect as s3_connect
from .tasks import HourlyBackup

DEMO_DB = "ganymede_demo"
GEOS = ("eu-west", "us-east", "ap-south", "eu-north", "us-west", "sa-east")
MONGO_URI = os.environ.get("GANYMEDE_TEST_MONGO_URI", "mongodb://127.0.0.1:27017/")
S3_ENDPOINT = os.environ.get("GANYMEDE_S3_ENDPOINT", "http://127.0.0.1:9000")
API_PORT = 8751


def _bin(name):
    return os.path.join(os.path.dirname(sys.executable), name)


def write_demo_config(base):
    """The demo's own luigi.cfg and a 0600 .s3curl (moto accepts any key pair)."""
    home = os.path.join(base, "home")
    os.makedirs(home, exist_ok=True)
    s3curl = os.path.join(home, ".s3curl")
    with open(os.open(s3curl, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write("%awsSecretAccessKeys = (\n    demo => { id => 'demo-access-key', key => 'demo-secret-key' },\n);\n")
    os.chmod(s3curl, 0o600)
    path = os.path.join(base, "luigi.cfg")
    with open(path, "w") as f:
        f.write(f"""[core]
scheduler_host = 127.0.0.1
scheduler_port = {os.environ.get("GANYMEDE_LUIGID_PORT", "8082")}
autoload_range = true
[retcode]
already_running = 10
missing_data = 20
not_run = 25
task_failed = 30
scheduling_error = 35
unhandled_exception = 40
[state]
root = {os.path.join(base, "state")}
[mysql]
host = 127.0.0.1
port = 3306
user = root
option_file =
database = {DEMO_DB}
[mongodb]
uri = {MONGO_URI}
database = {DEMO_DB}
[s3]
endpoint_url = {S3_ENDPOINT}
s3curl_path = {s3curl}
profile = demo
bucket_template = ganymede-demo-{{yyyymmddhh}}
[api]
port = {API_PORT}
[extract]
deadline_minutes = 45
""")
    return path, home


def reset(base, agents):
    """Start from nothing: the demo's databases, Mongo database and state are removed."""
    with closing(generator.connect()) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{DEMO_DB}`")
    for geo in GEOS[:agents]:
        generator.drop_database(geo_db(geo))
    client, _ = mongo.connect(config.mongodb())
    with closing(client):
        client.drop_database(DEMO_DB)
    for sub in ("state", "spool", "agents"):
        shutil.rmtree(os.path.join(base, sub), ignore_errors=True)
    os.makedirs(os.path.join(base, "agents"))


def geo_db(geo):
    return f"{DEMO_DB}_geo_{geo.replace('-', '_')}"


def start_api(env, log_path, port=API_PORT):
    """`ganymede-api` with `env` (its luigi.cfg must say `port`), once /healthz answers: (process, base URL)."""
    log = open(log_path, "ab")
    proc = subprocess.Popen([_bin("ganymede-api")], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        if proc.poll() is not None:
            raise SystemExit(f"ganymede-api exited {proc.returncode}; see {log_path}")
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"ganymede-api did not answer on {url}; see {log_path}")


def summary(hour, base):
    root = StateRoot(config.state().root)
    client, db = mongo.connect(config.mongodb())
    with closing(client):
        counts = {name: db[name].count_documents({"hour": hour}) for name in sorted(datasets.CATALOG)}
    manifest = markers.read_json(root.extract_manifest(hour))
    bucket = bucket_name(config.s3().bucket_template, hour)
    objects = s3_connect(config.s3()).list_objects(bucket)
    lines = [f"Demo hour {hours.format_hour(hour)} (UTC) is done.",
             "MongoDB database %s: %s" % (DEMO_DB, ", ".join(f"{k} {v} documents" for k, v in counts.items())),
             f"Extract: {root.extract(hour)} ({sum(manifest['counts'].values())} rows, sha256 {manifest['sha256'][:12]}…)",
             f"  delivered to {manifest['delivered_to']}",
             f"Bucket {bucket} at {config.s3().endpoint_url}: {len(objects)} objects"]
    lines += [f"  {o['Key']}  ({o['Size']} bytes)" for o in objects]
    with closing(mysql.connect(config.mysql())) as conn:
        (row,) = status.hours_status(conn, root, hour, hour, config.extract().deadline_minutes,
                                     config.alerts().overdue_minutes)
    lines += [f"Archives moved to {os.path.join(root.root, 'archives')}",
              f"Status (`ganymede status`): {row.line()}",
              f"Status page: LUIGI_CONFIG_PATH={os.path.join(base, 'luigi.cfg')} ganymede-api, then "
              f"http://127.0.0.1:{API_PORT}/status (user admin, password from `ganymede admin-token NAME`)",
              f"Dependency graph: http://127.0.0.1:{os.environ.get('GANYMEDE_LUIGID_PORT', '8082')}"
              f"/static/visualiser/index.html#tab=graph&taskId={HourlyBackup(hour=hour).task_id}"]
    return "\n".join(lines)


def main(args):
    base = os.path.abspath(args.dir)
    cfg_path, home = write_demo_config(base)
    env = dict(os.environ, LUIGI_CONFIG_PATH=cfg_path, HOME=home)
    os.environ.update(LUIGI_CONFIG_PATH=cfg_path)
    from luigi.configuration import add_config_path
    add_config_path(cfg_path)
    hour = hours.last_complete_hour()
    print(f"Ganymede demo: hour {hours.format_hour(hour)} UTC, {args.agents} agents, state in {base}")
    reset(base, args.agents)
    mysql.upgrade(config.mysql())
    api, url = start_api(env, os.path.join(base, "api.log"))
    try:
        for n, geo in enumerate(GEOS[: args.agents]):
            agent_id = f"demo-{geo}"
            with closing(mysql.connect(config.mysql())) as conn:
                token = txlog.add_agent(conn, agent_id, geo, expected_from=hour)
            with closing(generator.create_database(geo_db(geo))) as conn:
                generator.generate_hour(conn, hour, seed=n)
            agent_cfg = generator.write_agent_config(
                os.path.join(base, "agents", f"{agent_id}.cfg"), api_url=url, agent_id=agent_id, token=token, geo=geo, database=geo_db(geo),
                spool_dir=os.path.join(base, "spool", agent_id))
            subprocess.run([_bin("ganymede-agent"), "--config", agent_cfg, "--hour", hours.format_hour(hour)],
                           env=env, check=True)
        argv = [_bin("luigi"), "--module", "ganymede.tasks", "HourlyBackup", "--hour", hours.format_hour(hour),
                "--workers", "2", "--log-level", "INFO"] + (["--local-scheduler"] if args.local_scheduler else [])
        print("$ luigi " + " ".join(argv[1:]))
        code = subprocess.run(argv, env=env).returncode
        if code != 0:
            print(f"ganymede demo: the pipeline exited {code}", file=sys.stderr)
            return code
    finally:
        api.terminate()
        api.wait(10)
    print(summary(hour, base))
    return 0
