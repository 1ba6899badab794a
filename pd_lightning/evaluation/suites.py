"""Suites and tasks: which lm-eval tasks a suite runs, at which shots, read by which metric.

A *suite* (``pd_lightning/eval_tasks/suites/<name>.yaml``) lists tasks with their shot count and
primary metric; ``local`` runs offline on tasks made from the built-in corpus, ``paper`` names the
paper's benchmarks. Our own task YAMLs live in ``pd_lightning/eval_tasks/tasks`` and are registered
with the harness through ``TaskManager(include_path=...)``, so they work from the shell too; the local
tasks' items are data files beside them (``task_data``), read without importing the lab.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import yaml

from pd_lightning.errors import ConfigError, choice_error, did_you_mean
from pd_lightning.evaluation.task_data import SHIPPED_CORPUS_SEED, task_data_dir

EVAL_TASKS_DIR = Path(__file__).parent.parent / "eval_tasks"
TASKS_DIR = EVAL_TASKS_DIR / "tasks"  # what `--include_path` points at
SUITES_DIR = EVAL_TASKS_DIR / "suites"


# ----------------------------------------------------------------------------------------------
# Suites


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite: its harness name, shots and primary metric."""

    task: str
    metric: Optional[str] = None  # None: the first metric the harness reports for the task
    filter: str = "none"  # harness filter the metric is read under (e.g. gsm8k's "strict-match")
    num_fewshot: Optional[int] = None  # None: the task's own default
    in_average: Optional[bool] = None  # None: True exactly when the metric is a percentage


def available_suites() -> list[str]:
    """Names of the packaged suites."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load_suite(name: str) -> list[TaskSpec]:
    """The task specs of a packaged suite (or of a suite YAML file given by path)."""
    path = Path(name)
    if not (path.suffix == ".yaml" and path.is_file()):
        path = SUITES_DIR / f"{name}.yaml"
        if not path.is_file():
            raise choice_error("eval.suite", name, available_suites())
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"suite {str(path)!r} is not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    entries = raw.get("tasks") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"suite {str(path)!r} must have a non-empty list under 'tasks'")
    allowed = set(TaskSpec.__dataclass_fields__)
    specs = []
    for entry in entries:
        entry = {"task": entry} if isinstance(entry, str) else entry
        unknown = set(entry) - allowed if isinstance(entry, dict) else {"?"}
        if unknown or "task" not in entry:
            raise ConfigError(f"suite {str(path)!r}: entry {entry!r} must be a task name or a mapping with keys "
                              f"{', '.join(sorted(allowed))} (task required)")
        spec = TaskSpec(**entry)
        _check_spec_types(spec, path)
        specs.append(spec)
    return specs


def _check_spec_types(spec: TaskSpec, path: Path) -> None:
    """One-line errors for suite entries whose values have the wrong type."""
    expected = {
        "task": (lambda v: isinstance(v, str), "a string"),
        "metric": (lambda v: v is None or isinstance(v, str), "a metric name"),
        "filter": (lambda v: isinstance(v, str), "a filter name"),
        "num_fewshot": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                        "a non-negative integer"),
        "in_average": (lambda v: v is None or isinstance(v, bool), "true or false"),
    }
    for key, (ok, what) in expected.items():
        value = getattr(spec, key)
        if not ok(value):
            raise ConfigError(f"suite {str(path)!r}: task {spec.task!r} has {key}={value!r}; expected {what}")


def _suite_specs_by_task() -> dict[str, TaskSpec]:
    """Every packaged suite's spec by task name: a task given with --tasks keeps its suite settings."""
    specs: dict[str, TaskSpec] = {}
    for name in available_suites():
        for spec in load_suite(name):
            specs.setdefault(spec.task, spec)
    return specs


def resolve_tasks(suite: str = "local", tasks: str | list[str] | None = None) -> list[TaskSpec]:
    """The specs to run: the suite's, or the named tasks (which override the suite) if given."""
    if tasks is None:
        return load_suite(suite)
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"eval.tasks={tasks!r} names no task; give comma-separated harness task names")
    known = _suite_specs_by_task()
    return [known.get(n, TaskSpec(task=n)) for n in dict.fromkeys(names)]


# ----------------------------------------------------------------------------------------------
# The harness's task registry, with ours in it


def task_metadata(corpus_seed: int = 0) -> dict[str, object]:
    """The metadata our local tasks' datasets read: the corpus world, and for a world other than the
    shipped one the dir its item files were written to (`task_data.task_data_dir`)."""
    metadata: dict[str, object] = {"corpus_seed": int(corpus_seed)}
    if int(corpus_seed) != SHIPPED_CORPUS_SEED:
        metadata["data_dir"] = str(task_data_dir(int(corpus_seed)))
    return metadata


@lru_cache(maxsize=4)
def task_manager(include_defaults: bool = True, corpus_seed: int = 0):
    """A harness TaskManager that knows our tasks (cached: indexing the harness's own takes ~20 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults,
                       metadata=task_metadata(corpus_seed))


def our_task_names() -> list[str]:
    """The tasks defined in our task dir."""
    return sorted(task_manager(False).all_tasks)


def task_manager_for(names: list[str], corpus_seed: int):
    """Only our tasks -> a TaskManager without the harness's ~13k YAMLs; else the full one."""
    ours = set(our_task_names())
    return task_manager(not set(names) <= ours, corpus_seed)


def check_task_names(specs: list[TaskSpec], tm) -> None:
    """Refuse unknown task names before any model is loaded."""
    known = set(tm.all_tasks)
    for spec in specs:
        if spec.task not in known:
            raise ConfigError(f"eval.tasks: task {spec.task!r} is unknown to lm-evaluation-harness and to "
                              f"{TASKS_DIR}{did_you_mean(spec.task, known)}; `lm_eval ls tasks` lists the harness's")
