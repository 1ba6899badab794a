"""The paper's table layout: one row per configuration, task scores, Average, Δ% against the LM baseline.

A *configuration* is a `pd.label` (the row label as the paper prints it) within a *group* (the
`pd.group` tag, or the columns given as `group_by`): Table 11 has one LM baseline per student size,
so each size is a group with its own baseline. Runs of one configuration are its seeds.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.stats import AUTO_MIN_SEEDS, CI_METHODS, delta_ci, delta_ci_pooled, mean_ci, mean_ci_pooled, pooled_variance
from pd_lightning.errors import ConfigError, did_you_mean

# The paper's eight tasks in its column order, with the names its tables print.
PAPER_TASKS = {
    "hellaswag": "HellaSwag", "winogrande": "WinoGrande", "piqa": "PIQA", "mmlu": "MMLU", "kbqa": "KBQA",
    "c3": "C3", "ceval": "C-Eval", "ceval-valid": "C-Eval", "gsm8k": "GSM8k",
}
# Non-task columns of a paper table, in order; renderers treat every other column as a task.
AVERAGE, AVERAGE_CI, DELTA, DELTA_CI, DELTA_SIG = "Average", "Average ci95", "Δ%", "Δ% ci95", "Δ ci excludes 0"
PFLOPS, STORE_GB, DELTA_PER_COMPUTE = "PFLOPs", "store GB", "Δ per 10% extra compute"
KEY_COLUMNS = ["group", "label"]
STAT_COLUMNS = [AVERAGE, AVERAGE_CI, DELTA, DELTA_CI, DELTA_SIG, "n", "baseline"]
COST_COLUMNS = [PFLOPS, STORE_GB, DELTA_PER_COMPUTE]
_AVG_RUN = "_average"  # per-run Average while summarising
# Metrics beyond accuracy, as columns beside the paper's on request (`extra=`): MLflow key -> (printed
# name, scale, digits). Held-out token metrics (pd_lightning.metrics): loss in nats/token, top-1
# accuracy and teacher agreement in %, ECE (top-1, equal-mass bins), full-vocabulary Brier,
# KL(teacher ‖ student) in nats/token; in-context learning (pd_lightning/eval_tasks): copying
# accuracy on random and natural spans (chance 25%), synth_facts 5-shot and its gain over 0-shot (points).
EXTRA_METRICS = {
    "eval.heldout.loss": ("loss", 1.0, 3),
    "eval.heldout.top1_acc": ("top-1 %", 100.0, 1),
    "eval.heldout.ece": ("ECE", 1.0, 4),
    "eval.heldout.brier": ("Brier", 1.0, 4),
    "eval.heldout.teacher_top1_agree": ("agree %", 100.0, 1),
    "eval.heldout.teacher_kl": ("KL(T‖S)", 1.0, 3),
    "eval.icl.copy_random": ("copy rand", 1.0, 1),
    "eval.icl.copy_natural": ("copy nat", 1.0, 1),
    "eval.icl.facts_5shot": ("facts 5-shot", 1.0, 1),
    "eval.icl.fewshot_gain": ("5-shot gain", 1.0, 1),
}
EXTRA_LABELS = {label: digits for label, _, digits in EXTRA_METRICS.values()}
# Units of the printed columns (the renderers' units line under the header). Task scores are percent.
TASK_UNIT = "%"
COLUMN_UNITS = {AVERAGE: "%", DELTA: "% vs LM-only", "n": "seeds", PFLOPS: "1e15 FLOPs", STORE_GB: "1e9 bytes",
                DELTA_PER_COMPUTE: "Δ% per +10% FLOPs"}
EXTRA_UNITS = {"loss": "nats/token", "top-1 %": "%", "ECE": "unitless", "Brier": "unitless", "agree %": "%",
               "KL(T‖S)": "nats/token", "copy rand": "%", "copy nat": "%", "facts 5-shot": "%", "5-shot gain": "points"}
# Why two configurations can give identical results by construction (the note under the table).
NLL_KLD_REASON = ("with a fixed, offline teacher, loss.kind=nll and loss.kind=kld differ by a constant (the teacher's "
                  "entropy), so their gradients and results are identical")
SAME_CONFIG_REASON = "they are the same configuration (equal pd.config_hash)"


def column_unit(column: str) -> str:
    """The unit printed under a paper-table column: COLUMN_UNITS, EXTRA_UNITS, else a task score (%)."""
    return COLUMN_UNITS.get(column) or EXTRA_UNITS.get(column) or TASK_UNIT


def task_name(column: str) -> str:
    """The printed name of a task column: `eval.hellaswag` -> HellaSwag, unknown tasks unchanged."""
    task = column.removeprefix("eval.")
    return PAPER_TASKS.get(task, task)


def percent_task_columns(runs: pd.DataFrame) -> list[str]:
    """Every `eval.<task>` column that is a percentage, paper tasks first in the paper's order.

    Evaluation logs an accuracy-like task as `eval.<task>` and everything else with a further dot
    (`eval.<task>.stderr`, `eval.<task>.bits_per_byte`), so a dot-free task name is an accuracy, which
    `load_runs` gives in percent (MLflow holds the fraction).
    """
    cols = [c for c in runs.columns if c.startswith("eval.") and "." not in c[5:] and c != "eval.average"]
    order = list(PAPER_TASKS)
    return sorted(cols, key=lambda c: (order.index(c[5:]) if c[5:] in order else len(order), c))


def size_value(text: object) -> float | None:
    """A model size read from a name ("330M", "1.9B", "tiny-1m", "model.preset=6.8B"), else None."""
    m = re.search(r"(\d+(?:\.\d+)?)\s*([kmbt])(?![a-z0-9])", str(text).lower())
    if not m:
        return None
    return float(m.group(1)) * {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2)]


def _check_runs(runs: pd.DataFrame) -> None:
    if not isinstance(runs, pd.DataFrame):
        raise ConfigError(f"runs must be a pandas DataFrame from analysis.load_runs, not {type(runs).__name__}")
    if runs.empty:
        raise ConfigError("runs is empty: no finished runs were selected; check the tracking URI and sweep name")


def _resolve_tasks(runs: pd.DataFrame, tasks: Sequence[str] | None) -> list[str]:
    """Task metric columns to tabulate. Default: the percent tasks that every run has a score for."""
    available = percent_task_columns(runs)
    if tasks is not None:
        if isinstance(tasks, str):
            tasks = [tasks]
        cols = []
        for t in tasks:
            col = t if t.startswith("eval.") else f"eval.{t}"
            if col not in available:
                raise ConfigError(f"tasks: {t!r} is not a percent eval metric of these runs; expected one of "
                                  f"{', '.join(c[5:] for c in available) or '(none)'}")
            cols.append(col)
        return cols
    if not available:
        raise ConfigError("runs have no eval.<task> percent metrics; evaluate them first (pdl eval MODEL_DIR "
                          "--run-id RUN_ID, or let the sweep evaluate) — an Average needs task scores")
    common = [c for c in available if runs[c].notna().all()]
    if not common:
        raise ConfigError(f"no eval task is scored in every run (tasks seen: {', '.join(c[5:] for c in available)}); "
                          "pass tasks=[...] or select runs evaluated on the same tasks")
    if len(common) < len(available):
        # An Average over different task sets is not comparable, so tasks some runs lack are left out.
        missing = [c[5:] for c in available if c not in common]
        warnings.warn(f"tasks not scored in every run are left out of the table: {', '.join(missing)}", stacklevel=3)
    return common


def _mean_of(runs: pd.DataFrame, task_cols: list[str]) -> pd.Series:
    # Average of one run = mean of its task scores; NaN if it lacks one (never a partial mean).
    return runs[task_cols].astype(float).mean(axis=1, skipna=False)


def run_averages(runs: pd.DataFrame, tasks: Sequence[str] | None = None) -> pd.Series:
    """Each run's Average: the mean of its task scores (same task selection as `paper_table`)."""
    _check_runs(runs)
    return _mean_of(runs, _resolve_tasks(runs, tasks))


