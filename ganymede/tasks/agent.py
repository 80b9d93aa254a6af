"""Stage 0: an agent's verified archive, put in place by the API."""
import os
from functools import cached_property, wraps

import luigi

from .. import config
from ..markers import DurableTarget
from ..paths import StateRoot


def state_root():
    return StateRoot(config.state().root)


def unless_complete(run):
    """run() that does nothing when the task is already complete.

    With several worker hosts luigid can hand a task to one host just as
    another finished it (docs/scaling.md); Luigi checks complete() only
    when scheduling, so the task's own run() checks again first.
    """
    @wraps(run)
    def guarded(self):
        return None if self.complete() else run(self)
    return guarded


class TransactionTask(luigi.Task):
    """Parameters shared by every per-transaction step.

    The transaction id is the key; hour and agent are carried along because
    they name the hour-stamped paths (a task may not query MySQL to find them).
    """
    transaction_id = luigi.Parameter(description="Transaction UUID")
    hour = luigi.DateHourParameter(description="The transaction's UTC hour")
    agent_id = luigi.Parameter(description="The agent that sent it")

    def tx_params(self):
        return {"transaction_id": self.transaction_id, "hour": self.hour, "agent_id": self.agent_id}

    @cached_property
    def root(self):
        """The state root, read from the config once per task (each read of a luigi.Config costs ~0.5 ms, and a
        thousand-transaction hour asks for it thousands of times)."""
        return state_root()

    def marker(self, stage):
        return DurableTarget(self.root.transaction_marker(self.hour, self.agent_id, self.transaction_id, stage))

    def work_path(self):
        """The one scratch file of the transaction's staging (a rerun overwrites what a crash left)."""
        return os.path.join(self.root.tmp(), f"stage-{self.transaction_id}.csv")


class AgentArchive(TransactionTask, luigi.ExternalTask):
    """Exists once the API has validated the archive and moved it into upload/.

    After the hour's backup it lives in archives/ instead, and still counts;
    so does quarantine/, where a worker that could not stage it put it.
    """

    def output(self):
        return luigi.LocalTarget(self.root.upload(self.hour, self.agent_id, self.transaction_id))

    def complete(self):
        return any(map(os.path.exists, self.places()))

    def places(self):
        return (self.output().path, self.root.archived(self.hour, self.agent_id, self.transaction_id),
                self.quarantine_path())

    def quarantine_path(self):
        return self.root.quarantine(self.hour, self.agent_id, self.transaction_id)

    def path(self):
        """Where the archive is now (upload/ if nowhere)."""
        return next(filter(os.path.exists, self.places()), self.output().path)
