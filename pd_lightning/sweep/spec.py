"""The sweep file: one YAML per paper experiment, read and checked into a `SweepSpec` at one scale.

A sweep file (see `sweeps/README.md`) names a base config, scales (`tiny` for a CPU, `paper` for a
GPU cluster), the LM-only baseline, and either a `grid` / `rows` of configurations (the paper's
one-axis-at-a-time ablations) or a `search` space for TPE, plus `seeds`. Every configuration x
seed is a `Task`; a task runs as one Optuna trial and one MLflow child run (see `runner`).

Every mistake in a file is refused here, before anything runs, with one line naming the file, the
field, the value and what is allowed (`SweepError`).

A sweep is named by a path or, for the files shipped with the package (the top-level `sweeps/` of a
source checkout, `pd_lightning/sweeps/` inside an installed wheel), by its bare name: `table4_alpha`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pd_lightning.config import PDLConfig, config_hash, load_config, resolve_config_path
from pd_lightning.errors import ConfigError, UserError, did_you_mean

SWEEP_KEYS = ("name", "description", "table", "base", "experiment", "set", "grid", "rows", "baseline", "group_by",
              "seeds", "search", "objective", "eval", "budget", "scales", "default_scale", "runner")
SCALE_KEYS = ("base", "set", "grid", "rows", "seeds", "search", "budget", "description")
SEARCH_KEYS = ("sampler", "trials", "seed", "space")
SAMPLERS = ("tpe", "random")
BUDGET_KINDS = ("tokens", "flops", "wall")
RUNNER_KEYS = ("heartbeat_interval", "grace_period")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# The shipped sweep files: package data inside a wheel (setup.py maps the package pd_lightning.sweeps to the
# top-level sweeps/, which the product's layout keeps where it is), the top-level dir itself in a source checkout
# (an editable install imports pd_lightning from the checkout, so sweeps/ sits beside it).
SHIPPED_SWEEP_DIRS = (Path(__file__).resolve().parents[1] / "sweeps", Path(__file__).resolve().parents[2] / "sweeps")
SHORT_NAMES = {"loss.alpha": "α", "logits.tau": "τ", "logits.p": "p", "logits.k": "k", "loss.kind": "loss",
               "model.preset": "student", "teacher.preset": "teacher", "teacher.path": "teacher",
               "logits.method": "τ method", "loss.alpha_schedule": "α schedule", "optim.lr_schedule": "LR"}


class SweepError(ConfigError):
    """A sweep file is malformed: one line naming the file, the field, the value and what is allowed."""


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
    tracking_uri: str | None = None  # `--tracking-uri`: the MLflow store of every run, over the file's and mlflow.yaml's

    @property
    def study_name(self) -> str:
        """The Optuna study (and MLflow parent run) of this file at this scale: `<name>.<scale>`."""
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

    def sampled_stores(self) -> list[tuple[int, int]]:
        """(draws N, sample seed) of every sampled store the sweep builds: like the cache (`sweep.cache`), one
        per (logits.samples, logits.sample_seed), since no looser store stands in for draws."""
        found = set()
        for t in self.baseline_points() + self.grid_points():
            logits = self.base_config({k: v for k, v in (self.common | t.overrides).items() if k.startswith("logits.")}).logits
            if logits.sampling == "sample":
                found.add((int(logits.samples), int(logits.sample_seed)))
        return sorted(found)

    def power_exponents(self) -> list[float]:
        """The power sums the store must keep for every configuration's targets (WTTM's full-vocabulary U)."""
        from pd_lightning.logits.processing import power_exponents_for  # torch: not for reading a file

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
        return load_config(self.base, overrides_to_args(self.common | (extra or {}) | self._tracking()))

    def run_overrides(self) -> dict[str, Any]:
        """What every trial gets beyond `set`: the shared store's truncation and power sums, the budget."""
        p, k = self.loosest_truncation()
        extra = {"logits.store_p": max(p, 1e-9), "logits.store_k": k, "logits.store_power_exponents": self.power_exponents()}
        if self.budget:
            extra |= {"trainer.budget_kind": self.budget["kind"], "trainer.budget": float(self.budget["value"])}
        return extra

    def point_config(self, overrides: dict[str, Any], run_overrides: dict[str, Any] | None = None) -> PDLConfig:
        """The config of one configuration without its seed (`run_overrides`: pass them when resolving many)."""
        extra = self.run_overrides() if run_overrides is None else run_overrides
        return load_config(self.base, overrides_to_args(self.common | extra | overrides | self._tracking()))

    def config_for(self, task: Task) -> PDLConfig:
        """The full config of one task (before prerequisite paths are filled in)."""
        return self.point_config(task.overrides | {"trainer.seed": task.seed, "model.init_seed": task.seed})

    def _tracking(self) -> dict[str, Any]:
        return {"tracking.tracking_uri": self.tracking_uri} if self.tracking_uri else {}


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


def shipped_sweeps() -> dict[str, Path]:
    """The sweep files shipped with the package, by name (`table4_alpha` -> its file)."""
    folder = next((d for d in SHIPPED_SWEEP_DIRS if d.is_dir()), None)
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder else {}


def resolve_sweep_path(name: str | Path) -> Path:
    """A sweep file: an existing path, else the shipped sweep of that bare name (`table4_alpha[.yaml]`)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = shipped_sweeps()
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if path.parent == Path(".") and stem in shipped:
        return shipped[stem]
    names = ", ".join(shipped) or "none (this install has no sweeps/)"
    hint = f" (did you mean {stem!r}, the shipped sweep?)" if stem in shipped else did_you_mean(stem, shipped)
    if path.parent != Path(".") or path.suffix:  # it looks like a path
        what = f"sweep file {str(name)!r} does not exist"
    else:
        what = f"sweep {str(name)!r} is neither a file nor a shipped sweep"
    raise SweepError(f"{what}; give a sweep file or the name of a shipped sweep: {names}{hint}")


def load_sweep(path: str | Path, scale: str | None = None, *, tracking_uri: str | None = None) -> SweepSpec:
    """Read and validate a sweep file (a path or a shipped sweep's name) at one scale (default: the file's
    `default_scale`, else `tiny`); `tracking_uri` overrides every run's MLflow store (`--tracking-uri`)."""
    path = resolve_sweep_path(path)
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
    if tracking_uri is not None:
        spec.tracking_uri = _tracking_override(spec, tracking_uri)
    return spec


def _tracking_override(spec: SweepSpec, uri: str) -> str | None:
    """`--tracking-uri`, or None when it names the store the sweep records to anyway.

    A run's identity (its digest) includes the tracking section, so naming the same store explicitly must
    not change it: a sweep started without the flag then resumes its interrupted trials with it.
    """
    from pd_lightning.config import same_tracking_store
    from pd_lightning.tracking import tracking_settings

    if same_tracking_store(uri, tracking_settings(spec.base_config())["tracking_uri"]):
        return None
    tracking_settings(dataclasses.replace(spec, tracking_uri=uri).base_config())  # a malformed URI: refused here
    return uri


def check_points(spec: SweepSpec) -> dict[str, str]:
    """Resolve every task's config; returns {label: one-line error} for the invalid ones."""
    bad: dict[str, str] = {}
    for task in spec.tasks():
        try:
            spec.config_for(task)
        except UserError as exc:
            bad.setdefault(task.label, str(exc))
    return bad