def config_labels(runs: pd.DataFrame) -> pd.Series:
    """Configuration label per run: pd.label, else pd.point, else the run name."""
    label = pd.Series(pd.NA, index=runs.index, dtype=object)
    for col in ("pd.label", "pd.point", "run_name"):
        if col in runs:
            vals = runs[col].where(runs[col].notna() & (runs[col].astype(str) != ""))
            label = label.fillna(vals)
    return label.fillna("(unlabelled)").astype(str)


def _groups(runs: pd.DataFrame, group_by: str | Sequence[str] | None) -> pd.Series:
    """Group key per run: the `group_by` columns' values, else the pd.group tag, else ""."""
    if group_by is None:
        if "pd.group" in runs:
            return runs["pd.group"].fillna("").astype(str)
        return pd.Series("", index=runs.index)
    cols = [group_by] if isinstance(group_by, str) else list(group_by)
    for c in cols:
        if c not in runs:
            raise ConfigError(f"group_by={c!r} is not a column of runs; expected e.g. pd.student, pd.teacher, pd.group")
    if len(cols) == 1:
        return runs[cols[0]].astype(str)
    return runs[cols].astype(str).apply(lambda r: ", ".join(f"{c}={v}" for c, v in r.items()), axis=1)


def _baseline_flags(runs: pd.DataFrame, labels: pd.Series, baseline: str | None) -> pd.Series:
    """Whether each run belongs to a baseline configuration."""
    if baseline is None:
        if "pd.baseline" not in runs:
            return pd.Series(False, index=runs.index)
        return runs["pd.baseline"].astype(str).str.lower().eq("true")
    if not isinstance(baseline, str) or baseline not in set(labels):
        allowed = ", ".join(dict.fromkeys(labels))
        raise ConfigError(f"baseline={baseline!r} is not a configuration label of these runs; expected one of {allowed}")
    return labels.eq(baseline)


