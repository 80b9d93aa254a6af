"""A few MySQL connections reused across the API's requests (opening one costs ~20 ms of CPU).

Each is pinged before reuse and rolled back after (no snapshot or lock outlives a request); when MySQL goes
away every idle one is dropped and the caller gets StoreUnavailable: the first request after opens new ones.
"""
import threading
from contextlib import contextmanager, suppress

import pymysql

from ..errors import StoreUnavailable
from . import mysql

_DOWN = (pymysql.err.OperationalError, pymysql.err.InterfaceError)


class MySQLPool:
    def __init__(self, cfg, size=8):
        self.cfg, self.size = cfg, size
        self._idle = []
        self._lock = threading.Lock()

    @contextmanager
    def connection(self):
        conn = self._take()
        try:
            yield conn
        except (StoreUnavailable, *_DOWN) as exc:
            _close(conn)
            self.clear()
            if isinstance(exc, StoreUnavailable):
                raise
            raise StoreUnavailable(f"MySQL at {self.cfg.host}:{self.cfg.port}: {exc.args[-1]}") from None
        except BaseException:
            self._give(conn)
            raise
        self._give(conn)

    def _take(self):
        key = self.cfg.host, self.cfg.port, self.cfg.user, self.cfg.database
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = mysql.connect(self.cfg)  # StoreUnavailable when MySQL is away
                conn.pool_key = key
                return conn
            try:
                if conn.pool_key != key:
                    raise pymysql.err.InterfaceError("settings changed")
                conn.ping(reconnect=False)
                return conn
            except pymysql.err.Error:
                _close(conn)

    def _give(self, conn):
        with suppress(pymysql.err.Error):
            conn.rollback()
            with self._lock:
                if len(self._idle) < self.size:
                    self._idle.append(conn)
                    return
        _close(conn)

    def clear(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            _close(conn)


def _close(conn):
    with suppress(pymysql.err.Error):
        conn.close()
