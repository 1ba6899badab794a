"""One task of a sweep: train (resuming or reusing its run), evaluate, and read back its objective.

The task's training run lives in a directory named by the task (`Place.trial_dir`), so a re-run of an
interrupted trial resumes its checkpoint in the same MLflow child run, and a finished one is reused
as it is (only a missing evaluation is done).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pd_lightning.artifacts import MODEL_DIR
from pd_lightning.errors import UserError
from pd_lightning.sweep.cache import quiet_builds, reference_teacher, with_prerequisites
from pd_lightning.sweep.records import child_tags
from pd_lightning.sweep.spec import SweepSpec, Task
from pd_lightning.sweep.study import Place


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
    info = train(cfg, tags=child_tags(spec, task, parent_id, trial_number), callbacks=callbacks or None,
                 heldout_teacher=reference_teacher(cfg, place.cache))
    uri = tracking_settings(cfg)["tracking_uri"]
    client = MlflowClient(tracking_uri=uri)
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
        log_to_mlflow(result, info["run_id"], tracking_uri=uri, step=final_step)
    metrics = client.get_run(info["run_id"]).data.metrics
    if spec.objective_metric not in metrics:
        raise UserError(f"objective.metric={spec.objective_metric!r} was not logged by the run; it logged "
                        f"{', '.join(sorted(metrics)) or 'nothing'}")
    return {"run_id": info["run_id"], "value": float(metrics[spec.objective_metric])}
