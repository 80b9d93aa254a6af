"""The sections of luigi.cfg, one luigi.Config class each, named as the section (like Luigi's `core`).

No secret here: MySQL passwords come from an option file, S3 keys from .s3curl, agent tokens hashed in MySQL.
"""
import luigi


class state(luigi.Config):
    root = luigi.Parameter(default="/var/lib/ganymede",
                           description="State root: upload/, archives/, quarantine/, state/, extracts/, backup/")
    log_file = luigi.Parameter(default="",
                               description="Where pipeline commands write their details (timestamps, tracebacks); "
                                           "empty: <root>/log/ganymede.log. [core] logging_conf_file wins if set")


class metrics(luigi.Config):
    textfile = luigi.Parameter(default="",
                               description="The pipeline's Prometheus metrics file, for node_exporter's textfile "
                                           "collector; empty: <root>/metrics/ganymede.prom")


class mysql(luigi.Config):
    host = luigi.Parameter(default="127.0.0.1", description="MySQL/MariaDB host")
    port = luigi.IntParameter(default=3306, description="MySQL/MariaDB port")
    user = luigi.Parameter(default="root", description="MySQL user")
    database = luigi.Parameter(default="ganymede", description="Schema holding agents, transactions and staging")
    option_file = luigi.Parameter(default="",
                                  description="my.cnf-style file with the password ([client] section); empty: none")
    connect_timeout = luigi.IntParameter(default=5, description="Seconds to wait for a connection")
    tls = luigi.BoolParameter(default=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                              description="Encrypt and verify the MySQL connection (a remote server); off on loopback")
    tls_ca = luigi.Parameter(default="", description="PEM CA bundle for tls = true; empty: the system's")


class mongodb(luigi.Config):
    uri = luigi.Parameter(default="mongodb://127.0.0.1:27017/",
                          description="MongoDB connection URI (no credentials here; use a URI file in production)")
    database = luigi.Parameter(default="ganymede", description="Database holding one collection per dataset")
    batch_size = luigi.IntParameter(default=2000, description="Documents per bulk write and per staged-row batch")


class s3(luigi.Config):
    endpoint_url = luigi.Parameter(default="http://127.0.0.1:9000", description="S3 API endpoint of Cloud Files")
    region = luigi.Parameter(default="us-east-1", description="Region name sent in signatures")
    s3curl_path = luigi.Parameter(default="~/.s3curl", description="The s3curl credentials file (mode 0600)")
    profile = luigi.Parameter(default="ganymede", description="Profile name inside .s3curl")
    bucket_template = luigi.Parameter(default="ganymede-{yyyymmddhh}",
                                      description="Bucket per hour; {yyyymmddhh} is replaced by the UTC hour")
    checksum_mode = luigi.ChoiceParameter(default="when_required", choices=["when_required", "when_supported"],
                                          description="boto3 request/response checksum mode; when_required for non-AWS servers")
    multipart_threshold_mb = luigi.IntParameter(default=64, description="Files at least this large go multipart")
    multipart_chunk_mb = luigi.IntParameter(default=16, description="Part size for multipart uploads")
    max_concurrency = luigi.IntParameter(default=4, description="Objects uploaded at a time, and parts at a time "
                                                                "of each multipart object")


