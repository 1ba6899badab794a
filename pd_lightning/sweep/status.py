"""What a sweep shows: the status table (`pdl sweep status`, the end of `pdl sweep run`) and its progress line."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from pd_lightning.sweep.spec import SweepSpec
from pd_lightning.sweep.study import ERROR_ATTR, TASK_ATTR, failed_trials, trial_state


def _status_rows(study, spec: SweepSpec) -> list[tuple[str, ...]]:
    """One row per task (its latest trial, a complete one first) and per search trial: what the table lists."""
    from optuna.trial import TrialState

    latest: dict[str, Any] = {}
    for trial in study.get_trials(deepcopy=False):
        key = trial.user_attrs.get(TASK_ATTR) or f"search-{trial.number}"
        if trial.state == TrialState.COMPLETE or key not in latest or latest[key].state != TrialState.COMPLETE:
            latest[key] = trial
    rows = [_status_row(task.label, str(task.seed), latest.get(task.task_id)) for task in spec.tasks()]
    for key, trial in latest.items():
        if key.startswith("search-"):
            rows.append(_status_row(trial.user_attrs.get("pdl.label", f"trial {trial.number}"),
                                    ",".join(map(str, spec.seeds)), trial))
    return rows


def state_counts(study, spec: SweepSpec) -> Counter:
    """How many tasks (and search trials) are in each state, as the table's `total:` line counts them:
    complete, running, waiting, failed, interrupted, crashed, pending (a task with no trial yet)."""
    return Counter(r[3] for r in _status_rows(study, spec))


def status_table(study, spec: SweepSpec) -> str:
    """Plain-text table of every task (and search trial): label, seed, state, objective, run id, error."""
    rows = _status_rows(study, spec)
    header = ("trial", "configuration", "seed", "state", spec.objective_metric, "minutes", "run / error")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header) - 1)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(header[:-1], widths)) + "  " + header[-1]]
    for r in rows:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1])
    counts = Counter(r[3] for r in rows)
    lines.append("total: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)


def _status_row(label: str, seed: str, trial) -> tuple[str, ...]:
    if trial is None:
        return ("-", label, seed, "pending", "", "", "")
    value = f"{trial.value:.4g}" if trial.value is not None else ""
    minutes = ""
    if trial.datetime_start and trial.datetime_complete:
        minutes = f"{(trial.datetime_complete - trial.datetime_start).total_seconds() / 60:.1f}"
    extra = trial.user_attrs.get(ERROR_ATTR) or trial.user_attrs.get("pdl.run_id", "")
    return (str(trial.number), label, seed, trial_state(trial), value, minutes, extra)


class Progress:
    """The coordinator's live line: done / running / failed, ETA and best so far (on change, else once a minute)."""

    def __init__(self, spec: SweepSpec, total: int):
        self.spec, self.total = spec, total
        self.started, self._last_counts, self._last_print = time.time(), None, 0.0

    def line(self, study) -> str | None:
        """The line to show now, or None when nothing changed within the last minute."""
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        running = sum(1 for t in trials if t.state == TrialState.RUNNING)
        failed = len(failed_trials(study))
        finished_here = [t for t in complete if t.datetime_start and t.datetime_start.timestamp() >= self.started - 1]
        remaining = max(0, self.total - len(complete) - failed)
        eta = ""
        if finished_here and remaining:
            eta = f", ETA {duration((time.time() - self.started) / len(finished_here) * remaining)}"
        best = ""
        if complete:
            top = (max if self.spec.direction == "maximize" else min)(complete, key=lambda t: t.value)
            best = f", best {self.spec.objective_metric} {top.value:.4g} ({top.user_attrs.get('pdl.label', top.number)})"
        counts = (len(complete), running, failed)
        if counts == self._last_counts and time.time() - self._last_print <= 60:
            return None
        self._last_counts, self._last_print = counts, time.time()
        return (f"sweep: {len(complete)}/{self.total} done, {running} running, {failed} failed{eta}{best} "
                f"[{duration(time.time() - self.started)}]")


def duration(seconds: float) -> str:
    """`3m07s`, or `1h02m` from an hour on."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
