"""The agent's INI config file (agent.cfg.sample): loaded, checked (mode 0600: it holds secrets), typed."""
import configparser
import logging
import os
import re
import stat
from collections import namedtuple
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit

DEFAULT_PATH = "/etc/ganymede/agent.cfg"
OBSOLETE = ("reader", "client_path")  # [database] keys of the removed command-line client reader
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_REQUIRED = object()
_DB_KEYS = {"connect_timeout": "connect_timeout_seconds"}  # Database fields named otherwise in [database]
log = logging.getLogger("ganymede_agent")


class ConfigError(Exception):
    """A config problem, said in one line (the CLI prints it and exits 2)."""


Retry = namedtuple("Retry", "budget_seconds base_seconds cap_seconds")  # RetryBudget's arguments, in order


@dataclass(frozen=True)
class Database:
    host: str = "127.0.0.1"
    port: int = 3306
    user: str = "root"
    password: str = field(default="", repr=False)
    database: str = ""
    unix_socket: str = ""
    connect_timeout: float = 10.0


@dataclass(frozen=True)
class Config:
    path: str
    agent_id: str
    geo: str
    api_url: str
    token: str = field(repr=False)
    timeout: float
    ca_file: str
    database: Database
    spool_dir: str
    spool_max_bytes: int
    retry: Retry
    datasets: dict  # name -> SQL, in file order
    catch_up_hours: int = 24


def check_mode(path):
    """Refuse a config that anyone but its owner can read or write."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (see agent.cfg.sample)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"config file {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & ~0o600:
        raise ConfigError(f"config file {path} has mode {mode:04o}; it holds the agent token, "
                          f"so it must be 0600 or 0400 (chmod 600 {path})")


def load(path=DEFAULT_PATH, agent_id=None):
    """Read and check the config at `path`; `agent_id` (from --agent-id) overrides the file's."""
    check_mode(path)
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise ConfigError(f"cannot parse config file {path}: {' '.join(str(exc).split())}") from None

    def get(section, key, default=_REQUIRED, kind=None):
        """A stripped value, or `kind` of it (a non-negative number); one-line errors name the key."""
        value = parser.get(section, key, fallback="" if default is _REQUIRED else str(default)).strip()
        if not value and default is _REQUIRED:
            raise ConfigError(f"{path}: [{section}] {key} is required")
        if kind is None:
            return value
        try:
            number = kind(value)
        except ValueError:
            raise ConfigError(f"{path}: [{section}] {key} must be a number, not {value!r}") from None
        if number < 0:
            raise ConfigError(f"{path}: [{section}] {key} must not be negative")
        return number

    agent_id = agent_id or get("agent", "agent_id", "")
    if not agent_id:
        raise ConfigError(f"{path}: no agent id ([agent] agent_id or --agent-id)")
    if not _AGENT_ID.match(agent_id):
        raise ConfigError(f"{path}: agent id {agent_id!r} is not a plain identifier")
    api_url = get("api", "url").rstrip("/")
    if urlsplit(api_url).scheme not in ("http", "https") or not urlsplit(api_url).netloc:
        raise ConfigError(f"{path}: [api] url must be an http:// or https:// URL, not {api_url!r}")
    db = Database(**{f.name: get("database", _DB_KEYS.get(f.name, f.name),
                                 _REQUIRED if f.name == "database" else f.default,
                                 None if f.type is str else f.type) for f in fields(Database)})
    obsolete = [key for key in OBSOLETE if parser.has_option("database", key)]
    if obsolete:
        log.warning("%s: [database] %s ignored: the agent always reads with pymysql's server-side cursor now; "
                    "remove %s", path, ", ".join(obsolete), "them" if len(obsolete) > 1 else "it")
    ca_file = get("api", "ca_file", "")
    if ca_file and not os.access(ca_file, os.R_OK):
        raise ConfigError(f"{path}: [api] ca_file {ca_file} is not a readable file")
    retry = Retry(*(get("retry", key, default, float) for key, default in zip(Retry._fields, (300, 1, 60))))
    return Config(
        path=path, agent_id=agent_id, geo=get("agent", "geo"), api_url=api_url, token=get("api", "token"),
        timeout=get("api", "timeout_seconds", 60, float), ca_file=ca_file,
        database=db, spool_dir=get("spool", "dir"),
        spool_max_bytes=int(get("spool", "max_mb", 1024, float) * 1024 * 1024),
        retry=retry, datasets=_datasets(parser, path),
        catch_up_hours=get("agent", "catch_up_hours", 24, int),
    )


def _datasets(parser, path):
    if not parser.has_section("datasets") or not parser["datasets"]:
        raise ConfigError(f"{path}: [datasets] is missing or empty")
    datasets = {}
    for name, sql in parser["datasets"].items():
        if not _NAME.match(name):
            raise ConfigError(f"{path}: dataset name {name!r} must be lower-case letters, digits and _")
        sql = sql.strip().rstrip(";").strip()
        if "%(start)s" not in sql or "%(end)s" not in sql:
            raise ConfigError(f"{path}: the SQL of dataset {name!r} must use %(start)s and %(end)s")
        datasets[name] = sql
    return datasets
