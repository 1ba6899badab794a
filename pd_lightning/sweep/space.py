"""The study's design space: the Optuna parameters every trial of a sweep carries, and their distributions.

Optuna's dashboard computes parameter importance, slices and parallel coordinates over the trials that
share a parameter with one distribution. So every trial of a sweep's study carries the same keys, the
full design-space coordinates of its configuration, read from its resolved config:

    PAPER_KNOBS    the paper's axes, always: truncation p and k, the temperature τ and its method, how the
                   logits come (offline / online), the loss, α and its schedule, the LR schedule, student
                   and teacher (preset, or the path of an existing teacher dir)
    swept keys     every other key the sweep's baseline, grid, rows or search space sets, sorted

The replicate seed is no coordinate (an importance plot would rank noise first): it is the trial's
user attr `seed` (`seeds` on a search trial, which trains every seed).

One distribution per key, the same in every trial of the study (`design_space`):
    searched key   the search space's own dimension, which TPE samples; a fixed trial's value outside it
                   (the LM-only baseline's α = 0 beside a search over [0.1, 1]) is recorded where it is, as
                   Optuna does for enqueued trials, but it must be representable there (`check_representable`)
    numbers        IntDistribution / FloatDistribution from the smallest to the largest value the study's
                   configurations take (an ordered axis on the dashboard)
    anything else  CategoricalDistribution over the values in order of first appearance (strings, booleans,
                   None; lists as JSON text)

Grid trials are enqueued with every coordinate fixed; a search trial with the coordinates the search
does not vary, the sampler filling in the rest (`suggest_coordinates`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any

from pd_lightning.config import PDLConfig
from pd_lightning.errors import ConfigError, UserError
from pd_lightning.sweep.spec import SweepError, SweepSpec, Task

PAPER_KNOBS = ("logits.p", "logits.k", "logits.tau", "logits.method", "logits.mode", "loss.kind", "loss.alpha",
               "loss.alpha_schedule", "optim.lr_schedule", "model.preset", "teacher.preset", "teacher.path")


@dataclass(frozen=True)
class DesignSpace:
    """Every parameter of the study with its distribution, and the coordinates of each configuration."""

    distributions: dict[str, Any]  # key -> optuna BaseDistribution, in the order trials suggest them
    points: dict[str, dict[str, Any]]  # Task.point -> that configuration's coordinates
    search_fixed: dict[str, Any]  # a search trial's coordinates that the search does not vary

    def coordinates(self, task: Task) -> dict[str, Any]:
        """The parameters of a grid or baseline task's trial."""
        return dict(self.points[task.point])


def design_keys(spec: SweepSpec) -> list[str]:
    """The paper's knobs, then every other key the sweep varies (baseline, grid, rows, search space)."""
    swept = {key for point in spec.baseline_points() + spec.grid_points() for key in point.overrides}
    swept |= set((spec.search or {}).get("space", {}))
    return list(PAPER_KNOBS) + sorted(swept - set(PAPER_KNOBS))


def param_value(value: Any) -> Any:
    """A config value as an Optuna parameter value: scalars as they are, lists and mappings as JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, tuple, dict)) else value


def coordinates_of(cfg: PDLConfig, keys: list[str]) -> dict[str, Any]:
    """`key -> value` of a resolved config."""
    out = {}
    for key in keys:
        section, name = key.split(".")
        out[key] = param_value(getattr(getattr(cfg, section), name))
    return out


def _point_coordinates(spec: SweepSpec, point: Task, keys: list[str], base: dict[str, Any],
                       run: dict[str, Any]) -> dict[str, Any]:
    """A configuration's coordinates; an invalid one (recorded as a failed trial) keeps its raw overrides."""
    try:
        return coordinates_of(spec.point_config(point.overrides, run), keys)
    except UserError:
        return base | {k: param_value(v) for k, v in point.overrides.items() if k in base}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _observed_distribution(values: list[Any]):
    """The distribution of a key the search does not sample: a numeric range, else the categories seen."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if values and all(_is_number(v) for v in values):
        if all(isinstance(v, int) for v in values):
            return IntDistribution(min(values), max(values))
        return FloatDistribution(float(min(values)), float(max(values)))
    return CategoricalDistribution(list(dict.fromkeys(values)))


def search_distribution(dim: dict[str, Any]):
    """A search-space dimension (`{low, high[, log, type]}` or `{choices}`) as an Optuna distribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if "choices" in dim:
        return CategoricalDistribution(list(dim["choices"]))
    if dim.get("type", "float") == "int":
        return IntDistribution(int(dim["low"]), int(dim["high"]), log=bool(dim.get("log")))
    return FloatDistribution(float(dim["low"]), float(dim["high"]), log=bool(dim.get("log")))


