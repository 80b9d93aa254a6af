"""ganymede-api's Prometheus metrics at /metrics: one registry per application, no global."""
import re
import shutil

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

_VARIABLE = re.compile(r"'[^']*'|\"[^\"]*\"|[0-9a-f]{8}-[0-9a-f-]{27}|[0-9]+(?:[-T:.][0-9]+)*")


def reason_label(status, reason):
    """'413 body of N bytes is over the limit of N': numbers and quoted input replaced, so a client cannot
    mint new label values by sending odd requests."""
    return f"{status} {_VARIABLE.sub('N', reason or '')}"[:100]


class ApiMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.uploads = Counter("ganymede_api_uploads", "Archives received whole (sha256 verified), per agent",
                               ["agent"], registry=r)
        self.upload_bytes = Counter("ganymede_api_upload_bytes", "Bytes of archives received whole, per agent",
                                    ["agent"], registry=r)
        self.latency = Histogram("ganymede_api_request_seconds", "Time to answer a request, per endpoint",
                                 ["endpoint", "method"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300))
        self.refusals = Counter("ganymede_api_refusals", "Requests answered 4xx/5xx, by status and reason",
                                ["reason"], registry=r)
        self.open_transactions = Gauge("ganymede_api_open_transactions",
                                       "Transactions created or uploaded, not completed yet (at the scrape)", registry=r)
        self.disk_free = Gauge("ganymede_api_disk_free_bytes", "Free bytes on the state root's filesystem",
                               registry=r)

    def request(self, handler, seconds):
        method = handler.request.method if handler.request.method in handler.SUPPORTED_METHODS else "other"
        endpoint = type(handler).__name__.removesuffix("Handler")
        self.latency.labels(endpoint, method).observe(seconds)

    def refused(self, status, reason):
        self.refusals.labels(reason_label(status, reason)).inc()

    def uploaded(self, agent_id, size):
        self.uploads.labels(agent_id).inc()
        self.upload_bytes.labels(agent_id).inc(size)

    def exposition(self, open_transactions, state_root):
        """The text a scrape gets, with the gauges read now."""
        self.open_transactions.set(open_transactions)
        self.disk_free.set(shutil.disk_usage(state_root).free)
        return generate_latest(self.registry)
