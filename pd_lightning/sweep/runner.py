"""Running a sweep: the coordinator (`pdl sweep run`) and the worker processes it starts on this machine.

The coordinator creates the study and the MLflow parent run, builds the shared prerequisites once,
starts `--workers` worker processes (`python -m pd_lightning.sweep worker ...`, logs in `<out>/logs/`)
and shows progress until they exit. Each worker claims tasks until none is left (see `study.claim`),
also waiting while others run in case one of them dies. Several coordinators, on one machine or many,
may run the same sweep against one shared storage: they split its tasks between them.

A task's failure is recorded in Optuna and MLflow (see `records`) and the sweep goes on. A server outage
(see `outages`) stops the workers and then the coordinator with one line naming the server.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

from pd_lightning.errors import ConfigError
from pd_lightning.sweep.cache import build_prerequisites
from pd_lightning.sweep.machine import gpu_groups, usable_cores, visible_gpus
from pd_lightning.sweep.outages import (ServerUnreachable, one_line, outage_behind, redact, storage_answers,
                                        tracking_answers, tracking_down)
from pd_lightning.sweep.records import (parent_run, record_failure, set_parent_status, tracking_uri,
                                        write_pending_failures)
from pd_lightning.sweep.space import design_space
from pd_lightning.sweep.spec import SweepSpec, Task, check_points
from pd_lightning.sweep.status import Progress, status_table
from pd_lightning.sweep.summary import write_summary
from pd_lightning.sweep.study import (ERROR_ATTR, OUTAGE_ATTR, PARENT_ATTR, Heartbeat, Place, claim, create_study,
                                      failed_trials, make_sampler, nothing_to_do, open_storage, task_states)
from pd_lightning.sweep.trial import mean_curve, report_learning_curve, run_task, validation_loss_reporter

log = logging.getLogger(__name__)
OUTAGE_PREFIX = "pdl: error: "  # how a worker's last log line starts when it stopped (see __main__)


# ----------------------------------------------------------------------------------------------
# The worker


def worker(spec: SweepSpec, place: Place, *, retry_failed: bool = False, poll_s: float = 3.0) -> int:
    """Claim and run tasks until none is left; returns how many trials this worker ran.

    Raises ServerUnreachable when the storage or MLflow stops answering (after recording what it can).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    uri = tracking_uri(spec)
    try:
        return _claim_and_run(spec, place, uri, retry_failed=retry_failed, poll_s=poll_s)
    except Exception as exc:
        outage = outage_behind(exc, place.storage, uri)
        if outage is None:
            raise
        raise outage from None


def _claim_and_run(spec: SweepSpec, place: Place, uri: str, *, retry_failed: bool, poll_s: float) -> int:
    import optuna
    from optuna.trial import TrialState

    storage = open_storage(place.storage, spec)
    study = optuna.load_study(study_name=spec.study_name, storage=storage, sampler=make_sampler(spec),
                              pruner=optuna.pruners.NopPruner())
    parent_id = study.user_attrs[PARENT_ATTR]
    space = design_space(spec)  # the study's parameters: resolved once, every claim records them
    ran = 0
    while True:
        if not tracking_answers(uri):  # claim nothing that could not be recorded
            raise tracking_down(uri, "GET /health does not answer")
        write_pending_failures(spec, study, place, parent_id)
        claimed = claim(study, spec, place.storage, retry_failed=retry_failed and ran == 0, space=space)
        if claimed is None:
            if study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
                time.sleep(poll_s)  # someone is still running: if they die, their task is ours
                continue
            return ran
        trial, tasks = claimed
        log.info("sweep: trial %d (%s) on pid %d", trial.number, ", ".join(f"{t.label} seed {t.seed}" for t in tasks),
                 os.getpid())
        values, curves, failed, outage, error = [], [], None, None, ""
        reported: set[int] = set()  # steps of val/loss reported as intermediate values
        # val/loss as the trial trains; a search trial's several seeds report their mean when the last one ends
        live = [validation_loss_reporter(trial, reported)] if len(tasks) == 1 else []
        with Heartbeat(storage, trial._trial_id, spec.heartbeat_interval, spec.grace_period, place.storage) as beat:
            for task in tasks:
                try:
                    result = run_task(spec, task, place, parent_id=parent_id, trial_number=trial.number,
                                      callbacks=[beat.callback(), *live], before_scoring=beat.check)
                except Exception as exc:  # the configuration's failure, or a server's outage: both are recorded
                    outage = outage_behind(exc, place.storage, uri)
                    failed, error = task, one_line(outage or exc)
                    log.warning("sweep: trial %d %s: %s", trial.number, "interrupted" if outage else "failed", error)
                    break
                values.append(result["value"])
                curves.append(result["curve"])
                trial.set_user_attr("pdl.run_id" if len(tasks) == 1 else f"pdl.run_id.seed{task.seed}", result["run_id"])
        ran += 1
        if failed is None:
            report_learning_curve(trial, mean_curve(curves), reported)
            study.tell(trial, sum(values) / len(values))
            continue
        trial.set_user_attr(ERROR_ATTR, error[:5000])
        if outage is not None:  # not the configuration's fault: the next claim re-runs it, resuming its checkpoint
            trial.set_user_attr(OUTAGE_ATTR, True)
            study.tell(trial, state=TrialState.FAIL)
            raise outage
        record_failure(spec, study, failed, place, parent_id, trial.number, error)
        study.tell(trial, state=TrialState.FAIL)