def _dedupe(work: pd.DataFrame) -> pd.DataFrame:
    """Drop repeated runs of one row and seed (same group, label, pd.config_hash, pd.seed), keeping the latest.

    Two sweeps that share a row (e.g. the LM baseline of Tables 11 and 13) may both have run it;
    counting the copies as separate seeds would make the interval falsely narrow.
    """
    if "pd.config_hash" not in work or "pd.seed" not in work:
        return work
    keyed = work["pd.config_hash"].notna() & (work["pd.config_hash"].astype(str) != "") & work["pd.seed"].notna()
    dup = work[keyed].duplicated(["_group", "_label", "pd.config_hash", "pd.seed"], keep="last")
    return work.drop(index=dup[dup].index)


def _ordered_groups(groups: pd.Series) -> list[str]:
    """Groups in order of first appearance, or by model size when every group names one."""
    uniq = list(dict.fromkeys(groups))
    sizes = [size_value(g) for g in uniq]
    if len(uniq) > 1 and all(s is not None for s in sizes):
        return [g for _, g in sorted(zip(sizes, uniq), key=lambda t: t[0])]
    return uniq


def _agg_keep(values: pd.Series) -> object:
    """A kept column's value for a configuration: the mean if numeric, else the first non-empty value."""
    v = values.dropna()
    if v.empty:
        return np.nan
    if pd.api.types.is_numeric_dtype(v) and not pd.api.types.is_bool_dtype(v):
        return float(v.astype(float).mean())
    return v.iloc[0]


def extra_keys(runs: pd.DataFrame, extra: str | Sequence[str] | None) -> list[str]:
    """MLflow keys of the extra columns: None -> none; "auto" -> every EXTRA_METRICS key some run logged;
    names -> those, each as its key (eval.heldout.ece), without "eval." (heldout.ece) or by its last part (ece)."""
    if extra is None:
        return []
    if isinstance(extra, str) and extra == "auto":
        return [k for k in EXTRA_METRICS if k in runs and runs[k].notna().any()]
    names = [extra] if isinstance(extra, str) else list(extra)
    aliases = {alias: k for k in EXTRA_METRICS for alias in (k, k.removeprefix("eval."), k.rsplit(".", 1)[1])}
    keys = []
    for name in names:
        if name not in aliases:
            raise ConfigError(f"extra: {name!r} is not a metric beyond accuracy; expected \"auto\" or names among "
                              f"{', '.join(EXTRA_METRICS)}{did_you_mean(name, aliases)}")
        keys.append(aliases[name])
    return list(dict.fromkeys(keys))


