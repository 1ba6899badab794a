"""The sweep's Optuna study: where it lives, and how workers claim its tasks exactly once.

Every claim happens under the study lock (`locks.study_lock`), which first fails trials whose worker
died (same host: the process is gone; other hosts: Optuna's heartbeat), then enqueues the tasks that
have no finished, running or waiting trial, then pops one waiting trial. So a task whose trial crashed
or was interrupted by a server outage is enqueued again by the next claim, and a finished one never
is. (Optuna's RetryFailedTrialCallback would only cover the heartbeat half of that, and a claimer killed
between failing a trial and enqueuing its retry would lose the task: the enqueue-what-has-no-live-trial
rule covers both and needs no second path.)

A trial's parameters are its configuration's full design-space coordinates, the same keys in every trial
of the study (`space`); its seed is the user attr `seed`, its task (what claims, resume and dedup go by)
the user attr TASK_ATTR (grid and baseline trials) or SEARCH_POINT_ATTR (search trials), as before. Each
trial reports its `val/loss` curve as intermediate values (`sweep.trial`); nothing is pruned (NopPruner).

A trial's state as the sweep sees it (`trial_state`):
    complete      finished, its objective told
    failed        the configuration failed (ERROR_ATTR holds the one-line error); re-run only with --retry-failed
    interrupted   a server outage stopped it (ERROR_ATTR and OUTAGE_ATTR); re-run like a crash
    crashed       its worker died (FAIL without an error); re-run
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pd_lightning.config import PDLConfig, config_hash
from pd_lightning.errors import ConfigError
from pd_lightning.sweep.locks import study_lock
from pd_lightning.sweep.machine import process_namespace, process_start
from pd_lightning.sweep.outages import ServerUnreachable, one_line, redact, storage_down
from pd_lightning.sweep.space import DesignSpace, check_study_space, design_space, suggest_coordinates
from pd_lightning.sweep.spec import SweepSpec, Task, point_label

PARENT_ATTR = "pdl.parent_run_id"  # study attr: the MLflow parent run
TASK_ATTR = "pdl.task"  # trial attr: the task id (grid and baseline trials)
ERROR_ATTR = "pdl.error"  # trial attr: why it failed, one line
OUTAGE_ATTR = "pdl.outage"  # trial attr: the failure was a server outage, not the configuration's
SEARCH_POINT_ATTR = "pdl.search_point"  # trial attr: a search trial's sampled configuration
SEED_ATTR = "seed"  # trial attr: the replicate a grid trial trains (a search trial: SEEDS_ATTR, all of them)
SEEDS_ATTR = "seeds"
STATE_RANK = {"complete": 5, "running": 4, "waiting": 3, "failed": 2, "interrupted": 1, "crashed": 1, "pending": 0}
REDO = ("pending", "crashed", "interrupted")  # what a claim enqueues again (plus "failed" with --retry-failed)


@dataclass
class Place:
    """Where a sweep writes: its own dir (trial runs, logs), the shared prerequisite cache, the Optuna storage;
    whether a task may take a finished run of the same configuration instead of training (`--reuse-runs`);
    and the registered model every trial's student becomes a version of (`--register`, None: none)."""

    out: Path
    cache: Path
    storage: str
    reuse_runs: bool = False
    register: str | None = None

    def trial_dir(self, task_id: str) -> Path:
        """A task's training run directory: named by the task, so a re-run resumes it."""
        return self.out / "trials" / task_id


def default_storage(cfg: PDLConfig) -> str:
    """The Optuna storage beside the MLflow store: sqlite:///<dir of mlflow.db>/optuna.db (no server)."""
    from pd_lightning.tracking import tracking_settings

    uri = tracking_settings(cfg)["tracking_uri"]
    folder = Path(uri[len("sqlite:///"):]).resolve().parent if uri.startswith("sqlite:///") else Path.cwd()
    return f"sqlite:///{folder / 'optuna.db'}"


