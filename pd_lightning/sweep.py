"""Sweeps: one YAML per paper experiment, run as a plain Optuna study with an MLflow run per trial.

A sweep file (see `sweeps/README.md`) names a base config, scales (`tiny` for a CPU, `paper` for a
GPU cluster), the LM-only baseline, and either a `grid` / `rows` of configurations (the paper's
one-axis-at-a-time ablations) or a `search` space for TPE, plus `seeds`. Every configuration x
seed is a *task*; a task runs as one Optuna trial and one MLflow child run under the sweep's
parent run.

Exactly once, also with many workers: every claim happens under a study lock (a file lock for the
default sqlite storage, a PostgreSQL advisory lock for a shared database), which first fails
trials whose worker died (same host: the process is gone; other hosts: Optuna's heartbeat), then
enqueues the tasks that have no finished, running or waiting trial, then pops one waiting trial.
A task's training run lives in a directory named by the task's content hash, so a re-run of a
killed trial resumes its checkpoint in the same MLflow run, and a finished one is never redone.

Shared prerequisites (token shards, teacher, logit store at the loosest p/k the sweep needs) are
content-addressed directories in a cache shared by all sweeps, each built once under a file lock.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from pd_lightning.config import PDLConfig, config_hash, load_config, resolve_config_path
from pd_lightning.errors import ConfigError, UserError, did_you_mean
from pd_lightning.logits import codec
from pd_lightning.logits.processing import power_exponents_for

SWEEP_KEYS = ("name", "description", "table", "base", "experiment", "set", "grid", "rows", "baseline", "group_by",
              "seeds", "search", "objective", "eval", "budget", "scales", "default_scale", "runner")
SCALE_KEYS = ("base", "set", "grid", "rows", "seeds", "search", "budget", "description")
SEARCH_KEYS = ("sampler", "trials", "seed", "space")
SAMPLERS = ("tpe", "random")
BUDGET_KINDS = ("tokens", "flops", "wall")
RUNNER_KEYS = ("heartbeat_interval", "grace_period")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
PARENT_ATTR = "pdl.parent_run_id"
TASK_ATTR = "pdl.task"
ERROR_ATTR = "pdl.error"
SHORT_NAMES = {"loss.alpha": "α", "logits.tau": "τ", "logits.p": "p", "logits.k": "k", "loss.kind": "loss",
               "model.preset": "student", "teacher.preset": "teacher", "teacher.path": "teacher",
               "logits.method": "τ method", "loss.alpha_schedule": "α schedule", "optim.lr_schedule": "LR"}


class SweepError(ConfigError):
    """A sweep file is malformed: one line naming the file, the field, the value and what is allowed."""


# ----------------------------------------------------------------------------------------------
# The sweep file


@dataclass
class Row:
    """One labelled configuration of a table: the paper's row label and its config overrides."""

    label: str
    overrides: dict[str, Any]


@dataclass
class Task:
    """One configuration x one seed: what one trial trains and evaluates."""

    label: str
    overrides: dict[str, Any]  # the swept keys only (grid, row, baseline); `set` is applied beneath
    seed: int
    baseline: bool = False
    group: str = ""

    @property
    def point(self) -> str:
        """Identity of the configuration without its seed (seeds of one configuration share it)."""
        return config_hash(sorted(self.overrides.items()))[:12]

    @property
    def task_id(self) -> str:
        """Identity of configuration and seed: names the trial's run directory."""
        return config_hash(sorted(self.overrides.items()), self.seed)[:12]


@dataclass
class SweepSpec:
    """A sweep file resolved at one scale."""

    name: str
    path: Path
    scale: str
    description: str
    table: str
    base: Path
    experiment: str
    common: dict[str, Any]
    grid: dict[str, list[Any]]
    rows: list[Row]
    baseline: Row | None
    group_by: list[str]
    seeds: list[int]
    search: dict[str, Any] | None
    objective_metric: str
    direction: str
    evaluate: bool
    budget: dict[str, Any] | None
    heartbeat_interval: int = 10
    grace_period: int = 60
    scales: list[str] = field(default_factory=list)

    @property
    def study_name(self) -> str:
        return f"{self.name}.{self.scale}"

    def tasks(self) -> list[Task]:
        """Every grid/row configuration x seed, the baseline rows first (search trials come on top)."""
        out: list[Task] = []
        seen: set[str] = set()
        for point in self.baseline_points() + self.grid_points():
            for seed in self.seeds:
                task = dataclasses.replace(point, seed=seed)
                if task.task_id not in seen:  # a grid point equal to the baseline runs once
                    seen.add(task.task_id)
                    out.append(task)
        return out

    def grid_points(self) -> list[Task]:
        """The product of the grid axes, crossed with the rows (without seeds)."""
        if self.search is not None and not self.grid and not self.rows:
            return []
        keys = list(self.grid)
        points = []
        for combo in itertools.product(*(self.grid[k] for k in keys)) if keys else [()]:
            axes = dict(zip(keys, combo))
            group = _group_label(axes, self.group_by)
            for row in self.rows or [None]:
                overrides = dict(axes) | (row.overrides if row else {})
                shown = {k: v for k, v in axes.items() if k not in self.group_by}
                parts = ([row.label] if row else []) + ([point_label(shown)] if shown else [])
                label = " ".join(parts) if parts else "default"
                points.append(Task(label, overrides, seed=0, group=group))
        return points

    def baseline_points(self) -> list[Task]:
        """The LM-only row, once per group (e.g. per student size)."""
        if self.baseline is None:
            return []
        groups = list(itertools.product(*(self.grid[k] for k in self.group_by))) or [()]
        points = []
        for combo in groups:
            axes = dict(zip(self.group_by, combo))
            points.append(Task(self.baseline.label, axes | self.baseline.overrides, seed=0, baseline=True,
                               group=_group_label(axes, self.group_by)))
        return points

    def loosest_truncation(self) -> tuple[float, int]:
        """The store's (p, k): the loosest any configuration or the search space needs."""
        values = [self.common] + [t.overrides for t in self.baseline_points() + self.grid_points()]
        ps = [float(v["logits.p"]) for v in values if "logits.p" in v]
        ks = [int(v["logits.k"]) for v in values if "logits.k" in v]
        space = (self.search or {}).get("space", {})
        for key, target in (("logits.p", ps), ("logits.k", ks)):
            if key in space:
                dim = space[key]
                target.extend(dim["choices"] if "choices" in dim else [dim["high"]])
        base = self.base_config()
        return max(ps + [base.logits.p]), max(ks + [base.logits.k])

    def power_exponents(self) -> list[float]:
        """The power sums the store must keep for every configuration's targets (WTTM's full-vocabulary U)."""
        found: set[float] = set()
        base_method = self.base_config().logits.method
        for t in self.baseline_points() + self.grid_points():
            keys = {key: v for key, v in (self.common | t.overrides).items() if key.startswith("logits.")}
            if keys.get("logits.method", base_method) != "wttm" and "logits.store_power_exponents" not in keys:
                continue
            found.update(power_exponents_for(self.base_config(keys).logits))
        return sorted(found)

    def base_config(self, extra: dict[str, Any] | None = None) -> PDLConfig:
        """The base config with the sweep's common overrides (and `extra`)."""
        return load_config(self.base, overrides_to_args(self.common | (extra or {})))

    def config_for(self, task: Task) -> PDLConfig:
        """The full config of one task (before prerequisite paths are filled in)."""
        p, k = self.loosest_truncation()
        extra = {"logits.store_p": max(p, 1e-9), "logits.store_k": k, "logits.store_power_exponents": self.power_exponents()}
        seeds = {"trainer.seed": task.seed, "model.init_seed": task.seed}
        budget = {}
        if self.budget:
            budget = {"trainer.budget_kind": self.budget["kind"], "trainer.budget": float(self.budget["value"])}
        return load_config(self.base, overrides_to_args(self.common | extra | budget | task.overrides | seeds))