def _config_row(cfg: pd.DataFrame, base: pd.DataFrame | None, task_cols: list[str], keep: Sequence[str],
                pooled: tuple[float, int] | None = None, ci: str = "welch", extras: Sequence[str] = ()) -> dict:
    """Statistics of one configuration (its runs = seeds) against its group's baseline runs.

    `pooled`: (variance, degrees of freedom) pooled over the group's configurations, used with
    ci="pooled", and with ci="auto" where this row or its baseline has fewer than AUTO_MIN_SEEDS seeds.
    """
    n_cfg = int(cfg[_AVG_RUN].notna().sum())
    n_base = int(base[_AVG_RUN].notna().sum()) if base is not None else n_cfg
    use_pooled = ci == "pooled" or (ci == "auto" and min(n_cfg, n_base) < AUTO_MIN_SEEDS)
    if not use_pooled:
        pooled = None
    avg, avg_ci = mean_ci(cfg[_AVG_RUN]) if pooled is None else mean_ci_pooled(cfg[_AVG_RUN], *pooled)
    row: dict[str, object] = {task_name(c): float(cfg[c].mean()) for c in task_cols}
    row.update({AVERAGE: avg, AVERAGE_CI: avg_ci})
    is_base = bool(cfg["_baseline"].all())
    flops = cfg["cost.total_flops"].mean() if "cost.total_flops" in cfg else np.nan
    row[PFLOPS] = flops / 1e15
    row[STORE_GB] = (cfg["cost.store_bytes_read"].mean() if "cost.store_bytes_read" in cfg else np.nan) / 1e9
    if base is None or is_base:
        row.update({DELTA: np.nan, DELTA_CI: np.nan, DELTA_SIG: False, DELTA_PER_COMPUTE: np.nan})
    else:
        d = (delta_ci(cfg[_AVG_RUN].to_numpy(), base[_AVG_RUN].to_numpy()) if pooled is None
             else delta_ci_pooled(cfg[_AVG_RUN].to_numpy(), base[_AVG_RUN].to_numpy(), *pooled))
        row.update({DELTA: d.value, DELTA_CI: d.ci95, DELTA_SIG: d.excludes_zero})
        base_flops = base["cost.total_flops"].mean() if "cost.total_flops" in base else np.nan
        extra = flops / base_flops - 1 if base_flops and np.isfinite(base_flops) else np.nan
        # Per 10% extra compute; undefined when PD costs no more than the baseline (or cost is unknown).
        row[DELTA_PER_COMPUTE] = d.value / (10 * extra) if np.isfinite(extra) and extra > 0 else np.nan
    row["n"] = int(cfg[_AVG_RUN].notna().sum())
    row["baseline"] = is_base
    for key in extras:  # mean over the configuration's seeds, in the printed unit
        label, scale, _ = EXTRA_METRICS[key]
        row[label] = float(cfg[key].astype(float).mean()) * scale if key in cfg and cfg[key].notna().any() else np.nan
    row.update({k: _agg_keep(cfg[k]) if k in cfg else np.nan for k in keep})
    return row


def summarize(runs: pd.DataFrame, baseline: str | None = None, tasks: Sequence[str] | None = None, *,
              group_by: str | Sequence[str] | None = None, keep: Sequence[str] = (), ci: str = "auto",
              extra: str | Sequence[str] | None = None) -> pd.DataFrame:
    """Per-configuration statistics (all columns of `paper_table` plus cost, `extra` and `keep` columns).

    `keep` names run columns to carry along per configuration (numeric: mean over seeds; other:
    first value), e.g. the swept parameter a figure puts on its x axis.
    """
    _check_runs(runs)
    if ci not in CI_METHODS:
        raise ConfigError(f"ci={ci!r} is not allowed; expected one of {', '.join(CI_METHODS)}")
    task_cols = _resolve_tasks(runs, tasks)
    extra = extra_keys(runs, extra)
    work = runs.copy()
    work["_label"] = config_labels(runs)
    work["_group"] = _groups(runs, group_by)
    work["_baseline"] = _baseline_flags(runs, work["_label"], baseline)
    work = _dedupe(work)
    work[_AVG_RUN] = _mean_of(work, task_cols)
    rows = []
    for group in _ordered_groups(work["_group"]):
        g = work[work["_group"] == group]
        base_labels = list(dict.fromkeys(g.loc[g["_baseline"], "_label"]))
        if len(base_labels) > 1:
            where = f" in group {group!r}" if group else ""
            raise ConfigError(f"several baseline configurations{where}: {', '.join(base_labels)}; "
                              "pass baseline=<label> to choose one")
        base = g[g["_label"] == base_labels[0]] if base_labels else None
        labels = base_labels + [lab for lab in dict.fromkeys(g["_label"]) if lab not in base_labels]
        pooled = pooled_variance([g.loc[g["_label"] == lab, _AVG_RUN].to_numpy() for lab in labels]) if ci != "welch" else None
        for label in labels:
            row = _config_row(g[g["_label"] == label], base, task_cols, keep, pooled, ci, extra)
            rows.append({"group": group, "label": label, **row})
    table = pd.DataFrame(rows)
    table.attrs["identical"] = identical_configurations(work, task_cols)
    return table


