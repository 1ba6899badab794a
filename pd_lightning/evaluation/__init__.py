"""Evaluation of an exported model through lm-evaluation-harness, by suite, optionally into MLflow.

One module per concern:

    suites.py     which tasks a suite runs (TaskSpec, the suite YAMLs), the harness's task registry with our
                  tasks in it
    task_data.py  the local tasks' items as JSON-lines files shipped beside their YAMLs (read there without
                  the lab), made by the corpus generators; `python -m pd_lightning.evaluation.write_task_data`
    model_dir.py  an exported model dir: checked before loading, and what its info files say (trained seq_len)
    heldout.py    the held-out token metrics of an export: which data and teacher, then the pass
    scores.py     a task's primary metric out of the harness's results, in percent where it is a fraction
                  (for display: MLflow gets lm-eval's fractions, `pd_lightning.tracking`)
    harness.py    `evaluate`: load lm-eval's `hf` model once, run each task, collect the scores

What a result logs to MLflow (`eval.*` metrics, tags, files) is `pd_lightning.tracking`; `pdl eval` is in
`pd_lightning.cli`. Everything other code imports is re-exported here.
"""

from __future__ import annotations

from pd_lightning.evaluation.harness import evaluate, evaluate_with_config, load_lm
from pd_lightning.evaluation.heldout import check_heldout_sources, heldout_defaults, heldout_for_dir, resolve_heldout_args
from pd_lightning.evaluation.model_dir import trained_seq_len
from pd_lightning.evaluation.scores import PERCENT_METRICS, TaskScore, format_score, score_task
from pd_lightning.evaluation.suites import (
    SUITES_DIR,
    TASKS_DIR,
    TaskSpec,
    available_suites,
    load_suite,
    our_task_names,
    resolve_tasks,
    task_manager,
)
from pd_lightning.evaluation.task_data import HELDOUT_FEWSHOT_ITEMS, LOCAL_DATASETS, dataset_files, task_data_dir
from pd_lightning.tracking import (
    EVAL_UNIT,
    EVAL_UNIT_TAG,
    FEWSHOT_GAIN,
    FEWSHOT_PAIRS,
    HELDOUT_ARTIFACT_NAME,
    ICL_METRIC_PREFIX,
    ICL_TASK_PREFIX,
    RESULTS_ARTIFACT_DIR,
    RESULTS_ARTIFACT_NAME,
    is_accuracy_metric,
    log_heldout,
    log_to_mlflow,
    metric_items,
)

__all__ = [
    "EVAL_UNIT", "EVAL_UNIT_TAG", "FEWSHOT_GAIN", "FEWSHOT_PAIRS", "HELDOUT_ARTIFACT_NAME", "HELDOUT_FEWSHOT_ITEMS",
    "ICL_METRIC_PREFIX", "ICL_TASK_PREFIX", "LOCAL_DATASETS", "PERCENT_METRICS", "RESULTS_ARTIFACT_DIR",
    "RESULTS_ARTIFACT_NAME", "SUITES_DIR", "TASKS_DIR", "TaskScore", "TaskSpec", "available_suites",
    "check_heldout_sources", "dataset_files", "evaluate", "evaluate_with_config", "format_score", "heldout_defaults",
    "heldout_for_dir", "is_accuracy_metric", "load_lm", "load_suite", "log_heldout", "log_to_mlflow",
    "metric_items", "our_task_names", "resolve_heldout_args", "resolve_tasks", "score_task", "task_data_dir",
    "task_manager", "trained_seq_len",
]