def overrides_to_args(overrides: dict[str, Any]) -> list[str]:
    """`{"loss.alpha": 0.9}` -> `["loss.alpha=0.9"]` (values as JSON, which YAML reads back exactly)."""
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def point_label(axes: dict[str, Any]) -> str:
    """A row label like the paper prints it: `top-0.95-50`, `α = 0.9`, `τ = 2.0`, `student=1.9B`."""
    axes = {k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in axes.items()}
    parts = []
    if "logits.p" in axes and "logits.k" in axes:
        parts.append(f"top-{axes.pop('logits.p')}-{axes.pop('logits.k')}")
    for key, value in axes.items():
        name = SHORT_NAMES.get(key, key)
        parts.append(f"{name} = {value}" if len(name) == 1 else f"{name}={value}")
    return ", ".join(parts)


def _group_label(axes: dict[str, Any], group_by: list[str]) -> str:
    return ", ".join(f"{k}={axes[k]}" for k in group_by if k in axes)


def _fail(path: Path, message: str) -> SweepError:
    return SweepError(f"sweep file {str(path)!r}: {message}")


def _check_keys(path: Path, where: str, raw: dict, allowed: tuple[str, ...]) -> None:
    for key in raw:
        if key not in allowed:
            raise _fail(path, f"unknown key {where}{key!r}; allowed: {', '.join(allowed)}{did_you_mean(key, allowed)}")


def _check_override_keys(path: Path, where: str, mapping: Any) -> dict[str, Any]:
    """A mapping of `section.key: value` overrides; keys are checked against the config tree."""
    from pd_lightning.config import PDLConfig as Tree

    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise _fail(path, f"{where} must be a mapping of section.key: value, got {type(mapping).__name__}")
    for key in mapping:
        section, _, name = str(key).partition(".")
        sections = list(Tree.__dataclass_fields__)
        if section not in sections or not name:
            raise _fail(path, f"{where} key {key!r} must be section.key with a section of {', '.join(sections)}"
                              f"{did_you_mean(key, sections)}")
        fields_ = list(Tree.__dataclass_fields__[section].default_factory.__dataclass_fields__)  # type: ignore[union-attr]
        if name not in fields_:
            raise _fail(path, f"{where} key {key!r} is not a config field; {section} has {', '.join(fields_)}"
                              f"{did_you_mean(name, fields_)}")
    return {str(k): v for k, v in mapping.items()}


def _row(path: Path, where: str, raw: Any) -> Row:
    if not isinstance(raw, dict) or "label" not in raw:
        raise _fail(path, f"{where} must be a mapping with a label and a set of overrides, e.g. "
                          "{label: 'α = 0.9', set: {loss.alpha: 0.9}}")
    _check_keys(path, f"{where}.", raw, ("label", "set"))
    return Row(str(raw["label"]), _check_override_keys(path, f"{where}.set", raw.get("set")))


def _grid(path: Path, where: str, raw: Any) -> dict[str, list[Any]]:
    grid = _check_override_keys(path, where, raw)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise _fail(path, f"{where}.{key}={values!r} must be a non-empty list of values")
        if len(set(map(json.dumps, values))) != len(values):
            raise _fail(path, f"{where}.{key}={values!r} lists a value twice")
    return grid


