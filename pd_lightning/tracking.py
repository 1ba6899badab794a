"""MLflow: explicit tracking URIs (sqlite in the working dir by default), experiments, run tags, and what an
evaluation logs to a run (`eval.*` metrics, tags and result files).

Metric names of an evaluation: `eval.<task>` (an accuracy-like score) and `eval.<task>.stderr`,
`eval.<task>.<metric>` for a task whose primary metric is not accuracy-like (perplexities), `eval.average`,
`eval.icl.<name>` for the in-context learning task `icl_<name>` (outside the Average) and
`eval.heldout.<name>` (`pd_lightning.metrics`).

Units: accuracy-like metrics are fractions in [0, 1] in MLflow, as lm-eval reports them (`eval.average`
too, and `eval.icl.fewshot_gain` is a difference of fractions); percent is a display unit only (`pdl
eval`'s table, `evaluate()`'s result, the paper-style tables of `analysis`). A run logged so carries the
tag `eval.unit=fraction`; runs logged before it have no such tag and hold percentages, which `analysis`
reads as such (`is_accuracy_metric` names which metrics the unit applies to).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pd_lightning.config import PDLConfig, TrackingConfig
from pd_lightning.errors import ConfigError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACTS = "./mlartifacts"
RESULTS_ARTIFACT_DIR = "eval"  # a run's evaluation files: the raw harness results and the held-out metrics
RESULTS_ARTIFACT_NAME = "lm_eval_results.json"
HELDOUT_ARTIFACT_NAME = "heldout.json"  # beside lm_eval_results.json: metrics, token count, reliability bins
# In-context learning tasks (`icl_<name>`) log as `eval.icl.<name>`, so `eval.<task>` stays the Average's tasks.
ICL_TASK_PREFIX, ICL_METRIC_PREFIX = "icl_", "eval.icl."
# few-shot task -> its 0-shot twin: `eval.icl.fewshot_gain` = few-shot score − 0-shot score (points)
FEWSHOT_PAIRS = {"icl_facts_5shot": "synth_facts"}
FEWSHOT_GAIN = ICL_METRIC_PREFIX + "fewshot_gain"
HELDOUT_METRIC_PREFIX = "eval.heldout."  # pd_lightning.metrics: their own units (top1_acc already a fraction)
# Harness metrics that are fractions in [0, 1]: accuracy-like, shown in percent, averaged into eval.average.
ACCURACY_METRICS = frozenset({"acc", "acc_norm", "acc_mutual_info", "exact_match", "em", "f1", "mc1", "mc2", "mcc"})
EVAL_UNIT_TAG, EVAL_UNIT = "eval.unit", "fraction"  # the unit of a run's accuracy-like eval.* metrics
# The experiment's kind as MLflow 3's UI records it: "Machine learning" (runs, metrics, models), not GenAI
# (traces, evaluations). Values the UI knows: custom_model_development, genai_development, finetuning
# (mlflow/server/js: ExperimentKind). Without it the UI asks, or guesses from what the experiment holds.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


# What `#/experiments/<id>` shows is decided in MLflow 3.17 by the UI's own switch (sidebar "GenAI | Model
# training", kept per browser, GenAI in a fresh one), not by the tag above: a fresh browser gets the GenAI
# overview (checked in headless Chromium, tests/test_mlflow_ui.py). A link that names the workflow type opens
# the training view in any browser (`training_view_url`); the lab prints those.
UI_WORKFLOW_PARAM = "workflowType=machine_learning"
MLFLOW_UI_DEFAULT = "http://127.0.0.1:5000"  # `mlflow ui`'s address unless told otherwise


def training_view_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment's runs (or of one run) in the classic training view.

    A tracking server serves the UI at its own address; for a sqlite store the page is that of
    `mlflow ui --backend-store-uri ... --port 5000` (MLFLOW_UI_DEFAULT).
    """
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else MLFLOW_UI_DEFAULT
    page = f"experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{base}/#/{page}?{UI_WORKFLOW_PARAM}"


