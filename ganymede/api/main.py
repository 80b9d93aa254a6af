"""`ganymede-api`: read luigi.cfg, listen, wait; SIGTERM/SIGINT stop it cleanly."""
import asyncio
import logging
import os
import signal
import ssl
import sys
from concurrent.futures import ThreadPoolExecutor

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback

from .. import config, configfile
from ..cli import Parser
from ..errors import ConfigError
from ..paths import StateRoot
from . import sweep
from .base import ApiSettings
from .handlers import make_app
from .uploads import Validator

log = logging.getLogger("ganymede.api")
_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
            for c in (*range(0x20), *range(0x7f, 0xa0), 0x2028, 0x2029)}  # str.translate's table


class EscapingFormatter(logging.Formatter):
    """Control characters as \\xNN (\\uNNNN above 0xff): an agent's string cannot forge log lines."""

    def formatMessage(self, record):
        record.message = record.message.translate(_ESCAPES)
        return super().formatMessage(record)


def ssl_context(cert, key):
    """A server TLS context when both files are configured, None when neither; ConfigError otherwise."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise ConfigError("[api] tls_cert and tls_key go together: set both or neither")
    key = os.path.expanduser(key)
    if os.path.exists(key) and os.stat(key).st_mode & 0o004:
        raise ConfigError(f"TLS key {key!r} is readable by everyone: chmod 600 (or 640 for a key group) first")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(os.path.expanduser(cert), key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert!r} / key {key!r}: {exc}") from None
    return context


def make_server(app, settings, idle_timeout, body_timeout, ssl_options=None):
    """The HTTPServer as production runs it (and the tests); handlers lower max_body_size per request."""
    return HTTPServer(app, xheaders=False, ssl_options=ssl_options, max_body_size=settings.max_archive_bytes,
                      idle_connection_timeout=idle_timeout, body_timeout=body_timeout, decompress_request=False,
                      chunk_size=settings.chunk_bytes)


def metrics_address(text):
    """(host, port) of [api] metrics_address, None when empty; ConfigError when it is not host:port."""
    if not text:
        return None
    host, port = httputil.split_host_and_port(text)
    if port is None or not 0 < port < 65536:
        raise ConfigError(f"[api] metrics_address must be host:port, not {text!r}")
    return host.strip("[]"), port


async def serve(api, settings, ssl_options, metrics_at):
    """Serve until SIGTERM/SIGINT; `api` is the [api] section."""
    app = make_app(settings)
    loop = asyncio.get_running_loop()

    def sweep_incoming(temp_older_than=sweep.TEMP_GRACE):  # off the event loop
        return loop.run_in_executor(settings.executor, sweep.sweep, app.pool, settings.state, temp_older_than)
    # Before listening: no upload of ours is running, so every unlocked temp file is a dead process's.
    await sweep_incoming(0)
    server = make_server(app, settings, api.idle_timeout, api.body_timeout, ssl_options)
    server.listen(api.port, api.host, backlog=api.listen_backlog)
    metrics_server = HTTPServer(app.metrics_app) if metrics_at else None
    if metrics_server:
        metrics_server.listen(metrics_at[1], metrics_at[0])
        log.info("/metrics without credentials on http://%s:%d/metrics", *metrics_at)
    log.info("ganymede-api listening on %s://%s:%d (state root %s, MySQL %s:%s/%s)",
             "https" if ssl_options else "http", api.host, api.port, settings.state.root,
             settings.mysql.host, settings.mysql.port, settings.mysql.database)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sweeper = PeriodicCallback(sweep_incoming, api.sweep_minutes * 60_000)
    sweeper.start()
    await stop.wait()
    sweeper.stop()
    log.info("stopping: no new connections, closing open ones")
    server.stop()
    if metrics_server:
        metrics_server.stop()
    await server.close_all_connections()
    app.pool.clear()


def main(argv=None):
    parser = Parser(prog="ganymede-api", description="The Ganymede agent API daemon.")
    parser.add_argument("--config", metavar="FILE",
                        help="the one config file read (default: LUIGI_CONFIG_PATH, else /etc/ganymede/luigi.cfg)")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        configfile.use(args.config)
        api = config.api()
        for name in ("sweep_minutes", "validation_workers", "completes_per_agent", "auth_failures_per_minute"):
            if getattr(api, name) < 1:
                raise ConfigError(f"[api] {name} must be at least 1")
        ssl_options = ssl_context(api.tls_cert, api.tls_key)
        metrics_at = metrics_address(api.metrics_address)
        os.makedirs(sweep.incoming_dir(StateRoot(config.state().root)), exist_ok=True)
        settings = ApiSettings(ThreadPoolExecutor(api.executor_threads, thread_name_prefix="ganymede-api"),
                               Validator(api.validation_workers, api.executor_threads))  # last: starts processes
    except (ConfigError, OSError) as exc:
        print(f"ganymede-api: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(serve(api, settings, ssl_options, metrics_at))
    except OSError as exc:  # the port is taken, the address is not ours
        print(f"ganymede-api: cannot listen on {api.host}:{api.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        settings.executor.shutdown(wait=True, cancel_futures=True)
        settings.validator.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
