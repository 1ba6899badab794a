"""Scores: a task's primary metric read out of the harness's result dict, in percent where it is a fraction.

Accuracy-like metrics are reported in percent here (the result of `evaluate`, `pdl eval`'s table);
MLflow gets them back as fractions, lm-eval's unit (`pd_lightning.tracking.metric_items`). The suite's
``average`` is the mean of the tasks marked ``in_average`` (all percentages). Perplexity-like metrics
keep their own unit and stay out of the average. One harness call per task, so a result dict holds one
task (or one group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from pd_lightning.errors import ConfigError, DataError, choice_error
from pd_lightning.evaluation.suites import TaskSpec
from pd_lightning.tracking import ACCURACY_METRICS

# Harness metrics that are fractions in [0, 1] and reported x100 here; anything else keeps its unit.
PERCENT_METRICS = ACCURACY_METRICS


@dataclass
class TaskScore:
    """The primary metric of one task as reported (percent for accuracy-like metrics)."""

    task: str
    metric: str
    value: float
    stderr: Optional[float]
    percent: bool
    in_average: bool
    num_fewshot: Optional[int]
    samples: Optional[int]
    higher_is_better: Optional[bool]
    extra: dict[str, float] = field(default_factory=dict)  # the task's other metrics, same scaling

    @property
    def unit(self) -> str:
        """'%' or the metric's own name (e.g. bits_per_byte)."""
        return "%" if self.percent else self.metric


def _metric_keys(row: dict[str, Any], filt: str) -> list[str]:
    """Metric names of a harness result row under one filter, in the harness's order."""
    keys = []
    for key in row:
        name, _, f = key.partition(",")
        if f == filt and not name.endswith("_stderr") and name != "alias" and isinstance(row[key], (int, float)):
            keys.append(name)
    return keys


def _number(x: Any) -> Optional[float]:
    """A finite float, or None for the harness's "N/A" and friends."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def score_task(spec: TaskSpec, results: dict[str, Any]) -> TaskScore:
    """Read a task's primary metric (and the others) out of one harness result dict."""
    row = results["results"].get(spec.task)
    if row is None:
        raise DataError(f"lm-eval returned no results for task {spec.task!r}")
    metrics = _metric_keys(row, spec.filter)
    if not metrics:
        filters = sorted({k.partition(",")[2] for k in row if "," in k})
        raise ConfigError(f"task {spec.task!r}: no metric under filter {spec.filter!r}; the harness reported filters "
                          f"{', '.join(filters)}")
    metric = spec.metric or metrics[0]
    if metric not in metrics:
        raise choice_error(f"metric of task {spec.task!r}", metric, metrics)
    percent = metric in PERCENT_METRICS
    scale = 100.0 if percent else 1.0

    def scaled(name: str) -> Optional[float]:
        value = _number(row.get(f"{name},{spec.filter}"))
        return None if value is None else value * (100.0 if name in PERCENT_METRICS else 1.0)

    stderr = _number(row.get(f"{metric}_stderr,{spec.filter}"))
    n = results.get("n-samples", {}).get(spec.task, {}).get("effective")
    if n is None:  # groups: the sum over their subtasks
        subtasks = results.get("group_subtasks", {}).get(spec.task, [])
        counts = [results.get("n-samples", {}).get(s, {}).get("effective") for s in subtasks]
        n = sum(counts) if counts and None not in counts else None
    return TaskScore(
        task=spec.task, metric=metric, value=float(row[f"{metric},{spec.filter}"]) * scale,
        stderr=None if stderr is None else stderr * scale, percent=percent,
        in_average=percent if spec.in_average is None else bool(spec.in_average),
        num_fewshot=_single(ran) if (ran := effective_shots(results)) else spec.num_fewshot, samples=n,
        higher_is_better=results.get("higher_is_better", {}).get(spec.task, {}).get(metric),
        extra={m: v for m in metrics if m != metric and (v := scaled(m)) is not None},
    )


def effective_shots(results: dict[str, Any]) -> dict[str, int]:
    """The shot count each leaf task of one harness call ran at, from the configs the harness built.

    One `simple_evaluate` call per suite task, so every config in `results` belongs to that task (a
    group such as mmlu has one per subject).
    """
    return {name: cfg.get("num_fewshot") for name, cfg in results.get("configs", {}).items()}


def _single(shots: dict[str, int]) -> Optional[int]:
    """The one shot count all leaves ran at (None if they differ or none is known)."""
    values = set(shots.values())
    return values.pop() if len(values) == 1 else None


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One harness-shaped result dict out of several single-task ones."""
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key == "samples":
                continue
            if isinstance(value, dict) and key != "config":
                merged.setdefault(key, {}).update(value)
            else:
                merged.setdefault(key, value)
    return merged


def format_score(score: TaskScore) -> str:
    """`task: metric value ± stderr unit (shots, n)` on one line."""
    err = f" ± {score.stderr:.2f}" if score.stderr is not None else ""
    unit = "%" if score.percent else ""
    shots = f"{score.num_fewshot}-shot, " if score.num_fewshot is not None else ""
    return f"{score.task}: {score.metric} {score.value:.2f}{err}{unit} ({shots}n={score.samples})"