def ensure_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created if missing, tagged for MLflow's training view. An existing
    experiment without the tag gets it; one whose kind a user already chose keeps it."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # another process created it between the lookup and here
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def tracking_settings(cfg: PDLConfig) -> dict[str, str | None]:
    """tracking_uri, artifact_location and experiment: config fields first, then `tracking.config_file`."""
    file_settings: dict[str, Any] = {}
    path = Path(cfg.tracking.config_file)
    if path.is_file():
        try:
            file_settings = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            raise ConfigError(f"tracking.config_file={str(path)!r} is not valid YAML") from None
        if not isinstance(file_settings, dict):
            raise ConfigError(f"tracking.config_file={str(path)!r} must hold a mapping (tracking_uri, artifact_location, experiment)")
    uri = cfg.tracking.tracking_uri or file_settings.get("tracking_uri") or DEFAULT_TRACKING_URI
    if "://" not in uri and not uri.startswith("sqlite:"):
        raise ConfigError(f"tracking.tracking_uri={uri!r} must be a URI such as sqlite:///mlflow.db or "
                          "http://127.0.0.1:5000 (MLflow 3 has no plain-directory file store)")
    if cfg.tracking.tracking_uri is None and file_settings.get("artifact_location"):
        artifacts = file_settings["artifact_location"]
    elif uri.startswith("sqlite:///"):
        # Artifacts live beside the sqlite store they belong to, wherever that is.
        artifacts = str(Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts")
    elif uri.startswith(("http://", "https://")):
        artifacts = None  # a tracking server: its own artifact root (--artifacts-destination), not this machine's dir
    else:
        artifacts = DEFAULT_ARTIFACTS
    if artifacts is not None and "://" not in artifacts:
        artifacts = Path(artifacts).resolve().as_uri()
    experiment = cfg.tracking.experiment or file_settings.get("experiment") or "pd-lightning"
    return {"tracking_uri": uri, "artifact_location": artifacts, "experiment": experiment}


def design_tags(cfg: PDLConfig, *, teacher: str | None) -> dict[str, str]:
    """Tags for the design-space coordinates of a run (what analysis groups and filters by)."""
    lm_only = cfg.loss.alpha == 0.0
    sampled = cfg.logits.sampling == "sample" and not lm_only  # a sampled run has no top-p-k cut: no p, k
    return {
        "pd.kind": "lm" if lm_only else "kd",
        "pd.p": "" if sampled else str(cfg.logits.p),
        "pd.k": "" if sampled else str(cfg.logits.k),
        "pd.sampling": "" if lm_only else cfg.logits.sampling,  # topk | sample (logits.sampling)
        "pd.samples": str(cfg.logits.samples) if sampled else "",
        "pd.tau": str(cfg.logits.tau),
        "pd.method": cfg.logits.method,
        "pd.loss": cfg.loss.kind,
        "pd.alpha": str(cfg.loss.alpha),
        "pd.alpha_schedule": cfg.loss.alpha_schedule,
        "pd.lr_schedule": cfg.optim.lr_schedule,
        "pd.student": cfg.model.preset,
        "pd.teacher": "" if lm_only else (teacher or ""),
        "pd.logits_mode": "" if lm_only else cfg.logits.mode,
        "pd.seed": str(cfg.trainer.seed),
    }


def resolve_tracking_uri(tracking_uri: str | None = None, config_file: str | Path = "mlflow.yaml") -> str:
    """The explicit URI, else the config file's `tracking_uri`, else a sqlite file in the working dir."""
    cfg = PDLConfig(tracking=TrackingConfig(config_file=str(config_file), tracking_uri=tracking_uri))
    return tracking_settings(cfg)["tracking_uri"]


def mlflow_client(tracking_uri: str | None, config_file: str | Path = "mlflow.yaml"):
    """An MlflowClient on an explicit URI (`resolve_tracking_uri`)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri, config_file))


def check_run(run_id: str, tracking_uri: str | None, config_file: str | Path = "mlflow.yaml") -> None:
    """Refuse a run id the tracking store does not know, in one line."""
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri, config_file)
    try:
        mlflow_client(uri).get_run(run_id)
    except MlflowException:
        raise ConfigError(f"run_id={run_id!r} is not a run in the MLflow store {uri}; give the training run's id "
                          "(printed by `pdl train`, or in the MLflow UI)") from None


def task_key(task: str) -> str:
    """The MLflow name of a task's primary score: `eval.<task>`, or `eval.icl.<name>` for a task `icl_<name>`."""
    if task.startswith(ICL_TASK_PREFIX):
        return ICL_METRIC_PREFIX + task[len(ICL_TASK_PREFIX):]
    return f"eval.{task}"


def fewshot_gains(result: dict[str, Any]) -> dict[str, float]:
    """`eval.icl.fewshot_gain`: few-shot minus 0-shot score (points), when both tasks of a FEWSHOT_PAIRS entry ran."""
    tasks = result["tasks"]
    return {FEWSHOT_GAIN: tasks[few]["value"] - tasks[zero]["value"]
            for few, zero in FEWSHOT_PAIRS.items() if few in tasks and zero in tasks}


def is_accuracy_metric(key: str) -> bool:
    """Whether an MLflow metric is an accuracy-like eval score (a fraction in MLflow, percent in tables).

    By name, as `metric_items` makes them: `eval.<task>`, `eval.average`, `eval.icl.<name>` and
    `eval.icl.fewshot_gain`, `eval.<task>.<metric>` for a metric in ACCURACY_METRICS, and the `.stderr`
    of each; not `eval.heldout.*`, perplexities or bits per byte.
    """
    if not key.startswith("eval.") or key.startswith(HELDOUT_METRIC_PREFIX):
        return False
    parts = key.removeprefix(ICL_METRIC_PREFIX if key.startswith(ICL_METRIC_PREFIX) else "eval.").split(".")
    if parts[-1] == "stderr":
        parts = parts[:-1]
    return len(parts) == 1 or (len(parts) == 2 and parts[1] in ACCURACY_METRICS)


def _as_fraction(key: str, value: float) -> float:
    """An evaluation result's value (percent where accuracy-like) in MLflow's unit (lm-eval's fraction)."""
    return value / 100.0 if is_accuracy_metric(key) else value


def metric_items(result: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of an evaluation result (`pd_lightning.evaluation.evaluate`), named as above.

    The result holds accuracy-like scores in percent (for display); these are fractions, as lm-eval
    reports them.
    """
    items: dict[str, float] = {}
    for name, s in result["tasks"].items():
        key = task_key(name) if s["percent"] else f"{task_key(name)}.{s['metric']}"
        items[key] = s["value"]
        if s["stderr"] is not None:
            items[f"{key}.stderr"] = s["stderr"]
        if not s["percent"]:
            items.update({f"{task_key(name)}.{m}": v for m, v in s["extra"].items()})
    items.update(fewshot_gains(result))
    if result["average"] is not None:
        items["eval.average"] = result["average"]
    items = {key: _as_fraction(key, value) for key, value in items.items()}
    if result.get("heldout"):
        from pd_lightning.metrics import HeldoutMetrics

        items.update(HeldoutMetrics(**result["heldout"]).mlflow_metrics())
    return items


def _log_json(client, run_id: str, name: str, obj: Any, **dumps: Any) -> None:
    """`obj` as the JSON artifact `eval/<name>` of a run (written to a temp dir, then uploaded)."""
    with tempfile.TemporaryDirectory(prefix="pdl-eval-") as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(obj, indent=2, **dumps), encoding="utf-8")
        client.log_artifact(run_id, str(path), artifact_path=RESULTS_ARTIFACT_DIR)


def log_to_mlflow(result: dict[str, Any], run_id: str, *, tracking_uri: str | None = None,
                  tracking_config_file: str | Path = "mlflow.yaml", step: int = 0, model_id: str | None = None) -> None:
    """Log an evaluation's metrics to an existing MLflow run, and the raw harness JSON as an artifact.

    `step` is the training step the scores belong to (a run scored at several checkpoints keeps a
    history; MLflow's latest value is the one of the highest step). `model_id`: the logged model the
    scores are of (the run's final student, `student_model`), so MLflow's Models tab shows them beside it.
    """
    from lm_eval.utils import handle_non_serializable

    client = mlflow_client(tracking_uri, tracking_config_file)
    for key, value in metric_items(result).items():
        client.log_metric(run_id, key, value, step=step, model_id=model_id)
    # Tags say what the eval.* numbers mean: which suite and harness model, and which tasks are missing
    # from eval.average because their data could not be loaded.
    client.set_tag(run_id, EVAL_UNIT_TAG, EVAL_UNIT)
    client.set_tag(run_id, "eval.suite", result["suite"] or "custom")
    client.set_tag(run_id, "eval.backend", result["backend"])
    client.set_tag(run_id, "eval.failed", ",".join(result["failed"]))
    _log_json(client, run_id, RESULTS_ARTIFACT_NAME, result["lm_eval"], default=handle_non_serializable,
              ensure_ascii=False)
    if result.get("heldout"):
        log_heldout(client, run_id, result["heldout"], teacher=result["heldout_sources"]["teacher"], step=step,
                    metrics=False)


def log_heldout(client, run_id: str, heldout: dict[str, Any], *, teacher: str | None, step: int = 0,
                metrics: bool = True) -> None:
    """Held-out metrics to a run: `eval.heldout.*` metrics, the tag `eval.heldout.teacher` (the teacher they
    were measured against, "none" without one) and `eval/heldout.json` (metrics, tokens, reliability bins)."""
    from pd_lightning.metrics import HeldoutMetrics

    if metrics:
        for key, value in HeldoutMetrics(**heldout).mlflow_metrics().items():
            client.log_metric(run_id, key, value, step=step)
    client.set_tag(run_id, "eval.heldout.teacher", str(teacher) if teacher else "none")
    _log_json(client, run_id, HELDOUT_ARTIFACT_NAME,
              {**heldout, "teacher": str(teacher) if teacher else None, "step": step})