# ----------------------------------------------------------------------------------------------
# The coordinator: `pdl sweep run`


def run_sweep(spec: SweepSpec, place: Place, *, workers: int = 1, retry_failed: bool = False,
              threads: int | None = None) -> int:
    """Run or continue a sweep with `workers` local worker processes; returns the number of failed tasks.

    Raises ServerUnreachable (one line naming the server) when the storage or MLflow stopped answering;
    the same call once it answers again continues where the sweep stopped.
    """
    if workers < 1:
        raise ConfigError(f"--workers={workers} must be >= 1")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads={threads} must be >= 1 (or left out: the cores are split among the workers)")
    trainer = spec.base_config().trainer  # each local worker gets its own trainer.devices GPUs, if any
    gpus = gpu_groups(workers, trainer.devices, [] if trainer.accelerator == "cpu" else visible_gpus())
    uri = tracking_uri(spec)
    try:
        return _coordinate(spec, place, workers=workers, retry_failed=retry_failed, threads=threads, gpus=gpus)
    except Exception as exc:
        outage = outage_behind(exc, place.storage, uri)
        if outage is None:
            raise
        raise outage from None


def _coordinate(spec: SweepSpec, place: Place, *, workers: int, retry_failed: bool, threads: int | None,
                gpus: list[str | None]) -> int:
    study = create_study(spec, place)
    parent_id = parent_run(spec, study, place.storage)
    write_pending_failures(spec, study, place, parent_id)
    tasks = spec.tasks()
    for label, message in check_points(spec).items():
        log.warning("sweep: warning: configuration %r is invalid and will be recorded as failed: %s", label, message)
    states = task_states(study, tasks)
    total = len(tasks) + (spec.search["trials"] if spec.search else 0)
    done = sum(1 for s in states.values() if s == "complete")
    # The sweep's own summary (stdout, like the table at the end): what `pdl sweep run` was asked for.
    print(f"sweep: {spec.name} [{spec.scale}] - {spec.table or spec.description.splitlines()[0] if spec.description else ''}"
          .rstrip(" -"), flush=True)
    print(f"sweep: {total} trials ({done} already complete), {workers} worker(s); study {spec.study_name!r} in "
          f"{redact(place.storage)}; MLflow experiment {spec.experiment!r}, parent run {parent_id}", flush=True)
    print(f"sweep: its summary in MLflow's training view: {_parent_page(spec, parent_id)}", flush=True)
    place.out.mkdir(parents=True, exist_ok=True)
    if nothing_to_do(study, spec, tasks, retry_failed):
        print(status_table(study, spec), flush=True)
        _close_parent(spec, parent_id, study, tasks)
        return len(failed_trials(study))
    build_prerequisites(spec, place)
    set_parent_status(spec, parent_id, "RUNNING")
    procs, logs = _start_workers(spec, place, workers, retry_failed=retry_failed, threads=threads, gpus=gpus)
    try:
        _watch(study, spec, place, total, procs)
    except KeyboardInterrupt:
        for proc, _ in procs:
            proc.terminate()
        raise
    finally:
        for proc, handle in procs:
            proc.wait()
            handle.close()
    stopped = [_last_error(logs / f"worker-{i}.log") for i, (p, _) in enumerate(procs)
               if p.returncode == ServerUnreachable.exit_code]
    states = task_states(study, tasks)
    failed = failed_trials(study)
    print(status_table(study, spec), flush=True)
    bad = [p for p, _ in procs if p.returncode not in (0, None)]
    if bad:
        log.warning("sweep: %d worker(s) exited with an error; see %s/", len(bad), logs)
    pending = [t for t in tasks if states[t.task_id] not in ("complete", "failed")]
    _close_parent(spec, parent_id, study, tasks)
    if stopped and not nothing_to_do(study, spec, tasks, retry_failed):  # interrupted trials are left: say why
        raise ServerUnreachable(stopped[0])
    return len(failed) + len(pending) + len(bad)


