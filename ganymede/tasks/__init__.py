"""The Luigi graph, one module per stage; `luigi --module ganymede.tasks HourlyBackup --hour H`."""
from .agent import AgentArchive
from .worker import LoadBatch, LoadTransaction, StageTransaction
from .extract import ExtractDeadline, ExtractTimeout, GlassbeamExtract, TransactionCompletion
from .backup import DumpSchema, HourlyBackup
from . import events  # noqa: F401  (registers the failure markers)

__all__ = ["AgentArchive", "StageTransaction", "LoadTransaction", "LoadBatch", "ExtractDeadline", "ExtractTimeout",
           "GlassbeamExtract", "TransactionCompletion", "DumpSchema", "HourlyBackup"]