def _reason(runs: pd.DataFrame) -> str:
    """Why these configurations' runs are identical, when it follows from their design tags; else ""."""
    def values(col: str) -> set[str]:
        return set(runs[col].dropna().astype(str)) if col in runs else set()

    hashes = values("pd.config_hash") - {""}
    if len(hashes) == 1 and runs["pd.config_hash"].notna().all():
        return SAME_CONFIG_REASON
    if values("pd.loss") == {"nll", "kld"} and values("pd.logits_mode") == {"offline"}:
        return NLL_KLD_REASON
    return ""


def identical_configurations(work: pd.DataFrame, task_cols: Sequence[str]) -> list[dict[str, object]]:
    """Sets of configurations within a group whose results are exactly equal: the same seeds and, seed by
    seed, every task score (and every beyond-accuracy metric logged) equal. Each: group, labels, reason."""
    scores = list(task_cols) + [k for k in EXTRA_METRICS if k in work and k not in task_cols]
    found = []
    for group in dict.fromkeys(work["_group"]):
        g = work[work["_group"] == group]
        buckets: dict[tuple, list[str]] = {}
        for label in dict.fromkeys(g["_label"]):
            cfg = g[g["_label"] == label]
            seeds = cfg["pd.seed"].astype(str) if "pd.seed" in cfg else pd.Series("", index=cfg.index)
            if "pd.seed" in cfg and cfg["pd.seed"].isna().any():
                continue  # unknown seeds: "over the same seeds" cannot be checked
            values = cfg[scores].apply(pd.to_numeric, errors="coerce").astype(float)
            key_rows = sorted(zip(seeds, map(tuple, np.where(values.isna(), np.inf, values).tolist())))
            if not key_rows or values[list(task_cols)].isna().any().any():
                continue
            buckets.setdefault(tuple(key_rows), []).append(label)
        for labels in buckets.values():
            if len(labels) > 1:
                found.append({"group": group, "labels": labels, "reason": _reason(g[g["_label"].isin(labels)])})
    return found


def _select_rows(table: pd.DataFrame, rows: Sequence[str]) -> pd.DataFrame:
    """Only the given labels, in the given order, within each group (groups keep their order)."""
    if isinstance(rows, str):
        rows = [rows]
    known = list(dict.fromkeys(table["label"]))
    for r in rows:
        if r not in known:
            raise ConfigError(f"rows: {r!r} is not a configuration label of these runs; expected one of {', '.join(known)}")
    order = {r: i for i, r in enumerate(rows)}
    group_order = {g: i for i, g in enumerate(dict.fromkeys(table["group"]))}
    picked = table[table["label"].isin(order)].copy()
    picked["_g"], picked["_r"] = picked["group"].map(group_order), picked["label"].map(order)
    return picked.sort_values(["_g", "_r"], kind="stable").drop(columns=["_g", "_r"]).reset_index(drop=True)