def _search(path: Path, raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _fail(path, "search must be a mapping with sampler, trials and space")
    _check_keys(path, "search.", raw, SEARCH_KEYS)
    sampler = raw.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise _fail(path, f"search.sampler={sampler!r} is not allowed; expected one of {', '.join(SAMPLERS)}"
                          f"{did_you_mean(sampler, SAMPLERS)}")
    trials = raw.get("trials")
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise _fail(path, f"search.trials={trials!r} must be an integer >= 1")
    space = _check_override_keys(path, "search.space", raw.get("space"))
    if not space:
        raise _fail(path, "search.space must name at least one parameter")
    for key, dim in space.items():
        where = f"search.space.{key}"
        if not isinstance(dim, dict):
            raise _fail(path, f"{where} must be {{low, high[, log, type]}} or {{choices: [...]}}")
        if "choices" in dim:
            _check_keys(path, f"{where}.", dim, ("choices",))
            if not isinstance(dim["choices"], list) or not dim["choices"]:
                raise _fail(path, f"{where}.choices={dim['choices']!r} must be a non-empty list")
            continue
        _check_keys(path, f"{where}.", dim, ("low", "high", "log", "type"))
        low, high, kind = dim.get("low"), dim.get("high"), dim.get("type", "float")
        if kind not in ("float", "int"):
            raise _fail(path, f"{where}.type={kind!r} is not allowed; expected float or int")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
            raise _fail(path, f"{where} needs numbers low < high, got low={low!r} high={high!r}")
        if dim.get("log") and low <= 0:
            raise _fail(path, f"{where}.low={low!r} must be > 0 with log: true")
    return {"sampler": sampler, "trials": trials, "seed": int(raw.get("seed", 0)), "space": space}


def _seeds(path: Path, where: str, raw: Any) -> list[int]:
    if not isinstance(raw, list) or not raw or not all(isinstance(s, int) and not isinstance(s, bool) for s in raw):
        raise _fail(path, f"{where}={raw!r} must be a non-empty list of integers")
    if len(set(raw)) != len(raw):
        raise _fail(path, f"{where}={raw!r} lists a seed twice")
    return list(raw)


OWN_METRIC_PREFIXES = ("eval.heldout.", "eval.icl.")  # names this lab defines in full: a typo is refused
TRAIN_LOGGED_PREFIX = "eval.heldout."  # logged by `pdl train` itself, so an objective without eval: true


def objective_metrics() -> dict[str, str]:
    """The objective metrics this lab defines, by name, with the direction each improves in."""
    from pd_lightning.evaluation import FEWSHOT_GAIN, ICL_METRIC_PREFIX, ICL_TASK_PREFIX, TASKS_DIR
    from pd_lightning.metrics import HELDOUT_METRICS, HELDOUT_PREFIX

    icl = sorted(ICL_METRIC_PREFIX + p.stem[len(ICL_TASK_PREFIX):] for p in TASKS_DIR.glob(f"{ICL_TASK_PREFIX}*.yaml"))
    return {"eval.average": "maximize", "heldout_loss": "minimize",
            **{HELDOUT_PREFIX + k: d for k, d in HELDOUT_METRICS.items()},
            **{m: "maximize" for m in [*icl, FEWSHOT_GAIN]}}


def load_sweep(path: str | Path, scale: str | None = None) -> SweepSpec:
    """Read and validate a sweep file at one scale (default: the file's `default_scale`, else `tiny`)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise _fail(path, f"is not valid YAML{where}") from None
    except UnicodeDecodeError:
        raise _fail(path, "is not a UTF-8 text file") from None
    if not isinstance(raw, dict):
        raise _fail(path, "must hold a mapping (name, base, grid or search, seeds, ...)")
    _check_keys(path, "", raw, SWEEP_KEYS)
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise _fail(path, f"name={name!r} must be 1-100 letters, digits, '_', '.' or '-' starting with a letter or "
                          "digit (it names the study and directories, so no '/' or '..')")
    scales = raw.get("scales") or {}
    if not isinstance(scales, dict) or not all(isinstance(s, str) and NAME_RE.match(s) for s in scales):
        raise _fail(path, "scales must be a mapping of scale name (letters, digits, _ . -) to its settings")
    scale = scale or raw.get("default_scale") or ("tiny" if "tiny" in scales else None)
    if scales and scale not in scales:
        raise _fail(path, f"scale {scale!r} is not defined; the file has {', '.join(scales)}{did_you_mean(scale, scales)}")
    at = scales.get(scale) or {}
    if not isinstance(at, dict):
        raise _fail(path, f"scales.{scale} must be a mapping of {', '.join(SCALE_KEYS)}")
    _check_keys(path, f"scales.{scale}.", at, SCALE_KEYS)

    base_name = at.get("base", raw.get("base"))
    if not isinstance(base_name, str) or not base_name:
        raise _fail(path, "base must name a config (a packaged name such as tiny, or a YAML path relative to the sweep file)")
    try:
        base = resolve_config_path(base_name, relative_to=path.parent)
    except UserError as exc:
        raise _fail(path, f"base={base_name!r}: {exc}") from None
    common = _check_override_keys(path, "set", raw.get("set")) | _check_override_keys(path, f"scales.{scale}.set", at.get("set"))
    grid = _grid(path, "grid", raw.get("grid"))
    for key, values in _grid(path, f"scales.{scale}.grid", at.get("grid")).items():
        grid[key] = values
    rows_raw = at.get("rows", raw.get("rows")) or []
    if not isinstance(rows_raw, list):
        raise _fail(path, "rows must be a list of {label, set}")
    rows = [_row(path, f"rows[{i}]", r) for i, r in enumerate(rows_raw)]
    labels = [r.label for r in rows]
    if len(set(labels)) != len(labels):
        raise _fail(path, f"rows have a duplicate label: {Counter(labels).most_common(1)[0][0]!r}")
    baseline = _row(path, "baseline", raw["baseline"]) if raw.get("baseline") is not None else None
    group_by = raw.get("group_by") or []
    if not isinstance(group_by, list) or any(g not in grid for g in group_by):
        raise _fail(path, f"group_by={group_by!r} must list grid keys (the grid has {', '.join(grid) or 'none'})")
    search_raw = raw.get("search")
    if isinstance(search_raw, dict) and isinstance(at.get("search"), dict):
        search_raw = search_raw | at["search"]  # a scale changes e.g. the number of trials
    elif at.get("search") is not None:
        search_raw = at["search"]
    search = _search(path, search_raw)
    if search is None and not grid and not rows and baseline is None:
        raise _fail(path, "needs a grid, rows, a baseline or a search space: nothing to run")
    seeds = _seeds(path, f"scales.{scale}.seeds" if "seeds" in at else "seeds", at.get("seeds", raw.get("seeds", [0])))
    objective = raw.get("objective") or {}
    if not isinstance(objective, dict):
        raise _fail(path, "objective must be {metric: eval.average, direction: maximize}")
    _check_keys(path, "objective.", objective, ("metric", "direction"))
    metric = str(objective.get("metric", "eval.average"))
    known = objective_metrics()
    if metric.startswith(OWN_METRIC_PREFIXES) and metric not in known:
        raise _fail(path, f"objective.metric={metric!r} is not a metric this lab logs; expected one of "
                          f"{', '.join(known)}{did_you_mean(metric, known)} (or any other logged metric by its name)")
    # a known metric's direction is its own; the default stays maximize for any other (eval.<task> scores)
    direction = objective.get("direction", known.get(metric, "maximize"))
    if direction not in ("maximize", "minimize"):
        raise _fail(path, f"objective.direction={direction!r} is not allowed; expected maximize or minimize")
    if metric in known and direction != known[metric]:
        raise _fail(path, f"objective.direction={direction!r} for {metric}, which improves the other way; "
                          f"use {known[metric]} (or leave direction out)")
    evaluate = raw.get("eval", True)
    if not isinstance(evaluate, bool):
        raise _fail(path, f"eval={evaluate!r} must be true or false")
    if not evaluate and metric.startswith("eval.") and not metric.startswith(TRAIN_LOGGED_PREFIX):
        raise _fail(path, f"objective.metric={metric!r} needs eval: true (or use heldout_loss or an "
                          f"{TRAIN_LOGGED_PREFIX}* metric, which training logs)")
    budget = at.get("budget", raw.get("budget"))
    if budget is not None:
        if not isinstance(budget, dict) or budget.get("kind") not in BUDGET_KINDS:
            raise _fail(path, f"budget={budget!r} must be {{kind: tokens|flops|wall, value: number}}")
        _check_keys(path, "budget.", budget, ("kind", "value"))
        budget = dict(budget)
        with contextlib.suppress(TypeError, ValueError):  # YAML 1.1 reads 3.15e12 (no sign) as a string
            budget["value"] = float(budget["value"]) if isinstance(budget.get("value"), str) else budget.get("value")
        if (not isinstance(budget.get("value"), (int, float)) or isinstance(budget["value"], bool)
                or not math.isfinite(budget["value"]) or not budget["value"] > 0):
            raise _fail(path, f"budget.value={budget.get('value')!r} must be a number > 0")
    runner = raw.get("runner") or {}
    _check_keys(path, "runner.", runner, RUNNER_KEYS)
    for key in RUNNER_KEYS:
        value = runner.get(key, 1)
        if not isinstance(value, int) or value < 1:
            raise _fail(path, f"runner.{key}={value!r} must be an integer number of seconds >= 1")
    experiment = raw.get("experiment", name)
    spec = SweepSpec(
        name=name, path=path, scale=scale or "default", description=str(raw.get("description", "")).strip(),
        table=str(raw.get("table", "")), base=base, experiment=str(experiment), common=common, grid=grid, rows=rows,
        baseline=baseline, group_by=list(group_by), seeds=seeds, search=search, objective_metric=metric,
        direction=direction, evaluate=evaluate, budget=budget,
        heartbeat_interval=int(runner.get("heartbeat_interval", 10)), grace_period=int(runner.get("grace_period", 60)),
        scales=list(scales),
    )
    try:
        spec.base_config()
    except UserError as exc:
        raise _fail(path, f"set: {exc}") from None
    return spec


def check_points(spec: SweepSpec) -> dict[str, str]:
    """Resolve every task's config; returns {label: one-line error} for the invalid ones."""
    bad: dict[str, str] = {}
    for task in spec.tasks():
        try:
            spec.config_for(task)
        except UserError as exc:
            bad.setdefault(task.label, str(exc))
    return bad


# ----------------------------------------------------------------------------------------------
# Where things live: storage, output dirs, locks


def default_storage(cfg: PDLConfig) -> str:
    """The Optuna storage beside the MLflow store: sqlite:///<dir of mlflow.db>/optuna.db (no server)."""
    from pd_lightning.tracking import tracking_settings

    uri = tracking_settings(cfg)["tracking_uri"]
    folder = Path(uri[len("sqlite:///"):]).resolve().parent if uri.startswith("sqlite:///") else Path.cwd()
    return f"sqlite:///{folder / 'optuna.db'}"


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
        raise ConfigError(f"--storage={_redact(url)!r} cannot be opened: {str(exc).splitlines()[0][:200]}") from None


def _redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


@contextlib.contextmanager
def study_lock(storage_url: str, study_name: str) -> Iterator[None]:
    """Serialise claims across workers: a PostgreSQL advisory lock, else a file lock beside the sqlite file."""
    if storage_url.startswith("postgresql"):
        import sqlalchemy

        key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        engine = _lock_engine(storage_url)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        return
    path = Path(storage_url.split("///", 1)[-1]) if storage_url.startswith("sqlite:///") else Path.cwd() / "optuna"
    with file_lock(path.with_name(f".{path.name}.{study_name}.lock")):
        yield


_ENGINES: dict[str, Any] = {}


def _lock_engine(url: str):
    import sqlalchemy

    if url not in _ENGINES:
        _ENGINES[url] = sqlalchemy.create_engine(url, pool_pre_ping=True)
    return _ENGINES[url]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held while the block runs (released by the OS if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class Place:
    """Where a sweep writes: its own dir (trial runs, logs) and the shared prerequisite cache."""

    out: Path
    cache: Path
    storage: str

    def trial_dir(self, task_id: str) -> Path:
        return self.out / "trials" / task_id


# ----------------------------------------------------------------------------------------------
# Shared prerequisites: token shards, teacher, logit store (content-addressed, built once)


def with_prerequisites(cfg: PDLConfig, cache: Path, *, build: bool = True, quiet: bool = True) -> PDLConfig:
    """Point `cfg` at the cached shards, teacher and store it needs, building each once under a lock."""
    from pd_lightning.data.prepare import data_hash, prepare

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data), teacher=dataclasses.replace(cfg.teacher),
                              logits=dataclasses.replace(cfg.logits))
    data_key = data_hash(cfg.data)
    cfg.data.out = str(cache / f"data-{data_key}")
    if build:
        with file_lock(cache / ".locks" / f"data-{data_key}.lock"):
            prepare(cfg.data, quiet=quiet)
    lg = cfg.logits
    if cfg.loss.alpha == 0 or lg.mode == "cotrain":
        return cfg
    if lg.mode == "online_store":  # the teacher writes the store while it trains: one unit
        key = config_hash("online", _teacher_key(cfg, data_key), lg.store_p, lg.store_k, lg.online_start_frac,
                          lg.online_end_frac, lg.sequences_per_shard)
        cfg.teacher.out, lg.store = str(cache / f"teacher-online-{key}"), str(cache / f"logits-online-{key}")
        if build:
            from pd_lightning.train import train_teacher

            with file_lock(cache / ".locks" / f"online-{key}.lock"):
                train_teacher(cfg, quiet=quiet)
        return cfg
    if not cfg.teacher.path:
        key = _teacher_key(cfg, data_key)
        cfg.teacher.out = str(cache / f"teacher-{key}")
        if build:
            from pd_lightning.train import train_teacher

            with file_lock(cache / ".locks" / f"teacher-{key}.lock"):
                train_teacher(cfg, quiet=quiet)
    teacher_id = store_teacher_id(cfg)
    exps = list(power_exponents_for(lg))
    found = find_store(cache, teacher_id, data_key, lg.store_p, lg.store_k, exps)
    if found is not None:
        lg.store, lg.store_p, lg.store_k = str(found[0]), found[1], found[2]
        return cfg
    # the encoding version and power sums are part of what a store holds (v1 stores at p = 1 are refused)
    key = config_hash("offline", teacher_id, data_key, lg.store_p, lg.store_k, codec.ENCODING_VERSION, exps)
    lg.store = str(cache / f"logits-{key}")
    if build:
        from pd_lightning.logits.generate import generate_store

        with file_lock(cache / ".locks" / f"logits-{key}.lock"):
            generate_store(cfg, quiet=quiet)
            (Path(lg.store) / "pdl_cache.json").write_text(json.dumps({
                "teacher_id": teacher_id, "teacher": str(Path(cfg.teacher.path or cfg.teacher.out).resolve()),
                "data": data_key, "p": lg.store_p, "k": lg.store_k, "encoding_version": codec.ENCODING_VERSION,
                "power_exponents": exps}))
    return cfg


