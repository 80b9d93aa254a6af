"""Every exception Ganymede raises on purpose, with the context an operator needs and never a secret.
(Archive format errors live in ganymede_agent.archive: the agent must not import the server.)"""


class GanymedeError(Exception):
    """Base class: an expected failure with a message fit for an operator."""


class ConfigError(GanymedeError):
    """A setting is missing or invalid."""


class HourError(GanymedeError, ValueError):
    """An hour string or value that is not a valid UTC hour."""


class S3CredentialsError(GanymedeError):
    """The .s3curl file is unreadable, too open, malformed or lacks the profile."""


class S3BackupError(GanymedeError):
    """An S3 operation failed: server down, bad credentials, foreign bucket, bad checksum."""


class StoreUnavailable(GanymedeError):
    """A database (MySQL or MongoDB) cannot be reached."""


class SchemaError(GanymedeError):
    """The MySQL schema is missing, too old or too new for this code."""


class AgentError(GanymedeError):
    """An agent registry operation failed (unknown agent, duplicate id)."""


class TransactionError(GanymedeError):
    """A transaction (or its agent) cannot make the requested move; the subclasses say why."""

    def __init__(self, message, transaction_id=None):
        super().__init__(message)
        self.transaction_id = transaction_id


class NotFound(TransactionError):
    """No such transaction (or none the caller may see)."""


class Forbidden(TransactionError):
    """The agent may not do this at all (unknown or revoked)."""


class Conflict(TransactionError):
    """The transaction's state does not allow the move (already completed, nothing uploaded yet, …)."""


class Busy(TransactionError):
    """Another request holds the transaction, or the agent has too much in flight: retry later."""


class QuotaExceeded(TransactionError):
    """The agent's disk quota, or the server's free disk, does not allow storing more."""


class CommandError(GanymedeError):
    """An external command failed; the message carries its stderr tail."""

    def __init__(self, argv, returncode, stderr):
        super().__init__(f"{argv[0]} exited {returncode}: {(stderr or '').strip()[-2000:]}")


class DeliveryError(GanymedeError):
    """The extract could not be delivered to the vendor's endpoint after every attempt."""


class DataError(GanymedeError):
    """A transaction's data cannot be staged or loaded; rerunning cannot fix it (the transaction is isolated)."""


class QualityError(GanymedeError):
    """A data-quality check that its dataset declares blocking failed: the hour's extract is not written."""