class api(luigi.Config):
    host = luigi.Parameter(default="127.0.0.1", description="Address ganymede-api listens on")
    port = luigi.IntParameter(default=8750, description="Port ganymede-api listens on")
    max_archive_mb = luigi.IntParameter(default=512, description="Largest archive upload accepted (HTTP 413 above)")
    retention_hours = luigi.IntParameter(default=24 * 14,
                                         description="Oldest hour an agent may still send (HTTP 422 beyond)")
    max_member_mb = luigi.IntParameter(default=4096,
                                       description="Largest uncompressed file inside an archive (archive refused above)")
    max_total_mb = luigi.IntParameter(default=8192,
                                      description="Largest uncompressed total of an archive (archive refused above)")
    min_free_mb = luigi.IntParameter(default=1024,
                                     description="Free disk under the state root below which uploads get 507 and /healthz 503")
    tls_cert = luigi.Parameter(default="", description="PEM certificate chain for HTTPS; empty with tls_key: plain HTTP")
    tls_key = luigi.Parameter(default="", description="PEM private key for tls_cert (file mode 0600)")
    idle_timeout = luigi.IntParameter(default=75, description="Seconds an idle keep-alive connection stays open")
    body_timeout = luigi.IntParameter(default=3600, description="Seconds allowed to receive one request body (an upload)")
    executor_threads = luigi.IntParameter(default=16,
                                          description="Threads for disk and MySQL work kept off the event loop "
                                                      "(as many again run completes)")
    mysql_connections = luigi.IntParameter(default=16,
                                           description="MySQL connections ganymede-api keeps open for reuse between requests")
    upload_chunk_kb = luigi.IntParameter(default=512,
                                         description="Socket read size for uploads; memory per upload is about twice this")
    sweep_minutes = luigi.IntParameter(default=60,
                                       description="Minutes between sweeps of incoming/ (archives of finished transactions, dead temp files)")
    retry_after = luigi.IntParameter(default=15,
                                     description="Seconds sent in Retry-After with 503 and 429 answers (MySQL down, busy)")
    validation_workers = luigi.IntParameter(default=4,
                                            description="Processes validating completed archives, apart from the API's own")
    completes_per_agent = luigi.IntParameter(default=2,
                                             description="Completes one agent may have validating at once (HTTP 429 beyond)")
    agent_quota_mb = luigi.IntParameter(default=2048,
                                        description="Disk one agent may hold in incoming/ and quarantine/ (HTTP 507 beyond)")
    auth_failures_per_minute = luigi.IntParameter(default=20,
                                                  description="Wrong tokens accepted per client address per minute "
                                                              "(HTTP 429 beyond, for every request of that address)")
    listen_backlog = luigi.IntParameter(default=1024,
                                        description="Pending connections the kernel queues (a burst of agents)")
    metrics_address = luigi.Parameter(default="",
                                      description="host:port where /metrics is also served without credentials "
                                                  "(a private network for Prometheus); empty: only on the API's "
                                                  "own address, with an admin token")


class extract(luigi.Config):
    deadline_minutes = luigi.IntParameter(default=45,
                                          description="Minutes after an hour ends before its extract goes without missing agents")
    outbox = luigi.Parameter(default="", description="Directory the extract is delivered to; empty: <state root>/outbox")
    endpoint_url = luigi.Parameter(default="",
                                   description="https:// URL each extract file is also POSTed to; empty: outbox only")
    token_file = luigi.Parameter(default="",
                                 description="File (mode 0600) holding the bearer token sent to endpoint_url; empty: none")
    ca_file = luigi.Parameter(default="",
                              description="PEM CA bundle that verifies endpoint_url's certificate; empty: the system's")
    timeout_seconds = luigi.FloatParameter(default=60.0, description="Seconds one POST may take to connect or answer")
    attempts = luigi.IntParameter(default=4, description="POST attempts before the extract task fails (retried: "
                                                         "network errors, 408, 429, 5xx)")
    retry_wait_seconds = luigi.FloatParameter(default=5.0, description="Backoff factor: the second attempt goes at once, "
                                                                       "the third after 2x this, then 4x, ... (urllib3's "
                                                                       "Retry; a numeric Retry-After wins)")
    load_tasks = luigi.IntParameter(default=200,
                                    description="Most load tasks an extract round requires: with more transactions, "
                                                "LoadBatch tasks of whole agents load them in turn (docs/scaling.md)")
    deliver_empty = luigi.BoolParameter(default=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                        description="Deliver an extract holding no rows (an hour without agent "
                                                    "data) when the vendor's contract asks for one file per hour")


class alerts(luigi.Config):
    overdue_minutes = luigi.IntParameter(default=60,
                                         description="An hour not closed this long after its deadline is overdue and alerts")
    status_hours = luigi.IntParameter(default=24, description="Hours shown by `ganymede status` and the status page")