def store_teacher_id(cfg: PDLConfig) -> str:
    """What a cached store's teacher is, for its cache key.

    A teacher the cache trained is named by its settings' hash, so the key survives moving the cache
    dir. A teacher of the user's (`teacher.path`) is named by its path, config and weight files (name,
    size, modification time): retraining it in place makes a new store instead of reusing the old one.
    """
    from pd_lightning.logits.generate import teacher_identity

    if not cfg.teacher.path:
        return f"cache:{Path(cfg.teacher.out).name}"
    path = Path(cfg.teacher.path).resolve()
    try:
        return f"path:{path}:{teacher_identity(path, mtimes=True)}"
    except OSError:  # a missing or unreadable dir: generation names the problem
        return f"path:{path}"


def _teacher_key(cfg: PDLConfig, data_key: str) -> str:
    t, o = cfg.teacher, cfg.optim
    return config_hash(t.preset, t.max_steps, t.batch_size, t.lr, t.warmup_frac, t.seed, data_key, o.weight_decay,
                       o.beta1, o.beta2, o.eps, o.min_lr_ratio, o.grad_clip)


def reference_teacher(cfg: PDLConfig, cache: Path) -> str | None:
    """For an LM-only task: the teacher the sweep's distilled rows on the same data learn from, if it exists.

    The LM baseline then gets held-out agreement and KL against the same teacher as its PD rows
    (eval.heldout.teacher_*), the reference those rows' numbers are read against.
    """
    from pd_lightning.data.prepare import data_hash

    if cfg.loss.alpha > 0 or cfg.logits.mode != "offline":
        return None
    path = Path(cfg.teacher.path) if cfg.teacher.path else cache / f"teacher-{_teacher_key(cfg, data_hash(cfg.data))}"
    return str(path.resolve()) if (path / "config.json").is_file() else None  # as the store's manifest names it


def find_store(cache: Path, teacher_id: str, data_key: str, p: float, k: int,
               power_exponents: list[float] | tuple[float, ...] = ()) -> tuple[Path, float, int] | None:
    """A finished cached store of this teacher (`store_teacher_id`) and data at least as loose as (p, k), of the
    current encoding version and keeping every power sum asked for: the tightest such."""
    best = None
    for marker in cache.glob("logits-*/pdl_cache.json"):
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        kept = {float(a) for a in info.get("power_exponents", [])}
        if (info.get("teacher_id") == teacher_id and info.get("data") == data_key
                and info.get("encoding_version", 1) == codec.ENCODING_VERSION and kept >= set(map(float, power_exponents))
                and float(info["p"]) >= p and int(info["k"]) >= k and (marker.parent / "manifest.json").is_file()):
            if best is None or (info["k"], info["p"]) < (best[2], best[1]):
                best = (marker.parent, float(info["p"]), int(info["k"]))
    return best


# ----------------------------------------------------------------------------------------------
# Trials: claim, run, record


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def visible_gpus(listed: str | None = None, count: int | None = None) -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries (none on a CPU machine).

    `listed` / `count` default to this process's CUDA_VISIBLE_DEVICES and torch's device count.
    """
    if count is None:
        import torch

        count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES") if listed is None else listed
    if listed is None:
        return [str(i) for i in range(count)]
    return [d.strip() for d in listed.split(",") if d.strip()][:count]  # CUDA ignores entries past the count


def gpu_groups(workers: int, per_worker: int, visible: list[str]) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each local worker: its own `per_worker` GPUs, so workers never share one.

    None for every worker when no GPU is visible (CPU workers). Too few GPUs for workers x per_worker is
    refused: two trials on one GPU would run out of memory or crawl.
    """
    if not visible:
        return [None] * workers
    need = workers * per_worker
    if need > len(visible):
        fits = len(visible) // per_worker
        raise ConfigError(f"--workers={workers} with trainer.devices={per_worker} needs {need} GPUs and "
                          f"{len(visible)} are visible ({','.join(visible)}); use --workers {max(1, fits)}"
                          + ("" if fits else " and fewer trainer.devices"))
    return [",".join(visible[i * per_worker:(i + 1) * per_worker]) for i in range(workers)]


