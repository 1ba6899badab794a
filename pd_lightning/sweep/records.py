"""What a sweep keeps in MLflow besides its trials' own runs: the parent run, and the record of every failure.

A failed task's MLflow record is its run (or a new one, if training never created one), FAILED with the
error as the `pd.error` tag. Optuna holds the same error first (the trial's ERROR_ATTR); when MLflow
cannot take the record at that moment, it waits in the study (a `PENDING_PREFIX<trial>` study attr,
since a finished trial's attrs are read-only) and the next worker or coordinator that reaches MLflow
writes it (`write_pending_failures`). A failure is never dropped: it is in Optuna, and in MLflow or on
its way there with a warning in the log.
"""

from __future__ import annotations

import json
import logging

from pd_lightning._source import source_tags
from pd_lightning.artifacts import RUN_STATE
from pd_lightning.sweep.locks import study_lock
from pd_lightning.sweep.outages import one_line
from pd_lightning.sweep.spec import SweepSpec, Task
from pd_lightning.sweep.study import PARENT_ATTR, Place, task_from_json, task_json

log = logging.getLogger(__name__)
PENDING_PREFIX = "pdl.pending_failure."  # study attr + trial number: {"task", "message"}, {} once written


def tracking_uri(spec: SweepSpec) -> str:
    """The MLflow tracking URI of the sweep (its base config's, as every trial's)."""
    from pd_lightning.tracking import tracking_settings

    return tracking_settings(spec.base_config())["tracking_uri"]


def _client(spec: SweepSpec):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(spec))


def parent_run(spec: SweepSpec, study, storage_url: str) -> str:
    """The sweep's MLflow parent run (created once; its id is kept in the study; `summary` fills it in)."""
    from pd_lightning.tracking import ensure_experiment, tracking_settings

    with study_lock(storage_url, spec.study_name):
        run_id = study.user_attrs.get(PARENT_ATTR)
        if run_id:
            return run_id
        s = tracking_settings(spec.base_config())
        client = _client(spec)
        exp_id = ensure_experiment(client, spec.experiment, s["artifact_location"])  # MLflow's training view
        run = client.create_run(exp_id, run_name=f"{spec.name} [{spec.scale}]", tags={
            "pd.role": "sweep", "pd.sweep": spec.name, "pd.scale": spec.scale, "pd.study": spec.study_name,
            "pd.table": spec.table, "mlflow.note.content": spec.description,
            # its source in MLflow's terms: the sweep file and the code's commit (the summary adds the rest)
            "mlflow.source.name": str(spec.path.resolve()), "mlflow.source.type": "LOCAL", **source_tags()})
        client.log_text(run.info.run_id, spec.path.read_text(), "sweep.yaml")
        study.set_user_attr(PARENT_ATTR, run.info.run_id)
        study.set_user_attr("pdl.sweep_file", str(spec.path.resolve()))
        return run.info.run_id


def set_parent_status(spec: SweepSpec, parent_id: str, status: str) -> None:
    """RUNNING while workers run; FINISHED or FAILED when the coordinator is done."""
    client = _client(spec)
    if status == "RUNNING":
        client.update_run(parent_id, status="RUNNING")
    else:
        client.set_terminated(parent_id, status)


def child_tags(spec: SweepSpec, task: Task, parent_id: str, trial_number: int) -> dict[str, str]:
    """The tags that make a task's run a child of the sweep's parent run, findable by task and trial."""
    return {"mlflow.parentRunId": parent_id, "pd.sweep": spec.name, "pd.scale": spec.scale,
            "pd.study": spec.study_name, "pd.trial": str(trial_number), "pd.label": task.label,
            "pd.point": task.point, "pd.baseline": str(task.baseline).lower(), "pd.group": task.group,
            "pd.task": task.task_id}


def _write_failure(spec: SweepSpec, task: Task, place: Place, parent_id: str, trial_number: int, message: str) -> None:
    """The task's run (or a new one, if training never created one) FAILED with the error; raises when MLflow does."""
    client = _client(spec)
    state = place.trial_dir(task.task_id) / RUN_STATE
    if state.is_file():
        run_id = json.loads(state.read_text())["run_id"]
    else:
        experiment = client.get_experiment_by_name(spec.experiment)
        tags = child_tags(spec, task, parent_id, trial_number) | {"pd.seed": str(task.seed)} | source_tags()
        run_id = client.create_run(experiment.experiment_id, run_name=f"{task.label} seed {task.seed}", tags=tags).info.run_id
        for key, value in task.overrides.items():
            client.log_param(run_id, key, value)
    client.set_tag(run_id, "pd.error", message[:5000])
    client.set_terminated(run_id, "FAILED")


def record_failure(spec: SweepSpec, study, task: Task, place: Place, parent_id: str, trial_number: int,
                   message: str) -> bool:
    """Make a failed task visible in MLflow; when MLflow does not take it, the record waits in the study.

    The record is kept in the study first and cleared once MLflow has it, so a worker killed in between
    leaves it to the next one instead of losing it. Returns whether MLflow has the record now.
    """
    key = f"{PENDING_PREFIX}{trial_number}"
    with study_lock(place.storage, spec.study_name):  # one writer per record (see write_pending_failures)
        study.set_user_attr(key, {"task": task_json(task), "message": message})
        try:
            _write_failure(spec, task, place, parent_id, trial_number, message)
        except Exception as exc:  # MLflow refused or is down: the record waits in the study, with a warning
            log.warning("sweep: trial %d failed and MLflow did not take its record (%s); it is kept in the Optuna "
                        "study and written to MLflow by the next worker or `pdl sweep run` that reaches it",
                        trial_number, one_line(exc))
            return False
        study.set_user_attr(key, {})
    return True


def pending_failures(study) -> dict[int, dict]:
    """Trial number -> the failure record that still waits for MLflow."""
    return {int(key[len(PENDING_PREFIX):]): value for key, value in study.user_attrs.items()
            if key.startswith(PENDING_PREFIX) and value}


def write_pending_failures(spec: SweepSpec, study, place: Place, parent_id: str) -> int:
    """Write the failure records MLflow could not take before (under the study lock: once each); returns how many.

    A record MLflow still refuses stays pending, and the error propagates (the caller checks MLflow's outage).
    """
    if not pending_failures(study):
        return 0
    written = 0
    with study_lock(place.storage, spec.study_name):
        for number, record in pending_failures(study).items():  # read again under the lock
            _write_failure(spec, task_from_json(record["task"]), place, parent_id, number, record["message"])
            study.set_user_attr(f"{PENDING_PREFIX}{number}", {})
            written += 1
    if written:
        log.info("sweep: wrote %d failure record(s) to MLflow that had waited in the study", written)
    return written
