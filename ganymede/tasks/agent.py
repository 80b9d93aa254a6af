"""Stage 0: an agent's verified archive, put in place by the API."""
import os
from functools import cached_property

import luigi

from .. import config
from ..paths import StateRoot


def state_root():
    return StateRoot(config.state().root)


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
        return luigi.LocalTarget(self.root.transaction_marker(self.hour, self.agent_id, self.transaction_id, stage))


class AgentArchive(TransactionTask, luigi.ExternalTask):
    """Exists once the API has validated the archive and moved it into upload/.

    After the hour's backup it lives in archives/ instead, and still counts.
    """

    def output(self):
        return luigi.LocalTarget(self.root.upload(self.hour, self.agent_id, self.transaction_id))

    def complete(self):
        return self.output().exists() or os.path.exists(self.archived_path())

    def archived_path(self):
        return self.root.archived(self.hour, self.agent_id, self.transaction_id)

    def path(self):
        """Where the archive is now."""
        upload = self.output().path
        return upload if os.path.exists(upload) else self.archived_path()