def process_namespace() -> str:
    """Where a pid means something: host name + pid namespace (containers on one host share a host name)."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return os.environ.get("PDL_WORKER_HOST") or f"{socket.gethostname()}/{ns}"


def _owner_dead(trial) -> bool:
    """A RUNNING trial's worker in this pid namespace is gone (or its pid was reused by another process)."""
    attrs = trial.system_attrs
    if attrs.get("pdl.host") != process_namespace() or "pdl.pid" not in attrs:
        return False
    started = _process_start(int(attrs["pdl.pid"]))
    return started is None or abs(started - float(attrs.get("pdl.pid_start", started))) > 1e-3


def fail_dead_trials(study) -> list[int]:
    """Mark RUNNING trials whose worker died as FAIL (they are re-run): same-host pid check + heartbeats."""
    import optuna
    from optuna.trial import TrialState

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _owner_dead(trial):
            with contextlib.suppress(Exception):
                if study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                    study._storage.set_trial_system_attr(trial._trial_id, "pdl.crashed", True)
                    failed.append(trial.number)
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fail_stale_trials is experimental": it has been stable since 2.9
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        failed.extend(sorted(before - after))
    return failed


def _task_attrs(task: Task) -> dict[str, Any]:
    return {TASK_ATTR: task.task_id, "pdl.point": task.point, "pdl.label": task.label, "pdl.seed": task.seed,
            "pdl.baseline": task.baseline, "pdl.group": task.group, "pdl.overrides": json.dumps(task.overrides)}


def _task_from_trial(trial) -> Task:
    a = trial.user_attrs
    return Task(a["pdl.label"], json.loads(a["pdl.overrides"]), int(a["pdl.seed"]), bool(a["pdl.baseline"]),
                a.get("pdl.group", ""))


def task_states(study, tasks: list[Task]) -> dict[str, str]:
    """task_id -> complete | running | waiting | failed (an error was recorded) | crashed | pending."""
    from optuna.trial import TrialState

    rank = {"complete": 5, "running": 4, "waiting": 3, "failed": 2, "crashed": 1, "pending": 0}
    state = {t.task_id: "pending" for t in tasks}
    for trial in study.get_trials(deepcopy=False):
        tid = trial.user_attrs.get(TASK_ATTR)
        if tid is None:
            continue
        s = {TrialState.COMPLETE: "complete", TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}.get(trial.state)
        if s is None:
            s = "failed" if ERROR_ATTR in trial.user_attrs else "crashed"
        if rank[s] > rank[state.get(tid, "pending")]:
            state[tid] = s
    return state


def _distributions(spec: SweepSpec, tasks: list[Task]):
    """Categorical distributions over every value a swept key takes (so the study is a plain Optuna one)."""
    from optuna.distributions import CategoricalDistribution

    values: dict[str, list] = {}
    for t in tasks:
        for key, value in list(t.overrides.items()) + [("seed", t.seed)]:
            values.setdefault(key, [])
            if value not in values[key]:
                values[key].append(value)
    return {k: CategoricalDistribution(v) for k, v in values.items()}


def claim(study, spec: SweepSpec, storage_url: str, *, retry_failed: bool = False) -> tuple[Any, list[Task]] | None:
    """Under the study lock: fail dead trials, enqueue tasks with no live trial, pop one. None: nothing to claim."""
    from optuna.trial import TrialState

    tasks = spec.tasks()
    with study_lock(storage_url, spec.study_name):
        fail_dead_trials(study)
        states = task_states(study, tasks)
        redo = ("pending", "crashed", "failed") if retry_failed else ("pending", "crashed")
        for task in tasks:
            if states[task.task_id] in redo:
                searched = (spec.search or {}).get("space", {})
                study.enqueue_trial({k: v for k, v in task.overrides.items() if k not in searched} | {"seed": task.seed},
                                    user_attrs=_task_attrs(task), skip_if_exists=False)
        if spec.search is not None:
            _enqueue_crashed_search_trials(study)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if waiting:
            trial = study.ask()
            if trial.user_attrs.get(TASK_ATTR):
                task = _task_from_trial(trial)
                dists = _distributions(spec, tasks)
                searched = (spec.search or {}).get("space", {})
                for key, value in list(task.overrides.items()) + [("seed", task.seed)]:
                    if key not in searched:  # a parameter name keeps one distribution kind per study
                        trial.suggest_categorical(key, dists[key].choices)
                return _own(trial), [task]
            return _own(trial), _search_tasks(spec, trial)
        if spec.search is not None and _search_trials_claimed(study) < spec.search["trials"]:
            trial = study.ask()
            return _own(trial), _search_tasks(spec, trial)
    return None


def _own(trial):
    """Record which process runs the trial, so a dead worker on this host is noticed at once."""
    storage, tid = trial.study._storage, trial._trial_id
    storage.set_trial_system_attr(tid, "pdl.host", process_namespace())
    storage.set_trial_system_attr(tid, "pdl.pid", os.getpid())
    storage.set_trial_system_attr(tid, "pdl.pid_start", _process_start(os.getpid()) or 0.0)
    return trial


def _search_trials_claimed(study) -> int:
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.user_attrs.get("pdl.search") and not (t.state == TrialState.FAIL and ERROR_ATTR not in t.user_attrs))


