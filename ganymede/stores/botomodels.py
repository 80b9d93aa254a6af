"""botocore's model files, decoded once per installed botocore and kept on disk.

Every process that builds a boto3 client parses the same few megabytes of
JSON shipped with botocore (the endpoints table, the S3 service model, its
endpoint rule set) and lists its ~450 service directories: 85-110 ms of a
130 ms client on this project's 2-core machines, paid again by each hourly
backup (a process of its own under cron). A known botocore cost (boto/botocore
issues 2553 and 3078), which it leaves to the application.

`session()` gives a botocore session whose loader keeps what it loads in
`directory` as marshal files (plain dicts, lists and strings: marshal reads
them 2-3 times faster than json and cannot run code), keyed by the botocore and
boto3 versions, the search paths and the name asked for. The loader searches
only the data shipped with the installed botocore and boto3 (no
~/.aws/models, no AWS_DATA_PATH): what Ganymede was tested with. A cache that
cannot be read or written is a miss, never an error: the client is built the
way botocore builds it. Files another user could have written are not read
(the models decide where requests go).
"""
import gc
import hashlib
import logging
import marshal
import os
import tempfile
from contextlib import contextmanager

import boto3
import botocore
import botocore.loaders
import botocore.session

log = logging.getLogger(__name__)

_VERSION = f"botocore-{botocore.__version__}-boto3-{boto3.__version__}"


class CachingLoader(botocore.loaders.Loader):
    """botocore's Loader over its own data only, with decoded files and service lists kept in `directory`.

    With `service`, the endpoints table keeps only that service's entries
    (every partition, region and default stays): botocore's resolver reads
    nothing else for a client of that service, and the other ~450 services
    are nine tenths of the table. Such a loader is for that service's
    clients only.
    """

    def __init__(self, directory, service=None):
        super().__init__(extra_search_paths=[self.BUILTIN_DATA_PATH], include_default_search_paths=False)
        self._directory = os.path.join(os.path.expanduser(directory), _VERSION)
        self._service = service

    def load_data_with_path(self, name):
        if name == "endpoints" and self._service:
            return self._through_cache(("data", name, self._service), lambda: _one_service(
                super(CachingLoader, self).load_data_with_path(name), self._service))
        return self._through_cache(("data", name), lambda: super(CachingLoader, self).load_data_with_path(name))

    def list_available_services(self, type_name):
        return self._through_cache(("services", type_name),
                                   lambda: super(CachingLoader, self).list_available_services(type_name))

    def _through_cache(self, what, load):
        key = repr((what, tuple(self.search_paths)))
        if key in self._cache:
            return self._cache[key]
        path = os.path.join(self._directory, hashlib.sha256(key.encode()).hexdigest()[:32] + ".marshal")
        value = _read(path, key)
        if value is None:
            value = _plain(load())
            _write(self._directory, path, key, value)
        self._cache[key] = value
        return value


def session(directory, service):
    """A botocore session for clients of `service`, its models through CachingLoader; plain botocore if no
    directory."""
    created = botocore.session.get_session()
    if directory:
        created.register_component("data_loader", CachingLoader(directory, service))
    return created


def _one_service(loaded, service):
    """(endpoints table, path) with only `service` left in each partition's services."""
    endpoints, path = loaded
    partitions = [dict(p, services={k: v for k, v in p.get("services", {}).items() if k == service})
                  for p in endpoints["partitions"]]
    return dict(endpoints, partitions=partitions), path


def _read(path, key):
    try:
        with open(path, "rb") as handle, _no_gc():
            if not (_private(os.fstat(handle.fileno())) and _private(os.stat(os.path.dirname(path)))):
                _warn_once(os.path.dirname(path))
                return None
            stored_key, value = marshal.loads(handle.read())  # marshal.load reads a file object piece by piece
    except FileNotFoundError:
        return None
    except (OSError, EOFError, ValueError, TypeError) as exc:
        log.debug("botocore model cache %s unreadable (%s): loading from botocore", path, exc)
        return None
    return value if stored_key == key else None


_WARNED = set()


def _warn_once(directory):
    if directory not in _WARNED:
        _WARNED.add(directory)
        log.warning("botocore model cache %s not used: its files must be ours and writable by no one else "
                    "(delete the directory: it is rebuilt)", directory)


def _private(st):
    """Owned by this user and writable by no one else: the models say where requests go (endpoint rules),
    so a cache another user could write is not read."""
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


@contextmanager
def _no_gc():
    """Cyclic GC paused: decoding a model makes ~10^5 containers, which would set off full collections
    (20-30 ms each here) over objects that cannot be garbage yet."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _write(directory, path, key, value):
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not _private(os.stat(directory)):
            return _warn_once(directory)
        handle, temp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(marshal.dumps((key, value)))
            os.replace(temp, path)
        except BaseException:
            os.unlink(temp)
            raise
    except (OSError, ValueError) as exc:
        log.debug("botocore model cache %s not written (%s)", path, exc)


def _plain(value):
    """The loaded data with botocore's OrderedDicts as plain dicts (same order): what marshal can keep."""
    if isinstance(value, dict):  # botocore's OrderedDicts too
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value