def paper_table(runs: pd.DataFrame, baseline: str | None = None, tasks: Sequence[str] | None = None,
                rows: Sequence[str] | None = None, *, group_by: str | Sequence[str] | None = None,
                cost: bool = False, ci: str = "auto", extra: str | Sequence[str] | None = None) -> pd.DataFrame:
    """The paper's table: one row per configuration, task scores (%), Average and Δ% with 95% CIs.

    Columns: group ("" without groups), label, one column per task (printed names, mean over
    seeds), Average (mean over seeds of each run's mean task score), Average ci95 (half-width of the
    t-interval over seeds; NaN for one seed), Δ% = 100·(Average / Average_baseline − 1) against the
    baseline of the same group, Δ% ci95 (delta method; `ci="welch"`: each configuration's own seeds,
    Welch degrees of freedom, `analysis.stats.delta_ci`; `ci="pooled"`: the seed variance pooled
    over the group's configurations, `analysis.stats.pooled_variance` — with two seeds a row, Welch
    leaves 1-2 degrees of freedom; `ci="auto"` (default): Welch where the row and its baseline both
    have >= 3 seeds, else pooled),
    Δ ci excludes 0 (bool), n (seeds), baseline (bool; baseline rows have no Δ). With `cost=True`
    also PFLOPs (cost.total_flops), store GB (cost.store_bytes_read) and Δ per 10% extra compute
    (Δ% divided by the extra compute over the baseline in units of 10%) — NaN where not logged.
    `table.attrs["identical"]`: configurations whose results are exactly equal (`identical_configurations`),
    with the reason when their tags give it (nll vs kld with a fixed, offline teacher).

    `baseline`: a label; default: the runs tagged pd.baseline=true in each group. `tasks`: task
    names (default: every percent `eval.<task>` scored in all runs). `rows`: labels to show, in
    order. `group_by`: run columns that define groups (default: the pd.group tag).
    `extra`: metrics beyond accuracy as further columns (EXTRA_METRICS; mean over seeds, their
    printed names and units; NaN where a run did not log them): names, or "auto" for every one
    the runs logged; default none (the paper's layout).
    """
    table = summarize(runs, baseline, tasks, group_by=group_by, ci=ci, extra=extra)
    identical = table.attrs.get("identical", [])
    if rows is not None:
        table = _select_rows(table, rows)
        shown = set(zip(table["group"], table["label"]))
        identical = [{**d, "labels": [lab for lab in d["labels"] if (d["group"], lab) in shown]} for d in identical]
        identical = [d for d in identical if len(d["labels"]) > 1]
    if not cost:
        table = table.drop(columns=COST_COLUMNS)
    table.attrs["ci"] = ci  # the renderers' footnote names the method
    table.attrs["identical"] = identical  # the renderers' note under rows identical by construction
    return table


def task_columns(table: pd.DataFrame) -> list[str]:
    """The task columns of a paper table (every column that is not a key, statistic, cost or extra column)."""
    fixed = set(KEY_COLUMNS) | set(STAT_COLUMNS) | set(COST_COLUMNS) | set(EXTRA_LABELS)
    return [c for c in table.columns if c not in fixed]


def extra_columns(table: pd.DataFrame) -> list[str]:
    """The extra (beyond-accuracy) columns of a paper table, in order."""
    return [c for c in table.columns if c in EXTRA_LABELS]


def is_finite(x: object) -> bool:
    """True for a real, finite number (False for None, NaN, pd.NA, strings)."""
    try:
        return math.isfinite(float(x))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def sweep_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per sweep (pd.sweep) of a store: runs, configurations, most seeds, and its best
    configuration by Δ% (with whether Δ's 95% interval excludes zero). A sweep whose table cannot
    be made (no eval metrics yet, an ambiguous baseline) says why in `note`."""
    _check_runs(runs)
    sweeps = runs["pd.sweep"].fillna("(no sweep)") if "pd.sweep" in runs else pd.Series("(no sweep)", index=runs.index)
    out = []
    for name in dict.fromkeys(sweeps):
        sel = runs[sweeps == name]
        row: dict[str, object] = {"sweep": name, "runs": len(sel), "configurations": np.nan, "max seeds": np.nan,
                                  "best": "", "best Δ%": np.nan, "Δ ci excludes 0": False, "note": ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                table = summarize(sel)
        except ConfigError as err:
            row["note"] = str(err)
            out.append(row)
            continue
        row["configurations"], row["max seeds"] = len(table), int(table["n"].max())
        scored = table[table[DELTA].notna()]
        if scored.empty:
            row["note"] = "no baseline (pd.baseline=true) in this sweep"
        else:
            best = scored.loc[scored[DELTA].idxmax()]
            label = f"{best['label']} ({best['group']})" if best["group"] else best["label"]
            row.update({"best": label, "best Δ%": best[DELTA], "Δ ci excludes 0": bool(best[DELTA_SIG])})
        out.append(row)
    return pd.DataFrame(out)