def _enqueue_crashed_search_trials(study) -> None:
    """A search trial whose worker died is re-run with the same sampled parameters."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    live = {t.user_attrs.get("pdl.search_point") for t in trials if t.state != TrialState.FAIL}
    for t in trials:
        point = t.user_attrs.get("pdl.search_point")
        if point and t.state == TrialState.FAIL and ERROR_ATTR not in t.user_attrs and point not in live:
            study.enqueue_trial(t.params, user_attrs={"pdl.search_point": point, "pdl.search": True})
            live.add(point)


def _search_tasks(spec: SweepSpec, trial) -> list[Task]:
    """Sample one configuration from the search space (or take the enqueued one); one task per seed."""
    overrides = {}
    for key, dim in spec.search["space"].items():  # type: ignore[index]
        if "choices" in dim:
            overrides[key] = trial.suggest_categorical(key, dim["choices"])
        elif dim.get("type", "float") == "int":
            overrides[key] = trial.suggest_int(key, int(dim["low"]), int(dim["high"]), log=bool(dim.get("log")))
        else:
            overrides[key] = trial.suggest_float(key, float(dim["low"]), float(dim["high"]), log=bool(dim.get("log")))
    label = f"trial {trial.number}: {point_label(overrides)}"
    point = config_hash(sorted(overrides.items()))[:12]
    trial.set_user_attr("pdl.search", True)
    trial.set_user_attr("pdl.search_point", point)
    trial.set_user_attr("pdl.label", label)
    return [Task(label, overrides, seed) for seed in spec.seeds]


class Heartbeat:
    """Records the trial's heartbeat every `interval` s in a thread (what `study.optimize` does for us)."""

    def __init__(self, storage, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Heartbeat:
        self.storage.record_heartbeat(self.trial_id)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(self.trial_id)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class CoreShare:
    """This machine's cores, split among its local workers that are running a trial.

    `pdl sweep run --workers N` starts each worker with cores // N torch threads. A worker left without
    work (the tail of a sweep, fewer tasks than workers) would leave its cores idle, so the workers that
    are still training take them (torch.set_num_threads, re-checked every few seconds between steps) and
    hand them back when the idle one claims a task again. A worker marks itself busy with a file named by
    its pid in `.workers/` of the prerequisite cache, which every sweep on the machine shares by default
    (two sweeps side by side split the cores too); only this pid namespace's live workers count, so a
    cache shared by several machines splits each machine's cores among its own workers.
    """

    def __init__(self, directory: Path, cores: int, every_s: float = 2.0):
        self.directory, self.cores, self.every_s = Path(directory), max(1, int(cores)), every_s
        self.directory.mkdir(parents=True, exist_ok=True)
        host = hashlib.sha1(process_namespace().encode()).hexdigest()[:12]
        self.prefix = f"{host}-"
        self.marker = self.directory / f"{host}-{os.getpid()}"
        self._checked = 0.0

    def busy_workers(self) -> int:
        busy = 0
        for path in self.directory.glob(self.prefix + "*"):
            try:
                os.kill(int(path.name[len(self.prefix):]), 0)
                busy += 1
            except ProcessLookupError:  # a worker killed mid-trial left its marker
                path.unlink(missing_ok=True)
            except PermissionError:  # alive, run by another user
                busy += 1
            except ValueError:  # not a marker of ours
                continue
        return busy

    def threads(self) -> int:
        return max(1, self.cores // max(1, self.busy_workers()))

    def apply(self) -> int:
        """Set this process's torch threads to its share now; returns it."""
        import torch

        self._checked = time.monotonic()
        n = self.threads()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)  # per calling thread under OpenMP: call from the training thread
            print(f"sweep: worker {os.getpid()} now uses {n} torch thread(s) of {self.cores} cores", flush=True)
        return n

    def maybe_apply(self) -> None:
        if time.monotonic() - self._checked >= self.every_s:
            self.apply()

    def busy(self) -> None:
        """This worker has a task (kept from one task to the next, so the others do not grab its cores between)."""
        if not self.marker.exists():
            self.marker.touch()
        self.apply()

    def idle(self) -> None:
        """This worker has nothing to run (or is leaving): its cores go to the busy ones."""
        self.marker.unlink(missing_ok=True)

    def callback(self):
        """A Lightning callback that re-checks the share between training steps."""
        from lightning.pytorch.callbacks import Callback

        share = self

        class ShareCores(Callback):
            def on_train_batch_start(self, *args: Any) -> None:
                share.maybe_apply()

        return ShareCores()


def parent_run(spec: SweepSpec, study, storage_url: str) -> str:
    """The sweep's MLflow parent run (created once; its id is kept in the study)."""
    from mlflow.tracking import MlflowClient

    from pd_lightning.tracking import tracking_settings

    with study_lock(storage_url, spec.study_name):
        run_id = study.user_attrs.get(PARENT_ATTR)
        if run_id:
            return run_id
        cfg = spec.base_config()
        s = tracking_settings(cfg)
        client = MlflowClient(tracking_uri=s["tracking_uri"])
        experiment = client.get_experiment_by_name(spec.experiment)
        exp_id = experiment.experiment_id if experiment else client.create_experiment(
            spec.experiment, artifact_location=s["artifact_location"])
        run = client.create_run(exp_id, run_name=f"{spec.name} [{spec.scale}]", tags={
            "pd.role": "sweep", "pd.sweep": spec.name, "pd.scale": spec.scale, "pd.study": spec.study_name,
            "pd.table": spec.table, "mlflow.note.content": spec.description})
        client.log_text(run.info.run_id, spec.path.read_text(), "sweep.yaml")
        study.set_user_attr(PARENT_ATTR, run.info.run_id)
        study.set_user_attr("pdl.sweep_file", str(spec.path.resolve()))
        return run.info.run_id


def run_task(spec: SweepSpec, task: Task, place: Place, *, parent_id: str, trial_number: int,
             share: CoreShare | None = None) -> dict[str, Any]:
    """Train (resuming or reusing a finished run) and evaluate one task; returns its run summary and objective.

    `share`: re-split the machine's cores among busy workers while this task trains and before it scores.
    """
    from mlflow.tracking import MlflowClient

    from pd_lightning.evaluation import evaluate_with_config, log_to_mlflow
    from pd_lightning.tracking import tracking_settings
    from pd_lightning.train import train

    cfg = with_prerequisites(spec.config_for(task), place.cache)
    cfg.trainer.out = str(place.trial_dir(task.task_id))
    cfg.tracking.experiment = spec.experiment
    cfg.tracking.run_name = f"{task.label} seed {task.seed}"
    tags = {"mlflow.parentRunId": parent_id, "pd.sweep": spec.name, "pd.scale": spec.scale,
            "pd.study": spec.study_name, "pd.trial": str(trial_number), "pd.label": task.label,
            "pd.point": task.point, "pd.baseline": str(task.baseline).lower(), "pd.group": task.group,
            "pd.task": task.task_id}
    info = train(cfg, quiet=False, tags=tags, callbacks=[share.callback()] if share else None,
                 heldout_teacher=reference_teacher(cfg, place.cache))
    client = MlflowClient(tracking_uri=tracking_settings(cfg)["tracking_uri"])
    run = client.get_run(info["run_id"])
    if run.data.tags.get("pd.trial") != str(trial_number):  # a re-run trial reuses the run: point it here
        client.set_tag(info["run_id"], "pd.trial", str(trial_number))
    if spec.evaluate and "eval.average" not in run.data.metrics:
        final_step = int(info.get("steps", cfg.trainer.max_steps))
        for export in info.get("exports", []):  # intermediate checkpoints (Table 12): scores by step
            if int(export["step"]) >= final_step:
                continue  # the final model is scored below
            if share:
                share.apply()
            result = evaluate_with_config(export["path"], cfg, quiet=False)
            for key, value in _eval_metrics(result).items():
                client.log_metric(info["run_id"], key, value, step=int(export["step"]))
        if share:
            share.apply()
        result = evaluate_with_config(Path(cfg.trainer.out) / "model", cfg, quiet=False)
        log_to_mlflow(result, info["run_id"], tracking_uri=tracking_settings(cfg)["tracking_uri"], step=final_step)
    metrics = client.get_run(info["run_id"]).data.metrics
    if spec.objective_metric not in metrics:
        raise UserError(f"objective.metric={spec.objective_metric!r} was not logged by the run; it logged "
                        f"{', '.join(sorted(metrics)) or 'nothing'}")
    return {"run_id": info["run_id"], "value": float(metrics[spec.objective_metric])}


def _eval_metrics(result: dict[str, Any]) -> dict[str, float]:
    from pd_lightning.evaluation import metric_items

    return metric_items(result)


def record_failure(spec: SweepSpec, task: Task, place: Place, parent_id: str, trial_number: int, message: str) -> None:
    """Make a failed task visible in MLflow: its run (or a new one, if none was created) is FAILED with the error."""
    from mlflow.tracking import MlflowClient

    from pd_lightning.tracking import tracking_settings

    with contextlib.suppress(Exception):
        try:
            cfg = spec.config_for(task)
        except UserError:
            cfg = spec.base_config()
        client = MlflowClient(tracking_uri=tracking_settings(cfg)["tracking_uri"])
        state = place.trial_dir(task.task_id) / "run.json"
        if state.is_file():
            run_id = json.loads(state.read_text())["run_id"]
        else:
            experiment = client.get_experiment_by_name(spec.experiment)
            run_id = client.create_run(experiment.experiment_id, run_name=f"{task.label} seed {task.seed}", tags={
                "mlflow.parentRunId": parent_id, "pd.sweep": spec.name, "pd.scale": spec.scale,
                "pd.study": spec.study_name, "pd.trial": str(trial_number), "pd.label": task.label,
                "pd.point": task.point, "pd.seed": str(task.seed), "pd.task": task.task_id,
                "pd.baseline": str(task.baseline).lower(), "pd.group": task.group}).info.run_id
            for key, value in task.overrides.items():
                client.log_param(run_id, key, value)
        client.set_tag(run_id, "pd.error", message[:5000])
        client.set_terminated(run_id, "FAILED")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, UserError) else f"{type(exc).__name__}: {text}"