def check_representable(spec: SweepSpec, key: str, dist, value: Any, label: str) -> None:
    """A fixed trial's value of a searched key must be storable in the search's distribution (Optuna's rule)."""
    from optuna.distributions import CategoricalDistribution

    try:
        dist.to_internal_repr(value)
        return
    except (ValueError, TypeError):
        pass
    if isinstance(dist, CategoricalDistribution):
        allowed = f"one of the choices {list(dist.choices)} (add {value!r} to them)"
    else:
        allowed = "a value > 0 for log: true (or search it with log: false)"
    raise SweepError(f"sweep file {str(spec.path)!r}: search.space.{key} cannot record {key}={value!r} of "
                     f"configuration {label!r}: every trial of the study carries every searched key in the search's "
                     f"distribution, so the value must be {allowed}")


def design_space(spec: SweepSpec) -> DesignSpace:
    """The study's parameters: every configuration's coordinates and one distribution per key (module docstring)."""
    keys = design_keys(spec)
    run = spec.run_overrides()
    try:
        base = coordinates_of(spec.point_config({}, run), keys)
    except UserError as exc:  # the file's own settings: load_sweep checked them without the store's truncation
        raise ConfigError(f"sweep file {str(spec.path)!r}: {exc}") from None
    points: dict[str, dict[str, Any]] = {}
    labels: dict[str, str] = {}
    for point in spec.baseline_points() + spec.grid_points():
        if point.point not in points:
            points[point.point] = _point_coordinates(spec, point, keys, base, run)
            labels[point.point] = point.label
    searched = (spec.search or {}).get("space", {})
    search_fixed = {k: v for k, v in base.items() if k not in searched}
    distributions = {}
    for key in keys:
        fixed = [(labels[p], c[key]) for p, c in points.items()]
        if key in searched:
            dist = search_distribution(searched[key])
            for label, value in fixed:
                check_representable(spec, key, dist, value, label)
        else:
            dist = _observed_distribution([v for _, v in fixed] + ([search_fixed[key]] if spec.search else []))
        distributions[key] = dist
    return DesignSpace(distributions, points, search_fixed if spec.search else {})


def suggest_coordinates(trial, space: DesignSpace) -> dict[str, Any]:
    """Record every parameter of the space on `trial`: enqueued values as they are, the others from the sampler."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    with warnings.catch_warnings():
        # a fixed trial's value outside a searched range (the baseline's α = 0) is recorded where it is
        warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range")
        for key, dist in space.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                trial.suggest_categorical(key, list(dist.choices))
            elif isinstance(dist, IntDistribution):
                trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
            else:
                trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.params


def check_study_space(study, space: DesignSpace, storage: str) -> None:
    """Refuse, in one line, a sweep file whose parameters no longer fit the trials its study already holds."""
    from optuna.distributions import check_distribution_compatibility

    seen: set[str] = set()
    for trial in study.get_trials(deepcopy=False):
        for key, old in trial.distributions.items():
            if key in seen or key not in space.distributions:
                continue
            seen.add(key)
            try:
                check_distribution_compatibility(old, space.distributions[key])
            except ValueError as exc:
                raise ConfigError(
                    f"{key}: the study {study.study_name!r} in {storage} records it as {old}, this sweep file gives "
                    f"{space.distributions[key]} ({exc}); a parameter cannot change within one Optuna study: restore "
                    "the file (or the pd-lightning version) that made the study, or run this one as a new study "
                    "(another sweep name, or --storage)") from None
