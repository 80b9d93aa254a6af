"""Stage 0: an agent's verified archive, put in place by the API; what every task shares."""
import os
from functools import cached_property, wraps

import luigi

from .. import config
from ..markers import DurableTarget
from ..paths import StateRoot


def state_root():
    return StateRoot(config.state().root)


def unless_complete(run):
    """run() that does nothing when another host finished the task since luigid handed it out (docs/scaling.md)."""
    @wraps(run)
    def guarded(self):
        return None if self.complete() else run(self)
    return guarded


class TransactionTask(luigi.Task):
    """A per-transaction step: hour and agent name its hour-stamped paths (a task may not query MySQL for them)."""
    transaction_id = luigi.Parameter(description="Transaction UUID")
    hour = luigi.DateHourParameter(description="The transaction's UTC hour")
    agent_id = luigi.Parameter(description="The agent that sent it")

    @cached_property
    def root(self):
        """Read once per task: a luigi.Config read costs ~0.5 ms, and a big hour asks thousands of times."""
        return state_root()

    def marker(self, stage):
        return DurableTarget(self.root.transaction_marker(self.hour, self.agent_id, self.transaction_id, stage))

    def work_path(self):
        """The transaction's one staging scratch file (a rerun overwrites what a crash left)."""
        return os.path.join(self.root.tmp(), f"stage-{self.transaction_id}.csv")


class AgentArchive(TransactionTask, luigi.ExternalTask):
    """Exists once the API has validated the archive and moved it into upload/."""

    def output(self):
        return luigi.LocalTarget(self.root.upload(self.hour, self.agent_id, self.transaction_id))

    def complete(self):
        return os.path.exists(self.path())

    def quarantine_path(self):
        return self.root.quarantine(self.hour, self.agent_id, self.transaction_id)

    def path(self):
        """Where the archive is now: upload/, archives/ after the backup, or quarantine/ (upload/ if nowhere)."""
        places = (self.output().path, self.root.archived(self.hour, self.agent_id, self.transaction_id),
                  self.quarantine_path())
        return next(filter(os.path.exists, places), places[0])