def worker(spec: SweepSpec, place: Place, *, retry_failed: bool = False, poll_s: float = 3.0,
           share: CoreShare | None = None) -> int:
    """Claim and run tasks until none is left (waiting while others run, in case one of them dies).

    `share`: split this machine's cores among the workers that are running a trial (see CoreShare).
    """
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    storage = open_storage(place.storage, spec)
    study = optuna.load_study(study_name=spec.study_name, storage=storage, sampler=make_sampler(spec))
    parent_id = study.user_attrs[PARENT_ATTR]
    ran = 0
    while True:
        claimed = claim(study, spec, place.storage, retry_failed=retry_failed and ran == 0)
        if claimed is None:
            if share:
                share.idle()
            if study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
                time.sleep(poll_s)  # someone is still running: if they die, their task is ours
                continue
            return ran
        trial, tasks = claimed
        print(f"sweep: trial {trial.number} ({', '.join(f'{t.label} seed {t.seed}' for t in tasks)}) on pid {os.getpid()}",
              flush=True)
        values, error = [], None
        if share:
            share.busy()
        with Heartbeat(storage, trial._trial_id, spec.heartbeat_interval):
            for task in tasks:
                try:
                    result = run_task(spec, task, place, parent_id=parent_id, trial_number=trial.number, share=share)
                    values.append(result["value"])
                    trial.set_user_attr("pdl.run_id" if len(tasks) == 1 else f"pdl.run_id.seed{task.seed}", result["run_id"])
                except Exception as exc:  # the sweep goes on; the error is kept in Optuna and MLflow
                    error = _one_line(exc)
                    print(f"sweep: trial {trial.number} failed: {error}", flush=True)
                    record_failure(spec, task, place, parent_id, trial.number, error)
                    break
        if error is None:
            study.tell(trial, sum(values) / len(values))
        else:
            trial.set_user_attr(ERROR_ATTR, error[:5000])
            study.tell(trial, state=TrialState.FAIL)
        ran += 1


def make_sampler(spec: SweepSpec):
    """TPE (or random) for a search; a grid only ever runs enqueued trials, whose values are fixed."""
    import optuna

    seed = (spec.search or {}).get("seed", 0)
    if spec.search is not None and spec.search["sampler"] == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(1, spec.search["trials"] // 3)))
    return optuna.samplers.RandomSampler(seed=seed)


# ----------------------------------------------------------------------------------------------
# The coordinator: `pdl sweep run`


def resolve_place(spec: SweepSpec, *, out: str | None, cache: str | None, storage: str | None) -> Place:
    """Output dir, cache dir and Optuna storage URL for a sweep (defaults beside the working dir's runs/)."""
    cfg = spec.base_config()
    return Place(out=Path(out) if out else Path("runs") / "sweeps" / spec.name / spec.scale,
                 cache=Path(cache) if cache else Path("runs") / "cache",
                 storage=storage or default_storage(cfg))


def create_study(spec: SweepSpec, place: Place):
    """Create (or open) the sweep's Optuna study and its MLflow parent run; returns (study, parent_run_id)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(place.storage, spec)
    direction = spec.direction
    study = optuna.create_study(study_name=spec.study_name, storage=storage, direction=direction,
                                sampler=make_sampler(spec), load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ConfigError(f"objective.direction={direction!r} differs from the existing study {spec.study_name!r} "
                          f"({study.direction.name.lower()}); use another sweep name or storage")
    return study, parent_run(spec, study, place.storage)


def build_prerequisites(spec: SweepSpec, place: Place) -> None:
    """Build every shared prerequisite the sweep's tasks need, once, before workers start."""
    seen = set()
    for task in spec.tasks() or [Task("search", {}, spec.seeds[0])]:
        try:
            cfg = spec.config_for(task)
        except UserError:
            continue  # an invalid point fails as its own trial
        key = config_hash(cfg.data, cfg.teacher, cfg.logits.mode, cfg.logits.store_p, cfg.logits.store_k,
                          cfg.loss.alpha > 0, cfg.logits.online_start_frac, cfg.logits.online_end_frac)
        if key not in seen:
            seen.add(key)
            with_prerequisites(cfg, place.cache, build=True, quiet=False)
    if spec.search is not None:  # the search space's own prerequisites (KD at the loosest truncation)
        with contextlib.suppress(UserError):
            with_prerequisites(spec.config_for(Task("search", {"loss.alpha": 1.0} if "loss.alpha" not in spec.common
                                                    else {}, spec.seeds[0])), place.cache, build=True, quiet=False)


def run_sweep(spec: SweepSpec, place: Place, *, workers: int = 1, retry_failed: bool = False,
              threads: int | None = None) -> int:
    """Run or continue a sweep with `workers` local worker processes; returns the number of failed tasks."""
    if workers < 1:
        raise ConfigError(f"--workers={workers} must be >= 1")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads={threads} must be >= 1 (or left out: the cores are split among the workers)")
    trainer = spec.base_config().trainer  # each local worker gets its own trainer.devices GPUs, if any
    gpus = gpu_groups(workers, trainer.devices, [] if trainer.accelerator == "cpu" else visible_gpus())
    study, parent_id = create_study(spec, place)
    tasks = spec.tasks()
    invalid = check_points(spec)
    for label, message in invalid.items():
        print(f"sweep: warning: configuration {label!r} is invalid and will be recorded as failed: {message}", flush=True)
    states = task_states(study, tasks)
    total = len(tasks) + (spec.search["trials"] if spec.search else 0)
    done = sum(1 for s in states.values() if s == "complete")
    print(f"sweep: {spec.name} [{spec.scale}] - {spec.table or spec.description.splitlines()[0] if spec.description else ''}"
          .rstrip(" -"), flush=True)
    print(f"sweep: {total} trials ({done} already complete), {workers} worker(s); study {spec.study_name!r} in "
          f"{_redact(place.storage)}; MLflow experiment {spec.experiment!r}, parent run {parent_id}", flush=True)
    place.out.mkdir(parents=True, exist_ok=True)
    if _nothing_to_do(study, spec, tasks, retry_failed):
        print(status_table(study, spec), flush=True)
        _close_parent(spec, parent_id, study, tasks)
        return len(_failed_trials(study))
    build_prerequisites(spec, place)
    _set_parent_status(spec, parent_id, "RUNNING")
    cores = usable_cores()
    fixed = threads is not None  # --threads N: exactly N each; otherwise busy workers share the cores
    threads = threads or max(1, cores // workers)
    logs = place.out / "logs"
    logs.mkdir(exist_ok=True)
    procs = []
    for i in range(workers):
        log = open(logs / f"worker-{i}.log", "a")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PDL_TORCH_THREADS=str(threads))
        if not fixed:
            env.update(PDL_CORE_SHARE=str(place.cache.resolve() / ".workers"), PDL_CORES=str(cores))
        if gpus[i] is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i]
        cmd = [sys.executable, "-m", "pd_lightning.sweep", "worker", str(spec.path), "--scale", spec.scale,
               "--storage", place.storage, "--out", str(place.out), "--cache", str(place.cache)]
        if retry_failed:
            cmd.append("--retry-failed")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    print(f"sweep: worker logs in {logs}/", flush=True)
    try:
        _watch(study, spec, tasks, procs)
    except KeyboardInterrupt:
        for proc, _ in procs:
            proc.terminate()
        raise
    finally:
        for proc, log in procs:
            proc.wait()
            log.close()
    states = task_states(study, tasks)
    failed = _failed_trials(study)
    print(status_table(study, spec), flush=True)
    bad = [p for p, _ in procs if p.returncode not in (0, None)]
    if bad:
        print(f"sweep: {len(bad)} worker(s) exited with an error; see {logs}/", flush=True)
    pending = [t for t in tasks if states[t.task_id] not in ("complete", "failed")]
    _close_parent(spec, parent_id, study, tasks)
    return len(failed) + len(pending) + len(bad)


