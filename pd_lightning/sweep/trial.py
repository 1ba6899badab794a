"""One task of a sweep: train (resuming or reusing its run), evaluate, and read back its objective.

The task's training run lives in a directory named by the task (`Place.trial_dir`), so a re-run of an
interrupted trial resumes its checkpoint in the same MLflow child run, and a finished one is reused
as it is (only a missing evaluation is done).

The trial's intermediate values are the run's `val/loss` by step (what the dashboard draws as learning
curves): reported live by `ValidationLossReporter` when the trial trains one seed, and completed from
the run's MLflow history when it ends (`report_learning_curve`), which also holds the steps a resumed
run trained before its trial was re-run. A search trial trains every seed one after another: its curve
is their mean at each step, reported when the last one ends. Nothing reads them to prune.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pd_lightning.artifacts import MODEL_DIR
from pd_lightning.errors import UserError
from pd_lightning.student_model import MODEL_ID_TAG, register_student
from pd_lightning.sweep.cache import quiet_builds, reference_teacher, with_prerequisites
from pd_lightning.sweep.records import child_tags
from pd_lightning.sweep.reuse import RESULT_KEY_TAG, copy_run, find_source, finished_copy, result_key
from pd_lightning.sweep.spec import SweepSpec, Task
from pd_lightning.sweep.study import Place

VAL_LOSS = "val/loss"  # logged by the training module at every validation (trainer.val_every_n_steps)


def run_task(spec: SweepSpec, task: Task, place: Place, *, parent_id: str, trial_number: int,
             callbacks: list | None = None, before_scoring: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train and evaluate one task; returns {"run_id", "value"} (the objective the run logged).

    `callbacks`: extra Lightning callbacks of the worker (its heartbeat watch); `before_scoring`
    runs before each evaluation (which no callback sees): the same checks between training and scoring.
    """
    from mlflow.tracking import MlflowClient

    from pd_lightning.evaluation import evaluate_with_config, log_to_mlflow, metric_items
    from pd_lightning.tracking import tracking_settings
    from pd_lightning.train import train

    with quiet_builds():  # the coordinator built them; a worker only finds them
        cfg = with_prerequisites(spec.config_for(task), place.cache)
    cfg.trainer.out = str(place.trial_dir(task.task_id))
    cfg.tracking.experiment = spec.experiment
    cfg.tracking.run_name = f"{task.label} seed {task.seed}"
    tags = child_tags(spec, task, parent_id, trial_number) | {RESULT_KEY_TAG: result_key(cfg)}
    uri = tracking_settings(cfg)["tracking_uri"]
    client = MlflowClient(tracking_uri=uri)
    if place.reuse_runs:
        reused = _reused_run(client, spec, cfg, tags, place.trial_dir(task.task_id))
        if reused is not None:
            if place.register:  # a copy's student is its source's logged model (the inherited pd.model_id tag)
                register_student(client, reused["run_id"], place.register)
            return reused
    info = train(cfg, tags=tags, callbacks=callbacks or None, heldout_teacher=reference_teacher(cfg, place.cache),
                 register=place.register)
    run = client.get_run(info["run_id"])
    if run.data.tags.get("pd.trial") != str(trial_number):  # a re-run trial reuses the run: point it here
        client.set_tag(info["run_id"], "pd.trial", str(trial_number))
    if spec.evaluate and "eval.average" not in run.data.metrics:
        final_step = int(info.get("steps", cfg.trainer.max_steps))
        for export in info.get("exports", []):  # intermediate checkpoints (Table 12): scores by step
            if int(export["step"]) >= final_step:
                continue  # the final model is scored below
            if before_scoring:
                before_scoring()
            result = evaluate_with_config(export["path"], cfg)
            for key, value in metric_items(result).items():
                client.log_metric(info["run_id"], key, value, step=int(export["step"]))
        if before_scoring:
            before_scoring()
        result = evaluate_with_config(Path(cfg.trainer.out) / MODEL_DIR, cfg)
        log_to_mlflow(result, info["run_id"], tracking_uri=uri, step=final_step,
                      model_id=run.data.tags.get(MODEL_ID_TAG))  # the scores of the run's logged model
    metrics = client.get_run(info["run_id"]).data.metrics
    if spec.objective_metric not in metrics:
        raise UserError(f"objective.metric={spec.objective_metric!r} was not logged by the run; it logged "
                        f"{', '.join(sorted(metrics)) or 'nothing'}")
    return {"run_id": info["run_id"], "value": float(metrics[spec.objective_metric]),
            "curve": learning_curve(client, info["run_id"])}


def _reused_run(client, spec: SweepSpec, cfg, tags: dict[str, str], trial_dir: Path) -> dict[str, Any] | None:
    """The task's result as a copy of a finished run of the same configuration (`--reuse-runs`), or None."""
    run_id = finished_copy(client, trial_dir)
    if run_id is None:
        experiment = client.get_experiment_by_name(spec.experiment)
        source = find_source(client, tags[RESULT_KEY_TAG], spec.objective_metric,
                             exclude_experiment=experiment.experiment_id)
        if source is None:
            return None
        run_id = copy_run(client, source, cfg, experiment.experiment_id, tags=tags, trial_dir=trial_dir)
    metrics = client.get_run(run_id).data.metrics
    return {"run_id": run_id, "value": float(metrics[spec.objective_metric]), "curve": learning_curve(client, run_id)}


def learning_curve(client, run_id: str) -> dict[int, float]:
    """The run's validation loss by step, from MLflow (every step it logged, earlier sessions included)."""
    return {int(m.step): float(m.value) for m in client.get_metric_history(run_id, VAL_LOSS)}


def mean_curve(curves: list[dict[int, float]]) -> dict[int, float]:
    """The mean over several seeds' curves at each step all of them have."""
    if not curves:
        return {}
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return {step: sum(c[step] for c in curves) / len(curves) for step in steps}


def report_learning_curve(trial, curve: dict[int, float], reported: set[int]) -> None:
    """Report every step of `curve` not reported yet as the trial's intermediate value (Optuna keeps the first)."""
    for step in sorted(set(curve) - reported):
        trial.report(curve[step], step)
        reported.add(step)


def logged_step(trainer) -> int:
    """The step the run's loggers record a validation under (MLflow's `val/loss` step).

    Lightning logs with its loop's count of batches that stepped, which a validation between steps sees
    one below `global_step`; Lightning's own LearningRateMonitor logs with the same counter. Reporting
    under it keeps the dashboard's steps equal to MLflow's, and the live and backfilled values one curve.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


def validation_loss_reporter(trial, reported: set[int]):
    """A Lightning callback reporting `val/loss` at each validation as the trial's intermediate value (rank 0)."""
    from lightning.pytorch.callbacks import Callback

    class ValidationLossReporter(Callback):
        def on_validation_end(self, trainer, module) -> None:
            value = trainer.callback_metrics.get(VAL_LOSS)
            if trainer.is_global_zero and value is not None and not trainer.sanity_checking:
                report_learning_curve(trial, {logged_step(trainer): float(value)}, reported)

    return ValidationLossReporter()