def resolve_place(spec: SweepSpec, *, out: str | None, cache: str | None, storage: str | None,
                  reuse_runs: bool = False, register: str | None = None) -> Place:
    """Output dir, cache dir and Optuna storage URL for a sweep (defaults beside the working dir's runs/)."""
    from pd_lightning.student_model import check_registered_name

    return Place(out=Path(out) if out else Path("runs") / "sweeps" / spec.name / spec.scale,
                 cache=Path(cache) if cache else Path("runs") / "cache",
                 storage=storage or default_storage(spec.base_config()), reuse_runs=reuse_runs,
                 register=check_registered_name(register))


def open_storage(url: str, spec: SweepSpec):
    """An Optuna RDB storage with heartbeats (so trials of killed workers are detected and re-run)."""
    import optuna

    if not re.match(r"^(sqlite|postgresql|mysql)(\+\w+)?://", url):
        raise ConfigError(f"--storage={url!r} is not allowed; use sqlite:///path/optuna.db or "
                          "postgresql://user@host/db (a database several workers can share)")
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.9
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                              heartbeat_interval=spec.heartbeat_interval, grace_period=spec.grace_period)
    except ImportError as exc:
        raise ConfigError(f"--storage={url!r} needs a database driver that is not installed ({exc}); for PostgreSQL "
                          "install pd-lightning[postgres]") from None
    except Exception as exc:  # sqlalchemy's OperationalError etc.: one line, the URL without a password
        raise ConfigError(f"--storage={redact(url)!r} cannot be opened: {str(exc).splitlines()[0][:200]}") from None