def _nothing_to_do(study, spec: SweepSpec, tasks: list[Task], retry_failed: bool) -> bool:
    states = task_states(study, tasks)
    finished = ("complete",) if retry_failed else ("complete", "failed")
    search_left = spec.search is not None and _search_trials_claimed(study) < spec.search["trials"]
    return all(states[t.task_id] in finished for t in tasks) and not search_left and not (retry_failed and _failed_trials(study))


def _set_parent_status(spec: SweepSpec, parent_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    from pd_lightning.tracking import tracking_settings

    client = MlflowClient(tracking_uri=tracking_settings(spec.base_config())["tracking_uri"])
    if status == "RUNNING":
        client.update_run(parent_id, status="RUNNING")
    else:
        client.set_terminated(parent_id, status)


def _close_parent(spec: SweepSpec, parent_id: str, study, tasks: list[Task]) -> None:
    """The parent run is FINISHED when every trial completed, FAILED when some failed or are missing."""
    states = task_states(study, tasks)
    complete = all(states[t.task_id] == "complete" for t in tasks) and not _failed_trials(study)
    _set_parent_status(spec, parent_id, "FINISHED" if complete else "FAILED")


def _failed_trials(study) -> list:
    """Trials that failed with a recorded error, whose task did not complete in another trial since."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    completed = {t.user_attrs.get(TASK_ATTR) or t.user_attrs.get("pdl.search_point") for t in trials
                 if t.state == TrialState.COMPLETE}
    return [t for t in trials if t.state == TrialState.FAIL and ERROR_ATTR in t.user_attrs
            and (t.user_attrs.get(TASK_ATTR) or t.user_attrs.get("pdl.search_point")) not in completed]


def _watch(study, spec: SweepSpec, tasks: list[Task], procs: list) -> None:
    """Live progress until every worker exits: done / running / failed, ETA and best so far."""
    from optuna.trial import TrialState

    total = len(tasks) + (spec.search["trials"] if spec.search else 0)
    started, last_counts, last_print = time.time(), None, 0.0
    while any(p.poll() is None for p, _ in procs):
        time.sleep(2.0)
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        running = sum(1 for t in trials if t.state == TrialState.RUNNING)
        failed = len(_failed_trials(study))
        finished_here = [t for t in complete if t.datetime_start and t.datetime_start.timestamp() >= started - 1]
        remaining = max(0, total - len(complete) - failed)
        eta = ""
        if finished_here and remaining:
            per_trial = (time.time() - started) / len(finished_here)
            eta = f", ETA {_duration(per_trial * remaining)}"
        best = ""
        if complete:
            pick = max if spec.direction == "maximize" else min
            top = pick(complete, key=lambda t: t.value)
            best = f", best {spec.objective_metric} {top.value:.4g} ({top.user_attrs.get('pdl.label', top.number)})"
        line = f"sweep: {len(complete)}/{total} done, {running} running, {failed} failed{eta}{best}"
        counts = (len(complete), running, failed)
        if counts != last_counts or time.time() - last_print > 60:  # on every change, else once a minute
            print(f"{line} [{_duration(time.time() - started)}]", flush=True)
            last_counts, last_print = counts, time.time()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def status_table(study, spec: SweepSpec) -> str:
    """Plain-text table of every task (and search trial): label, seed, state, objective, run id, error."""
    from optuna.trial import TrialState

    tasks = spec.tasks()
    latest: dict[str, Any] = {}
    for trial in study.get_trials(deepcopy=False):
        key = trial.user_attrs.get(TASK_ATTR) or f"search-{trial.number}"
        if trial.state == TrialState.COMPLETE or key not in latest or latest[key].state != TrialState.COMPLETE:
            latest[key] = trial
    rows = []
    for task in tasks:
        trial = latest.get(task.task_id)
        rows.append(_status_row(task.label, str(task.seed), trial))
    for key, trial in latest.items():
        if key.startswith("search-"):
            rows.append(_status_row(trial.user_attrs.get("pdl.label", f"trial {trial.number}"),
                                    ",".join(map(str, spec.seeds)), trial))
    header = ("trial", "configuration", "seed", "state", spec.objective_metric, "minutes", "run / error")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header) - 1)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(header[:-1], widths)) + "  " + header[-1]]
    for r in rows:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1])
    counts = Counter(r[3] for r in rows)
    lines.append("total: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)


def _status_row(label: str, seed: str, trial) -> tuple[str, ...]:
    from optuna.trial import TrialState

    if trial is None:
        return ("-", label, seed, "pending", "", "", "")
    state = trial.state.name.lower()
    if trial.state == TrialState.FAIL:
        state = "failed" if ERROR_ATTR in trial.user_attrs else "crashed"
    value = f"{trial.value:.4g}" if trial.value is not None else ""
    minutes = ""
    if trial.datetime_start and trial.datetime_complete:
        minutes = f"{(trial.datetime_complete - trial.datetime_start).total_seconds() / 60:.1f}"
    extra = trial.user_attrs.get(ERROR_ATTR) or trial.user_attrs.get("pdl.run_id", "")
    return (str(trial.number), label, seed, state, value, minutes, extra)


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
# Worker entry point (`python -m pd_lightning.sweep worker ...`, started by `pdl sweep run`)


def _worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pd_lightning.sweep")
    parser.add_argument("command", choices=["worker"])
    parser.add_argument("sweep")
    parser.add_argument("--scale")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--retry-failed", action="store_true")
    args = parser.parse_args(argv)
    threads = os.environ.get("PDL_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    from pd_lightning import logs

    logs.quiet_libraries()
    logs.setup()
    spec = load_sweep(args.sweep, args.scale)
    place = Place(Path(args.out), Path(args.cache), args.storage)
    share = None
    if os.environ.get("PDL_CORE_SHARE"):
        share = CoreShare(Path(os.environ["PDL_CORE_SHARE"]), int(os.environ.get("PDL_CORES") or usable_cores()))
    try:
        ran = worker(spec, place, retry_failed=args.retry_failed, share=share)
    except UserError as exc:
        print(f"pdl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        if share:
            share.idle()
    print(f"sweep: worker {os.getpid()} done after {ran} trial(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
