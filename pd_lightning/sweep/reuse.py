"""`pdl sweep run --reuse-runs`: take a finished run of the same configuration instead of training it again.

The paper's tables share rows: the LM-only student and vanilla PD appear in Tables 1, 2, 4, 5, 8, 11
and 13, and at one scale they are the same configuration. With `--reuse-runs` a task whose result key
matches a finished, evaluated run anywhere in the same MLflow store gets a copy of that run in its own
sweep's experiment, under its own parent: every metric's full history (checkpoint scores by step, the
learning curve) and tag of the source, its own configuration's params and design tags, and the tag
`pd.reused_from` naming the source run. Artifacts stay with the source: `pd.artifacts_of` gives its
artifact URI, and the inherited `pd.model_id` its student (the source's MLflow logged model), which
`--register` registers for the copy too. The copy keeps the source's `mlflow.source.git.commit`: its
results are of the source's code.

The result key (`pd.result_key`, tagged on every sweep run) is the content hash of the trial's whole
configuration with the fields that only say where it writes blanked: `trainer.out` (the sweep's own
trial dir), `tracking.experiment` and `tracking.run_name` (the sweep's names) and the tracking URI.
The inputs' paths (`data.out`, `teacher.out`) stay in the key: in a sweep cache they are named by the
hash of what built them, so equal paths are equal data and teacher; two caches never share a run. The
store is named by its teacher, data and codec (its cache marker), not its path; its cut (`store_p`,
`store_k`, set to the store's own by the cache) is in the key anyway. Two stores of the same teacher,
data, codec and cut hold the same entries whatever else one holds (the power sums AdaKD adds), and the
cache hands a sweep whichever of them it finds first. The seed is part of the configuration, so a copy is the same replicate.

Training is deterministic per configuration on one machine, so a copy stands for exactly the run it
replaces; across commits the copy is of the source's code (the source run's tags say which).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from pd_lightning._source import COMMIT_TAG
from pd_lightning.artifacts import CACHE_MARKER, RUN_STATE
from pd_lightning.config import PDLConfig, config_hash

log = logging.getLogger(__name__)

RESULT_KEY_TAG = "pd.result_key"
REUSED_FROM_TAG = "pd.reused_from"
ARTIFACTS_OF_TAG = "pd.artifacts_of"


def result_key(cfg: PDLConfig) -> str:
    """The configuration's identity across sweeps: its hash with where-it-writes fields blanked (module doc).

    An LM-only run (α = 0) reads no logits: its `logits` section and every `loss` field but α are left
    out too, so the LM-only baseline of a sweep whose store is top-1.0-100 (Table 8) or that sets a
    loss for every row (Table 3) is the same run as everyone else's. Its teacher stays in: the held-out
    agreement and KL are measured against it.
    """
    same = copy.deepcopy(cfg)
    same.trainer.out = ""
    same.tracking.experiment = None
    same.tracking.run_name = None
    same.tracking.tracking_uri = None
    same.tracking.config_file = ""
    if cfg.loss.alpha == 0:
        same.logits = type(cfg.logits)()
        same.loss = type(cfg.loss)(alpha=0.0)
    else:
        same.logits.store = _store_identity(cfg.logits.store)
    return config_hash("result", same)


def _store_identity(store: str) -> str:
    """A cached store's teacher, data and codec (its marker) instead of its path (module doc); a store
    outside a sweep cache is named by its path."""
    marker = Path(store) / CACHE_MARKER
    if not marker.is_file():
        return store
    info = json.loads(marker.read_text())
    return json.dumps({k: info.get(k) for k in ("teacher_id", "data", "encoding_version", "sampling", "samples",
                                                 "sample_seed")}, sort_keys=True)


def find_source(client, key: str, objective: str, *, exclude_experiment: str | None = None):
    """The earliest finished run tagged with `key` that logged `objective` and is not itself a copy, or None.

    Runs of `exclude_experiment` (the sweep's own) are left out: a sweep never copies its own trials.
    """
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
                   if e.experiment_id != exclude_experiment]
    if not experiments:
        return None
    runs = client.search_runs(experiments, filter_string=f"tags.`{RESULT_KEY_TAG}` = '{key}' and "
                              "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"])
    for run in runs:
        if objective in run.data.metrics and REUSED_FROM_TAG not in run.data.tags:
            return run
    return None


_WHERE_TAGS = ("pd.sweep", "pd.scale", "pd.study", "pd.trial", "pd.label", "pd.point", "pd.baseline", "pd.group",
               "pd.task", "pd.error")


def copy_run(client, source, cfg: PDLConfig, experiment_id: str, *, tags: dict[str, str], trial_dir: Path) -> str:
    """A FINISHED copy of `source` in `experiment_id`: every metric's history and tag, with the params and
    design tags of `cfg` (the task's own configuration: an LM-only baseline's logits fields may differ).

    The copy's id is written to the trial dir's run state first, so a copy interrupted half-way is found
    and deleted by the next attempt (`finished_copy`) instead of being left RUNNING beside a new one.
    """
    from mlflow.entities import Metric, Param, RunTag

    from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

    from pd_lightning.config import flatten
    from pd_lightning.tracking import design_tags

    kept = {k: v for k, v in source.data.tags.items()
            if (not k.startswith("mlflow.") or k == COMMIT_TAG) and k not in _WHERE_TAGS}  # the source's code
    kept |= design_tags(cfg, teacher=source.data.tags.get("pd.teacher") or None)
    note = (f"A copy of run {source.info.run_id} (experiment {source.info.experiment_id}): the same configuration "
            f"(result key {source.data.tags.get(RESULT_KEY_TAG)}), taken by `pdl sweep run --reuse-runs` instead of "
            "training it again. Its artifacts are the source's.")
    run = client.create_run(experiment_id, run_name=cfg.tracking.run_name, tags=kept | tags | {
        REUSED_FROM_TAG: source.info.run_id, ARTIFACTS_OF_TAG: source.info.artifact_uri,
        "mlflow.note.content": note})
    run_id = run.info.run_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / RUN_STATE).write_text(json.dumps({"run_id": run_id, "reused_from": source.info.run_id}))
    # as Lightning's MLFlowLogger.log_hyperparams logs them (an empty list is no param, values cut at 250)
    params = [Param(k, str(v)[:250]) for k, v in _flatten_dict(_convert_params(flatten(cfg))).items()]
    for i in range(0, len(params), 100):  # MLflow's limit per batch
        client.log_batch(run_id, params=params[i:i + 100])
    metrics: list[Any] = []
    for key in sorted(source.data.metrics):
        metrics += [Metric(m.key, m.value, m.timestamp, m.step) for m in client.get_metric_history(source.info.run_id, key)]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    client.log_batch(run_id, tags=[RunTag("pd.copy_complete", "true")])
    client.set_terminated(run_id, "FINISHED")
    return run_id


def finished_copy(client, trial_dir: Path) -> str | None:
    """The complete copy an earlier attempt of this task made (its id), or None; an unfinished one is deleted.

    A worker killed after copying but before telling Optuna leaves a complete copy: the re-run takes it.
    A worker killed half-way leaves a RUNNING copy without `pd.copy_complete`: it is deleted, and copied anew.
    """
    state = trial_dir / RUN_STATE
    if not state.is_file():
        return None
    info = json.loads(state.read_text())
    if "reused_from" not in info:
        return None
    try:
        run = client.get_run(info["run_id"])
    except Exception:  # deleted by hand
        run = None
    if run is not None and run.info.lifecycle_stage == "active" and run.data.tags.get("pd.copy_complete") == "true":
        return info["run_id"]
    if run is not None and run.info.lifecycle_stage == "active":
        log.info("sweep: deleting the unfinished copy %s an interrupted attempt left", info["run_id"])
        client.delete_run(info["run_id"])
    state.unlink()
    return None