def make_sampler(spec: SweepSpec):
    """TPE (or random) for a search; a grid only ever runs enqueued trials, whose values are fixed."""
    import optuna

    seed = (spec.search or {}).get("seed", 0)
    if spec.search is not None and spec.search["sampler"] == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(1, spec.search["trials"] // 3)))
    return optuna.samplers.RandomSampler(seed=seed)


def create_study(spec: SweepSpec, place: Place, space: DesignSpace | None = None):
    """Create (or open) the sweep's Optuna study, its objective named; direction, metric and parameters must
    match the existing study's. Nothing is pruned (a grid's rows all run to the end; see `sweep.space`)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = space or design_space(spec)  # a file whose parameters are unstorable fails before the study exists
    study = optuna.create_study(study_name=spec.study_name, storage=open_storage(place.storage, spec),
                                direction=spec.direction, sampler=make_sampler(spec), pruner=optuna.pruners.NopPruner(),
                                load_if_exists=True)
    if study.direction.name.lower() != spec.direction:
        raise ConfigError(f"objective.direction={spec.direction!r} differs from the existing study {spec.study_name!r} "
                          f"({study.direction.name.lower()}); use another sweep name or storage")
    if study.metric_names not in (None, [spec.objective_metric]):
        raise ConfigError(f"objective.metric={spec.objective_metric!r} differs from the existing study {spec.study_name!r} "
                          f"({study.metric_names[0]}); its values are not comparable: use another sweep name or storage")
    check_study_space(study, space, redact(place.storage))
    if study.metric_names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # set_metric_names: since 3.2
            study.set_metric_names([spec.objective_metric])  # the dashboard's name for the objective
    return study


def load_study_for_status(spec: SweepSpec, place: Place):
    """The sweep's study, or None if it was never run with this storage."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(place.storage, spec)
    try:
        return optuna.load_study(study_name=spec.study_name, storage=storage)
    except KeyError:
        return None


# ----------------------------------------------------------------------------------------------
# What each trial and task is


def task_attrs(task: Task) -> dict[str, Any]:
    """The user attrs a task's trial carries: enough to rebuild the task (`task_from_attrs`)."""
    return {TASK_ATTR: task.task_id, "pdl.point": task.point, "pdl.label": task.label, SEED_ATTR: task.seed,
            "pdl.baseline": task.baseline, "pdl.group": task.group, "pdl.overrides": json.dumps(task.overrides)}


def task_from_attrs(a: dict[str, Any]) -> Task:
    """The task a trial's user attrs describe (a study from before SEED_ATTR named the seed `pdl.seed`)."""
    seed = a[SEED_ATTR] if SEED_ATTR in a else a["pdl.seed"]
    return Task(a["pdl.label"], json.loads(a["pdl.overrides"]), int(seed), bool(a["pdl.baseline"]), a.get("pdl.group", ""))


def trial_state(trial) -> str:
    """complete | running | waiting | failed | interrupted | crashed (see the module docstring)."""
    from optuna.trial import TrialState

    named = {TrialState.COMPLETE: "complete", TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
    if trial.state in named:
        return named[trial.state]
    if ERROR_ATTR not in trial.user_attrs:
        return "crashed"
    return "interrupted" if trial.user_attrs.get(OUTAGE_ATTR) else "failed"


def task_states(study, tasks: list[Task]) -> dict[str, str]:
    """task_id -> the best state any of its trials reached, or pending (no trial yet)."""
    state = {t.task_id: "pending" for t in tasks}
    for trial in study.get_trials(deepcopy=False):
        tid = trial.user_attrs.get(TASK_ATTR)
        if tid is None:
            continue
        s = trial_state(trial)
        if STATE_RANK[s] > STATE_RANK[state.get(tid, "pending")]:
            state[tid] = s
    return state


def failed_trials(study) -> list:
    """Trials whose configuration failed (error recorded), whose task did not complete in another trial since."""
    trials = study.get_trials(deepcopy=False)
    completed = {_task_key(t) for t in trials if trial_state(t) == "complete"}
    return [t for t in trials if trial_state(t) == "failed" and _task_key(t) not in completed]


def _task_key(trial) -> str | None:
    return trial.user_attrs.get(TASK_ATTR) or trial.user_attrs.get(SEARCH_POINT_ATTR)


def nothing_to_do(study, spec: SweepSpec, tasks: list[Task], retry_failed: bool) -> bool:
    """Every task finished (complete, or failed without --retry-failed) and no search trial is left to sample."""
    states = task_states(study, tasks)
    finished = ("complete",) if retry_failed else ("complete", "failed")
    search_left = spec.search is not None and _search_trials_claimed(study) < spec.search["trials"]
    return all(states[t.task_id] in finished for t in tasks) and not search_left and not (retry_failed and failed_trials(study))


# ----------------------------------------------------------------------------------------------
# Claims


def _owner_dead(trial) -> bool:
    """A RUNNING trial's worker in this pid namespace is gone (or its pid was reused by another process)."""
    attrs = trial.system_attrs
    if attrs.get("pdl.host") != process_namespace() or "pdl.pid" not in attrs:
        return False
    started = process_start(int(attrs["pdl.pid"]))
    return started is None or abs(started - float(attrs.get("pdl.pid_start", started))) > 1e-3


def fail_dead_trials(study) -> list[int]:
    """Mark RUNNING trials whose worker died as FAIL (they are re-run): same-host pid check + heartbeats.

    Storage errors propagate: a claim that cannot read or write the study must not go on as if it had.
    """
    import optuna
    from optuna.trial import TrialState

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _owner_dead(trial):
            try:
                if study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                    failed.append(trial.number)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # its heartbeat failed it a moment ago: nothing left to do
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fail_stale_trials is experimental": it has been stable since 2.9
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    return failed + sorted(before - after)


def claim(study, spec: SweepSpec, storage_url: str, *, retry_failed: bool = False,
          space: DesignSpace | None = None) -> tuple[Any, list[Task]] | None:
    """Under the study lock: fail dead trials, enqueue tasks with no live trial, pop one. None: nothing to claim.

    `space`: the study's parameters (`design_space(spec)`; a worker computes it once and passes it).
    """
    from optuna.trial import TrialState

    tasks = spec.tasks()
    space = space or design_space(spec)
    with study_lock(storage_url, spec.study_name):
        fail_dead_trials(study)
        states = task_states(study, tasks)
        redo = REDO + (("failed",) if retry_failed else ())
        for task in tasks:
            if states[task.task_id] in redo:
                study.enqueue_trial(space.coordinates(task), user_attrs=task_attrs(task), skip_if_exists=False)
        if spec.search is not None:
            _enqueue_crashed_search_trials(study, space)
            waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if not waiting and _search_trials_claimed(study) < spec.search["trials"]:
                # a new search trial: the coordinates the search does not vary are fixed, the sampler draws the rest
                study.enqueue_trial(space.search_fixed, user_attrs={"pdl.search": True, SEEDS_ATTR: spec.seeds})
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            trial = study.ask()
            suggest_coordinates(trial, space)
            if trial.user_attrs.get(TASK_ATTR):
                return _own(trial), [task_from_attrs(trial.user_attrs)]
            return _own(trial), _search_tasks(spec, trial)
    return None


def _own(trial):
    """Record which process runs the trial, so a dead worker on this host is noticed at once."""
    storage, tid = trial.study._storage, trial._trial_id
    storage.set_trial_system_attr(tid, "pdl.host", process_namespace())
    storage.set_trial_system_attr(tid, "pdl.pid", os.getpid())
    storage.set_trial_system_attr(tid, "pdl.pid_start", process_start(os.getpid()) or 0.0)
    return trial


def _search_trials_claimed(study) -> int:
    """Search trials that count towards `search.trials`: all but those to be re-run (crashed, interrupted)."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.user_attrs.get("pdl.search") and trial_state(t) not in ("crashed", "interrupted"))


def _enqueue_crashed_search_trials(study, space: DesignSpace) -> None:
    """A search trial whose worker died (or was stopped by an outage) is re-run with the same sampled parameters."""
    trials = study.get_trials(deepcopy=False)
    redo = ("crashed", "interrupted")
    live = {t.user_attrs.get(SEARCH_POINT_ATTR) for t in trials if trial_state(t) not in redo}
    for t in trials:
        point = t.user_attrs.get(SEARCH_POINT_ATTR)
        if point and trial_state(t) in redo and point not in live:
            # space.search_fixed first: a trial of an older study may lack the coordinates the search does not vary
            study.enqueue_trial(space.search_fixed | t.params, user_attrs={SEARCH_POINT_ATTR: point, "pdl.search": True})
            live.add(point)


def _search_tasks(spec: SweepSpec, trial) -> list[Task]:
    """The configuration a search trial sampled (or was enqueued with; `suggest_coordinates` ran): one task per seed."""
    params = trial.params
    overrides = {key: params[key] for key in spec.search["space"]}  # type: ignore[index]
    label = f"trial {trial.number}: {point_label(overrides)}"
    trial.set_user_attr("pdl.search", True)
    trial.set_user_attr(SEARCH_POINT_ATTR, config_hash(sorted(overrides.items()))[:12])
    trial.set_user_attr("pdl.label", label)
    trial.set_user_attr(SEEDS_ATTR, spec.seeds)
    return [Task(label, overrides, seed) for seed in spec.seeds]


def task_json(task: Task) -> str:
    """A task as JSON (kept in the study while its failure waits for MLflow)."""
    return json.dumps(dataclasses.asdict(task))


def task_from_json(text: str) -> Task:
    """The task `task_json` wrote."""
    return Task(**json.loads(text))


# ----------------------------------------------------------------------------------------------
# Heartbeats


class Heartbeat:
    """Records the trial's heartbeat every `interval` s in a thread (what `study.optimize` does for us).

    When no heartbeat could be recorded for half the grace period, the storage is taken to be down and
    the trial must stop (`check`, called between training steps by `callback`): past the grace period
    another worker would see a stale heartbeat and re-run the trial while this one still trains it.
    """

    def __init__(self, storage, trial_id: int, interval: int, grace_period: int, storage_url: str):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.patience, self.storage_url = grace_period / 2, storage_url
        self.lost: ServerUnreachable | None = None
        self._last_ok = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Heartbeat:
        self.storage.record_heartbeat(self.trial_id)
        self._last_ok = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
                self._last_ok = time.monotonic()
            except Exception as exc:  # counted, not dropped: `check` turns a long silence into the outage error
                if self.lost is None and time.monotonic() - self._last_ok >= self.patience:
                    self.lost = storage_down(self.storage_url, f"no heartbeat for {self.patience:.0f}s: {one_line(exc)}")

    def check(self) -> None:
        """Raise the storage's outage if heartbeats have been failing for too long."""
        if self.lost is not None:
            raise self.lost

    def callback(self):
        """A Lightning callback that stops training (raising the outage) once heartbeats are lost."""
        from lightning.pytorch.callbacks import Callback

        beat = self

        class StopWithoutHeartbeat(Callback):
            def on_train_batch_start(self, *args: Any) -> None:
                beat.check()

        return StopWithoutHeartbeat()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