def _start_workers(spec: SweepSpec, place: Place, workers: int, *, retry_failed: bool, threads: int | None,
                   gpus: list[str | None]) -> tuple[list, Path]:
    """Start the local worker processes; returns [(process, log file)] and the logs folder."""
    threads = threads or max(1, usable_cores() // workers)  # the default splits the cores evenly
    logs = place.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(workers):
        handle = open(logs / f"worker-{i}.log", "a")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if gpus[i] is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i]
        cmd = [sys.executable, "-m", "pd_lightning.sweep", "worker", str(spec.path), "--scale", spec.scale,
               "--storage", place.storage, "--out", str(place.out), "--cache", str(place.cache),
               "--threads", str(threads)]
        if retry_failed:
            cmd.append("--retry-failed")
        if place.reuse_runs:
            cmd.append("--reuse-runs")
        if place.register:
            cmd += ["--register", place.register]
        if spec.tracking_uri:  # the coordinator's --tracking-uri (None: the store the sweep's config names)
            cmd += ["--tracking-uri", spec.tracking_uri]
        procs.append((subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env), handle))
    log.info("sweep: worker logs in %s/", logs)
    return procs, logs


def _watch(study, spec: SweepSpec, place: Place, total: int, procs: list) -> None:
    """Live progress until every worker exits; a storage that stops answering is waited out (the workers stop)."""
    progress, silent = Progress(spec, total), False
    while any(p.poll() is None for p, _ in procs):
        time.sleep(2.0)
        try:
            line = progress.line(study)
        except Exception as exc:
            if storage_answers(place.storage):
                raise
            if not silent:
                log.warning("sweep: the Optuna storage %s does not answer (%s); waiting for the workers to stop",
                            redact(place.storage), one_line(exc))
            silent = True
            continue
        silent = False
        if line:
            log.info(line)


def _last_error(path: Path) -> str:
    """The one-line error a stopped worker wrote last in its log."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.startswith(OUTAGE_PREFIX)]
    return lines[-1][len(OUTAGE_PREFIX):] if lines else f"a worker stopped because a server did not answer; see {path}"


def _parent_page(spec: SweepSpec, parent_id: str) -> str:
    """The parent run's page in the MLflow UI (a tracking server's, else `mlflow ui`'s default address)."""
    from mlflow.tracking import MlflowClient

    from pd_lightning.tracking import training_view_url

    uri = tracking_uri(spec)
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(spec.experiment)
    return training_view_url(redact(uri), experiment.experiment_id, parent_id)


def _close_parent(spec: SweepSpec, parent_id: str, study, tasks: list[Task]) -> None:
    """The parent run gets the sweep's summary (`summary`: best configuration, its Δ, trials by state, source), then
    is FINISHED when every trial completed, FAILED when some failed or are missing."""
    write_summary(spec, study, parent_id)  # a warning, never an error, when it cannot be written
    states = task_states(study, tasks)
    complete = all(states[t.task_id] == "complete" for t in tasks) and not failed_trials(study)
    set_parent_status(spec, parent_id, "FINISHED" if complete else "FAILED")
