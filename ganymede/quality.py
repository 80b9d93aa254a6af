"""Data-quality checks of one agent's hour, as the catalog declares them per dataset (datasets.Quality).

Pure functions. A result says what was observed and what was expected, so an alert reads on its own.
"""
import statistics
from dataclasses import asdict, dataclass

SENT_NOTHING = "sent_nothing"
ALL_DATASETS = "*"  # the dataset of a check about the agent rather than one dataset


@dataclass
class Result:
    agent_id: str
    dataset: str
    check: str
    passed: bool
    observed: float
    expected: str
    detail: str = ""
    blocking: bool = False

    def line(self):
        """agent, dataset, check, observed vs expected: what `ganymede alerts` prints for a failure."""
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.agent_id} {self.dataset} {self.check}: observed {self.observed:g}, expected {self.expected}{detail}"

    def as_dict(self):
        return asdict(self)


def row_count(q, rows, history):
    """Rows sent against the median of the agent's trailing hours (those that sent this dataset)."""
    if len(history) < q.min_history:
        return True, f"any (only {len(history)} earlier hour(s) known, {q.min_history} needed)"
    median = statistics.median(history)
    low, high = median / q.count_factor, median * q.count_factor
    return low <= rows <= high, f"{low:g}..{high:g} (median {median:g} of {len(history)} hours, factor {q.count_factor:g})"


def evaluate(dataset, agent_id, counts, out_of_range, history, keys_now, keys_before):
    """The four per-dataset checks of one agent's hour.

    counts: {"loaded", "rejected"}; out_of_range: rows refused by a range rule; history: rows sent in each of
    the agent's earlier hours; keys_now/keys_before: the watched key's values this hour and the previous one
    (keys_before None when that hour is not known).
    """
    q = dataset.quality
    sent = counts["loaded"] + counts["rejected"]
    share = counts["rejected"] / sent if sent else 0.0
    count_ok, count_expected = row_count(q, sent, history)
    results = [
        Result(agent_id, dataset.name, "row_count", count_ok, sent, count_expected),
        Result(agent_id, dataset.name, "rejected_share", share <= q.max_rejected_share, round(share, 4),
               f"<= {q.max_rejected_share:g}", f"{counts['rejected']} of {sent} rows rejected"),
        Result(agent_id, dataset.name, "value_ranges", out_of_range <= q.max_out_of_range, out_of_range,
               f"<= {q.max_out_of_range} rows out of range"),
    ]
    if q.watch_key:
        gone = sorted(set(keys_before or ()) - set(keys_now))
        expected = f"every {q.watch_key} of the previous hour" if keys_before is not None \
            else "any (previous hour not loaded)"
        results.append(Result(agent_id, dataset.name, "keys_disappeared", not gone, len(gone), expected,
                              ", ".join(gone[:10]) + (" …" if len(gone) > 10 else "")))
    for r in results:
        r.blocking = r.check in q.blocking
    return results


def sent_nothing(agent_id):
    """An agent expected for the hour that completed no transaction by the extract."""
    return Result(agent_id, ALL_DATASETS, SENT_NOTHING, False, 0, "a transaction for the hour")


def failed(results):
    return [r for r in results if not r.passed]
